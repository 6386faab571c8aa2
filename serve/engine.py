"""The inference engine: one worker thread owns the model and runs continuous batching.

Requests wait in a queue. Between decode steps the worker admits them into free rows ("slots") of one
KVCache, prefilling their prompts together, then advances every active row by one token per forward pass;
a row that finishes or is cancelled frees its slot for the next step. Each row samples with its own
settings and its own seeded generator, detokenizes incrementally (never splitting a UTF-8 character) and
holds back text that could be the start of a stop sequence. Output reaches the asyncio event loop through
loop.call_soon_threadsafe, once per step, so the HTTP side never waits on the model.

A request may ask for n samples: they share one prefill (its keys and values are copied into n slots) and draw
from generators seeded seed, seed+1, ..., so sample i is what the request alone would give with seed + i. Finished
rows leave their keys and values in a prefix cache (LRU, bounded in bytes): a later prompt that starts with the
same tokens (a chat resent with one more turn) prefills only the rest. The calculator protocol of
finetune.calculator runs inside the decode loop: a call the model writes is evaluated and its result block is fed
back as forced tokens (never sampled, never text, never in logprobs).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import threading
import time
import traceback
from dataclasses import dataclass, field

import torch

from finetune.calculator import TOOL_TOKENS, ToolUse
from pretrain.model import GPT, KVCache, sample_next


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int | None = None  # None: drawn from the engine's seeded generator; sample i uses seed + i
    stop: tuple[str, ...] = ()
    n: int = 1  # samples of the one prompt (at most the engine's max_batch), sharing its prefill
    logprobs: int | None = None  # None: off; k: each text token's log-probability and its k likeliest alternatives


@dataclass
class TokenLogprob:
    """A text token and its log-probability under the model's own distribution (log-softmax of the logits at
    temperature 1, before top_k/top_p), with the `top` likeliest tokens as (id, logprob)."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class CalculatorCall:
    """A call the model made: `offset` is the character index into the answer's text where it happened."""

    expression: str
    result: str
    offset: int


@dataclass
class Chunk:
    """A piece of output; the last chunk of a request has finish_reason set: stop, length, cancelled, timeout
    (waited in the queue past its deadline), shutdown (still queued when the engine began shutting down) or
    error (the forward pass, or this row's sampling, failed)."""

    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0  # sampled tokens of this sample (forced calculator results not counted)
    index: int = 0  # which of the request's n samples
    logprobs: list[TokenLogprob] = field(default_factory=list)  # of the tokens whose text this chunk completes
    calls: list[CalculatorCall] = field(default_factory=list)  # made just after this chunk's text
    cached_tokens: int = 0  # prompt tokens whose keys and values came from the prefix cache


class QueueFull(Exception):
    """Too many requests are waiting; the caller should retry later."""


class EngineClosed(Exception):
    """The engine is shutting down and takes no new requests."""


class Generation:
    """One request's handle: `async for chunk in gen` yields the output of its n samples (Chunk.index says which)
    until each has finished; `cancel()` frees their slots."""

    def __init__(self, prompt: list[int], params: SamplingParams, loop: asyncio.AbstractEventLoop, deadline: float):
        self.prompt, self.params, self.deadline, self.loop = prompt, params, deadline, loop
        self.queue: asyncio.Queue[Chunk] = asyncio.Queue()
        self.submitted = time.monotonic()
        self.cancelled = False  # written by the loop thread, read by the worker: a plain bool is enough

    def cancel(self) -> None:
        self.cancelled = True

    async def __aiter__(self):
        running = self.params.n
        while running:
            chunk = await self.queue.get()
            yield chunk
            running -= chunk.finish_reason is not None


@dataclass
class _Row:
    """Worker-side state of a request that holds a slot."""

    gen: Generation
    index: int  # which of its request's samples
    slot: int
    decoder: object
    rng: torch.Generator
    tool: ToolUse
    tokens: list[int]  # what the cache row holds: the prompt, then every token fed since
    cached: int = 0  # prompt tokens reused from the prefix cache
    last: int = 0  # the token to feed next
    forced: list[int] = field(default_factory=list)  # a calculator result, fed after `last` before sampling again
    produced: int = 0
    held: str = ""  # decoded text not yet sent because it may begin a stop sequence
    sent: int = 0  # characters of text sent so far
    logprobs: list[TokenLogprob] = field(default_factory=list)  # of text not sent yet
    started: float = field(default_factory=time.monotonic)


class Stats:
    """Counters the worker updates and /metrics reads (plain ints and floats: safe to read under the GIL)."""

    TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, float("inf"))

    def __init__(self) -> None:
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.finished: collections.Counter[str] = collections.Counter()
        self.ttft_counts = [0] * len(self.TTFT_BUCKETS)
        self.ttft_sum = 0.0
        self.ttft_count = 0
        self.prefix_lookups = 0  # prompts looked up in the prefix cache
        self.prefix_hits = 0  # ... that reused at least one token
        self.prefix_reused_tokens = 0  # prompt tokens not prefilled thanks to it
        self._window: collections.deque[tuple[float, int]] = collections.deque()  # (time, tokens) of recent steps

    def observe_ttft(self, seconds: float) -> None:
        self.ttft_sum += seconds
        self.ttft_count += 1
        for i, bound in enumerate(self.TTFT_BUCKETS):
            if seconds <= bound:
                self.ttft_counts[i] += 1

    def observe_tokens(self, n: int) -> None:
        now = time.monotonic()
        self.generated_tokens += n
        self._window.append((now, n))
        while self._window and now - self._window[0][0] > 10.0:
            self._window.popleft()

    def tokens_per_second(self) -> float:
        """Generated tokens per second over the last 10 s."""
        window = list(self._window)
        if not window:
            return 0.0
        span = max(time.monotonic() - window[0][0], 1e-3)
        return sum(n for _, n in window) / span if span <= 10.0 else 0.0


def _longest_token(tokenizer) -> int:
    """The most characters one token can spell (its byte length bounds it): a text of n characters needs at least
    n / this many tokens, which lets the server refuse what cannot fit the context before tokenizing it."""
    longest = 1
    for i in range(tokenizer.vocab_size):
        with contextlib.suppress(ValueError):  # ids between the ordinary and the special tokens are unused
            longest = max(longest, len(tokenizer.token_bytes(i)))
    return longest


def _stop_split(text: str, stops: tuple[str, ...]) -> tuple[str, str, bool]:
    """Split text into (safe to send, held back, stopped): cut at the first stop sequence, and hold back
    the longest tail that is a proper prefix of some stop sequence (it may complete on the next token)."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    if cut >= 0:
        return text[:cut], "", True
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:k]):
                hold = k
                break
    return text[: len(text) - hold], text[len(text) - hold :], False


class PrefixCache:
    """Keys and values of finished sequences, for prompts that start the same way: any common prefix is reusable,
    since a position's keys and values depend only on the tokens up to it. Least recently used entries go first
    once the entries' bytes pass `limit`; an entry that a newer one extends is dropped (the newer one covers it)."""

    def __init__(self, limit: int) -> None:
        self.limit, self.bytes = limit, 0
        self.entries: collections.OrderedDict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = (
            collections.OrderedDict()
        )  # id -> (tokens, k, v), least recently used first
        self._ids = 0

    @staticmethod
    def _common(a: torch.Tensor, b: torch.Tensor) -> int:
        n = min(len(a), len(b))
        differ = (a[:n] != b[:n]).nonzero()
        return int(differ[0]) if len(differ) else n

    def lookup(self, prompt: list[int]) -> tuple[int, int | None]:
        """(reusable length, entry id) of the entry sharing the longest prefix with the prompt, leaving at least
        its last token to prefill (its logits pick the first new token)."""
        if not self.entries:
            return 0, None
        p = torch.tensor(prompt)
        best, best_id = 0, None
        for key, (tokens, _, _) in self.entries.items():
            n = self._common(tokens, p)
            if n > best:
                best, best_id = n, key
        return min(best, len(prompt) - 1), best_id

    def take(self, key: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first n positions of an entry's keys and values [layer, n, heads, dim]; marks it recently used."""
        self.entries.move_to_end(key)
        _, k, v = self.entries[key]
        return k[:, :n], v[:, :n]

    @staticmethod
    def _bytes(k: torch.Tensor) -> int:
        return k.numel() * k.element_size() * 2  # keys, and values of the same shape

    def store(self, tokens: list[int], k: torch.Tensor, v: torch.Tensor) -> None:
        size = self._bytes(k)
        if not tokens or size > self.limit:
            return
        t = torch.tensor(tokens)
        for key, (old, ok, _) in list(self.entries.items()):
            if self._common(old, t) == len(old):  # the new entry covers this one
                self.bytes -= self._bytes(ok)
                del self.entries[key]
        while self.entries and self.bytes + size > self.limit:
            _, (_, ok, _) = self.entries.popitem(last=False)
            self.bytes -= self._bytes(ok)
        self._ids += 1
        self.entries[self._ids] = (t, k.clone(), v.clone())
        self.bytes += size


class Engine:
    """Continuous-batching generation over a GPT; thread-safe `submit`, output delivered to the event loop."""

    def __init__(
        self,
        model: GPT,
        tokenizer,
        *,
        max_batch: int = 8,
        max_queue: int = 64,
        seed: int = 0,
        stop_ids: set[int] | None = None,
        prefix_cache_bytes: int = 0,
    ) -> None:
        self.device = next(model.parameters()).device
        if self.device.type == "cuda":  # serving needs no fp32 master weights: bf16 halves the bytes read per token
            model = model.to(torch.bfloat16)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_context = model.config.sequence_len
        self.max_token_chars = _longest_token(tokenizer)
        self.max_batch, self.max_queue = max_batch, max_queue
        # Any special token but a calculator call's ends a generation: <|assistant_end|> for chat, and a model that
        # starts a new turn or document has finished its answer too.
        self.tool_ids = {tokenizer.special_tokens[t] for t in TOOL_TOKENS if t in tokenizer.special_tokens}
        self.tool_start = tokenizer.special_tokens.get(TOOL_TOKENS[0])
        calls = {self.tool_start, tokenizer.special_tokens.get(TOOL_TOKENS[1])}
        self.stop_ids = set(tokenizer.special_tokens.values()) - calls if stop_ids is None else stop_ids
        self.prefix_cache = PrefixCache(prefix_cache_bytes) if prefix_cache_bytes > 0 else None
        self.cache = KVCache(
            model.config, max_batch, self.max_context, device=self.device, dtype=next(self.model.parameters()).dtype
        )
        self.stats = Stats()
        self._seeds = torch.Generator().manual_seed(seed)
        self._pending: collections.deque[Generation] = collections.deque()
        self._lock = threading.Lock()  # guards _pending and _closing: the loop thread submits, the worker takes
        self._rows: dict[int, _Row] = {}
        self._wake = threading.Event()
        self._closing = False
        self._end_at: float | None = None  # after this time, shutdown ends the streams still running
        self._thread = threading.Thread(target=self._run, name="scratchchat-engine", daemon=True)
        self._thread.start()

    # ---- called from the event loop thread ----

    @property
    def active(self) -> int:
        return len(self._rows)

    @property
    def queued(self) -> int:
        return len(self._pending)

    def submit(self, prompt: list[int], params: SamplingParams, timeout: float = 300.0) -> Generation:
        """Queue a request; raises QueueFull, EngineClosed, or ValueError for a request that could never run (the
        HTTP side refuses those with a clearer message first)."""
        if not 0 < len(prompt) < self.max_context:
            raise ValueError(f"prompt of {len(prompt)} tokens; the context holds {self.max_context}")
        if not all(0 <= t < self.model.config.vocab_size for t in prompt):
            raise ValueError(f"prompt holds token ids outside 0..{self.model.config.vocab_size - 1}")
        if not 1 <= params.n <= self.max_batch:
            raise ValueError(f"n={params.n} samples; this server decodes at most {self.max_batch} together")
        gen = Generation(list(prompt), params, asyncio.get_running_loop(), time.monotonic() + timeout)
        with self._lock:
            if self._closing:
                raise EngineClosed("the server is shutting down")
            # Requests cancelled while queued still count here until the worker's next step drops them.
            waiting = sum(not g.cancelled for g in self._pending)
            if waiting >= self.max_queue:
                raise QueueFull(f"{waiting} requests are already waiting")
            self._pending.append(gen)
        self._wake.set()
        return gen

    def shutdown(self, grace: float = 10.0) -> None:
        """Take no new requests and end the queued ones (reason shutdown); let running ones finish for up to
        `grace` seconds, then end them (length)."""
        with self._lock:
            self._closing = True
            self._end_at = time.monotonic() + grace
        self._wake.set()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    # ---- the worker thread ----

    def _run(self) -> None:
        # Autocast is thread-local, so it is entered here, in the thread that runs the model.
        autocast = torch.autocast(self.device.type, torch.bfloat16, enabled=self.device.type == "cuda")
        with torch.inference_mode(), autocast:
            while True:
                out: list[tuple[Generation, Chunk]] = []
                try:
                    self._reap(out)
                    self._admit(out)
                    if self._rows:
                        self._step(out)
                except Exception:  # a failed forward (out of memory, a bug) ends the batch, never the engine
                    traceback.print_exc()
                    for row in list(self._rows.values()):
                        self._finish(row, "error", out)
                self._deliver(out)
                with self._lock:
                    if self._closing and not self._rows and not self._pending:
                        return
                if not self._rows:
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()

    def _deliver(self, out: list[tuple[Generation, Chunk]]) -> None:
        """Hand this step's chunks to their event loops: one thread-safe call per loop per step."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for gen, chunk in out:
            by_loop.setdefault(gen.loop, []).append((gen, chunk))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # that loop is closed: nobody is listening any more
                pass

    def _finish(self, row: _Row, reason: str, out: list, text: str = "") -> None:
        if reason in ("length", "stop_token"):  # whatever the decoder still holds is output too
            tail, _, hit = _stop_split(row.held + row.decoder.flush(), row.gen.params.stop)
            text, reason = text + tail, ("stop" if hit or reason == "stop_token" else reason)
        chunk = Chunk(
            text, reason, len(row.gen.prompt), row.produced, row.index, row.logprobs, cached_tokens=row.cached
        )
        out.append((row.gen, chunk))
        self.stats.finished[reason] += 1
        if self.prefix_cache is not None and reason != "error":  # after an error the row's cache is suspect
            n = len(row.tokens)
            self.prefix_cache.store(row.tokens, self.cache.k[:, row.slot, :n], self.cache.v[:, row.slot, :n])
        del self._rows[row.slot]

    def _reap(self, out: list) -> None:
        """Free the slots of cancelled or timed-out requests, end running ones once the shutdown grace is over,
        and answer every queued request that can no longer run: its handler is waiting for a last chunk."""
        now = time.monotonic()
        forced = self._end_at is not None and now >= self._end_at
        for row in list(self._rows.values()):
            if row.gen.cancelled:
                self._finish(row, "cancelled", out)
            elif now >= row.gen.deadline or forced:
                self._finish(row, "length", out)
        with self._lock:
            waiting, self._pending = self._pending, collections.deque()
            for gen in waiting:
                if gen.cancelled:
                    reason = "cancelled"
                elif self._closing:
                    reason = "shutdown"
                elif now >= gen.deadline:  # waited its whole budget
                    reason = "timeout"
                else:
                    self._pending.append(gen)
                    continue
                out.extend((gen, Chunk("", reason, len(gen.prompt), 0, i)) for i in range(gen.params.n))
                self.stats.finished[reason] += 1

    def _compact(self) -> None:
        """Keep the active rows in slots 0..n-1 by moving rows from the end into the holes finished rows left, so
        every forward pass reads one contiguous block of the cache in place (`KVCache.view`) instead of gathering
        each row's whole prefix, on every layer, at every step."""
        n = len(self._rows)
        holes = [s for s in range(n) if s not in self._rows]
        movers = sorted(s for s in self._rows if s >= n)
        for hole, src in zip(holes, movers):
            self.cache.move(src, hole)
            row = self._rows.pop(src)
            row.slot = hole
            self._rows[hole] = row

    def _admit(self, out: list) -> None:
        """Move waiting requests into the free slots (after the active ones) and prefill their prompts together in
        one right-padded forward pass: for each request only what the prefix cache does not hold, in one slot, whose
        keys and values are then copied to the slots of its other samples."""
        self._compact()
        free = self.max_batch - len(self._rows)
        admitted: list[tuple[Generation, int, int | None]] = []  # (request, reused prompt tokens, cache entry)
        while True:
            with self._lock:  # _reap has just dropped what can no longer run; only this thread takes from the queue
                gen = self._pending[0] if self._pending else None
            if gen is None or gen.params.n > free:  # first come, first served
                break
            reuse, entry = self.prefix_cache.lookup(gen.prompt) if self.prefix_cache else (0, None)
            # One forward writes every row from its own start: the longest start plus the longest rest must fit the
            # cache, else this request waits for the next step.
            starts = [r for _, r, _ in admitted] + [reuse]
            rests = [len(g.prompt) - r for g, r, _ in admitted] + [len(gen.prompt) - reuse]
            if max(starts) + max(rests) > self.max_context:
                break
            with self._lock:
                self._pending.popleft()
            admitted.append((gen, reuse, entry))
            free -= gen.params.n
        if not admitted:
            return
        # Slots: each request's first sample in a block that is prefilled, its other samples after that block.
        first = len(self._rows)
        new: list[_Row] = []
        follower = first + len(admitted)
        for j, (gen, reuse, _) in enumerate(admitted):
            base = gen.params.seed
            if base is None:
                base = int(torch.randint(0, 2**62, (1,), generator=self._seeds))
            for i in range(gen.params.n):
                slot = first + j if i == 0 else follower
                follower += i > 0
                row = _Row(
                    gen,
                    i,
                    slot,
                    self.tokenizer.decoder(),
                    torch.Generator().manual_seed(base + i),
                    ToolUse(self.tokenizer),
                    list(gen.prompt),
                    cached=reuse,
                )
                self._rows[slot] = row  # held before the forward: if it fails, each sample gets its error chunk
                new.append(row)
        rest = [len(g.prompt) - reuse for g, reuse, _ in admitted]
        idx = torch.zeros(len(admitted), max(rest), dtype=torch.long)
        for j, ((gen, reuse, entry), n) in enumerate(zip(admitted, rest)):
            idx[j, :n] = torch.tensor(gen.prompt[reuse:])
            if self.prefix_cache is not None:
                self.stats.prefix_lookups += 1
                self.stats.prefix_hits += reuse > 0
                self.stats.prefix_reused_tokens += reuse
            if reuse:
                k, v = self.prefix_cache.take(entry, reuse)
                self.cache.k[:, first + j, :reuse] = k
                self.cache.v[:, first + j, :reuse] = v
            self.cache.pos[first + j] = reuse
        logits = self.model(idx.to(self.device), kv_cache=self.cache.view(first, first + len(admitted)), lengths=rest)
        last = logits[torch.arange(len(admitted)), torch.tensor(rest) - 1]
        self.stats.prompt_tokens += sum(rest)
        leader = {id(gen): first + j for j, (gen, _, _) in enumerate(admitted)}
        for r in new:
            if r.index:
                self.cache.move(leader[id(r.gen)], r.slot)  # the shared prefill, copied
        picks = torch.tensor([leader[id(r.gen)] - first for r in new], device=last.device)
        self._emit(new, last[picks], out)
        for r in new:
            if r.index == 0:
                self.stats.observe_ttft(time.monotonic() - r.gen.submitted)

    def _step(self, out: list) -> None:
        """One decode step: every active row (slots 0..n-1) feeds its next token and gets the next."""
        self._compact()
        rows = [self._rows[s] for s in range(len(self._rows))]
        for r in rows:
            r.tokens.append(r.last)
        idx = torch.tensor([[r.last] for r in rows], device=self.device)
        logits = self.model(idx, kv_cache=self.cache.view(0, len(rows)))[:, -1]
        self._emit(rows, logits, out)

    def _emit(self, rows: list[_Row], logits: torch.Tensor, out: list) -> None:
        """Pick each row's next token from logits [len(rows), V], detokenize, apply stop rules. A row feeding a
        calculator result takes the next forced token instead, and draws nothing."""
        tokens: list[int | None] = sample_next(logits).tolist()  # greedy for all, on the device, in one go
        sampled = [i for i, r in enumerate(rows) if r.gen.params.temperature > 0 and not r.forced]
        cpu = logits[sampled].float().cpu() if sampled else None
        for j, i in enumerate(sampled):
            p = rows[i].gen.params
            try:  # one row at a time, with its own generator: a seeded request draws the same whoever its neighbours
                tokens[i] = int(sample_next(cpu[j : j + 1], p.temperature, p.top_k, p.top_p, rows[i].rng))
            except Exception:  # this row's numbers went bad: it ends alone, its neighbours carry on
                traceback.print_exc()
                tokens[i] = None
        logprobs = self._logprobs(rows, logits, tokens)
        self.stats.observe_tokens(sum(not r.forced for r in rows))
        for i, (r, token) in enumerate(zip(rows, tokens)):
            if r.forced:
                r.last = r.forced.pop(0)
                continue
            if token is None:
                self._finish(r, "error", out)
                continue
            r.last = token
            r.produced += 1
            if token in self.stop_ids:
                self._finish(r, "stop_token", out)
                continue
            call = r.tool.after(token)
            if call is not None or r.tool.call is not None or token in self.tool_ids:  # a call is never text
                piece, calls = (r.decoder.flush() if token == self.tool_start else ""), []
                if call is not None:
                    r.forced = call.forced
                    calls = [CalculatorCall(call.expression, call.result, r.sent + len(r.held))]
            else:
                piece, calls = r.decoder.step(token), []
                if i in logprobs:
                    r.logprobs.append(logprobs[i])
            send, r.held, hit = _stop_split(r.held + piece, r.gen.params.stop)
            r.sent += len(send)
            if hit:
                self._finish(r, "stop", out, send)
            elif r.produced >= r.gen.params.max_tokens or len(r.tokens) + 1 + len(r.forced) >= self.max_context:
                self._finish(r, "length", out, send)
            elif send or calls:
                out.append((r.gen, Chunk(send, index=r.index, logprobs=r.logprobs, calls=calls)))
                r.logprobs = []

    def _logprobs(self, rows: list[_Row], logits: torch.Tensor, tokens: list[int | None]) -> dict[int, TokenLogprob]:
        """For the rows that asked, by position in `rows`: the drawn token's log-probability and the likeliest
        alternatives, from the raw logits (temperature 1, no top_k/top_p), as OpenAI reports them."""
        want = [
            i
            for i, r in enumerate(rows)
            if r.gen.params.logprobs is not None and not r.forced and tokens[i] is not None
        ]
        if not want:
            return {}
        logp = torch.log_softmax(logits[want].float(), -1)
        chosen = logp[torch.arange(len(want)), torch.tensor([tokens[i] for i in want])].tolist()
        k = max(rows[i].gen.params.logprobs for i in want)
        top_v, top_i = logp.topk(k, -1) if k else (logp[:, :0], logp[:, :0].long())
        top_v, top_i = top_v.tolist(), top_i.tolist()
        out = {}
        for j, i in enumerate(want):
            k = rows[i].gen.params.logprobs
            out[i] = TokenLogprob(tokens[i], chosen[j], list(zip(top_i[j][:k], top_v[j][:k])))
        return out


def _put_all(items: list[tuple[Generation, Chunk]]) -> None:
    for gen, chunk in items:
        gen.queue.put_nowait(chunk)
