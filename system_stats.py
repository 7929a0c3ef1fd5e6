"""What ``GET /admin/stats`` shows: the machine's memory and each running model's share, the
requests each one is serving, and the recent generation activity (``activity.ActivityLog``).

Pure assembly over the manager's listing, a ``MemoryProbe`` and the activity log: nothing
here waits on a worker (RSS is read from the OS by pid), so it never waits behind a load or
a generation.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from activity import ActivityLog
from memory import MemoryProbe

RUNNING = frozenset({"loading", "loaded", "unloading"})  # states in which an instance holds (or takes) memory


def build_stats(models: list[dict[str, Any]], probe: MemoryProbe, activity: ActivityLog,
                budget: int | None) -> dict[str, Any]:
    """The ``/admin/stats`` body from the model listing (``ModelManager.models()``)."""
    gpus = probe.gpus()
    instances = [_instance(model_id, mode, view, probe, bool(gpus)) for model_id, mode, view in _running(models)]
    memory = {**probe.machine(), "server_rss_bytes": probe.rss(), "budget_bytes": budget,
              "estimated_bytes": sum(i["estimated_memory_bytes"] for i in instances), "gpus": gpus}
    return {"time": round(time.time(), 3), "memory": memory, "instances": instances, "activity": activity.summary()}


def _running(models: list[dict[str, Any]]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """Every instance that is loading, loaded or unloading: (model id, mode, its view)."""
    for view in models:
        if view["state"] in RUNNING:
            yield view["id"], "generate", view
        embeddings = view.get("embeddings")
        if embeddings is not None and embeddings["state"] in RUNNING:
            yield view["id"], "embed", embeddings


def _instance(model_id: str, mode: str, view: dict[str, Any], probe: MemoryProbe, gpus: bool) -> dict[str, Any]:
    pid = view["pid"]
    return {"model": model_id, "mode": mode, "state": view["state"], "pid": pid,
            "rss_bytes": probe.rss(pid) if pid else None, "vram_bytes": probe.vram(pid) if pid and gpus else None,
            "estimated_memory_bytes": view["estimated_memory_bytes"], "in_flight": view["in_flight"],
            "queued": view["queued"], "generating": view["generating"], "slots": view["slots"]}
