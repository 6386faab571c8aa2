"""`python -m tokenizer`: train a BPE tokenizer, encode text with it, and measure its compression.

python -m tokenizer train --input corpus/ --vocab-size 8192   # -> $SCRATCHCHAT_HOME/tokenizer/tokenizer.json
echo "hello" | python -m tokenizer encode                     # ids, one line
python -m tokenizer stats --input held_out.txt                # bytes per token, vs GPT-2 / cl100k
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

from common.cli import Parser, add_flags, flag, run_cli
from common.paths import tokenizer_path
from tokenizer.bpe import CL100K_PATTERN, GPT2_PATTERN, GPT4_PATTERN, O200K_PATTERN, Tokenizer
from tokenizer.files import iter_texts
from tokenizer.openai_vocabs import compression

PATTERNS = {"gpt4": GPT4_PATTERN, "cl100k": CL100K_PATTERN, "o200k": O200K_PATTERN, "gpt2": GPT2_PATTERN}


@dataclass
class TrainConfig:
    input: list[str] = flag(help="files or folders of .txt / .jsonl / .parquet", nargs="+")
    vocab_size: int = flag(help="total vocabulary: 256 bytes + merges + special tokens")
    out: str = flag("", "where to write tokenizer.json (default: $SCRATCHCHAT_HOME/tokenizer/tokenizer.json)")
    pattern: str = flag("gpt4", f"split pattern: one of {', '.join(PATTERNS)}, or a regex")
    workers: int = flag(0, "processes that split the text (0: all cores)")
    max_chars: int = flag(0, "train on the first N characters of the input, whole documents (0: all of it)")


@dataclass
class EncodeConfig:
    text: str = flag(None, "text to encode (default: read stdin)", nargs="?")
    tokenizer: str = flag("", "tokenizer.json (default: $SCRATCHCHAT_HOME/tokenizer/tokenizer.json)")
    allow_special: bool = flag(False, "encode special-token spellings as special tokens instead of text")


@dataclass
class StatsConfig:
    input: list[str] = flag(help="held-out files or folders of .txt / .jsonl / .parquet", nargs="+")
    tokenizer: str = flag("", "tokenizer.json (default: $SCRATCHCHAT_HOME/tokenizer/tokenizer.json)")


def _load(path: str) -> Tokenizer:
    return Tokenizer.load(Path(path) if path else tokenizer_path())


def _first_chars(texts, limit: int):
    """Documents until `limit` characters have gone by (web-scale corpora: a sample trains a tokenizer as well)."""
    for text in texts:
        if limit <= 0:
            return
        yield text
        limit -= len(text)


def train(cfg: TrainConfig) -> None:
    pattern = PATTERNS.get(cfg.pattern, cfg.pattern)
    out = Path(cfg.out) if cfg.out else tokenizer_path()
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; give a file name like {out / 'tokenizer.json'}")
    t0 = time.time()
    texts = iter_texts(cfg.input)
    if cfg.max_chars > 0:
        texts = _first_chars(texts, cfg.max_chars)
    tok = Tokenizer.train(texts, cfg.vocab_size, pattern, progress=True, workers=cfg.workers or None)
    if tok.vocab_size < cfg.vocab_size:
        print(
            f"note: the text only had pairs for {tok.vocab_size} tokens (asked for {cfg.vocab_size})", file=sys.stderr
        )
    tok.save(out)
    print(f"trained a {tok.vocab_size}-token tokenizer in {time.time() - t0:.1f}s -> {out}")
    print("next: python -m pretrain.data tokenize  (encode the corpus into token shards)")


def encode(cfg: EncodeConfig) -> None:
    tok = _load(cfg.tokenizer)
    text = sys.stdin.read() if cfg.text is None else cfg.text
    ids = tok.encode(text, allowed_special="all" if cfg.allow_special else frozenset())
    print(" ".join(map(str, ids)))


def stats(cfg: StatsConfig) -> None:
    tok = _load(cfg.tokenizer)
    texts = list(iter_texts(cfg.input))
    n_bytes = sum(len(t.encode("utf-8", "replace")) for t in texts)
    if n_bytes == 0:
        raise ValueError("no text in --input")
    print(f"{n_bytes:,} bytes in {len(texts):,} documents")
    print(f"{'tokenizer':<12} {'vocab':>8} {'tokens':>12} {'bytes/token':>12}")
    for name, vocab, n_tokens in compression(tok, texts):
        print(f"{name:<12} {vocab:>8,} {n_tokens:>12,} {n_bytes / max(n_tokens, 1):>12.3f}")


COMMANDS = {  # name: (function, its flags, help)
    "train": (train, TrainConfig, "train a tokenizer on text files"),
    "encode": (encode, EncodeConfig, "print the token ids of a text"),
    "stats": (stats, StatsConfig, "bytes per token on held-out text, next to GPT-2 and cl100k"),
}


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="python -m tokenizer", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for name, (_, config, help_) in COMMANDS.items():
        add_flags(sub.add_parser(name, help=help_, description=help_), config)
    args = vars(parser.parse_args(argv))
    run, config, _ = COMMANDS[args.pop("command")]
    # every error a user can cause is raised as ValueError with a readable message
    return run_cli(lambda: run(config(**args)), (ValueError,))


if __name__ == "__main__":
    sys.exit(main())
