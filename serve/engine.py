"""The inference engine: one worker thread owns the model and runs continuous batching.

Requests wait in a queue. Between decode steps the worker admits them into free rows ("slots") of one
KVCache, prefilling their prompts together, then advances every active row by one token per forward pass;
a row that finishes or is cancelled frees its slot for the next step. Each row samples with its own
settings and its own seeded generator, detokenizes incrementally (never splitting a UTF-8 character) and
holds back text that could be the start of a stop sequence. Output reaches the asyncio event loop through
loop.call_soon_threadsafe, once per step, so the HTTP side never waits on the model.
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

from pretrain.model import GPT, KVCache, sample_next


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int | None = None  # None: drawn from the engine's seeded generator
    stop: tuple[str, ...] = ()


@dataclass
class Chunk:
    """A piece of output; the last chunk of a request has finish_reason set: stop, length, cancelled, timeout
    (waited in the queue past its deadline), shutdown (still queued when the engine began shutting down) or
    error (the forward pass, or this row's sampling, failed)."""
    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


class QueueFull(Exception):
    """Too many requests are waiting; the caller should retry later."""


class EngineClosed(Exception):
    """The engine is shutting down and takes no new requests."""


class Generation:
    """One request's handle: `async for chunk in gen` yields its output; `cancel()` frees its slot."""

    def __init__(self, prompt: list[int], params: SamplingParams, loop: asyncio.AbstractEventLoop, deadline: float):
        self.prompt, self.params, self.deadline = prompt, params, deadline
        self.loop = loop
        self.queue: asyncio.Queue[Chunk] = asyncio.Queue()
        self.submitted = time.monotonic()
        self.cancelled = False  # written by the loop thread, read by the worker: a plain bool is enough

    def cancel(self) -> None:
        self.cancelled = True

    def __aiter__(self):
        return self._chunks()

    async def _chunks(self):
        while True:
            chunk = await self.queue.get()
            yield chunk
            if chunk.finish_reason is not None:
                return


@dataclass
class _Row:
    """Worker-side state of a request that holds a slot."""
    gen: Generation
    slot: int
    decoder: object
    rng: torch.Generator
    last: int = 0
    produced: int = 0
    held: str = ""  # decoded text not yet sent because it may begin a stop sequence
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
        self.decode_steps = 0
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
    return text[:len(text) - hold], text[len(text) - hold:], False


class Engine:
    """Continuous-batching generation over a GPT; thread-safe `submit`, output delivered to the event loop."""

    def __init__(self, model: GPT, tokenizer, *, max_batch: int = 8, max_queue: int = 64, seed: int = 0,
                 stop_ids: set[int] | None = None) -> None:
        self.device = next(model.parameters()).device
        if self.device.type == "cuda":  # serving needs no fp32 master weights: bf16 halves the bytes read per token
            model = model.to(torch.bfloat16)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_context = model.config.sequence_len
        self.max_token_chars = _longest_token(tokenizer)
        self.max_batch, self.max_queue = max_batch, max_queue
        # Any special token ends a generation: <|assistant_end|> for chat, and a model that starts a new turn
        # or document has finished its answer too.
        self.stop_ids = set(tokenizer.special_tokens.values()) if stop_ids is None else stop_ids
        self.cache = KVCache(model.config, max_batch, self.max_context, device=self.device,
                             dtype=next(self.model.parameters()).dtype)
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
        """Queue a request; raises QueueFull or EngineClosed. Prompt length is the caller's to check."""
        if not 0 < len(prompt) < self.max_context:
            raise ValueError(f"prompt of {len(prompt)} tokens; the context holds {self.max_context}")
        if not all(0 <= t < self.model.config.vocab_size for t in prompt):
            raise ValueError(f"prompt holds token ids outside 0..{self.model.config.vocab_size - 1}")
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
        out.append((row.gen, Chunk(text, reason, len(row.gen.prompt), row.produced)))
        self.stats.finished[reason] += 1
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
                reason = ("cancelled" if gen.cancelled else "shutdown" if self._closing
                          else "timeout" if now >= gen.deadline else None)  # timeout: waited its whole budget
                if reason is None:
                    self._pending.append(gen)
                else:
                    out.append((gen, Chunk("", reason, len(gen.prompt), 0)))
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
        """Move waiting requests into the free slots (after the active ones) and prefill their prompts together
        in one right-padded forward pass."""
        self._compact()
        free = list(range(len(self._rows), self.max_batch))
        new: list[_Row] = []
        while free:
            with self._lock:  # _reap has just dropped what can no longer run
                if not self._pending:
                    break
                gen = self._pending.popleft()
            seed = gen.params.seed
            if seed is None:
                seed = int(torch.randint(0, 2**62, (1,), generator=self._seeds))
            row = _Row(gen, free.pop(0), self.tokenizer.decoder(), torch.Generator().manual_seed(seed))
            self._rows[row.slot] = row
            new.append(row)
        if not new:
            return
        lengths = [len(r.gen.prompt) for r in new]
        idx = torch.zeros(len(new), max(lengths), dtype=torch.long)
        for i, r in enumerate(new):
            idx[i, :lengths[i]] = torch.tensor(r.gen.prompt)
        block = self.cache.view(new[0].slot, new[-1].slot + 1)
        block.reset()
        logits = self.model(idx.to(self.device), kv_cache=block, lengths=lengths)
        last = logits[torch.arange(len(new)), torch.tensor(lengths) - 1]
        self.stats.prompt_tokens += sum(lengths)
        self._emit(new, last, out)
        for r in new:
            self.stats.observe_ttft(time.monotonic() - r.gen.submitted)

    def _step(self, out: list) -> None:
        """One decode step: every active row (slots 0..n-1) feeds its last token and gets the next."""
        self._compact()
        rows = [self._rows[s] for s in range(len(self._rows))]
        idx = torch.tensor([[r.last] for r in rows], device=self.device)
        logits = self.model(idx, kv_cache=self.cache.view(0, len(rows)))[:, -1]
        self.stats.decode_steps += 1
        self._emit(rows, logits, out)

    def _emit(self, rows: list[_Row], logits: torch.Tensor, out: list) -> None:
        """Pick each row's next token from logits [len(rows), V], detokenize, apply stop rules."""
        tokens: list[int | None] = sample_next(logits).tolist()  # greedy for all, on the device, in one go
        sampled = [i for i, r in enumerate(rows) if r.gen.params.temperature > 0]
        cpu = logits[sampled].float().cpu() if sampled else None
        for j, i in enumerate(sampled):
            p = rows[i].gen.params
            try:  # one row at a time, with its own generator: a seeded request draws the same whoever its neighbours
                tokens[i] = int(sample_next(cpu[j:j + 1], p.temperature, p.top_k, p.top_p, rows[i].rng))
            except Exception:  # this row's numbers went bad: it ends alone, its neighbours carry on
                traceback.print_exc()
                tokens[i] = None
        self.stats.observe_tokens(len(rows))
        for r, token in zip(rows, tokens):
            if token is None:
                self._finish(r, "error", out)
                continue
            r.last = token
            r.produced += 1
            if token in self.stop_ids:
                self._finish(r, "stop_token", out)
                continue
            send, r.held, hit = _stop_split(r.held + r.decoder.step(token), r.gen.params.stop)
            if hit:
                self._finish(r, "stop", out, send)
            elif r.produced >= r.gen.params.max_tokens or len(r.gen.prompt) + r.produced >= self.max_context:
                self._finish(r, "length", out, send)
            elif send:
                out.append((r.gen, Chunk(send)))


def _put_all(items: list[tuple[Generation, Chunk]]) -> None:
    for gen, chunk in items:
        gen.queue.put_nowait(chunk)
