"""Opt-in prompt truncation (`truncate_prompt_tokens`) against a real `python -m serve` process: chat drops the
oldest user/assistant pairs, keeping the system message and the last user message; a raw prompt keeps <|bos|> and
its last tokens. Without the field a prompt that does not fit stays a 400, as before.

Reference: the tokenizer's own rendering of the conversation that should remain.
"""

from __future__ import annotations

import json

import httpx
import pytest
from test_serve import SEQ_LEN, checkpoint, client, error_of, server, tok, user  # noqa: F401 (fixtures)

from finetune.chat import render_prompt

SYSTEM = [{"role": "system", "content": "Be brief."}]
HISTORY = [
    {"role": r, "content": f"{r} turn {i}: " + "one two three " * (i + 1)}
    for i in range(3)
    for r in ("user", "assistant")
]
CHAT = SYSTEM + HISTORY + user("Say hi")


@pytest.mark.parametrize("kept_pairs", [3, 2, 1, 0])
def test_chat_drops_the_oldest_pairs_until_it_fits(client, tok, kept_pairs):
    kept = SYSTEM + HISTORY[len(HISTORY) - 2 * kept_pairs :] + user("Say hi")
    limit = len(render_prompt(tok, kept))
    r = client.chat.completions.create(
        model="scratchchat", messages=CHAT, temperature=0, max_tokens=4, extra_body={"truncate_prompt_tokens": limit}
    )
    assert r.usage.prompt_tokens == limit
    assert r.model_extra["truncated_messages"] == len(HISTORY) - 2 * kept_pairs


def test_without_the_field_nothing_is_dropped_or_reported(client, tok):
    r = client.chat.completions.create(model="scratchchat", messages=CHAT, temperature=0, max_tokens=4)
    assert r.usage.prompt_tokens == len(render_prompt(tok, CHAT)) and "truncated_messages" not in r.model_extra


def test_a_chat_longer_than_the_context_fits_only_when_asked(server, tok):
    long = [
        {"role": r, "content": f"{i} " + "one two three four five " * 150}
        for i in range(6)
        for r in ("user", "assistant")
    ] + user("Say hi")
    strict = httpx.post(server + "/v1/chat/completions", json={"messages": long, "max_tokens": 2}, timeout=60)
    assert error_of(strict, 400)["code"] == "context_length_exceeded", strict.text
    r = httpx.post(
        server + "/v1/chat/completions",
        timeout=60,
        json={
            "messages": long,
            "max_tokens": 2,
            "truncate_prompt_tokens": SEQ_LEN // 2,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    dropped = chunks[-1]["truncated_messages"]
    assert {c["truncated_messages"] for c in chunks} == {dropped} and dropped % 2 == 0 and dropped > 0
    assert chunks[-1]["usage"]["prompt_tokens"] == len(render_prompt(tok, long[dropped:])) <= SEQ_LEN // 2


def test_too_small_a_limit_for_the_last_user_message_is_400(server, tok):
    need = len(render_prompt(tok, SYSTEM + user("Say hi")))
    r = httpx.post(server + "/v1/chat/completions", json={"messages": CHAT, "truncate_prompt_tokens": need - 1})
    err = error_of(r, 400)
    assert err["param"] == "truncate_prompt_tokens" and err["code"] == "context_length_exceeded"
    assert str(need) in err["message"]


def test_completions_keep_bos_and_the_last_tokens(client, tok):
    prompt = "one two three four five six seven eight"
    r = client.completions.create(
        model="scratchchat", prompt=prompt, max_tokens=2, temperature=0, extra_body={"truncate_prompt_tokens": 4}
    )
    assert r.usage.prompt_tokens == 4
    assert r.model_extra["truncated_prompt_tokens"] == len(tok.encode(prompt)) - 3
    short = client.completions.create(
        model="scratchchat", prompt="one", max_tokens=2, temperature=0, extra_body={"truncate_prompt_tokens": 100}
    )
    assert short.model_extra["truncated_prompt_tokens"] == 0 and short.usage.prompt_tokens == 1 + len(tok.encode("one"))


@pytest.mark.parametrize("value", [0, -1, "10", 1.5, True, SEQ_LEN])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_bad_truncate_prompt_tokens_is_400(server, path, value):
    base = {"messages": user("hi")} if "chat" in path else {"prompt": "hi"}
    r = httpx.post(server + path, json={**base, "truncate_prompt_tokens": value})
    assert error_of(r, 400)["param"] == "truncate_prompt_tokens"
