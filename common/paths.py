"""The layout of $SCRATCHCHAT_HOME: every stage finds the others' files here (see docs/DESIGN.md)."""

from __future__ import annotations

import os
from pathlib import Path


def scratchchat_home() -> Path:
    """$SCRATCHCHAT_HOME, or ~/.cache/scratchchat when it is unset or empty."""
    env = os.environ.get("SCRATCHCHAT_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "scratchchat"


def tokenizer_path() -> Path:
    """The tokenizer every stage uses unless told otherwise."""
    return scratchchat_home() / "tokenizer" / "tokenizer.json"


def data_dir(name: str) -> Path:
    """Raw documents of a corpus (parquet + manifest), or downloads such as data/smoltalk."""
    return scratchchat_home() / "data" / name


def tokens_dir(corpus: str) -> Path:
    return scratchchat_home() / "tokens" / corpus


def checkpoints_dir(kind: str) -> Path:
    """step_N/ checkpoints of a run: "base" (pretraining) or "sft"."""
    return scratchchat_home() / "checkpoints" / kind


def report_dir() -> Path:
    return scratchchat_home() / "report"
