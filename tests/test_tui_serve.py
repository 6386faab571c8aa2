"""The chat app against the real `python -m serve` with a tiny checkpoint that memorised its answers."""

from __future__ import annotations

import asyncio
import time

import pytest
from test_serve import COUNT, HELLO, build_checkpoint, running_server
from textual.widgets import Input, Markdown, Static

from pretrain.checkpoint import load_checkpoint, save_checkpoint
from pretrain.model import GPT, GPTConfig
from tui.app import ChatApp, Config, MessageView, trimmed_line
from tui.store import Store

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def serve(tmp_path_factory):
    checkpoint = build_checkpoint(tmp_path_factory.mktemp("tui_serve"))
    with running_server(checkpoint, "--max-batch", "2") as (url, _):
        yield url + "/v1", load_checkpoint(checkpoint)[1]


async def until(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


def last_answer(app: ChatApp) -> tuple[str, str]:
    view = list(app.query(MessageView))[-1]
    return view.query_one(Markdown).source, str(view.query_one(".meta", Static).render())


async def send(pilot, text: str) -> None:
    """Submit a prompt; return once its answer has started (its row is in the store)."""
    app = pilot.app
    before = len(app.store.messages(app.chat.id)) if app.chat.id else 0
    app.prompt.insert(text)
    app.simulate_key("enter")
    await until(lambda: app.chat.id and len(app.store.messages(app.chat.id)) == before + 2)


def finished(app: ChatApp) -> bool:
    return not app._generating and app.store.messages(app.chat.id)[-1].status != "streaming"


async def test_chat_with_the_real_server(serve, tmp_path):
    url, tok = serve
    store = Store(tmp_path / "chats.db")
    app = ChatApp(Config(url=url, db=store.path, temperature=0.0, retry=0.1), store)
    async with app.run_test(size=(100, 30)) as pilot:
        await until(lambda: app.server_ok)
        assert app.sub_title == "● scratchchat"

        await send(pilot, "Say hi")
        await until(lambda: finished(app))
        text, meta = last_answer(app)
        assert text == HELLO
        assert meta.startswith(f"{len(tok.encode(HELLO)) + 1} tokens · prompt ") and "tok/s" in meta
        assert store.messages(app.chat.id)[-1].content == HELLO

        # "Count" never ends on its own: stop it, keep the partial answer, and carry on.
        await send(pilot, "Count")
        await until(lambda: len(last_answer(app)[0]) > 20)
        app.simulate_key("escape")
        await until(lambda: finished(app))
        stored = store.messages(app.chat.id)[-1]
        assert stored.status == "stopped" and stored.content.startswith(COUNT[:20])
        assert last_answer(app)[0] == stored.content
        assert "stopped — partial answer" in last_answer(app)[1]

        # The server's own error body reaches the conversation.
        await pilot.press("ctrl+s")
        app.screen.query_one("#model", Input).value = "gpt-9"
        await pilot.press("ctrl+s")
        await send(pilot, "Say hi")
        await until(lambda: finished(app))
        assert "⚠ error: server error 404: the model 'gpt-9' does not exist" in last_answer(app)[1]
    store.close()


async def test_long_chat_keeps_working_on_a_small_context(serve, tmp_path):
    """A random-init model with a 64-token context: the chat outgrows it within a few turns, and every answer still
    comes, sent without the oldest turns."""
    tok = serve[1]
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, sequence_len=64, n_layer=1, n_head=2, n_kv_head=1, n_embd=32))
    checkpoint = save_checkpoint(tmp_path / "checkpoints" / "sft" / "step_1", model, tok, {"step": 1})
    store = Store(tmp_path / "chats.db")
    with running_server(checkpoint) as (url, _):
        app = ChatApp(Config(url=url + "/v1", db=store.path, temperature=0.0, max_tokens=4, retry=0.1), store)
        async with app.run_test(size=(100, 30)) as pilot:
            await until(lambda: app.server_ok)
            for word in ["one", "two", "three", "four", "five"]:  # from the fourth on, turns are left out
                await send(pilot, f"question {word}")
                await until(lambda: finished(app))
            answers = [m for m in store.messages(app.chat.id) if m.role == "assistant"]
            assert all(m.status in ("done", "length") for m in answers)  # length: max_tokens, not an error
            assert answers[-1].trimmed > 0 and len(store.messages(app.chat.id)) == 10
            marker = list(app.query(MessageView))[-1].query_one(".trimmed", Static)
            assert marker.display and str(marker.render()) == trimmed_line(answers[-1].trimmed)
    store.close()
