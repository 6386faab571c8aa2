"""The real `python -m tui` in a real terminal (tmux): type a prompt, read the answer off the
screen, and kill the process mid-answer to check the store survives."""

from __future__ import annotations

import fcntl
import os
import shlex
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from test_tui_fakeserver import FakeServer, answer_for
from textual.widgets import Markdown, Static

from tui.app import ChatApp, Config, MessageView
from tui.store import Store

ROOT = Path(__file__).resolve().parents[1]


class Tmux:
    """One detached tmux session on a private server socket, running one command.

    tmux must be installed (scripts/test.sh installs it): this test is the real-terminal check.
    """

    def __init__(self, command: str, width: int = 100, height: int = 30) -> None:
        self.socket = f"scratchchat-test-{uuid.uuid4().hex[:8]}"
        self._tmux("new-session", "-d", "-s", "t", "-x", str(width), "-y", str(height), command)

    def _tmux(self, *args: str) -> str:
        return subprocess.run(["tmux", "-L", self.socket, *args], check=True, capture_output=True, text=True).stdout

    def send(self, *keys: str, literal: bool = False) -> None:
        self._tmux("send-keys", "-t", "t", *(["-l"] if literal else []), *keys)

    def screen(self) -> str:
        return self._tmux("capture-pane", "-p", "-t", "t")

    def pid(self) -> int:
        return int(self._tmux("display-message", "-p", "-t", "t", "#{pane_pid}").strip())

    def wait_for(self, text: str, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while text not in (screen := self.screen()):
            assert time.monotonic() < deadline, f"{text!r} never appeared; screen:\n{screen}"
            time.sleep(0.05)
        return screen

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True)


def tui_command(url: str, db: Path) -> str:
    env = {"PYTHONPATH": str(ROOT), "SCRATCHCHAT_URL": url, "TERM": "xterm-256color", "COLORTERM": "truecolor"}
    # `env` execs python, so the pane's pid is the app's pid.
    return (
        "env "
        + " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
        + f" {shlex.quote(sys.executable)} -m tui --db {shlex.quote(str(db))}"
    )


@pytest.fixture
def server():
    with FakeServer() as s:
        yield s


def test_type_prompt_and_read_streamed_answer_in_tmux(server, tmp_path):
    start = time.monotonic()
    tmux = Tmux(tui_command(server.url, tmp_path / "chats.db"))
    try:
        tmux.wait_for("Enter sends")
        print(f"\nstartup to a usable prompt in tmux: {time.monotonic() - start:.2f} s")
        tmux.wait_for("● fake-model")
        tmux.send("what is tmux?", literal=True)
        tmux.send("Enter")
        screen = tmux.wait_for("tok/s")
        # Rendered markdown: bold without its asterisks, the code block's text, usage under it.
        assert "Echo: what is tmux?" in screen and "**" not in screen
        assert "print('what is tmux?')" in screen
        assert "prompt 7" in screen
        tmux.send("C-q")
        deadline = time.monotonic() + 5
        while True:  # the app exits on ctrl+q and the session closes with it
            if subprocess.run(["tmux", "-L", tmux.socket, "has-session", "-t", "t"], capture_output=True).returncode:
                break
            assert time.monotonic() < deadline, "the app did not quit on ctrl+q"
            time.sleep(0.05)
    finally:
        tmux.close()
    rows = sqlite3.connect(tmp_path / "chats.db").execute("SELECT role, content, status FROM messages").fetchall()
    assert rows == [("user", "what is tmux?", "done"), ("assistant", answer_for("what is tmux?"), "done")]


def wait_unlocked(db: Path, timeout: float = 15.0) -> None:
    """Until no process holds a store lock on `db`: the kernel drops a killed writer's lock only once the process
    (and anything that shares its open files) has exited, which can lag the kill on a loaded machine."""
    deadline = time.monotonic() + timeout
    for lock in Path(f"{db}-owners").iterdir():
        fd = os.open(lock, os.O_RDWR)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    assert time.monotonic() < deadline, f"{lock} still locked {timeout} s after the kill"
                    time.sleep(0.05)
        finally:
            os.close(fd)  # closing drops our own lock again


@pytest.mark.anyio
async def test_kill_mid_stream_leaves_a_sound_store(server, tmp_path):
    db = tmp_path / "chats.db"
    prompt = "[slow] [long] kill me"  # 40 s of answer: the kill always lands mid-stream
    tmux = Tmux(tui_command(server.url, db))
    try:
        tmux.wait_for("● fake-model")
        tmux.send(prompt, literal=True)
        tmux.send("Enter")
        deadline = time.monotonic() + 10
        while True:  # wait until part of the answer is committed, then kill without warning
            try:
                row = sqlite3.connect(db).execute("SELECT content FROM messages WHERE role='assistant'").fetchone()
            except sqlite3.OperationalError:
                row = None  # the app is creating the tables
            if row and row[0]:
                break
            assert time.monotonic() < deadline, f"no partial answer stored; screen:\n{tmux.screen()}"
            time.sleep(0.02)
        os.kill(tmux.pid(), signal.SIGKILL)
    finally:
        tmux.close()
    wait_unlocked(db)  # until then a second instance rightly takes the answer for a live one

    con = sqlite3.connect(db)
    assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    ((content, status),) = con.execute("SELECT content, status FROM messages WHERE role='assistant'").fetchall()
    con.close()
    full = answer_for(prompt)
    assert status == "streaming" and content and full.startswith(content) and content != full

    # Reopening: the answer is kept and marked as interrupted.
    store = Store(db)
    app = ChatApp(Config(url=server.url, db=db, retry=0.1), store)
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("ctrl+l", "enter")
        await pilot.pause()
        view = list(app.query(MessageView))[-1]
        assert view.query_one(Markdown).source == content
        assert "interrupted" in str(view.query_one(".meta", Static).render()) and view.has_class("partial")
    assert store.messages(app.chat.id)[-1].status == "interrupted"
    store.close()
