"""The real-model set's world: a models folder holding the real GGUF, and both servers on it.

Each server runs with its own defaults. Ours gets a config naming only the models folder
(and an idle timeout long enough that nothing unloads behind the benchmark's back); every
``LLAMA_SERVER_*`` variable of the benchmark's environment is dropped, and it runs in the
temporary folder rather than the project's root, so neither a stray variable nor the
project's ``.env`` can set its threads, context or slots. llama-server gets only
``-m FILE --port P --cache-ram MiB``. The "all-cores" profile adds the thread count on
both sides: ``LLAMA_SERVER_N_THREADS`` for ours, ``-t N -tb N`` for llama-server.

Servers start when a figure first asks for them, one process per side and profile, and
stop (SIGTERM) when the benchmark ends.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from bench.client import Endpoint
from bench.serverproc import LlamaServerProcess, RpcWorkerProcess, ServerProcess
from bench.workspace import DEFAULT_SHARED_MODELS, MODELS_ENV, Model

log = logging.getLogger(__name__)

REAL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULTS, ALL_CORES = "defaults", "all-cores"
PROFILES = (DEFAULTS, ALL_CORES)
# Ours only: every layer on an rpc_worker.py on loopback (the real_rpc figure).
RPC = "rpc"
# llama-server's RAM prompt cache, in MiB. 8192 is also its default in the llama.cpp we vendor;
# given explicitly so that the alternating-conversations figure does not depend on that default.
CACHE_RAM_MIB = 8192
# Not a performance setting: the default (300 s) could unload the model between two figures.
NEVER_IDLE = {"idle_timeout": 86400, "check_interval": 3600}


def real_model_path() -> Path:
    """The real model (``$LLAMA_TEST_MODELS``, else ../shared/models)."""
    return Path(os.environ.get(MODELS_ENV, DEFAULT_SHARED_MODELS)) / REAL_FILE


def all_cores() -> int:
    """Every core this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class RealServers:
    """Our server and llama-server on the real model, one of each per profile, started on first use."""

    def __init__(self, source: Path, llama_server: Path | None, stack: ExitStack) -> None:
        if not source.is_file():
            raise FileNotFoundError(f"{source} not found (set {MODELS_ENV} to its folder, or give --model-path)")
        self.root = Path(tempfile.mkdtemp(prefix="llama-bench-real-"))
        stack.callback(shutil.rmtree, self.root, ignore_errors=True)
        models_dir = self.root / "models"
        models_dir.mkdir()
        target = models_dir / source.name  # a copy: the server refuses links leaving its folder
        shutil.copyfile(source, target)
        self.model = Model("real", source.stem, target)
        self.models_dir = models_dir
        self.llama_server = llama_server
        self._stack = stack
        self._ours: dict[str, ServerProcess] = {}
        self._theirs: dict[str, LlamaServerProcess] = {}
        self._endpoints: dict[tuple[str, str], Endpoint] = {}
        self._rpc: RpcWorkerProcess | None = None

    # ---- what each side runs with

    def our_settings(self, profile: str) -> dict[str, Any]:
        """The ``model_manager`` settings we give our server: the folder, and the threads if all-cores."""
        threads = {"n_threads": all_cores()} if profile == ALL_CORES else {}
        rpc = {"rpc_servers": [self.rpc_endpoint()]} if profile == RPC else {}
        return {"models_directory": str(self.models_dir), **NEVER_IDLE, **threads, **rpc}

    def rpc_endpoint(self) -> str:
        """An rpc_worker.py with its defaults on a loopback port, started on first use."""
        if self._rpc is None:
            self._rpc = RpcWorkerProcess(self.root / "rpc-worker.log")
            self._stack.callback(self._rpc.stop)
            self._rpc.start()
        return self._rpc.endpoint

    def their_options(self, profile: str) -> list[str]:
        """llama-server's options beyond ``-m FILE --port P``."""
        threads = ["-t", str(all_cores()), "-tb", str(all_cores())] if profile == ALL_CORES else []
        return [*threads, "--cache-ram", str(CACHE_RAM_MIB)]

    def plan(self) -> dict[str, Any]:
        """What each side is started with, for the JSON files."""
        return {profile: {"ours_settings": {k: v for k, v in self.our_settings(profile).items()
                                            if k != "models_directory"},
                          "llama_server_options": self.their_options(profile)} for profile in PROFILES}

    # ---- the servers

    def ours(self, profile: str) -> Endpoint:
        key = ("ours", profile)
        if key not in self._endpoints:
            config = self.root / f"config-{profile}.json"
            config.write_text(json.dumps({"server": {"host": "127.0.0.1"},
                                          "model_manager": self.our_settings(profile)}), encoding="utf-8")
            # Run in the temporary folder: the project's .env must not set what we leave to the defaults.
            server = ServerProcess(config, self.root / f"server-{profile}.log", cwd=self.root)
            self._stack.callback(_stop, server)
            self._endpoints[key] = Endpoint(server.start())
            self._ours[profile] = server
        return self._endpoints[key]

    def theirs(self, profile: str) -> Endpoint:
        """llama-server for ``profile``; ``LookupError`` without ``--llama-server``."""
        if self.llama_server is None:
            raise LookupError("needs --llama-server PATH (a llama-server built from the vendored llama.cpp)")
        key = ("llama-server", profile)
        if key not in self._endpoints:
            process = LlamaServerProcess(self.llama_server, self.model.path,
                                         self.root / f"llama-server-{profile}.log", self.their_options(profile))
            self._stack.callback(process.stop)
            self._endpoints[key] = Endpoint(process.start())
            self._theirs[profile] = process
        return self._endpoints[key]

    def our_pid(self, profile: str) -> int:
        self.ours(profile)
        pid = self._ours[profile].pid
        assert pid is not None
        return pid

    def effective(self, profile: str) -> dict[str, Any]:
        """What each running side of ``profile`` actually uses: context, slots, threads."""
        found: dict[str, Any] = {}
        if profile in self._ours:
            from workers import default_threads  # the server's own rule, imported only here

            threads = self.our_settings(profile).get("n_threads") or default_threads()
            found["ours"] = {**_last_match(self._ours[profile].log_path, _OUR_LOAD),
                             "n_threads": threads, "n_threads_batch": threads}
        if profile in self._theirs:
            theirs: dict[str, Any] = _last_match(self._theirs[profile].log_path, _THEIR_THREADS)
            try:
                props = self._endpoints[("llama-server", profile)].session().get(
                    self._endpoints[("llama-server", profile)].base_url + "/props", timeout=5).json()
                theirs.update(n_ctx=props["default_generation_settings"]["n_ctx"], parallel=props["total_slots"])
            except (OSError, ValueError, KeyError) as exc:
                log.debug("no /props from llama-server: %s", exc)
            found["llama-server"] = theirs
        return found


_OUR_LOAD = re.compile(r"load start .* n_ctx=(?P<n_ctx>\d+) parallel=(?P<parallel>\d+)")
_THEIR_THREADS = re.compile(r"threadpool init, n_threads = (?P<n_threads>\d+)")


def _last_match(path: Path, pattern: re.Pattern[str]) -> dict[str, int]:
    try:
        matches = [m for m in (pattern.search(line) for line in path.read_text(errors="replace").splitlines()) if m]
    except OSError:
        return {}
    return {key: int(value) for key, value in matches[-1].groupdict().items()} if matches else {}


def _stop(server: ServerProcess) -> None:
    code = server.stop()
    if code not in (0, None):
        log.warning("the server exited with %s after SIGTERM; its log:\n%s", code, server.log_tail())

