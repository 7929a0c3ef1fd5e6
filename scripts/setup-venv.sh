#!/usr/bin/env bash
# Create ./.venv and install the pinned requirements into it; a no-op when they are already there.
# Usage: scripts/setup-venv.sh [--dry-run] [requirements files...]   (default: requirements.txt)
#
# llama-cpp-python compiles from source once per machine and build configuration: the wheel is kept
# under $LLAMA_SERVER_WHEELS (default ~/.cache/llama-cpp-server/wheels), in a folder named for the
# version and a hash of the CMake options, so later venvs install it in seconds and a build made with
# other options never stands in for this one (pip's own cache keys wheels by version alone).
# Every build includes llama.cpp's RPC backend (-DGGML_RPC=on: one model split across machines).
# CMAKE_ARGS adds options, e.g. CMAKE_ARGS="-DGGML_CUDA=on"; left unset, the venv keeps the options
# it was built with (recorded in .venv/.llama-cmake-args), so ./run.sh never undoes a GPU build.
# --dry-run prints what would be built or installed and changes nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
dry_run=0
if [ "${1:-}" = --dry-run ]; then dry_run=1; shift; fi
files=("${@:-requirements.txt}")
python=${PYTHON:-python3}
"$python" - <<'PY' || { echo "llama-cpp-server needs Python 3.10 or newer" >&2; exit 1; }
import sys
sys.exit(0 if sys.version_info >= (3, 10) else 1)
PY
digest() { "$python" -c 'import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest()[:16])'; }

RECORD=.venv/.llama-cmake-args  # the CMAKE_ARGS of the installed build, RPC left implicit
BUILD=.venv/.llama-build        # the build key of the installed llama-cpp-python wheel
# || true: with pipefail, grep finding nothing would end the script here, before the message below.
pin=$(grep -hE '^llama-cpp-python==' "${files[@]}" | head -n 1 | tr -d '[:space:]') || true
[ -n "$pin" ] || { echo "setup-venv.sh: ${files[*]} pin no llama-cpp-python" >&2; exit 1; }
extra=${CMAKE_ARGS-$(cat "$RECORD" 2>/dev/null || true)}
cmake_args="-DGGML_RPC=on${extra:+ $extra}"
key=${pin#*==}-$(printf '%s\n%s\n' "$pin" "$cmake_args" | digest)
wheels=${LLAMA_SERVER_WHEELS:-${XDG_CACHE_HOME:-$HOME/.cache}/llama-cpp-server/wheels}/$key
stamp=.venv/.requirements-$( { cat "${files[@]}"; echo "$key"; } | digest)

if [ "$dry_run" = 1 ]; then
  if [ "$(cat "$BUILD" 2>/dev/null || true)" = "$key" ]; then
    echo "llama-cpp-python: installed build kept (CMAKE_ARGS=$cmake_args)"
  elif compgen -G "$wheels/*.whl" >/dev/null; then
    echo "llama-cpp-python: would install the cached build $wheels (CMAKE_ARGS=$cmake_args)"
  else
    echo "llama-cpp-python: would build from source into $wheels (CMAKE_ARGS=$cmake_args)"
  fi
  [ -e "$stamp" ] || echo "would install ${files[*]} into .venv"
  exit 0
fi

[ -x .venv/bin/python ] || "$python" -m venv .venv
[ -e "$stamp" ] && exit 0
echo "Installing ${files[*]} into .venv..." >&2
.venv/bin/python -m pip install --quiet --upgrade pip
if [ "$(cat "$BUILD" 2>/dev/null || true)" != "$key" ]; then
  if ! compgen -G "$wheels/*.whl" >/dev/null; then
    echo "Building $pin with CMAKE_ARGS=$cmake_args (once per machine; about 6 minutes on 2 cores)..." >&2
    mkdir -p "$(dirname "$wheels")"
    tmp=$(mktemp -d "$wheels.tmp.XXXXXX")
    CMAKE_ARGS=$cmake_args \
      CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc 2>/dev/null || echo 2)} \
      .venv/bin/python -m pip wheel --no-deps --no-cache-dir --no-binary llama-cpp-python -w "$tmp" "$pin"
    rm -rf "$wheels" && mv "$tmp" "$wheels"  # whole or absent: an interrupted build leaves only a .tmp
  fi
  .venv/bin/python -m pip install --no-deps --force-reinstall "$wheels"/*.whl
  printf '%s\n' "$key" >"$BUILD"
  printf '%s\n' "$extra" >"$RECORD"
fi
args=()
for f in "${files[@]}"; do args+=(-r "$f"); done
.venv/bin/python -m pip install "${args[@]}"
rm -f .venv/.requirements-* && touch "$stamp"
