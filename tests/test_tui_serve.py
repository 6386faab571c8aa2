"""The chat app against the real `python -m serve` with a tiny checkpoint that memorised its answers."""

from __future__ import annotations

import pytest
from test_serve import COUNT, HELLO, build_checkpoint, running_server
from test_tui_app import make_app, press_now, ready, say, until, views_text  # noqa: F401 (make_app: a fixture)
from textual.widgets import Input, Static

from pretrain.checkpoint import load_checkpoint, save_checkpoint
from pretrain.model import GPT, GPTConfig
from tui.app import MessageView, trimmed_line

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def serve(tmp_path_factory):
    checkpoint = build_checkpoint(tmp_path_factory.mktemp("tui_serve"))
    with running_server(checkpoint, "--max-batch", "2") as (url, _):
        yield url + "/v1", load_checkpoint(checkpoint)[1]


async def test_chat_with_the_real_server(serve, make_app):
    url, tok = serve
    app = make_app(url, temperature=0.0)
    store = app.store
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot)
        assert app.sub_title == "● scratchchat"

        await say(pilot, "Say hi")
        _, text, meta = views_text(app)[-1]
        assert text == HELLO
        assert meta.startswith(f"{len(tok.encode(HELLO)) + 1} tokens · prompt ") and "tok/s" in meta
        assert store.messages(app.chat.id)[-1].content == HELLO

        # "Count" never ends on its own: stop it, keep the partial answer, and carry on.
        await say(pilot, "Count", wait=False)
        await until(pilot, lambda: app._generating and len(views_text(app)[-1][1]) > 20)
        await press_now(pilot, "escape")
        await until(pilot, lambda: not app._generating)
        stored = store.messages(app.chat.id)[-1]
        assert stored.status == "stopped" and stored.content.startswith(COUNT[:20])
        assert views_text(app)[-1][1] == stored.content
        assert "stopped — partial answer" in views_text(app)[-1][2]

        # The server's own error body reaches the conversation.
        await pilot.press("ctrl+s")
        app.screen.query_one("#model", Input).value = "gpt-9"
        await pilot.press("ctrl+s")
        await say(pilot, "Say hi")
        assert "⚠ error: server error 404: the model 'gpt-9' does not exist" in views_text(app)[-1][2]


async def test_long_chat_keeps_working_on_a_small_context(serve, make_app, tmp_path):
    """A random-init model with a 64-token context: the chat outgrows it within a few turns, and every answer still
    comes, sent without the oldest turns."""
    tok = serve[1]
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, sequence_len=64, n_layer=1, n_head=2, n_kv_head=1, n_embd=32))
    checkpoint = save_checkpoint(tmp_path / "checkpoints" / "sft" / "step_1", model, tok, {"step": 1})
    with running_server(checkpoint) as (url, _):
        app = make_app(url + "/v1", temperature=0.0, max_tokens=4)
        store = app.store
        async with app.run_test(size=(100, 30)) as pilot:
            await ready(pilot)
            for word in ["one", "two", "three", "four", "five"]:  # from the fourth on, turns are left out
                await say(pilot, f"question {word}")
            answers = [m for m in store.messages(app.chat.id) if m.role == "assistant"]
            assert all(m.status in ("done", "length") for m in answers)  # length: max_tokens, not an error
            assert answers[-1].trimmed > 0 and len(store.messages(app.chat.id)) == 10
            marker = list(app.query(MessageView))[-1].query_one(".trimmed", Static)
            assert marker.display and str(marker.render()) == trimmed_line(answers[-1].trimmed)
