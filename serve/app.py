"""The HTTP API: OpenAI-compatible chat and text completions over the engine, plus health, metrics, tokenize,
the OpenAPI schema and the web chat page.

Every error a client can cause answers {"error": {"message", "type", "param", "code"}} with a fitting status:
400 invalid request (or a Host header this server does not answer to), 401 missing/wrong API key, 404 unknown
model or route, 408 body sent too slowly, 413 body too large, 415 body not sent as JSON, 429 queue full and
503 loading or shutting down (both with Retry-After). Streams are server-sent events ending with
`data: [DONE]`; a client that goes away cancels its generation, which frees its slot at the next step.

No request may hurt another: sampling fails per row, tokenization runs one request at a time (a long text
holds the GIL and would stall the engine thread's decode steps), and text that cannot fit the context is
refused before it is tokenized.

The handlers are plain functions that find what they share (`State`) at request.app.state.serve; ENDPOINTS, near
the end, is the one list of routes, from which the app, the OpenAPI document and /metrics take theirs.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import math
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from common.cli import flag
from finetune.chat import ChatFormatError, render_prompt
from serve import openapi
from serve.engine import Chunk, Engine, EngineClosed, Generation, QueueFull, SamplingParams

STATIC = Path(__file__).parent / "static"
GENERATION_FAILED = "generation failed on the server; see its log"


@dataclass
class Limits:
    """What one request may ask for; every field is a `python -m serve` flag."""
    max_messages: int = flag(64, "messages per chat request")
    max_message_chars: int = flag(32_000, "characters per message")
    max_total_chars: int = flag(128_000, "characters in all messages (or the prompt) together")
    # An upper bound only: the context may end a generation earlier.
    max_tokens: int = flag(4096, "largest max_tokens a request may ask for")
    # Completions default to 16, as OpenAI's do.
    default_max_tokens: int = flag(512, "max_tokens of a chat request that does not say")
    max_stop: int = flag(4, "stop sequences per request")
    max_body_bytes: int = flag(1 << 20, "largest request body (413 above it)")
    body_timeout: float = flag(30.0, "seconds a client may take to send its request body (408 after it)")
    request_timeout: float = flag(300.0, "seconds a request may take, queueing included")
    retry_after: int = flag(1, "seconds clients are told to wait (Retry-After) on 429/503")


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}


def error_response(status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict[str, str] | None = None) -> Response:
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    # ASCII JSON: a message quoting what the client sent (a model name holding a lone surrogate) always encodes.
    return Response(json.dumps(body), status_code=status, headers=headers, media_type="application/json")




class State:
    """What the handlers share, found at request.app.state.serve: the engine once loaded (by `load`, in a thread at
    startup), the limits, request counters for /metrics, and the one turn at the tokenizer."""

    def __init__(self, load: Callable[[], Engine], limits: Limits, model_name: str, api_key: str | None) -> None:
        self.load, self.limits, self.model_name, self.api_key = load, limits, model_name, api_key
        self.engine: Engine | None = None
        self.load_error: str | None = None
        self.created = int(time.time())
        self.requests: Counter[tuple[str, int]] = Counter()  # (route, status) -> count
        self.shutting_down = False
        self.tokenizer_turn = asyncio.Semaphore(1)

    def retry_after(self) -> dict[str, str]:
        """The header that tells a client told 429 or 503 when to come back."""
        return {"Retry-After": str(self.limits.retry_after)}


# ---------------------------------------------------------------- request parsing and validation

async def read_json(request: Request, limits: Limits) -> dict:
    """The request body as a JSON object, refusing bodies over the size limit before reading all of them."""
    # A JSON content type cannot be sent cross-site without a CORS preflight, so a web page the user visits
    # cannot start generations with a "simple" text/plain or form POST.
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type != "application/json":
        raise APIError(415, f"send the body as JSON with 'Content-Type: application/json' (got "
                            f"{media_type or 'no content type'!r})", code="unsupported_media_type")
    limit = limits.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"request body is {declared} bytes; the limit is {limit}", code="request_too_large")
    body = bytearray()
    try:
        async with asyncio.timeout(limits.body_timeout):  # a body trickled byte by byte must not hold a socket
            async for part in request.stream():
                body += part
                if len(body) > limit:
                    raise APIError(413, f"request body exceeds the limit of {limit} bytes", code="request_too_large")
    except TimeoutError:
        raise APIError(408, f"the request body did not arrive within {limits.body_timeout:g} s",
                       code="request_timeout") from None
    except ClientDisconnect:  # nobody will read this answer; 499 is how it is counted (nginx's "client closed")
        raise APIError(499, "the client closed the connection while sending its request",
                       code="client_closed") from None
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"request body is not valid JSON: {e}") from None
    except RecursionError:
        raise APIError(400, "request body is not valid JSON: nested too deeply") from None
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object")
    return data


def _number(data: dict, name: str, default, lo: float, hi: float, integer: bool = False):
    value = data.get(name)
    if value is None:
        return default
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)) or \
            (isinstance(value, float) and not math.isfinite(value)):
        raise APIError(400, f"'{name}' must be {kind}", param=name)
    if not lo <= value <= hi:
        raise APIError(400, f"'{name}' must be between {lo} and {hi}, got {value}", param=name)
    return value


def _bool(data: dict, name: str, default: bool = False) -> bool:
    value = data.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise APIError(400, f"'{name}' must be true or false", param=name)
    return value


def sampling_params(data: dict, limits: Limits, default_max_tokens: int, vocab_size: int) -> SamplingParams:
    """Validate the OpenAI sampling fields shared by both completion routes."""
    _number(data, "n", 1, 1, 1, integer=True)  # one choice per request
    for unsupported in ("presence_penalty", "frequency_penalty"):
        if _number(data, unsupported, 0, -2, 2) != 0:
            raise APIError(400, f"'{unsupported}' is not supported; leave it at 0", param=unsupported)
    max_tokens = _number(data, "max_completion_tokens", None, 1, limits.max_tokens, integer=True)
    if max_tokens is None:
        max_tokens = _number(data, "max_tokens", default_max_tokens, 1, limits.max_tokens, integer=True)
    stop = data.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > limits.max_stop:
        raise APIError(400, f"'stop' must be a non-empty string or a list of at most {limits.max_stop} "
                            "non-empty strings", param="stop")
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=float(_number(data, "temperature", 1.0, 0, 2)),
        top_k=_number(data, "top_k", 0, 0, vocab_size, integer=True),
        top_p=float(_number(data, "top_p", 1.0, 0, 1)) or 1e-9,  # top_p 0 keeps only the most likely token
        seed=_number(data, "seed", None, -(2**63), 2**63 - 1, integer=True),
        stop=tuple(stop),
    )


def chat_messages(data: dict, limits: Limits) -> list[dict[str, str]]:
    """The `messages` field as [{"role", "content"}], text parts of content arrays joined, sizes checked."""
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list of {role, content} objects", param="messages")
    if len(messages) > limits.max_messages:
        raise APIError(400, f"{len(messages)} messages; the limit is {limits.max_messages}", param="messages")
    out, total = [], 0
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant"):
            raise APIError(400, f"messages[{i}] must have a role of system, user or assistant",
                           param=f"messages[{i}].role")
        content = m.get("content")
        if isinstance(content, list):  # the array form: only text parts are understood
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise APIError(400, f"messages[{i}].content parts must all be {{'type': 'text', 'text': ...}}",
                               param=f"messages[{i}].content")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise APIError(400, f"messages[{i}].content must be a string", param=f"messages[{i}].content")
        if len(content) > limits.max_message_chars:
            raise APIError(400, f"messages[{i}] has {len(content)} characters; the limit is {limits.max_message_chars}",
                           param=f"messages[{i}].content")
        total += len(content)
        role = "system" if m["role"] == "developer" else m["role"]  # newer clients call the system prompt "developer"
        out.append({"role": role, "content": content})
    if total > limits.max_total_chars:
        raise APIError(400, f"messages hold {total} characters in total; the limit is {limits.max_total_chars}",
                       param="messages")
    return out


def check_text_can_fit(chars: int, eng: Engine, param: str) -> None:
    """Refuse, without tokenizing it, text that needs more tokens than the context holds, however it is tokenized:
    it could never be a prompt, and tokenizing it costs time (the GIL) and memory (the tokenizer's chunk cache)."""
    at_least = -(-chars // eng.max_token_chars)
    if at_least >= eng.max_context:
        raise APIError(400, f"the prompt has {chars} characters, so at least {at_least} tokens, but the model's "
                            f"context is {eng.max_context} tokens: shorten it", param=param,
                       code="context_length_exceeded")


def check_prompt_fits(n_tokens: int, context: int, param: str) -> None:
    if n_tokens >= context:
        raise APIError(400, f"the prompt is {n_tokens} tokens long but the model's context is {context} tokens "
                            f"(and at least one must be left to answer): shorten it", param=param,
                       code="context_length_exceeded")


def check_chars(text: str, limit: int, param: str) -> None:
    if len(text) > limit:
        raise APIError(400, f"'{param}' has {len(text)} characters; the limit is {limit}", param=param)


# ---------------------------------------------------------------- what the handlers share

def state_of(request: Request) -> State:
    return request.app.state.serve


def shutting_down(state: State) -> APIError:
    return APIError(503, "the server is shutting down", type="server_error", code="shutting_down",
                    headers=state.retry_after())


def ready_engine(state: State) -> Engine:
    """The engine, or 503 while it loads, after it failed to load, and during shutdown."""
    if state.shutting_down:
        raise shutting_down(state)
    if state.engine is None:
        why = f"the model failed to load: {state.load_error}" if state.load_error else "the model is still loading"
        raise APIError(503, why, type="server_error", code="model_not_ready", headers=state.retry_after())
    return state.engine


def authorize(request: Request) -> None:
    key = state_of(request).api_key
    if key is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
        raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                       type="invalid_request_error", code="invalid_api_key")


def check_model(state: State, data: dict) -> None:
    model = data.get("model", state.model_name)
    if not isinstance(model, str):
        raise APIError(400, "'model' must be a string", param="model")
    if model != state.model_name:
        raise APIError(404, f"the model '{model}' does not exist; this server serves '{state.model_name}'",
                       param="model", code="model_not_found")


def include_usage(data: dict) -> bool:
    opts = data.get("stream_options")
    if opts is None:
        return False
    if not isinstance(opts, dict):
        raise APIError(400, "'stream_options' must be an object", param="stream_options")
    return _bool(opts, "include_usage")


async def tokenize_off_loop(state: State, fn: Callable, *args):
    """Tokenize in a thread, one request at a time: a dozen at once would hold the GIL in turns and stall
    the engine's decode steps, and through them every stream."""
    async with state.tokenizer_turn:
        return await asyncio.to_thread(fn, *args)


async def chat_prompt(state: State, eng: Engine, messages: list[dict[str, str]]) -> list[int]:
    """The token ids the model sees for a chat: refused before tokenizing if it cannot fit the context."""
    check_text_can_fit(sum(len(m["content"]) for m in messages), eng, "messages")
    try:
        return await tokenize_off_loop(state, render_prompt, eng.tokenizer, messages)
    except ChatFormatError as e:
        raise APIError(400, str(e), param="messages") from None


def start(state: State, eng: Engine, prompt: list[int], params: SamplingParams) -> Generation:
    try:
        return eng.submit(prompt, params, timeout=state.limits.request_timeout)
    except QueueFull as e:
        raise APIError(429, f"the server is busy ({e}); retry shortly", type="rate_limit_error",
                       code="queue_full", headers=state.retry_after()) from None
    except EngineClosed:
        raise shutting_down(state) from None


async def first_chunk(state: State, it: AsyncIterator[Chunk]) -> Chunk:
    """Wait for the first output before answering, so a request that timed out in the queue still gets a 503."""
    chunk = await anext(it)
    if chunk.finish_reason == "error":
        raise APIError(500, GENERATION_FAILED, type="server_error")
    if chunk.finish_reason == "timeout":
        raise APIError(503, "the request waited in the queue past the server's timeout; retry later",
                       type="server_error", code="timeout", headers=state.retry_after())
    if chunk.finish_reason == "shutdown":
        raise shutting_down(state)
    if chunk.finish_reason == "cancelled":  # the client left while queued: the answer goes nowhere
        raise APIError(499, "the client closed the connection", code="client_closed")
    return chunk


async def completion_request(request: Request) -> tuple[State, dict, Engine]:
    """What both completion routes check first, in this order: the API key, the body, the model name, the engine."""
    state = state_of(request)
    authorize(request)
    data = await read_json(request, state.limits)
    check_model(state, data)
    return state, data, ready_engine(state)


async def respond(request: Request, eng: Engine, data: dict, prompt: list[int], params: SamplingParams,
                  kind: str) -> Response:
    """Shared by chat and text completions: stream SSE chunks or collect one JSON answer."""
    state = state_of(request)
    stream = _bool(data, "stream")
    reply = Reply(kind, state.model_name, include_usage(data))
    gen = start(state, eng, prompt, params)
    it = aiter(gen)
    watcher = asyncio.ensure_future(_cancel_on_disconnect(request, gen))
    try:
        chunk = await first_chunk(state, it)
    except BaseException:
        gen.cancel()
        watcher.cancel()
        raise
    if not stream:
        try:
            parts = [chunk.text]
            while chunk.finish_reason is None:
                chunk = await anext(it)
                parts.append(chunk.text)
        finally:
            gen.cancel()  # a no-op once finished; frees the slot if this handler is torn down early
            watcher.cancel()
        if chunk.finish_reason == "error":
            raise APIError(500, GENERATION_FAILED, type="server_error")
        return JSONResponse(reply.completion("".join(parts), chunk))
    watcher.cancel()  # StreamingResponse watches for the disconnect itself and cancels the stream below
    return StreamingResponse(events(reply, gen, it, chunk), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def events(reply: Reply, gen: Generation, it: AsyncIterator[Chunk], first: Chunk) -> AsyncIterator[str]:
    """A generation as server-sent events, from its first chunk to `data: [DONE]`."""
    try:
        c = first
        if reply.kind == "chat":  # the first delta announces the role, as OpenAI's does
            yield _sse(reply.chunk({"role": "assistant", "content": ""}, None))
        while True:
            if c.text or c.finish_reason is None:
                yield _sse(reply.chunk({"content": c.text} if reply.kind == "chat" else c.text, None))
            if c.finish_reason is not None:
                break
            c = await anext(it)
        if c.finish_reason == "error":  # an error event, as OpenAI's streams send (its client raises)
            yield _sse({"error": {"message": GENERATION_FAILED, "type": "server_error", "param": None, "code": None}})
            yield "data: [DONE]\n\n"
            return
        yield _sse(reply.chunk({} if reply.kind == "chat" else "", _openai_reason(c.finish_reason)))
        if reply.with_usage:
            yield _sse({"id": reply.id, "object": reply.object(stream=True), "created": reply.created,
                        "model": reply.model, "choices": [], "usage": _usage(c)})
        yield "data: [DONE]\n\n"
    finally:
        gen.cancel()


# ---------------------------------------------------------------- the handlers

async def chat_completions(request: Request) -> Response:
    state, data, eng = await completion_request(request)
    messages = chat_messages(data, state.limits)
    params = sampling_params(data, state.limits, state.limits.default_max_tokens, eng.tokenizer.vocab_size)
    prompt = await chat_prompt(state, eng, messages)
    check_prompt_fits(len(prompt), eng.max_context, "messages")
    return await respond(request, eng, data, prompt, params, "chat")


async def completions(request: Request) -> Response:
    state, data, eng = await completion_request(request)
    prompt = data.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise APIError(400, "'prompt' must be a string (one prompt per request)", param="prompt")
    check_chars(prompt, state.limits.max_total_chars, "prompt")
    if _bool(data, "echo") or data.get("logprobs") not in (None, 0) or data.get("suffix") is not None:
        raise APIError(400, "'echo', 'logprobs' and 'suffix' are not supported", param="echo")
    params = sampling_params(data, state.limits, 16, eng.tokenizer.vocab_size)
    check_text_can_fit(len(prompt), eng, "prompt")
    # A document starts with <|bos|>, as in training.
    ids = [eng.tokenizer.bos_id] + await tokenize_off_loop(state, eng.tokenizer.encode, prompt)
    check_prompt_fits(len(ids), eng.max_context, "prompt")
    return await respond(request, eng, data, ids, params, "text")


def model_card(state: State) -> dict:
    return {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "scratchchat"}


async def list_models(request: Request) -> Response:
    authorize(request)
    return JSONResponse({"object": "list", "data": [model_card(state_of(request))]})


async def get_model(request: Request) -> Response:
    authorize(request)
    state, name = state_of(request), request.path_params["model"]
    if name != state.model_name:
        raise APIError(404, f"the model '{name}' does not exist", param="model", code="model_not_found")
    return JSONResponse(model_card(state))


async def tokenize(request: Request) -> Response:
    state = state_of(request)
    authorize(request)
    data = await read_json(request, state.limits)
    eng = ready_engine(state)
    if "messages" in data:
        ids = await chat_prompt(state, eng, chat_messages(data, state.limits))
    elif isinstance(data.get("text"), str):
        check_chars(data["text"], state.limits.max_total_chars, "text")
        check_text_can_fit(len(data["text"]), eng, "text")
        ids = await tokenize_off_loop(state, eng.tokenizer.encode, data["text"])
    else:
        raise APIError(400, "send {'text': str} or {'messages': [...]}", param="text")
    return JSONResponse({"tokens": ids, "count": len(ids), "max_context": eng.max_context})


async def health(request: Request) -> Response:
    state = state_of(request)
    if state.engine is None or state.shutting_down:
        status = "shutting_down" if state.shutting_down else ("error" if state.load_error else "loading")
        return JSONResponse({"status": status}, status_code=503, headers=state.retry_after())
    return JSONResponse({"status": "ok", "model": state.model_name, "active": state.engine.active,
                         "queued": state.engine.queued})


async def metrics(request: Request) -> Response:
    return PlainTextResponse(_prometheus(state_of(request)), media_type="text/plain; version=0.0.4")


async def openapi_document(request: Request) -> Response:
    return JSONResponse(openapi.schema(state_of(request).model_name, ENDPOINTS))


async def index(request: Request) -> Response:
    return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"),
                        headers={"Content-Security-Policy": "default-src 'self'; script-src 'unsafe-inline'; "
                                                            "style-src 'unsafe-inline'; img-src 'none'"})


# The one list of what the server answers: the app's routes, the OpenAPI document's paths and the /metrics route
# labels all come from it. (method, path, handler, its OpenAPI operation from serve/openapi.py)
ENDPOINTS = (
    ("GET", "/", index, openapi.INDEX),
    ("GET", "/health", health, openapi.HEALTH),
    ("GET", "/metrics", metrics, openapi.METRICS),
    ("GET", "/openapi.json", openapi_document, openapi.OPENAPI),
    ("POST", "/tokenize", tokenize, openapi.TOKENIZE),
    ("GET", "/v1/models", list_models, openapi.LIST_MODELS),
    ("GET", "/v1/models/{model:path}", get_model, openapi.GET_MODEL),
    ("POST", "/v1/chat/completions", chat_completions, openapi.CHAT_COMPLETIONS),
    ("POST", "/v1/completions", completions, openapi.COMPLETIONS),
)
ROUTES = [Route(path, handler, methods=[method]) for method, path, handler, _ in ENDPOINTS]
# /metrics counts requests by path; a path with a parameter (any model name) is counted under "other", so that
# clients cannot grow the label set without bound.
COUNTED_PATHS = frozenset(path for _, path, _, _ in ENDPOINTS if "{" not in path)


# ---------------------------------------------------------------- errors, startup and shutdown, the app

async def on_api_error(request: Request, exc: APIError) -> Response:
    return error_response(exc.status, exc.message, exc.type, exc.param, exc.code, exc.headers)


async def on_http_error(request: Request, exc: HTTPException) -> Response:
    messages = {404: f"no route {request.method} {request.url.path}",
                405: f"method {request.method} is not allowed on {request.url.path}"}
    message = messages.get(exc.status_code, exc.detail)
    return error_response(exc.status_code, message, code={404: "not_found"}.get(exc.status_code),
                          headers=dict(exc.headers or {}))


async def on_crash(request: Request, exc: Exception) -> Response:
    return error_response(500, f"internal error: {type(exc).__name__}", type="server_error")


@contextlib.asynccontextmanager
async def lifespan(app: Starlette):
    """Load the engine in a thread (so /health can answer 503 meanwhile); at shutdown, end its generations."""
    state: State = app.state.serve

    def load_in_thread() -> None:
        try:
            state.engine = state.load()
        except Exception as e:  # reported by /health and every route, never as a traceback
            state.load_error = str(e) or type(e).__name__
    threading.Thread(target=load_in_thread, name="scratchchat-load", daemon=True).start()
    yield
    state.shutting_down = True
    if state.engine is not None:
        state.engine.shutdown(grace=0)
        await asyncio.to_thread(state.engine.join, 5.0)


def create_app(load: Callable[[], Engine], *, limits: Limits | None = None, model_name: str = "scratchchat",
               api_key: str | None = None, cors_origins: list[str] | None = None,
               allowed_hosts: list[str] | None = None) -> Starlette:
    """The Starlette app. `load` builds the engine; it runs in a thread at startup so /health can say 503 meanwhile.

    `allowed_hosts`: Host names answered besides localhost and IP addresses ("*": any)."""
    state = State(load, limits or Limits(), model_name, api_key)
    middleware = [Middleware(_Count, state=state), Middleware(_HostCheck, allowed=set(allowed_hosts or []))]
    if cors_origins:
        middleware.append(Middleware(CORSMiddleware, allow_origins=cors_origins, allow_methods=["GET", "POST"],
                                     allow_headers=["Authorization", "Content-Type"]))
    app = Starlette(routes=ROUTES, middleware=middleware, lifespan=lifespan,
                    exception_handlers={APIError: on_api_error, HTTPException: on_http_error, Exception: on_crash})
    app.state.serve = state
    return app


class _Count:
    """ASGI middleware counting responses by route and status for /metrics (pure ASGI: streams pass untouched)."""

    def __init__(self, app, state: State) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def send_and_note(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            path = scope["path"] if scope["path"] in COUNTED_PATHS else "other"
            self.state.requests[(path, status)] += 1


class _HostCheck:
    """Answer only Host names this server is known by (DNS rebinding: a page on evil.example whose name then
    resolves to 127.0.0.1 would otherwise be same-origin with this API). IP addresses are always fine: a page
    can only make a browser send a Host it names, and no attacker's page is named by an IP of this server."""

    def __init__(self, app, allowed: set[str]) -> None:
        self.app, self.allowed = app, {"localhost"} | {h.lower().rstrip(".") for h in allowed}

    def host_ok(self, host: str) -> bool:
        name = host[1:].partition("]")[0] if host.startswith("[") else host.rpartition(":")[0] or host
        name = name.lower().rstrip(".")
        try:
            ipaddress.ip_address(name)
            return True
        except ValueError:
            return name in self.allowed or "*" in self.allowed

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            host = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"host"), "")
            if host and not self.host_ok(host):
                name = ascii(host)
                response = error_response(400, f"this server does not answer to the Host {name}: start it with "
                                               f"--allowed-host NAME to add a name", code="invalid_host")
                return await response(scope, receive, send)
        await self.app(scope, receive, send)




async def _cancel_on_disconnect(request: Request, gen: Generation) -> None:
    """Cancel a non-streamed generation when its client hangs up (the body is already read, so only
    a disconnect can arrive)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            gen.cancel()
            return


def _openai_reason(reason: str | None) -> str:
    return "stop" if reason == "stop" else "length"  # a cut-off (timeout, shutdown) reads as running out of room




def _usage(c: Chunk) -> dict:
    return {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
            "total_tokens": c.prompt_tokens + c.completion_tokens}


@dataclass
class Reply:
    """What every JSON answer and stream chunk of one completion repeats: its kind ("chat" or "text"), id, time."""
    kind: str
    model: str
    with_usage: bool  # stream_options.include_usage: every chunk has a usage slot, and a last chunk fills it
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.id = self.id or ("chatcmpl-" if self.kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]

    def object(self, stream: bool) -> str:
        if self.kind == "chat":
            return "chat.completion.chunk" if stream else "chat.completion"
        return "text_completion"

    def chunk(self, delta, finish: str | None) -> dict:
        """One stream chunk: `delta` is a chat delta object, or the text of a text completion."""
        choice = {"index": 0, "delta": delta} if self.kind == "chat" else {"index": 0, "text": delta}
        choice.update({"logprobs": None, "finish_reason": finish})
        out = {"id": self.id, "object": self.object(stream=True), "created": self.created, "model": self.model,
               "choices": [choice]}
        if self.with_usage:  # every chunk carries usage: null until the final usage chunk
            out["usage"] = None
        return out

    def completion(self, text: str, last: Chunk) -> dict:
        if self.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}}
        else:
            choice = {"index": 0, "text": text}
        choice.update({"logprobs": None, "finish_reason": _openai_reason(last.finish_reason)})
        return {"id": self.id, "object": self.object(stream=False), "created": self.created, "model": self.model,
                "choices": [choice], "usage": _usage(last)}


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _prometheus(state: State) -> str:
    """The Prometheus text exposition format, written out by hand (a few families, no client library)."""
    lines: list[str] = []

    def family(name: str, kind: str, help: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP {name} {help}")
        lines.append(f"# TYPE {name} {kind}")
        lines.extend(f"{name}{labels} {value:g}" if isinstance(value, float) else f"{name}{labels} {value}"
                     for labels, value in samples)

    family("scratchchat_requests_total", "counter", "HTTP requests answered, by route and status.",
           [(f'{{route="{r}",status="{s}"}}', n) for (r, s), n in sorted(state.requests.items())])
    e = state.engine
    family("scratchchat_model_loaded", "gauge", "1 once the model is loaded and serving.", [("", int(e is not None))])
    if e is not None:
        st = e.stats
        family("scratchchat_active_requests", "gauge", "Requests holding a batch slot.", [("", e.active)])
        family("scratchchat_queue_depth", "gauge", "Requests waiting for a slot.", [("", e.queued)])
        family("scratchchat_prompt_tokens_total", "counter", "Prompt tokens prefilled.", [("", st.prompt_tokens)])
        family("scratchchat_generated_tokens_total", "counter", "Tokens generated.", [("", st.generated_tokens)])
        family("scratchchat_generations_total", "counter", "Finished generations, by how they ended.",
               [(f'{{reason="{r}"}}', n) for r, n in sorted(st.finished.items())])
        family("scratchchat_tokens_per_second", "gauge", "Generated tokens per second over the last 10 s.",
               [("", float(round(st.tokens_per_second(), 3)))])
        buckets = [(f'{{le="{"+Inf" if math.isinf(b) else b}"}}', n) for b, n in zip(st.TTFT_BUCKETS, st.ttft_counts)]
        lines.append("# HELP scratchchat_time_to_first_token_seconds From arrival to the first generated token.")
        lines.append("# TYPE scratchchat_time_to_first_token_seconds histogram")
        lines.extend(f"scratchchat_time_to_first_token_seconds_bucket{lab} {n}" for lab, n in buckets)
        lines.append(f"scratchchat_time_to_first_token_seconds_sum {st.ttft_sum:g}")
        lines.append(f"scratchchat_time_to_first_token_seconds_count {st.ttft_count}")
    return "\n".join(lines) + "\n"

