"""Token shards on disk and the loader that streams training batches from them.

A shard is a flat array of token ids behind a 32-byte header:

    magic b"SCTOKENS" | version u32 | itemsize u32 (2 = uint16, 4 = uint32) | count u64 | 8 bytes reserved

`read_shard` memory-maps the ids, so a corpus far bigger than RAM costs nothing to open. `TokenLoader` reads
a split's shards (`train_00000.bin`, ...) as one stream of (x, y) batches and resumes exactly from a checkpoint.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from common.files import atomic_path

MAGIC = b"SCTOKENS"
VERSION = 1
HEADER = struct.Struct("<8sIIQ8x")  # little-endian on every platform, 32 bytes
DTYPES = {2: np.dtype("<u2"), 4: np.dtype("<u4")}
MANIFEST = "manifest.json"


class ShardError(ValueError):
    """A shard or token directory that cannot be used: missing, corrupt, truncated or mismatched."""


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab <= 65536), else uint32: half the disk and I/O for small vocabs."""
    return DTYPES[2] if vocab_size <= 2**16 else DTYPES[4]


def write_shard(path: str | Path, tokens: np.ndarray, vocab_size: int | None = None) -> Path:
    """Write `tokens` (1-D ints) as a shard, atomically. The dtype follows `vocab_size` when given (so every
    shard of a corpus agrees), else the largest id."""
    path = Path(path)
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ShardError(f"tokens must be 1-D, got shape {tokens.shape}")
    if tokens.size and not np.issubdtype(tokens.dtype, np.integer):
        raise ShardError(f"tokens must be integers, got {tokens.dtype}")
    lo, hi = (int(tokens.min()), int(tokens.max())) if tokens.size else (0, 0)
    dtype = dtype_for_vocab(vocab_size if vocab_size is not None else hi + 1)
    if lo < 0 or hi > np.iinfo(dtype).max or (vocab_size is not None and hi >= vocab_size):
        raise ShardError(f"token ids must lie in [0, {vocab_size or np.iinfo(dtype).max + 1}), got [{lo}, {hi}]")
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(HEADER.pack(MAGIC, VERSION, dtype.itemsize, tokens.size))
        f.write(tokens.astype(dtype, copy=False).tobytes())
    return path


def read_header(path: str | Path) -> tuple[np.dtype, int]:
    """Validate a shard's header against its size; return (dtype, token count)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(HEADER.size)
    except OSError as e:
        raise ShardError(f"cannot read shard {path}: {e.strerror or e}") from None
    if len(raw) < HEADER.size:
        raise ShardError(f"{path} is not a token shard (only {size} bytes, header needs {HEADER.size})")
    magic, version, itemsize, count = HEADER.unpack(raw)
    if magic != MAGIC:
        raise ShardError(f"{path} is not a token shard (bad magic {magic!r})")
    if version != VERSION:
        raise ShardError(f"{path} has shard format version {version}, this code reads version {VERSION}")
    if itemsize not in DTYPES:
        raise ShardError(f"{path} has unknown dtype code {itemsize}")
    expected = HEADER.size + count * itemsize
    if size != expected:
        what = "truncated" if size < expected else "has trailing bytes"
        raise ShardError(f"{path} is {what}: {size} bytes, header promises {expected}; re-run tokenize")
    return DTYPES[itemsize], count


def read_shard(path: str | Path) -> np.ndarray:
    """Memory-map a shard's token ids (read-only); raises ShardError for a bad or truncated file."""
    dtype, count = read_header(path)
    if count == 0:  # np.memmap refuses empty maps
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER.size, shape=(count,))


def load_manifest(token_dir: str | Path) -> dict:
    """The token directory's manifest.json (tokenizer_hash, vocab_size, counts, bytes per split)."""
    path = Path(token_dir) / MANIFEST
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ShardError(f"no {MANIFEST} in {token_dir}; run python -m pretrain.data tokenize first") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ShardError(f"cannot read {path}: {e}") from None


class TokenLoader:
    """Streams (x, y) int64 batches of shape [batch_size, seq_len] from one split's shards.

    The split's shards form one stream, cut into windows of seq_len + 1 tokens starting every seq_len tokens
    (y is x shifted by one, so neighbouring windows share one token). An epoch takes the windows in an order
    shuffled by (seed, epoch), so a batch's rows come from all over the corpus: rows from one contiguous span
    are mostly one document, and such gradients swing from step to step. Each step takes the next
    world_size * batch_size windows of the order and rank r keeps the r-th batch_size of them, so ranks never
    share a window and each window comes once per epoch; the few left at the end of an order, too few for a
    step, are skipped that epoch (different ones each time). The position (epoch, windows used) is global,
    identical on every rank, so any rank's `state_dict()` resumes all of them.
    """

    def __init__(
        self,
        token_dir: str | Path,
        split: str,
        batch_size: int,
        seq_len: int,
        rank: int = 0,
        world_size: int = 1,
        device: str | torch.device = "cpu",
        seed: int = 0,
    ) -> None:
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size} and {seq_len}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must lie in [0, world_size={world_size}), got {rank}")
        paths = sorted(Path(token_dir).glob(f"{split}_*.bin"))  # zero-padded names: the stream's order
        if not paths:
            raise ShardError(f"no {split}_*.bin shards in {token_dir}; run python -m pretrain.data tokenize first")
        self.shards = [read_shard(p) for p in paths]
        self.starts = np.cumsum([0] + [len(s) for s in self.shards])  # stream offset of each shard's first token
        self.total = int(self.starts[-1])
        self.split, self.batch_size, self.seq_len, self.seed = split, batch_size, seq_len, seed
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        self.pin = self.device.type == "cuda"
        self.windows = (self.total - 1) // seq_len  # train windows: seq_len + 1 tokens at every multiple of seq_len
        if self.windows < world_size * batch_size:
            raise ShardError(
                f"{split} split has {self.total} tokens, fewer than one step needs "
                f"({world_size} x {batch_size} x {seq_len} + 1); use a smaller batch or more data"
            )
        self.epoch, self.used = 0, 0  # completed passes; windows of this epoch's order already taken
        self._order: tuple[int, int, np.ndarray] | None = None  # (seed, epoch, order), cached

    def __iter__(self) -> TokenLoader:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        self._wrap_if_short()  # a state loaded with a bigger batch or world size may not fit
        first = self.used + self.rank * self.batch_size
        batch = self._rows(self._epoch_order()[first : first + self.batch_size])
        self.used += self.world_size * self.batch_size
        self._wrap_if_short()  # eagerly, so `epoch` counts a finished pass and state_dict() names a real position
        return batch

    def _wrap_if_short(self) -> None:
        if self.used + self.world_size * self.batch_size > self.windows:
            self.epoch, self.used = self.epoch + 1, 0

    def _epoch_order(self) -> np.ndarray:
        """This epoch's permutation of the window indices, the same on every rank (seeded by seed and epoch)."""
        if self._order is None or self._order[:2] != (self.seed, self.epoch):
            # int32 halves the memory of a big corpus's order; shuffle() permutes the same way for any dtype.
            order = np.arange(self.windows, dtype=np.int32 if self.windows < 2**31 else np.int64)
            np.random.default_rng([self.seed, self.epoch]).shuffle(order)
            self._order = (self.seed, self.epoch, order)
        return self._order[2]

    def _rows(self, windows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        T = self.seq_len
        buf = self._to_device(np.stack([self._tokens(int(w) * T, T + 1) for w in windows]))
        return buf[:, :-1].contiguous(), buf[:, 1:].contiguous()  # the loss views targets flat

    def _to_device(self, tokens: np.ndarray) -> torch.Tensor:
        buf = torch.from_numpy(tokens)
        if self.pin:  # page-locked memory lets the host->GPU copy overlap with compute
            buf = buf.pin_memory()
        return buf.to(self.device, non_blocking=self.pin)

    def iter_val(self, max_tokens: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One deterministic pass over the stream's first windows, independent of the train position: enough for
        max_tokens targets (0: every window). The windows are the same whatever the batch size and number of
        ranks, so validation figures compare across run shapes. Each batch is one rank's contiguous span; the
        last ones are padded with ignored rows (target -1), so every rank yields as many batches, all of one shape
        (DDP ranks all-reduce after the loop, and a compiled model sees no new shape)."""
        B, T = self.batch_size, self.seq_len
        n = self.windows if max_tokens <= 0 else min(self.windows, -(-max_tokens // T))
        for first in range(0, n, self.world_size * B):
            lo = min(n, first + self.rank * B)
            count = min(B, n - lo)
            x, y = np.zeros((B, T), dtype=np.int64), np.full((B, T), -1, dtype=np.int64)
            if count:
                tokens = self._tokens(lo * T, count * T + 1)
                x[:count], y[:count] = tokens[:-1].reshape(count, T), tokens[1:].reshape(count, T)
            yield self._to_device(x), self._to_device(y)

    def _tokens(self, start: int, count: int) -> np.ndarray:
        """`count` stream tokens from `start`, stitched across shard boundaries, as int64."""
        k = int(np.searchsorted(self.starts, start, side="right")) - 1
        parts, need = [], count
        while need:
            lo = start + count - need - int(self.starts[k])
            part = self.shards[k][lo : lo + need]
            parts.append(part)
            need -= len(part)
            k += 1
        out = parts[0] if len(parts) == 1 else np.concatenate(parts)
        return out.astype(np.int64)

    def state_dict(self) -> dict:
        """The next batch's position: epoch and windows used of its shuffled order (json-able, equal on every rank)."""
        return {
            "split": self.split,
            "order": "shuffled-windows",
            "seed": self.seed,
            "epoch": self.epoch,
            "used": self.used,
            "seq_len": self.seq_len,
            "total_tokens": self.total,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state_dict()` (its seed included); refuses a state taken on different data or windows."""
        if state.get("order") != "shuffled-windows":
            raise ShardError(
                "loader state is from the older loader of contiguous batches, which this one cannot "
                "continue exactly: start the run afresh, or finish it with the code that began it"
            )
        if state.get("total_tokens") != self.total:
            raise ShardError(
                f"loader state is for a {state.get('total_tokens')}-token {state.get('split')} split, "
                f"this {self.split} split has {self.total} tokens: the token shards changed"
            )
        if state.get("seq_len") != self.seq_len:
            raise ShardError(
                f"loader state is for windows of {state.get('seq_len')} tokens, this run uses "
                f"{self.seq_len}: resume with the same --sequence-len"
            )
        used = int(state["used"])
        if not 0 <= used < self.windows:
            raise ShardError(f"loader state has used {used} windows of an epoch of {self.windows}")
        self.seed, self.epoch, self.used = int(state["seed"]), int(state["epoch"]), used
