"""BPE training: count the corpus's chunks once, then learn merges from those counts.

- count_chunks: the corpus reduced to its unique chunks (what the split pattern yields) with counts.
- naive_merges: the training algorithm as defined, plainly; read this one first.
- learn_merges: the same merges, fast (incremental pair counts and a lazy heap); tests hold it to
  naive_merges, merge for merge.
"""

from __future__ import annotations

import heapq
import multiprocessing
import os
import sys
from collections import Counter, defaultdict, deque
from collections.abc import Iterable, Mapping
from concurrent.futures import ProcessPoolExecutor
from itertools import chain, islice
from operator import add

import regex

from tokenizer.bpe import _sanitize
from tokenizer.files import batch_by_chars

_BATCH_CHARS = 1 << 20  # texts per worker task in parallel counting: big enough that IPC is noise


def _count_batch(pattern: str, texts: list[str]) -> Counter[str]:
    counts: Counter[str] = Counter()
    findall = regex.compile(pattern).findall
    for text in texts:
        counts.update(findall(text))
    return counts


def count_chunks(texts: Iterable[str], pattern: str, workers: int | None = None) -> Counter[str]:
    """How often each chunk of the split pattern occurs in `texts`, counted in `workers` processes
    (None: all cores). A corpus that fits in one batch is counted here: a pool would cost more."""
    workers = workers or os.cpu_count() or 1
    batches = batch_by_chars(texts, _BATCH_CHARS)
    head = list(islice(batches, 2))
    batches = chain(head, batches)
    counts: Counter[str] = Counter()
    if workers <= 1 or len(head) < 2 or multiprocessing.current_process().daemon:
        for batch in batches:
            counts.update(_count_batch(pattern, batch))
        return counts
    # fork shares the already-imported modules; elsewhere the default start method is used.
    ctx = multiprocessing.get_context("fork" if sys.platform == "linux" else None)
    with ProcessPoolExecutor(workers, ctx) as pool:
        # A bounded number of batches in flight, so a huge corpus is never all in memory at once.
        pending = deque(pool.submit(_count_batch, pattern, b) for b in islice(batches, 2 * workers))
        while pending:
            part = pending.popleft().result()
            nxt = next(batches, None)
            if nxt is not None:
                pending.append(pool.submit(_count_batch, pattern, nxt))
            counts.update(part)
    return counts


def _utf8(chunk: str) -> bytes:
    try:
        return chunk.encode("utf-8")
    except UnicodeEncodeError:  # surrogates: lone ones become U+FFFD, as encode() does (rare, so tried last)
        return _sanitize(chunk).encode("utf-8")


# ---- the definition ----------------------------------------------------------------------------


def naive_merges(chunk_counts: Mapping[str, int], n_merges: int) -> tuple[list[bytes], list[tuple[int, int]]]:
    """BPE training as defined, written plainly (minbpe's algorithm); learn_merges gives the same result.

    Each chunk starts as its UTF-8 bytes (ids 0..255). Repeat: count every adjacent pair of ids over
    all chunks, weighted by how often the chunk occurs; take the most frequent pair, the smallest
    (left id, right id) among equal counts; replace it in every chunk, left to right, by the id of
    its joined bytes. Those bytes get a new id (256, 257, ... in merge order) unless they are already
    a token, reached through other merges: then the existing id is reused and no merge is recorded,
    so every token's bytes stay unique (and ids valid tiktoken-style ranks). Stop after `n_merges` merges or when no
    pair is left.

    Every step recounts everything, so this is far too slow for a corpus: it is the reference the
    tests hold learn_merges to.
    """
    chunks: Counter[tuple[int, ...]] = Counter()
    for chunk, count in chunk_counts.items():
        chunks[tuple(_utf8(chunk))] += count
    tokens = [bytes([i]) for i in range(256)]
    merges: list[tuple[int, int]] = []
    while len(merges) < n_merges:
        pair_counts: Counter[tuple[int, int]] = Counter()
        for ids, count in chunks.items():
            for pair in zip(ids, ids[1:]):
                pair_counts[pair] += count
        if not pair_counts:
            break
        pair = min(pair_counts, key=lambda p: (-pair_counts[p], p))
        joined = tokens[pair[0]] + tokens[pair[1]]
        if joined in tokens:
            new_id = tokens.index(joined)
        else:
            new_id = len(tokens)
            tokens.append(joined)
            merges.append(pair)
        merged: Counter[tuple[int, ...]] = Counter()
        for ids, count in chunks.items():
            merged[_replace_pair(ids, pair, new_id)] += count  # chunks may become equal: add them up
        chunks = merged
    return tokens, merges


def _replace_pair(ids: tuple[int, ...], pair: tuple[int, int], new_id: int) -> tuple[int, ...]:
    out: list[int] = []
    i = 0
    while i < len(ids):
        if ids[i : i + 2] == pair:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return tuple(out)


# ---- the fast version ----------------------------------------------------------------------------
#
# Three ideas make the same result fast:
# - A chunk is a str with one character per token (chr(id)). Replacing a pair is then str.replace,
#   which runs in C and is left to right and non-overlapping, exactly BPE's rule. A pair is the
#   2-character str of its ids, and str order is (left id, right id) order: the tie-break.
# - Pair counts are kept up to date rather than recounted: a merge only touches the chunks that hold
#   the merged pair, found through `holders` (pair -> indices of the chunks that may hold it).
# - The next pair comes from a heap with lazy invalidation: an entry whose count has gone stale is
#   re-pushed with its current count when it reaches the top, instead of being updated in place.
#
# A heap entry is one int: (-count, left id, right id) packed so that int order is the tie-break order,
# because comparing ints is much cheaper than comparing tuples. A token id fits in 21 bits (ids are
# chr() code points), so the left id starts at bit 21 and the count at bit 42.
_ID_BITS, _PAIR_BITS = 21, 42
_ID_MASK, _PAIR_MASK = (1 << _ID_BITS) - 1, (1 << _PAIR_BITS) - 1


def learn_merges(
    chunk_counts: Mapping[str, int], n_merges: int, progress: bool = False
) -> tuple[list[bytes], list[tuple[int, int]]]:
    """naive_merges' result, fast: returns (token bytes by id, merges as (left, right) id pairs)."""
    if 256 + n_merges > sys.maxunicode + 1:
        raise ValueError(f"at most {sys.maxunicode + 1 - 256} merges are supported")
    chunks, chunk_freq, holders, pair_counts = _index_chunks(chunk_counts)
    freq_of = chunk_freq.__getitem__
    heap = [(-n << _PAIR_BITS) | (ord(p[0]) << _ID_BITS) | ord(p[1]) for p, n in pair_counts.items()]
    heapq.heapify(heap)
    heappush, heappop = heapq.heappush, heapq.heappop
    tokens = [bytes([i]) for i in range(256)]
    token_id = {t: i for i, t in enumerate(tokens)}
    merges: list[tuple[int, int]] = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n_merges, desc="merges", unit="merge", smoothing=0.05)
    while len(merges) < n_merges and heap:
        key = heappop(heap)
        left, right = (key >> _ID_BITS) & _ID_MASK, key & _ID_MASK
        pair = chr(left) + chr(right)
        count = pair_counts.get(pair, 0)
        if count != -(key >> _PAIR_BITS):  # stale: counts only fall after a push, so re-queue at its true count
            if count > 0:
                heappush(heap, (-count << _PAIR_BITS) | (key & _PAIR_MASK))
            continue
        joined = tokens[left] + tokens[right]
        new_id = token_id.get(joined)
        if new_id is None:  # else: already a token, reuse its id (see naive_merges)
            new_id = len(tokens)
            tokens.append(joined)
            token_id[joined] = new_id
            merges.append((left, right))
            if bar is not None:
                bar.update()
        gains = _merge_pair(pair, chr(new_id), holders.pop(pair), chunks, chunk_freq, pair_counts)
        pair_counts.pop(pair, None)
        # Pairs that gained occurrences: their counts and holders are settled here, once per merge, with
        # sums in C; each one's heap entry is pushed anew (its older entries are now stale).
        for gained, where in gains.items():
            holders[gained] += where
            pair_counts[gained] += sum(map(freq_of, where))
            heappush(heap, (-pair_counts[gained] << _PAIR_BITS) | (ord(gained[0]) << _ID_BITS) | ord(gained[1]))
    if bar is not None:
        bar.close()
    return tokens, merges


def _index_chunks(
    chunk_counts: Mapping[str, int],
) -> tuple[list[str], list[int], defaultdict[str, list[int]], defaultdict[str, int]]:
    """(chunks as strs of token characters, how often each occurs, pair -> holders, pair -> count)."""
    chunks: list[str] = []
    chunk_freq: list[int] = []
    for chunk, count in chunk_counts.items():
        data = _utf8(chunk)
        if len(data) >= 2:  # a one-byte chunk has no pair to merge
            chunks.append(data.decode("latin-1"))  # byte b -> chr(b), the character of token b
            chunk_freq.append(count)
    # A list per pair, not a set: appending is cheaper, and a repeated or stale entry is harmless
    # because a chunk that no longer holds the pair is skipped when visited.
    holders: defaultdict[str, list[int]] = defaultdict(list)
    for i, chunk in enumerate(chunks):
        for pair in map(add, chunk, chunk[1:]):
            holders[pair].append(i)
    # Here holders has one entry per occurrence, so a pair's count is a sum over it, done in C.
    freq_of = chunk_freq.__getitem__
    pair_counts = defaultdict(int, {p: sum(map(freq_of, where)) for p, where in holders.items()})
    return chunks, chunk_freq, holders, pair_counts


def _merge_pair(
    pair: str, new: str, where: list[int], chunks: list[str], chunk_freq: list[int], pair_counts: dict[str, int]
) -> defaultdict[str, list[int]]:
    """Replace `pair` by the token character `new` in the chunks at indices `where`, and take the lost
    neighbour pairs off `pair_counts`. Returns the new neighbour pairs -> the chunk of each occurrence."""
    gains: defaultdict[str, list[int]] = defaultdict(list)
    for i in set(where):  # a set: drops repeated entries in C
        chunk = chunks[i]
        at = chunk.find(pair)
        if at < 0:  # holders are lazy too: this chunk lost the pair to an earlier merge
            continue
        count = chunk_freq[i]
        merged = chunk.replace(pair, new)
        old_len, new_len = len(chunk), len(merged)
        if new_len == old_len - 1:  # the common case, one occurrence: no bookkeeping between occurrences
            if at > 0:
                pair_counts[chunk[at - 1 : at + 1]] -= count
                gains[merged[at - 1 : at + 1]].append(i)
            if at + 2 < old_len:
                pair_counts[chunk[at + 1 : at + 3]] -= count
                gains[merged[at : at + 2]].append(i)
            chunks[i] = merged
            continue
        next_at = chunk.find(pair, at + 2)
        done = 0  # occurrences so far: the next one lands at at - done in the merged chunk
        prev_at = -3  # where the previous occurrence started
        while at >= 0:
            # Pairs that lose an occurrence: the left neighbour's (unless it was the previous
            # occurrence, whose right pair that is) and the right neighbour's.
            if at > 0 and prev_at != at - 2:
                pair_counts[chunk[at - 1 : at + 1]] -= count
            if at + 2 < old_len:
                pair_counts[chunk[at + 1 : at + 3]] -= count
            # Pairs that gain one: (left, new) and (new, right); (new, new) from two adjacent
            # occurrences is counted once, as the second one's left pair.
            new_at = at - done
            if new_at > 0:
                gains[merged[new_at - 1 : new_at + 1]].append(i)
            if new_at + 1 < new_len and next_at != at + 2:
                gains[merged[new_at : new_at + 2]].append(i)
            prev_at, at, done = at, next_at, done + 1
            if at >= 0:
                next_at = chunk.find(pair, at + 2)
        chunks[i] = merged
    return gains
