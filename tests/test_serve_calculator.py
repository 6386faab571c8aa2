"""The calculator protocol in the engine and the API, driven by a scripted model: its forward keeps each row's
tokens in the KV cache it is given and answers with one-hot logits for the next token of a script, so the model's
choices are forced while the engine, the forced result tokens and the HTTP shapes are the real ones.

After <|assistant_start|> (or after the "?" of a raw prompt) the script answers "The sum is <|tool_start|>2 + 3
<|tool_end|>", then copies whatever result block was fed to it and ends with " done" and <|assistant_end|>: the
content must read "The sum is 5 done".
"""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest
import torch
from test_serve import serving, stream_chunks, user

from finetune.chat import render_prompt
from pretrain.model import GPTConfig, KVCache
from serve.engine import Engine, SamplingParams
from tokenizer import Tokenizer

CONTENT = "The sum is 5 done"


class Scripted(torch.nn.Module):
    """A stand-in GPT: writes each row's new tokens into the cache (as numbers in the first key channel), reads the
    row's whole history back, and puts all the probability on the script's next token."""

    def __init__(self, tok: Tokenizer) -> None:
        super().__init__()
        self.config = GPTConfig(
            vocab_size=tok.vocab_size, sequence_len=256, n_layer=1, n_head=1, n_kv_head=1, n_embd=128
        )
        self.dummy = torch.nn.Parameter(torch.zeros(1))  # the engine reads the device and dtype from parameters
        sp = tok.special_tokens
        self.tok, self.sp = tok, sp
        self.plan = tok.encode("The sum is ") + [sp["<|tool_start|>"]] + tok.encode("2 + 3") + [sp["<|tool_end|>"]]

    def next_token(self, history: list[int]) -> int:
        sp = self.sp
        # The answer starts after <|assistant_start|> in a chat, after the question mark in a raw prompt.
        marker = sp["<|assistant_start|>"] if sp["<|assistant_start|>"] in history else self.tok.encode("?")[0]
        start = len(history) - history[::-1].index(marker)
        answer = history[start:]
        if len(answer) < len(self.plan):
            return self.plan[len(answer)]
        if sp["<|output_end|>"] not in answer:  # the engine should have fed the result block
            return sp["<|assistant_end|>"]
        end = answer.index(sp["<|output_end|>"])
        result = answer[answer.index(sp["<|output_start|>"]) + 1 : end]
        tail = result + self.tok.encode(" done") + [sp["<|assistant_end|>"]]
        return tail[min(len(answer) - end - 1, len(tail) - 1)]

    def forward(self, idx: torch.Tensor, kv_cache: KVCache, lengths=None) -> torch.Tensor:
        B, T = idx.shape
        lengths = [T] * B if lengths is None else list(lengths)
        logits = torch.zeros(B, T, self.config.vocab_size)
        for b in range(B):
            p = int(kv_cache.pos[b])
            kv_cache.k[0, b, p : p + T, 0, 0] = idx[b].float()
            history = [int(x) for x in kv_cache.k[0, b, : p + lengths[b], 0, 0]]
            logits[b, lengths[b] - 1, self.next_token(history)] = 100.0
        kv_cache.pos += torch.tensor(lengths)
        return logits


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(["The sum is 2 + 3 = 5, done and done. " * 4], 300)


def collect(engine: Engine, ids: list[int], params: SamplingParams):
    async def main():
        return [c async for c in engine.submit(ids, params)]

    return asyncio.run(main())


def test_engine_feeds_the_result_and_reports_the_call(tok):
    engine = Engine(Scripted(tok), tok, max_batch=2)
    try:
        ids = render_prompt(tok, user("What is 2 + 3?"))
        for params in (SamplingParams(temperature=0, logprobs=0), SamplingParams(temperature=1.0, seed=5, logprobs=0)):
            chunks = collect(engine, ids, params)
            assert "".join(c.text for c in chunks) == CONTENT
            calls = [call for c in chunks for call in c.calls]
            assert [(c.expression, c.result, c.offset) for c in calls] == [("2 + 3", "5", len("The sum is "))]
            # Logprobs cover the content's tokens only: not the call, not the forced result, not the end token.
            logprobs = [lp for c in chunks for lp in c.logprobs]
            assert tok.decode([lp.token for lp in logprobs]) == CONTENT
            # Sampled: the call (start, expression, end), the copied result, the prose and <|assistant_end|>.
            assert (
                chunks[-1].completion_tokens
                == len(Scripted(tok).plan) + len(tok.encode("5")) + len(tok.encode(" done")) + 1
            )
            assert chunks[-1].finish_reason == "stop"
    finally:
        engine.shutdown(0)
        engine.join(5)


def test_api_shows_calls_beside_the_content_streaming_and_not(tok):
    with serving(lambda: Engine(Scripted(tok), tok, max_batch=2)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        r = client.chat.completions.create(model="scratchchat", messages=user("What is 2 + 3?"), temperature=0)
        message = r.choices[0].message
        assert message.content == CONTENT
        assert message.model_extra["calculator_calls"] == [{"expression": "2 + 3", "result": "5", "offset": 11}]

        chunks = stream_chunks(url, {"messages": user("What is 2 + 3?"), "temperature": 0})
        deltas = [c["choices"][0]["delta"] for c in chunks]
        content = [d.get("content") or "" for d in deltas]
        calls = [(i, d["calculator_calls"]) for i, d in enumerate(deltas) if "calculator_calls" in d]
        assert "".join(content) == CONTENT
        assert [c for _, c in calls] == [[{"index": 0, "expression": "2 + 3", "result": "5", "offset": 11}]]
        assert len("".join(content[: calls[0][0]])) <= 11  # the call comes in order, before the text after it
        assert list(
            client.chat.completions.create(
                model="scratchchat", messages=user("What is 2 + 3?"), temperature=0, stream=True
            )
        )  # the client takes the chunks

        # A raw prompt follows the same protocol: the result shows only in calculator_calls.
        r = client.completions.create(model="scratchchat", prompt="What is 2 + 3?", temperature=0, max_tokens=30)
        assert r.choices[0].text == CONTENT
        assert r.choices[0].model_extra["calculator_calls"] == [{"expression": "2 + 3", "result": "5", "offset": 11}]


def test_a_history_with_calls_renders_them_and_reuses_the_cached_call(tok):
    """An answer's calculator_calls sent back in the history render as the tokens the engine fed (finetune.chat),
    so the next turn's prompt finds the whole call, result included, in the prefix cache."""
    question = user("What is 2 + 3?")
    with serving(lambda: Engine(Scripted(tok), tok, max_batch=2, prefix_cache_bytes=1 << 20)) as url:

        def ask(messages):
            r = httpx.post(url + "/v1/chat/completions", json={"messages": messages, "temperature": 0}, timeout=30)
            assert r.status_code == 200, r.text
            return r.json()

        first = ask(question)["choices"][0]["message"]
        history = question + [first] + user("And again?")
        assert first["calculator_calls"] == [{"expression": "2 + 3", "result": "5", "offset": 11}]
        ids = httpx.post(url + "/tokenize", json={"messages": history}).json()["tokens"]
        assert ids == render_prompt(tok, history)
        sp = tok.special_tokens
        call = [
            sp["<|tool_start|>"],
            *tok.encode("2 + 3"),
            sp["<|tool_end|>"],
            sp["<|output_start|>"],
            *tok.encode("5"),
            sp["<|output_end|>"],
        ]
        assert any(ids[i : i + len(call)] == call for i in range(len(ids)))
        second = ask(history)
        assert second["choices"][0]["message"]["content"] == CONTENT
        cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
        assert cached >= len(render_prompt(tok, question)) + len(tok.encode("The sum is ")) + len(call)

        bad = dict(first, calculator_calls=[{"expression": "2 + 3", "result": "5", "offset": 999}])
        r = httpx.post(url + "/v1/chat/completions", json={"messages": question + [bad] + user("?")}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
        assert "offset" in r.json()["error"]["message"]
