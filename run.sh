#!/usr/bin/env bash
# Set up (once) and start the server in the foreground. Extra arguments go to server.py,
# e.g. ./run.sh --port 8081 --models-dir ~/models
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup-venv.sh requirements.txt
mkdir -p models
exec .venv/bin/python server.py "$@"
