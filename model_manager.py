"""Discovery, lazy single-flight loading, leases and unloading of llama.cpp models.

Concurrency model
-----------------
* ``ModelManager._lock`` (the registry lock) guards ``_files``, ``_instances`` and
  ``_settings``. It is held only for dictionary work, never during a load, an unload or
  a generation, so ``/health`` and other models never wait behind one.
* Each ``Instance`` (one model in one mode: text generation or embeddings) has a
  condition variable ``cond`` guarding its state, lease count and bookkeeping. Every
  state change goes through ``ModelManager._transition`` with ``cond`` held, and every
  decision to unload is taken under ``cond`` together with the lease check it depends
  on. ``cond`` is never held while llama.cpp runs (load, close or decode).
* Lock order: registry lock, then an instance's ``cond``; never the other way round.
* ``Instance.generation_lock`` serialises generations on one ``Llama`` object, which is
  not thread-safe. Requests hold a lease while they queue for it, so a queued request
  keeps its model loaded.
* A lease is taken before a request waits for a load and released exactly once when its
  response closes; a model with a lease is never unloaded, by anyone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import psutil

from config import ManagerSettings
from discovery import ModelFile, discover
from errors import InvalidRequest, LoadFailed, ModelNotFound, ServiceError, ShuttingDown
from llama_backend import LoadOptions, load_llama

log = logging.getLogger(__name__)

Loader = Callable[[ModelFile, LoadOptions], Any]
Clock = Callable[[], float]

MAX_NAME_LENGTH = 512
REDISCOVER_INTERVAL = 1.0  # seconds between rescans prompted by unknown model names


class ModelState(str, Enum):
    UNLOADED = "unloaded"
    LOADING = "loading"
    LOADED = "loaded"
    UNLOADING = "unloading"
    FAILED = "failed"


class Mode(str, Enum):
    GENERATE = "generate"
    EMBED = "embed"


_TRANSITIONS: dict[ModelState, set[ModelState]] = {
    ModelState.UNLOADED: {ModelState.LOADING},
    ModelState.FAILED: {ModelState.LOADING},
    ModelState.LOADING: {ModelState.LOADED, ModelState.FAILED},
    ModelState.LOADED: {ModelState.UNLOADING},
    ModelState.UNLOADING: {ModelState.UNLOADED},
}


@dataclass(eq=False)
class Instance:
    """One model in one mode: its llama.cpp object (when loaded) and its bookkeeping."""

    file: ModelFile
    mode: Mode
    cond: threading.Condition = field(default_factory=threading.Condition)
    generation_lock: threading.Lock = field(default_factory=threading.Lock)
    state: ModelState = ModelState.UNLOADED
    llama: Any = None
    cache: dict[str, Any] = field(default_factory=dict)  # per-load derived data (token pieces, template)
    leases: int = 0
    attempt: int = 0
    loads: int = 0
    error: ServiceError | None = None
    last_used: float = 0.0
    loaded_at: float | None = None
    load_seconds: float | None = None
    removed: bool = False

    @property
    def label(self) -> str:
        return self.file.id if self.mode is Mode.GENERATE else f"{self.file.id} (embeddings)"


class Lease:
    """A request's hold on a loaded instance; release it exactly once (idempotent)."""

    def __init__(self, manager: ModelManager, instance: Instance) -> None:
        self._manager = manager
        self._instance = instance
        self._released = False
        self._release_lock = threading.Lock()

    @property
    def model_id(self) -> str:
        return self._instance.file.id

    @property
    def llama(self) -> Any:
        return self._instance.llama

    @property
    def cache(self) -> dict[str, Any]:
        """Data derived from the loaded model, kept until it unloads (token pieces, chat template)."""
        return self._instance.cache

    @contextmanager
    def generating(self) -> Iterator[Any]:
        """Hold the instance's generation lock: one generation at a time per model."""
        with self._instance.generation_lock:
            yield self._instance.llama

    def release(self) -> None:
        """Give the lease back; later calls do nothing."""
        with self._release_lock:
            if self._released:
                return
            self._released = True
        self._manager._release(self._instance)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@dataclass
class UnloadReport:
    """What an unload request did."""

    unloaded: list[str] = field(default_factory=list)
    busy: list[str] = field(default_factory=list)
    not_loaded: list[str] = field(default_factory=list)


class ModelManager:
    """Owns every model instance and every change of its state."""

    def __init__(self, settings: ManagerSettings, *, clock: Clock = time.monotonic,
                 loader: Loader = load_llama, wall_clock: Clock = time.time) -> None:
        self._settings = settings
        self._clock = clock
        self._wall = wall_clock
        self._loader = loader
        self._lock = threading.Lock()
        self._files: dict[str, ModelFile] = {}
        self._instances: dict[tuple[str, Mode], Instance] = {}
        self._closing = False
        self._last_scan = float("-inf")
        self._process = psutil.Process()
        self.rediscover()

    # ----------------------------------------------------------------- discovery

    @property
    def settings(self) -> ManagerSettings:
        return self._settings

    def rediscover(self) -> tuple[list[str], list[str]]:
        """Rescan the models folder; return (added ids, removed ids)."""
        directory = self._settings.models_directory
        if not directory.is_dir():
            log.warning("models folder %s does not exist; put .gguf files there and POST /admin/reload",
                        directory)
        found = discover(directory)
        with self._lock:
            self._last_scan = time.monotonic()
            added = sorted(set(found) - set(self._files))
            removed = sorted(set(self._files) - set(found))
            self._files = found
            gone = []
            for (model_id, _), instance in self._instances.items():
                with instance.cond:
                    instance.removed = model_id not in found
                    if not instance.removed:
                        instance.file = found[model_id]
                if instance.removed:
                    gone.append(instance)
        for model_id in added:
            log.info("model discovered model=%s path=%s", model_id, found[model_id].path)
        for model_id in removed:
            log.info("model removed model=%s reason=file_gone", model_id)
        for instance in gone:
            self._unload_instance(instance, "reload", timeout=0)
        self._forget_removed()
        return added, removed

    def apply_settings(self, settings: ManagerSettings) -> tuple[list[str], list[str]]:
        """Use new settings from the next load on, and rediscover the models folder."""
        with self._lock:
            self._settings = settings
        return self.rediscover()

    def resolve(self, name: str | None) -> str:
        """Map a request's model name (or None for the default) to a model id."""
        if name is None:
            name = self._settings.default_model
            if name is None:
                raise InvalidRequest("you must provide a model parameter (no default_model is configured)",
                                     param="model", code="missing_model")
        if not name or len(name) > MAX_NAME_LENGTH or "\x00" in name:
            raise ModelNotFound(f"The model '{name[:100]}' does not exist", param="model")
        for attempt in range(2):
            with self._lock:
                for candidate in (name, name[:-5] if name.endswith(".gguf") else None):
                    if candidate is not None and candidate in self._files:
                        return candidate
                available = list(self._files)
                stale = time.monotonic() - self._last_scan > REDISCOVER_INTERVAL
            if attempt == 0 and stale:
                self.rediscover()  # a file may have been dropped in since the last scan
            else:
                break
        hint = f"; available: {', '.join(available[:5])}" if available else "; no models are installed"
        more = f" and {len(available) - 5} more" if len(available) > 5 else ""
        raise ModelNotFound(f"The model '{name[:100]}' does not exist{hint}{more}", param="model")

    # ------------------------------------------------------------------- leases

    def acquire(self, name: str | None, mode: Mode = Mode.GENERATE) -> Lease:
        """Lease the model, loading it first if needed (single-flight). Blocks during a load."""
        model_id = self.resolve(name)
        instance = self._instance(model_id, mode)
        awaited: int | None = None
        with instance.cond:
            instance.leases += 1
            try:
                while True:
                    if self._closing:
                        raise ShuttingDown("The server is shutting down")
                    if instance.removed:
                        raise ModelNotFound(f"The model '{model_id}' was removed", param="model")
                    state = instance.state
                    if state is ModelState.LOADED:
                        return Lease(self, instance)
                    if state is ModelState.FAILED and awaited == instance.attempt:
                        raise _failure(instance)
                    if state in (ModelState.UNLOADED, ModelState.FAILED):
                        instance.attempt += 1
                        self._transition(instance, ModelState.LOADING)
                        break
                    if state is ModelState.LOADING:
                        awaited = instance.attempt
                    instance.cond.wait()
            except BaseException:
                self._drop_lease(instance)
                raise
        self._load(instance)  # this thread won the race to load; others wait on cond
        with instance.cond:
            if instance.state is ModelState.LOADED:
                return Lease(self, instance)
            self._drop_lease(instance)
            raise _failure(instance)

    def _instance(self, model_id: str, mode: Mode) -> Instance:
        with self._lock:
            instance = self._instances.get((model_id, mode))
            if instance is None:
                file = self._files.get(model_id)
                if file is None:
                    raise ModelNotFound(f"The model '{model_id}' does not exist", param="model")
                instance = self._instances[(model_id, mode)] = Instance(file, mode)
            return instance

    def _drop_lease(self, instance: Instance) -> None:
        """Caller holds ``instance.cond``."""
        instance.leases -= 1
        instance.last_used = self._clock()
        instance.cond.notify_all()

    def _release(self, instance: Instance) -> None:
        with instance.cond:
            self._drop_lease(instance)
            orphaned = instance.removed and instance.leases == 0
        if orphaned:
            # Its file disappeared at a reload while requests still ran; now it can go.
            self._unload_instance(instance, "reload", timeout=0)
            self._forget_removed()

    # ------------------------------------------------------------ load / unload

    def _load(self, instance: Instance) -> None:
        """Run the load outside every lock, then publish the outcome under ``cond``."""
        with self._lock:
            settings = self._settings
        options = LoadOptions(n_ctx=settings.n_ctx, n_gpu_layers=settings.n_gpu_layers,
                              n_threads=settings.n_threads, embedding=instance.mode is Mode.EMBED)
        log.info("load start model=%s mode=%s path=%s", instance.file.id, instance.mode.value,
                 instance.file.path)
        started = time.monotonic()
        rss_before = self._rss()
        llama, error = None, None
        try:
            llama = self._loader(instance.file, options)
        except ServiceError as exc:
            error = exc
        except Exception as exc:  # a loader must never leave the model stuck in LOADING
            error = LoadFailed(f"failed to load model {instance.file.id}: {exc}")
        seconds = time.monotonic() - started
        with instance.cond:
            if error is None:
                instance.llama, instance.error = llama, None
                instance.cache = {}
                instance.loads += 1
                instance.loaded_at, instance.load_seconds = self._wall(), seconds
                instance.last_used = self._clock()
                self._transition(instance, ModelState.LOADED,
                                 f"seconds={seconds:.3f} rss_delta_mb={(self._rss() - rss_before) / 2**20:.1f}")
            else:
                instance.error = error
                self._transition(instance, ModelState.FAILED, f"seconds={seconds:.3f} reason={error.message}")
            instance.cond.notify_all()

    def _unload_instance(self, instance: Instance, reason: str, timeout: float) -> str:
        """Unload once no lease is held, waiting up to ``timeout`` s; returns the outcome."""
        deadline = time.monotonic() + timeout
        with instance.cond:
            while instance.state is ModelState.LOADING or (
                    instance.state is ModelState.LOADED and instance.leases > 0):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return "busy"
                instance.cond.wait(remaining)
            if instance.state is not ModelState.LOADED:
                return "not_loaded"
            llama = self._begin_unload(instance, reason)
        self._finish_unload(instance, llama, reason)
        return "unloaded"

    def _begin_unload(self, instance: Instance, reason: str) -> Any:
        """Caller holds ``cond`` and has checked that no lease is held."""
        self._transition(instance, ModelState.UNLOADING, f"reason={reason}")
        llama, instance.llama = instance.llama, None
        instance.cache = {}
        return llama

    def _finish_unload(self, instance: Instance, llama: Any, reason: str) -> None:
        rss_before = self._rss()
        started = time.monotonic()
        try:
            close = getattr(llama, "close", None)
            if close is not None:
                close()
        except Exception:
            log.exception("error while closing model=%s", instance.file.id)
        del llama
        gc.collect()
        _trim_malloc()
        freed = (rss_before - self._rss()) / 2**20
        with instance.cond:
            instance.loaded_at = None
            self._transition(instance, ModelState.UNLOADED,
                             f"reason={reason} seconds={time.monotonic() - started:.3f} freed_rss_mb={freed:.1f}")
            instance.cond.notify_all()

    def _forget_removed(self) -> None:
        with self._lock:
            for key, instance in list(self._instances.items()):
                with instance.cond:
                    idle = instance.state in (ModelState.UNLOADED, ModelState.FAILED) and not instance.leases
                    if instance.removed and idle:
                        del self._instances[key]

    def _transition(self, instance: Instance, new: ModelState, detail: str = "") -> None:
        """The one place a state changes. Caller holds ``instance.cond``."""
        old = instance.state
        if new not in _TRANSITIONS[old]:
            raise RuntimeError(f"invalid transition {old.value} -> {new.value} for {instance.label}")
        instance.state = new
        log.info("model %s model=%s mode=%s %s", new.value, instance.file.id, instance.mode.value, detail)

    # ---------------------------------------------------------------- policies

    def load(self, name: str) -> str:
        """Load a model without using it (``/admin/load``); returns its id."""
        with self.acquire(name) as lease:
            return lease.model_id

    def unload(self, name: str, reason: str = "admin", timeout: float | None = None) -> UnloadReport:
        """Unload one model (both modes) or ``"all"``, waiting up to ``timeout`` s for leases."""
        timeout = self._settings.unload_timeout if timeout is None else timeout
        if name == "all":
            with self._lock:
                targets = list(self._instances.values())
        else:
            model_id = self.resolve(name)
            with self._lock:
                targets = [i for (mid, _), i in self._instances.items() if mid == model_id]
        report = UnloadReport()
        deadline = time.monotonic() + timeout
        for instance in targets:
            outcome = self._unload_instance(instance, reason, max(0.0, deadline - time.monotonic()))
            getattr(report, outcome).append(instance.label)
        self._forget_removed()
        return report

    def evict_idle(self) -> list[str]:
        """Unload every instance idle past ``idle_timeout`` with no lease (the idle job)."""
        idle_timeout = self._settings.idle_timeout
        with self._lock:
            candidates = list(self._instances.values())
        evicted = []
        for instance in candidates:
            with instance.cond:
                # Decide under cond: a request may have taken a lease since the snapshot.
                idle_for = self._clock() - instance.last_used
                if not (instance.state is ModelState.LOADED and instance.leases == 0
                        and idle_for >= idle_timeout):
                    continue
                llama = self._begin_unload(instance, "idle")
            self._finish_unload(instance, llama, "idle")
            evicted.append(instance.label)
        return evicted

    def shutdown(self, timeout: float) -> None:
        """Refuse new requests, give running ones ``timeout`` s, then unload everything."""
        self._closing = True
        with self._lock:
            instances = list(self._instances.values())
        for instance in instances:
            with instance.cond:
                instance.cond.notify_all()  # wake requests waiting for a load
        deadline = time.monotonic() + timeout
        for instance in instances:
            if self._unload_instance(instance, "shutdown", max(0.0, deadline - time.monotonic())) == "busy":
                log.warning("shutdown: model=%s still had %d requests in flight", instance.label,
                            instance.leases)

    # ------------------------------------------------------------------ views

    def models(self) -> list[dict[str, Any]]:
        """Every discovered model with its live state; never blocks on a load or generation."""
        now = self._clock()
        with self._lock:
            files = list(self._files.values())
            instances = dict(self._instances)
        views = []
        for file in files:
            view: dict[str, Any] = {"id": file.id, "path": str(file.path), "size_bytes": file.size,
                                    "created": file.created}
            generate = instances.get((file.id, Mode.GENERATE))
            view.update(_instance_view(generate, now) if generate else _instance_view(None, now))
            embed = instances.get((file.id, Mode.EMBED))
            if embed is not None:
                view["embeddings"] = _instance_view(embed, now)
            views.append(view)
        return views

    def loaded_models(self) -> list[str]:
        """Ids of models with an instance loaded."""
        with self._lock:
            instances = list(self._instances.values())
        return sorted({i.file.id for i in instances if i.state is ModelState.LOADED})

    def _rss(self) -> int:
        return self._process.memory_info().rss


def _instance_view(instance: Instance | None, now: float) -> dict[str, Any]:
    if instance is None:
        return {"state": ModelState.UNLOADED.value, "in_flight": 0, "idle_seconds": None,
                "loaded_at": None, "load_seconds": None, "error": None}
    with instance.cond:
        loaded = instance.state is ModelState.LOADED
        return {
            "state": instance.state.value,
            "in_flight": instance.leases,
            "idle_seconds": round(now - instance.last_used, 3) if loaded and not instance.leases else None,
            "loaded_at": instance.loaded_at,
            "load_seconds": instance.load_seconds,
            "error": instance.error.message if instance.error else None,
        }


def _failure(instance: Instance) -> ServiceError:
    """A fresh copy of the recorded load error: one exception object per raising thread."""
    error = instance.error or LoadFailed(f"failed to load model {instance.file.id}")
    return type(error)(error.message, param=error.param, code=error.code)


def _trim_malloc() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them otherwise, and RSS stays up)."""
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return
    with suppress(OSError, AttributeError):
        ctypes.CDLL(libc_name).malloc_trim(0)
