#!/usr/bin/env bash
# Set up the pinned environment, then run the whole test suite. This is the README's test command.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/setup.sh"
cd "$root"
set +e
python -m pytest "$@"
rc=$?
# pytest exits 5 when it collected no tests: that is a broken suite, not a pass.
[ $rc -eq 5 ] && echo "no tests were collected" >&2
exit $rc
