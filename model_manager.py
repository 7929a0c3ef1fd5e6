"""The model lifecycle behind one facade: lazy single-flight loading, leases, unloading,
crashes, and the policy that decides them.

Who owns what
-------------
* ``registry.Registry``: the discovered files, the aliases, the ``model_manager`` and
  ``models`` settings, name resolution and rescans.
* ``instances``: ``Instance`` (one model in one mode), its states and ``Instance.transition``.
* ``capacity.plan_room``: what must go for a load to fit (pure).
* ``model_views``: the JSON shape of the listings (pure, over snapshots taken here).
* This module: every instance's lifecycle, and the only code that changes it.

Concurrency model
-----------------
* The registry lock (``ModelManager._lock``, the one lock object the registry is given)
  guards the registry's files and settings and this manager's ``_instances``. It is held
  only for dictionary work, never during a load, an unload or a generation, so
  ``/health`` and other models never wait behind one.
* Each ``Instance`` (one model in one mode: text generation or embeddings) runs in a
  worker process of its own (``engine.client.Worker``, started by the loader) and has a
  condition variable ``cond`` guarding its state, leases and bookkeeping. Every state
  change goes through ``Instance.transition`` with ``cond`` held, and every decision
  to unload is taken under ``cond`` together with the lease check it depends on. ``cond``
  is never held while a worker is asked anything (load, close, a request).
* A worker that dies unexpectedly is reported by its reader thread (``_on_worker_exit``):
  the instance goes ``failed`` with the reason, its running requests end with an error,
  and the next request loads it again. Nothing else waits for it.
* ``ModelManager._room`` (a condition) serialises capacity decisions: a load that needs
  room picks and unloads idle victims, or waits for a lease to end, while holding it.
  Releases and unloads notify it. Only loads already given room (``admitted``) count
  towards the limits, so loads waiting for room never wait for each other. A model the
  waiting load needs gone is ``draining``: new requests for it wait instead of leasing it,
  so a model that is never idle cannot starve the load.
* Lock order: ``_room``, then the registry lock, then an instance's ``cond``; a thread
  holding a later one never takes an earlier one.
* Generations run side by side in the worker (its ``parallel`` slots; more queue there).
  Requests hold a lease while they queue, so a queued request keeps its model loaded;
  ``generating`` counts those that have a slot, so ``leases - generating`` are queued.
* A lease is taken before a request waits for a load and released exactly once when its
  response closes; a model with a lease is never unloaded, by anyone.
* Unloads that no request waits for (idle timeout 0, a file removed) run on the manager's
  one ``unload`` thread, so a releasing response never waits for llama.cpp's free and
  heap trim; they re-check leases under ``cond`` before acting.

Policy (one place for it): idle timeout precedence is a request's ``keep_alive`` > the
model's ``idle_timeout`` > the global one; ``0`` unloads when the last lease ends (a
warm-up by ``/admin/load`` or ``preload`` waits for the next idle check), a negative
value never. A request without ``keep_alive`` goes back to the configured timeout.
Pinned models are never evicted by the idle job or for room.
Capacity (``max_loaded_models``, ``memory_budget``) evicts idle, unpinned models, least
recently used first; if the others are busy the load waits up to ``load_wait_timeout``.
What to evict or drain is decided by the pure ``capacity.plan_room``; ``_make_room`` acts.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from capacity import Holder, plan_room
from config import ManagerSettings, ModelSettings
from discovery import ModelFile
from errors import (
    InvalidRequest,
    LoadFailed,
    ModelCrashed,
    ModelNotFound,
    NoCapacity,
    QueueFull,
    ServiceError,
    ShuttingDown,
)
from events import EventBus
from gguf_meta import Shape, estimate_bytes, model_shape
from instances import Instance, Mode, ModelState, worker_devices, worker_media, worker_pid, worker_slots
from memory import MemoryProbe
from model_views import InstanceSnapshot, loaded_ids, model_view
from projectors import capabilities, projector_media, projector_path, projector_size
from registry import NO_SETTINGS, Registry
from workers import LoadOptions, WorkerLauncher, default_threads

__all__ = ["Clock", "Instance", "Lease", "Loader", "Mode", "ModelManager", "ModelState", "UnloadReport"]

log = logging.getLogger(__name__)

Loader = Callable[[ModelFile, LoadOptions], Any]
Clock = Callable[[], float]

PROGRESS_STEP = 0.1  # publish load progress in steps of 10%


class Lease:
    """A request's hold on a loaded instance; release it exactly once (idempotent)."""

    def __init__(self, manager: ModelManager, instance: Instance) -> None:
        """Caller holds ``instance.cond`` and has seen it ``loaded``."""
        self._manager = manager
        self._instance = instance
        self._worker = instance.worker  # kept: a crash clears the instance's, not the request's
        self._released = False
        self._release_lock = threading.Lock()

    @property
    def model_id(self) -> str:
        return self._instance.file.id

    @property
    def worker(self) -> Any:
        """The model's worker (an ``engine.client.Worker``) as it was when the lease was granted."""
        return self._worker

    def crashed(self, error: Exception) -> ServiceError:
        """The error for a request whose worker is gone; makes sure the manager knows too
        (a worker can die before its reader reports it, e.g. right after its load)."""
        if self._manager.closing:
            return ShuttingDown("The server is shutting down")
        exit_info = getattr(self._worker, "exit_info", None)
        if exit_info is not None:
            self._manager._on_worker_exit(self._instance, exit_info)
        return ModelCrashed(f"{self.model_id} crashed: {error}")

    @property
    def cache(self) -> dict[str, Any]:
        """Data derived from the loaded model, kept until it unloads (token pieces, chat template)."""
        return self._instance.cache

    @property
    def settings(self) -> ModelSettings:
        """This model's own settings (aliases, defaults, template override...)."""
        return self._manager.model_settings(self.model_id)

    def started(self) -> None:
        """The request got a slot in the worker: it generates now (no longer queued)."""
        with self._instance.cond:
            self._instance.generating += 1

    def finished(self) -> None:
        """The request's generation is over (call once per ``started``)."""
        with self._instance.cond:
            self._instance.generating -= 1

    def release(self, *, warm_up: bool = False) -> None:
        """Give the lease back; later calls do nothing.

        ``warm_up``: the lease only loaded the model (``/admin/load``, ``preload``), so an
        idle timeout of 0 leaves it for the idle job instead of unloading it at once.
        """
        with self._release_lock:
            if self._released:
                return
            self._released = True
        self._manager._release(self._instance, warm_up=warm_up)

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
    """Owns every model instance, every change of its state, and the policy behind them."""

    def __init__(self, settings: ManagerSettings, models: dict[str, ModelSettings] | None = None, *,
                 clock: Clock = time.monotonic, loader: Loader | None = None, wall_clock: Clock = time.time,
                 events: EventBus | None = None) -> None:
        self._lock = threading.Lock()  # the registry lock: the registry's dictionaries and _instances
        self._registry = Registry(settings, models, lock=self._lock,
                                  rescan=lambda: self.rediscover(in_background=True))
        self._clock = clock
        self._wall = wall_clock
        self._loader: Loader = loader or WorkerLauncher(settings.worker_timeout)
        self.events = events or EventBus()
        self._room = threading.Condition()
        self._instances: dict[tuple[str, Mode], Instance] = {}
        self._closing = False
        self._memory = MemoryProbe()
        self._background = ThreadPoolExecutor(1, thread_name_prefix="unload")  # unloads no request waits for
        self.rediscover()

    # ----------------------------------------------------------------- settings

    @property
    def settings(self) -> ManagerSettings:
        return self._registry.settings

    @property
    def closing(self) -> bool:
        return self._closing

    def model_settings(self, model_id: str) -> ModelSettings:
        """The ``models`` section entry for ``model_id`` (empty defaults if none)."""
        return self._registry.model_settings(model_id)

    def apply_settings(self, settings: ManagerSettings,
                       models: dict[str, ModelSettings] | None = None) -> tuple[list[str], list[str]]:
        """Use new settings from the next load on, and rediscover the models folder."""
        self._registry.configure(settings, models)
        return self.rediscover()

    # ----------------------------------------------------------------- discovery

    def rediscover(self, *, in_background: bool = False) -> tuple[list[str], list[str]]:
        """Rescan the models folder; return (added ids, removed ids).

        A loaded model whose file is gone is unloaded once idle; ``in_background`` does that
        on the unload thread, for callers that must not wait (listings).
        """
        gone: list[Instance] = []
        added, removed = self._registry.rediscover(
            quiet=in_background, sync=lambda found: gone.extend(self._mark_removed_locked(found)))
        for instance in gone:
            if in_background:
                self._in_background(self._unload_when_idle, instance, "reload")
            else:
                self._unload_instance(instance, "reload", timeout=0)
        self._forget_removed()
        return added, removed

    def _mark_removed_locked(self, found: dict[str, ModelFile]) -> list[Instance]:
        """Flag the instances whose file is gone (and follow files that moved); the flagged ones.

        Caller holds the registry lock, as the file list changes: an instance is never seen
        with a file the registry no longer knows without also being marked ``removed``.
        """
        gone = []
        for (model_id, _), instance in self._instances.items():
            with instance.cond:
                instance.removed = model_id not in found
                if not instance.removed:
                    instance.file = found[model_id]
            if instance.removed:
                gone.append(instance)
        return gone

    def resolve(self, name: str | None) -> str:
        """Map a request's model name, alias, or None (the default) to a model id."""
        return self._registry.resolve(name)

    def model_file(self, model_id: str) -> ModelFile:
        """The discovered file of ``model_id`` (an id from ``resolve``)."""
        return self._registry.model_file(model_id)

    def header(self, model_id: str) -> Shape | None:
        """What the model's GGUF header says (vocabulary size, width...), without loading it."""
        return self._registry.header(model_id)

    def projector(self, model_id: str) -> Path | None:
        """The multimodal projector ``model_id`` loads with (``projectors.projector_path``), or None."""
        file = self._registry.model_file(model_id)
        return projector_path(file, self.model_settings(model_id), self.settings.models_directory)

    def media(self, model_id: str) -> tuple[str, ...]:
        """What ``model_id``'s projector reads (``"image"``, ``"audio"``); () without one.

        While the model is loaded, what its worker loaded (a changed ``mmproj`` waits for the
        next load); otherwise from the header of the projector its next load would use.
        """
        with self._lock:
            instance = self._instances.get((model_id, Mode.GENERATE))
        if instance is not None:
            with instance.cond:
                loaded = worker_media(instance.worker) if instance.state is ModelState.LOADED else None
            if loaded is not None:
                return loaded
        return projector_media(self.projector(model_id))

    def is_loaded(self, name: str | None, mode: Mode = Mode.GENERATE) -> bool:
        """Whether the model (after resolving ``name``) is loaded now; advisory only."""
        model_id = self.resolve(name)
        with self._lock:
            instance = self._instances.get((model_id, mode))
        return instance is not None and instance.state is ModelState.LOADED

    def loading_progress(self, model_id: str, mode: Mode = Mode.GENERATE) -> float:
        """Load progress 0..1 of a loading model (advisory)."""
        with self._lock:
            instance = self._instances.get((model_id, mode))
        return instance.progress if instance is not None else 0.0

    # ------------------------------------------------------------------- leases

    def check_mode(self, model_id: str, mode: Mode) -> None:
        """Refuse text generation on a model configured for embeddings only."""
        if mode is Mode.GENERATE and self.model_settings(model_id).embedding:
            raise InvalidRequest(f"{model_id} is configured as an embedding model; use /v1/embeddings",
                                 param="model", code="model_not_generative")

    def acquire(self, name: str | None, mode: Mode = Mode.GENERATE, keep_alive: float | None = None) -> Lease:
        """Lease the model, loading it first if needed (single-flight). Blocks during a load."""
        model_id = self.resolve(name)
        self.check_mode(model_id, mode)
        instance = self._instance(model_id, mode)
        estimate = self._estimate(instance)  # reads settings: not under cond (lock order)
        awaited: int | None = None
        with instance.cond:
            while instance.draining and not self._closing:
                instance.cond.wait()  # it is about to be unloaded to make room for another model
            if instance.leases - instance.generating >= self.settings.max_queue:
                raise QueueFull(f"{model_id} already has {self.settings.max_queue} requests waiting; retry shortly",
                                param="model", headers={"Retry-After": "1"})
            # The latest request decides (Ollama's rule): one without keep_alive goes back to
            # the configured timeout, so one client's keep_alive 0 cannot stick for everybody.
            instance.keep_alive = keep_alive
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
                        instance.progress = 0.0
                        instance.estimate = estimate
                        instance.transition(ModelState.LOADING, self.events)
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
                file = self._registry.file_locked(model_id)
                if file is None:
                    raise ModelNotFound(f"The model '{model_id}' does not exist", param="model")
                instance = self._instances[(model_id, mode)] = Instance(file, mode)
            return instance

    def _drop_lease(self, instance: Instance) -> None:
        """Caller holds ``instance.cond``."""
        instance.leases -= 1
        instance.last_used = self._clock()
        instance.cond.notify_all()

    def _release(self, instance: Instance, *, warm_up: bool = False) -> None:
        configured, pinned = self._configured_timeout(instance), self._pinned(instance)  # not under cond
        with instance.cond:
            timeout = _timeout(instance, configured)  # keep_alive under cond: a request may just have set it
            self._drop_lease(instance)
            idle = instance.leases == 0 and instance.state is ModelState.LOADED
            reason = "reload" if instance.removed else _idle_reason(instance)
            unload_now = idle and (instance.removed or (timeout == 0 and not pinned and not warm_up))
        with self._room:
            self._room.notify_all()
        if unload_now:
            # A file gone at a reload, or an idle timeout of 0: this was the last request.
            # The releasing thread is the response's (its close hook, or the end of a
            # non-streamed answer): closing a model there would hold the answer back.
            self._in_background(self._unload_when_idle, instance, reason)

    def _unload_when_idle(self, instance: Instance, reason: str) -> None:
        # timeout=0: a request that leased the model since the decision keeps it loaded.
        self._unload_instance(instance, reason, timeout=0)
        self._forget_removed()

    def _in_background(self, work: Callable[..., Any], *args: Any) -> None:
        with suppress(RuntimeError):  # shut down: the shutdown itself unloads everything
            self._background.submit(work, *args)

    # ------------------------------------------------------------------- policy

    def _idle_timeout(self, instance: Instance) -> float:
        """Seconds idle before unloading: request keep_alive > model config > global; <0 never.

        Takes the registry lock: never call it holding ``instance.cond``. A decision taken
        under ``cond`` uses ``_configured_timeout`` before it and ``_timeout`` inside it.
        """
        return _timeout(instance, self._configured_timeout(instance))

    def _configured_timeout(self, instance: Instance) -> float:
        """The model's configured idle timeout, else the global one (takes the registry lock)."""
        configured = self.model_settings(instance.file.id).idle_timeout
        return configured if configured is not None else self.settings.idle_timeout

    def _pinned(self, instance: Instance) -> bool:
        return self.model_settings(instance.file.id).pinned

    def _context_size(self, file: ModelFile) -> int:
        """The model's own ``n_ctx`` if set; else the global one, capped at the trained length.

        Beyond its trained length a model degrades (llama.cpp warns as much) and the KV cache
        costs memory for nothing; going past it is a per-model decision (with rope scaling).
        """
        model = self.model_settings(file.id)
        if model.n_ctx is not None:
            return model.n_ctx
        shape = model_shape(file.path, file.size, file.created)
        trained = shape.n_ctx_train if shape is not None else 0
        configured = self.settings.n_ctx
        if trained and (configured == 0 or configured > trained):
            return trained
        return configured

    def _load_options(self, instance: Instance) -> LoadOptions:
        n_ctx = self._context_size(instance.file)
        settings, model = self._registry.settings_for(instance.file.id)
        return LoadOptions(
            n_ctx=n_ctx,
            n_gpu_layers=model.n_gpu_layers if model.n_gpu_layers is not None else settings.n_gpu_layers,
            n_threads=model.n_threads or settings.n_threads or default_threads(),
            embedding=instance.mode is Mode.EMBED, extra=model.load_arguments(),
            parallel=model.parallel if model.parallel is not None else settings.parallel,
            prompt_cache_bytes=settings.prompt_cache_bytes, worker_timeout=settings.worker_timeout,
            rpc_servers=tuple(_rpc_servers(settings, model)),
            # The handshake runs inside a load that worker_timeout of silence ends: kept below
            # it, a silent endpoint is still named in the error.
            rpc_timeout=min(settings.rpc_timeout, settings.worker_timeout / 2),
            mmproj=self._mmproj(instance),
            progress=lambda fraction: self._on_progress(instance, fraction),
            on_exit=lambda exit_info: self._on_worker_exit(instance, exit_info))

    def _mmproj(self, instance: Instance) -> str | None:
        """The projector a text generation instance loads with (an embedding one loads none)."""
        path = self.projector(instance.file.id) if instance.mode is Mode.GENERATE else None
        return str(path) if path is not None else None

    def _estimate(self, instance: Instance) -> int:
        """Weights (with the projector's), KV cache and margin (``estimate_bytes``), plus the RAM
        its prompt cache may fill."""
        file = instance.file
        cache = self.settings.prompt_cache_bytes if instance.mode is Mode.GENERATE else 0
        mmproj = self._mmproj(instance)
        weights = file.size + projector_size(Path(mmproj) if mmproj else None)
        return estimate_bytes(weights, model_shape(file.path, file.size, file.created),
                              self._context_size(file)) + cache

    def _make_room(self, instance: Instance) -> None:
        """Unload idle models (LRU) until ``instance`` fits the count and memory limits, or wait.

        The decision is ``capacity.plan_room``'s; acting on it, one model at a time, is ours.
        """
        limit, budget = self.settings.max_loaded_models, self.settings.memory_budget
        if budget is not None and instance.estimate > budget:
            raise InvalidRequest(f"{instance.file.id} needs about {_gib(instance.estimate)} (estimate), more than "
                                 f"the memory_budget of {_gib(budget)}", param="model", code="model_too_large")
        if not limit and budget is None:
            return
        deadline = time.monotonic() + self.settings.load_wait_timeout
        drained: list[Instance] = []
        with self._room:
            try:
                while True:
                    if self._closing:
                        raise ShuttingDown("The server is shutting down")
                    with self._lock:
                        # Loads not yet given room do not count: two of them waiting for each
                        # other would otherwise both wait forever.
                        others = [i for i in self._instances.values() if i is not instance and (
                            i.state in (ModelState.LOADED, ModelState.UNLOADING) or i.admitted)]
                    plan = plan_room([self._holder(i) for i in others], instance.estimate, limit, budget)
                    if plan.reason is None:
                        instance.admitted = True
                        return
                    if plan.evict:
                        self._evict(plan.evict[0], plan.reason)  # or it was leased meanwhile: plan again
                        continue
                    if plan.drain is not None:
                        self._drain(plan.drain, drained)
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        holders = ", ".join(f"{i.label} ({_gib(i.estimate)}, {i.leases} in flight)" for i in others)
                        raise NoCapacity(f"No room to load {instance.file.id}: the loaded models are busy: "
                                         f"{holders}", param="model")
                    self._room.wait(min(remaining, 1.0))
            finally:
                for victim in drained:
                    with victim.cond:
                        victim.draining = False
                        victim.cond.notify_all()

    def _holder(self, instance: Instance) -> Holder:
        """How capacity sees ``instance`` now (a snapshot: acting on it re-checks under ``cond``)."""
        loaded = instance.state is ModelState.LOADED
        return Holder(instance, instance.estimate, instance.last_used, self._pinned(instance),
                      busy=not loaded or instance.leases > 0, loaded=loaded)

    def _evict(self, victim: Instance, reason: str) -> bool:
        """Unload ``victim`` if it is still loaded and idle; False if a request took it meanwhile.

        Caller holds ``_room``. The close itself runs with ``_room`` released, so releases
        of other models never wait behind it; the victim stays ``unloading`` meanwhile and
        keeps counting against the limits until its memory is really gone.
        """
        with victim.cond:
            if victim.state is not ModelState.LOADED or victim.leases:
                return False  # decided under its lock: it may have been leased since the plan
            worker = self._begin_unload(victim, reason)
        self._room.release()
        try:
            self._finish_unload(victim, worker, reason)
        finally:
            self._room.acquire()
        return True

    def _drain(self, victim: Instance, drained: list[Instance]) -> None:
        """Stop new leases on ``victim`` (busy) so its requests run out; one at a time.

        Without this, a model that always has a next request would never be free, and a
        load waiting for room would starve until it timed out.
        """
        if any(v.draining and v.state is ModelState.LOADED for v in drained):
            return
        with victim.cond:
            if victim.state is not ModelState.LOADED or victim.draining:
                return
            victim.draining = True
        drained.append(victim)

    # ------------------------------------------------------------ load / unload

    def _load(self, instance: Instance) -> None:
        """Make room, run the load outside every lock, then publish the outcome under ``cond``."""
        started = time.monotonic()
        worker, error = None, None
        try:
            self._make_room(instance)
            if self._closing:  # room may have come from the shutdown's own unloads
                raise ShuttingDown("The server is shutting down")
            started = time.monotonic()  # the load itself, not the evictions before it
            options = self._load_options(instance)
            log.info("load start model=%s mode=%s path=%s n_ctx=%d parallel=%d estimate_mb=%.0f", instance.file.id,
                     instance.mode.value, instance.file.path, options.n_ctx, options.parallel,
                     instance.estimate / 2**20)
            worker = self._loader(instance.file, options)
        except ServiceError as exc:
            error = exc
        except Exception as exc:  # a loader must never leave the model stuck in LOADING
            error = LoadFailed(f"failed to load model {instance.file.id}: {exc}")
        seconds = time.monotonic() - started
        if error is None and not getattr(worker, "alive", True):  # died between its answer and now
            exit_info = getattr(worker, "exit_info", None)
            error = LoadFailed(f"failed to load model {instance.file.id}: "
                               f"{exit_info.reason if exit_info else 'its worker exited'}")
        with instance.cond:
            if error is None:
                instance.worker, instance.error, instance.cache = worker, None, {}
                instance.loaded_at, instance.load_seconds = self._wall(), seconds
                instance.last_used = self._clock()
                instance.progress = 1.0
                pid = worker_pid(worker)
                instance.transition(ModelState.LOADED, self.events, seconds=round(seconds, 3), pid=pid,
                                    rss_mb=round(self._memory.rss(pid) / 2**20, 1),
                                    devices=worker_devices(worker))
            else:
                instance.error = error
                instance.transition(ModelState.FAILED, self.events, reason=error.detail, seconds=round(seconds, 3))
            instance.cond.notify_all()
        with self._room:
            self._room.notify_all()

    def _on_worker_exit(self, instance: Instance, exit_info: Any) -> None:
        """A loaded instance's worker died (or was killed for not answering): mark it failed.

        Runs on the worker's reader thread, before its waiting requests are woken, so a
        request that retries finds the instance already ``failed`` and loads it again.
        """
        if exit_info.expected:
            return
        with instance.cond:
            if worker_pid(instance.worker) != exit_info.pid or instance.state is not ModelState.LOADED:
                return  # not the current worker, or already being unloaded
            instance.worker, instance.cache = None, {}
            instance.loaded_at = None
            instance.keep_alive = None
            instance.error = ModelCrashed(f"{instance.file.id} crashed: {exit_info.reason}")
            self.events.publish("crashed", model=instance.file.id, mode=instance.mode.value, pid=exit_info.pid,
                                signal=exit_info.signal, reason=exit_info.reason)
            instance.transition(ModelState.FAILED, self.events, reason=f"crashed: {exit_info.reason}")
            instance.cond.notify_all()
        with self._room:
            self._room.notify_all()

    def _on_progress(self, instance: Instance, fraction: float) -> None:
        if fraction - instance.progress >= PROGRESS_STEP or (fraction >= 1.0 > instance.progress):
            instance.progress = fraction
            self.events.publish("loading", model=instance.file.id, mode=instance.mode.value,
                                progress=round(fraction, 3))

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
            worker = self._begin_unload(instance, reason)
        self._finish_unload(instance, worker, reason)
        return "unloaded"

    def _begin_unload(self, instance: Instance, reason: str) -> Any:
        """Caller holds ``cond`` and has checked that no lease is held."""
        instance.transition(ModelState.UNLOADING, self.events, reason=reason)
        worker, instance.worker = instance.worker, None
        instance.cache = {}
        instance.keep_alive = None  # a request's keep_alive never outlives the load it applied to
        return worker

    def _finish_unload(self, instance: Instance, worker: Any, reason: str) -> None:
        """Stop the worker: its exit gives every byte of RAM and VRAM it held back to the system."""
        pid = worker_pid(worker)
        freed: dict[str, float] = {"freed_rss_mb": round(self._memory.rss(pid) / 2**20, 1)}
        vram = self._memory.vram(pid)
        if vram is not None:
            freed["freed_vram_mb"] = round(vram / 2**20, 1)
        started = time.monotonic()
        try:
            close = getattr(worker, "close", None)
            if close is not None:
                close()
        except Exception:
            log.exception("error while closing model=%s", instance.file.id)
        with instance.cond:
            instance.loaded_at = None
            instance.transition(ModelState.UNLOADED, self.events, reason=reason,
                                seconds=round(time.monotonic() - started, 3), **freed)
            instance.cond.notify_all()
        with self._room:
            self._room.notify_all()

    def _forget_removed(self) -> None:
        with self._lock:
            for key, instance in list(self._instances.items()):
                with instance.cond:
                    idle = instance.state in (ModelState.UNLOADED, ModelState.FAILED) and not instance.leases
                    if instance.removed and idle:
                        del self._instances[key]

    # --------------------------------------------------------------- operations

    def load(self, name: str, keep_alive: float | None = None) -> str:
        """Load a model without using it (``/admin/load``, ``preload``); returns its id.

        An embedding model loads in embedding mode, the one its requests use. A model whose
        idle timeout is 0 stays loaded until the next idle check or the end of its next
        request, so a warm-up is never undone before anyone could use it.
        """
        model_id = self.resolve(name)
        mode = Mode.EMBED if self.model_settings(model_id).embedding else Mode.GENERATE
        lease = self.acquire(model_id, mode, keep_alive=keep_alive)
        lease.release(warm_up=True)
        return model_id

    def preload(self, names: list[str]) -> threading.Thread:
        """Load ``names`` one after another in a background thread; failures are logged."""
        def run() -> None:
            for name in names:
                try:
                    self.load(name)
                except ServiceError as exc:
                    log.error("preload failed model=%s reason=%s", name, exc.message)
        thread = threading.Thread(target=run, name="preload", daemon=True)
        thread.start()
        return thread

    def unload(self, name: str, reason: str = "admin", timeout: float | None = None) -> UnloadReport:
        """Unload one model (both modes) or ``"all"``, waiting up to ``timeout`` s for leases."""
        timeout = self.settings.unload_timeout if timeout is None else timeout
        report = UnloadReport()
        deadline = time.monotonic() + timeout
        for instance in self._targets(name):
            outcome = self._unload_instance(instance, reason, max(0.0, deadline - time.monotonic()))
            getattr(report, outcome).append(instance.label)
        self._forget_removed()
        return report

    def unload_after_requests(self, name: str, reason: str = "keep_alive") -> UnloadReport:
        """Unload ``name`` now if idle, else as soon as its last running request ends (Ollama's
        ``keep_alive: 0``): its keep_alive becomes 0, which the last lease's release acts on."""
        report = UnloadReport()
        for instance in self._targets(name):
            outcome = self._unload_instance(instance, reason, timeout=0)
            getattr(report, outcome).append(instance.label)
            if outcome != "busy":
                continue
            with instance.cond:
                instance.keep_alive = 0
                # The last request may have ended between the verdict and now, releasing under
                # the old keep_alive: then nobody else will act on the new one.
                ended = instance.leases == 0 and instance.state is ModelState.LOADED
            if ended:
                self._in_background(self._unload_when_idle, instance, reason)
        self._forget_removed()
        return report

    def _targets(self, name: str) -> list[Instance]:
        """The instances (both modes) of one model, or of every model for ``"all"``."""
        if name == "all":
            with self._lock:
                return list(self._instances.values())
        model_id = self.resolve(name)
        with self._lock:
            return [i for (mid, _), i in self._instances.items() if mid == model_id]

    def evict_idle(self) -> list[str]:
        """Unload every unpinned instance idle past its idle timeout with no lease (the idle job)."""
        with self._lock:
            candidates = list(self._instances.values())
        evicted = []
        for instance in candidates:
            if self._pinned(instance):
                continue
            configured = self._configured_timeout(instance)
            with instance.cond:
                # Decide under cond: a request may have taken a lease, or set keep_alive, since.
                timeout = _timeout(instance, configured)
                idle_for = self._clock() - instance.last_used
                if timeout < 0 or not (instance.state is ModelState.LOADED and instance.leases == 0
                                       and idle_for >= timeout):
                    continue
                reason = _idle_reason(instance)
                worker = self._begin_unload(instance, reason)
            self._finish_unload(instance, worker, reason)
            evicted.append(instance.label)
        return evicted

    def begin_shutdown(self) -> None:
        """Refuse new requests from now on (cheap: safe to call from a signal handler)."""
        self._closing = True

    def shutdown(self, timeout: float) -> None:
        """Refuse new requests, give running ones ``timeout`` s, then unload everything."""
        self.begin_shutdown()
        with self._lock:
            instances = list(self._instances.values())
        for instance in instances:
            with instance.cond:
                instance.cond.notify_all()  # wake requests waiting for a load
        with self._room:
            self._room.notify_all()
        self._background.shutdown(wait=True)  # an unload already running finishes first
        deadline = time.monotonic() + timeout
        for instance in instances:
            if self._unload_instance(instance, "shutdown", max(0.0, deadline - time.monotonic())) == "busy":
                log.warning("shutdown: model=%s still had %d requests in flight", instance.label,
                            instance.leases)
                self._kill_worker(instance)
        close = getattr(self._loader, "close", None)
        if close is not None:
            close()  # the warm spare

    def _kill_worker(self, instance: Instance) -> None:
        """Shutdown's last word for an instance still busy: its worker goes with the server."""
        with instance.cond:
            worker = instance.worker
        if worker is not None:
            with suppress(Exception):
                worker.close(timeout=1)

    # ------------------------------------------------------------------ views

    def models(self, *, relative_paths: bool = False) -> list[dict[str, Any]]:
        """Every discovered model with its live state; never blocks on a load or generation.

        The folder is rescanned first when the last scan is over a second old, so a file
        copied in shows up on the next listing. ``relative_paths`` shows each model's path
        relative to the models folder (for callers who may not learn the server's layout).
        """
        self._registry.rescan_if_stale()
        root = self.settings.models_directory.resolve() if relative_paths else None
        with self._lock:
            files, settings = self._registry.listing_locked()
            instances = dict(self._instances)
        views = []
        directory = self.settings.models_directory
        for file in files:
            generate = self._snapshot(instances.get((file.id, Mode.GENERATE)) or self._unloaded(file))
            embed = instances.get((file.id, Mode.EMBED))
            model = settings.get(file.id, NO_SETTINGS)
            media = generate.media if generate.media is not None else (
                projector_media(projector_path(file, model, directory)))
            views.append(model_view(file, model, generate, self._snapshot(embed) if embed is not None else None,
                                    capabilities(model, media), root, _rpc_servers(self.settings, model)))
        return views

    def _unloaded(self, file: ModelFile) -> Instance:
        """Stands in, in a listing, for a model no request has used yet."""
        mode = Mode.EMBED if self.model_settings(file.id).embedding else Mode.GENERATE  # what a load would be
        instance = Instance(file, mode)
        instance.estimate = self._estimate(instance)
        return instance

    def _snapshot(self, instance: Instance) -> InstanceSnapshot:
        """What a listing shows of ``instance``, copied under its ``cond``; the policy's
        answers (timeout, pin, estimate) come first, since they take the registry lock."""
        now, wall = self._clock(), self._wall()
        timeout, pinned = self._idle_timeout(instance), self._pinned(instance)
        estimate = instance.estimate or self._estimate(instance)
        with instance.cond:
            loaded = instance.state is ModelState.LOADED
            return InstanceSnapshot(
                state=instance.state, leases=instance.leases, generating=instance.generating,
                last_used=instance.last_used, loaded_at=instance.loaded_at, load_seconds=instance.load_seconds,
                progress=instance.progress, pid=worker_pid(instance.worker) if loaded else None,
                devices=worker_devices(instance.worker) if loaded else None,
                slots=worker_slots(instance.worker) if loaded else None,
                media=worker_media(instance.worker) if loaded else None,
                error=instance.error.message if instance.error else None,
                error_detail=instance.error.detail if instance.error else None, estimate=estimate,
                idle_timeout=timeout, pinned=pinned, now=now, wall=wall)

    def loaded_models(self) -> list[str]:
        """Ids of models with an instance loaded."""
        with self._lock:
            instances = list(self._instances.values())
        return loaded_ids((i.file.id, i.state) for i in instances)


def _rpc_servers(settings: ManagerSettings, model: ModelSettings) -> list[str]:
    """The RPC servers a model places layers on: its own list, else the global one."""
    return model.rpc_servers if model.rpc_servers is not None else settings.rpc_servers


def _timeout(instance: Instance, configured: float) -> float:
    """The idle timeout in force: the latest request's keep_alive, else ``configured``.
    Read under ``instance.cond``."""
    return instance.keep_alive if instance.keep_alive is not None else configured


def _idle_reason(instance: Instance) -> str:
    """Why an idle unload happens: a request's keep_alive set the timeout, or the config did."""
    return "keep_alive" if instance.keep_alive is not None else "idle"


def _gib(size: int) -> str:
    return f"{size / 2**30:.2f} GiB"


def _failure(instance: Instance) -> ServiceError:
    """A fresh copy of the recorded load error: one exception object per raising thread."""
    error = instance.error or LoadFailed(f"failed to load model {instance.file.id}")
    return copy.copy(error)


