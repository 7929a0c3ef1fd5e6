"""Model instances and their states: one model in one mode, and the one way its state changes.

Concurrency: each ``Instance`` carries a condition ``cond`` that guards its state, leases
and bookkeeping. ``Instance.transition`` requires ``cond`` held, so a state change and the
check that justified it happen in one step. Nothing here takes any other lock; who holds
what, and in which order, is the manager's business (``model_manager``).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from discovery import ModelFile
from errors import ServiceError
from events import EventBus

log = logging.getLogger("model_manager")  # lifecycle lines keep the logger name they always had


class ModelState(str, Enum):
    UNLOADED = "unloaded"
    LOADING = "loading"
    LOADED = "loaded"
    UNLOADING = "unloading"
    FAILED = "failed"


class Mode(str, Enum):
    GENERATE = "generate"
    EMBED = "embed"


TRANSITIONS: dict[ModelState, set[ModelState]] = {
    ModelState.UNLOADED: {ModelState.LOADING},
    ModelState.FAILED: {ModelState.LOADING},
    ModelState.LOADING: {ModelState.LOADED, ModelState.FAILED},
    ModelState.LOADED: {ModelState.UNLOADING, ModelState.FAILED},  # FAILED: its worker crashed
    ModelState.UNLOADING: {ModelState.UNLOADED},
}


@dataclass(eq=False)
class Instance:
    """One model in one mode: its worker (when loaded) and its bookkeeping."""

    file: ModelFile
    mode: Mode
    cond: threading.Condition = field(default_factory=threading.Condition)
    state: ModelState = ModelState.UNLOADED
    worker: Any = None  # an engine.client.Worker while loaded
    cache: dict[str, Any] = field(default_factory=dict)  # per-load derived data (token pieces, template)
    leases: int = 0
    generating: int = 0
    attempt: int = 0
    error: ServiceError | None = None
    last_used: float = 0.0
    loaded_at: float | None = None
    load_seconds: float | None = None
    estimate: int = 0
    progress: float = 0.0
    keep_alive: float | None = None  # set by a request's keep_alive; beats the config
    removed: bool = False
    admitted: bool = False  # a load that was given room (counts towards the limits while loading)
    draining: bool = False  # a load waits for this one: new requests wait instead of leasing it

    @property
    def label(self) -> str:
        return self.file.id if self.mode is Mode.GENERATE else f"{self.file.id} (embeddings)"

    def transition(self, new: ModelState, events: EventBus, **details: Any) -> None:
        """The one place a state changes: checked, logged, published. Caller holds ``cond``."""
        old = self.state
        if new not in TRANSITIONS[old]:
            raise RuntimeError(f"invalid transition {old.value} -> {new.value} for {self.label}")
        self.state = new
        if new in (ModelState.UNLOADED, ModelState.FAILED):
            self.admitted = False
        if new is ModelState.UNLOADING:
            self.draining = False
        log.info("model %s model=%s mode=%s %s", new.value, self.file.id, self.mode.value,
                 " ".join(f"{k}={v}" for k, v in details.items()))
        events.publish(new.value, model=self.file.id, mode=self.mode.value, **details)


def worker_pid(worker: Any) -> int | None:
    """The process id of a worker (None for none, or for a test's stand-in without one)."""
    return getattr(worker, "pid", None)


def worker_devices(worker: Any) -> dict[str, int] | None:
    """Where a loaded worker's weights went, by llama.cpp's buffer name (None when unknown)."""
    info = getattr(worker, "info", None)
    return dict(info.devices) if info is not None and getattr(info, "devices", None) else None


def worker_media(worker: Any) -> tuple[str, ...] | None:
    """What a loaded worker's projector reads (``"image"``, ``"audio"``); None for a stand-in
    without model info."""
    info = getattr(worker, "info", None)
    return tuple(info.media) if info is not None and hasattr(info, "media") else None


def worker_slots(worker: Any) -> int | None:
    """How many sequences ``worker`` decodes together (None for a stand-in without model info)."""
    return getattr(getattr(worker, "info", None), "parallel", None)
