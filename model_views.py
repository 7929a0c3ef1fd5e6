"""The JSON shape of the models and their instances, as ``/v1/models``, ``/admin/models``,
``/health`` and the metrics show them.

Pure functions over plain data: the manager copies what it needs (``InstanceSnapshot``)
under the locks, and the formatting here runs holding none.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from config import ModelSettings
from discovery import ModelFile
from instances import ModelState


@dataclass(frozen=True)
class InstanceSnapshot:
    """One instance as a listing saw it: copied under its ``cond`` at ``now``."""

    state: ModelState
    leases: int
    generating: int
    last_used: float  # monotonic; 0.0: never used
    loaded_at: float | None  # wall clock
    load_seconds: float | None
    progress: float
    pid: int | None  # its worker's, while loaded
    devices: dict[str, int] | None  # where its weights went (llama.cpp's buffer names), while loaded
    slots: int | None  # its worker's parallel sequences, while loaded
    # What its worker's projector reads, while loaded: a reload that changes ``mmproj`` takes
    # effect at the next load, so until then the config does not describe this instance.
    media: tuple[str, ...] | None
    error: str | None  # what any caller may read
    error_detail: str | None  # the whole of it, for admins (an RPC server's address)
    estimate: int
    idle_timeout: float
    pinned: bool
    now: float  # monotonic clock when the copy was taken
    wall: float  # wall clock at the same moment


def model_view(file: ModelFile, model: ModelSettings, generate: InstanceSnapshot,
               embed: InstanceSnapshot | None, capabilities: list[str], root: Path | None = None,
               rpc_servers: list[str] | None = None) -> dict[str, Any]:
    """One model: its file, its settings, its text generation instance's state at the top
    level and its embedding instance's (if any) under ``embeddings``; ``capabilities``: what
    it can be asked for (``projectors.capabilities``).

    ``root``: show the path relative to it (the models folder), for callers who may not
    learn the server's layout; they do not see the RPC servers either (addresses of a protocol
    without authentication). ``rpc_servers``: the RPC servers its loads use.
    """
    public = root is not None
    path = _relative(file.path, root) if public else str(file.path)
    view: dict[str, Any] = {"id": file.id, "aliases": list(model.aliases), "path": path,
                            "size_bytes": file.size, "created": file.created, "pinned": model.pinned,
                            "capabilities": capabilities}
    if not public:
        view["rpc_servers"] = list(rpc_servers or [])
    view.update(instance_view(generate, public))
    if embed is not None:
        view["embeddings"] = instance_view(embed, public)
    return view


def instance_view(seen: InstanceSnapshot, public: bool = False) -> dict[str, Any]:
    """An instance's live state: leases, idle time and expiry (wall clock), load facts.
    ``public``: without the devices, whose names carry RPC servers' addresses."""
    loaded = seen.state is ModelState.LOADED
    idle = loaded and not seen.leases
    last_used = seen.wall - (seen.now - seen.last_used) if seen.last_used else None
    expires = last_used + seen.idle_timeout if (
        idle and last_used and seen.idle_timeout >= 0 and not seen.pinned) else None
    view = {
        "state": seen.state.value,
        "in_flight": seen.leases,
        "queued": max(0, seen.leases - seen.generating),
        "generating": seen.generating,
        "slots": seen.slots if loaded else None,
        "idle_seconds": round(seen.now - seen.last_used, 3) if idle else None,
        "estimated_memory_bytes": seen.estimate,
        "loaded_at": seen.loaded_at,
        "last_used": round(last_used, 3) if last_used else None,
        "expires_at": round(expires, 3) if expires else None,
        "idle_timeout": seen.idle_timeout,
        "load_seconds": seen.load_seconds,
        "pid": seen.pid if loaded else None,
        "devices": seen.devices if loaded else None,
        "error": seen.error if public else seen.error_detail,
    }
    if public:
        del view["devices"]
    if seen.state is ModelState.LOADING:
        view["progress"] = round(seen.progress, 3)
    return view


def loaded_ids(states: Iterable[tuple[str, ModelState]]) -> list[str]:
    """Ids of the models with an instance loaded, sorted, each once (``/health``)."""
    return sorted({model_id for model_id, state in states if state is ModelState.LOADED})


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:  # the folder moved since discovery: the name alone
        return path.name
