"""Plumbing every stage shares, and nothing else: where artifacts live (`paths`), files written whole or not at
all (`files`), configs as CLI flags and the CLI entry (`cli`), devices and processes (`dist`). Nothing about
models, data or text belongs here."""
