#!/usr/bin/env bash
# Set up (once) and run the whole test suite plus the linter. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup-venv.sh requirements.txt requirements-dev.txt
.venv/bin/python -m ruff check .
status=0
.venv/bin/python -m pytest "$@" || status=$?
if [ "$status" -eq 5 ]; then
  echo "ERROR: pytest collected no tests" >&2
fi
exit "$status"
