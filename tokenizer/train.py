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
from collections.abc import Iterable, Mapping
from concurrent.futures import ProcessPoolExecutor
from itertools import chain, islice
from operator import add

import regex

from tokenizer.files import batch_by_chars

# Heap keys: a token id fits in 21 bits (ids are chr() code points), so (left, right) takes 42.
_S, _S2 = 21, 42
_M, _M2 = (1 << 21) - 1, (1 << 42) - 1
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
    first = next(batches, [])
    second = next(batches, None)
    if workers <= 1 or second is None or multiprocessing.current_process().daemon:
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
    if 256 + n_merges > sys.maxunicode + 1:
        raise ValueError(f"at most {sys.maxunicode + 1 - 256} merges are supported")
    # A chunk is held as a str with one character per token (chr(id)): merging a pair is then
    # str.replace, which runs in C and is left to right and non-overlapping, exactly BPE's rule. A pair
    # is the 2-character str of its ids, and str order is (left id, right id) order: the tie-break.
    words: list[str] = []
    freqs: list[int] = []
    for chunk, count in chunk_counts.items():
        # Lone surrogates can't be UTF-8 encoded; replace them the same way encode() does.
        data = chunk.encode("utf-16", "surrogatepass").decode("utf-16", "replace").encode("utf-8")
        if len(data) >= 2:  # a one-byte chunk has no pair to merge
            words.append(data.decode("latin-1"))  # byte b -> chr(b)
            freqs.append(count)

    # pair -> chunks that (may) contain it. A list, not a set: appending is cheaper, and a repeated or
    # stale entry is harmless because a chunk that no longer holds the pair is skipped when visited.
    where: defaultdict[str, list[int]] = defaultdict(list)
    for wi, word in enumerate(words):
        for pair in map(add, word, word[1:]):
            where[pair].append(wi)
    # Here `where` holds one entry per occurrence, so a pair's count is a sum over it, done in C.
    freq = freqs.__getitem__
    stats: defaultdict[str, int] = defaultdict(int, {p: sum(map(freq, wis)) for p, wis in where.items()})
    # Heap entries are single ints, (-count, left id, right id) packed so that int order is the
    # tie-break order: comparing ints is much cheaper than comparing tuples of (int, str).
    heap = [(-count << _S2) | (ord(pair[0]) << _S) | ord(pair[1]) for pair, count in stats.items()]
    heapq.heapify(heap)
    heappush, heappop = heapq.heappush, heapq.heappop

    tokens = [bytes([i]) for i in range(256)]
    index = {t: i for i, t in enumerate(tokens)}
    merges: list[tuple[int, int]] = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n_merges, desc="merges", unit="merge", smoothing=0.05)
    while len(merges) < n_merges and heap:
        key = heappop(heap)
        a, b = (key >> _S) & _M, key & _M
        pair = chr(a) + chr(b)
        count = stats.get(pair, 0)
        if count != -(key >> _S2):  # stale: counts only fall after a push, so re-queue at its true count
            if count > 0:
                heappush(heap, (-count << _S2) | (key & _M2))
            continue
        merged = tokens[a] + tokens[b]
        z = index.get(merged)
        if z is None:
            z = len(tokens)
            tokens.append(merged)
            index[merged] = z
            merges.append((a, b))
            if bar is not None:
                bar.update()
        zc = chr(z)
        # Pairs containing z that gain occurrences -> the chunk of each new occurrence. Their counts
        # and index entries are settled once after the loop (sums in C), not per occurrence.
        gains: defaultdict[str, list[int]] = defaultdict(list)
        for wi in set(where.pop(pair)):  # a set: drops repeated entries in C
            word = words[wi]
            j = word.find(pair)
            if j < 0:  # the index is lazy too: this chunk lost the pair to an earlier merge
                continue
            count = freqs[wi]
            new = word.replace(pair, zc)
            n, m = len(word), len(new)
            if m == n - 1:  # the common case, one occurrence: no bookkeeping between occurrences
                if j > 0:
                    stats[word[j - 1 : j + 1]] -= count
                    gains[new[j - 1 : j + 1]].append(wi)
                if j + 2 < n:
                    stats[word[j + 1 : j + 3]] -= count
                    gains[new[j : j + 2]].append(wi)
                words[wi] = new
                continue
            nxt = word.find(pair, j + 2)
            k = 0  # occurrences so far: the k-th one lands at j - k in the new word
            last = -3  # where the previous occurrence started
            while j >= 0:
                # Pairs that lose an occurrence: the left neighbour's (unless it was the previous
                # occurrence, whose right pair that is) and the right neighbour's.
                if j > 0 and last != j - 2:
                    stats[word[j - 1 : j + 1]] -= count
                if j + 2 < n:
                    stats[word[j + 1 : j + 3]] -= count
                # Pairs that gain one: (left, z) and (z, right); (z, z) from two adjacent occurrences
                # is counted once, as the second one's left pair.
                q = j - k
                if q > 0:
                    gains[new[q - 1 : q + 1]].append(wi)
                if q + 1 < m and nxt != j + 2:
                    gains[new[q : q + 2]].append(wi)
                last, j, k = j, nxt, k + 1
                if j >= 0:
                    nxt = word.find(pair, j + 2)
            words[wi] = new
        stats.pop(pair, None)
        for gained, wis in gains.items():
            where[gained] += wis
            stats[gained] += sum(map(freq, wis))
            heappush(heap, (-stats[gained] << _S2) | (ord(gained[0]) << _S) | ord(gained[1]))
    if bar is not None:
        bar.close()
    return tokens, merges
