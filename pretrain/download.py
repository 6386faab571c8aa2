"""Parallel, resumable, retrying file downloads, and the FineWeb-Edu corpus built on them.

`download(urls, dest_dir)` fetches each URL to `dest_dir/<basename>`: bytes go to `<name>.part`, a
dropped connection resumes with an HTTP Range request, connection errors and 5xx answers are
retried with exponential backoff, the size is checked against Content-Length / Content-Range, and
only a complete file is renamed into place, so a file that exists is never fetched again.
The SFT stage reuses it for its own parquet files.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import unquote, urlparse

import httpx

FINEWEB_URL = "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main"
FINEWEB_URL_ENV = "SCRATCHCHAT_FINEWEB_URL"  # tests (and mirrors) point this elsewhere
FINEWEB_LAST_SHARD = 1822  # the set holds shard_00000 .. shard_01822; the last one is held out for validation


class DownloadError(Exception):
    """A file could not be downloaded (after retries, or a permanent error such as 404)."""


class _Retryable(Exception):
    """A failure worth another try: dropped connection, 5xx, short body."""


def fineweb_shard_name(index: int) -> str:
    return f"shard_{index:05d}.parquet"


def fineweb_url(index: int, base_url: str | None = None) -> str:
    base = base_url or os.environ.get(FINEWEB_URL_ENV) or FINEWEB_URL
    return f"{base.rstrip('/')}/{fineweb_shard_name(index)}"


def _name(url: str) -> str:
    name = unquote(Path(urlparse(url).path).name)
    if not name:
        raise DownloadError(f"cannot derive a file name from {url}")
    return name


def _fetch_once(client: httpx.Client, url: str, part: Path, on_bytes) -> int:
    """One attempt: continue `part` from its current size. Returns the expected total size."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    try:
        with client.stream("GET", url, headers=headers) as r:
            if r.status_code == 416:  # nothing left to send: the part may already be complete
                m = re.match(r"bytes \*/(\d+)", r.headers.get("content-range", ""))
                if m and int(m.group(1)) == offset:
                    return offset
                part.unlink(missing_ok=True)
                raise _Retryable("server rejected the resume range; restarting from zero")
            if r.status_code >= 500 or r.status_code == 429:
                raise _Retryable(f"HTTP {r.status_code}")
            if r.status_code not in (200, 206):
                raise DownloadError(f"{url}: HTTP {r.status_code} {r.reason_phrase}")
            if r.status_code == 206:
                m = re.match(r"bytes (\d+)-\d+/(\d+)", r.headers.get("content-range", ""))
                if not m or int(m.group(1)) != offset:
                    part.unlink(missing_ok=True)
                    raise _Retryable(f"unexpected Content-Range {r.headers.get('content-range')!r}; restarting")
                total = int(m.group(2))
            else:  # a full body: the server ignored (or we sent no) Range, so start over
                offset = 0
                total = int(r.headers["content-length"]) if "content-length" in r.headers else -1
            with open(part, "ab" if offset else "wb") as f:
                for chunk in r.iter_bytes():  # no chunk_size: write what arrived, so a drop keeps it
                    f.write(chunk)
                    on_bytes(len(chunk))
    except httpx.TransportError as e:  # refused, reset, timed out, body cut short
        raise _Retryable(f"{type(e).__name__}: {e}") from None
    size = part.stat().st_size
    if total >= 0 and size != total:
        raise _Retryable(f"got {size} of {total} bytes")
    return size


def download_one(
    client: httpx.Client, url: str, dest: Path, retries: int = 5, backoff: float = 1.0, on_bytes=lambda n: None
) -> bool:
    """Fetch `url` to `dest` unless it is already there. Returns True if anything was downloaded."""
    if dest.exists():
        return False
    part = dest.with_name(dest.name + ".part")
    for attempt in range(retries + 1):
        try:
            _fetch_once(client, url, part, on_bytes)
            os.replace(part, dest)
            return True
        except _Retryable as e:
            if attempt == retries:
                raise DownloadError(
                    f"{url}: giving up after {retries + 1} attempts ({e}); "
                    f"re-run to resume from {part.stat().st_size if part.exists() else 0} bytes"
                ) from None
            time.sleep(min(backoff * 2**attempt, 60.0))
    raise AssertionError("unreachable")


def download(
    urls: Iterable[str],
    dest_dir: str | Path,
    workers: int = 8,
    retries: int = 5,
    backoff: float = 1.0,
    timeout: float = 60.0,
    progress: bool = True,
) -> list[Path]:
    """Download every URL into `dest_dir` (named by the URL's last path part), `workers` at a time; the paths, in
    order. A DownloadError names the failed URLs; the completed files stay, and a re-run resumes the rest."""
    from tqdm import tqdm

    urls = list(urls)
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    dests = [dest_dir / _name(u) for u in urls]
    if len(set(dests)) != len(dests):
        raise DownloadError("two URLs map to the same file name")
    todo = [(u, d) for u, d in zip(urls, dests) if not d.exists()]
    if not todo:
        return dests
    bar = tqdm(total=None, unit="B", unit_scale=True, desc=f"downloading {len(todo)} file(s)", disable=not progress)
    lock = threading.Lock()

    def on_bytes(n: int) -> None:
        with lock:
            bar.update(n)

    errors: list[str] = []
    limits = httpx.Limits(max_connections=workers)
    with (
        httpx.Client(timeout=timeout, follow_redirects=True, limits=limits) as client,
        ThreadPoolExecutor(max_workers=workers) as pool,
    ):

        def job(pair: tuple[str, Path]) -> None:
            try:
                download_one(client, pair[0], pair[1], retries, backoff, on_bytes)
            except DownloadError as e:
                errors.append(str(e))

        list(pool.map(job, todo))
    bar.close()
    if errors:
        raise DownloadError(f"{len(errors)} of {len(todo)} download(s) failed; first: {sorted(errors)[0]}")
    return dests
