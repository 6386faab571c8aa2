"""serve.engine without HTTP: continuous batching must not change what each request gets.

References: greedy_decode of tests/test_finetune_eval.py (a plain full-forward loop, no cache) for greedy output,
and the same request run alone for seeded sampling; the tokenizer's own decode for streamed text.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from finetune.chat import render_prompt
from pretrain.model import GPT, GPTConfig
from serve.engine import Engine, QueueFull, SamplingParams, _stop_split
from tests.test_finetune_eval import greedy_decode
from tokenizer import Tokenizer

TEXTS = ["The quick brown fox jumps over the lazy dog. ", "Ünïcödé 你好 🙂 and some more words to merge. "] * 4
PROMPTS = ["hi", "the quick brown fox jumps over the lazy dog, twice over", "a", "你好 🙂", "fox", "dog dog dog"]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(TEXTS, 320)


def random_model(tok, sequence_len: int) -> GPT:
    """Random weights (non-zero everywhere, so outputs vary) — the engine must match the model, whatever it says."""
    torch.manual_seed(0)
    m = GPT(
        GPTConfig(vocab_size=tok.vocab_size, sequence_len=sequence_len, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)
    )
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    return m.eval()


@pytest.fixture(scope="module")
def model(tok) -> GPT:
    return random_model(tok, 96)


def prompt(tok, text: str) -> list[int]:
    return render_prompt(tok, [{"role": "user", "content": text}])


def run(engine: Engine, requests: list[tuple[list[int], SamplingParams]]) -> list[tuple[str, str, int]]:
    """Submit all requests at once; (text, finish_reason, completion_tokens) of each, streamed chunks joined."""

    async def one(ids, params):
        parts, last = [], None
        async for chunk in engine.submit(ids, params):
            parts.append(chunk.text)
            last = chunk
        return "".join(parts), last.finish_reason, last.completion_tokens

    async def main():
        return await asyncio.gather(*(one(ids, p) for ids, p in requests))

    return asyncio.run(main())


def reference(model, tok, ids: list[int], max_tokens: int) -> tuple[str, str, int]:
    """What greedy decoding must give: finetune.eval's loop, cut at the first special token."""
    out = greedy_decode(model, ids, max_tokens)
    specials = set(tok.special_tokens.values())
    for i, t in enumerate(out):
        if t in specials:
            return tok.decode(out[:i]), "stop", i + 1
    return tok.decode(out), "length", len(out)


@pytest.fixture()
def engine(model, tok):
    # Every special token ends a generation here, as in `reference`: a random model writes calculator calls too,
    # which test_serve_calculator.py covers.
    e = Engine(model, tok, max_batch=3, max_queue=16, seed=0, stop_ids=set(tok.special_tokens.values()))
    yield e
    e.shutdown(0)
    e.join(5)


def test_greedy_equals_finetune_eval_with_requests_joining_and_leaving(engine, model, tok):
    # Six prompts of different lengths, three slots: rows finish at different steps and queued ones take their place.
    requests = [(prompt(tok, p), SamplingParams(max_tokens=8 + 5 * i, temperature=0)) for i, p in enumerate(PROMPTS)]
    got = run(engine, requests)
    for (ids, params), result in zip(requests, got):
        assert result == reference(model, tok, ids, params.max_tokens)
    assert engine.stats.finished["stop"] + engine.stats.finished["length"] == len(PROMPTS)
    assert engine.active == 0 and engine.queued == 0


def test_generation_stops_at_the_end_of_the_context(engine, model, tok):
    ids = prompt(tok, PROMPTS[1] * 2)
    room = model.config.sequence_len - len(ids)
    text, reason, n = run(engine, [(ids, SamplingParams(max_tokens=500, temperature=0))])[0]
    assert n <= room and (reason == "length") == (n == room)


def test_seeded_sampling_does_not_depend_on_the_batch(engine, tok):
    params = SamplingParams(max_tokens=12, temperature=1.0, top_k=50, top_p=0.9, seed=1234)
    alone = run(engine, [(prompt(tok, "fox"), params)])[0]
    crowd = run(
        engine,
        [(prompt(tok, p), SamplingParams(max_tokens=20, temperature=1.5, seed=i)) for i, p in enumerate(PROMPTS[:2])]
        + [(prompt(tok, "fox"), params)],
    )[-1]
    assert alone == crowd
    other = run(engine, [(prompt(tok, "fox"), SamplingParams(max_tokens=12, temperature=1.0, seed=99))])[0]
    assert other != alone  # a different seed changes the sample (40 chances for a random model to differ)


def test_top_k_1_and_tiny_top_p_are_greedy(engine, model, tok):
    ids = prompt(tok, "dog")
    want = reference(model, tok, ids, 10)
    for params in (
        SamplingParams(max_tokens=10, temperature=1.7, top_k=1, seed=3),
        SamplingParams(max_tokens=10, temperature=1.7, top_p=1e-9, seed=4),
    ):
        assert run(engine, [(ids, params)])[0] == want


def test_stop_sequences_cut_output_across_token_boundaries(engine, model, tok):
    ids = prompt(tok, PROMPTS[1])
    full, _, _ = reference(model, tok, ids, 40)
    assert len(full) > 6
    stop = full[3:6]  # three characters that may straddle tokens
    text, reason, _ = run(engine, [(ids, SamplingParams(max_tokens=40, temperature=0, stop=(stop, "\x00never")))])[0]
    assert text == full[: full.index(stop)] and reason == "stop"


@pytest.mark.parametrize(
    "text, stops, want",
    [
        ("hello wor", ("world",), ("hello ", "wor", False)),
        ("hello world!", ("world",), ("hello ", "", True)),
        ("abc", ("x", "bcd"), ("a", "bc", False)),
        ("abc", (), ("abc", "", False)),
        ("aXbY", ("Y", "X"), ("a", "", True)),  # the earliest stop wins, whatever its order in the list
    ],
)
def test_stop_split(text, stops, want):
    assert _stop_split(text, stops) == want


def test_streamed_text_never_splits_a_character(engine, model, tok):
    """Multi-byte characters span several byte tokens: chunks must still be whole characters, joined = decode."""
    ids = prompt(tok, "你好 🙂")
    chunks: list[str] = []

    async def main():
        async for c in engine.submit(ids, SamplingParams(max_tokens=30, temperature=0)):
            chunks.append(c.text)

    asyncio.run(main())
    assert "".join(chunks) == reference(model, tok, ids, 30)[0]
    for c in chunks:
        c.encode("utf-8")  # raises on a lone surrogate; replacement chars only where decode() has them too


@pytest.fixture(scope="module")
def endless(model) -> GPT:
    """The same weights with a 4096-token context; engines over it ignore special tokens, so generations run long."""
    m = GPT(GPTConfig(**{**model.config.__dict__, "sequence_len": 4096}))
    m.load_state_dict(model.state_dict())
    return m.eval()


def test_cancel_frees_the_slot_at_the_next_step(endless, tok):
    engine = Engine(endless, tok, max_batch=1, max_queue=4, stop_ids=set())

    async def main():
        long = engine.submit(prompt(tok, "fox"), SamplingParams(max_tokens=10_000, temperature=0))
        waiting = engine.submit(prompt(tok, "dog"), SamplingParams(max_tokens=3, temperature=0))
        async for _ in long:
            break
        long.cancel()
        last_long = [c async for c in long][-1]
        last_waiting = [c async for c in waiting][-1]
        return last_long, last_waiting

    try:
        long, waiting = asyncio.run(main())
        assert long.finish_reason == "cancelled" and long.completion_tokens < 4000
        assert waiting.finish_reason == "length" and waiting.completion_tokens == 3
        assert engine.active == 0 and engine.stats.finished["cancelled"] == 1
    finally:
        engine.shutdown(0)
        engine.join(5)


def test_full_queue_refuses_and_shutdown_ends_everything(endless, tok):
    engine = Engine(endless, tok, max_batch=1, max_queue=2, stop_ids=set())

    async def main():
        params = SamplingParams(max_tokens=10_000, temperature=0)
        gens = [engine.submit(prompt(tok, "a"), params)]
        async for _ in gens[0]:  # wait until it holds the slot
            break
        gens += [engine.submit(prompt(tok, "a"), params) for _ in range(2)]
        with pytest.raises(QueueFull):
            engine.submit(prompt(tok, "a"), params)
        engine.shutdown(grace=0)
        return [[c async for c in g][-1].finish_reason for g in gens]

    assert asyncio.run(main()) == ["length", "shutdown", "shutdown"]  # queued ones are answered at once
    engine.join(5)
    assert not engine._thread.is_alive()


def test_a_failing_forward_ends_the_batch_but_not_the_engine(engine, model, tok, monkeypatch, capsys):
    forward = model.forward
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(model, "forward", broken)
    text, reason, _ = run(engine, [(prompt(tok, "fox"), SamplingParams(max_tokens=5, temperature=0))])[0]
    assert (text, reason) == ("", "error") and calls
    assert "out of memory (simulated)" in capsys.readouterr().err  # the traceback goes to the server's log
    monkeypatch.setattr(model, "forward", forward)
    ids = prompt(tok, "fox")
    assert run(engine, [(ids, SamplingParams(max_tokens=5, temperature=0))])[0] == reference(model, tok, ids, 5)
    with pytest.raises(ValueError, match="token ids outside"):
        asyncio.run(_submit(engine, [tok.vocab_size + 5]))


async def _submit(engine: Engine, ids: list[int]) -> None:
    engine.submit(ids, SamplingParams())


def test_a_degenerate_temperature_leaves_its_neighbours_untouched(engine, tok):
    """1e-38 used to overflow logits / temperature and make torch.multinomial fail the whole batch; 5e-324 is 0
    in fp32, and 0 / 0 used to fail its row."""
    seeded = (prompt(tok, "fox"), SamplingParams(max_tokens=12, temperature=1.0, seed=1234))
    alone = run(engine, [seeded])[0]
    tiny = SamplingParams(max_tokens=12, temperature=1e-38, seed=1)
    got = run(
        engine,
        [seeded, (prompt(tok, "dog"), tiny), (prompt(tok, "a"), SamplingParams(max_tokens=12, temperature=5e-324))],
    )
    assert got[0] == alone
    greedy = run(engine, [(prompt(tok, text), SamplingParams(max_tokens=12, temperature=0)) for text in ("dog", "a")])
    assert got[1:] == greedy  # a temperature this small is greedy


def test_a_row_whose_sampling_fails_ends_alone(engine, tok, monkeypatch, capsys):
    import serve.engine

    sample = serve.engine.sample_next

    def fails_at_temperature_09(logits, temperature=0.0, *args):
        if temperature == 0.9:
            raise RuntimeError("bad row (simulated)")
        return sample(logits, temperature, *args)

    seeded = (prompt(tok, "fox"), SamplingParams(max_tokens=12, temperature=1.0, seed=1234))
    alone = run(engine, [seeded])[0]
    monkeypatch.setattr(serve.engine, "sample_next", fails_at_temperature_09)
    got = run(engine, [seeded, (prompt(tok, "dog"), SamplingParams(max_tokens=12, temperature=0.9, seed=7))])
    assert got[0] == alone and got[1] == ("", "error", 0)
    assert "bad row (simulated)" in capsys.readouterr().err


def test_requests_cancelled_while_queued_get_a_last_chunk_and_leave_the_queue(endless, tok):
    engine = Engine(endless, tok, max_batch=1, max_queue=2, stop_ids=set())

    async def main():
        long = engine.submit(prompt(tok, "fox"), SamplingParams(max_tokens=10_000, temperature=0))
        async for _ in long:  # it holds the only slot from now on
            break
        queued = [engine.submit(prompt(tok, "a"), SamplingParams(max_tokens=3, temperature=0)) for _ in range(2)]
        for g in queued:
            g.cancel()
        ends = [await asyncio.wait_for(_last(g), 10) for g in queued]  # used to wait forever
        assert engine.queued == 0 and engine.active == 1
        again = [engine.submit(prompt(tok, "a"), SamplingParams(max_tokens=3, temperature=0)) for _ in range(2)]
        long.cancel()
        return ends, [(await _last(g)).finish_reason for g in again]

    try:
        ends, again = asyncio.run(main())
        assert [c.finish_reason for c in ends] == ["cancelled", "cancelled"]
        assert again == ["length", "length"]  # the queue had room again: no QueueFull
    finally:
        engine.shutdown(0)
        engine.join(5)


async def _last(gen):
    return [c async for c in gen][-1]
