"""The OpenAPI 3.1 description of every route the server answers, written by hand: one operation per route.

It is served at /openapi.json; tests run schemathesis against it, so each status a route can answer and
each response shape is listed here.
"""

from __future__ import annotations

import re

_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}

_USAGE = {
    "type": "object",
    "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
    "properties": {
        **{k: {"type": "integer", "minimum": 0} for k in ("prompt_tokens", "completion_tokens", "total_tokens")},
        "prompt_tokens_details": {
            "type": "object",
            "properties": {
                "cached_tokens": {
                    "type": "integer",
                    "minimum": 0,
                    "description": "Prompt tokens whose keys and values came from the prefix cache.",
                }
            },
        },
    },
}

# Our extension: calculator calls the model made, beside the prose it wrote (`offset`: a character index into it).
_CALL = {
    "type": "object",
    "required": ["expression", "result", "offset"],
    "properties": {
        "expression": {"type": "string"},
        "result": {"type": "string"},
        "offset": {"type": "integer", "minimum": 0},
        "index": {"type": "integer", "minimum": 0, "description": "Streaming only: the call's number in the choice."},
    },
}
_CALLS = {"type": "array", "items": _CALL}

_TOKEN = {
    "token": {"type": "string"},
    "logprob": {"type": "number", "maximum": 0},
    "bytes": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 255}},
}
_CHAT_LOGPROBS = {
    "oneOf": [
        {"type": "null"},
        {
            "type": "object",
            "required": ["content"],
            "properties": {
                "content": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["token", "logprob", "bytes", "top_logprobs"],
                        "properties": {
                            **_TOKEN,
                            "top_logprobs": {
                                "type": "array",
                                "maxItems": 20,
                                "items": {
                                    "type": "object",
                                    "required": ["token", "logprob", "bytes"],
                                    "properties": _TOKEN,
                                },
                            },
                        },
                    },
                }
            },
        },
    ]
}
_TEXT_LOGPROBS = {
    "oneOf": [
        {"type": "null"},
        {
            "type": "object",
            "required": ["tokens", "token_logprobs", "top_logprobs", "text_offset"],
            "properties": {
                "tokens": {"type": "array", "items": {"type": "string"}},
                "token_logprobs": {"type": "array", "items": {"type": "number", "maximum": 0}},
                "top_logprobs": {
                    "type": "array",
                    "items": {"type": "object", "additionalProperties": {"type": "number"}},
                },
                "text_offset": {"type": "array", "items": {"type": "integer", "minimum": 0}},
            },
        },
    ]
}

_FINISH = {"type": "string", "enum": ["stop", "length"]}

# Sampling fields shared by both completion routes (top_k is our extension; penalties are accepted only at 0).
_SAMPLING = {
    "model": {"type": "string", "description": "The served model's id (GET /v1/models); defaults to it."},
    "max_tokens": {
        "type": ["integer", "null"],
        "minimum": 1,
        "description": "Most tokens to generate (server limit: --max-tokens); the context may end it sooner.",
    },
    "temperature": {"type": ["number", "null"], "minimum": 0, "maximum": 2, "description": "0 = greedy."},
    "top_p": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
    "top_k": {"type": ["integer", "null"], "minimum": 0, "description": "0 = off."},
    "seed": {"type": ["integer", "null"]},
    "n": {
        "type": ["integer", "null"],
        "minimum": 1,
        "maximum": 8,
        "description": "Samples of the prompt (at most --max-batch), sharing one prefill; sample i draws with "
        "seed + i.",
    },
    "truncate_prompt_tokens": {
        "type": ["integer", "null"],
        "minimum": 1,
        "description": (
            "Opt-in truncation (vLLM's field; without it a prompt longer than the context is a 400): chat drops the "
            "oldest user/assistant pairs, keeping the system message and the last user message, until the prompt is "
            "at most this many tokens (`truncated_messages` says how many went); a raw prompt keeps <|bos|> and its "
            "last N-1 tokens (`truncated_prompt_tokens` says how many went). Less than the model's context."
        ),
    },
    "stop": {
        "oneOf": [
            {"type": "string", "minLength": 1},
            {"type": "array", "items": {"type": "string", "minLength": 1}, "maxItems": 4},
            {"type": "null"},
        ]
    },
    "stream": {"type": ["boolean", "null"]},
    "stream_options": {"type": ["object", "null"], "properties": {"include_usage": {"type": ["boolean", "null"]}}},
    **{
        name: {"type": ["number", "null"], "minimum": -2, "maximum": 2, "description": "Only 0 is supported."}
        for name in ("presence_penalty", "frequency_penalty")
    },
    "user": {"type": "string"},
}

_MESSAGE = {
    "type": "object",
    "required": ["role", "content"],
    "properties": {
        "role": {"type": "string", "enum": ["system", "developer", "user", "assistant"]},
        "content": {
            "oneOf": [
                {"type": "string"},
                {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["type", "text"],
                        "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
                    },
                },
            ]
        },
        "calculator_calls": {
            **_CALLS,
            "description": "An assistant message's calculator calls, as answers give "
            "them: rendered back as tool tokens at their offsets.",
        },
    },
}

_CHAT_REQUEST = {
    "type": "object",
    "required": ["messages"],
    "properties": {
        "messages": {
            "type": "array",
            "items": _MESSAGE,
            "minItems": 1,
            "description": "Optional leading system message, then user/assistant turns "
            "alternating, ending with the user's.",
        },
        "max_completion_tokens": {"type": ["integer", "null"], "minimum": 1},
        "logprobs": {
            "type": ["boolean", "null"],
            "description": "Log-probabilities of the answer's "
            "tokens: the model's log-softmax at temperature 1, before top_k/top_p.",
        },
        "top_logprobs": {
            "type": ["integer", "null"],
            "minimum": 0,
            "maximum": 20,
            "description": "Likeliest alternatives per token; needs logprobs: true.",
        },
        **_SAMPLING,
    },
}

_COMPLETION_REQUEST = {
    "type": "object",
    "required": ["prompt"],
    "properties": {
        "prompt": {
            "oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 1}]
        },
        "echo": {"type": ["boolean", "null"], "description": "Not supported: must be false."},
        "logprobs": {
            "type": ["integer", "null"],
            "minimum": 0,
            "maximum": 5,
            "description": "Log-probabilities of the tokens and this many alternatives each.",
        },
        "suffix": {"type": "null", "description": "Not supported."},
        **_SAMPLING,
    },
}


def _object(required: list[str], properties: dict) -> dict:
    return {"type": "object", "required": required, "properties": properties}


_CHAT_COMPLETION = _object(
    ["id", "object", "created", "model", "choices", "usage"],
    {
        "id": {"type": "string"},
        "object": {"const": "chat.completion"},
        "created": {"type": "integer"},
        "model": {"type": "string"},
        "usage": _USAGE,
        "truncated_messages": {"type": "integer", "minimum": 0, "description": "With truncate_prompt_tokens only."},
        "choices": {
            "type": "array",
            "minItems": 1,
            "maxItems": 8,
            "items": _object(
                ["index", "message", "finish_reason"],
                {
                    "index": {"type": "integer"},
                    "finish_reason": _FINISH,
                    "logprobs": _CHAT_LOGPROBS,
                    "message": _object(
                        ["role", "content"],
                        {"role": {"const": "assistant"}, "content": {"type": "string"}, "calculator_calls": _CALLS},
                    ),
                },
            ),
        },
    },
)

_TEXT_COMPLETION = _object(
    ["id", "object", "created", "model", "choices", "usage"],
    {
        "id": {"type": "string"},
        "object": {"const": "text_completion"},
        "created": {"type": "integer"},
        "model": {"type": "string"},
        "usage": _USAGE,
        "truncated_prompt_tokens": {
            "type": "integer",
            "minimum": 0,
            "description": "With truncate_prompt_tokens only.",
        },
        "choices": {
            "type": "array",
            "minItems": 1,
            "maxItems": 8,
            "items": _object(
                ["index", "text", "finish_reason"],
                {
                    "index": {"type": "integer"},
                    "text": {"type": "string"},
                    "finish_reason": _FINISH,
                    "logprobs": _TEXT_LOGPROBS,
                    "calculator_calls": _CALLS,
                },
            ),
        },
    },
)

# One server-sent event: `data:` holds a chunk's JSON (chat.completion.chunk or text_completion; with
# stream_options.include_usage a last chunk with empty choices and usage), and the last event is `[DONE]`. With n,
# choices[0].index says which sample a chunk belongs to. A calculator call is a chunk of its own, in order between
# content chunks: chat's delta is {"calculator_calls": [{"index", "expression", "result", "offset"}]}, a text
# completion's choice has "text": "" and "calculator_calls".
_SSE = {
    "type": "object",
    "required": ["data"],
    "properties": {
        "data": {"type": "string", "description": "A chunk as JSON, or [DONE] at the end."},
        "event": {"type": "string"},
        "id": {"type": "string"},
        "retry": {"type": "integer"},
    },
}

_MODEL = _object(
    ["id", "object", "created", "owned_by"],
    {
        "id": {"type": "string"},
        "object": {"const": "model"},
        "created": {"type": "integer"},
        "owned_by": {"type": "string"},
    },
)


def _json(schema: dict) -> dict:
    return {"content": {"application/json": {"schema": schema}}}


def _error(description: str, retry: bool = False) -> dict:
    out = {"description": description, **_json({"$ref": "#/components/schemas/Error"})}
    if retry:
        out["headers"] = {"Retry-After": {"schema": {"type": "string"}, "description": "Seconds to wait."}}
    return out


_AUTH = {"401": _error("Missing or wrong API key (when the server has one).")}
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


def _generate(summary: str, request: str, response: str) -> dict:
    return {
        "summary": summary,
        "security": [{}, {"bearer": []}],
        "requestBody": {"required": True, **_json({"$ref": f"#/components/schemas/{request}"})},
        "responses": {
            "200": {
                "description": "The completion (JSON), or a stream of chunks when `stream` is true.",
                "content": {
                    "application/json": {"schema": {"$ref": f"#/components/schemas/{response}"}},
                    "text/event-stream": {"schema": _SSE},
                },
            },
            **_BODY,
            **_AUTH,
            "404": _error("Unknown model."),
            "429": _error("Too many requests waiting (--max-queue).", retry=True),
            "500": _error("The forward pass failed (out of memory, say); the server keeps serving."),
            **_NOT_READY,
        },
    }


# One operation per endpoint; serve/app.py's ENDPOINTS pairs each with its path and method.
CHAT_COMPLETIONS = _generate("Chat completion", "ChatCompletionRequest", "ChatCompletion")
COMPLETIONS = _generate("Text completion of a raw prompt", "CompletionRequest", "Completion")
LIST_MODELS = {
    "summary": "The served model",
    "security": [{}, {"bearer": []}],
    "responses": {
        "200": {
            "description": "One model.",
            **_json(
                _object(
                    ["object", "data"],
                    {
                        "object": {"const": "list"},
                        "data": {"type": "array", "items": {"$ref": "#/components/schemas/Model"}},
                    },
                )
            ),
        },
        **_AUTH,
    },
}
GET_MODEL = {
    "summary": "One model by id",
    "security": [{}, {"bearer": []}],
    "parameters": [{"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}],
    "responses": {
        "200": {"description": "The model.", **_json({"$ref": "#/components/schemas/Model"})},
        "404": _error("Unknown model."),
        **_AUTH,
    },
}
TOKENIZE = {
    "summary": "Token ids of a text, or of a chat prompt as the model will see it (400 for text too long to fit "
    "the context, refused without tokenizing it)",
    "security": [{}, {"bearer": []}],
    "requestBody": {
        "required": True,
        **_json(
            {
                "oneOf": [
                    _object(["text"], {"text": {"type": "string"}}),
                    _object(["messages"], {"messages": {"type": "array", "items": _MESSAGE, "minItems": 1}}),
                ]
            }
        ),
    },
    "responses": {
        "200": {
            "description": "The ids.",
            **_json(
                _object(
                    ["tokens", "count", "max_context"],
                    {
                        "tokens": {"type": "array", "items": {"type": "integer", "minimum": 0}},
                        "count": {"type": "integer", "minimum": 0},
                        "max_context": {"type": "integer"},
                    },
                )
            ),
        },
        **_BODY,
        **_AUTH,
        **_NOT_READY,
    },
}
HEALTH = {
    "summary": "200 once the model is loaded, 503 before and while shutting down",
    "responses": {
        "200": {
            "description": "Serving.",
            **_json(
                _object(
                    ["status"],
                    {
                        "status": {"const": "ok"},
                        "model": {"type": "string"},
                        "active": {"type": "integer"},
                        "queued": {"type": "integer"},
                    },
                )
            ),
        },
        "503": {
            "description": "Not serving (yet).",
            "headers": {"Retry-After": {"schema": {"type": "string"}}},
            **_json(_object(["status"], {"status": {"enum": ["loading", "error", "shutting_down"]}})),
        },
    },
}
METRICS = {
    "summary": "Prometheus metrics: requests, tokens, queue depth, time to first token, tokens/s, prefix cache hits",
    "responses": {
        "200": {"description": "Prometheus text format.", "content": {"text/plain": {"schema": {"type": "string"}}}}
    },
}
OPENAPI = {
    "summary": "This document",
    "responses": {"200": {"description": "OpenAPI 3.1.", **_json({"type": "object"})}},
}
INDEX = {
    "summary": "The web chat page",
    "responses": {
        "200": {
            "description": "One self-contained HTML page.",
            "content": {"text/html": {"schema": {"type": "string"}}},
        }
    },
}


def schema(model_name: str, endpoints) -> dict:
    """The document for GET /openapi.json, its paths from (method, path, handler, operation) endpoints."""
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
                "ChatCompletionRequest": _CHAT_REQUEST,
                "ChatCompletion": _CHAT_COMPLETION,
                "CompletionRequest": _COMPLETION_REQUEST,
                "Completion": _TEXT_COMPLETION,
                "Model": _MODEL,
            },
        },
        "paths": paths,
    }
