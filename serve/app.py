"""The HTTP API: OpenAI-compatible chat and text completions over the engine, plus health, metrics, tokenize,
the OpenAPI schema and the web chat page.

Every error a client can cause answers {"error": {"message", "type", "param", "code"}} with a fitting status (429
and 503 with Retry-After; serve/openapi.py lists each route's). Streams are server-sent events ending with
`data: [DONE]`; a client that goes away cancels its generation, which frees its slot at the next step.

No request may hurt another: sampling fails per row, tokenization runs one request at a time (a long text
holds the GIL and would stall the engine thread's decode steps), and text that cannot fit the context is
refused before it is tokenized.

Beyond OpenAI's fields, answers may carry our extensions, which OpenAI clients ignore: `calculator_calls` (the
calls the model made, beside its prose), `truncated_messages` / `truncated_prompt_tokens` (with the opt-in
`truncate_prompt_tokens`) and usage.prompt_tokens_details.cached_tokens (from the prefix cache).

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
from serve.engine import (
    CalculatorCall,
    Chunk,
    Engine,
    EngineClosed,
    Generation,
    QueueFull,
    SamplingParams,
    TokenLogprob,
)
from tokenizer import Tokenizer

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
    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> Response:
        # ASCII JSON: a message quoting what the client sent (a model name holding a lone surrogate) always encodes.
        return Response(
            json.dumps(self.body()), status_code=self.status, headers=self.headers, media_type="application/json"
        )


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

    def unavailable(self, message: str, code: str, status: int = 503, type: str = "server_error") -> APIError:
        """A 503 (or 429) that the client may retry after Retry-After seconds."""
        return APIError(status, message, type=type, code=code, headers=self.retry_after())


# ---------------------------------------------------------------- request parsing and validation


async def read_json(request: Request, limits: Limits) -> dict:
    """The request body as a JSON object, refusing bodies over the size limit before reading all of them."""
    # A JSON content type cannot be sent cross-site without a CORS preflight, so a web page the user visits
    # cannot start generations with a "simple" text/plain or form POST.
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type != "application/json":
        raise APIError(
            415,
            f"send the body as JSON with 'Content-Type: application/json' (got {media_type or 'no content type'!r})",
            code="unsupported_media_type",
        )
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
        raise APIError(
            408, f"the request body did not arrive within {limits.body_timeout:g} s", code="request_timeout"
        ) from None
    except ClientDisconnect:  # nobody will read this answer; 499 is how it is counted (nginx's "client closed")
        raise APIError(
            499, "the client closed the connection while sending its request", code="client_closed"
        ) from None
    try:
        data = json.loads(body)
    except ValueError as e:  # UnicodeDecodeError too
        raise APIError(400, f"request body is not valid JSON: {e}") from None
    except RecursionError:
        raise APIError(400, "request body is not valid JSON: nested too deeply") from None
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object")
    return data


@dataclass(frozen=True)
class Param:
    """A number or boolean request field, written once: the handlers validate with it and the OpenAPI document
    describes it. `hi` None: no fixed maximum (the server's flags or the model set it per request)."""

    type: str  # JSON Schema's "integer", "number" or "boolean"
    lo: int | None = None
    hi: int | None = None
    description: str | None = None

    def read(self, data: dict, name: str, default=None, hi: int | None = None):
        """data[name] checked (`hi`: the maximum of this server), or `default` when it is absent or null."""
        value = data.get(name)
        if value is None:
            return default
        if self.type == "boolean":
            if not isinstance(value, bool):
                raise APIError(400, f"'{name}' must be true or false", param=name)
            return value
        integer = self.type == "integer"
        if (
            isinstance(value, bool)
            or not isinstance(value, int if integer else (int, float))
            or (isinstance(value, float) and not math.isfinite(value))
        ):
            raise APIError(400, f"'{name}' must be {'an integer' if integer else 'a number'}", param=name)
        hi = self.hi if hi is None else hi
        if not self.lo <= value <= hi:
            raise APIError(400, f"'{name}' must be between {self.lo} and {hi}, got {value}", param=name)
        return value


# The number and boolean fields of each completion route (top_k is our extension; the penalties are accepted only
# at 0). max_completion_tokens is read on both routes, as max_tokens's newer name, but described for chat only.
SAMPLING = {
    "n": Param(
        "integer",
        1,
        8,
        "Samples of the prompt (at most --max-batch), sharing one prefill; sample i draws with seed + i.",
    ),
    "max_tokens": Param(
        "integer", 1, description="Most tokens to generate (server limit: --max-tokens); the context may end it sooner."
    ),
    "temperature": Param("number", 0, 2, "0 = greedy."),
    "top_p": Param("number", 0, 1),
    "top_k": Param("integer", 0, description="0 = off."),
    "seed": Param("integer", -(2**63), 2**63 - 1),
    "truncate_prompt_tokens": Param(
        "integer",
        1,
        description="Opt-in truncation (vLLM's field; without it a prompt longer than the context is a 400): chat "
        "drops the oldest user/assistant pairs, keeping the system message and the last user message, until the "
        "prompt is at most this many tokens (`truncated_messages` says how many went); a raw prompt keeps <|bos|> "
        "and its last N-1 tokens (`truncated_prompt_tokens` says how many went). Less than the model's context.",
    ),
    "stream": Param("boolean"),
    "presence_penalty": Param("number", -2, 2, "Only 0 is supported."),
    "frequency_penalty": Param("number", -2, 2, "Only 0 is supported."),
}
CHAT = {
    **SAMPLING,
    "max_completion_tokens": Param("integer", 1),
    "logprobs": Param(
        "boolean",
        description="Log-probabilities of the answer's tokens: the model's log-softmax at temperature 1, before "
        "top_k/top_p.",
    ),
    "top_logprobs": Param("integer", 0, 20, "Likeliest alternatives per token; needs logprobs: true."),
}
TEXT = {
    **SAMPLING,
    "logprobs": Param("integer", 0, 5, "Log-probabilities of the tokens and this many alternatives each."),
}


def read(name: str, data: dict, default=None, hi: int | None = None, params: dict = CHAT):
    """A field of `params` (the chat table unless told), checked by its Param."""
    return params[name].read(data, name, default, hi)


def sampling_params(
    data: dict, limits: Limits, default_max_tokens: int, eng: Engine, logprobs: int | None
) -> SamplingParams:
    """Validate the OpenAI sampling fields shared by both completion routes (`logprobs`: each route's own field,
    already checked)."""
    n = read("n", data, 1)
    if n > eng.max_batch:
        raise APIError(
            400,
            f"'n' is {n} but this server decodes at most {eng.max_batch} sequences together (--max-batch)",
            param="n",
        )
    for unsupported in ("presence_penalty", "frequency_penalty"):
        if read(unsupported, data, 0) != 0:
            raise APIError(400, f"'{unsupported}' is not supported; leave it at 0", param=unsupported)
    max_tokens = read("max_completion_tokens", data, None, limits.max_tokens)
    if max_tokens is None:
        max_tokens = read("max_tokens", data, default_max_tokens, limits.max_tokens)
    stop = data.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > limits.max_stop:
        raise APIError(
            400,
            f"'stop' must be a non-empty string or a list of at most {limits.max_stop} non-empty strings",
            param="stop",
        )
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=float(read("temperature", data, 1.0)),
        top_k=read("top_k", data, 0, eng.tokenizer.vocab_size),
        top_p=float(read("top_p", data, 1.0)) or 1e-9,  # top_p 0 keeps only the most likely token
        seed=read("seed", data),
        stop=tuple(stop),
        n=n,
        logprobs=logprobs,
    )


def chat_logprobs(data: dict) -> int | None:
    """Chat's `logprobs` (bool) and `top_logprobs` (0..20, only with logprobs) as the engine's one number."""
    want = read("logprobs", data, False)
    top = read("top_logprobs", data)
    if top is not None and not want:
        raise APIError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    return (top or 0) if want else None


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
            raise APIError(
                400, f"messages[{i}] must have a role of system, user or assistant", param=f"messages[{i}].role"
            )
        content = m.get("content")
        if isinstance(content, list):  # the array form: only text parts are understood
            if not all(
                isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
            ):
                raise APIError(
                    400,
                    f"messages[{i}].content parts must all be {{'type': 'text', 'text': ...}}",
                    param=f"messages[{i}].content",
                )
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise APIError(400, f"messages[{i}].content must be a string", param=f"messages[{i}].content")
        if len(content) > limits.max_message_chars:
            raise APIError(
                400,
                f"messages[{i}] has {len(content)} characters; the limit is {limits.max_message_chars}",
                param=f"messages[{i}].content",
            )
        role = "system" if m["role"] == "developer" else m["role"]  # newer clients call the system prompt "developer"
        out.append({"role": role, "content": content})
        if m.get("calculator_calls") is not None:  # finetune.chat validates them and renders them as tool tokens
            out[-1]["calculator_calls"] = m["calculator_calls"]
        total += text_chars(out[-1])
    if total > limits.max_total_chars:
        raise APIError(
            400, f"messages hold {total} characters in total; the limit is {limits.max_total_chars}", param="messages"
        )
    return out


def text_chars(message: dict) -> int:
    """The characters of a message that get tokenized: its content and its calculator calls' text (the calls are
    validated later, by finetune.chat; fields that are not strings are refused there, before any tokenizing)."""
    calls = message.get("calculator_calls")
    return len(message["content"]) + sum(
        len(v)
        for c in (calls if isinstance(calls, list) else [])
        if isinstance(c, dict)
        for v in (c.get("expression"), c.get("result"))
        if isinstance(v, str)
    )


def too_long(message: str, param: str) -> APIError:
    return APIError(400, message, param=param, code="context_length_exceeded")


def check_text_can_fit(chars: int, eng: Engine, param: str) -> None:
    """Refuse, without tokenizing it, text that needs more tokens than the context holds, however it is tokenized:
    it could never be a prompt, and tokenizing it costs time (the GIL) and memory (the tokenizer's chunk cache)."""
    at_least = -(-chars // eng.max_token_chars)
    if at_least >= eng.max_context:
        raise too_long(
            f"the prompt has {chars} characters, so at least {at_least} tokens, but the model's "
            f"context is {eng.max_context} tokens: shorten it",
            param,
        )


def check_prompt_fits(n_tokens: int, context: int, param: str) -> None:
    if n_tokens >= context:
        raise too_long(
            f"the prompt is {n_tokens} tokens long but the model's context is {context} tokens "
            f"(and at least one must be left to answer): shorten it",
            param,
        )


def check_chars(text: str, limit: int, param: str) -> None:
    if len(text) > limit:
        raise APIError(400, f"'{param}' has {len(text)} characters; the limit is {limit}", param=param)


# ---------------------------------------------------------------- what the handlers share


def state_of(request: Request) -> State:
    return request.app.state.serve


def shutting_down(state: State) -> APIError:
    return state.unavailable("the server is shutting down", "shutting_down")


def ready_engine(state: State) -> Engine:
    """The engine, or 503 while it loads, after it failed to load, and during shutdown."""
    if state.shutting_down:
        raise shutting_down(state)
    if state.engine is None:
        why = f"the model failed to load: {state.load_error}" if state.load_error else "the model is still loading"
        raise state.unavailable(why, "model_not_ready")
    return state.engine


def authorize(request: Request) -> None:
    key = state_of(request).api_key
    if key is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
        raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")


def check_model(state: State, data: dict) -> None:
    model = data.get("model", state.model_name)
    if not isinstance(model, str):
        raise APIError(400, "'model' must be a string", param="model")
    if model != state.model_name:
        raise APIError(
            404,
            f"the model '{model}' does not exist; this server serves '{state.model_name}'",
            param="model",
            code="model_not_found",
        )


def include_usage(data: dict) -> bool:
    opts = data.get("stream_options")
    if opts is None:
        return False
    if not isinstance(opts, dict):
        raise APIError(400, "'stream_options' must be an object", param="stream_options")
    return Param("boolean").read(opts, "include_usage", False)


async def tokenize_off_loop(state: State, fn: Callable, *args):
    """Tokenize in a thread, one request at a time: a dozen at once would hold the GIL in turns and stall
    the engine's decode steps, and through them every stream."""
    async with state.tokenizer_turn:
        return await asyncio.to_thread(fn, *args)


def fit_prompt(tok, messages: list[dict], limit: int | None) -> tuple[list[int], int]:
    """The chat prompt's ids and how many messages were dropped to fit `limit` tokens: the oldest user/assistant
    pairs go first; the system message and the last user message always stay."""
    ids = render_prompt(tok, messages)
    system = messages[:1] if messages[0]["role"] == "system" else []
    turns, dropped = messages[len(system) :], 0
    while limit is not None and len(ids) > limit and len(turns) > 1:
        turns, dropped = turns[2:], dropped + 2
        ids = render_prompt(tok, system + turns)
    return ids, dropped


async def chat_prompt(
    state: State, eng: Engine, messages: list[dict], limit: int | None = None
) -> tuple[list[int], int]:
    """The token ids the model sees for a chat, and the messages dropped to fit `limit` tokens (None: strict, and
    refused before tokenizing if it cannot fit the context)."""
    if limit is None:
        check_text_can_fit(sum(map(text_chars, messages)), eng, "messages")
    try:
        ids, dropped = await tokenize_off_loop(state, fit_prompt, eng.tokenizer, messages, limit)
    except ChatFormatError as e:
        raise APIError(400, str(e), param="messages") from None
    if limit is not None and len(ids) > limit:
        raise too_long(
            f"the system message and the last user message alone are {len(ids)} tokens, more than "
            f"truncate_prompt_tokens ({limit})",
            "truncate_prompt_tokens",
        )
    return ids, dropped


def start(state: State, eng: Engine, prompt: list[int], params: SamplingParams) -> Generation:
    try:
        return eng.submit(prompt, params, timeout=state.limits.request_timeout)
    except QueueFull as e:
        raise state.unavailable(
            f"the server is busy ({e}); retry shortly", "queue_full", 429, "rate_limit_error"
        ) from None
    except EngineClosed:
        raise shutting_down(state) from None


async def first_chunk(state: State, it: AsyncIterator[Chunk]) -> Chunk:
    """Wait for the first output before answering, so a request that timed out in the queue still gets a 503."""
    chunk = await anext(it)
    if chunk.finish_reason == "error":
        raise APIError(500, GENERATION_FAILED, type="server_error")
    if chunk.finish_reason == "timeout":
        raise state.unavailable("the request waited in the queue past the server's timeout; retry later", "timeout")
    if chunk.finish_reason == "shutdown":
        raise shutting_down(state)
    if chunk.finish_reason == "cancelled":  # the client left while queued: the answer goes nowhere
        raise APIError(499, "the client closed the connection", code="client_closed")
    return chunk


async def posted(request: Request, has_model: bool = True) -> tuple[State, dict, Engine]:
    """What the POST routes check first, in this order: the API key, the body, its model name (`has_model`: the
    completion routes), the engine."""
    state = state_of(request)
    authorize(request)
    data = await read_json(request, state.limits)
    if has_model:
        check_model(state, data)
    return state, data, ready_engine(state)


async def respond(
    request: Request,
    eng: Engine,
    data: dict,
    prompt: list[int],
    params: SamplingParams,
    kind: str,
    extra: dict | None = None,
) -> Response:
    """Shared by chat and text completions: stream SSE chunks or collect one JSON answer. `extra`: our extension
    fields, repeated at the top level of the answer and of every chunk."""
    state = state_of(request)
    stream = read("stream", data, False)
    reply = Reply(kind, state.model_name, include_usage(data), eng.tokenizer, extra or {}, params.logprobs is not None)
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
        samples = [Sample() for _ in range(params.n)]
        try:
            while True:
                samples[chunk.index].add(chunk)
                if chunk.finish_reason == "error":
                    raise APIError(500, GENERATION_FAILED, type="server_error")
                chunk = await anext(it, None)
                if chunk is None:
                    break
        finally:
            gen.cancel()  # a no-op once finished; frees the slots if this handler is torn down early
            watcher.cancel()
        return JSONResponse(reply.completion(samples))
    watcher.cancel()  # StreamingResponse watches for the disconnect itself and cancels the stream below
    return StreamingResponse(
        events(reply, gen, it, chunk, params.n),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def events(reply: Reply, gen: Generation, it: AsyncIterator[Chunk], first: Chunk, n: int) -> AsyncIterator[str]:
    """A generation's n samples as server-sent events, from their first chunks to `data: [DONE]`."""
    try:
        samples = [Sample() for _ in range(n)]
        if reply.kind == "chat":  # the first delta of each choice announces the role, as OpenAI's does
            for i in range(n):
                yield _sse(reply.chunk(i, {"role": "assistant", "content": ""}))
        c: Chunk | None = first
        while c is not None:
            s = samples[c.index]
            if c.finish_reason == "error":  # an error event, as OpenAI's streams send (its client raises)
                yield _sse(APIError(500, GENERATION_FAILED, type="server_error").body())
                yield "data: [DONE]\n\n"
                return
            if c.text or c.logprobs:
                logprobs = reply.logprobs(c.logprobs, len(s.text)) if reply.logprobs_on else None
                yield _sse(reply.chunk(c.index, {"content": c.text}, logprobs=logprobs))
            if c.calls:
                calls = [reply.call(call, len(s.calls) + k) for k, call in enumerate(c.calls)]
                yield _sse(reply.chunk(c.index, {"calculator_calls": calls}))
            s.add(c)
            if c.finish_reason is not None:
                yield _sse(reply.chunk(c.index, {}, _openai_reason(c.finish_reason)))
            c = await anext(it, None)
        if reply.with_usage:
            yield _sse({**reply.head(stream=True), "choices": [], "usage": _usage(samples), **reply.extra})
        yield "data: [DONE]\n\n"
    finally:
        gen.cancel()


# ---------------------------------------------------------------- the handlers


async def chat_completions(request: Request) -> Response:
    state, data, eng = await posted(request)
    messages = chat_messages(data, state.limits)
    params = sampling_params(data, state.limits, state.limits.default_max_tokens, eng, chat_logprobs(data))
    limit = read("truncate_prompt_tokens", data, None, eng.max_context - 1)  # vLLM's: the most prompt tokens to keep
    prompt, dropped = await chat_prompt(state, eng, messages, limit)
    check_prompt_fits(len(prompt), eng.max_context, "messages")
    return await respond(
        request, eng, data, prompt, params, "chat", None if limit is None else {"truncated_messages": dropped}
    )


async def completions(request: Request) -> Response:
    state, data, eng = await posted(request)
    prompt = data.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise APIError(400, "'prompt' must be a string (one prompt per request)", param="prompt")
    check_chars(prompt, state.limits.max_total_chars, "prompt")
    for unsupported in ("echo", "suffix"):
        if data.get(unsupported) not in (None, False):
            raise APIError(400, f"'{unsupported}' is not supported", param=unsupported)
    logprobs = read("logprobs", data, params=TEXT)  # the legacy field: alternatives per token
    params = sampling_params(data, state.limits, 16, eng, logprobs)
    limit = read("truncate_prompt_tokens", data, None, eng.max_context - 1)
    if limit is None:
        check_text_can_fit(len(prompt), eng, "prompt")
    # A document starts with <|bos|>, as in training; truncation keeps it and the last limit - 1 tokens after it.
    text = await tokenize_off_loop(state, eng.tokenizer.encode, prompt)
    keep = len(text) if limit is None else min(len(text), limit - 1)
    ids = [eng.tokenizer.bos_id] + text[len(text) - keep :]
    check_prompt_fits(len(ids), eng.max_context, "prompt")
    extra = None if limit is None else {"truncated_prompt_tokens": len(text) - keep}
    return await respond(request, eng, data, ids, params, "text", extra)


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
    state, data, eng = await posted(request, has_model=False)
    if "messages" in data:
        ids, _ = await chat_prompt(state, eng, chat_messages(data, state.limits))
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
    return JSONResponse(
        {"status": "ok", "model": state.model_name, "active": state.engine.active, "queued": state.engine.queued}
    )


async def metrics(request: Request) -> Response:
    return PlainTextResponse(_prometheus(state_of(request)), media_type="text/plain; version=0.0.4")


async def openapi_document(request: Request) -> Response:
    return JSONResponse(openapi.schema(state_of(request).model_name, ENDPOINTS, CHAT, TEXT))


async def index(request: Request) -> Response:
    return HTMLResponse(
        (STATIC / "index.html").read_text(encoding="utf-8"),
        headers={
            "Content-Security-Policy": "default-src 'self'; script-src 'unsafe-inline'; "
            "style-src 'unsafe-inline'; img-src 'none'"
        },
    )


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
    return exc.response()


async def on_http_error(request: Request, exc: HTTPException) -> Response:
    messages = {
        404: f"no route {request.method} {request.url.path}",
        405: f"method {request.method} is not allowed on {request.url.path}",
    }
    message = messages.get(exc.status_code, exc.detail)
    code = {404: "not_found"}.get(exc.status_code)
    return APIError(exc.status_code, message, code=code, headers=dict(exc.headers or {})).response()


async def on_crash(request: Request, exc: Exception) -> Response:
    return APIError(500, f"internal error: {type(exc).__name__}", type="server_error").response()


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


def create_app(
    load: Callable[[], Engine],
    *,
    limits: Limits | None = None,
    model_name: str = "scratchchat",
    api_key: str | None = None,
    cors_origins: list[str] | None = None,
    allowed_hosts: list[str] | None = None,
) -> Starlette:
    """The Starlette app. `load` builds the engine; it runs in a thread at startup so /health can say 503 meanwhile.

    `allowed_hosts`: Host names answered besides localhost and IP addresses ("*": any)."""
    state = State(load, limits or Limits(), model_name, api_key)
    middleware = [Middleware(_Count, state=state), Middleware(_HostCheck, allowed=set(allowed_hosts or []))]
    if cors_origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=cors_origins,
                allow_methods=["GET", "POST"],
                allow_headers=["Authorization", "Content-Type"],
            )
        )
    app = Starlette(
        routes=ROUTES,
        middleware=middleware,
        lifespan=lifespan,
        exception_handlers={APIError: on_api_error, HTTPException: on_http_error, Exception: on_crash},
    )
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
                message = f"this server does not answer to the Host {ascii(host)}: start it with --allowed-host NAME"
                error = APIError(400, message + " to add a name", code="invalid_host")
                return await error.response()(scope, receive, send)
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


def _usage(samples: list[Sample]) -> dict:
    last = [s.last for s in samples if s.last is not None]
    prompt, cached = last[0].prompt_tokens, last[0].cached_tokens
    completion = sum(c.completion_tokens for c in last)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


@dataclass
class Sample:
    """One choice's output so far, gathered from its chunks."""

    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    calls: list[CalculatorCall] = field(default_factory=list)
    last: Chunk | None = None

    def add(self, c: Chunk) -> None:
        self.text += c.text
        self.logprobs += c.logprobs
        self.calls += c.calls
        if c.finish_reason is not None:
            self.last = c


@dataclass
class Reply:
    """What every JSON answer and stream chunk of one completion repeats: its kind ("chat" or "text"), id, time,
    and how it spells tokens for logprobs."""

    kind: str
    model: str
    with_usage: bool  # stream_options.include_usage: every chunk has a usage slot, and a last chunk fills it
    tokenizer: Tokenizer
    extra: dict  # our extension fields (truncation), at the top level of each answer
    logprobs_on: bool  # the request asked for logprobs

    def __post_init__(self) -> None:
        self.id = ("chatcmpl-" if self.kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.specials = {i: name for name, i in self.tokenizer.special_tokens.items()}

    def head(self, stream: bool) -> dict:
        """The fields every answer and chunk starts with."""
        kind = "text_completion" if self.kind == "text" else "chat.completion.chunk" if stream else "chat.completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def choice(self, index: int, key: str, said: dict, logprobs: dict | None, finish: str | None) -> dict:
        """A choice, given as what chat puts under `key` (delta or message): a text completion's choice has that
        content as "text", and the calculator calls beside it."""
        choice = {"index": index, "logprobs": logprobs, "finish_reason": finish}
        if self.kind == "chat":
            choice[key] = said
        else:
            choice["text"] = said.get("content", "")
            if "calculator_calls" in said:
                choice["calculator_calls"] = said["calculator_calls"]
        return choice

    def chunk(self, index: int, delta: dict, finish: str | None = None, logprobs: dict | None = None) -> dict:
        """One stream chunk, given as its chat delta."""
        choice = self.choice(index, "delta", delta, logprobs, finish)
        out = {**self.head(stream=True), "choices": [choice], **self.extra}
        if self.with_usage:  # every chunk carries usage: null until the final usage chunk
            out["usage"] = None
        return out

    def completion(self, samples: list[Sample]) -> dict:
        choices = []
        for i, s in enumerate(samples):
            message = {"role": "assistant", "content": s.text}
            if s.calls:
                message["calculator_calls"] = [self.call(c) for c in s.calls]
            logprobs = self.logprobs(s.logprobs, 0) if self.logprobs_on else None
            choices.append(self.choice(i, "message", message, logprobs, _openai_reason(s.last.finish_reason)))
        return {**self.head(stream=False), "choices": choices, "usage": _usage(samples), **self.extra}

    def token(self, i: int) -> tuple[str, list[int]]:
        """A token as OpenAI shows it: its text (U+FFFD for a partial UTF-8 character) and its bytes."""
        data = self.tokenizer.token_bytes(i)
        return (self.specials[i] if i in self.specials else data.decode("utf-8", "replace")), list(data)

    def logprobs(self, lps: list[TokenLogprob], offset: int) -> dict:
        """OpenAI's logprobs object for these tokens: chat's {"content": [...]}, or the legacy completions shape
        whose text_offset counts characters of the completion's text from `offset`."""
        if self.kind == "chat":

            def entry(i: int, lp: float) -> dict:
                text, data = self.token(i)
                return {"token": text, "logprob": lp, "bytes": data}

            return {
                "content": [
                    {**entry(t.token, t.logprob), "top_logprobs": [entry(i, lp) for i, lp in t.top]} for t in lps
                ]
            }
        tokens = [self.token(t.token)[0] for t in lps]
        offsets = []
        for text in tokens:
            offsets.append(offset)
            offset += len(text)
        return {
            "tokens": tokens,
            "token_logprobs": [t.logprob for t in lps],
            "top_logprobs": [{self.token(i)[0]: lp for i, lp in t.top} for t in lps],
            "text_offset": offsets,
        }

    def call(self, c: CalculatorCall, index: int | None = None) -> dict:
        out = {"expression": c.expression, "result": c.result, "offset": c.offset}
        return out if index is None else {"index": index, **out}


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _prometheus(state: State) -> str:
    """The Prometheus text exposition format, written out by hand (a few families, no client library)."""
    lines: list[str] = []

    def family(name: str, kind: str, help: str, samples: list[tuple[str, float]]) -> None:
        """`samples`: (what follows the name: a histogram's suffix and labels, value)."""
        name = "scratchchat_" + name
        lines.extend([f"# HELP {name} {help}", f"# TYPE {name} {kind}"])
        lines.extend(
            f"{name}{labels} {value:g}" if isinstance(value, float) else f"{name}{labels} {value}"
            for labels, value in samples
        )

    def one(name: str, kind: str, help: str, value: float) -> None:
        family(name, kind, help, [("", value)])

    requests = [(f'{{route="{r}",status="{s}"}}', n) for (r, s), n in sorted(state.requests.items())]
    family("requests_total", "counter", "HTTP requests answered, by route and status.", requests)
    e = state.engine
    one("model_loaded", "gauge", "1 once the model is loaded and serving.", int(e is not None))
    if e is None:
        return "\n".join(lines) + "\n"
    st = e.stats
    one("active_requests", "gauge", "Requests holding a batch slot.", e.active)
    one("queue_depth", "gauge", "Requests waiting for a slot.", e.queued)
    one("prompt_tokens_total", "counter", "Prompt tokens prefilled.", st.prompt_tokens)
    one("generated_tokens_total", "counter", "Tokens generated.", st.generated_tokens)
    reasons = [(f'{{reason="{r}"}}', n) for r, n in sorted(st.finished.items())]
    family("generations_total", "counter", "Finished generations, by how they ended.", reasons)
    if e.prefix_cache is not None:
        one("prefix_cache_lookups_total", "counter", "Prompts looked up in the prefix cache.", st.prefix_lookups)
        one("prefix_cache_hits_total", "counter", "Prompts that reused cached keys and values.", st.prefix_hits)
        help = "Prompt tokens taken from the prefix cache instead of prefilled."
        one("prefix_cache_reused_tokens_total", "counter", help, st.prefix_reused_tokens)
        one("prefix_cache_bytes", "gauge", "Bytes of keys and values held by the prefix cache.", e.prefix_cache.bytes)
    help = "Generated tokens per second over the last 10 s."
    one("tokens_per_second", "gauge", help, float(round(st.tokens_per_second(), 3)))
    buckets = [
        (f'_bucket{{le="{"+Inf" if math.isinf(b) else b}"}}', n) for b, n in zip(st.TTFT_BUCKETS, st.ttft_counts)
    ]
    totals = [("_sum", float(st.ttft_sum)), ("_count", st.ttft_count)]
    family("time_to_first_token_seconds", "histogram", "From arrival to the first generated token.", buckets + totals)
    return "\n".join(lines) + "\n"
