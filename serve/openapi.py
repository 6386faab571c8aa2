"""The OpenAPI 3.1 description of every route the server answers: one operation per route.

It is served at /openapi.json; tests run schemathesis against it, so each status a route can answer and
each response shape is listed here. The number and boolean request fields come from serve.app's Param tables,
the same ones the handlers validate with.
"""

from __future__ import annotations

import re


def _object(required: list[str], properties: dict) -> dict:
    return {"type": "object", "required": required, "properties": properties}


def _or_null(schema: dict) -> dict:
    return {"oneOf": [{"type": "null"}, schema]}


_COUNT = {"type": "integer", "minimum": 0}
_STRING = {"type": "string"}
_ERROR = _object(
    ["error"],
    {
        "error": _object(
            ["message", "type", "param", "code"],
            {
                "message": _STRING,
                "type": _STRING,
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        )
    },
)

_USAGE = _object(
    ["prompt_tokens", "completion_tokens", "total_tokens"],
    {
        **{k: _COUNT for k in ("prompt_tokens", "completion_tokens", "total_tokens")},
        "prompt_tokens_details": {
            "type": "object",
            "properties": {
                "cached_tokens": {
                    **_COUNT,
                    "description": "Prompt tokens whose keys and values came from the prefix cache.",
                }
            },
        },
    },
)

# Our extension: calculator calls the model made, beside the prose it wrote (`offset`: a character index into it).
_CALLS = {
    "type": "array",
    "items": _object(
        ["expression", "result", "offset"],
        {
            "expression": _STRING,
            "result": _STRING,
            "offset": _COUNT,
            "index": {**_COUNT, "description": "Streaming only: the call's number in the choice."},
        },
    ),
}

_TOKEN = {
    "token": _STRING,
    "logprob": {"type": "number", "maximum": 0},
    "bytes": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 255}},
}
_CHAT_LOGPROBS = _or_null(
    _object(
        ["content"],
        {
            "content": {
                "type": "array",
                "items": _object(
                    ["token", "logprob", "bytes", "top_logprobs"],
                    {
                        **_TOKEN,
                        "top_logprobs": {
                            "type": "array",
                            "maxItems": 20,
                            "items": _object(["token", "logprob", "bytes"], _TOKEN),
                        },
                    },
                ),
            }
        },
    )
)
_TEXT_LOGPROBS = _or_null(
    _object(
        ["tokens", "token_logprobs", "top_logprobs", "text_offset"],
        {
            "tokens": {"type": "array", "items": _STRING},
            "token_logprobs": {"type": "array", "items": {"type": "number", "maximum": 0}},
            "top_logprobs": {"type": "array", "items": {"type": "object", "additionalProperties": {"type": "number"}}},
            "text_offset": {"type": "array", "items": _COUNT},
        },
    )
)

# Fields of both completion requests besides serve.app's Params.
_SAMPLING = {
    "model": {**_STRING, "description": "The served model's id (GET /v1/models); defaults to it."},
    "stop": {
        "oneOf": [
            {"type": "string", "minLength": 1},
            {"type": "array", "items": {"type": "string", "minLength": 1}, "maxItems": 4},
            {"type": "null"},
        ]
    },
    "stream_options": {"type": ["object", "null"], "properties": {"include_usage": {"type": ["boolean", "null"]}}},
    "user": _STRING,
}

_MESSAGE = _object(
    ["role", "content"],
    {
        "role": {"type": "string", "enum": ["system", "developer", "user", "assistant"]},
        "content": {
            "oneOf": [
                _STRING,
                {"type": "array", "items": _object(["type", "text"], {"type": {"const": "text"}, "text": _STRING})},
            ]
        },
        "calculator_calls": {
            **_CALLS,
            "description": "An assistant message's calculator calls, as answers give "
            "them: rendered back as tool tokens at their offsets.",
        },
    },
)

_CHAT_REQUEST = {
    "messages": {
        "type": "array",
        "items": _MESSAGE,
        "minItems": 1,
        "description": "Optional leading system message, then user/assistant turns alternating, ending with the "
        "user's.",
    },
}

_COMPLETION_REQUEST = {
    "prompt": {"oneOf": [_STRING, {"type": "array", "items": _STRING, "minItems": 1, "maxItems": 1}]},
    "echo": {"type": ["boolean", "null"], "description": "Not supported: must be false."},
    "suffix": {"type": "null", "description": "Not supported."},
}


def _param(p) -> dict:
    """A serve.app.Param's schema: null (absent) is always allowed, and means the default."""
    more = {"minimum": p.lo, "maximum": p.hi, "description": p.description}
    return {"type": [p.type, "null"], **{k: v for k, v in more.items() if v is not None}}


def _request(required: str, properties: dict, params: dict) -> dict:
    return _object([required], {**properties, **_SAMPLING, **{name: _param(p) for name, p in params.items()}})


def _completion(kind: str, truncated: str, content: str, choice: dict) -> dict:
    """A chat or text completion: `truncated` is the extension field saying what truncate_prompt_tokens dropped,
    `content` the field of `choice` that holds the answer."""
    return _object(
        ["id", "object", "created", "model", "choices", "usage"],
        {
            "id": _STRING,
            "object": {"const": kind},
            "created": {"type": "integer"},
            "model": _STRING,
            "usage": _USAGE,
            truncated: {**_COUNT, "description": "With truncate_prompt_tokens only."},
            "choices": {
                "type": "array",
                "minItems": 1,
                "maxItems": 8,
                "items": _object(
                    ["index", content, "finish_reason"],
                    {
                        "index": {"type": "integer"},
                        **choice,
                        "finish_reason": {"type": "string", "enum": ["stop", "length"]},
                    },
                ),
            },
        },
    )


_CHAT_COMPLETION = _completion(
    "chat.completion",
    "truncated_messages",
    "message",
    {
        "message": _object(
            ["role", "content"],
            {"role": {"const": "assistant"}, "content": _STRING, "calculator_calls": _CALLS},
        ),
        "logprobs": _CHAT_LOGPROBS,
    },
)
_TEXT_COMPLETION = _completion(
    "text_completion",
    "truncated_prompt_tokens",
    "text",
    {"text": _STRING, "logprobs": _TEXT_LOGPROBS, "calculator_calls": _CALLS},
)

# One server-sent event: `data:` holds a chunk's JSON (chat.completion.chunk or text_completion; with
# stream_options.include_usage a last chunk with empty choices and usage), and the last event is `[DONE]`. With n,
# choices[0].index says which sample a chunk belongs to. A calculator call is a chunk of its own, in order between
# content chunks: chat's delta is {"calculator_calls": [{"index", "expression", "result", "offset"}]}, a text
# completion's choice has "text": "" and "calculator_calls".
_SSE = _object(
    ["data"],
    {
        "data": {**_STRING, "description": "A chunk as JSON, or [DONE] at the end."},
        "event": _STRING,
        "id": _STRING,
        "retry": {"type": "integer"},
    },
)

_MODEL = _object(
    ["id", "object", "created", "owned_by"],
    {"id": _STRING, "object": {"const": "model"}, "created": {"type": "integer"}, "owned_by": _STRING},
)


def _json(schema: dict) -> dict:
    return {"content": {"application/json": {"schema": schema}}}


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _error(description: str, retry: bool = False) -> dict:
    out = {"description": description, **_json(_ref("Error"))}
    if retry:
        out["headers"] = {"Retry-After": {"schema": _STRING, "description": "Seconds to wait."}}
    return out


def _op(summary: str, responses: dict, auth: bool = False, **more) -> dict:
    """An operation; `auth`: it needs the API key when the server has one (401 otherwise)."""
    if auth:
        more["security"] = [{}, {"bearer": []}]
        responses = {**responses, "401": _error("Missing or wrong API key (when the server has one).")}
    return {"summary": summary, **more, "responses": responses}


_NOT_READY = {
    "503": _error(
        "The model is loading, the server is shutting down, or the request timed out waiting in the queue.", retry=True
    )
}
_BODY = {
    "400": _error("Invalid request: bad JSON, a field out of range, a prompt longer than the context."),
    "408": _error("Request body not received within --body-timeout seconds."),
    "413": _error("Request body larger than the server's limit (--max-body-bytes)."),
    "415": _error("Request body not sent as 'Content-Type: application/json'."),
}


def _body(schema: dict) -> dict:
    return {"required": True, **_json(schema)}


def _generate(summary: str, request: str, response: str) -> dict:
    ok = {
        "description": "The completion (JSON), or a stream of chunks when `stream` is true.",
        "content": {"application/json": {"schema": _ref(response)}, "text/event-stream": {"schema": _SSE}},
    }
    return _op(
        summary,
        {
            "200": ok,
            **_BODY,
            "404": _error("Unknown model."),
            "429": _error("Too many requests waiting (--max-queue).", retry=True),
            "500": _error("The forward pass failed (out of memory, say); the server keeps serving."),
            **_NOT_READY,
        },
        auth=True,
        requestBody=_body(_ref(request)),
    )


# One operation per endpoint; serve/app.py's ENDPOINTS pairs each with its path and method.
CHAT_COMPLETIONS = _generate("Chat completion", "ChatCompletionRequest", "ChatCompletion")
COMPLETIONS = _generate("Text completion of a raw prompt", "CompletionRequest", "Completion")
_MODELS = _object(["object", "data"], {"object": {"const": "list"}, "data": {"type": "array", "items": _ref("Model")}})
LIST_MODELS = _op("The served model", {"200": {"description": "One model.", **_json(_MODELS)}}, auth=True)
GET_MODEL = _op(
    "One model by id",
    {"200": {"description": "The model.", **_json(_ref("Model"))}, "404": _error("Unknown model.")},
    auth=True,
    parameters=[{"name": "model", "in": "path", "required": True, "schema": _STRING}],
)
_TOKENS = _object(
    ["tokens", "count", "max_context"],
    {"tokens": {"type": "array", "items": _COUNT}, "count": _COUNT, "max_context": {"type": "integer"}},
)
TOKENIZE = _op(
    "Token ids of a text, or of a chat prompt as the model will see it (400 for text too long to fit "
    "the context, refused without tokenizing it)",
    {"200": {"description": "The ids.", **_json(_TOKENS)}, **_BODY, **_NOT_READY},
    auth=True,
    requestBody=_body(
        {
            "oneOf": [
                _object(["text"], {"text": _STRING}),
                _object(["messages"], {"messages": {"type": "array", "items": _MESSAGE, "minItems": 1}}),
            ]
        }
    ),
)
_SERVING = _object(
    ["status"],
    {"status": {"const": "ok"}, "model": _STRING, "active": {"type": "integer"}, "queued": {"type": "integer"}},
)
HEALTH = _op(
    "200 once the model is loaded, 503 before and while shutting down",
    {
        "200": {"description": "Serving.", **_json(_SERVING)},
        "503": {
            "description": "Not serving (yet).",
            "headers": {"Retry-After": {"schema": _STRING}},
            **_json(_object(["status"], {"status": {"enum": ["loading", "error", "shutting_down"]}})),
        },
    },
)
METRICS = _op(
    "Prometheus metrics: requests, tokens, queue depth, time to first token, tokens/s, prefix cache hits",
    {"200": {"description": "Prometheus text format.", "content": {"text/plain": {"schema": _STRING}}}},
)
OPENAPI = _op("This document", {"200": {"description": "OpenAPI 3.1.", **_json({"type": "object"})}})
INDEX = _op(
    "The web chat page",
    {"200": {"description": "One self-contained HTML page.", "content": {"text/html": {"schema": _STRING}}}},
)


def schema(model_name: str, endpoints, chat_params: dict, text_params: dict) -> dict:
    """The document for GET /openapi.json: its paths from (method, path, handler, operation) endpoints, the
    request fields that are serve.app Params from each completion route's table of them."""
    paths: dict[str, dict] = {}
    for method, path, _, operation in endpoints:
        # Starlette's {name:convertor} is OpenAPI's {name}.
        paths.setdefault(re.sub(r"\{(\w+):\w+\}", r"{\1}", path), {})[method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "scratchchat",
            "version": "0.1.0",
            "description": f"OpenAI-compatible API serving '{model_name}', a model trained from scratch.",
        },
        "components": {
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "Needed only when the server runs with --api-key.",
                }
            },
            "schemas": {
                "Error": _ERROR,
                "ChatCompletionRequest": _request("messages", _CHAT_REQUEST, chat_params),
                "ChatCompletion": _CHAT_COMPLETION,
                "CompletionRequest": _request("prompt", _COMPLETION_REQUEST, text_params),
                "Completion": _TEXT_COMPLETION,
                "Model": _MODEL,
            },
        },
        "paths": paths,
    }
