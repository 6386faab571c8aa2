"""The web chat page in headless Chromium against a real server: send a message and watch it stream, render
markdown, keep an XSS attempt in model output inert, stop an answer midway, colour tokens by probability, keep a long
chat going on a model with a small context; and against the fake server (tests/test_tui_fakeserver.py), show a
calculator call.

Chromium is driven over the DevTools protocol through a pipe (--remote-debugging-pipe: JSON messages ending in
NUL on fds 3 and 4), so no websocket library or Playwright is needed. Needs Debian's `chromium` (scripts/test.sh
installs it).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time

import httpx
import pytest
from test_serve import COUNT, EMOJI, HELLO, running_server, shared_checkpoint, user
from test_tui_fakeserver import CALC, CALC_TEXT, FakeServer

from pretrain.checkpoint import load_checkpoint, save_checkpoint
from pretrain.model import GPT, GPTConfig

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class Browser:
    """A headless Chromium page, driven with DevTools protocol commands over a pipe."""

    def __init__(self, profile_dir) -> None:
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()

        def wire_fds() -> None:  # in the child: Chromium reads commands on fd 3 and writes replies on fd 4
            # dup first: a pipe end may already be fd 3 or 4, and dup2 onto itself would keep it close-on-exec
            read_end, write_end = os.dup(to_chrome_r), os.dup(from_chrome_w)
            os.dup2(read_end, 3)
            os.dup2(write_end, 4)

        flags = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile_dir}",
            "--remote-debugging-pipe",
            "about:blank",
        ]
        assert CHROMIUM, "needs Debian's chromium (scripts/test.sh installs it)"
        self.proc = subprocess.Popen(
            [CHROMIUM, *flags],
            preexec_fn=wire_fds,
            close_fds=False,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buffer = b""
        self._next_id = 0
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]

    def call(self, method: str, session: str | None = None, **params) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._to_chrome, json.dumps(message).encode() + b"\0")
        while True:  # events arrive in between: skip everything until our reply
            while b"\0" not in self._buffer:
                chunk = os.read(self._from_chrome, 1 << 16)
                if not chunk:
                    raise RuntimeError("chromium closed the DevTools pipe")
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def js(self, expression: str):
        """Evaluate in the page (promises awaited) and return the value."""
        result = self.call(
            "Runtime.evaluate", self.session, expression=expression, awaitPromise=True, returnByValue=True
        )
        if "exceptionDetails" in result:
            raise AssertionError(f"page error in {expression!r}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 15.0):
        deadline = time.monotonic() + timeout
        while not (value := self.js(expression)):
            assert time.monotonic() < deadline, f"timed out waiting for {expression}"
            time.sleep(0.01)
        return value

    def close(self) -> None:
        try:
            self.call("Browser.close")
            self.proc.wait(10)
        except Exception:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_chrome)
        os.close(self._from_chrome)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    browser = Browser(tmp_path_factory.mktemp("chromium-profile"))
    try:
        browser.call("Page.enable", browser.session)
        yield browser
    finally:
        browser.close()


def open_page(browser: Browser, url: str) -> Browser:
    browser.call("Page.navigate", browser.session, url=url + "/")
    browser.wait_for(
        f"location.href === {json.dumps(url + '/')} && document.readyState === 'complete' "
        "&& !!document.getElementById('send')"
    )
    browser.url = url
    return browser


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(shared_checkpoint(tmp_path_factory)) as (url, _):
        yield url


@pytest.fixture()
def page(browser, server):
    return open_page(browser, server)


def send(page: Browser, text: str, max_tokens: int = 64) -> None:
    """Start a new chat and send `text` through the form, as a user would; counts the bubble's updates."""
    page.js(f"""(() => {{
        document.getElementById('new-chat').click();
        document.getElementById('temperature').value = '0';
        document.getElementById('max-tokens').value = '{max_tokens}';
        window.updates = 0;
        new MutationObserver(() => {{
            const last = document.querySelector('#log .assistant:last-of-type');
            if (last && last.textContent) window.updates++;
        }}).observe(document.getElementById('log'), {{childList: true, subtree: true, characterData: true}});
        document.getElementById('input').value = {json.dumps(text)};
        document.getElementById('send').click();
    }})()""")


def say(page: Browser, text: str) -> None:
    """Send `text` in the chat on screen and wait for its answer to finish."""
    page.js(f"""(() => {{
        document.getElementById('input').value = {json.dumps(text)};
        document.getElementById('send').click();
    }})()""")
    page.wait_for(
        "document.querySelector('#log .msg.assistant:last-of-type')?.dataset.done === 'true' "
        "&& !document.getElementById('send').disabled"
    )


def chat(url: str, messages: list[dict], **fields) -> httpx.Response:
    """A greedy chat completion straight from the API, to compare with what the page shows."""
    return httpx.post(url + "/v1/chat/completions", timeout=60, json={"messages": messages, "temperature": 0, **fields})


def last_bubble(page: Browser, what: str):
    return page.js(f"document.querySelector('#log .msg.assistant:last-of-type').{what}")


def test_message_gets_its_answer_rendered_as_markdown(page):
    send(page, "Say hi")
    page.wait_for("document.querySelector('#log .msg.assistant')?.dataset.done === 'true'")
    assert page.js("document.querySelector('#log .msg.user').textContent") == "Say hi"
    assert last_bubble(page, "textContent") == HELLO.replace("**", "")
    assert page.js("document.querySelector('#log .assistant strong')?.textContent") == "scratchchat"
    assert page.js("document.getElementById('send').disabled") is False
    assert page.js("document.getElementById('stop').disabled") is True


def test_xss_in_model_output_stays_inert(page):
    send(page, "xss")
    page.wait_for("document.querySelector('#log .msg.assistant')?.dataset.done === 'true'")
    time.sleep(0.3)  # give an injected <img onerror> the time it would need to fire
    assert page.js("document.title") == "scratchchat"
    assert page.js("document.querySelectorAll('#log img, #log script, #log b').length") == 0
    text = last_bubble(page, "textContent")
    assert "<img src=x onerror=\"document.title='pwned'\"><script>" in text  # shown as text, literally
    assert page.js("document.querySelector('#log .assistant code').textContent") == "<b>code</b>"
    assert page.js("document.querySelector('#log .assistant strong').textContent") == "safe"


def test_answer_streams_in_and_stop_ends_it_midway(page):
    send(page, "Count", max_tokens=4000)
    page.wait_for("window.updates >= 3")  # the text grew piece by piece while the answer streamed
    page.js("document.getElementById('stop').click()")
    page.wait_for("document.querySelector('#log .msg.assistant').dataset.done === 'true'")
    stopped = last_bubble(page, "textContent")
    time.sleep(0.3)
    assert last_bubble(page, "textContent") == stopped  # nothing more arrives
    assert COUNT.startswith(stopped[: len(COUNT)])
    assert page.js("document.getElementById('stop').disabled") is True
    assert page.js("document.getElementById('send').disabled") is False
    # Unstopped, the answer goes on: one token more than the stopped answer has characters spells more than it.
    full = chat(page.url, user("Count"), max_tokens=len(stopped) + 1).json()
    assert len(stopped) < len(full["choices"][0]["message"]["content"])
    assert httpx.get(page.url + "/health").json()["active"] == 0  # the server freed the slot too
    # The partial answer is kept as the assistant's turn, so the conversation can go on.
    assert page.js("messages.length === 2 && messages[1].role === 'assistant' && messages[1].content") == stopped


def test_probabilities_colour_each_token_and_hover_shows_the_alternatives(page):
    page.js("document.getElementById('show-probs').click()")
    send(page, "Say hi")
    page.wait_for("document.querySelector('#log .msg.assistant')?.dataset.done === 'true'")
    # The same request through the API: the page shows exactly its tokens, coloured by their probabilities.
    reference = chat(page.url, user("Say hi"), max_tokens=64, logprobs=True, top_logprobs=5).json()
    reference = reference["choices"][0]["logprobs"]["content"]
    spans = page.js("""[...document.querySelectorAll('#log .assistant .tok')].map(
        (s) => [s.textContent, getComputedStyle(s).backgroundColor])""")
    assert [text for text, _ in spans] == [t["token"] for t in reference]
    assert "".join(text for text, _ in spans) == HELLO  # the raw text: the ** are tokens too
    assert all(colour.startswith("rgb(") for _, colour in spans)
    assert len({colour for _, colour in spans}) > 1 or all(t["logprob"] > -0.01 for t in reference)

    # Hover the second token: a tooltip lists its 5 likeliest alternatives, the chosen (greedy: first) marked.
    box = page.js(
        "(() => { const r = document.querySelectorAll('#log .tok')[1].getBoundingClientRect(); "
        "return [r.left + r.width / 2, r.top + r.height / 2]; })()"
    )
    page.call("Input.dispatchMouseEvent", page.session, type="mouseMoved", x=box[0], y=box[1])
    page.wait_for("getComputedStyle(document.getElementById('tip')).display === 'block'")
    rows = page.js(
        "[...document.querySelectorAll('#tip tr')].map((r) => [r.className, r.cells[0].textContent, "
        "r.cells[1].textContent])"
    )
    top = reference[1]["top_logprobs"]
    assert [token for _, token, _ in rows] == [json.dumps(t["token"], ensure_ascii=False) for t in top]
    assert len(rows) == 5 and rows[0][0] == "chosen" and rows[0][1] == json.dumps(reference[1]["token"])
    assert all(p.endswith("%") for _, _, p in rows)
    page.call("Input.dispatchMouseEvent", page.session, type="mouseMoved", x=1, y=1)
    page.wait_for("getComputedStyle(document.getElementById('tip')).display === 'none'")

    # Switched off, the same answer is markdown again; the stored message is plain content.
    page.js("document.getElementById('show-probs').click()")
    assert page.js("document.querySelectorAll('#log .tok').length") == 0
    assert page.js("document.querySelector('#log .assistant strong')?.textContent") == "scratchchat"
    assert page.js("messages[1]") == {"role": "assistant", "content": HELLO}


def test_probability_view_joins_characters_split_across_tokens(page):
    page.js("document.getElementById('show-probs').checked = true")
    send(page, "Emoji")
    page.wait_for("document.querySelector('#log .msg.assistant')?.dataset.done === 'true'")
    reference = chat(page.url, user("Emoji"), max_tokens=64, logprobs=True).json()
    tokens = [t["token"] for t in reference["choices"][0]["logprobs"]["content"]]
    assert any("\ufffd" in t for t in tokens)  # some token ends inside a character: the API shows U+FFFD there
    spans = page.js("[...document.querySelectorAll('#log .assistant .tok')].map((s) => s.textContent)")
    assert len(spans) == len(tokens) and "".join(spans) == EMOJI  # the page shows each character whole


@pytest.fixture(scope="module")
def fake_server():
    with FakeServer() as s:
        yield s


def test_calculator_call_shows_as_a_box_and_goes_back_with_the_history(browser, fake_server):
    page = open_page(browser, fake_server.url.removesuffix("/v1"))
    send(page, "[calc] add 23 and 45")
    page.wait_for("document.querySelector('#log .msg.assistant')?.dataset.done === 'true'")
    assert page.js("[...document.querySelectorAll('#log .calc')].map((b) => b.textContent)") == [
        "calculator: 23+45 = 68"
    ]
    # The box sits where the model made the call, between the prose before and after it.
    assert last_bubble(page, "textContent") == (
        CALC_TEXT[: CALC[0]["offset"]] + "calculator: 23+45 = 68" + CALC_TEXT[CALC[0]["offset"] :]
    )
    assert page.js("getComputedStyle(document.querySelector('#log .calc')).borderStyle") == "solid"
    say(page, "thanks")
    assert fake_server.requests[-1]["messages"][1] == {
        "role": "assistant",
        "content": CALC_TEXT,
        "calculator_calls": CALC,
    }


@pytest.fixture(scope="module")
def small_context_server(tmp_path_factory):
    """A random-init model with a 64-token context (the memorising checkpoint's tokenizer): a chat of short
    questions outgrows it within a few turns."""
    tok = load_checkpoint(shared_checkpoint(tmp_path_factory))[1]
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, sequence_len=64, n_layer=1, n_head=2, n_kv_head=1, n_embd=32))
    root = tmp_path_factory.mktemp("small-context")
    checkpoint = save_checkpoint(root / "checkpoints" / "sft" / "step_1", model, tok, {"step": 1})
    with running_server(checkpoint) as (url, _):
        yield url


def test_long_chat_leaves_out_the_oldest_turns_and_says_so(browser, small_context_server):
    page = open_page(browser, small_context_server)
    send(page, "question one", max_tokens=4)
    page.wait_for("document.querySelector('#log .msg.assistant')?.dataset.done === 'true'")
    for word in ["two", "three", "four", "five", "six", "seven", "eight"]:
        say(page, f"question {word}")
    assert page.js("document.querySelectorAll('#log .error').length") == 0  # every question got its answer
    assert page.js("messages.length") == 16  # the page keeps the whole chat
    trim = page.js("messages.trim")
    notices = page.js(
        "[...document.querySelectorAll('#log .notice')].filter((n) => !n.hidden).map((n) => n.textContent)"
    )
    turns = f"{trim} turn{'s' * (trim != 1)}"
    assert trim > 0 and notices[-1] == f"earlier messages not sent: {turns} trimmed to fit the model's context"
    # What the last request held: with every turn the server refuses it; trimmed as the page sent it, it fits.
    everything = chat(small_context_server, page.js("messages.slice(0, -1)"), max_tokens=4)
    assert everything.status_code == 400 and everything.json()["error"]["code"] == "context_length_exceeded"
    sent = page.js("sendable(messages.slice(0, -1), messages.trim)")
    assert sent[-1] == {"role": "user", "content": "question eight"} and len(sent) == 15 - 2 * trim
    assert chat(small_context_server, sent, max_tokens=4).status_code == 200
