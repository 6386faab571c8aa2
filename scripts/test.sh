#!/usr/bin/env bash
# Set up the pinned environment, then run the whole test suite. This is the README's test command.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# System tools the tests drive for real: tmux (terminal client) and Chromium (web page).
missing=()
command -v tmux >/dev/null || missing+=(tmux)
command -v chromium >/dev/null || missing+=(chromium)
if [ ${#missing[@]} -gt 0 ]; then
    sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
    echo "installing ${missing[*]} with apt..."
    $sudo apt-get update -qq && $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi
source "$root/scripts/setup.sh"
cd "$root"
set +e
# Lint and format check first (one ruff config in pyproject.toml); the tests run either way, and either failing
# fails the run.
ruff check . && ruff format --check .
lint=$?
# Two workers, one test file each at a time (module fixtures such as the quick speedrun are built once): the
# subprocess-heavy tests wait on servers, browsers and torchrun, so two overlap well even on 2 cores (8.6 min vs
# 12.2 min serial there). Pass -n 0 to run serially.
python -m pytest -n 2 --dist loadfile "$@"
rc=$?
# pytest exits 5 when it collected no tests: that is a broken suite, not a pass.
[ $rc -eq 5 ] && echo "no tests were collected" >&2
[ $rc -eq 0 ] && [ $lint -ne 0 ] && { echo "ruff check or ruff format --check failed (see above)" >&2; rc=1; }
exit $rc
