"""The capacity policy as a pure function: what must go for one more model to fit.

No locks and no llama.cpp: the manager describes the models that hold room (``Holder``),
asks ``plan_room``, and acts on the answer one step at a time, re-checking each victim
under its own lock, since a request may lease it between the plan and the act.

Rules: a load fits when one more model stays within ``max_loaded_models`` (0: no limit)
and the estimates stay within ``memory_budget`` (None: no budget). Pinned models never
go. Idle models go first, least recently used first, and only as many as needed. When the
idle ones are not enough, the least recently used busy model is drained: new requests
for it wait, so that its running ones end and it can go too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Holder:
    """A model that holds room: loaded, unloading, or a load already given room."""

    key: Any
    estimate: int
    last_used: float
    pinned: bool = False
    busy: bool = False  # requests hold it, or it is not loaded (loading, unloading): it cannot go now
    loaded: bool = True  # loaded (not loading or unloading): it can be drained when busy


@dataclass(frozen=True)
class RoomPlan:
    """What ``plan_room`` decided."""

    reason: str | None  # "capacity" or "memory" while the newcomer does not fit; None when it fits
    evict: list[Any] = field(default_factory=list)  # keys of idle models to unload, in this order
    drain: Any = None  # key of a busy model to drain when evicting is not enough


def overflow(holders: Sequence[Holder], estimate: int, limit: int, budget: int | None) -> str | None:
    """Why one more model of ``estimate`` bytes does not fit beside ``holders``, or None."""
    if limit and len(holders) + 1 > limit:
        return "capacity"
    if budget is not None and sum(h.estimate for h in holders) + estimate > budget:
        return "memory"
    return None


def plan_room(holders: Sequence[Holder], estimate: int, limit: int, budget: int | None) -> RoomPlan:
    """The idle models to unload (least recently used first, no more than needed) and, when
    that is not enough, the busy model to drain, for a newcomer of ``estimate`` bytes."""
    reason = overflow(holders, estimate, limit, budget)
    if reason is None:
        return RoomPlan(None)
    candidates = sorted((h for h in holders if not h.pinned), key=lambda h: h.last_used)
    staying = list(holders)
    evict = []
    for holder in candidates:
        if holder.busy:
            continue
        evict.append(holder.key)
        staying.remove(holder)
        if overflow(staying, estimate, limit, budget) is None:
            return RoomPlan(reason, evict)
    drain = next((h.key for h in candidates if h.busy and h.loaded), None)
    return RoomPlan(reason, evict, drain)
