"""The chat client: a Textual app that streams answers from an OpenAI-compatible server.

One main screen (conversation + prompt), plus modal screens for help, settings, the chat
list and small dialogs. All network work runs in Textual workers so the UI never waits on
the server; every answer is written to the store while it streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from markdown_it import MarkdownIt
from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.content import Content
from textual.message import Message as TextualMessage
from textual.screen import ModalScreen, Screen
from textual.suggester import SuggestFromList
from textual.widgets import Button, Footer, Header, Input, Label, Markdown, OptionList, Static, TextArea
from textual.widgets.option_list import Option

from .client import CalculatorCall, Finish, ServerError, Usage, list_models, make_http, stream_chat
from .store import (
    CHAT_SETTINGS,
    Chat,
    Message,
    Store,
    StoreError,
    calculator_markdown,
    default_db_path,
    with_calculator_calls,
    write_atomic,
)

DEFAULT_URL = "http://127.0.0.1:8000/v1"


def option(default, help: str):
    """A Config field: its default (a function: called for each new Config) and its --help text."""
    return field(**{"default_factory" if callable(default) else "default": default}, metadata={"help": help})


@dataclass
class Config:
    """Client settings; each field is a `python -m tui` flag."""

    url: str = option(lambda: os.environ.get("SCRATCHCHAT_URL", DEFAULT_URL), "server base URL (env SCRATCHCHAT_URL)")
    api_key: str = option(
        lambda: os.environ.get("SCRATCHCHAT_API_KEY", ""), "bearer token sent to the server (env SCRATCHCHAT_API_KEY)"
    )
    model: str = option("", "model for new chats (default: the server's first model)")
    temperature: float = option(0.7, "sampling temperature for new chats")
    max_tokens: int = option(512, "answer length limit for new chats")
    db: Path = option(default_db_path, "chat store (default $XDG_DATA_HOME/scratchchat/chats.db)")
    timeout: float = option(60.0, "seconds to wait for the server to connect or send the next token")
    retry: float = option(2.0, "seconds between checks of a server that is down")
    export_dir: Path = option(Path("."), "folder that chat exports are written to")


def tokens_line(m: Message) -> str:
    """The small grey line under an answer: usage, speed, and what went wrong if anything did."""
    parts = []
    if m.completion_tokens is not None:
        parts.append(f"{m.completion_tokens} tokens")
        if m.prompt_tokens is not None:
            parts.append(f"prompt {m.prompt_tokens}")
        if m.tokens_per_s is not None:
            parts.append(f"{m.tokens_per_s:.1f} tok/s")
    status = {
        "streaming": "generating…",
        "stopped": "⚠ stopped — partial answer",
        "interrupted": "⚠ interrupted (the app closed mid-answer) — partial answer",
        "error": f"⚠ error: {m.error} — partial answer kept" if m.content else f"⚠ error: {m.error}",
        "length": "⚠ cut off at max tokens",
    }.get(m.status)
    if status:
        parts.append(status)
    return " · ".join(parts)


def trimmed_line(turns: int) -> str:
    return f"⋯ earlier messages not sent: {turns} turn{'s' * (turns != 1)} trimmed to fit the model's context"


class MessageView(Vertical):
    """One message: plain text for the user, markdown for the assistant (its calculator calls inline), plus a
    status line, and above it a marker when the oldest turns were left out of its request."""

    def __init__(self, message: Message) -> None:
        super().__init__(classes=f"message {message.role}")
        self.message = message

    def compose(self) -> ComposeResult:
        if self.message.role == "assistant":
            yield Static(trimmed_line(self.message.trimmed), markup=False, classes="trimmed")
            yield Markdown(with_calculator_calls(self.message.content, self.message.calculator_calls), classes="body")
            yield Static(tokens_line(self.message), markup=False, classes="meta")
        else:
            yield Static(self.message.content, markup=False, classes="body")

    def refresh_meta(self) -> None:
        for meta in self.query(".meta").results(Static):
            meta.update(tokens_line(self.message))
        for marker in self.query(".trimmed").results(Static):
            marker.update(trimmed_line(self.message.trimmed))
            marker.display = self.message.trimmed > 0
        self.set_class(self.message.status not in ("done", "streaming"), "partial")


class PromptInput(TextArea):
    """Multi-line prompt: Enter sends, ctrl+j (or shift+enter) adds a line, up/down walk history."""

    BINDINGS = [Binding("ctrl+j,shift+enter,alt+enter", "newline", "Newline", show=False)]

    class Submitted(TextualMessage):
        def __init__(self, text: str) -> None:
            super().__init__()
            self.text = text

    def __init__(self, prompts: list[str], **kwargs) -> None:
        super().__init__(soft_wrap=True, show_line_numbers=False, tab_behavior="focus", **kwargs)
        self.prompts = prompts
        self._recall = len(prompts)  # index into prompts; len(prompts) = the draft being typed

    async def _on_key(self, event) -> None:
        if event.key == "enter":
            event.stop()
            event.prevent_default()
            if self.text.strip():
                self.post_message(self.Submitted(self.text))
            return
        await super()._on_key(event)

    def action_newline(self) -> None:
        self.insert("\n")

    def _show_recalled(self) -> None:
        self.text = self.prompts[self._recall] if self._recall < len(self.prompts) else ""
        # Cursor on the first line, so another "up" keeps walking back.
        self.move_cursor((0, len(self.document.get_line(0))))

    def action_cursor_up(self, select: bool = False) -> None:
        if not select and self.cursor_location[0] == 0 and self._recall > 0:
            self._recall -= 1
            self._show_recalled()
        else:
            super().action_cursor_up(select)

    def action_cursor_down(self, select: bool = False) -> None:
        last_row = self.document.line_count - 1
        if not select and self.cursor_location[0] == last_row and self._recall < len(self.prompts):
            self._recall += 1
            self._show_recalled()
        else:
            super().action_cursor_down(select)

    def remember(self, text: str) -> None:
        if not self.prompts or self.prompts[-1] != text:
            self.prompts.append(text)
        self._recall = len(self.prompts)


# The conversation's keys: (key, action, footer label, help). The app's bindings and the help (F1) both come from here.
CHAT_KEYS = [
    ("escape", "stop", "Stop", "stop generating; the partial answer is kept"),
    ("ctrl+r", "regenerate", "Regen", "regenerate the last answer"),
    ("ctrl+t", "edit_last", "Edit", "edit and resend your last message"),
    ("ctrl+o", "copy_answer", "Copy", "copy the last answer to the clipboard"),
    ("ctrl+b", "copy_code", "Code", "copy a code block (press again for the one before)"),
    ("ctrl+n", "new_chat", "New", "new chat"),
    ("ctrl+l", "chats", "Chats", "chats: open, rename, delete, export .md / .json"),
    ("ctrl+s", "settings", "Settings", "settings: system prompt, temperature, tokens, model"),
    ("f1", "help", "Help", "this help"),
]
KEYS = [  # what the help lists: the prompt's keys, then the conversation's
    ("Enter", "send the prompt"),
    ("ctrl+j, shift+enter", "new line in the prompt"),
    ("↑ / ↓", "previous / next prompt (on the first / last line)"),
    *(({"escape": "Esc", "f1": "F1"}.get(key, key), does) for key, _, _, does in CHAT_KEYS),
    ("ctrl+q", "quit"),
]


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,f1,q", "dismiss", "Close")]

    def compose(self) -> ComposeResult:
        width = max(len(k) for k, _ in KEYS) + 2
        with VerticalScroll(id="dialog"):
            yield Label("[b]Keys[/b]")
            yield Static("\n".join(f"{k:<{width}}{does}" for k, does in KEYS), markup=False, id="keys")
            yield Static(
                "Copying uses the terminal's clipboard (OSC 52); some terminals need it switched on.\n"
                "Chats are saved while they stream (the store: see --db in python -m tui --help).",
                markup=False,
                classes="hint",
            )
            yield Static("Esc closes", classes="hint")


class TextPrompt(ModalScreen[str | None]):
    """Ask for one line of text (rename a chat)."""

    BINDINGS = [Binding("escape", "dismiss", "Cancel")]

    def __init__(self, question: str, value: str) -> None:
        super().__init__()
        self.question, self.value = question, value

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog", classes="small"):
            yield Label(self.question)
            yield Input(self.value, id="answer")
            yield Static("Enter saves · Esc cancels", classes="hint")

    @on(Input.Submitted)
    def submitted(self, event: Input.Submitted) -> None:
        if event.value.strip():
            self.dismiss(event.value.strip())


class Confirm(ModalScreen[bool]):
    BINDINGS = [Binding("y", "answer(True)", "Yes"), Binding("n,escape", "answer(False)", "No")]

    def __init__(self, question: str) -> None:
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog", classes="small"):
            yield Label(self.question, markup=False)
            yield Static("y: yes · n / Esc: no", classes="hint")

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)


class SettingsScreen(ModalScreen[dict | None]):
    """Per-chat settings; returns the changed fields, or None when cancelled."""

    BINDINGS = [Binding("escape", "dismiss", "Cancel"), Binding("ctrl+s", "save", "Save", priority=True)]

    def __init__(self, chat: Chat, models: list[str]) -> None:
        super().__init__()
        self.chat, self.models = chat, models

    def compose(self) -> ComposeResult:
        c = self.chat
        with Vertical(id="dialog"):
            yield Label("[b]Settings of this chat[/b]")
            yield Label("System prompt")
            yield TextArea(c.system_prompt, id="system_prompt", soft_wrap=True, tab_behavior="focus")
            with Horizontal(classes="row"):
                yield Label("Temperature (0–2)")
                yield Input(str(c.temperature), id="temperature", type="number")
            with Horizontal(classes="row"):
                yield Label("Max tokens")
                yield Input(str(c.max_tokens), id="max_tokens", type="integer")
            with Horizontal(classes="row"):
                yield Label("Model")
                yield Input(
                    c.model,
                    id="model",
                    placeholder="empty: the server's default"
                    + (f" · available: {', '.join(self.models)}" if self.models else ""),
                    suggester=SuggestFromList(self.models) if self.models else None,
                )
            yield Static("", id="settings_error")
            with Horizontal(classes="buttons"):
                yield Button("Save (ctrl+s)", id="save", variant="primary")
                yield Button("Cancel (Esc)", id="cancel")

    def on_mount(self) -> None:
        self.query_one("#system_prompt", TextArea).focus()

    def action_save(self) -> None:
        error = self.query_one("#settings_error", Static)
        try:
            temperature = float(self.query_one("#temperature", Input).value)
            max_tokens = int(self.query_one("#max_tokens", Input).value)
        except ValueError:
            error.update("temperature must be a number and max tokens a whole number")
            return
        if not 0 <= temperature <= 2:
            error.update("temperature must be between 0 and 2")
            return
        if max_tokens < 1:
            error.update("max tokens must be at least 1")
            return
        self.dismiss(
            {
                "system_prompt": self.query_one("#system_prompt", TextArea).text,
                "temperature": temperature,
                "max_tokens": max_tokens,
                "model": self.query_one("#model", Input).value.strip(),
            }
        )

    @on(Button.Pressed)
    def pressed(self, event: Button.Pressed) -> None:
        self.action_save() if event.button.id == "save" else self.dismiss(None)


def slug(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")[:40] or "chat"


class ChatsScreen(Screen[int | None]):
    """Every saved chat, newest first; returns the id of the chat to open (0: a new one)."""

    BINDINGS = [
        Binding("escape", "dismiss", "Back"),
        Binding("n", "new", "New"),
        Binding("r", "rename", "Rename"),
        Binding("d", "delete", "Delete"),
        Binding("m", "export('md')", "Export .md"),
        Binding("j", "export('json')", "Export .json"),
    ]

    def __init__(self, store: Store, export_dir: Path) -> None:
        super().__init__()
        self.store, self.export_dir = store, export_dir

    def compose(self) -> ComposeResult:
        yield Header(show_clock=False)
        yield OptionList(id="chats")
        yield Footer()

    def on_mount(self) -> None:
        self.title, self.sub_title = "scratchchat", "chats · Enter opens"
        self.reload()

    def reload(self, highlight: int | None = None) -> None:
        chats = self.store.list_chats()
        counts = self.store.message_counts()
        options = self.query_one("#chats", OptionList)
        options.clear_options()
        for c in chats:
            n = counts.get(c.id, 0)
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(c.updated))
            # Content, not markup: a title may contain [brackets].
            options.add_option(Option(Content.assemble(c.title, (f"  · {n} messages · {when}", "dim")), id=str(c.id)))
        if not chats:
            options.add_option(Option("no chats yet — press n for a new one", disabled=True))
        ids = [c.id for c in chats]
        options.highlighted = ids.index(highlight) if highlight in ids else (0 if chats else None)
        options.focus()

    def _selected(self) -> Chat | None:
        option = self.query_one("#chats", OptionList).highlighted_option
        return self.store.get_chat(int(option.id)) if option and option.id else None

    @on(OptionList.OptionSelected)
    def opened(self) -> None:
        if chat := self._selected():
            self.dismiss(chat.id)

    def action_new(self) -> None:
        self.dismiss(0)

    def action_rename(self) -> None:
        if not (chat := self._selected()):
            return

        def done(title: str | None) -> None:
            if title:
                self.store.update_chat(chat.id, title=title)
                self.reload(chat.id)

        self.app.push_screen(TextPrompt("New title", chat.title), done)

    def action_delete(self) -> None:
        if not (chat := self._selected()):
            return

        def done(yes: bool | None) -> None:
            if yes:
                self.store.delete_chat(chat.id)
                self.notify(f"deleted “{chat.title}”")
                self.reload()

        self.app.push_screen(Confirm(f"Delete “{chat.title}” and all its messages?"), done)

    def action_export(self, kind: str) -> None:
        if not (chat := self._selected()):
            return
        text = self.store.export_markdown(chat.id) if kind == "md" else self.store.export_json(chat.id)
        path = (self.export_dir / f"{slug(chat.title)}-{chat.id}.{kind}").resolve()
        try:
            write_atomic(path, text)
        except OSError as exc:
            self.notify(f"export failed: {exc}", severity="error")
            return
        self.notify(f"exported to {path}")


class ChatApp(App[None]):
    """The app. Its own screen is the conversation with the prompt; the chat keys act on it."""

    TITLE = "scratchchat"
    ENABLE_COMMAND_PALETTE = False
    CSS = """
    #banner { display: none; background: $error 20%; color: $text; padding: 0 1; }
    #banner.down { display: block; }
    #conversation { height: 1fr; padding: 0 1; }
    #empty { color: $text-muted; padding: 1 2; }
    .message { height: auto; margin: 1 0 0 0; }
    .message.user { border-left: thick $primary; padding: 0 1; background: $boost; }
    .message.assistant { border-left: thick $success; padding: 0 1; }
    .message.assistant.partial { border-left: thick $warning; }
    .message .body { height: auto; margin: 0; }
    .message Markdown { margin: 0; padding: 0; }
    .message .meta { color: $text-muted; height: auto; }
    .message .trimmed { color: $warning; height: auto; }
    .message.partial .meta { color: $warning; }
    PromptInput { height: auto; max-height: 10; min-height: 3; border: round $accent; }
    PromptInput:focus { border: round $accent-lighten-2; }
    ModalScreen { align: center middle; }
    #dialog { width: 80%; max-width: 100; height: auto; max-height: 90%; border: thick $accent;
              background: $surface; padding: 1 2; }
    #dialog.small { max-width: 60; }
    #dialog .hint { color: $text-muted; margin-top: 1; }
    #dialog #keys { margin-top: 1; }
    #dialog #system_prompt { height: 6; }
    #dialog .row { height: 3; }
    #dialog .row Label { width: 20; padding: 1 0; }
    #dialog .row Input { width: 1fr; }
    #dialog .buttons { height: 3; align-horizontal: right; }
    #settings_error { color: $error; height: auto; }
    #chats { height: 1fr; }
    """
    BINDINGS = [
        *(Binding(key, action, label) for key, action, label, _ in CHAT_KEYS),
        Binding("ctrl+q", "quit", "Quit", priority=True, show=False),  # in the help; the footer keeps to 80 columns
    ]

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        # The chat keys act on the conversation, so only while it is the screen on top.
        return action not in {a for _, a, _, _ in CHAT_KEYS} or len(self.screen_stack) == 1

    def __init__(self, config: Config, store: Store) -> None:
        super().__init__()
        self.config, self.store = config, store
        self.store.recover()
        self.http = make_http(config.url, config.api_key, config.timeout)
        self.models: list[str] = []
        self.server_ok = False
        self.chat = self._fresh_chat()
        self.editing: int | None = None  # id of the user message being edited, if any
        self._code_index = 0  # which code block ctrl+b copies next, counted from the end
        self._generating = False

    def _fresh_chat(self) -> Chat:
        """An unsaved chat; it is written to the store with its first message."""
        c = self.config
        return Chat(model=c.model, temperature=c.temperature, max_tokens=c.max_tokens)

    # layout

    def compose(self) -> ComposeResult:
        yield Header(show_clock=False)
        yield Static(id="banner", markup=False)
        yield VerticalScroll(id="conversation")
        yield PromptInput(
            self.store.user_prompts(), id="prompt", placeholder="Message — Enter sends, ctrl+j new line, F1 help"
        )
        yield Footer(compact=True)  # compact: every chat key fits in 80 columns

    async def on_mount(self) -> None:
        self.sub_title = "connecting…"
        self.conversation.anchor()
        await self.show_chat(self.chat)
        self.prompt.focus()
        self.watch_server()

    async def on_unmount(self) -> None:
        await self.http.aclose()

    @property
    def conversation(self) -> VerticalScroll:
        return self.query_one("#conversation", VerticalScroll)

    @property
    def prompt(self) -> PromptInput:
        return self.query_one("#prompt", PromptInput)

    async def show_chat(self, chat: Chat) -> None:
        self.chat = chat
        self.title = chat.title
        self.editing = None
        self.prompt.border_title = None
        self._code_index = 0
        await self.conversation.remove_children()
        messages = self.store.messages(chat.id) if chat.id else []
        if not messages:
            await self.conversation.mount(Static("Say something to start. Press F1 for the keys.", id="empty"))
        await self.conversation.mount_all([MessageView(m) for m in messages])
        for view in self.conversation.query(MessageView):
            view.refresh_meta()
        self.conversation.anchor()
        self._show_status()

    def _show_status(self) -> None:
        if self.server_ok:
            self.sub_title = f"● {self.chat.model or self.default_model or 'connected'}"

    def _busy(self) -> bool:
        """Whether an answer is streaming, which a new request must wait for; says so if it is."""
        if self._generating:
            self.notify("still answering — press Esc to stop it first", severity="warning")
        return self._generating

    @property
    def default_model(self) -> str:
        return self.config.model or (self.models[0] if self.models else "")

    # server health

    @work(exclusive=True, group="server")
    async def watch_server(self) -> None:
        """Check /models until the server answers; runs in the background, never blocks typing."""
        banner = self.query_one("#banner", Static)
        while True:
            try:
                self.models = await list_models(self.http)
                break
            except ServerError as exc:
                self.server_ok = False
                self.sub_title = "○ no server"
                url = self.config.url
                if str(exc).startswith("cannot reach"):
                    problem = f"No server answering at {url}.\nStart one with: python -m serve   (or pass --url)."
                else:
                    problem = f"The server at {url} answered with an error: {exc}\nCheck --url and --api-key."
                banner.update(f"{problem} Retrying every {self.config.retry:g} s…")
                banner.add_class("down")
            await asyncio.sleep(self.config.retry)
        self.server_ok = True
        banner.remove_class("down")
        self._show_status()

    # sending and streaming

    @on(PromptInput.Submitted)
    async def send(self, event: PromptInput.Submitted) -> None:
        if self._busy():
            return
        text = event.text.strip("\n")
        self.prompt.remember(text)
        self.prompt.clear()
        self.prompt.border_title = None
        try:
            if self.editing is not None:
                await self._drop_from(self.editing)
                self.editing = None
            if not self.chat.id:
                settings = {k: getattr(self.chat, k) for k in CHAT_SETTINGS}
                self.chat = self.store.create_chat(text.strip().splitlines()[0][:48], **settings)
                self.title = self.chat.title
            message = self.store.add_message(self.chat.id, "user", text)
        except StoreError as exc:  # another program holds the chat file: say so, and keep the prompt to resend
            self.notify(str(exc), severity="error", timeout=10)
            self.prompt.load_text(text)
            return
        for empty in self.conversation.query("#empty"):
            await empty.remove()
        await self.conversation.mount(MessageView(message))
        self.conversation.anchor()  # sending jumps to the bottom and follows the answer again
        self.generate()

    async def _drop_from(self, message_id: int) -> None:
        """Remove a message and all after it, from the store and the screen."""
        self.store.delete_messages_from(self.chat.id, message_id)
        for view in list(self.conversation.query(MessageView)):
            if view.message.id >= message_id:
                await view.remove()

    def _turns(self) -> list[list[dict]]:
        """The chat so far as API messages, in turns: a user message and the answer that followed it."""
        turns: list[list[dict]] = []
        for m in self.store.messages(self.chat.id):
            if not m.content:
                continue
            sent = {"role": m.role, "content": m.content}
            if m.calculator_calls:  # the server renders them back into the prompt
                sent["calculator_calls"] = m.calculator_calls
            if m.role == "user" or not turns:
                turns.append([])
            turns[-1].append(sent)
        return turns

    def _payload(self, turns: list[list[dict]], trim: int) -> dict:
        """The request, leaving out the oldest `trim` turns (the system prompt and the newest turn always go)."""
        c = self.chat
        messages = [{"role": "system", "content": c.system_prompt}] if c.system_prompt else []
        messages += [m for turn in turns[trim:] for m in turn]
        return {
            "model": c.model or self.default_model or "default",
            "messages": messages,
            "temperature": c.temperature,
            "max_tokens": c.max_tokens,
        }

    @work(exclusive=True, group="generate")
    async def generate(self) -> None:
        """Stream one answer into the conversation and the store.

        A chat longer than the model's context gets 400 context_length_exceeded: then the oldest turns are left
        out of the request, one more each try, and the answer's marker says how many. The store keeps them all."""
        turns = self._turns()
        # The chat only grows, so the last answer's trim is where this one starts: no 400s to rediscover it.
        trimmed = [m.trimmed for m in self.store.messages(self.chat.id) if m.role == "assistant"]
        trim = max(0, min(trimmed[-1] if trimmed else 0, len(turns) - 1))
        try:
            message = self.store.add_message(self.chat.id, "assistant", "", status="streaming")
        except StoreError as exc:
            self.notify(str(exc), severity="error", timeout=10)
            return
        self._generating = True
        view = MessageView(message)
        await self.conversation.mount(view)
        stream = Markdown.get_stream(view.query_one(Markdown))
        start = time.monotonic()
        try:
            while True:
                message.trimmed = trim
                view.refresh_meta()
                try:
                    finish = await self._stream_into(message, stream, self._payload(turns, trim))
                    break
                except ServerError as exc:
                    if exc.code != "context_length_exceeded" or trim >= len(turns) - 1 or message.content:
                        raise
                    trim += 1
            message.status = "length" if finish == "length" else "done"
        except ServerError as exc:
            message.status, message.error = "error", str(exc)
            if not self.server_ok or str(exc).startswith("cannot reach"):
                self.watch_server()
        except asyncio.CancelledError:
            message.status = "stopped"
            raise
        finally:
            elapsed = time.monotonic() - start
            if message.completion_tokens and elapsed > 0:
                message.tokens_per_s = message.completion_tokens / elapsed
            try:
                self.store.update_message(message)
            except StoreError as exc:
                self.notify(f"the answer was not saved: {exc}", severity="error", timeout=10)
            await stream.stop()
            view.refresh_meta()
            self._generating = False
            self._code_index = 0

    async def _stream_into(self, message: Message, stream, payload: dict) -> str:
        """Stream one request's answer into the message, the screen and the store; return the finish reason."""
        last_save = time.monotonic()
        finish = ""
        async for item in stream_chat(self.http, payload):
            if isinstance(item, str):
                message.content += item
                await stream.write(item)
                # Saving every chunk would cost a transaction per token; a kill loses at most this much.
                if time.monotonic() - last_save > 0.2:
                    with contextlib.suppress(StoreError):  # busy: the next save (or the last) writes it
                        self.store.update_message(message)
                    last_save = time.monotonic()
            elif isinstance(item, CalculatorCall):
                message.calculator_calls.append(asdict(item))
                await stream.write(calculator_markdown(item.expression, item.result))
            elif isinstance(item, Usage):
                message.prompt_tokens, message.completion_tokens = item.prompt_tokens, item.completion_tokens
            elif isinstance(item, Finish):
                finish = item.reason
        return finish

    # actions

    def action_stop(self) -> None:
        if self._generating:
            self.workers.cancel_group(self, "generate")
        elif self.editing is not None:
            self.editing = None
            self.prompt.clear()
            self.prompt.border_title = None

    async def action_regenerate(self) -> None:
        if self._busy():
            return
        messages = self.store.messages(self.chat.id) if self.chat.id else []
        if not messages:
            self.notify("nothing to regenerate yet")
            return
        if messages[-1].role == "assistant":
            await self._drop_from(messages[-1].id)
        self.conversation.anchor()
        self.generate()

    def action_edit_last(self) -> None:
        if self._busy():
            return
        users = [m for m in self.store.messages(self.chat.id) if m.role == "user"] if self.chat.id else []
        if not users:
            self.notify("no message to edit yet")
            return
        self.editing = users[-1].id
        self.prompt.text = users[-1].content
        self.prompt.move_cursor(self.prompt.document.end)
        self.prompt.border_title = "editing your last message — Enter resends, Esc cancels"
        self.prompt.focus()

    def _last_answer(self) -> Message | None:
        views = [v for v in self.conversation.query(MessageView) if v.message.role == "assistant"]
        return views[-1].message if views else None

    def action_copy_answer(self) -> None:
        answer = self._last_answer()
        if answer is None or not answer.content:
            self.notify("no answer to copy yet")
            return
        self.copy_to_clipboard(answer.content)
        self.notify(f"copied the last answer ({len(answer.content)} characters)")

    def action_copy_code(self) -> None:
        answer = self._last_answer()
        blocks = (
            [t.content for t in MarkdownIt().parse(answer.content) if t.type in ("fence", "code_block")]
            if answer
            else []
        )
        if not blocks:
            self.notify("the last answer has no code block")
            return
        index = len(blocks) - 1 - self._code_index % len(blocks)
        self._code_index += 1
        self.copy_to_clipboard(blocks[index])
        self.notify(f"copied code block {index + 1} of {len(blocks)}")

    async def action_new_chat(self) -> None:
        await self._stop_generating()
        await self.show_chat(self._fresh_chat())
        self.prompt.focus()

    async def _stop_generating(self) -> None:
        self.workers.cancel_group(self, "generate")
        # Let the cancelled stream record its partial answer before the view changes.
        while self._generating:
            await asyncio.sleep(0.01)

    def action_chats(self) -> None:
        async def opened(chat_id: int | None) -> None:
            if chat_id is None:
                # The chat on screen may have been renamed or deleted meanwhile.
                fresh = self.store.get_chat(self.chat.id) if self.chat.id else None
                if self.chat.id and fresh is None:
                    await self.show_chat(self._fresh_chat())
                elif fresh:
                    self.chat = fresh
                    self.title = fresh.title
            else:
                await self._stop_generating()
                await self.show_chat(self.store.get_chat(chat_id) if chat_id else self._fresh_chat())
            self.prompt.focus()

        self.push_screen(ChatsScreen(self.store, self.config.export_dir), opened)

    def action_settings(self) -> None:
        def saved(fields: dict | None) -> None:
            if not fields:
                return
            for k, v in fields.items():
                setattr(self.chat, k, v)
            if self.chat.id:
                self.store.update_chat(self.chat.id, **fields)
            self._show_status()
            self.notify("settings saved for this chat")

        self.push_screen(SettingsScreen(self.chat, self.models), saved)

    def action_help(self) -> None:
        self.push_screen(HelpScreen())
