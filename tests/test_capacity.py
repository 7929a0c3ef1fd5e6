"""The capacity policy alone (``capacity.plan_room``): no server, no llama.cpp."""

from __future__ import annotations

from capacity import Holder, overflow, plan_room

GIB = 2**30


def test_a_load_that_fits_needs_nothing():
    holders = [Holder("a", GIB, 1.0)]
    assert plan_room(holders, GIB, limit=2, budget=None).reason is None
    assert plan_room(holders, GIB, limit=0, budget=2 * GIB).reason is None


def test_the_count_limit_evicts_the_least_recently_used_idle_model():
    holders = [Holder("new", GIB, 3.0), Holder("old", GIB, 1.0), Holder("mid", GIB, 2.0)]
    plan = plan_room(holders, GIB, limit=3, budget=None)
    assert (plan.reason, plan.evict, plan.drain) == ("capacity", ["old"], None)


def test_the_memory_budget_evicts_only_as_many_as_needed():
    holders = [Holder("a", 2 * GIB, 1.0), Holder("b", 1 * GIB, 2.0), Holder("c", 1 * GIB, 3.0)]
    assert plan_room(holders, 2 * GIB, limit=0, budget=5 * GIB).evict == ["a"]
    assert plan_room(holders, 4 * GIB, limit=0, budget=5 * GIB).evict == ["a", "b"]  # 1 + 4 fits
    assert plan_room(holders, 5 * GIB, limit=0, budget=5 * GIB).evict == ["a", "b", "c"]
    assert overflow(holders, 2 * GIB, 0, 5 * GIB) == "memory"


def test_pinned_models_never_go_busy_ones_are_drained_not_evicted():
    holders = [Holder("pinned", GIB, 0.0, pinned=True), Holder("busy", GIB, 1.0, busy=True),
               Holder("idle", GIB, 2.0)]
    plan = plan_room(holders, GIB, limit=3, budget=None)
    assert plan.evict == ["idle"] and plan.drain is None  # the idle one is enough
    plan = plan_room(holders, GIB, limit=2, budget=None)
    assert plan.evict == ["idle"] and plan.drain == "busy"  # not enough: drain the busy one too


def test_models_that_are_not_loaded_yet_are_neither_evicted_nor_drained():
    holders = [Holder("loading", GIB, 0.0, busy=True, loaded=False), Holder("pinned", GIB, 1.0, pinned=True)]
    plan = plan_room(holders, GIB, limit=2, budget=None)
    assert (plan.reason, plan.evict, plan.drain) == ("capacity", [], None)  # the newcomer waits
