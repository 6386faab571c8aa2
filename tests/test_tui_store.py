"""The SQLite chat store and the `python -m tui` command line: behaviour on real files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tui.__main__ import parse_args
from tui.store import Chat, Store, StoreError, default_db_path, write_atomic

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def store(tmp_path):
    ticks = iter(range(1000, 100000, 10))
    s = Store(tmp_path / "data" / "chats.db", clock=lambda: float(next(ticks)))
    yield s
    s.close()


def test_chats_messages_and_order(store):
    a = store.create_chat("first", temperature=0.1, max_tokens=9, model="m", system_prompt="sys")
    b = store.create_chat("second")
    store.add_message(a.id, "user", "hi a")  # touching a makes it the most recent
    assert [c.title for c in store.list_chats()] == ["first", "second"]
    expected = Chat(a.id, "first", 1000.0, 1020.0, system_prompt="sys", temperature=0.1, max_tokens=9, model="m")
    assert store.get_chat(a.id) == expected
    answer = store.add_message(a.id, "assistant", "", status="streaming")
    answer.content, answer.status, answer.completion_tokens, answer.tokens_per_s = "hello", "done", 2, 4.0
    store.update_message(answer)
    assert [(m.role, m.content, m.status, m.completion_tokens) for m in store.messages(a.id)] == [
        ("user", "hi a", "done", None),
        ("assistant", "hello", "done", 2),
    ]
    assert store.messages(b.id) == []
    assert store.message_counts() == {a.id: 2}
    store.update_chat(b.id, title="renamed", temperature=1.5)
    assert (store.get_chat(b.id).title, store.get_chat(b.id).temperature) == ("renamed", 1.5)
    with pytest.raises(ValueError, match="can only update"):
        store.update_chat(b.id, created=0)


def test_delete_cascades_and_truncate_from(store):
    chat = store.create_chat("c")
    ids = [
        store.add_message(chat.id, r, t).id
        for r, t in [("user", "1"), ("assistant", "2"), ("user", "3"), ("assistant", "4")]
    ]
    store.delete_messages_from(chat.id, ids[2])
    assert [m.content for m in store.messages(chat.id)] == ["1", "2"]
    store.delete_chat(chat.id)
    assert store.get_chat(chat.id) is None
    assert store.db.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 0


def test_prompt_history_is_oldest_first_across_chats(store):
    a, b = store.create_chat("a"), store.create_chat("b")
    for chat, text in [(a, "one"), (b, "two"), (a, "three")]:
        store.add_message(chat.id, "user", text)
        store.add_message(chat.id, "assistant", "ok")
    assert store.user_prompts() == ["one", "two", "three"]
    assert store.user_prompts(limit=2) == ["two", "three"]


WRITER = """
import sys, time
from tui.store import Store
s = Store(sys.argv[1])
chat = s.create_chat("c")
s.add_message(chat.id, "assistant", "half an ans", status="streaming")
s.add_message(chat.id, "assistant", "whole", status="done")
print(chat.id, flush=True)
time.sleep(60)
"""


def test_recover_marks_the_answers_of_a_killed_process_interrupted(tmp_path):
    path = tmp_path / "chats.db"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        chat_id = int(writer.stdout.readline())
        live = Store(path)
        assert live.recover() == 0  # its writer is still running: a second instance leaves its answer alone
        assert [m.status for m in live.messages(chat_id)] == ["streaming", "done"]
        live.close()
    finally:
        writer.kill()  # SIGKILL: no close(), no cleanup
        writer.wait()
    again = Store(path)
    assert again.recover() == 1
    assert [(m.content, m.status) for m in again.messages(chat_id)] == [
        ("half an ans", "interrupted"),
        ("whole", "done"),
    ]
    assert again.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert list((tmp_path / "chats.db-owners").iterdir()) == [again._owners / again.owner]  # no litter
    again.close()


def test_a_second_instance_in_one_process_leaves_a_live_answer_alone(tmp_path):
    first = Store(tmp_path / "chats.db")
    chat = first.create_chat("c")
    answer = first.add_message(chat.id, "assistant", "so far", status="streaming")
    second = Store(tmp_path / "chats.db")
    assert second.recover() == 0 and first.recover() == 0
    answer.content, answer.status = "so far, and done", "done"
    first.update_message(answer)
    assert [(m.content, m.status) for m in second.messages(chat.id)] == [("so far, and done", "done")]
    first.close()
    second.close()


def test_a_store_from_before_owners_is_migrated_and_recovered(tmp_path):
    import sqlite3

    path = tmp_path / "chats.db"
    old = sqlite3.connect(path)
    old.executescript(SCHEMA_WITHOUT_OWNER)
    old.execute("INSERT INTO chats (title, created, updated) VALUES ('c', 1, 1)")
    old.execute(
        "INSERT INTO messages (chat_id, role, content, status, created) VALUES (1, 'assistant', 'x', 'streaming', 1)"
    )
    old.commit()
    old.close()
    s = Store(path)
    assert s.recover() == 1 and s.messages(1)[0].status == "interrupted"
    assert (s.messages(1)[0].calculator_calls, s.messages(1)[0].trimmed) == ([], 0)  # the later columns too
    s.close()


def test_an_answer_keeps_its_calculator_calls_and_trim(store):
    chat = store.create_chat("sums")
    store.add_message(chat.id, "user", "23+45?")
    answer = store.add_message(chat.id, "assistant", "It is 68.")
    answer.calculator_calls, answer.trimmed = [{"expression": "23+45", "result": "68", "offset": 6}], 3
    store.update_message(answer)
    again = store.messages(chat.id)[-1]
    assert (again.calculator_calls, again.trimmed) == (answer.calculator_calls, 3)
    assert json.loads(store.export_json(chat.id))["messages"][-1]["calculator_calls"] == answer.calculator_calls
    assert "It is `calculator: 23+45 = 68` 68." in store.export_markdown(chat.id)


def test_files_are_private(tmp_path):
    path = tmp_path / "new" / "chats.db"
    s = Store(path)
    s.create_chat("secret")
    assert {p.name: p.stat().st_mode & 0o777 for p in path.parent.iterdir() if p.is_file()} == {
        "chats.db": 0o600,
        "chats.db-wal": 0o600,
        "chats.db-shm": 0o600,
    }
    assert path.parent.stat().st_mode & 0o777 == 0o700
    s.close()
    old = tmp_path / "old.db"  # made world-readable by an older version
    Store(old).close()
    old.chmod(0o644)
    Store(old).close()
    assert old.stat().st_mode & 0o777 == 0o600


def test_a_write_blocked_by_another_program_is_a_store_error(tmp_path):
    import sqlite3

    path = tmp_path / "chats.db"
    s = Store(path, busy_timeout=0.2)
    chat = s.create_chat("c")
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another program holding the write lock
    with pytest.raises(StoreError, match=f"cannot write the chat store at {path}: database is locked"):
        s.add_message(chat.id, "user", "hi")
    other.execute("ROLLBACK")
    s.add_message(chat.id, "user", "hi")  # and it works again once the other program lets go
    other.close()
    s.close()


SCHEMA_WITHOUT_OWNER = """
CREATE TABLE chats (id INTEGER PRIMARY KEY, title TEXT NOT NULL, created REAL NOT NULL, updated REAL NOT NULL,
    system_prompt TEXT NOT NULL DEFAULT '', temperature REAL NOT NULL DEFAULT 0.7,
    max_tokens INTEGER NOT NULL DEFAULT 512, model TEXT NOT NULL DEFAULT '');
CREATE TABLE messages (id INTEGER PRIMARY KEY, chat_id INTEGER NOT NULL REFERENCES chats(id) ON DELETE CASCADE,
    role TEXT NOT NULL, content TEXT NOT NULL, status TEXT NOT NULL DEFAULT 'done', error TEXT NOT NULL DEFAULT '',
    prompt_tokens INTEGER, completion_tokens INTEGER, tokens_per_s REAL, created REAL NOT NULL);
"""


def test_exports(store):
    chat = store.create_chat("Exported", system_prompt="Be kind.", model="m1")
    store.add_message(chat.id, "user", "question?")
    cut = store.add_message(chat.id, "assistant", "partial")
    cut.status, cut.error = "error", "the connection dropped mid-answer"
    store.update_message(cut)
    md = store.export_markdown(chat.id)
    assert md.splitlines()[:3] == ["# Exported", "", "*model: m1, temperature 0.7, max tokens 512*"]
    assert "## System\n\nBe kind.\n" in md and "## User\n\nquestion?\n" in md
    assert "## Assistant\n\npartial\n\n*(error: the connection dropped mid-answer)*" in md
    data = json.loads(store.export_json(chat.id))
    assert data["chat"]["title"] == "Exported" and data["chat"]["system_prompt"] == "Be kind."
    assert [(m["role"], m["content"], m["status"]) for m in data["messages"]] == [
        ("user", "question?", "done"),
        ("assistant", "partial", "error"),
    ]
    with pytest.raises(ValueError, match="no chat with id 999"):
        store.export_json(999)


def test_write_atomic_replaces_whole_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "out" / "chat.md"
    write_atomic(target, "first")
    write_atomic(target, "second ✓")
    assert target.read_text(encoding="utf-8") == "second ✓"
    assert [p.name for p in target.parent.iterdir()] == ["chat.md"]
    with pytest.raises(UnicodeEncodeError):  # a write that fails halfway: the old file stays whole
        write_atomic(target, "third \ud800")
    assert target.read_text(encoding="utf-8") == "second ✓"
    assert [p.name for p in target.parent.iterdir()] == ["chat.md"]


def test_corrupt_or_unusable_store_is_a_clear_error(tmp_path):
    bad = tmp_path / "chats.db"
    bad.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match=f"cannot open chat store at {bad}: file is not a database"):
        Store(bad)
    with pytest.raises(StoreError, match="cannot open chat store"):
        Store(tmp_path)  # a directory


def test_default_path_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert default_db_path() == tmp_path / "scratchchat" / "chats.db"
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_db_path() == tmp_path / "home" / ".local" / "share" / "scratchchat" / "chats.db"


def parse_exits(args: list[str], capsys) -> tuple[int, str, str]:
    """Run the flag parser in-process (a subprocess costs seconds); return its exit code, stdout and stderr."""
    with pytest.raises(SystemExit) as exit:
        parse_args(args)
    return exit.value.code, *capsys.readouterr()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--url", "localhost:8000"], "error: --url must start with http:// or https://, got 'localhost:8000'"),
        (["--timeout", "0"], "error: --timeout and --retry must be positive"),
        (["--temperature", "3"], "error: --temperature must be between 0 and 2"),
        (["--max-tokens", "many"], "error: argument --max-tokens: invalid int value: 'many'"),
    ],
)
def test_cli_rejects_bad_flags_in_one_line(args, message, capsys):
    code, out, err = parse_exits(args, capsys)
    assert code == 2 and out == ""
    assert err.splitlines()[-1].startswith(f"python -m tui: {message}")


def test_cli_corrupt_store_is_one_line_exit_1(tmp_path):
    bad = tmp_path / "chats.db"
    bad.write_bytes(b"garbage" * 1000)
    r = subprocess.run([sys.executable, "-m", "tui", "--db", str(bad)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 1
    assert r.stderr == f"error: cannot open chat store at {bad}: file is not a database\n"
    assert bad.read_bytes() == b"garbage" * 1000  # left as it was


def test_cli_paths_are_paths(tmp_path):
    config = parse_args(["--db", str(tmp_path / "c.db"), "--export-dir", str(tmp_path)])
    assert (config.db, config.export_dir) == (tmp_path / "c.db", tmp_path)
    assert isinstance(config.export_dir, Path)  # exports join it with a file name


def test_cli_help_names_env_vars_and_defaults(monkeypatch, capsys):
    monkeypatch.setenv("SCRATCHCHAT_URL", "http://example:1/v1")
    monkeypatch.setenv("SCRATCHCHAT_API_KEY", "sk-secret")
    code, out, _ = parse_exits(["--help"], capsys)
    assert code == 0
    assert "SCRATCHCHAT_URL" in out and "http://example:1/v1" in out
    assert "sk-secret" not in out  # never print the key
