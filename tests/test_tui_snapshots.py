"""Snapshots of the main screens at a fixed terminal size (pytest-textual-snapshot).

Everything shown is fixed: chats come from a store with a fake clock, usage figures are stored
ones, the server is the fake one (only its model name is shown) or a port nothing listens on,
and cursors do not blink. Update with `pytest tests/test_tui_snapshots.py --snapshot-update`
after checking the new pictures (snapshot_report.html).
"""

from __future__ import annotations

import asyncio
import itertools
import time

import pytest
from test_tui_fakeserver import FakeServer
from textual.widgets import Input, TextArea

from tui.app import ChatApp, Config
from tui.store import Store

SIZE = (100, 30)
ANSWER = """\
Use `sorted()` for a new list, or `list.sort()` to sort in place:

```python
words = ["pear", "fig", "apple"]
print(sorted(words, key=len))
```

- `key=` picks what to compare
- `reverse=True` flips the order
"""


@pytest.fixture(scope="module")
def server():
    with FakeServer() as s:
        yield s


@pytest.fixture
def utc(monkeypatch):
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def populated_store(tmp_path) -> Store:
    clock = itertools.count(1_767_225_600, 3600)  # 2026-01-01 00:00 UTC, one hour per write
    store = Store(tmp_path / "chats.db", clock=lambda: float(next(clock)))
    old = store.create_chat("Capital of France")
    store.add_message(old.id, "user", "What is the capital of France?")
    store.add_message(old.id, "assistant", "Paris.")
    chat = store.create_chat("Sorting in Python", system_prompt="You are terse.", temperature=0.2, max_tokens=256)
    store.add_message(chat.id, "user", "How do I sort a list of words by length?")
    answer = store.add_message(chat.id, "assistant", ANSWER)
    answer.prompt_tokens, answer.completion_tokens, answer.tokens_per_s = 31, 58, 42.5
    store.update_message(answer)
    store.add_message(chat.id, "user", "And in reverse?")
    broken = store.add_message(chat.id, "assistant", "Pass `reverse=True`:")
    broken.status, broken.error = "error", "the connection dropped mid-answer"
    store.update_message(broken)
    return store


def make_app(tmp_path, url: str) -> ChatApp:
    store = populated_store(tmp_path)
    return ChatApp(Config(url=url, db=store.path, retry=0.05), store)


async def settle(pilot, server_up: bool = True) -> None:
    app = pilot.app
    deadline = time.monotonic() + 10
    while not (app.server_ok if server_up else app.query_one("#banner").has_class("down")):
        assert time.monotonic() < deadline, "the server check never finished"
        await asyncio.sleep(0.02)
    for widget in app.query("*"):  # also the widgets of pushed screens
        if isinstance(widget, Input | TextArea):
            widget.cursor_blink = False
    await pilot.pause()


async def open_latest_chat(pilot) -> None:
    await settle(pilot)
    await pilot.press("ctrl+l", "enter")
    await settle(pilot)


def test_conversation(snap_compare, server, tmp_path):
    assert snap_compare(make_app(tmp_path, server.url), terminal_size=SIZE, run_before=open_latest_chat)


def test_server_down_at_start(snap_compare, tmp_path):
    async def down(pilot):
        await settle(pilot, server_up=False)

    # Port 9 (discard) has no listener here, so the connection is refused at once.
    app = make_app(tmp_path, "http://127.0.0.1:9/v1")
    assert snap_compare(app, terminal_size=SIZE, run_before=down)


def test_chat_list(snap_compare, server, tmp_path, utc):
    async def chats(pilot):
        await settle(pilot)
        await pilot.press("ctrl+l")

    assert snap_compare(make_app(tmp_path, server.url), terminal_size=SIZE, run_before=chats)


def test_settings(snap_compare, server, tmp_path):
    async def settings(pilot):
        await open_latest_chat(pilot)
        await pilot.press("ctrl+s")
        await settle(pilot)

    assert snap_compare(make_app(tmp_path, server.url), terminal_size=SIZE, run_before=settings)


def test_help(snap_compare, server, tmp_path):
    async def help_screen(pilot):
        await settle(pilot)
        await pilot.press("f1")
        await settle(pilot)

    assert snap_compare(make_app(tmp_path, server.url), terminal_size=SIZE, run_before=help_screen)


def test_calculator_call_and_trimmed_turns(snap_compare, server, tmp_path):
    """An answer that called the calculator, sent without the chat's 3 oldest turns."""
    clock = itertools.count(1_767_225_600, 3600)
    store = Store(tmp_path / "chats.db", clock=lambda: float(next(clock)))
    chat = store.create_chat("Sums")
    for i in range(4):
        store.add_message(chat.id, "user", f"Question {i + 1}?")
        store.add_message(chat.id, "assistant", f"Answer {i + 1}.")
    store.add_message(chat.id, "user", "What is 23+45?")
    answer = store.add_message(chat.id, "assistant", "23+45 is 68.")
    answer.calculator_calls = [{"expression": "23+45", "result": "68", "offset": len("23+45 is ")}]
    answer.trimmed, answer.prompt_tokens, answer.completion_tokens, answer.tokens_per_s = 3, 60, 12, 30.0
    store.update_message(answer)
    app = ChatApp(Config(url=server.url, db=store.path, retry=0.05), store)
    assert snap_compare(app, terminal_size=SIZE, run_before=open_latest_chat)
