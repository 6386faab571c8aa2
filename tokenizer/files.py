"""How text corpora are read from disk.

Every stage reads documents through `iter_texts`, so "a corpus" means the same thing everywhere:
files or folders of .txt (one document per file), .jsonl ({"text": ...} per line) or .parquet
(column `text`).
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

SUFFIXES = (".txt", ".jsonl", ".parquet")


def _expand(path: Path) -> list[Path]:
    """The readable files behind one user-given path, in a stable (sorted) order."""
    if path.is_dir():
        # Folders may hold unrelated files (READMEs, manifests): take only what we can read.
        found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
        if not found:
            raise ValueError(f"no .txt, .jsonl or .parquet files in folder {path}")
        return found
    if not path.exists():
        raise ValueError(f"no such file or folder: {path}")
    if path.suffix not in SUFFIXES:
        raise ValueError(f"unsupported file type {path.suffix or '(none)'!r} for {path}; use .txt, .jsonl or .parquet")
    return [path]


def _read_file(path: Path) -> Iterator[str]:
    try:
        if path.suffix == ".txt":
            yield path.read_text(encoding="utf-8")
        elif path.suffix == ".jsonl":
            with path.open(encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        text = json.loads(line)["text"]
                    except (json.JSONDecodeError, KeyError, TypeError):
                        raise ValueError(f'{path}:{lineno}: expected a JSON object with a "text" field') from None
                    if not isinstance(text, str):
                        raise ValueError(f'{path}:{lineno}: "text" must be a string')
                    yield text
        else:
            yield from _read_parquet(path)
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not valid UTF-8 text") from None


def _read_parquet(path: Path) -> Iterator[str]:
    import pyarrow as pa  # imported lazily: only parquet readers pay for it
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        if "text" not in pf.schema_arrow.names:
            raise ValueError(f"{path}: parquet file has no 'text' column")
        kind = pf.schema_arrow.field("text").type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise ValueError(f"{path}: the 'text' column holds {kind}, not strings")
        # Row groups keep memory bounded on large shards.
        for batch in pf.iter_batches(columns=["text"]):
            for text in batch.column(0).to_pylist():
                if text is not None:
                    yield text
    except pa.ArrowException as e:  # corrupt or truncated files
        raise ValueError(f"cannot read {path}: {e}") from None


def iter_texts(paths: Iterable[str | Path]) -> Iterator[str]:
    """Yield documents from files/folders of .txt, .jsonl and .parquet; ValueError with a clear message for missing
    or unreadable paths and unsupported files. All paths are checked first, so a typo fails fast."""
    for f in [f for p in paths for f in _expand(Path(p))]:
        yield from _read_file(f)


def package_dir(name: str) -> Path | None:
    """The folder of an installed (data) package, found without importing it; None if it is not installed."""
    spec = importlib.util.find_spec(name)
    return Path(next(iter(spec.submodule_search_locations))) if spec and spec.submodule_search_locations else None


def batch_by_chars(texts: Iterable[str], chars: int) -> Iterator[list[str]]:
    """Group documents into lists of about `chars` characters: enough to amortise handing them to worker processes."""
    batch: list[str] = []
    size = 0
    for text in texts:
        batch.append(text)
        size += len(text)
        if size >= chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch
