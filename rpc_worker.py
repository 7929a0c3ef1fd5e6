"""Lend this machine's CPU or GPU to a llama-cpp-server on another box (llama.cpp's RPC backend).

    python rpc_worker.py [--host H] [--port P] [--threads N] [--cache DIR]

It speaks the protocol of llama.cpp's own ``rpc-server`` (either can serve either's clients when
both come from the same llama.cpp version) and serves one client, that is one loaded model, at a
time. The protocol has no authentication and no encryption: anyone who can reach the port can
run code on the lent device and read what it holds. Bind to loopback (the default) or to a
trusted LAN address, never to an untrusted network.

Settings come from the command line, else from LLAMA_RPC_HOST, LLAMA_RPC_PORT,
LLAMA_RPC_THREADS and LLAMA_RPC_CACHE (the systemd unit reads them from .env).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

DEFAULT_PORT = 50052  # llama.cpp's rpc-server's default


def parse_args(argv: list[str], environ: dict[str, str] | os._Environ[str] = os.environ) -> argparse.Namespace:
    """The command line over the environment over the defaults."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default=environ.get("LLAMA_RPC_HOST", "127.0.0.1"),
                        help="address to listen on (default 127.0.0.1; the protocol has no authentication)")
    # String defaults go through ``type`` like the command line, so a bad variable is a usage error.
    parser.add_argument("--port", type=int, default=environ.get("LLAMA_RPC_PORT", str(DEFAULT_PORT)))
    parser.add_argument("--threads", type=int, default=environ.get("LLAMA_RPC_THREADS") or None,
                        help="CPU compute threads (default: one per physical core)")
    parser.add_argument("--cache", default=environ.get("LLAMA_RPC_CACHE") or None,
                        help="folder where received weights are kept by hash, so a model reloads without "
                             "sending them again")
    args = parser.parse_args(argv)
    if not 0 < args.port < 65536:
        parser.error(f"--port {args.port}: not a port number")
    if ":" in args.host:
        parser.error("--host: IPv6 addresses are not supported by ggml's RPC endpoint format")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from engine import ggml_rpc
    from workers import default_threads

    if not ggml_rpc.supported():
        print("rpc_worker: this llama-cpp-python has no RPC backend; rebuild it with scripts/setup-venv.sh",
              file=sys.stderr)
        return 1
    if args.cache:
        Path(args.cache).mkdir(parents=True, exist_ok=True)
    # The server loop runs inside C, where Python's own handlers never get to run: let the
    # default actions stop the process at once.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    endpoint = f"{args.host}:{args.port}"
    devices = [ggml_rpc.describe(dev) for dev in ggml_rpc.local_devices()]
    print(f"rpc_worker: serving {', '.join(f'{d.name} ({d.description})' for d in devices)} on {endpoint}",
          flush=True)
    try:
        ggml_rpc.serve(endpoint, args.cache, args.threads or default_threads())
    except ggml_rpc.RpcError as exc:
        print(f"rpc_worker: {exc}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
