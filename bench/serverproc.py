"""Our server under test, in a subprocess: ``python server.py --config <tmp config> --port <free port>``.

It is stopped with SIGTERM (the server drains, unloads and exits 0); its log goes to a
file in the workspace, whose tail is shown when it fails to start. The model settings
are also pinned in its environment, so a stray ``.env`` cannot change the threads or
the context behind the benchmark's back (the environment outranks the config file, and
``.env`` never overrides a variable already set).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import requests

from bench.client import BenchError
from bench.workspace import ROOT

log = logging.getLogger(__name__)

ENV_PREFIX = "LLAMA_SERVER_"
START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """One run of server.py; ``profile`` runs it under ``bench.profile_server`` (every thread).

    ``cwd`` is its working directory, where it looks for a ``.env`` (the project's root by default).
    """

    def __init__(self, config: Path, log_path: Path, profile: Path | None = None, cwd: Path = ROOT) -> None:
        self.config = config
        self.log_path = log_path
        self.profile = profile
        self.cwd = cwd
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def command(self) -> list[str]:
        server = [str(ROOT / "server.py"), "--config", str(self.config), "--port", str(self.port)]
        if self.profile is not None:
            return [sys.executable, "-m", "bench.profile_server", str(self.profile), *server]
        return [sys.executable, *server]

    def start(self) -> str:
        """Start the server and wait until /health answers; returns its base URL."""
        settings = json.loads(self.config.read_text(encoding="utf-8"))["model_manager"]
        with self.log_path.open("wb") as log_file:
            self._process = subprocess.Popen(self.command(), cwd=self.cwd, env=_pinned_env(settings),
                                             stdout=log_file, stderr=subprocess.STDOUT)
        log.info("server started pid=%d url=%s log=%s", self._process.pid, self.base_url, self.log_path)
        self._wait_ready()
        return self.base_url

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        assert self._process is not None
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise BenchError(f"the server exited with {self._process.returncode}:\n{self.log_tail()}")
            try:
                if requests.get(self.base_url + "/health", timeout=2).status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.05)
        self.stop()
        raise BenchError(f"the server did not answer /health within {START_TIMEOUT:g} s:\n{self.log_tail()}")

    def stop(self) -> int | None:
        """SIGTERM, wait for the drain; kill it if it hangs. Returns the exit status."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return None if process is None else process.returncode
        process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            log.error("the server did not stop within %g s after SIGTERM; killing it", STOP_TIMEOUT)
            process.kill()
            code = process.wait(STOP_TIMEOUT)
        log.info("server stopped exit=%s", code)
        return code

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no server log)"


def _pinned_env(settings: dict[str, Any]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    for key, value in settings.items():
        env[ENV_PREFIX + key.upper()] = value if isinstance(value, str) else json.dumps(value)
    return env


class LlamaServerProcess(ServerProcess):
    """llama.cpp's own C++ ``llama-server`` on one model file, with the given options (see ``pinned_options``)."""

    def __init__(self, binary: Path, model: Path, log_path: Path, options: list[str]) -> None:
        super().__init__(config=model, log_path=log_path)
        self.binary, self.model, self.options = binary, model, options

    def command(self) -> list[str]:
        return [str(self.binary), "-m", str(self.model), "--port", str(self.port), *self.options]

    def start(self) -> str:
        """Start it and wait until /health answers; returns its base URL."""
        with self.log_path.open("wb") as log_file:
            self._process = subprocess.Popen(self.command(), stdout=log_file, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL)
        log.info("llama-server started pid=%d url=%s model=%s options=%s", self._process.pid, self.base_url,
                 self.model.name, " ".join(self.options) or "(its defaults)")
        self._wait_ready()
        return self.base_url


def pinned_options(n_ctx: int, n_threads: int) -> list[str]:
    """llama-server options matching the in-process side: threads, context, CPU only, one slot."""
    return ["--host", "127.0.0.1", "-t", str(n_threads), "-tb", str(n_threads), "-c", str(n_ctx), "-ngl", "0",
            "-np", "1", "--no-webui"]


class RpcWorkerProcess(ServerProcess):
    """``rpc_worker.py`` with its defaults on a free loopback port: a box lending its CPU, simulated."""

    def __init__(self, log_path: Path) -> None:
        super().__init__(config=log_path, log_path=log_path)
        self.endpoint = f"127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [sys.executable, str(ROOT / "rpc_worker.py"), "--host", "127.0.0.1", "--port", str(self.port)]

    def start(self) -> str:
        """Start it and wait until it answers the RPC handshake; returns its endpoint."""
        from engine.ggml_rpc import RpcError, probe  # the server's own handshake, imported only here

        with self.log_path.open("wb") as log_file:
            self._process = subprocess.Popen(self.command(), cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                probe(self.endpoint, 2.0)
                log.info("rpc_worker started pid=%d endpoint=%s", self._process.pid, self.endpoint)
                return self.endpoint
            except RpcError:
                if self._process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise BenchError(f"rpc_worker did not start:\n{self.log_tail()}") from None
                time.sleep(0.05)
