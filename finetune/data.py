"""Conversation data for SFT: sources, the default mix, fitting to the context, and packed batches.

Sources of conversations (lists of {"role", "content"} messages): chatterbot-corpus's English .yml Q/A (a tiny
parser for its one YAML shape), chitchat-dataset, our generated tasks and identity conversations (finetune.tasks,
training side of the split), and the user's .jsonl files of {"messages": [...]} or SmolTalk-style parquet.
``fit_conversation`` fits one conversation to the context between exchanges, never cutting an answer;
``SFTLoader`` packs the results into rows and yields (inputs, targets, loss_mask) batches.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from common.dist import Dist
from finetune import tasks
from finetune.chat import ChatFormatError, ConversationTooLong, render_conversation, validate_messages

Conversation = list[dict[str, str]]
SMOLTALK_URL = (
    "https://huggingface.co/datasets/HuggingFaceTB/smol-smoltalk/resolve/main/data/train-{i:05d}-of-{n:05d}.parquet"
)
SMOLTALK_URL_ENV = "SCRATCHCHAT_SMOLTALK_URL"
SMOLTALK_FILES = 4  # train shards in the published set


class DataError(ValueError):
    """Bad conversation data; the message names the file (and line) and what is wrong."""


# --- chatterbot-corpus: its .yml files are one shape of YAML, parsed here in a few lines -----------


def _unquote(text: str) -> str:
    """A single- or double-quoted YAML scalar (already folded onto one line) to its value."""
    q, body = text[0], text.strip()[1:-1]
    if q == "'":
        return body.replace("''", "'")
    escapes = {"n": "\n", "t": "\t", '"': '"', "\\": "\\", "/": "/", "0": "\0", " ": " "}
    return re.sub(
        r"\\(u[0-9a-fA-F]{4}|x[0-9a-fA-F]{2}|.)",
        lambda m: chr(int(m[1][1:], 16)) if len(m[1]) > 1 else escapes.get(m[1], m[1]),
        body,
    )


def _fold(lines: list[str]) -> str:
    """YAML line folding for flow scalars: a line break is a space, an empty line a newline."""
    out, pending = "", 0
    for ln in lines:
        ln = ln.strip(" \t")  # YAML trims only spaces and tabs (not NBSP)
        if not ln:
            pending += 1
            continue
        if out:
            out += "\n" * pending if pending else " "
        out, pending = out + ln, 0
    return out


def _scalar(first: str, more: list[str]) -> str:
    """One scalar from the text after its dash and its continuation lines."""
    if first[:1] in "|>":  # block: "|" keeps line breaks, ">" folds them; "-" drops the final newline
        while more and not more[-1].strip():
            more.pop()
        indent = min((len(ln) - len(ln.lstrip(" ")) for ln in more if ln.strip()), default=0)
        body = [ln[indent:] for ln in more]
        text = "\n".join(body) if first[0] == "|" else _fold(body)
        return text + ("\n" if "-" not in first and text else "")
    if first[:1] in "'\"":
        return _unquote(_fold([first, *more]))
    return re.sub(r"\s+#.*$", "", _fold([first, *more]))


def parse_chatterbot_yaml(text: str) -> list[list[str] | str]:
    """The ``conversations:`` list of a chatterbot-corpus file: each entry a list of turns.

    A few files have a malformed entry ("- text" instead of "- - text"); as in YAML, that entry is
    one string (its indented lines folded in), which callers skip.
    """
    entries: list[list[str] | str] = []
    item: list[str] | None = None  # first line + continuation lines of the scalar being read
    inside = False

    def close() -> None:
        nonlocal item
        if item is not None:
            value = _scalar(item[0], item[1:])
            if isinstance(entries[-1], list):
                entries[-1].append(value)
            else:
                entries[-1] = value
            item = None

    for line in text.lstrip("\ufeff").splitlines():
        top_key = re.match(r"^\s*(\w+):\s*$", line)
        if top_key and not line.startswith("    "):
            close()
            inside = top_key[1] == "conversations"
        elif not inside:
            continue
        elif line.startswith("- - "):
            close()
            entries.append([])
            item = [line[4:].strip(" \t")]
        elif line.startswith("- "):
            close()
            entries.append("")
            item = [line[2:].strip(" \t")]
        elif line.startswith("  - ") and entries and isinstance(entries[-1], list):
            close()
            item = [line[4:].strip(" \t")]
        elif item is not None:
            item.append(line)
    close()
    return entries


def chatterbot_conversations(root: Path | None = None) -> list[Conversation]:
    """English chatterbot-corpus exchanges as user/assistant conversations (odd turns dropped)."""
    root = root or tasks.package_dir("chatterbot_corpus") / "data" / "english"
    out = []
    for f in sorted(Path(root).glob("*.yml")):
        for turns in parse_chatterbot_yaml(f.read_text(encoding="utf-8")):
            if not isinstance(turns, list):
                continue
            turns = [t.strip() for t in turns][: len(turns) // 2 * 2]
            if turns and all(turns):
                out.append([{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(turns)])
    return out


def chitchat_conversations(path: Path | None = None) -> list[Conversation]:
    """chitchat-dataset conversations of at least one exchange.

    The first speaker is the user; one speaker's consecutive messages join with newlines."""
    path = path or tasks.package_dir("chitchat_dataset") / "dataset.json"
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    out = []
    for cid in sorted(data):
        groups = [" \n".join(m["text"].strip() for m in g).strip() for g in data[cid]["messages"]]
        if "" in groups:  # dropping an empty turn would break the alternation: keep what precedes it
            groups = groups[: groups.index("")]
        groups = groups[: len(groups) // 2 * 2]
        if len(groups) >= 2:
            out.append([{"role": ("user", "assistant")[i % 2], "content": g} for i, g in enumerate(groups)])
    return out


# --- the user's files ---------------------------------------------------------------------------


def _check_messages(messages, where: str) -> Conversation:
    try:
        msgs = validate_messages(messages)
    except ChatFormatError as e:
        raise DataError(f"{where}: {e}") from None
    if msgs[-1]["role"] != "assistant":
        raise DataError(f"{where}: the conversation must end with an assistant message (nothing to learn otherwise)")
    return msgs


def load_jsonl(path: str | Path, skip_bad: bool = False) -> tuple[list[Conversation], int]:
    """Conversations from a .jsonl file of {"messages": [...]}; returns (conversations, lines skipped).

    Any bad line raises DataError naming file and line, unless skip_bad, which skips and counts it.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({e.__class__.__name__}: {e})") from None
    convs, skipped = [], 0
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict) or "messages" not in obj:
                raise DataError(f'{where}: expected an object with a "messages" list')
            convs.append(_check_messages(obj["messages"], where))
        except DataError:
            if not skip_bad:
                raise
            skipped += 1
    if not convs:
        raise DataError(f"{path}: no conversations in file" + (f" ({skipped} bad lines skipped)" if skipped else ""))
    return convs, skipped


def load_parquet_messages(path: str | Path, skip_bad: bool = False) -> tuple[list[Conversation], int]:
    """Conversations from a parquet file with a ``messages`` column (SmolTalk's format)."""
    import pyarrow.parquet as pq

    path = Path(path)
    try:
        table = pq.read_table(path, columns=["messages"])
    except Exception as e:  # pyarrow raises many types for a bad file; the user needs one line
        raise DataError(f"{path}: cannot read a 'messages' column from parquet ({e})") from None
    convs, skipped = [], 0
    for n, messages in enumerate(table.column("messages").to_pylist()):
        try:
            convs.append(_check_messages(messages, f"{path}: row {n}"))
        except DataError:
            if not skip_bad:
                raise
            skipped += 1
    return convs, skipped


def load_user_data(paths: Sequence[str | Path], skip_bad: bool = False) -> tuple[list[Conversation], int]:
    """Conversations from .jsonl / .parquet files or folders of them."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.suffix in (".jsonl", ".parquet"))
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"{p}: no such file or folder")
    if not files:
        raise DataError(f"no .jsonl or .parquet files in {', '.join(map(str, paths))}")
    convs, skipped = [], 0
    for f in files:
        if f.suffix not in (".jsonl", ".parquet"):
            raise DataError(f"{f}: unsupported file type (expected .jsonl or .parquet)")
        c, s = (load_jsonl if f.suffix == ".jsonl" else load_parquet_messages)(f, skip_bad)
        convs += c
        skipped += s
    return convs, skipped


def download_smoltalk(dest: str | Path | None = None, n_files: int = 1, total: int = SMOLTALK_FILES) -> list[Path]:
    """Fetch the first n SmolTalk train shards (parquet, column ``messages``) with pretrain's downloader.

    The URL template comes from $SCRATCHCHAT_SMOLTALK_URL when set (mirrors, tests)."""
    from common.paths import data_dir
    from pretrain.download import download

    template = os.environ.get(SMOLTALK_URL_ENV, SMOLTALK_URL)
    urls = [template.format(i=i, n=total) for i in range(min(n_files, total))]
    return download(urls, dest or data_dir("smoltalk"))


# --- the default mix -------------------------------------------------------------------------------

# conversations per source in the default mix: small enough for a CPU SFT run in minutes
# (chitchat and wiki answers are long: fewer of them leave more of a short CPU run to the skills).
DEFAULT_MIX = {
    "chatterbot": 1500,
    "chitchat": 800,
    "identity": 0,  # identity: all phrasings, repeated (below)
    "arithmetic": 4000,
    "letters": 2000,
    "reverse": 1500,
    "word_problem": 2500,
    "largest_mc": 1500,
    "capital": 600,
    "capital_mc": 1500,
    "country_fact": 400,
    "wiki": 800,
}
IDENTITY_REPEATS = 8
TOOL_SHARE = 0.75  # items a calculator can answer are taught with the call this often, else answered directly


def default_mix(seed: int = 0, scale: float = 1.0) -> tuple[list[Conversation], dict[str, int]]:
    """The embedded SFT mix (shuffled) and how many conversations each source gave."""
    rng = random.Random(seed)
    parts: dict[str, list[Conversation]] = {}
    for name, n in DEFAULT_MIX.items():
        n = max(1, int(n * scale))
        if name in ("chatterbot", "chitchat"):
            pool = (chatterbot_conversations if name == "chatterbot" else chitchat_conversations)()
            parts[name] = rng.sample(pool, min(n, len(pool)))
        elif name == "identity":
            parts[name] = tasks.identity_conversations() * IDENTITY_REPEATS
        else:
            parts[name] = [it.messages(tool=rng.random() < TOOL_SHARE) for it in tasks.generate(name, "train", n, seed)]
    convs = [c for p in parts.values() for c in p]
    rng.shuffle(convs)
    return convs, {k: len(v) for k, v in parts.items()}


# --- fitting to the context and packing -------------------------------------------------------------


@dataclass
class FitStats:
    """What fitting did to the data: reported at the start of training."""

    conversations: int = 0
    split: int = 0  # conversations cut into several pieces between exchanges
    dropped_exchanges: int = 0  # single user+assistant exchanges longer than the context on their own
    dropped: int = 0  # conversations with nothing left
    invalid: Counter = field(default_factory=Counter)


def _fits(tok, messages: Conversation, max_len: int) -> bool:
    try:
        render_conversation(tok, messages, max_len)
        return True
    except ConversationTooLong:
        return False


Example = tuple[list[int], list[int]]  # (ids, mask) of one rendered conversation


def fit_conversation(tok, messages: Conversation, max_len: int, stats: FitStats | None = None) -> list[Example]:
    """Render a conversation as one or more pieces of at most max_len tokens.

    A piece is the system message (if any) plus consecutive whole user+assistant exchanges; an
    exchange that does not fit even alone is dropped. Nothing learned is ever cut mid-way.
    """
    stats = stats or FitStats()
    stats.conversations += 1
    try:
        return [render_conversation(tok, messages, max_len)]
    except ConversationTooLong:
        pass
    system = [messages[0]] if messages[0]["role"] == "system" else []
    turns = messages[len(system) :]
    exchanges = [turns[i : i + 2] for i in range(0, len(turns) - 1, 2)]
    pieces, current = [], []
    for ex in exchanges:
        if _fits(tok, system + current + ex, max_len):
            current += ex
            continue
        if current:
            pieces.append(render_conversation(tok, system + current))
        current = list(ex) if _fits(tok, system + ex, max_len) else []
        stats.dropped_exchanges += not current
    if current:
        pieces.append(render_conversation(tok, system + current))
    if pieces:
        stats.split += len(pieces) > 1
    else:
        stats.dropped += 1
    return pieces


def render_all(tok, conversations: Iterable[Conversation], max_len: int) -> tuple[list[Example], FitStats]:
    """Fit every conversation to max_len tokens; invalid ones are counted by reason, not fatal."""
    stats, out = FitStats(), []
    for conv in conversations:
        try:
            out += fit_conversation(tok, conv, max_len, stats)
        except ChatFormatError as e:
            stats.invalid[str(e).split(":")[0]] += 1
    return out, stats


class SFTLoader:
    """Packs rendered conversations into [batch_size, seq_len] (inputs, targets, loss_mask) batches.

    Each epoch shuffles the conversations (seeded) and fills rows of seq_len + 1 tokens in order,
    starting a new row when the next conversation does not fit; the tail of a row is padding
    (bos tokens, mask 0). Conversations start with <|bos|>, so a packed row looks like pretraining
    documents. Rows are dealt round-robin to the ranks of ``dist`` (a common.dist.Dist; default: one CPU process),
    on its device. ``state_dict`` records (epoch, row) so a resumed run continues on the same data.
    """

    def __init__(self, examples: list[Example], batch_size: int, seq_len: int, pad_id: int, seed=0, dist=None):
        if not examples:
            raise DataError("no training examples left after fitting conversations to the context")
        if any(len(ids) > seq_len + 1 for ids, _ in examples):
            raise ValueError("an example is longer than seq_len + 1; fit conversations first")
        self.examples, self.batch_size, self.seq_len, self.pad_id = examples, batch_size, seq_len, pad_id
        dist = dist or Dist()
        self.seed, self.rank, self.world_size, self.device = seed, dist.rank, dist.world_size, dist.device
        self.epoch, self.row = 0, 0  # position: the next global row to read in this epoch
        self._rows: list[Example] | None = None

    def _pack(self, epoch: int) -> list[Example]:
        order = list(range(len(self.examples)))
        random.Random(f"{self.seed}:{epoch}").shuffle(order)
        rows, ids, mask = [], [], []
        for i in order:
            e_ids, e_mask = self.examples[i]
            if len(ids) + len(e_ids) > self.seq_len + 1:
                rows.append((ids, mask))
                ids, mask = [], []
            ids, mask = ids + e_ids, mask + e_mask
        rows.append((ids, mask))
        width = self.seq_len + 1
        return [(r + [self.pad_id] * (width - len(r)), m + [0] * (width - len(m))) for r, m in rows]

    def rows_per_epoch(self) -> int:
        return len(self._pack(self.epoch)) if self._rows is None else len(self._rows)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch = []
        while len(batch) < self.batch_size:
            if self._rows is None:
                self._rows = self._pack(self.epoch)
            if self.row >= len(self._rows):
                self.epoch, self.row, self._rows = self.epoch + 1, 0, None
                continue
            if self.row % self.world_size == self.rank:
                batch.append(self._rows[self.row])
            self.row += 1
        return self._tensors(batch)

    def _tensors(self, rows: list[Example]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        t = torch.tensor([ids for ids, _ in rows], dtype=torch.long, device=self.device)
        m = torch.tensor([mask for _, mask in rows], dtype=torch.bool, device=self.device)
        return t[:, :-1], t[:, 1:], m[:, 1:]

    def iter_val(self, max_tokens: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """A fixed pass over the first rows (enough for max_tokens; 0: all), this rank's share of them, as
        (inputs, targets) with unlearned targets set to -1: the pretraining loop's validation then measures the
        assistant tokens only."""
        rows = self._pack(0)
        if max_tokens > 0:
            rows = rows[: -(-max_tokens // self.seq_len)]
        rows = rows[self.rank :: self.world_size]
        for b in range(0, len(rows), self.batch_size):
            x, y, m = self._tensors(rows[b : b + self.batch_size])
            yield x, y.masked_fill(~m, -1)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "row": self.row, "seed": self.seed}

    def load_state_dict(self, d: dict) -> None:
        self.epoch, self.row, self.seed, self._rows = int(d["epoch"]), int(d["row"]), int(d["seed"]), None
