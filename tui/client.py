"""A minimal streaming client for any OpenAI-compatible chat server, on httpx.

Only two calls are needed: list the models, and stream a chat completion. Retries are off
(httpx never retries a request) so the UI decides what a failure means; every failure
surfaces as one `ServerError` whose message is fit to show to a person.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx


class ServerError(Exception):
    """A request failed; `str(err)` is a one-line explanation for the user.

    `status` is the HTTP status (None for an error inside a stream) and `code` the OpenAI error code if the
    server sent one, e.g. "context_length_exceeded", which the app answers by sending fewer turns."""

    def __init__(self, message: str, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code = status, code


@dataclass(frozen=True)
class Usage:
    """Token counts from the stream's final usage chunk."""

    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class CalculatorCall:
    """The model called the calculator at `offset` (a character index into the answer's content)."""

    expression: str
    result: str
    offset: int


@dataclass(frozen=True)
class Finish:
    """Why the server stopped generating ("stop", "length", ...)."""

    reason: str


def make_http(base_url: str, api_key: str = "", timeout: float = 60.0) -> httpx.AsyncClient:
    """`timeout` bounds connecting and the wait for each chunk, not the whole answer: a long answer streams fine
    while a stalled server is caught."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return httpx.AsyncClient(
        base_url=base_url.rstrip("/") + "/",
        headers=headers,
        timeout=httpx.Timeout(timeout, connect=min(timeout, 5.0)),
    )


def _server_error(response_status: int | None, body: bytes) -> ServerError:
    """The OpenAI error body's message (and code) if there is one, else the start of the raw body.

    `response_status` is None for an error sent inside a stream that began with 200."""
    detail, code = body.decode("utf-8", "replace").strip(), None
    try:
        err = json.loads(detail)["error"]
        detail = err["message"] if isinstance(err, dict) else str(err)
        code = err.get("code") if isinstance(err, dict) else None
    except (ValueError, KeyError, TypeError):
        detail = detail[:200] or "(empty body)"
    message = f"server error {response_status}: {detail}" if response_status else f"server error: {detail}"
    return ServerError(message, response_status, code if isinstance(code, str) else None)


def _describe(exc: httpx.HTTPError, base_url: str) -> str:
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
        return f"cannot reach the server at {base_url.rstrip('/')}"
    if isinstance(exc, httpx.TimeoutException):
        return "the server timed out (no data within the time limit)"
    if isinstance(exc, httpx.RemoteProtocolError | httpx.ReadError):
        return "the connection dropped mid-answer"
    return f"request failed: {exc.__class__.__name__}: {exc}"


async def list_models(http: httpx.AsyncClient) -> list[str]:
    """The ids the server lists under /models."""
    try:
        r = await http.get("models")
    except httpx.HTTPError as exc:
        raise ServerError(_describe(exc, str(http.base_url))) from None
    if r.status_code >= 400:
        raise _server_error(r.status_code, r.content)
    try:
        return [m["id"] for m in r.json()["data"]]
    except (ValueError, KeyError, TypeError):
        raise ServerError("server sent an invalid /models response") from None


async def stream_chat(http: httpx.AsyncClient, payload: dict) -> AsyncIterator[str | CalculatorCall | Usage | Finish]:
    """POST /chat/completions with stream=true; yield text deltas and calculator calls, then Finish and Usage.

    A stream that ends without `data: [DONE]` counts as a dropped connection: the answer may be cut short."""
    body = {**payload, "stream": True, "stream_options": {"include_usage": True}}
    try:
        async with http.stream("POST", "chat/completions", json=body) as r:
            if r.status_code >= 400:
                raise _server_error(r.status_code, await r.aread())
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue  # SSE comments, event names and blank separators
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                try:
                    chunk = json.loads(data)
                except ValueError:
                    raise ServerError(f"server sent invalid JSON: {data[:80]!r}") from None
                if not isinstance(chunk, dict):
                    raise ServerError(f"server sent an unexpected chunk: {data[:80]!r}")
                if "error" in chunk:
                    raise _server_error(None, data.encode())
                for choice in chunk.get("choices") or []:
                    delta = choice.get("delta") or {}
                    if text := delta.get("content"):
                        yield text
                    for call in delta.get("calculator_calls") or []:  # scratchchat's extension of the delta
                        try:
                            yield CalculatorCall(str(call["expression"]), str(call["result"]), int(call["offset"]))
                        except (KeyError, TypeError, ValueError):
                            raise ServerError(f"server sent an invalid calculator call: {call!r:.80}") from None
                    if choice.get("finish_reason"):
                        yield Finish(choice["finish_reason"])
                if usage := chunk.get("usage"):
                    yield Usage(int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0)))
    except httpx.HTTPError as exc:
        raise ServerError(_describe(exc, str(http.base_url))) from None
    raise ServerError("the connection dropped mid-answer (stream ended without [DONE])")
