"""tokenizer: byte-level BPE written from scratch (train, encode/decode, special tokens, file formats).

from tokenizer import Tokenizer
tok = Tokenizer.train(texts, vocab_size=8192)
ids = tok.encode("hello"); tok.decode(ids)
"""

from tokenizer.bpe import (
    CHAT_SPECIAL_TOKENS,
    CL100K_PATTERN,
    GPT2_PATTERN,
    GPT4_PATTERN,
    O200K_PATTERN,
    StreamDecoder,
    Tokenizer,
)
from tokenizer.files import iter_texts

__all__ = [
    "CHAT_SPECIAL_TOKENS",
    "CL100K_PATTERN",
    "GPT2_PATTERN",
    "GPT4_PATTERN",
    "O200K_PATTERN",
    "StreamDecoder",
    "Tokenizer",
    "iter_texts",
]
