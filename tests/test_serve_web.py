"""The web chat page in headless Chromium against a real server: send a message and watch it stream, render
markdown, keep an XSS attempt in model output inert, and stop an answer midway.

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
from test_serve import COUNT, HELLO, running_server, shared_checkpoint

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

        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={profile_dir}", "--remote-debugging-pipe", "about:blank"]
        assert CHROMIUM, "needs Debian's chromium (scripts/test.sh installs it)"
        self.proc = subprocess.Popen([CHROMIUM, *flags], preexec_fn=wire_fds, close_fds=False,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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
        result = self.call("Runtime.evaluate", self.session, expression=expression, awaitPromise=True,
                           returnByValue=True)
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
def page(tmp_path_factory):
    checkpoint = shared_checkpoint(tmp_path_factory)
    with running_server(checkpoint) as (url, _):
        browser = Browser(tmp_path_factory.mktemp("chromium-profile"))
        try:
            browser.call("Page.enable", browser.session)
            browser.call("Page.navigate", browser.session, url=url + "/")
            browser.wait_for("document.readyState === 'complete' && !!document.getElementById('send')")
            browser.url = url
            yield browser
        finally:
            browser.close()


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
    assert COUNT.startswith(stopped[:len(COUNT)])
    assert page.js("document.getElementById('stop').disabled") is True
    assert page.js("document.getElementById('send').disabled") is False
    full = httpx.post(page.url + "/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": "Count"}], "temperature": 0, "max_tokens": 4000}).json()
    assert len(stopped) < len(full["choices"][0]["message"]["content"])
    assert httpx.get(page.url + "/health").json()["active"] == 0  # the server freed the slot too
    # The partial answer is kept as the assistant's turn, so the conversation can go on.
    assert page.js("messages.length === 2 && messages[1].role === 'assistant' && messages[1].content") == stopped
