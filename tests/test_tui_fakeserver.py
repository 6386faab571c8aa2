"""A small OpenAI-compatible server that misbehaves on demand, and tests that our client reads it
exactly as the official `openai` client does.

The other tui tests import `FakeServer` from here. The last user message picks the behaviour:
  [500] / [400]   fail with an OpenAI error body        [drop]    close the connection mid-answer
  [badjson]       send a chunk that is not JSON          [stall]   send a little, then nothing
  [slow]          0.1 s between tokens                   [long]    a 200-line answer
  [trickle]       0.01 s between tokens                  [errchunk] an error object mid-stream
  [length]        stop with finish_reason "length"       [calc]    call the calculator mid-answer (CALC)
  otherwise an echo with a code block.
`context_messages`, when set, plays a model with a small context: a request with more messages than that gets
400 context_length_exceeded. It serves serve/static/index.html at / too, so the web page can be tested against it.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.routing import Route

from tui.client import CalculatorCall, Finish, ServerError, Usage, list_models, make_http, stream_chat

MODEL = "fake-model"
# What [calc] answers: prose, with the calculator called where the prose says "is " (scratchchat's extension).
CALC_TEXT = "The sum is 68, so 23+45 = 68."
CALC = [{"expression": "23+45", "result": "68", "offset": len("The sum is ")}]


def answer_for(prompt: str) -> str:
    if "[calc]" in prompt:
        return CALC_TEXT
    if "[long]" in prompt:
        return "".join(f"row{i}\n\n" for i in range(200))
    return f"Echo: **{prompt}**\n\n```python\nprint({prompt!r})\n```\n\nand `done`."


def tokens_of(text: str) -> list[str]:
    # Word-ish pieces keeping whitespace, like a tokenizer's output stream.
    pieces, word = [], ""
    for ch in text:
        word += ch
        if ch in " \n":
            pieces.append(word)
            word = ""
    return pieces + ([word] if word else [])


def completion(choices: list, stream: bool = True, **extra) -> dict:
    kind = "chat.completion.chunk" if stream else "chat.completion"
    return {"id": "chatcmpl-fake", "object": kind, "created": 0, "model": MODEL, "choices": choices, **extra}


def chunk(delta: dict, finish: str | None = None) -> str:
    return f"data: {json.dumps(completion([{'index': 0, 'delta': delta, 'finish_reason': finish}]))}\n\n"


def usage(completion_tokens: int) -> dict:
    return {"prompt_tokens": 7, "completion_tokens": completion_tokens, "total_tokens": 7 + completion_tokens}


def error_response(
    status: int, message: str, kind: str, code: str | None = None, param: str | None = None
) -> JSONResponse:
    """An OpenAI error body."""
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status)


class FakeServer:
    """Runs the fake API with uvicorn in a thread on 127.0.0.1; `.url` ends in /v1."""

    def __init__(self, port: int = 0, api_key: str = "", context_messages: int | None = None) -> None:
        self.api_key = api_key
        self.context_messages = context_messages
        self.requests: list[dict] = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        app = Starlette(
            routes=[
                Route("/v1/models", self.models),
                Route("/v1/chat/completions", self.chat, methods=["POST"]),
                Route("/", self.page),
            ]
        )
        self.server = uvicorn.Server(
            uvicorn.Config(app, log_level="critical", timeout_graceful_shutdown=1, lifespan="off")
        )
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> FakeServer:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "fake server did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(5)

    def _denied(self, request: Request) -> JSONResponse | None:
        if self.api_key and request.headers.get("authorization") != f"Bearer {self.api_key}":
            return error_response(401, "Incorrect API key provided", "invalid_request_error", "invalid_api_key")
        return None

    async def page(self, request: Request) -> HTMLResponse:
        return HTMLResponse((Path(__file__).parents[1] / "serve" / "static" / "index.html").read_text())

    async def models(self, request: Request) -> JSONResponse:
        return self._denied(request) or JSONResponse(
            {
                "object": "list",
                "data": [
                    {"id": MODEL, "object": "model", "created": 0, "owned_by": "test"},
                    {"id": "other-model", "object": "model", "created": 0, "owned_by": "test"},
                ],
            }
        )

    async def chat(self, request: Request):
        if denied := self._denied(request):
            return denied
        body = await request.json()
        self.requests.append(body)
        prompt = [m for m in body["messages"] if m["role"] == "user"][-1]["content"]
        for code in (400, 500):
            if f"[{code}]" in prompt:
                return error_response(code, f"the fake server failed with {code} on purpose", "server_error")
        if self.context_messages is not None and len(body["messages"]) > self.context_messages:
            message = f"{len(body['messages'])} messages do not fit the fake context"
            return error_response(400, message, "invalid_request_error", "context_length_exceeded", "messages")
        pieces = tokens_of(answer_for(prompt))
        if not body.get("stream"):
            message = {"role": "assistant", "content": "".join(pieces)}
            if "[calc]" in prompt:
                message["calculator_calls"] = CALC
            choice = {"index": 0, "message": message, "finish_reason": "stop"}
            return JSONResponse(completion([choice], stream=False, usage=usage(len(pieces))))
        return StreamingResponse(self.events(prompt, pieces, body), media_type="text/event-stream")

    async def events(self, prompt: str, pieces: list[str], body: dict):
        yield chunk({"role": "assistant", "content": ""})
        finish = "stop"
        if "[length]" in prompt:
            pieces, finish = pieces[:3], "length"
        for i, piece in enumerate(pieces):
            if "[slow]" in prompt or "[trickle]" in prompt:
                await asyncio.sleep(0.1 if "[slow]" in prompt else 0.01)
            if i == 3 and "[drop]" in prompt:
                raise ConnectionResetError("dropped on purpose")  # uvicorn aborts the half-sent response
            if i == 3 and "[badjson]" in prompt:
                yield "data: {this is not json\n\n"
            if i == 3 and "[errchunk]" in prompt:
                error = {"message": "the fake server failed mid-stream", "type": "server_error"}
                yield f"data: {json.dumps({'error': error})}\n\n"
                return
            if i == 3 and "[stall]" in prompt:
                await asyncio.sleep(30)
            if "[calc]" in prompt and len("".join(pieces[:i])) == CALC[0]["offset"]:
                yield chunk({"calculator_calls": [{"index": 0, **CALC[0]}]})
            yield chunk({"content": piece})
        yield chunk({}, finish)
        if (body.get("stream_options") or {}).get("include_usage"):
            yield f"data: {json.dumps(completion([], usage=usage(len(pieces))))}\n\n"
        yield "data: [DONE]\n\n"


@pytest.fixture(scope="module")
def server():
    """The fake server, without an API key; the other tui tests import this fixture."""
    with FakeServer() as s:
        yield s


async def collect(url: str, prompt: str, api_key: str = "sk-test", timeout: float = 5.0, into: list | None = None):
    """What stream_chat yields for one prompt, appended to `into` (which keeps them when the stream fails)."""
    items = [] if into is None else into
    async with make_http(url, api_key, timeout) as http:
        async for item in stream_chat(http, {"model": MODEL, "messages": [{"role": "user", "content": prompt}]}):
            items.append(item)
    return items


def openai_reference(url: str, prompt: str) -> tuple[str, str | None, tuple[int, int] | None]:
    import openai

    client = openai.OpenAI(base_url=url, api_key="sk-test", max_retries=0)
    text, finish, usage = "", None, None
    for c in client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": prompt}], stream=True, stream_options={"include_usage": True}
    ):
        for choice in c.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
        if c.usage:
            usage = (c.usage.prompt_tokens, c.usage.completion_tokens)
    return text, finish, usage


@pytest.mark.parametrize("prompt", ["hello there", "multi\nline ✓ ünïcode", "[length] cut me"])
def test_stream_matches_openai_client(server, prompt):
    items = asyncio.run(collect(server.url, prompt))
    text = "".join(i for i in items if isinstance(i, str))
    finish = [i.reason for i in items if isinstance(i, Finish)]
    usage = [(i.prompt_tokens, i.completion_tokens) for i in items if isinstance(i, Usage)]
    ref_text, ref_finish, ref_usage = openai_reference(server.url, prompt)
    assert text == ref_text and text.startswith("Echo: **")
    assert finish == [ref_finish]
    assert usage == [ref_usage]


def test_models_match_openai_client(server):
    import openai

    ref = [m.id for m in openai.OpenAI(base_url=server.url, api_key="sk-test", max_retries=0).models.list()]

    async def ours():
        async with make_http(server.url, "sk-test") as http:
            return await list_models(http)

    assert asyncio.run(ours()) == ref == [MODEL, "other-model"]


@pytest.mark.parametrize(
    "prompt, expected",
    [
        ("[500] boom", "server error 500: the fake server failed with 500 on purpose"),
        ("[400] bad", "server error 400: the fake server failed with 400 on purpose"),
        ("[drop] x", "the connection dropped mid-answer"),
        ("[badjson] x", "server sent invalid JSON: '{this is not json'"),
        ("[errchunk] x", "server error: the fake server failed mid-stream"),
    ],
)
def test_failures_become_one_clear_error(server, prompt, expected):
    got: list = []
    with pytest.raises(ServerError) as err:
        asyncio.run(collect(server.url, prompt, into=got))
    assert str(err.value).startswith(expected)
    if "[500]" in prompt:  # the openai client sees the same status and message
        import openai

        with pytest.raises(openai.InternalServerError, match="on purpose"):
            openai_reference(server.url, prompt)
    if "[500]" not in prompt and "[400]" not in prompt:
        partial = "".join(i for i in got if isinstance(i, str))
        assert partial == "".join(tokens_of(answer_for(prompt))[:3])  # the partial text came through


def test_wrong_key_timeout_and_no_server(server):
    with FakeServer(api_key="sk-test") as locked:
        with pytest.raises(ServerError, match="server error 401: Incorrect API key"):
            asyncio.run(collect(locked.url, "hi", api_key="wrong"))
        assert "".join(i for i in asyncio.run(collect(locked.url, "hi")) if isinstance(i, str)) == answer_for("hi")
    start = time.monotonic()
    with pytest.raises(ServerError, match="timed out"):
        asyncio.run(collect(server.url, "[stall] x", timeout=0.3))
    assert time.monotonic() - start < 5
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    with pytest.raises(ServerError, match=f"cannot reach the server at {dead}"):
        asyncio.run(collect(dead, "hi"))


def test_stream_without_done_is_an_error():
    """A server that ends the body cleanly but never says [DONE] cut the answer short."""

    async def body():
        yield chunk({"content": "half an "})

    async def handler(request):
        return StreamingResponse(body(), media_type="text/event-stream")

    async def run():
        transport = httpx.ASGITransport(
            app=Starlette(routes=[Route("/v1/chat/completions", handler, methods=["POST"])])
        )
        async with httpx.AsyncClient(transport=transport, base_url="http://test/v1/") as http:
            return [i async for i in stream_chat(http, {"messages": []})]

    with pytest.raises(ServerError, match="without \\[DONE\\]"):
        asyncio.run(run())


def test_calculator_call_arrives_between_the_text_where_it_happened(server):
    items = [i for i in asyncio.run(collect(server.url, "[calc] add")) if isinstance(i, str | CalculatorCall)]
    call = next(i for i in items if isinstance(i, CalculatorCall))
    assert call == CalculatorCall(**CALC[0])
    assert "".join(items[: items.index(call)]) == CALC_TEXT[: call.offset]
    assert "".join(i for i in items if isinstance(i, str)) == CALC_TEXT


def test_context_overflow_error_carries_its_code():
    with FakeServer(context_messages=0) as tiny:
        with pytest.raises(ServerError) as err:
            asyncio.run(collect(tiny.url, "hi"))
    assert (err.value.status, err.value.code) == (400, "context_length_exceeded")
    assert str(err.value) == "server error 400: 1 messages do not fit the fake context"
