"""The byte-level BPE tokenizer: encode, decode, special tokens, and its one-file JSON format.

A token id is also its rank: the bytes of token i were merged before those of token i + 1. Encoding
splits text with a regex pattern into chunks, then merges each chunk's bytes pair by pair, always the
adjacent pair whose joined bytes have the lowest rank (tiktoken's rule, so ids equal tiktoken's for
the same vocabulary). Chunks repeat a lot in real text, so their ids are cached.

File format (version 1), one JSON object:
  {"version": 1, "pattern": <split regex>, "byte_order": [256 ints, the byte of ids 0..255],
   "merges": [[left_id, right_id], ...]  (merge i creates id 256 + i, bytes = left + right),
   "special_tokens": {name: id}, "hash": <sha256 hex of the canonical JSON of the other fields>}
"""

from __future__ import annotations

import base64
import codecs
import gzip
import hashlib
import heapq
import json
import multiprocessing
import multiprocessing.util
import numbers
import os
import sys
import weakref
from array import array
from collections.abc import Collection, Iterable
from concurrent.futures import ProcessPoolExecutor
from itertools import chain, repeat
from pathlib import Path
from typing import Literal

import regex

from common.files import write_text_atomic
from tokenizer.files import batch_by_chars

# Published split patterns (tiktoken's, so vocabularies loaded from OpenAI files encode identically).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
CL100K_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""  # noqa: E501 - verbatim, as published
GPT4_PATTERN = CL100K_PATTERN
O200K_PATTERN = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)

CHAT_SPECIAL_TOKENS = [
    "<|bos|>",
    "<|system_start|>",
    "<|system_end|>",
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|tool_start|>",
    "<|tool_end|>",
    "<|output_start|>",
    "<|output_end|>",
]

FORMAT_VERSION = 1
# Cached chunks and their ids, counted in characters + 8 bytes per id (~64 MB of Python objects at most): the bound
# holds whatever the text, e.g. a server tokenizing unique 100k-character words. Text has a long tail, so the
# cache is cleared and refilled when full.
CACHE_BYTES = 1 << 24
_BYTES = [bytes([b]) for b in range(256)]
_NO_RANK = 1 << 62  # "this pair is not a token": larger than any rank
_LONG_PIECE = 256  # above this many bytes, merge with a heap: the simple scan is quadratic
_BATCH_CHARS = 1 << 20  # characters per encode_batch task: large enough that IPC is a small cost

AllowedSpecial = Literal["all"] | Collection[str]


def _sanitize(text: str) -> str:
    """Lone surrogates can't be UTF-8 encoded: replace them with U+FFFD (and join valid pairs), as tiktoken does."""
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _merge_simple(ranks: dict[bytes, int], piece: bytes, max_rank: int | None) -> list[bytes]:
    """Merge the lowest-ranked adjacent pair until none is left (or all are >= max_rank)."""
    parts = list(map(_BYTES.__getitem__, piece))
    # pair_ranks[i] is the rank of parts[i] + parts[i + 1]; only the merged pair's neighbours change,
    # and min()/index() scan the list in C.
    pair_ranks = list(map(ranks.get, map(bytes.__add__, parts, parts[1:]), repeat(_NO_RANK)))
    limit = _NO_RANK if max_rank is None else max_rank
    while pair_ranks:
        best = min(pair_ranks)
        if best >= limit:
            break
        i = pair_ranks.index(best)  # leftmost on ties, like tiktoken
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
        del pair_ranks[i]
        if i > 0:
            pair_ranks[i - 1] = ranks.get(parts[i - 1] + parts[i], _NO_RANK)
        if i < len(pair_ranks):
            pair_ranks[i] = ranks.get(parts[i] + parts[i + 1], _NO_RANK)
    return parts


def _merge_heap(ranks: dict[bytes, int], piece: bytes) -> list[bytes]:
    """Same result as _merge_simple in O(n log n): parts form a linked list keyed by start offset."""
    n = len(piece)
    nxt = list(range(1, n + 1))  # nxt[s]: start of the part after the one starting at s (n = end)
    prv = list(range(-1, n - 1))
    heap = []
    for i in range(n - 1):
        r = ranks.get(piece[i : i + 2])
        if r is not None:
            heap.append((r, i))
    heapq.heapify(heap)
    alive = [True] * n
    while heap:
        r, s = heapq.heappop(heap)
        if not alive[s] or nxt[s] >= n:
            continue
        m = nxt[s]
        end = nxt[m]
        # Stale entry: the part at s or its neighbour has grown since the push (joined bytes differ).
        if ranks.get(piece[s:end]) != r:
            continue
        alive[m] = False
        nxt[s] = end
        if end < n:
            prv[end] = s
        for left in (prv[s], s):
            if left >= 0 and nxt[left] < n:
                r2 = ranks.get(piece[left : nxt[nxt[left]]])
                if r2 is not None:
                    heapq.heappush(heap, (r2, left))
    parts = []
    s = 0
    while s < n:
        parts.append(piece[s : nxt[s]])
        s = nxt[s]
    return parts


class _ChunkCache(dict):
    """chunk -> token ids; a missing chunk is BPE-encoded on lookup, so the hot loop is pure C."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        super().__init__()
        self.tokenizer, self.size = tokenizer, 0

    def __missing__(self, chunk: str) -> tuple[int, ...]:
        ids = self.tokenizer._encode_piece(chunk.encode("utf-8"))
        cost = len(chunk) + 8 * len(ids)
        if self.size + cost > CACHE_BYTES:
            self.clear()
            self.size = 0
        self[chunk] = ids
        self.size += cost
        return ids


class StreamDecoder:
    """Turns ids into text one at a time, holding back bytes until they form complete UTF-8 characters.

    The concatenation of every step() plus flush() equals Tokenizer.decode of the same ids.
    """

    def __init__(self, table: dict[int, bytes]) -> None:
        self._table = table
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")

    def step(self, token_id: int) -> str:
        try:
            data = self._table[int(token_id)]  # int(): also takes numpy / torch scalars
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"unknown token id {token_id!r}") from None
        return self._utf8.decode(data)

    def flush(self) -> str:
        """Whatever is held back, with an incomplete trailing character as U+FFFD."""
        return self._utf8.decode(b"", final=True)


_worker_tok: Tokenizer | None = None


def _init_worker(tok: weakref.ref | str) -> None:
    global _worker_tok
    _worker_tok = tok() if isinstance(tok, weakref.ref) else Tokenizer.from_json(tok)


def _encode_many(texts: list[str], allowed_special: AllowedSpecial) -> tuple[array, list[int]]:
    # One flat array back per batch: pickling an array is a memcpy, a list of lists is not.
    assert _worker_tok is not None
    encoded = [_worker_tok.encode(t, allowed_special) for t in texts]
    return array("q", chain.from_iterable(encoded)), [len(e) for e in encoded]


class Tokenizer:
    """Byte-level BPE. Build with train(), load(), from_json(), from_tiktoken() or from_gpt2()."""

    def __init__(
        self,
        tokens: list[bytes],
        pattern: str,
        special_tokens: dict[str, int],
        merges: list[tuple[int, int]] | None = None,
    ) -> None:
        """`tokens[i]` is the bytes of ordinary token i (its rank); ids 0..255 must be the single bytes."""
        self.pattern = pattern
        self._tokens = tokens
        self._ranks = {t: i for i, t in enumerate(tokens)}
        if len(self._ranks) != len(tokens):
            raise ValueError("token byte strings must be unique")
        if len(tokens) < 256 or any(len(t) != 1 for t in tokens[:256]):
            raise ValueError("ids 0..255 must be the 256 single bytes")
        for name, i in special_tokens.items():
            if i < len(tokens):
                raise ValueError(f"special token {name!r} id {i} collides with an ordinary token")
        self.special_tokens = dict(special_tokens)
        self._merges = merges
        self._regex = regex.compile(pattern)
        self._table = {i: t for i, t in enumerate(tokens)}  # what decode() emits for each id
        # Several names may share an id (o200k_harmony: <|endofprompt|> and <|reserved_200018|>); each
        # encodes to it, and decode() spells it with the alphabetically first. tiktoken picks by its hash
        # map's order, which gives that name for o200k_harmony; ours can't depend on the dict's order,
        # which the file hash ignores.
        for name in sorted(special_tokens, reverse=True):
            self._table[special_tokens[name]] = name.encode("utf-8")
        self._cache = _ChunkCache(self)
        self._hash: str | None = None
        self._workers: tuple[tuple[int, int], ProcessPoolExecutor, multiprocessing.util.Finalize] | None = None

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int,
        pattern: str = GPT4_PATTERN,
        special_tokens: list[str] = CHAT_SPECIAL_TOKENS,
        *,
        progress: bool = False,
        workers: int | None = None,
    ) -> Tokenizer:
        """Learn vocab_size - 256 - len(special_tokens) merges from `texts`.

        Stops early (smaller vocab_size) if the texts run out of pairs. `workers` processes (None: all
        cores) split and count the text.
        """
        from tokenizer.train import count_chunks, learn_merges

        n_merges = vocab_size - 256 - len(special_tokens)
        if n_merges < 0:
            raise ValueError(
                f"vocab_size {vocab_size} is too small: it must be at least {256 + len(special_tokens)}"
                f" (256 bytes + {len(special_tokens)} special tokens)"
            )
        if len(set(special_tokens)) != len(special_tokens):
            raise ValueError("special tokens must be distinct")
        try:
            regex.compile(pattern)
        except regex.error as e:
            raise ValueError(f"invalid split pattern: {e}") from None
        if progress:
            from tqdm import tqdm

            texts = tqdm(texts, desc="reading", unit=" docs", delay=1.0)  # silent on small or failing inputs
        counts = count_chunks(texts, pattern, workers)
        if not counts:
            raise ValueError("no text to train on: the input is empty")
        tokens, merges = learn_merges(counts, n_merges, progress=progress)
        specials = {name: len(tokens) + i for i, name in enumerate(special_tokens)}
        return cls(tokens, pattern, specials, merges)

    @classmethod
    def from_tiktoken(cls, path: str | Path, pattern: str, special_tokens: dict[str, int]) -> Tokenizer:
        """Load a tiktoken rank file (`base64(token) rank` per line, optionally gzipped)."""
        path = Path(path)
        try:
            raw = path.read_bytes()
            if path.suffix == ".gz":
                raw = gzip.decompress(raw)
            ranks = {}
            for line in raw.splitlines():
                if line:
                    token, rank = line.split()
                    ranks[base64.b64decode(token)] = int(rank)
        except (OSError, ValueError, EOFError) as e:
            raise ValueError(f"cannot read tiktoken file {path}: {e}") from None
        tokens = sorted(ranks, key=ranks.__getitem__)
        if [ranks[t] for t in tokens] != list(range(len(tokens))):
            raise ValueError(f"{path}: ranks must be 0..{len(tokens) - 1} without gaps")
        return cls(tokens, pattern, special_tokens)

    @classmethod
    def from_gpt2(cls, encoder_json: str | Path, vocab_bpe: str | Path) -> Tokenizer:
        """Load GPT-2's original files; ids equal tiktoken's "gpt2" encoding."""
        try:
            encoder = json.loads(Path(encoder_json).read_text(encoding="utf-8"))
            lines = Path(vocab_bpe).read_text(encoding="utf-8").splitlines()
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read GPT-2 files: {e}") from None
        # GPT-2 stores bytes as printable unicode characters: printable bytes map to themselves,
        # the rest to chr(256 + k) in byte order. Ids 0..255 follow the order of that table.
        printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
        order = printable + [b for b in range(256) if b not in printable]
        decode_char = {chr(b if b in printable else 256 + order.index(b) - len(printable)): b for b in order}
        tokens = [bytes([b]) for b in order]
        for line in lines[1:]:  # the first line is a version comment
            if line:
                left, right = line.split()
                tokens.append(bytes(decode_char[c] for c in left + right))
        special = {k: v for k, v in encoder.items() if k.startswith("<|") and k.endswith("|>")}
        for text, i in encoder.items():
            if text not in special and (i >= len(tokens) or tokens[i] != bytes(decode_char[c] for c in text)):
                raise ValueError("encoder.json and vocab.bpe disagree")
        return cls(tokens, GPT2_PATTERN, special)

    # ---- properties ---------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return max(len(self._tokens) - 1, *self.special_tokens.values()) + 1

    @property
    def bos_id(self) -> int:
        """Id of "<|bos|>" (or GPT's "<|endoftext|>", which plays the same document-boundary role)."""
        for name in ("<|bos|>", "<|endoftext|>"):
            if name in self.special_tokens:
                return self.special_tokens[name]
        raise ValueError("this tokenizer has no <|bos|> token")

    def token_bytes(self, token_id: int) -> bytes:
        """Raw bytes of a token; b"" for special tokens (they stand for no text in bits-per-byte)."""
        if 0 <= token_id < len(self._tokens):
            return self._tokens[token_id]
        if token_id in self._table:
            return b""
        raise ValueError(f"unknown token id {token_id!r}")

    # ---- encode / decode ----------------------------------------------------------------------

    def _encode_piece(self, piece: bytes) -> tuple[int, ...]:
        rank = self._ranks.get(piece)
        if rank is not None:
            return (rank,)
        if len(piece) > _LONG_PIECE:
            parts = _merge_heap(self._ranks, piece)
        else:
            parts = _merge_simple(self._ranks, piece, None)
        return tuple(map(self._ranks.__getitem__, parts))

    def encode_ordinary(self, text: str) -> list[int]:
        """Encode with every special token's spelling treated as plain text."""
        try:
            return list(chain.from_iterable(map(self._cache.__getitem__, self._regex.findall(text))))
        except UnicodeEncodeError:  # lone surrogates, found when a new chunk is encoded: rare, so handled last
            return self.encode_ordinary(_sanitize(text))

    def encode(self, text: str, allowed_special: AllowedSpecial = frozenset()) -> list[int]:
        """Text to ids. Special-token spellings are plain text unless named in `allowed_special`
        (or it is "all"): text from users must not be able to forge chat structure."""
        if allowed_special == "all":
            allowed = list(self.special_tokens)
        else:
            if isinstance(allowed_special, str):
                raise ValueError('allowed_special must be "all" or a collection of special token names')
            allowed = list(allowed_special)
            unknown = [s for s in allowed if s not in self.special_tokens]
            if unknown:
                raise ValueError(f"not special tokens of this tokenizer: {unknown}")
        if not allowed:
            return self.encode_ordinary(text)
        # Longest first, so a token that is a prefix of another can't steal its match.
        splitter = "(" + "|".join(map(regex.escape, sorted(allowed, key=len, reverse=True))) + ")"
        ids: list[int] = []
        for i, part in enumerate(regex.split(splitter, text)):
            if i % 2:
                ids.append(self.special_tokens[part])
            elif part:
                ids.extend(self.encode_ordinary(part))
        return ids

    def encode_batch(
        self, texts: Iterable[str], workers: int | None = None, allowed_special: AllowedSpecial = frozenset()
    ) -> list[list[int]]:
        """encode() of each text, spread over `workers` processes (None: all cores)."""
        texts = list(texts)
        workers = workers or os.cpu_count() or 1
        total = sum(map(len, texts))
        # Starting processes costs more than it saves on little text; daemonic processes can't have children.
        if workers <= 1 or total < _BATCH_CHARS or multiprocessing.current_process().daemon:
            return [self.encode(t, allowed_special) for t in texts]
        self.encode("", allowed_special)  # a bad allowed_special fails here, not in every worker
        # Several batches per worker so a slow batch doesn't leave the other cores idle at the end.
        batch_chars = max(_BATCH_CHARS // 8, min(_BATCH_CHARS, total // (4 * workers) + 1))
        batches = list(batch_by_chars(texts, batch_chars))
        out: list[list[int]] = []
        try:
            for flat, lengths in self._pool(workers).map(_encode_many, batches, [allowed_special] * len(batches)):
                ids = flat.tolist()
                start = 0
                for n in lengths:
                    out.append(ids[start : start + n])
                    start += n
        except BaseException:  # a killed worker or an interrupt: don't leave a broken pool behind
            self._close_pool()
            raise
        return out

    def _pool(self, workers: int) -> ProcessPoolExecutor:
        """Worker processes kept across encode_batch calls, so their chunk caches stay warm."""
        key = (os.getpid(), workers)  # a forked copy of this tokenizer must not use its parent's pool
        if self._workers is None or self._workers[0] != key:
            self._close_pool()
            # fork shares the tokenizer with the workers for free (a weak reference, so the pool doesn't
            # keep this tokenizer alive); elsewhere each worker rebuilds it from JSON.
            fork = sys.platform == "linux"
            context = multiprocessing.get_context("fork" if fork else "spawn")
            pool = ProcessPoolExecutor(workers, context, _init_worker, (weakref.ref(self) if fork else self.to_json(),))
            # Stop the workers when this tokenizer is collected, and at exit before multiprocessing closes
            # its queues (priority 10) and joins its children: otherwise a multiprocessing.Process that
            # used encode_batch would wait forever for these idle workers.
            stop = multiprocessing.util.Finalize(
                self, pool.shutdown, kwargs={"wait": True, "cancel_futures": True}, exitpriority=100
            )
            self._workers = (key, pool, stop)
        return self._workers[1]

    def _close_pool(self) -> None:
        if self._workers is not None and self._workers[0][0] == os.getpid():
            self._workers[2]()  # runs shutdown once and forgets the finalizer
        self._workers = None

    def decode(self, ids: Iterable[int]) -> str:
        """Ids to text; bytes that aren't valid UTF-8 become U+FFFD (like bytes.decode(errors="replace"))."""
        try:
            data = b"".join(map(self._table.__getitem__, ids))
        except KeyError as e:
            if not isinstance(e.args[0], numbers.Integral):  # torch scalars don't hash like ints
                raise ValueError(f"token ids must be ints, got {type(e.args[0]).__name__} (use .tolist())") from None
            raise ValueError(f"unknown token id {e.args[0]!r}") from None
        return data.decode("utf-8", errors="replace")

    def decoder(self) -> StreamDecoder:
        """A fresh incremental decoder for streaming output."""
        return StreamDecoder(self._table)

    # ---- serialization ------------------------------------------------------------------------

    @property
    def merges(self) -> list[tuple[int, int]]:
        """Merge i (creating id 256 + i) as a (left id, right id) pair; recovered from ranks if needed."""
        if self._merges is None:
            merges = []
            for rank in range(256, len(self._tokens)):
                # Replaying BPE with only lower ranks stops one step short of this token: its two halves.
                parts = _merge_simple(self._ranks, self._tokens[rank], max_rank=rank)
                if len(parts) != 2:
                    raise ValueError(f"token {rank} is not the merge of two earlier tokens")
                merges.append((self._ranks[parts[0]], self._ranks[parts[1]]))
            self._merges = merges
        return self._merges

    def _content(self) -> dict:
        return {
            "version": FORMAT_VERSION,
            "pattern": self.pattern,
            "byte_order": [t[0] for t in self._tokens[:256]],
            "merges": [list(m) for m in self.merges],
            "special_tokens": self.special_tokens,
        }

    @staticmethod
    def _digest(content: dict) -> str:
        canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    @property
    def hash(self) -> str:
        """sha256 hex of the saved content: equal hashes mean identical tokenizers."""
        if self._hash is None:
            self._hash = self._digest(self._content())
        return self._hash

    def to_json(self) -> str:
        return json.dumps({**self._content(), "hash": self.hash}, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> Tokenizer:
        """Parse to_json() output; ValueError if it is corrupt, of another version, or fails its hash."""
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"tokenizer file is not valid JSON ({e})") from None
        if not isinstance(doc, dict):
            raise ValueError("tokenizer file is not a JSON object")
        if doc.get("version") != FORMAT_VERSION:
            raise ValueError(f"unsupported tokenizer format version {doc.get('version')!r} (expected {FORMAT_VERSION})")
        content = {k: doc.get(k) for k in ("version", "pattern", "byte_order", "merges", "special_tokens")}
        if doc.get("hash") != cls._digest(content):
            raise ValueError("tokenizer file is corrupt: its content does not match its hash")
        try:
            tokens = [bytes([b]) for b in content["byte_order"]]
            for left, right in content["merges"]:
                if not (0 <= left < len(tokens) and 0 <= right < len(tokens)):
                    raise ValueError("merge refers to a later token")
                tokens.append(tokens[left] + tokens[right])
            merges = [(left, right) for left, right in content["merges"]]
            tok = cls(tokens, content["pattern"], dict(content["special_tokens"]), merges)
        except (TypeError, ValueError, regex.error) as e:
            raise ValueError(f"tokenizer file is malformed: {e}") from None
        tok._hash = doc["hash"]
        return tok

    def save(self, path: str | Path) -> None:
        """Write atomically (temp file + rename), so a crash never leaves half a tokenizer."""
        write_text_atomic(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ValueError(f"tokenizer file not found: {path}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read tokenizer file {path}: {e}") from None
        try:
            return cls.from_json(text)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        except RecursionError:  # json's decoder recurses once per level of nesting
            raise ValueError(f"{path}: tokenizer file is not valid JSON (nested too deeply)") from None

    def __getstate__(self) -> dict:
        # Pickle the content only: caches and worker processes don't travel.
        return {"json": self.to_json()}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(Tokenizer.from_json(state["json"]).__dict__)
        self._cache.tokenizer = self

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, special_tokens={len(self.special_tokens)})"
