#!/usr/bin/env bash
# Create ./.venv and install the pinned requirements into it; a no-op when they are already there.
# Usage: scripts/setup-venv.sh [requirements files...]   (default: requirements.txt)
# llama-cpp-python compiles from source the first time (about 8 minutes on 2 cores); pip caches the
# wheel, so later venvs on the same machine install in seconds. Set CMAKE_ARGS for GPU builds,
# e.g. CMAKE_ARGS="-DGGML_CUDA=on".
set -euo pipefail
cd "$(dirname "$0")/.."
files=("${@:-requirements.txt}")
python=${PYTHON:-python3}
"$python" - <<'PY' || { echo "llama-cpp-server needs Python 3.10 or newer" >&2; exit 1; }
import sys
sys.exit(0 if sys.version_info >= (3, 10) else 1)
PY
[ -x .venv/bin/python ] || "$python" -m venv .venv
stamp=.venv/.requirements-$(cat "${files[@]}" | "$python" -c 'import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest()[:16])')
if [ ! -e "$stamp" ]; then
  echo "Installing ${files[*]} into .venv (the first llama-cpp-python build takes several minutes)..." >&2
  .venv/bin/python -m pip install --quiet --upgrade pip
  args=()
  for f in "${files[@]}"; do args+=(-r "$f"); done
  CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc 2>/dev/null || echo 2)} \
    .venv/bin/python -m pip install "${args[@]}"
  rm -f .venv/.requirements-* && touch "$stamp"
fi
