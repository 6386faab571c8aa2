"""`python -m serve [--checkpoint PATH]`: serve a checkpoint over the OpenAI-compatible API and the web page.

With no --checkpoint it serves the newest fine-tuned (SFT) checkpoint under $SCRATCHCHAT_HOME. It binds
127.0.0.1 unless told otherwise; $SCRATCHCHAT_API_KEY (or --api-key-file, or --api-key) turns on bearer-token
auth. On Ctrl-C or SIGTERM it stops taking requests, answers queued ones 503, lets running generations finish
for --shutdown-grace seconds, then ends the rest cleanly (their streams get a finish_reason and [DONE]).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import math
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import uvicorn
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from common.cli import Parser, add_flags, config_from_args, flag, run_cli
from common.dist import pick_device
from common.paths import checkpoints_dir
from pretrain.checkpoint import latest_checkpoint, load_checkpoint
from serve.app import Limits, State, create_app
from serve.engine import Engine


@dataclass
class ServeConfig(Limits):
    """The server's flags; the per-request limits it inherits (serve.app.Limits) are flags too."""

    checkpoint: str | None = flag(
        None, "checkpoint directory (default: newest under $SCRATCHCHAT_HOME/checkpoints/sft)"
    )
    host: str = flag("127.0.0.1", "interface to bind (127.0.0.1 keeps it local; 0.0.0.0 exposes it)")
    port: int = flag(8000, "TCP port")
    api_key: str | None = flag(
        None,
        "require 'Authorization: Bearer KEY' (default: $SCRATCHCHAT_API_KEY, else no "
        "auth); other users can read it in `ps`: prefer the variable or --api-key-file",
    )
    api_key_file: str | None = flag(None, "read the API key from the first line of this file")
    model_name: str = flag("scratchchat", "the model id clients send and /v1/models lists")
    cors_origin: list[str] | None = flag(
        None, "an origin allowed to call the API from a browser (repeatable)", action="append"
    )
    allowed_host: list[str] | None = flag(
        None,
        "a Host name to answer besides localhost and IP addresses, e.g. the "
        "machine's name on the LAN (repeatable; '*': any)",
        action="append",
    )
    header_timeout: float = flag(
        10.0, "seconds a connection may stay open without a request in progress (idle, or sending headers)"
    )
    max_connections: int = flag(
        128, "open connections: beyond it new ones are closed at once (and requests get 503 at it)"
    )
    device: str = flag("auto", "cpu, cuda, mps or auto ($SCRATCHCHAT_DEVICE, else the best there is)")
    max_batch: int = flag(8, "sequences decoded together (KV-cache slots)")
    max_queue: int = flag(64, "requests allowed to wait for a slot before answering 429")
    prefix_cache_mb: int = flag(
        1024,
        "MiB of keys and values kept from finished requests, so that a prompt starting "
        "the same way (a chat resent with a new turn) skips that part of its prefill; "
        "0 disables it",
    )
    threads: int = flag(0, "torch CPU threads (0: torch's default)")
    seed: int = flag(0, "seed of the generator that seeds requests sent without one")
    shutdown_grace: float = flag(10.0, "seconds running generations may continue after a shutdown signal")
    log_level: str = flag("info", "uvicorn log level")


# The smallest value of each number flag (the timeouts: more than 0; --seed: any; --port: checked on its own).
AT_LEAST = {
    **dict.fromkeys(("max_stop", "prefix_cache_mb", "retry_after", "threads", "shutdown_grace"), 0),
    **dict.fromkeys(("max_batch", "max_queue", "max_connections", "max_body_bytes", "max_tokens"), 1),
    **dict.fromkeys(("max_messages", "max_message_chars", "max_total_chars", "default_max_tokens"), 1),
}
POSITIVE = ("request_timeout", "body_timeout", "header_timeout")


def parse_args(argv: list[str] | None = None) -> ServeConfig:
    """The config from the command line, every number checked and the API key found; a bad flag is one
    `error:` line and exit status 2."""
    parser = Parser(
        prog="python -m serve",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    limit_names = tuple(f.name for f in dataclasses.fields(Limits))
    add_flags(parser.add_argument_group("server"), ServeConfig, skip=limit_names)
    add_flags(parser.add_argument_group("per-request limits"), Limits)
    cfg = config_from_args(ServeConfig, parser.parse_args(argv))
    for name, value in vars(cfg).items():
        option = "--" + name.replace("_", "-")
        if isinstance(value, float) and not math.isfinite(value):
            parser.error(f"{option} must be a finite number of seconds, got {value}")
        if name in AT_LEAST and value < AT_LEAST[name]:
            parser.error(f"{option} must be at least {AT_LEAST[name]}, got {value}")
        if name in POSITIVE and value <= 0:
            parser.error(f"{option} must be more than 0, got {value}")
    if not 0 <= cfg.port <= 65535:
        parser.error(f"--port must be between 0 and 65535, got {cfg.port}")
    try:
        torch.device(pick_device(cfg.device))
    except RuntimeError as e:
        parser.error(f"bad --device {cfg.device!r}: {e}")
    cfg.api_key = api_key(cfg, parser)
    return cfg


def api_key(cfg: ServeConfig, parser: Parser) -> str | None:
    """--api-key (warned about), else the first line of --api-key-file, else $SCRATCHCHAT_API_KEY, else None."""
    key = cfg.api_key
    if key is not None:
        print(
            "warning: --api-key is visible to other users in `ps`; prefer $SCRATCHCHAT_API_KEY or --api-key-file",
            file=sys.stderr,
        )
    elif cfg.api_key_file is not None:
        try:
            key = Path(cfg.api_key_file).expanduser().read_text(encoding="utf-8").partition("\n")[0].strip()
        except (OSError, UnicodeDecodeError) as e:
            parser.error(f"cannot read --api-key-file: {e}")
    else:
        key = os.environ.get("SCRATCHCHAT_API_KEY") or None
    # Clients send the key in an HTTP header, which carries ASCII: any other key could never match.
    if key is not None and not re.fullmatch(r"[!-~]+", key):
        parser.error("the API key must be printable ASCII without spaces (HTTP headers carry nothing else)")
    return key


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    return run_cli(lambda: serve(cfg), (ValueError,))


def checkpoint_path(cfg: ServeConfig) -> Path:
    """--checkpoint, or the newest fine-tuned checkpoint."""
    if cfg.checkpoint is None:
        path = latest_checkpoint("sft")
        if path is None:
            raise ValueError(
                f"no fine-tuned checkpoint under {checkpoints_dir('sft')}: run bash speedrun.sh first "
                "(or pass --checkpoint PATH)"
            )
        return path
    path = Path(cfg.checkpoint).expanduser()
    if not path.is_dir():
        raise ValueError(f"no checkpoint directory at {path}")
    return path


def serve(cfg: ServeConfig) -> int:
    """Load the checkpoint in the background and serve it until Ctrl-C or SIGTERM; 1 if it failed to load."""
    path = checkpoint_path(cfg)
    failed: list[str] = []

    def load() -> Engine:
        try:
            if cfg.threads > 0:
                torch.set_num_threads(cfg.threads)
            model, tok, _meta = load_checkpoint(path, device=pick_device(cfg.device))
            return Engine(
                model,
                tok,
                max_batch=cfg.max_batch,
                max_queue=cfg.max_queue,
                seed=cfg.seed,
                prefix_cache_bytes=cfg.prefix_cache_mb << 20,
            )
        except Exception as e:  # a corrupt checkpoint is the user's to fix: say so and stop the server
            failed.append(f"cannot load {path}: {e}")
            print(f"error: {failed[-1]}", file=sys.stderr)
            server.should_exit = True
            raise

    # ServeConfig extends Limits: the config is the limits. --host may be a name, which must be answered too.
    app = create_app(
        load,
        limits=cfg,
        model_name=cfg.model_name,
        api_key=cfg.api_key,
        cors_origins=cfg.cors_origin,
        allowed_hosts=[cfg.host, *(cfg.allowed_host or [])],
    )
    # The engine thread runs Python between kernels; a shorter GIL switch interval (default 5 ms) lets the event
    # loop thread answer requests and hand out tokens without waiting behind it.
    sys.setswitchinterval(0.001)
    raise_file_limit()
    server = GracefulServer(
        uvicorn.Config(
            app,
            host=cfg.host,
            port=cfg.port,
            log_level=cfg.log_level,
            http=guarded(AutoHTTPProtocol, cfg.header_timeout, cfg.max_connections),
            limit_concurrency=cfg.max_connections,
            timeout_graceful_shutdown=int(cfg.shutdown_grace) + 5,
        ),
        app.state.serve,
        cfg.shutdown_grace,
    )
    print(
        f"serving {path} on http://{cfg.host}:{cfg.port}/ (web chat) and http://{cfg.host}:{cfg.port}/v1 (API)"
        + (" with an API key" if cfg.api_key else ""),
        flush=True,
    )
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C once it has shut down cleanly: the usual way to stop
        return 130
    return 1 if failed else 0


class GracefulServer(uvicorn.Server):
    """uvicorn, told to end generations cleanly: on a shutdown signal the engine gets `grace` seconds to finish,
    then ends each stream with a finish chunk and [DONE], so connections close by themselves before uvicorn's
    own (harder) timeout."""

    def __init__(self, config: uvicorn.Config, state: State, grace: float) -> None:
        super().__init__(config)
        self.state, self.grace = state, grace

    def handle_exit(self, sig, frame) -> None:
        self.state.shutting_down = True
        if self.state.engine is not None:
            self.state.engine.shutdown(grace=self.grace)
        super().handle_exit(sig, frame)

    async def startup(self, sockets=None) -> None:
        quiet_accept_errors(asyncio.get_running_loop())
        await super().startup(sockets)


def guarded(protocol: type, header_timeout: float, max_connections: int) -> type:
    """uvicorn's HTTP protocol, closing a connection that has had no request in progress for `header_timeout`
    seconds since it opened or since its last response: idle sockets and headers trickled a byte at a time
    (slowloris) would otherwise hold a file descriptor each for as long as the client likes. Connections beyond
    `max_connections` are closed at once, so that slow clients cannot use up the process's file descriptors
    (uvicorn's limit_concurrency only answers their requests 503). A body sent too slowly is the app's to
    refuse: Limits.body_timeout."""

    class Guarded(protocol):
        _timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                transport.close()
                return
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc) -> None:
            if self._timer is not None:
                self._timer.cancel()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self.loop.call_later(header_timeout, self._expire)

        def _expire(self) -> None:
            if self.cycle is None or self.cycle.response_complete:  # no request has started since _arm
                self.transport.close()

    return Guarded


def raise_file_limit() -> None:
    """Lift the soft limit on open files to the hard one: each connection is a file, and running out makes
    asyncio's accept loop spin (and log) until connections close. --max-connections stays far below it."""
    try:
        import resource

        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError):  # no such limit here (Windows), or one the OS won't grant (macOS)
        pass


def quiet_accept_errors(loop: asyncio.AbstractEventLoop) -> None:
    """Out of file descriptors, asyncio logs a traceback for every failed accept(); one line a minute says it."""
    last = -math.inf

    def handle(loop: asyncio.AbstractEventLoop, context: dict) -> None:
        nonlocal last
        if not context.get("message", "").startswith("socket.accept() out of system resource"):
            return loop.default_exception_handler(context)
        if time.monotonic() - last >= 60:
            last = time.monotonic()
            print(
                f"warning: cannot accept connections ({context.get('exception')}): too many are open; "
                "lower --max-connections or --header-timeout, or raise the limit (ulimit -n)",
                file=sys.stderr,
                flush=True,
            )

    loop.set_exception_handler(handle)


if __name__ == "__main__":
    sys.exit(main())
