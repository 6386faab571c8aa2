"""logprobs and n over HTTP, through the `openai` client, against a real `python -m serve` process serving the
memorising checkpoint of test_serve.py.

References: the model itself (a plain forward over prompt + answer, log-softmax) for the log-probabilities, and
the same request sent alone with seed + i for sample i of n.
"""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest
import torch
from test_serve import COUNT, HELLO, checkpoint, client, error_of, server, serving, user  # noqa: F401 (fixtures)

from finetune.chat import render_prompt
from pretrain.checkpoint import load_checkpoint
from serve.engine import Engine


@pytest.fixture(scope="module")
def loaded(checkpoint):
    model, tok, _ = load_checkpoint(checkpoint)
    return model.eval(), tok


def model_logprobs(model, prompt: list[int], answer: list[int]) -> torch.Tensor:
    """log p(answer[t] | prompt, answer[:t]) from one full forward: what the server must report."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + answer]))[0, len(prompt) - 1 : -1]
    return torch.log_softmax(logits.float(), -1)


def test_chat_logprobs_are_the_models_and_parse_with_the_openai_client(client, loaded):
    model, tok = loaded
    r = client.chat.completions.create(
        model="scratchchat", messages=user("Say hi"), temperature=0, logprobs=True, top_logprobs=3
    )
    content = r.choices[0].logprobs.content
    assert r.choices[0].message.content == HELLO
    assert "".join(t.token for t in content) == HELLO  # one entry per text token; <|assistant_end|> is not text
    assert b"".join(bytes(t.bytes) for t in content).decode() == HELLO
    ids = tok.encode(HELLO)
    want = model_logprobs(model, render_prompt(tok, user("Say hi")), ids)
    for t, i, row in zip(content, ids, want, strict=True):
        assert t.logprob == pytest.approx(float(row[i]), abs=1e-4)
        top = row.topk(3)
        assert [x.token for x in t.top_logprobs] == [tok.decode([int(j)]) for j in top.indices]
        assert [x.logprob for x in t.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-4)
        assert t.top_logprobs[0].logprob == pytest.approx(t.logprob)  # greedy: the drawn token is the likeliest


def test_chat_logprobs_stream_in_the_chunks_of_their_text(client):
    def entries(stream: bool):
        r = client.chat.completions.create(
            model="scratchchat", messages=user("Emoji"), temperature=0, logprobs=True, top_logprobs=2, stream=stream
        )
        if not stream:
            return r.choices[0].message.content, [(t.token, t.logprob) for t in r.choices[0].logprobs.content]
        text, out = "", []
        for c in r:
            if c.choices and c.choices[0].delta.content:
                text += c.choices[0].delta.content
                out += [(t.token, t.logprob) for t in c.choices[0].logprobs.content]
                assert all(len(t.top_logprobs) == 2 for t in c.choices[0].logprobs.content)
        return text, out

    assert entries(True) == entries(False)


def test_logprobs_false_or_absent_gives_null(client):
    r = client.chat.completions.create(model="scratchchat", messages=user("Say hi"), temperature=0, logprobs=False)
    assert r.choices[0].logprobs is None
    r = client.chat.completions.create(model="scratchchat", messages=user("Say hi"), temperature=0, logprobs=True)
    assert all(t.top_logprobs == [] for t in r.choices[0].logprobs.content) and r.choices[0].logprobs.content


def test_completions_logprobs_in_the_legacy_shape(client, loaded):
    model, tok = loaded
    r = client.completions.create(model="scratchchat", prompt="one two three", max_tokens=6, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:k]) for k in range(len(lp.tokens))]
    assert all(
        len(top) <= 2 and max(top.values()) == pytest.approx(p) for top, p in zip(lp.top_logprobs, lp.token_logprobs)
    )
    ids = tok.encode(r.choices[0].text)
    want = model_logprobs(model, [tok.bos_id] + tok.encode("one two three"), ids)
    assert lp.token_logprobs == pytest.approx([float(row[i]) for row, i in zip(want, ids)], abs=1e-4)
    streamed = client.completions.create(
        model="scratchchat", prompt="one two three", max_tokens=6, temperature=0, logprobs=0, stream=True
    )
    tokens, offsets = [], []
    for c in streamed:
        if c.choices and c.choices[0].logprobs:
            tokens += c.choices[0].logprobs.tokens
            offsets += c.choices[0].logprobs.text_offset
            assert all(top == {} for top in c.choices[0].logprobs.top_logprobs)
    assert tokens == lp.tokens and offsets == lp.text_offset


def test_n_samples_each_equal_their_seed_alone_and_share_one_prefill(client, server):
    messages = user("Count")

    def prefilled() -> int:
        line = next(
            x
            for x in httpx.get(server + "/metrics").text.splitlines()
            if x.startswith("scratchchat_prompt_tokens_total")
        )
        return int(line.split()[-1])

    before = prefilled()
    r = client.chat.completions.create(
        model="scratchchat", messages=messages, temperature=2.0, seed=41, n=3, max_tokens=12
    )
    assert prefilled() - before == r.usage.prompt_tokens - r.usage.prompt_tokens_details.cached_tokens  # once, not 3x
    assert [c.index for c in r.choices] == [0, 1, 2]
    alone = [
        client.chat.completions.create(
            model="scratchchat", messages=messages, temperature=2.0, seed=41 + i, max_tokens=12
        )
        for i in range(3)
    ]
    assert [c.message.content for c in r.choices] == [a.choices[0].message.content for a in alone]
    assert len({c.message.content for c in r.choices}) > 1  # temperature 2: three different samples
    assert r.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone)

    texts, finishes = ["", "", ""], [None] * 3
    for c in client.chat.completions.create(
        model="scratchchat",
        messages=messages,
        temperature=2.0,
        seed=41,
        n=3,
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
    ):
        for choice in c.choices:
            texts[choice.index] += choice.delta.content or ""
            finishes[choice.index] = choice.finish_reason or finishes[choice.index]
        if not c.choices:
            assert c.usage.completion_tokens == r.usage.completion_tokens
    assert texts == [c.message.content for c in r.choices] and finishes == [c.finish_reason for c in r.choices]


def test_n_on_text_completions(client):
    r = client.completions.create(model="scratchchat", prompt=COUNT[:20], max_tokens=5, temperature=0, n=2)
    assert [c.index for c in r.choices] == [0, 1] and r.choices[0].text == r.choices[1].text  # greedy: the same


@pytest.mark.parametrize(
    "path, body, param",
    [
        ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ("/v1/chat/completions", {"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
        ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
        ("/v1/chat/completions", {"logprobs": 3}, "logprobs"),
        ("/v1/completions", {"logprobs": 6}, "logprobs"),
        ("/v1/completions", {"logprobs": True}, "logprobs"),
        ("/v1/chat/completions", {"n": 0}, "n"),
        ("/v1/chat/completions", {"n": 9}, "n"),
        ("/v1/completions", {"n": 9}, "n"),
    ],
)
def test_bad_logprobs_and_n_are_400_with_param(server, path, body, param):
    base = {"messages": user("Say hi")} if "chat" in path else {"prompt": "hi"}
    err = error_of(httpx.post(server + path, json={**base, **body}, timeout=30), 400)
    assert err["param"] == param
    assert json.dumps(err)  # one OpenAI-shaped error object


def test_n_above_the_batch_is_400(loaded):
    with serving(lambda: Engine(*loaded, max_batch=2)) as url:
        err = error_of(httpx.post(url + "/v1/chat/completions", json={"messages": user("hi"), "n": 3}, timeout=30), 400)
        assert err["param"] == "n" and "--max-batch" in err["message"]


def test_a_client_leaving_an_n_stream_frees_all_its_slots(server):
    body = json.dumps({"messages": user("Count"), "stream": True, "temperature": 0, "max_tokens": 4000, "n": 6})
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as s:
        s.sendall(
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n{body}".encode()
        )
        got = b""
        while got.count(b"data: ") < 8:  # six role chunks, then text
            got += s.recv(4096)
        assert httpx.get(server + "/health").json()["active"] == 6
    deadline = time.monotonic() + 10
    while httpx.get(server + "/health").json()["active"]:
        assert time.monotonic() < deadline, "the samples' slots were not freed"
        time.sleep(0.02)
