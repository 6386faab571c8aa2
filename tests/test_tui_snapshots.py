"""Snapshots of the main screens at a fixed terminal size (pytest-textual-snapshot).

Everything shown is fixed: chats come from a store with a fake clock, usage figures are stored
ones, the server is the fake one (only its model name is shown) or a port nothing listens on,
and cursors do not blink. Update with `pytest tests/test_tui_snapshots.py --snapshot-update`
after checking the new pictures (snapshot_report.html).
"""

from __future__ import annotations

import itertools
import time

import pytest
from test_tui_app import until
from test_tui_fakeserver import server  # noqa: F401 (a fixture)
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


@pytest.fixture
def utc(monkeypatch):
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def clocked_store(tmp_path) -> Store:
    clock = itertools.count(1_767_225_600, 3600)  # 2026-01-01 00:00 UTC, one hour per write
    return Store(tmp_path / "chats.db", clock=lambda: float(next(clock)))


def populated_store(tmp_path) -> Store:
    store = clocked_store(tmp_path)
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


def make_app(url: str, store: Store) -> ChatApp:
    return ChatApp(Config(url=url, db=store.path, retry=0.05), store)


async def settle(pilot, server_up: bool = True) -> None:
    app = pilot.app
    await until(pilot, lambda: app.server_ok if server_up else app.query_one("#banner").has_class("down"))
    for widget in app.query("*"):  # also the widgets of pushed screens
        if isinstance(widget, Input | TextArea):
            widget.cursor_blink = False
    await pilot.pause()


def pressing(*keys: str, server_up: bool = True):
    """A run_before: wait for the server check, press the keys, let the screen settle."""

    async def run_before(pilot) -> None:
        await settle(pilot, server_up)
        await pilot.press(*keys)
        await settle(pilot, server_up)

    return run_before


OPEN_LATEST_CHAT = ("ctrl+l", "enter")


def test_conversation(snap_compare, server, tmp_path):
    app = make_app(server.url, populated_store(tmp_path))
    assert snap_compare(app, terminal_size=SIZE, run_before=pressing(*OPEN_LATEST_CHAT))


def test_server_down_at_start(snap_compare, tmp_path):
    # Port 9 (discard) has no listener here, so the connection is refused at once.
    app = make_app("http://127.0.0.1:9/v1", populated_store(tmp_path))
    assert snap_compare(app, terminal_size=SIZE, run_before=pressing(server_up=False))


def test_chat_list(snap_compare, server, tmp_path, utc):
    app = make_app(server.url, populated_store(tmp_path))
    assert snap_compare(app, terminal_size=SIZE, run_before=pressing("ctrl+l"))


def test_settings(snap_compare, server, tmp_path):
    app = make_app(server.url, populated_store(tmp_path))
    assert snap_compare(app, terminal_size=SIZE, run_before=pressing(*OPEN_LATEST_CHAT, "ctrl+s"))


def test_help(snap_compare, server, tmp_path):
    app = make_app(server.url, populated_store(tmp_path))
    assert snap_compare(app, terminal_size=SIZE, run_before=pressing("f1"))


def test_calculator_call_and_trimmed_turns(snap_compare, server, tmp_path):
    """An answer that called the calculator, sent without the chat's 3 oldest turns."""
    store = clocked_store(tmp_path)
    chat = store.create_chat("Sums")
    for i in range(4):
        store.add_message(chat.id, "user", f"Question {i + 1}?")
        store.add_message(chat.id, "assistant", f"Answer {i + 1}.")
    store.add_message(chat.id, "user", "What is 23+45?")
    answer = store.add_message(chat.id, "assistant", "23+45 is 68.")
    answer.calculator_calls = [{"expression": "23+45", "result": "68", "offset": len("23+45 is ")}]
    answer.trimmed, answer.prompt_tokens, answer.completion_tokens, answer.tokens_per_s = 3, 60, 12, 30.0
    store.update_message(answer)
    assert snap_compare(make_app(server.url, store), terminal_size=SIZE, run_before=pressing(*OPEN_LATEST_CHAT))
