"""Conversations persisted in SQLite, safe against crashes and kills.

WAL journaling plus one transaction per change means a process killed at any instant
leaves the previous committed state: never a torn row. An answer is written while it
streams (status "streaming"), tagged with the id of the store that writes it. Each open
store holds a lock on a file named by that id; the kernel drops it when the process dies,
however it dies. `recover()` marks "interrupted" the streaming rows whose writer holds no
lock any more, and leaves alone the live answers of another open instance.

The files hold private conversations: they are readable by their owner only (0600).
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no flock; recover() then treats every other store's answers as abandoned
    fcntl = None

SCHEMA = """
CREATE TABLE IF NOT EXISTS chats (
    id INTEGER PRIMARY KEY,
    title TEXT NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    system_prompt TEXT NOT NULL DEFAULT '',
    temperature REAL NOT NULL DEFAULT 0.7,
    max_tokens INTEGER NOT NULL DEFAULT 512,
    model TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY,
    chat_id INTEGER NOT NULL REFERENCES chats(id) ON DELETE CASCADE,
    role TEXT NOT NULL,
    content TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'done',
    error TEXT NOT NULL DEFAULT '',
    prompt_tokens INTEGER,
    completion_tokens INTEGER,
    tokens_per_s REAL,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_by_chat ON messages(chat_id, id);
"""

# Message statuses: done, streaming (being written), stopped (user pressed Esc), length (hit
# max tokens), error (the server failed; `error` says how), interrupted (the app died mid-answer).
# An answer's calculator_calls are the server's [{expression, result, offset}] (JSON), sent back with the history;
# trimmed is how many of the oldest turns were left out of its request to fit the model's context.

# Columns of messages added after the first release. Every store, new or older, gains the ones it lacks when
# opened, so each column is defined once, here.
ADDED_COLUMNS = {
    "owner": "TEXT NOT NULL DEFAULT ''",
    "calculator_calls": "TEXT NOT NULL DEFAULT '[]'",
    "trimmed": "INTEGER NOT NULL DEFAULT 0",
}
# What a chat's settings screen changes (and a new chat copies from the unsaved one).
CHAT_SETTINGS = ("system_prompt", "temperature", "max_tokens", "model")


@dataclass
class Chat:
    id: int = 0  # 0: not in the store yet
    title: str = "New chat"
    created: float = 0.0
    updated: float = 0.0
    system_prompt: str = ""
    temperature: float = 0.7
    max_tokens: int = 512
    model: str = ""


@dataclass
class Message:
    id: int
    chat_id: int
    role: str
    content: str
    status: str = "done"
    error: str = ""
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    tokens_per_s: float | None = None
    created: float = 0.0
    calculator_calls: list[dict] = field(default_factory=list)
    trimmed: int = 0


def with_calculator_calls(content: str, calls: list[dict]) -> str:
    """Markdown of an answer with each calculator call shown where it happened, as `calculator: 23+45 = 68`."""
    out, at = [], 0
    for c in sorted(calls, key=lambda c: c["offset"]):
        out += [content[at : c["offset"]], calculator_markdown(c["expression"], c["result"])]
        at = max(at, c["offset"])
    return "".join(out) + content[at:]


def calculator_markdown(expression: str, result: str) -> str:
    """One call as an inline code span, which stands out from the prose; the prose goes on after a space."""
    text = f"calculator: {expression} = {result}".replace("`", "'")  # a backtick would end the span early
    return f"`{text}` "


MESSAGE_COLUMNS = ", ".join(f.name for f in fields(Message))  # not the owner: an id for recover() alone


class StoreError(Exception):
    """The store file cannot be opened, is not a scratchchat store, or stays locked by another program."""


def default_db_path() -> Path:
    """$XDG_DATA_HOME/scratchchat/chats.db, falling back to ~/.local/share."""
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "scratchchat" / "chats.db"


class Store:
    """All reads and writes of chats and messages. One connection, used from one thread.

    A write that waits more than `busy_timeout` seconds for another program's transaction raises StoreError."""

    def __init__(self, path: Path, clock: Callable[[], float] = time.time, busy_timeout: float = 5.0) -> None:
        self.path = Path(path)
        self.clock = clock
        self.owner = uuid.uuid4().hex
        self._owners = self.path.with_name(self.path.name + "-owners")  # one lock file per open store
        self._lock: int | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))  # SQLite gives its WAL the same mode
            for p in (self.path, Path(f"{self.path}-wal"), Path(f"{self.path}-shm")):
                with contextlib.suppress(FileNotFoundError):
                    os.chmod(p, 0o600)  # files an older version left readable by everyone
            # isolation_level=None: we open transactions ourselves with `with self._tx()`.
            self.db = sqlite3.connect(self.path, isolation_level=None, timeout=busy_timeout)
            self.db.row_factory = sqlite3.Row
            self.db.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode survives a process kill; only an OS crash may lose the last commits.
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.execute("PRAGMA foreign_keys=ON")
            self.db.executescript(SCHEMA)
            with self._tx() as db:  # one writer at a time: two clients opening one store add each column once
                have = {r["name"] for r in db.execute("PRAGMA table_info(messages)")}
                for name, kind in ADDED_COLUMNS.items():
                    if name not in have:
                        db.execute(f"ALTER TABLE messages ADD COLUMN {name} {kind}")
            if fcntl is not None:
                self._owners.mkdir(mode=0o700, exist_ok=True)
                self._lock = os.open(self._owners / self.owner, os.O_RDWR | os.O_CREAT, 0o600)
                fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"cannot open chat store at {self.path}: {exc}") from None

    def close(self) -> None:
        self.db.close()
        if self._lock is not None:
            (self._owners / self.owner).unlink(missing_ok=True)
            os.close(self._lock)
            self._lock = None

    def _tx(self) -> sqlite3.Connection:
        # sqlite3.Connection as a context manager commits or rolls back; BEGIN makes it explicit.
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:  # "database is locked": another program holds it too long
            raise StoreError(
                f"cannot write the chat store at {self.path}: {exc} (another program is writing it; try again)"
            ) from None
        return self.db

    def _alive(self, owner: str) -> bool:
        """Whether the store that wrote `owner`'s rows is still open, in this process or another."""
        if owner == self.owner:
            return True
        if fcntl is None or not owner:  # no locks here, or a row from before owners were recorded
            return False
        try:
            fd = os.open(self._owners / owner, os.O_RDWR)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        (self._owners / owner).unlink(missing_ok=True)  # its writer is gone: the lock file is litter
        return False

    def recover(self) -> int:
        """Mark answers left "streaming" by a process that died as "interrupted"; return how many."""
        owners = [r[0] for r in self.db.execute("SELECT DISTINCT owner FROM messages WHERE status='streaming'")]
        dead = [o for o in owners if not self._alive(o)]
        with self._tx() as db:
            return sum(
                db.execute(
                    "UPDATE messages SET status='interrupted' WHERE status='streaming' AND owner=?", (o,)
                ).rowcount
                for o in dead
            )

    # chats

    def create_chat(self, title: str = "New chat", **settings) -> Chat:
        now = self.clock()
        chat = Chat(title=title, created=now, updated=now, **settings)
        fields = {k: v for k, v in asdict(chat).items() if k != "id"}
        with self._tx() as db:
            cur = db.execute(
                f"INSERT INTO chats ({', '.join(fields)}) VALUES ({', '.join('?' * len(fields))})",
                tuple(fields.values()),
            )
        chat.id = cur.lastrowid
        return chat

    def get_chat(self, chat_id: int) -> Chat | None:
        row = self.db.execute("SELECT * FROM chats WHERE id=?", (chat_id,)).fetchone()
        return Chat(**dict(row)) if row else None

    def list_chats(self) -> list[Chat]:
        """Most recently used first."""
        rows = self.db.execute("SELECT * FROM chats ORDER BY updated DESC, id DESC").fetchall()
        return [Chat(**dict(r)) for r in rows]

    def message_counts(self) -> dict[int, int]:
        """chat id -> number of messages, for every chat that has any."""
        return dict(self.db.execute("SELECT chat_id, COUNT(*) FROM messages GROUP BY chat_id").fetchall())

    def update_chat(self, chat_id: int, **fields) -> None:
        """Change the title or settings."""
        allowed = {"title", *CHAT_SETTINGS}
        if not fields or not set(fields) <= allowed:
            raise ValueError(f"can only update {sorted(allowed)}, got {sorted(fields)}")
        self._update("chats", chat_id, fields)

    def _update(self, table: str, row_id: int, values: dict) -> None:
        sets = ", ".join(f"{k}=?" for k in values)
        with self._tx() as db:
            db.execute(f"UPDATE {table} SET {sets} WHERE id=?", (*values.values(), row_id))

    def delete_chat(self, chat_id: int) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM chats WHERE id=?", (chat_id,))

    # messages

    def add_message(self, chat_id: int, role: str, content: str, status: str = "done") -> Message:
        now = self.clock()
        with self._tx() as db:
            cur = db.execute(
                "INSERT INTO messages (chat_id, role, content, status, created, owner) VALUES (?, ?, ?, ?, ?, ?)",
                (chat_id, role, content, status, now, self.owner),
            )
            db.execute("UPDATE chats SET updated=? WHERE id=?", (now, chat_id))
        return Message(id=cur.lastrowid, chat_id=chat_id, role=role, content=content, status=status, created=now)

    def update_message(self, message: Message) -> None:
        """Write all that an answer's stream changes (content, status, error, usage...) in one transaction."""
        fixed = ("id", "chat_id", "role", "created")
        values = {k: v for k, v in asdict(message).items() if k not in fixed}
        self._update("messages", message.id, {**values, "calculator_calls": json.dumps(message.calculator_calls)})

    def messages(self, chat_id: int) -> list[Message]:
        rows = self.db.execute(
            f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE chat_id=? ORDER BY id", (chat_id,)
        ).fetchall()
        return [Message(**{**dict(r), "calculator_calls": json.loads(r["calculator_calls"])}) for r in rows]

    def delete_messages_from(self, chat_id: int, message_id: int) -> None:
        """Drop a message and everything after it (regenerate, edit and resend)."""
        with self._tx() as db:
            db.execute("DELETE FROM messages WHERE chat_id=? AND id>=?", (chat_id, message_id))

    def user_prompts(self, limit: int = 200) -> list[str]:
        """Recent prompts across all chats, oldest first, for up-arrow recall."""
        rows = self.db.execute(
            "SELECT content FROM messages WHERE role='user' ORDER BY id DESC LIMIT ?", (limit,)
        ).fetchall()
        return [r[0] for r in reversed(rows)]

    # export

    def _existing_chat(self, chat_id: int) -> Chat:
        if (chat := self.get_chat(chat_id)) is None:
            raise ValueError(f"no chat with id {chat_id}")
        return chat

    def export_json(self, chat_id: int) -> str:
        return json.dumps(
            {"chat": asdict(self._existing_chat(chat_id)), "messages": [asdict(m) for m in self.messages(chat_id)]},
            indent=2,
            ensure_ascii=False,
        )

    def export_markdown(self, chat_id: int) -> str:
        chat = self._existing_chat(chat_id)
        lines = [f"# {chat.title}", ""]
        if chat.model:
            lines += [f"*model: {chat.model}, temperature {chat.temperature}, max tokens {chat.max_tokens}*", ""]
        if chat.system_prompt:
            lines += ["## System", "", chat.system_prompt, ""]
        for m in self.messages(chat_id):
            lines += [f"## {m.role.capitalize()}", "", with_calculator_calls(m.content, m.calculator_calls), ""]
            if m.status != "done":
                lines += [f"*({m.status}{': ' + m.error if m.error else ''})*", ""]
        return "\n".join(lines)


def write_atomic(path: Path, text: str) -> None:
    """Write text to path via a temp file + rename, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
