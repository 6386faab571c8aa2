"""tui: a terminal chat client for any OpenAI-compatible server (`python -m tui`).

It speaks HTTP only and imports nothing else of scratchchat, so it works with this
project's server and with any other. Chats persist in SQLite under the user's data dir.
"""
