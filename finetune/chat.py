"""The chat format: a conversation of OpenAI-style messages <-> token ids plus a loss mask.

A conversation is a list of {"role": "system"|"user"|"assistant", "content": str}: an optional
leading system message, then user and assistant turns strictly alternating, starting with the user.
It renders as

    <|bos|> [<|system_start|> text <|system_end|>] <|user_start|> text <|user_end|>
            <|assistant_start|> text <|assistant_end|> <|user_start|> ...

Mask convention (one flag per token, aligned with the ids themselves): ``mask[i] == 1`` means
"the model should learn to produce ids[i]", which is true exactly for the assistant's content
tokens and its <|assistant_end|>; everything the user, the system or the format supplies
(including <|assistant_start|>) is 0. For next-token training the inputs are ``ids[:-1]``, the
targets ``ids[1:]`` and the model's loss_mask ``mask[1:]`` (finetune.data.SFTLoader), so a target
position is learned iff its target token is an assistant token.

An assistant message may also carry ``calculator_calls``: [{"expression", "result", "offset"}], the calls it made
to the calculator (finetune/calculator.py) and where in its content (a character offset) each happened. A call
renders at its offset as <|tool_start|> expression <|tool_end|> (learned: the model writes the call) followed by
<|output_start|> result <|output_end|> (mask 0: the decoder injects it). The serving API returns the same list.

Message content is always encoded as ordinary text: a user who types "<|assistant_start|>" gets
the characters, never the special token (the tokenizer's default ``allowed_special`` is empty).
This module is what ``serve`` uses to build prompts: ``render_prompt`` and ``assistant_end_id``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

ROLES = ("system", "user", "assistant")


class ChatFormatError(ValueError):
    """A conversation that does not follow the chat format; the message says what is wrong."""


class ConversationTooLong(ChatFormatError):
    """The rendered conversation does not fit the context; nothing is cut silently."""

    def __init__(self, length: int, max_len: int):
        super().__init__(f"conversation renders to {length} tokens, more than the limit of {max_len}")
        self.length, self.max_len = length, max_len


MAX_CALLS = 16  # calculator calls per message


def _calls(m: dict, i: int) -> list[dict]:
    """The message's calculator_calls, checked: only the assistant calls, at offsets inside its content, in order."""
    calls = m.get("calculator_calls") or []
    if calls and m.get("role") != "assistant":
        raise ChatFormatError(f"message {i}: only assistant messages may carry calculator_calls")
    if not isinstance(calls, list) or len(calls) > MAX_CALLS:
        raise ChatFormatError(f"message {i}: calculator_calls must be a list of at most {MAX_CALLS} calls")
    out, last = [], 0
    for c in calls:
        ok = (
            isinstance(c, dict)
            and isinstance(c.get("expression"), str)
            and isinstance(c.get("result"), str)
            and type(c.get("offset")) is int
            and last <= c["offset"] <= len(m["content"])
        )
        if not ok:
            raise ChatFormatError(
                f"message {i}: each calculator call needs string expression and result and an "
                "integer offset into the content, in order"
            )
        last = c["offset"]
        out.append({"expression": c["expression"], "result": c["result"], "offset": last})
    return out


def validate_messages(messages: Any, *, for_prompt: bool = False) -> list[dict]:
    """Check a conversation and return it as plain {"role", "content"[, "calculator_calls"]} dicts.

    Rules: a non-empty list; each message a dict with a known role and str content; at most one
    system message and only first; then user, assistant, user, ... For a prompt the last message
    must be the user's (the assistant speaks next). Other keys are dropped.
    """
    if not isinstance(messages, (list, tuple)):
        raise ChatFormatError(f"a conversation must be a list of messages, got {type(messages).__name__}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ChatFormatError(f"message {i} must be an object with 'role' and 'content', got {type(m).__name__}")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ChatFormatError(f"message {i} has unknown role {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise ChatFormatError(f"message {i} ({role}) content must be a string, got {type(content).__name__}")
        out.append({"role": role, "content": content})
        if calls := _calls(m, i):
            out[-1]["calculator_calls"] = calls
    turns = out[1:] if out and out[0]["role"] == "system" else out
    if not turns:
        raise ChatFormatError("empty conversation: it needs at least one user message")
    offset = len(out) - len(turns)
    for i, m in enumerate(turns):
        want = "user" if i % 2 == 0 else "assistant"
        if m["role"] != want:
            why = "turns must alternate user/assistant, starting with user"
            if m["role"] == "system":
                why = "a system message may only come first"
            raise ChatFormatError(f"message {i + offset} is {m['role']!r} but should be {want!r}: {why}")
    if for_prompt and turns[-1]["role"] != "user":
        raise ChatFormatError("a prompt must end with a user message (the assistant speaks next)")
    return out


def _special(tok, name: str) -> int:
    try:
        return tok.special_tokens[name]
    except KeyError:
        raise ChatFormatError(
            f"tokenizer has no special token {name} (train it with the chat special tokens)"
        ) from None


def assistant_end_id(tok) -> int:
    """The token that ends the assistant's turn: generation stops when the model emits it."""
    return _special(tok, "<|assistant_end|>")


def _body(tok, m: dict) -> tuple[list[int], list[int]]:
    """A message's content tokens and mask, with its calculator calls rendered at their offsets."""
    learn = int(m["role"] == "assistant")
    ids, mask, at = [], [], 0
    for c in m.get("calculator_calls", []):
        text = tok.encode(m["content"][at : c["offset"]])
        call = [_special(tok, "<|tool_start|>"), *tok.encode(c["expression"]), _special(tok, "<|tool_end|>")]
        result = [_special(tok, "<|output_start|>"), *tok.encode(c["result"]), _special(tok, "<|output_end|>")]
        ids += text + call + result
        mask += [learn] * (len(text) + len(call)) + [0] * len(result)
        at = c["offset"]
    text = tok.encode(m["content"][at:])
    return ids + text, mask + [learn] * len(text)


def render_conversation(tok, messages: Sequence[dict], max_len: int | None = None) -> tuple[list[int], list[int]]:
    """Render a whole conversation to (ids, mask); mask[i] == 1 iff ids[i] is learned (module doc).

    Raises ChatFormatError for an invalid conversation and ConversationTooLong when max_len is
    given and exceeded (callers split or drop it: see finetune.data.fit_conversation).
    """
    msgs = validate_messages(messages)
    ids, mask = [_special(tok, "<|bos|>")], [0]
    for m in msgs:
        role = m["role"]
        start, end = _special(tok, f"<|{role}_start|>"), _special(tok, f"<|{role}_end|>")
        body, body_mask = _body(tok, m)
        ids += [start, *body, end]
        mask += [0, *body_mask, int(role == "assistant")]
    if max_len is not None and len(ids) > max_len:
        raise ConversationTooLong(len(ids), max_len)
    return ids, mask


def render_prompt(tok, messages: Sequence[dict]) -> list[int]:
    """Render a conversation that ends with a user message, followed by <|assistant_start|>.

    The model continues from here; its answer ends with ``assistant_end_id(tok)``. The ids equal
    what render_conversation produces for the same turns, so training and serving agree.
    """
    validate_messages(messages, for_prompt=True)
    return render_conversation(tok, messages)[0] + [_special(tok, "<|assistant_start|>")]
