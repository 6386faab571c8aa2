"""The prefix cache: a prompt that starts like an earlier sequence (prompt + answer) reuses its keys and values
instead of prefilling them again, and nothing it outputs may change.

Reference: the same conversation through an engine without the cache, token for token (greedy and seeded sampling,
requests alone and batched together); over HTTP, a server started with --prefix-cache-mb 0.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest
import torch
from test_serve import EMOJI, HELLO, checkpoint, cli_error, running_server, user  # noqa: F401 (checkpoint: a fixture)
from test_serve_engine import TEXTS, random_model

from finetune.chat import render_prompt
from pretrain.checkpoint import load_checkpoint
from pretrain.model import GPT
from serve.engine import Engine, PrefixCache, SamplingParams
from tokenizer import Tokenizer

TURNS = ["hi", "the quick brown fox", "jumps over", "你好 🙂 the lazy dog", "a"]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(TEXTS, 320)


@pytest.fixture(scope="module")
def model(tok) -> GPT:
    return random_model(tok, 512)


def engine(model, tok, cache_mb: int) -> Engine:
    # Every special token ends an answer, so no calculator call steers these random answers.
    return Engine(
        model, tok, max_batch=4, seed=0, stop_ids=set(tok.special_tokens.values()), prefix_cache_bytes=cache_mb << 20
    )


def generate(eng: Engine, prompts: list[list[int]], params: SamplingParams) -> list[tuple[list[int], str, int]]:
    """Submit together; each answer's token ids (from logprobs), finish reason and cached prompt tokens."""

    async def one(ids):
        chunks = [c async for c in eng.submit(ids, params)]
        return [lp.token for c in chunks for lp in c.logprobs], chunks[-1].finish_reason, chunks[-1].cached_tokens

    async def main():
        return await asyncio.gather(*(one(ids) for ids in prompts))

    return asyncio.run(main())


def next_turn(tok, ids: list[int], answer: list[int], text: str) -> list[int]:
    sp = tok.special_tokens
    return (
        ids
        + answer
        + [
            sp["<|assistant_end|>"],
            sp["<|user_start|>"],
            *tok.encode(text),
            sp["<|user_end|>"],
            sp["<|assistant_start|>"],
        ]
    )


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(max_tokens=12, temperature=0, logprobs=0),
        SamplingParams(max_tokens=12, temperature=1.0, top_k=40, seed=7, logprobs=0),
    ],
)
def test_cached_and_uncached_engines_give_the_same_tokens(model, tok, params):
    cached, plain = engine(model, tok, 64), engine(model, tok, 0)
    try:
        # Two conversations, each resent with one more turn, and a fresh prompt, all three batched together: rows
        # prefill from different cached lengths in one forward pass.
        convs = [render_prompt(tok, user("hi")), render_prompt(tok, user("dog dog"))]
        for turn in TURNS:
            prompts = convs + [render_prompt(tok, user(turn))]
            want = generate(plain, prompts, params)
            got = generate(cached, prompts, params)
            assert [(a, f) for a, f, _ in got] == [(a, f) for a, f, _ in want]
            assert all(c == 0 for _, _, c in want)
            convs = [next_turn(tok, ids, answer, turn) for ids, (answer, _, _) in zip(convs, got)]
        # The conversations' later turns reused their earlier prompts and answers.
        assert got[0][2] > 0 and got[1][2] > 0
        assert cached.stats.prefix_hits >= 2 * (len(TURNS) - 1) and cached.stats.prefix_reused_tokens > 0
        assert cached.stats.prompt_tokens < plain.stats.prompt_tokens
    finally:
        for e in (cached, plain):
            e.shutdown(0)
            e.join(5)


def test_lru_eviction_within_the_byte_limit_and_extension():
    def kv(n: int) -> torch.Tensor:
        return torch.full((1, n, 1, 4), float(n))  # 16 bytes a position, twice (keys and values): 32

    cache = PrefixCache(limit=32 * 10)
    cache.store([1, 2, 3], kv(3), kv(3))
    cache.store([1, 2, 3, 4], kv(4), kv(4))  # extends the first: replaces it
    assert cache.bytes == 32 * 4 and len(cache.entries) == 1
    cache.store([7, 8, 9], kv(3), kv(3))
    assert cache.lookup([1, 2, 3, 4, 5]) == (4, 2)  # the longest common prefix...
    k, v = cache.take(2, 4)  # ...taken: now the most recently used
    assert k.shape == (1, 4, 1, 4) and v.shape == (1, 4, 1, 4)
    cache.store([5, 6, 7, 8], kv(4), kv(4))  # 11 positions > 10: the least recently used ([7, 8, 9]) goes
    assert cache.bytes <= 32 * 10 and [t.tolist() for t, _, _ in cache.entries.values()] == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert cache.lookup([1, 2, 3, 4])[0] == 3  # the prompt's last token is always prefilled: it picks the next one
    cache.store(list(range(20)), kv(20), kv(20))  # larger than the whole cache: not kept, nothing evicted
    assert len(cache.entries) == 2


def test_a_chat_resent_with_a_new_turn_reuses_its_prefix_over_http(checkpoint):
    second = user("Say hi") + [{"role": "assistant", "content": HELLO}] + user("Emoji")
    answers = {}
    for flags in ((), ("--prefix-cache-mb", "0")):
        with running_server(checkpoint, *flags) as (url, _):

            def ask(messages):
                r = httpx.post(
                    url + "/v1/chat/completions", json={"messages": messages, "temperature": 0}, timeout=60
                ).json()
                return r["choices"][0]["message"]["content"], r["usage"]["prompt_tokens_details"]["cached_tokens"]

            first, _ = ask(user("Say hi"))
            answers[flags] = (first, *ask(second))
            metrics = httpx.get(url + "/metrics").text
        if flags:
            assert answers[flags][2] == 0 and "prefix_cache" not in metrics
        else:
            tok = load_checkpoint(checkpoint)[1]  # the first prompt and its answer came from the cache
            assert answers[flags][2] >= len(render_prompt(tok, user("Say hi"))) + len(tok.encode(HELLO))
            assert "scratchchat_prefix_cache_hits_total 1\n" in metrics
    assert answers[()][:2] == answers[("--prefix-cache-mb", "0")][:2] == (HELLO, EMOJI)


def test_prefix_cache_flag_must_not_be_negative(capsys):
    from serve.__main__ import parse_args

    assert parse_args(["--prefix-cache-mb", "0"]).prefix_cache_mb == 0
    assert "--prefix-cache-mb must be at least 0, got -1" in cli_error(["--prefix-cache-mb", "-1"], capsys)
