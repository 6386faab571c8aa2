"""`python -m serve [--checkpoint PATH]`: serve a checkpoint over the OpenAI-compatible API and the web page.

With no --checkpoint it serves the newest fine-tuned (SFT) checkpoint under $SCRATCHCHAT_HOME. It binds
127.0.0.1 unless told otherwise; --api-key (or $SCRATCHCHAT_API_KEY) turns on bearer-token auth. On Ctrl-C or
SIGTERM it stops taking requests, lets running generations finish for --shutdown-grace seconds, then ends
the rest cleanly (their streams get a finish_reason and [DONE]).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from serve.app import Limits

HELP = {
    "checkpoint": "checkpoint directory (default: newest under $SCRATCHCHAT_HOME/checkpoints/sft)",
    "host": "interface to bind (127.0.0.1 keeps it local; 0.0.0.0 exposes it)",
    "port": "TCP port",
    "api_key": "require 'Authorization: Bearer KEY' (default: $SCRATCHCHAT_API_KEY, else no auth)",
    "model_name": "the model id clients send and /v1/models lists",
    "cors_origins": "origins allowed to call the API from a browser (repeatable; default: none)",
    "device": "cpu, cuda, mps or auto",
    "max_batch": "sequences decoded together (KV-cache slots)",
    "max_queue": "requests allowed to wait for a slot before answering 429",
    "threads": "torch CPU threads (0: torch's default)",
    "seed": "seed of the generator that seeds requests sent without one",
    "shutdown_grace": "seconds running generations may continue after a shutdown signal",
    "max_messages": "messages per chat request",
    "max_message_chars": "characters per message",
    "max_total_chars": "characters in all messages (or the prompt) together",
    "max_tokens": "largest max_tokens a request may ask for",
    "default_max_tokens": "max_tokens of a chat request that does not say",
    "max_stop": "stop sequences per request",
    "max_body_bytes": "largest request body (413 above it)",
    "request_timeout": "seconds a request may take, queueing included",
    "retry_after": "seconds clients are told to wait (Retry-After) on 429/503",
    "log_level": "uvicorn log level",
}


@dataclass
class ServeConfig(Limits):
    checkpoint: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    model_name: str = "scratchchat"
    cors_origins: list[str] = field(default_factory=list)
    device: str = "auto"
    max_batch: int = 8
    max_queue: int = 64
    threads: int = 0
    seed: int = 0
    shutdown_grace: float = 10.0
    log_level: str = "info"


def parse_args(argv: list[str] | None = None) -> ServeConfig:
    parser = argparse.ArgumentParser(prog="python -m serve", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    limit_names = {f.name for f in dataclasses.fields(Limits)}
    server, limits = parser.add_argument_group("server"), parser.add_argument_group("per-request limits")
    for f in sorted(dataclasses.fields(ServeConfig), key=lambda f: f.name in limit_names):
        group = limits if f.name in limit_names else server
        if f.name == "cors_origins":
            group.add_argument("--cors-origin", dest=f.name, action="append", default=[], help=HELP[f.name])
            continue
        kind = {"int": int, "float": float}.get(f.type, str)
        group.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=kind, default=f.default,
                           help=HELP[f.name])
    cfg = ServeConfig(**vars(parser.parse_args(argv)))
    for name in ("max_batch", "max_queue", "max_messages", "max_message_chars", "max_total_chars", "max_tokens",
                 "default_max_tokens", "max_body_bytes"):
        if getattr(cfg, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if cfg.request_timeout <= 0 or cfg.shutdown_grace < 0:
        parser.error("--request-timeout must be positive and --shutdown-grace not negative")
    return cfg


def pick_device(name: str):
    import torch
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    from pretrain.checkpoint import latest_checkpoint, load_checkpoint
    from tokenizer.files import scratchchat_home

    if cfg.checkpoint is None:
        path = latest_checkpoint("sft")
        if path is None:
            print(f"error: no fine-tuned checkpoint under {scratchchat_home() / 'checkpoints' / 'sft'}: "
                  "run bash speedrun.sh first (or pass --checkpoint PATH)", file=sys.stderr)
            return 1
    else:
        path = Path(cfg.checkpoint).expanduser()
        if not path.is_dir():
            print(f"error: no checkpoint directory at {path}", file=sys.stderr)
            return 1
    try:
        device = pick_device(cfg.device)
    except RuntimeError as e:
        print(f"error: bad --device {cfg.device!r}: {e}", file=sys.stderr)
        return 2

    import uvicorn

    from serve.app import create_app
    from serve.engine import Engine

    failed: list[str] = []

    def load() -> Engine:
        try:
            if cfg.threads > 0:
                import torch
                torch.set_num_threads(cfg.threads)
            model, tok, _meta = load_checkpoint(path, device=str(device))
            return Engine(model, tok, max_batch=cfg.max_batch, max_queue=cfg.max_queue, seed=cfg.seed)
        except Exception as e:  # a corrupt checkpoint is the user's to fix: say so and stop the server
            failed.append(f"cannot load {path}: {e}")
            print(f"error: {failed[-1]}", file=sys.stderr)
            server.should_exit = True
            raise

    limits = Limits(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(Limits)})
    api_key = cfg.api_key or os.environ.get("SCRATCHCHAT_API_KEY") or None
    app = create_app(load, limits=limits, model_name=cfg.model_name, api_key=api_key, cors_origins=cfg.cors_origins)

    class Server(uvicorn.Server):
        """uvicorn, told to end generations cleanly: on a shutdown signal the engine gets `shutdown_grace`
        seconds to finish, then ends each stream with a finish chunk and [DONE], so connections close by
        themselves before uvicorn's own (harder) timeout."""

        def handle_exit(self, sig, frame) -> None:
            state = app.state.serve
            state.shutting_down = True
            if state.engine is not None:
                state.engine.shutdown(grace=cfg.shutdown_grace)
            super().handle_exit(sig, frame)

    # The engine thread runs Python between kernels; a shorter GIL switch interval (default 5 ms) lets the event
    # loop thread answer requests and hand out tokens without waiting behind it.
    sys.setswitchinterval(0.001)
    server = Server(uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level,
                                   timeout_graceful_shutdown=int(cfg.shutdown_grace) + 5))
    print(f"serving {path} on http://{cfg.host}:{cfg.port}/ (web chat) and http://{cfg.host}:{cfg.port}/v1 (API)"
          + (" with an API key" if api_key else ""), flush=True)
    server.run()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
