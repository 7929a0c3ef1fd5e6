"""The manager's loader: every model instance runs in a worker process of its own (``engine``).

Loading takes the warm spare worker (interpreter started, llama_cpp imported, no model) when
one is ready, so a cold start pays only the model's own load. The next spare starts in the
background once the workers are quiet (no load or request in flight), so its interpreter start
and imports (a third of a second of a core) do not compete with the load it replaces or with
that model's first answer; on a 2-core machine they visibly did. Workers busy for longer than
``SPARE_PATIENCE`` seconds do not hold it back for ever.

Unloading is the worker exiting, so the operating system takes back every byte it held. A
failed load is diagnosed here: a file that is not a model is a 422 (``NotAModel``), anything
else a ``LoadFailed`` with llama.cpp's reason.

Concurrency: ``_lock`` guards ``_spare``, ``_starting``, ``_closed`` and ``_handed`` only. A
spare starts on its own short-lived thread, which first waits for quiet; a load runs on the
thread of the request (or ``preload``) that asked for it, outside every lock, so loads of
different models proceed in parallel.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from discovery import ModelFile
from engine.client import ExitInfo, LoadError, Worker, WorkerError
from engine.protocol import ModelOptions
from errors import LoadFailed, NotAModel, ServiceError

log = logging.getLogger(__name__)

DEFAULT_N_BATCH = 512  # tokens per decode step, all sequences together (llama-cpp-python's default)
QUIET_POLL = 0.1  # seconds between looks at the workers before a spare starts
QUIET_LOOKS = 3  # consecutive quiet looks that let it start
SPARE_PATIENCE = 10.0  # seconds after which a spare starts even though workers are busy
AN_RPC_SERVER = "(an RPC server)"  # what callers other than admins read for an RPC server's address


@dataclass(frozen=True)
class LoadOptions:
    """What a load needs besides the file; fixed at the moment the load starts."""

    n_ctx: int
    n_gpu_layers: int
    n_threads: int | None
    embedding: bool = False
    parallel: int = 4
    prompt_cache_bytes: int = 0
    worker_timeout: float = 60.0  # seconds of silence, with requests waiting, before the worker counts as hung
    extra: dict[str, Any] = field(default_factory=dict)  # more llama_cpp.Llama arguments
    rpc_servers: tuple[str, ...] = ()  # ggml RPC servers (host:port) to place layers on
    rpc_timeout: float = 5.0
    mmproj: str | None = None  # the multimodal projector file
    progress: Callable[[float], None] | None = field(default=None, compare=False)
    on_exit: Callable[[ExitInfo], None] | None = field(default=None, compare=False)  # an unexpected exit


class WorkerLauncher:
    """Starts workers and loads models into them; keeps one warm spare."""

    def __init__(self, worker_timeout: float = 60.0, keep_spare: bool = True) -> None:
        self.worker_timeout = worker_timeout
        self._keep_spare = keep_spare
        self._lock = threading.Lock()
        self._spare: Worker | None = None
        self._starting = False
        self._closed = False
        self._handed: weakref.WeakSet[Worker] = weakref.WeakSet()  # workers given a model
        if keep_spare:
            self._start_spare(wait_for_quiet=False)

    def __call__(self, model: ModelFile, options: LoadOptions) -> Worker:
        """A worker with ``model`` loaded; raises ``NotAModel`` or ``LoadFailed`` with the reason."""
        worker = self._take()
        with self._lock:
            self._handed.add(worker)
        worker.name = model.id
        worker.on_exit = options.on_exit
        worker.worker_timeout = options.worker_timeout  # the value in force now, after any reload
        extra = dict(options.extra)
        model_options = ModelOptions(
            n_ctx=options.n_ctx, n_gpu_layers=options.n_gpu_layers, n_threads=options.n_threads,
            n_batch=int(extra.pop("n_batch", DEFAULT_N_BATCH)), embedding=options.embedding,
            parallel=options.parallel, prompt_cache_bytes=options.prompt_cache_bytes, extra=extra,
            rpc_servers=options.rpc_servers, rpc_timeout=options.rpc_timeout, mmproj=options.mmproj)
        try:
            worker.load(model.path, model_options, options.progress)
        except LoadError as exc:
            worker.close()
            raise diagnose(model, str(exc)).hide(options.rpc_servers, AN_RPC_SERVER) from None
        except WorkerError as exc:  # it died while loading: a crash in llama.cpp, the OOM killer...
            worker.close()
            where = (f" (loading over RPC from {', '.join(options.rpc_servers)}: did an RPC server stop, or "
                     "start serving another model?)" if options.rpc_servers else "")
            raise LoadFailed(f"failed to load model {model.id}: {exc}{where}").hide(
                options.rpc_servers, AN_RPC_SERVER) from None
        finally:
            if self._keep_spare:
                self._start_spare()
        return worker

    def close(self) -> None:
        """Stop the spare; no new one is started."""
        with self._lock:
            self._closed = True
            spare, self._spare = self._spare, None
        if spare is not None:
            spare.close()

    def _take(self) -> Worker:
        with self._lock:
            spare, self._spare = self._spare, None
        if spare is not None and spare.alive:
            return spare
        worker = Worker(worker_timeout=self.worker_timeout)
        worker.start()
        return worker

    def _start_spare(self, wait_for_quiet: bool = True) -> None:
        with self._lock:
            if self._closed or self._starting or self._spare is not None:
                return
            self._starting = True
        threading.Thread(target=self._run_spare, args=(wait_for_quiet,), name="spare-worker", daemon=True).start()

    def _wait_for_quiet(self) -> None:
        deadline = time.monotonic() + SPARE_PATIENCE
        quiet = 0
        while quiet < QUIET_LOOKS and time.monotonic() < deadline:
            time.sleep(QUIET_POLL)
            with self._lock:
                if self._closed:
                    return
                workers = list(self._handed)
            quiet = 0 if any(w.busy for w in workers) else quiet + 1

    def _run_spare(self, wait_for_quiet: bool) -> None:
        if wait_for_quiet:
            self._wait_for_quiet()
        with self._lock:
            if self._closed:
                self._starting = False
                return
        worker = Worker(name="spare", worker_timeout=self.worker_timeout)
        try:
            worker.start()
        except WorkerError:
            log.exception("could not start a spare worker")
            worker = None  # type: ignore[assignment]
        with self._lock:
            self._starting = False
            keep = worker is not None and not self._closed and self._spare is None
            if keep:
                self._spare = worker
        if worker is not None and not keep:
            worker.close()


def default_threads() -> int:
    """Compute threads per model when none are configured: one per physical core.

    As llama-server does. Hyper-threads share a core's arithmetic units, so counting them
    adds contention, not speed; and llama-cpp-python's own default (half the logical CPUs)
    leaves a 2-core machine decoding on one.
    """
    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


def diagnose(model: ModelFile, reason: str) -> ServiceError:
    """Tell a file that is not a model (422) from a model llama.cpp could not load (500)."""
    problem = inspect_gguf(model.path)
    if problem:
        return NotAModel(f"{model.id} is not a loadable model: {problem}", param="model")
    return LoadFailed(f"failed to load model {model.id}: {reason}")


def inspect_gguf(path: Path) -> str | None:
    """Return why ``path`` is not a usable GGUF model file, or None if it looks like one."""
    try:
        with path.open("rb") as handle:
            magic = handle.read(4)
    except OSError as exc:
        return f"cannot read the file: {exc.strerror}"
    if magic != b"GGUF":
        return "not a GGUF file"
    from gguf import GGUFReader  # only on the failure path: parsing a large vocab is slow

    try:
        reader = GGUFReader(path)
    except Exception as exc:  # the reader raises assorted errors on damaged files
        return f"truncated or corrupt GGUF ({type(exc).__name__}: {exc})"
    if not reader.tensors:
        return "the file holds no tensors (a vocab-only GGUF)"
    end = max(t.data_offset + t.n_bytes for t in reader.tensors)
    if end > path.stat().st_size:
        return "truncated GGUF: tensor data runs past the end of the file"
    return None
