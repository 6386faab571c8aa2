"""BPE training: count pre-tokenized chunks once, then merge pairs with incremental counts.

The corpus is reduced to its unique chunks (what the split pattern yields) with their counts, so each
merge only touches the chunks that contain the merged pair, found through an index pair -> chunks.
The next pair comes from a heap with lazy invalidation: an entry whose count has gone stale is
re-pushed with its current count when it reaches the top, instead of being updated in place.

Tie-breaking (deterministic): the highest count wins, then the smallest pair (left id, right id).
A merge whose bytes equal an existing token reuses that token's id (and is not a new merge), so every
token's bytes stay unique and ids remain valid tiktoken-style ranks.
"""

from __future__ import annotations

import heapq
import os
import multiprocessing
import sys
from collections import Counter, defaultdict, deque
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ProcessPoolExecutor
from itertools import chain, islice

import regex

# Pair (left, right) packed into one int: ints hash faster than tuples, and ordering by the packed
# value is ordering by (left, right), which is exactly our tie-break.
_K = 1 << 32
_BATCH_CHARS = 1 << 20  # texts per worker task in parallel counting: big enough that IPC is noise


def _count_batch(pattern: str, texts: list[str]) -> Counter[str]:
    counts: Counter[str] = Counter()
    findall = regex.compile(pattern).findall
    for text in texts:
        counts.update(findall(text))
    return counts


def _batches(texts: Iterable[str], chars: int) -> Iterator[list[str]]:
    batch: list[str] = []
    size = 0
    for text in texts:
        batch.append(text)
        size += len(text)
        if size >= chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def count_chunks(texts: Iterable[str], pattern: str, workers: int | None = None) -> Counter[str]:
    """How often each chunk of the split pattern occurs in `texts`, counted in `workers` processes
    (None: all cores). A corpus that fits in one batch is counted here: a pool would cost more."""
    workers = workers or os.cpu_count() or 1
    batches = _batches(texts, _BATCH_CHARS)
    first = next(batches, [])
    second = next(batches, None)
    if workers <= 1 or second is None:
        counts = _count_batch(pattern, first)
        for batch in ([] if second is None else chain([second], batches)):
            counts.update(_count_batch(pattern, batch))
        return counts
    counts: Counter[str] = Counter()
    # fork shares the already-imported modules; elsewhere the default start method is used.
    ctx = multiprocessing.get_context("fork" if sys.platform == "linux" else None)
    with ProcessPoolExecutor(workers, ctx) as pool:
        batches = chain([first, second], batches)
        # A bounded number of batches in flight, so a huge corpus is never all in memory at once.
        pending = deque(pool.submit(_count_batch, pattern, b) for b in islice(batches, 2 * workers))
        while pending:
            part = pending.popleft().result()
            nxt = next(batches, None)
            if nxt is not None:
                pending.append(pool.submit(_count_batch, pattern, nxt))
            counts.update(part)
    return counts


def learn_merges(
    chunk_counts: Mapping[str, int], n_merges: int, progress: bool = False
) -> tuple[list[bytes], list[tuple[int, int]]]:
    """Learn up to `n_merges` merges; returns (token bytes by id, merges as (left, right) id pairs).

    Ids 0..255 are the bytes themselves; merge i creates id 256 + i. Stops early when no pair is left.
    """
    words: list[list[int]] = []
    freqs: list[int] = []
    for chunk, count in chunk_counts.items():
        # Lone surrogates can't be UTF-8 encoded; replace them the same way encode() does.
        data = chunk.encode("utf-16", "surrogatepass").decode("utf-16", "replace").encode("utf-8")
        if len(data) >= 2:  # a one-byte chunk has no pair to merge
            words.append(list(data))
            freqs.append(count)

    stats: defaultdict[int, int] = defaultdict(int)
    where: defaultdict[int, set[int]] = defaultdict(set)
    for wi, word in enumerate(words):
        count = freqs[wi]
        for x, y in zip(word, word[1:]):
            key = x * _K + y
            stats[key] += count
            where[key].add(wi)
    heap = [(-count, key) for key, count in stats.items()]
    heapq.heapify(heap)

    tokens = [bytes([i]) for i in range(256)]
    index = {t: i for i, t in enumerate(tokens)}
    merges: list[tuple[int, int]] = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n_merges, desc="merges", unit="merge", smoothing=0.05)
    while len(merges) < n_merges and heap:
        neg, key = heapq.heappop(heap)
        count = stats.get(key, 0)
        if count != -neg:  # stale entry: counts only fall after a push, so re-queue at its true count
            if count > 0:
                heapq.heappush(heap, (-count, key))
            continue
        a, b = divmod(key, _K)
        merged = tokens[a] + tokens[b]
        z = index.get(merged)
        if z is None:
            z = len(tokens)
            tokens.append(merged)
            index[merged] = z
            merges.append((a, b))
            if bar is not None:
                bar.update()
        grown: set[int] = set()  # pairs containing z whose counts rose: they need fresh heap entries
        for wi in where.pop(key):
            word = words[wi]
            count = freqs[wi]
            n = len(word)
            new: list[int] = []
            zs: list[int] = []  # positions of z in new
            copied = pos = 0
            last = -3  # start of the previous occurrence
            # Left to right, non-overlapping ("aaa" with (a, a) gives [z, a]). Only pairs next to an
            # occurrence change; (a, b) itself is dropped from stats after the loop.
            while True:
                try:
                    j = word.index(a, pos)
                except ValueError:
                    break
                if j + 1 < n and word[j + 1] == b:
                    if j > 0 and last != j - 2:  # right after another occurrence, that one's right pair is this one's left
                        stats[word[j - 1] * _K + a] -= count
                    if j + 2 < n:
                        stats[b * _K + word[j + 2]] -= count
                    new += word[copied:j]
                    zs.append(len(new))
                    new.append(z)
                    copied = pos = j + 2
                    last = j
                else:
                    pos = j + 1
            if not zs:  # the index is lazy too: this chunk lost the pair to an earlier merge
                continue
            new += word[copied:]
            m = len(new)
            for q in zs:
                # (z, z) is counted once, as the left pair of the second z.
                pairs = [new[q - 1] * _K + z] if q > 0 else []
                if q + 1 < m and new[q + 1] != z:
                    pairs.append(z * _K + new[q + 1])
                for k2 in pairs:
                    stats[k2] += count
                    where[k2].add(wi)
                    grown.add(k2)
            words[wi] = new
        stats.pop(key, None)
        for k2 in grown:
            heapq.heappush(heap, (-stats[k2], k2))
    if bar is not None:
        bar.close()
    return tokens, merges

