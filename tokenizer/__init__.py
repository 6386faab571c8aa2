"""tokenizer: byte-level BPE, written from scratch (placeholder until the tokenizer lands)."""
