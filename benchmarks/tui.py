"""Startup of `python -m tui` to a usable prompt, in a real terminal (tmux), against a bare Textual app.

"Usable" = the prompt's placeholder is on screen: the input is mounted, focused and drawn. The peer is
the smallest Textual app with a focused TextArea, i.e. the floor Textual itself sets. No server runs:
the client's server check happens in the background and must not delay the prompt.
Run: python benchmarks/tui.py [--runs 7]
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PEER = """
from textual.app import App
from textual.widgets import TextArea, Footer
class Bare(App):
    def compose(self):
        t = TextArea(placeholder="READY-BARE")
        yield t
        yield Footer()
    def on_mount(self):
        self.query_one(TextArea).focus()
Bare().run()
"""


def time_to(text: str, command: str, timeout: float = 20.0) -> float:
    sock = f"bench-{uuid.uuid4().hex[:8]}"
    start = time.perf_counter()
    subprocess.run(["tmux", "-L", sock, "new-session", "-d", "-x", "100", "-y", "30", command], check=True)
    try:
        while True:
            screen = subprocess.run(["tmux", "-L", sock, "capture-pane", "-p"], capture_output=True, text=True).stdout
            if text in screen:
                return time.perf_counter() - start
            if time.perf_counter() - start > timeout:
                raise SystemExit(f"error: {text!r} never appeared:\n{screen}")
            time.sleep(0.005)
    finally:
        subprocess.run(["tmux", "-L", sock, "kill-server"], capture_output=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7)
    runs = ap.parse_args().runs
    py = shlex.quote(sys.executable)
    with tempfile.TemporaryDirectory() as tmp:
        peer_file = Path(tmp) / "bare.py"
        peer_file.write_text(PEER)
        tui = (
            f"env PYTHONPATH={shlex.quote(str(ROOT))} TERM=xterm-256color {py} -m tui "
            f"--url http://127.0.0.1:9/v1 --db {shlex.quote(str(Path(tmp) / 'chats.db'))}"
        )
        bare = f"env TERM=xterm-256color {py} {shlex.quote(str(peer_file))}"
        time_to("Enter sends", tui)  # warm the file cache for both
        time_to("READY-BARE", bare)
        ours, peer = [], []
        for _ in range(runs):  # interleaved, so load changes hit both alike
            ours.append(time_to("Enter sends", tui))
            peer.append(time_to("READY-BARE", bare))
    mo, mp = statistics.median(ours), statistics.median(peer)
    print(
        f"python -m tui to a usable prompt: median {mo:.3f} s (min {min(ours):.3f}, max {max(ours):.3f}) over {runs} runs"
    )
    print(f"bare Textual app with a TextArea: median {mp:.3f} s (min {min(peer):.3f}, max {max(peer):.3f})")
    print(f"ratio tui / bare Textual: {mo / mp:.2f}x")


if __name__ == "__main__":
    main()
