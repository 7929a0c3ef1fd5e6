#!/usr/bin/env bash
# Install llama-cpp-server for the current user, no root needed: .venv with the pinned
# requirements, .env from .env.example, and a systemd user service started now and at login.
# Safe to run again: it changes only what differs (a second run reports "unchanged").
# Run ./install.sh --help for the options.
set -euo pipefail

SERVER_NAME=llama-cpp-server
RPC_WORKER_NAME=llama-cpp-rpc-worker
NAME=$SERVER_NAME  # the unit this run installs; --rpc-worker switches it
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
UNIT_DIR=$HOME/.config/systemd/user
LLAMA_BUILD_RECORD=.venv/.llama-cmake-args  # written by scripts/setup-venv.sh

usage() {
  cat <<EOF
Usage: ./install.sh [--rpc-worker] [--cuda | --vulkan | --metal] [--no-service] [--dry-run]
       ./install.sh [--rpc-worker] --uninstall [--dry-run]

Sets up .venv (llama-cpp-python is compiled from source, with llama.cpp's RPC backend: Python
3.10+ and a C/C++ compiler needed), creates .env from .env.example if missing, installs and
starts the systemd user service $SERVER_NAME (~/.config/systemd/user/$SERVER_NAME.service).

  --rpc-worker               install $RPC_WORKER_NAME instead: this box lends its CPU or GPU
                             to a server on another box (rpc_worker.py; LLAMA_RPC_* in .env).
                             The RPC protocol has no authentication: trusted LANs only.
  --cuda, --vulkan, --metal  build llama-cpp-python for that GPU backend
                             (adds -DGGML_CUDA=on, -DGGML_VULKAN=on or -DGGML_METAL=on to
                             CMAKE_ARGS; an existing build made with other CMAKE_ARGS is rebuilt)
  --no-service               skip the systemd unit; start the server with ./run.sh
  --uninstall                stop, disable and remove the unit; keeps .venv, models, config, .env
  --dry-run                  print what would be done, change nothing
  -h, --help                 this help

Environment: CMAKE_ARGS (extra llama.cpp build options; unset, the existing build is kept),
PYTHON (interpreter for .venv,
default python3), LLAMA_SERVER_SKIP_VENV=1 (leave .venv alone: for tests and packagers).
EOF
}

say() { printf '%s\n' "$*"; }
said() { [ "$dry_run" = 1 ] || say "$@"; }  # reports a change, which --dry-run did not make
warn() { printf 'install.sh: %s\n' "$*" >&2; }
die() { warn "$*"; exit 1; }

# Runs a command that changes something, or only prints it under --dry-run.
run() {
  if [ "$dry_run" = 1 ]; then
    say "would run: $*"
  else
    "$@"
  fi
}

has_systemd_user() {
  command -v systemctl >/dev/null 2>&1 && systemctl --user show-environment >/dev/null 2>&1
}

# --- .venv ---------------------------------------------------------------------------------

check_python() {
  local python=${PYTHON:-python3}
  command -v "$python" >/dev/null 2>&1 ||
    die "$python not found: install Python 3.10+ (Debian/Ubuntu: apt install python3 python3-venv)"
  "$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' ||
    die "llama-cpp-server needs Python 3.10 or newer; $python is $("$python" -V 2>&1). Set PYTHON=/path/to/python3.X"
  [ -x .venv/bin/python ] || "$python" -c 'import ensurepip, venv' 2>/dev/null ||
    die "$python cannot create virtual environments (Debian/Ubuntu: apt install python3-venv)"
}

# The first of $CC (or $CXX) and the usual names that exists; CC may carry arguments ("ccache gcc").
find_tool() {
  local name
  for name in "$@"; do
    [ -n "$name" ] && command -v "${name%% *}" && return
  done
  return 0
}

check_compiler() {
  local cc cxx
  cc=$(find_tool "${CC:-}" cc gcc clang)
  cxx=$(find_tool "${CXX:-}" c++ g++ clang++)
  if [ -z "$cc" ] || [ -z "$cxx" ]; then
    die "no C/C++ compiler found, needed to build llama-cpp-python (Debian/Ubuntu: apt install build-essential; macOS: xcode-select --install)"
  fi
}

# What decides whether the service must restart: the requirements stamp and the build record.
venv_state() {
  ls -1 .venv/.requirements-* 2>/dev/null || true
  cat "$LLAMA_BUILD_RECORD" .venv/.llama-build 2>/dev/null || true
}

setup_venv() {
  if [ "${LLAMA_SERVER_SKIP_VENV:-}" = 1 ]; then
    say ".venv: skipped (LLAMA_SERVER_SKIP_VENV=1)"
    return
  fi
  check_python
  check_compiler
  # setup-venv.sh builds (once per machine and build options) or reuses the wheel. Without a GPU
  # flag or CMAKE_ARGS it keeps the options the venv was built with, so a plain re-run never
  # turns a GPU build back into a CPU one.
  local setup=(env) before
  if [ -n "$gpu_args" ] || [ -n "${CMAKE_ARGS+set}" ]; then
    local cmake_args=${CMAKE_ARGS:-}$gpu_args
    setup=(env CMAKE_ARGS="${cmake_args# }")
  fi
  setup+=(scripts/setup-venv.sh)
  before=$(venv_state)
  if [ "$dry_run" = 1 ]; then
    "${setup[@]}" --dry-run requirements.txt
    say "would run: ${setup[*]} requirements.txt"
    return
  fi
  "${setup[@]}" requirements.txt
  if [ "$before" = "$(venv_state)" ]; then say ".venv: unchanged"; else say ".venv: updated"; venv_changed=1; fi
}

# --- configuration -------------------------------------------------------------------------

setup_config() {
  if [ -e .env ]; then
    say ".env: kept (yours)"
  else
    run cp .env.example .env
    said ".env: created from .env.example (machine-specific settings go there)"
  fi
  if [ -e config.json ]; then
    say "config.json: kept"
  else
    say "config.json: missing; the server uses its built-in defaults (see README.md, Configuration)"
  fi
  [ -d models ] || { run mkdir -p models; said "models/: created (put .gguf files there)"; }
}

# The address the server will listen on: .env, then config.json, then the defaults.
URL_PROGRAM='
import json, sys
from pathlib import Path
root = Path(sys.argv[1])
env = {}
try:
    for line in (root / ".env").read_text(encoding="utf-8").splitlines():
        key, sep, value = line.strip().partition("=")
        if sep and not key.startswith("#"):
            env[key.strip()] = value.strip().strip("\"\x27")
except OSError:
    pass
try:
    server = json.loads((root / "config.json").read_text(encoding="utf-8")).get("server") or {}
except (OSError, ValueError, AttributeError):
    server = {}
host = env.get("LLAMA_SERVER_HOST") or server.get("host") or "127.0.0.1"
port = env.get("LLAMA_SERVER_PORT") or server.get("port") or 8080
host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
print(f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}")
'

server_url() {
  local python url
  for python in .venv/bin/python "${PYTHON:-python3}"; do
    url=$("$python" -c "$URL_PROGRAM" "$ROOT" 2>/dev/null) && [ -n "$url" ] && break
    url=""
  done
  say "${url:-http://127.0.0.1:8080}"
}

# --- the systemd user unit -----------------------------------------------------------------

print_foreground() {
  if [ "$NAME" = "$RPC_WORKER_NAME" ]; then
    say "Start the RPC worker in the foreground instead (Ctrl-C stops it):"
    say "  cd $ROOT && .venv/bin/python rpc_worker.py --host 127.0.0.1 --port 50052"
    return
  fi
  say "Start the server in the foreground instead (Ctrl-C stops it, finishing running requests):"
  say "  cd $ROOT && ./run.sh"
  say "It will listen on $(server_url)"
}

check_unit_path() {
  case $ROOT in
    *[[:space:]%\"\'\\\$]*)
      die "cannot write a systemd unit for '$ROOT': the path has a space or one of % \" ' \\ \$. Move the folder, or use --no-service and ./run.sh" ;;
  esac
}

write_unit() {
  local template rendered
  template=$(<"$ROOT/$NAME.service")
  rendered=${template//@PROJECT_DIR@/"$ROOT"}
  if [ -f "$UNIT_PATH" ] && [ "$(<"$UNIT_PATH")" = "$rendered" ]; then
    say "$UNIT_PATH: unchanged"
    return
  fi
  if [ "$dry_run" = 1 ]; then
    say "would write $UNIT_PATH"
  else
    mkdir -p "$UNIT_DIR"
    local tmp
    tmp=$(mktemp "$UNIT_DIR/.$NAME.service.XXXXXX")
    printf '%s\n' "$rendered" >"$tmp"
    chmod 644 "$tmp"
    mv -f "$tmp" "$UNIT_PATH"
    say "$UNIT_PATH: written"
  fi
  unit_changed=1
}

install_service() {
  if [ "$service" = 0 ]; then
    say "systemd unit: skipped (--no-service)"
    print_foreground
    return
  fi
  if ! has_systemd_user; then
    say "No systemd user instance here (\`systemctl --user\` is unavailable: a container, WSL"
    say "without systemd, or not a systemd system), so no service was installed."
    print_foreground
    return
  fi
  check_unit_path
  write_unit
  [ "$unit_changed" = 1 ] && run systemctl --user daemon-reload
  # A running server keeps its old unit and old llama.cpp build until restarted.
  if [ "$unit_changed" = 1 ] || [ "$venv_changed" = 1 ]; then
    run systemctl --user try-restart "$NAME.service"
  fi
  run systemctl --user enable --now "$NAME.service"
  said ""
  said "$NAME is enabled and started."
  if [ "$NAME" = "$RPC_WORKER_NAME" ]; then
    say "  listens on LLAMA_RPC_HOST:LLAMA_RPC_PORT from .env (default 127.0.0.1:50052); no authentication:"
    say "  bind it to a trusted LAN address only, then list it in the server's rpc_servers"
  else
    say "  URL:     $(server_url)"
  fi
  say "  logs:    journalctl --user -u $NAME -f"
  say "  status:  systemctl --user status $NAME"
  say "  restart: systemctl --user restart $NAME   (after editing .env or config.json)"
  if [ ! -e "/var/lib/systemd/linger/$(id -un)" ]; then
    say "It runs while you are logged in. To start it at boot and keep it after logout:"
    say "  loginctl enable-linger $(id -un)"
  fi
}

uninstall() {
  if [ ! -e "$UNIT_PATH" ]; then
    say "$UNIT_PATH: not installed, nothing to remove"
    return
  fi
  if has_systemd_user; then
    run systemctl --user disable --now "$NAME.service"
  else
    say "No systemd user instance here; removing the unit file only."
  fi
  run rm -f "$UNIT_PATH"
  said "$UNIT_PATH: removed"
  has_systemd_user && run systemctl --user daemon-reload
  say "Kept: .venv, models/, config.json and .env (delete the folder to remove everything)."
}

# --- main ----------------------------------------------------------------------------------

gpu_args="" service=1 dry_run=0 mode=install unit_changed=0 venv_changed=0
while [ $# -gt 0 ]; do
  case $1 in
    --rpc-worker) NAME=$RPC_WORKER_NAME ;;
    --cuda) gpu_args+=" -DGGML_CUDA=on" ;;
    --vulkan) gpu_args+=" -DGGML_VULKAN=on" ;;
    --metal) gpu_args+=" -DGGML_METAL=on" ;;
    --no-service) service=0 ;;
    --uninstall) mode=uninstall ;;
    --dry-run) dry_run=1 ;;
    -h | --help) usage; exit 0 ;;
    *) warn "unknown option: $1"; usage >&2; exit 2 ;;
  esac
  shift
done
if [ "$mode" = uninstall ] && { [ -n "$gpu_args" ] || [ "$service" = 0 ]; }; then
  warn "--uninstall takes no other option than --dry-run and --rpc-worker"; usage >&2; exit 2
fi
UNIT_PATH=$UNIT_DIR/$NAME.service

cd "$ROOT"
if [ "$mode" = uninstall ]; then
  uninstall
else
  [ "$(id -u)" != 0 ] || warn "running as root: .venv and the service will belong to root, not to your user"
  setup_venv
  setup_config
  install_service
fi
