"""The chat app driven with Textual's Pilot against the fake server: what is on screen and in the store."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import httpx
import pytest
from test_tui_fakeserver import CALC, CALC_TEXT, MODEL, FakeServer, answer_for, server, tokens_of  # noqa: F401 (server: a fixture)
from textual.widgets import Input, Label, Markdown, OptionList, Static

from tui.app import ChatApp, ChatsScreen, Config, MessageView, SettingsScreen
from tui.store import Store, with_calculator_calls

SIZE = (100, 32)
pytestmark = pytest.mark.anyio


@pytest.fixture
def make_app(tmp_path):
    """make_app(url, **config): an app on a new store in tmp_path, closed after the test."""
    stores = []

    def make(url: str, **config) -> ChatApp:
        stores.append(Store(tmp_path / f"chats{len(stores)}.db"))
        return ChatApp(Config(url=url, db=stores[-1].path, retry=0.1, **config), stores[-1])

    yield make
    for store in stores:
        store.close()


@pytest.fixture
def app(server, make_app, tmp_path):
    return make_app(server.url, timeout=2.0, export_dir=tmp_path / "exports")


async def until(pilot, condition, timeout: float = 30.0) -> None:
    """Let the app run until condition() holds; fail with the screen's state if it never does (the generous
    timeout only matters then; the tests against the real server share it)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting; messages on screen: {views_text(pilot.app)}"
        await asyncio.sleep(0.02)  # the app runs on this loop; pilot.pause would also wait on every widget


def views_text(app: ChatApp) -> list[tuple[str, str, str]]:
    """(role, body, status line) of every message on screen."""
    out = []
    for v in app.query(MessageView):
        bodies = v.query(".body")
        if not bodies:  # mounted a moment ago, its children not composed yet
            out.append((v.message.role, "", ""))
            continue
        body = bodies.first()
        text = body.source if isinstance(body, Markdown) else str(body.render())
        metas = v.query(".meta").results(Static)
        out.append((v.message.role, text, "".join(str(m.render()) for m in metas)))
    return out


async def press_now(pilot, key: str) -> None:
    """Send a real key event without Pilot's wait for an idle screen, which never comes while
    an answer streams (pilot.press would stall for seconds)."""
    pilot.app.simulate_key(key)
    await asyncio.sleep(0.01)


async def ready(pilot) -> None:
    await until(pilot, lambda: pilot.app.server_ok)


async def say(pilot, text: str, wait: bool = True, type_it: bool = False) -> None:
    """Put a prompt in the input (typed key by key if type_it), press Enter, and by default
    wait for the answer to finish. Typing costs ~70 ms a key here, so most tests paste."""
    app = pilot.app
    before = len(app.store.messages(app.chat.id)) if app.chat.id else 0
    app.prompt.focus()
    if type_it:
        await pilot.press(*("ctrl+j" if ch == "\n" else ch for ch in text))
    else:
        app.prompt.insert(text)
    await press_now(pilot, "enter")
    if wait:
        await until(
            pilot, lambda: app.chat.id and len(app.store.messages(app.chat.id)) == before + 2 and not app._generating
        )
        await pilot.pause()


async def test_prompt_streams_answer_with_usage_and_persists(app, server):
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        assert app.sub_title == f"● {MODEL}"
        assert app.focused is app.prompt
        await say(pilot, "hello", type_it=True)
        (role1, text1, _), (role2, text2, meta) = views_text(app)
        assert (role1, text1) == ("user", "hello")
        assert role2 == "assistant" and text2 == answer_for("hello")
        n = len(tokens_of(answer_for("hello")))
        assert meta.startswith(f"{n} tokens · prompt 7 · ") and meta.endswith(" tok/s")
        stored = app.store.messages(app.chat.id)
        assert [(m.role, m.content, m.status) for m in stored] == [
            ("user", "hello", "done"),
            ("assistant", answer_for("hello"), "done"),
        ]
        assert stored[1].completion_tokens == n and stored[1].tokens_per_s > 0
        assert app.store.get_chat(app.chat.id).title == "hello" == app.title
        assert server.requests[-1]["model"] == MODEL and server.requests[-1]["stream"] is True
        assert server.requests[-1]["messages"] == [{"role": "user", "content": "hello"}]
        # The rendered markdown highlights the code block: a fence widget holds the code.
        assert "print('hello')" in str(app.query_one("MarkdownFence").code)


async def test_multiline_prompt_and_history_recall(app, server):
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await say(pilot, "first")
        await say(pilot, "two\nlines", type_it=True)
        assert server.requests[-1]["messages"][-1]["content"] == "two\nlines"
        assert app.prompt.text == ""
        await pilot.press("up")
        assert app.prompt.text == "two\nlines"
        await pilot.press("up")
        assert app.prompt.text == "first"
        await pilot.press("down", "down")  # down from the last line walks forward
        assert app.prompt.text == "two\nlines"
        await pilot.press("down", "down")
        assert app.prompt.text == ""


@pytest.mark.parametrize(
    "prompt, error, partial",
    [
        ("[500] please", "server error 500: the fake server failed with 500 on purpose", False),
        ("[drop] please", "the connection dropped mid-answer", True),
        ("[badjson] please", "server sent invalid JSON", True),
        ("[stall] please", "the server timed out", True),
    ],
)
async def test_server_failures_show_in_conversation_and_app_keeps_working(app, prompt, error, partial):
    app.http.timeout = httpx.Timeout(1.0)  # so [stall] times out quickly
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await say(pilot, prompt)
        _, text, meta = views_text(app)[-1]
        assert f"⚠ error: {error}" in meta
        assert ("partial answer kept" in meta) is partial
        assert (text == "Echo: **" + prompt.split()[0] + " please**\n") is partial
        answer_view = list(app.query(MessageView))[-1]
        assert answer_view.has_class("partial")
        stored = app.store.messages(app.chat.id)[-1]
        assert stored.status == "error" and stored.error.startswith(error) and stored.content == text
        await say(pilot, "again")  # the app still works
        assert views_text(app)[-1][1] == answer_for("again")
        assert app.store.messages(app.chat.id)[-1].status == "done"


async def test_escape_stops_generation_keeping_partial(app):
    prompt = "[slow] [long] take your time"  # 40 s of answer: Esc always comes first
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await say(pilot, prompt, wait=False)
        await until(pilot, lambda: app._generating and len(views_text(app)[-1][1]) > 10)
        await press_now(pilot, "escape")
        await until(pilot, lambda: not app._generating)
        stored = app.store.messages(app.chat.id)[-1]
        assert stored.status == "stopped"
        assert 10 < len(stored.content) < len(answer_for(prompt)) and answer_for(prompt).startswith(stored.content)
        assert views_text(app)[-1][1] == stored.content
        assert "stopped — partial answer" in views_text(app)[-1][2]
        await say(pilot, "next")  # and the chat goes on
        assert views_text(app)[-1][1] == answer_for("next")


async def test_regenerate_and_edit_resend(app, server):
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await say(pilot, "one")
        await say(pilot, "two")
        n = len(server.requests)
        await pilot.press("ctrl+r")
        await until(pilot, lambda: len(server.requests) == n + 1 and not app._generating)
        await pilot.pause()
        assert server.requests[-1]["messages"] == server.requests[-2]["messages"]  # same history, new answer
        assert [(m.role, m.content) for m in app.store.messages(app.chat.id)] == [
            ("user", "one"),
            ("assistant", answer_for("one")),
            ("user", "two"),
            ("assistant", answer_for("two")),
        ]
        assert len(views_text(app)) == 4

        await pilot.press("ctrl+t")
        assert app.prompt.text == "two" and "editing" in app.prompt.border_title
        await pilot.press("backspace", "backspace", "backspace", *"three", "enter")
        await until(
            pilot,
            lambda: (
                not app._generating
                and len(app.store.messages(app.chat.id)) == 4
                and app.store.messages(app.chat.id)[-1].status == "done"
            ),
        )
        await pilot.pause()
        assert [(m.role, m.content) for m in app.store.messages(app.chat.id)] == [
            ("user", "one"),
            ("assistant", answer_for("one")),
            ("user", "three"),
            ("assistant", answer_for("three")),
        ]
        assert [t for _, t, _ in views_text(app)] == ["one", answer_for("one"), "three", answer_for("three")]


async def test_copy_answer_and_code_blocks(app):
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await say(pilot, "copy me")
        await pilot.press("ctrl+o")
        assert app.clipboard == answer_for("copy me")
        await pilot.press("ctrl+b")
        assert app.clipboard == "print('copy me')\n"


async def test_settings_apply_to_chat_and_requests(app, server):
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await say(pilot, "hi")
        await pilot.press("ctrl+s")
        assert isinstance(app.screen, SettingsScreen)
        await pilot.press(*"Be brief.")
        app.screen.query_one("#temperature", Input).value = "5"
        await pilot.press("ctrl+s")
        assert isinstance(app.screen, SettingsScreen)  # rejected, still open
        assert "between 0 and 2" in str(app.screen.query_one("#settings_error", Static).render())
        app.screen.query_one("#temperature", Input).value = "0.25"
        app.screen.query_one("#max_tokens", Input).value = "64"
        app.screen.query_one("#model", Input).value = "other-model"
        await pilot.press("ctrl+s")
        assert not isinstance(app.screen, SettingsScreen)
        chat = app.store.get_chat(app.chat.id)
        assert (chat.system_prompt, chat.temperature, chat.max_tokens, chat.model) == (
            "Be brief.",
            0.25,
            64,
            "other-model",
        )
        assert app.sub_title == "● other-model"
        await say(pilot, "again")
        req = server.requests[-1]
        assert req["messages"][0] == {"role": "system", "content": "Be brief."}
        assert (req["temperature"], req["max_tokens"], req["model"]) == (0.25, 64, "other-model")


async def test_chat_list_open_rename_export_delete(app, tmp_path):
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await say(pilot, "alpha chat")
        first = app.chat.id
        await pilot.press("ctrl+n")
        assert views_text(app) == [] and app.chat.id == 0
        await say(pilot, "beta [b]chat[/")  # brackets are text, not markup, everywhere
        await pilot.press("ctrl+l")
        assert isinstance(app.screen, ChatsScreen)
        options = app.screen.query_one(OptionList)
        labels = [str(options.get_option_at_index(i).prompt) for i in range(options.option_count)]
        assert labels[0].startswith("beta [b]chat[/  · 2 messages · ") and labels[1].startswith("alpha chat")
        await pilot.press("down", "r")
        app.screen.query_one(Input).value = "Renamed"
        await pilot.press("enter")
        await pilot.pause()
        assert app.store.get_chat(first).title == "Renamed"
        await pilot.press("m", "j")
        md = (tmp_path / "exports" / f"renamed-{first}.md").read_text()
        assert md.startswith("# Renamed\n") and "## User\n\nalpha chat" in md and "## Assistant" in md
        data = json.loads((tmp_path / "exports" / f"renamed-{first}.json").read_text())
        assert data["chat"]["title"] == "Renamed"
        assert [m["content"] for m in data["messages"]] == ["alpha chat", answer_for("alpha chat")]
        await pilot.press("enter")  # open the highlighted (renamed) chat
        await pilot.pause()
        assert app.chat.id == first and app.title == "Renamed"
        assert [t for _, t, _ in views_text(app)] == ["alpha chat", answer_for("alpha chat")]
        await pilot.press("ctrl+l", "d")  # the newest chat is highlighted first: beta
        assert "Delete “beta [b]chat[/” and all its messages?" in str(app.screen.query_one(Label).render())
        await pilot.press("n")
        assert len(app.store.list_chats()) == 2
        await pilot.press("d", "y")
        await pilot.pause()
        assert [c.title for c in app.store.list_chats()] == ["Renamed"]
        await pilot.press("escape")
        assert app.chat.id == first
        await pilot.press("ctrl+l", "d", "y", "escape")  # deleting the open chat leaves a fresh one
        await pilot.pause()
        assert app.store.list_chats() == [] and app.chat.id == 0 and views_text(app) == []


async def test_server_down_at_start_then_up(make_app):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    app = make_app(url, timeout=2.0)
    async with app.run_test(size=SIZE) as pilot:
        banner = app.query_one("#banner", Static)
        await until(pilot, lambda: banner.has_class("down"))
        text = str(banner.render())
        assert f"No server answering at {url}" in text and "python -m serve" in text
        assert app.sub_title == "○ no server"
        await pilot.press(*"typing works")  # the UI is not frozen while it retries
        assert app.prompt.text == "typing works"
        await pilot.press("enter")
        await until(pilot, lambda: app.chat.id and not app._generating and len(app.store.messages(app.chat.id)) == 2)
        assert f"cannot reach the server at {url}" in views_text(app)[-1][2]
        with FakeServer(port=port):
            await until(pilot, lambda: app.server_ok)
            assert not banner.has_class("down") and app.sub_title == f"● {MODEL}"
            await pilot.press("ctrl+r")
            await until(pilot, lambda: app.store.messages(app.chat.id)[-1].status == "done")


async def test_api_key_is_sent_and_a_wrong_one_is_explained(make_app):
    with FakeServer(api_key="sk-right") as locked:
        for key, ok in [("sk-wrong", False), ("sk-right", True)]:
            app = make_app(locked.url, api_key=key)
            async with app.run_test(size=SIZE) as pilot:
                banner = app.query_one("#banner", Static)
                await until(pilot, lambda: app.server_ok or banner.has_class("down"))  # noqa: B023 - awaited here
                assert app.server_ok is ok
                if not ok:
                    text = str(banner.render())
                    assert (
                        f"The server at {locked.url} answered with an error: server error 401: Incorrect API key"
                        in text
                    )
                    assert "--api-key" in text
                else:
                    await say(pilot, "hi")
                    assert views_text(app)[-1][1] == answer_for("hi")


async def test_max_tokens_cut_is_marked(app):
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await say(pilot, "[length] long story")
        assert "⚠ cut off at max tokens" in views_text(app)[-1][2]
        assert app.store.messages(app.chat.id)[-1].status == "length"


async def test_follows_stream_only_at_bottom(app):
    # Conditions, not pilot.pause(): with hundreds of markdown blocks each pause costs a second.
    async with app.run_test(size=(80, 16)) as pilot:
        await ready(pilot)
        await say(pilot, "[trickle] [long]", wait=False)
        conv = app.conversation
        await until(pilot, lambda: conv.max_scroll_y > 10)
        assert conv.scroll_y == conv.max_scroll_y  # following
        conv.scroll_page_up(animate=False)  # what PageUp or the mouse wheel do
        await until(pilot, lambda: conv.scroll_y < conv.max_scroll_y)
        held, grown = conv.scroll_y, conv.max_scroll_y
        await until(pilot, lambda: conv.max_scroll_y > grown + 3)
        assert conv.scroll_y == held  # not yanked back down
        conv.scroll_end(animate=False)  # back at the bottom: follow again
        await until(pilot, lambda: conv.scroll_y == conv.max_scroll_y)
        grown = conv.max_scroll_y
        await until(pilot, lambda: conv.max_scroll_y > grown + 3)
        await asyncio.sleep(0.1)
        assert conv.scroll_y == conv.max_scroll_y
        await press_now(pilot, "escape")


async def test_help_screen_lists_keys(app):
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f1")
        help_text = str(app.screen.query_one("#keys", Static).render())
        keys = {line.split("  ")[0] for line in help_text.splitlines()}
        assert {"Enter", "ctrl+j, shift+enter", "↑ / ↓", "ctrl+q"} <= keys
        for binding in app.BINDINGS:  # every key in the footer is explained
            assert binding.key.replace("escape", "Esc").replace("f1", "F1") in keys
        await pilot.press("escape")
        assert app.screen is app.screen_stack[0]


async def test_calculator_call_shows_inline_and_goes_back_with_the_history(app, server):
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await say(pilot, "[calc] add 23 and 45")
        shown = "The sum is `calculator: 23+45 = 68` 68, so 23+45 = 68."
        assert with_calculator_calls(CALC_TEXT, CALC) == shown
        assert views_text(app)[-1][1] == shown  # streamed: the call appeared where the model made it
        # Rendered as inline code, apart from the prose around it.
        rendered = app.query(MessageView).last().query_one(Markdown)
        assert "calculator: 23+45 = 68" in str(rendered.query("MarkdownParagraph").first()._content)
        stored = app.store.messages(app.chat.id)[-1]
        assert (stored.content, stored.calculator_calls) == (CALC_TEXT, CALC)  # the content stays prose
        await say(pilot, "thanks")
        assert server.requests[-1]["messages"][1] == {
            "role": "assistant",
            "content": CALC_TEXT,
            "calculator_calls": CALC,
        }
        chat = app.chat
        await pilot.press("ctrl+n")
        await app.show_chat(chat)  # from history, as when the chat is opened again
        await pilot.pause()
        assert views_text(app)[1][1] == shown
        assert "`calculator: 23+45 = 68` 68" in app.store.export_markdown(chat.id)


async def test_long_chat_leaves_out_the_oldest_turns_to_fit_the_context(make_app):
    """A server whose context holds 5 messages: each send that overflows retries with fewer turns, shows how many
    were left out, and the store keeps every message."""
    with FakeServer(context_messages=5) as small:
        app = make_app(small.url)
        store = app.store
        async with app.run_test(size=SIZE) as pilot:
            await ready(pilot)
            app.chat.system_prompt = "Be brief."
            system = {"role": "system", "content": "Be brief."}
            await say(pilot, "one")
            await say(pilot, "two")  # system + 3 messages: fits
            assert len(small.requests) == 2 and not app.query(".trimmed").last().display
            await say(pilot, "three")  # 6 messages: 400, then without the oldest turn
            assert [len(r["messages"]) for r in small.requests[2:]] == [6, 4]
            assert small.requests[-1]["messages"][:2] == [system, {"role": "user", "content": "two"}]
            marker = app.query(MessageView).last().query_one(".trimmed", Static)
            assert marker.display
            assert str(marker.render()) == "⋯ earlier messages not sent: 1 turn trimmed to fit the model's context"
            await say(pilot, "four")  # starts from the last trim: one 400, then 2 turns left out
            assert [len(r["messages"]) for r in small.requests[4:]] == [6, 4]
            assert small.requests[-1]["messages"] == [
                system,
                {"role": "user", "content": "three"},
                {"role": "assistant", "content": answer_for("three")},
                {"role": "user", "content": "four"},
            ]
            markers = [str(m.render()) for m in app.query(".trimmed").results(Static) if m.display]
            assert [m.split(": ")[1][:7] for m in markers] == ["1 turn ", "2 turns"]
            assert views_text(app)[-1][1] == answer_for("four")
            assert [m.content for m in store.messages(app.chat.id) if m.role == "user"] == [
                "one",
                "two",
                "three",
                "four",
            ]
            assert [m.trimmed for m in store.messages(app.chat.id) if m.role == "assistant"] == [0, 0, 1, 2]
            # When even the newest message alone does not fit, the server's error is what the user sees.
            small.context_messages = 1
            await say(pilot, "five")
            assert "⚠ error: server error 400: 2 messages do not fit the fake context" in views_text(app)[-1][2]
