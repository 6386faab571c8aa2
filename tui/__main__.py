"""`python -m tui [--url URL] [--api-key KEY] [--model NAME] ...`: start the chat client."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path


def parse_args(argv: list[str] | None = None):
    # Imported here, not at the top, so `--help` and bad flags answer before Textual loads.
    from .app import Config

    defaults = Config()
    parser = argparse.ArgumentParser(
        prog="python -m tui", description="Chat with an OpenAI-compatible server in the terminal."
    )
    for f in dataclasses.fields(Config):
        default = getattr(defaults, f.name)
        kind = {"float": float, "int": int, "Path": Path}.get(f.type, str)  # f.type: the annotation, as text
        shown = (
            "" if f.name == "api_key" or default == "" or "default" in f.metadata["help"] else f" (default: {default})"
        )
        parser.add_argument(
            f"--{f.name.replace('_', '-')}", type=kind, default=default, help=f.metadata["help"] + shown
        )
    args = parser.parse_args(argv)
    config = Config(**vars(args))
    if not config.url.startswith(("http://", "https://")):
        parser.error(f"--url must start with http:// or https://, got {config.url!r}")
    if config.timeout <= 0 or config.retry <= 0:
        parser.error("--timeout and --retry must be positive")
    if not 0 <= config.temperature <= 2 or config.max_tokens < 1:
        parser.error("--temperature must be between 0 and 2 and --max-tokens at least 1")
    return config


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    from .app import ChatApp
    from .store import Store, StoreError

    try:
        store = Store(config.db)
    except StoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    ChatApp(config, store).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
