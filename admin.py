"""Health, the admin listing, and the admin actions: load, unload, reload."""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Response, jsonify, request

import sse
import tasks
from auth import caller_is_admin
from config import ConfigError, load_settings
from errors import InvalidRequest, ModelBusy, TooManyStreams
from schemas import ModelRequest, parse_body
from state import app_state
from system_stats import build_stats

log = logging.getLogger(__name__)
bp = Blueprint("admin", __name__)

EVENTS_HEARTBEAT = 1.0  # seconds between checks for shutdown; a ": ping" comment each time


@bp.get("/health")
def health() -> Response:
    """Liveness plus every model's state; never waits behind a load or a generation."""
    state = app_state()
    # /health is often public: without an admin key it does not reveal where the server keeps files.
    models = state.manager.models(relative_paths=not caller_is_admin(state.settings.server))
    return jsonify({"status": "ok", "loaded_models": state.manager.loaded_models(),
                    "uptime": round(time.monotonic() - state.started, 3), "models": models})


@bp.get("/admin/models")
def admin_models() -> Response:
    """The detailed model listing."""
    state = app_state()
    return jsonify({"models": state.manager.models(), "requests": state.metrics.requests_by_api()})


@bp.get("/admin/stats")
def admin_stats() -> Response:
    """Memory (machine, budget, each running model's worker), requests in flight, queued and
    generating, and recent tokens per second and time to first token per model."""
    state = app_state()
    body = build_stats(state.manager.models(), state.memory, state.activity,
                       state.manager.settings.memory_budget)
    response = jsonify(body)
    response.headers["Cache-Control"] = "no-store"
    return response


@bp.post("/admin/load")
def admin_load() -> Response:
    """Load a model now (a warm-up), so the first real request does not wait."""
    body = parse_body(request.get_data(), ModelRequest)
    manager = app_state().manager
    started = time.monotonic()
    model_id = manager.load(body.model, keep_alive=body.keep_alive)
    return jsonify({"model": model_id, "state": "loaded", "seconds": round(time.monotonic() - started, 3)})


@bp.post("/admin/unload")
def admin_unload() -> Response:
    """Unload a model or ``"all"``, waiting (bounded) for in-flight requests to finish."""
    body = parse_body(request.get_data(), ModelRequest)
    started = time.monotonic()
    report = app_state().manager.unload(body.model, "admin", body.timeout)
    waited = round(time.monotonic() - started, 3)
    if report.busy:
        raise ModelBusy(f"Still serving requests after waiting {waited} s, not unloaded: "
                        f"{', '.join(report.busy)}; unloaded: {', '.join(report.unloaded) or 'none'}",
                        param="model")
    return jsonify({"unloaded": report.unloaded, "not_loaded": report.not_loaded, "waited_seconds": waited})


@bp.post("/admin/reload")
def admin_reload() -> Response:
    """Re-read the config file and rescan the models folder; a bad config changes nothing."""
    state = app_state()
    try:
        # An app built from settings alone (no file) keeps them and only rescans.
        # A config file that was read before must still be there: defaults would silently
        # drop every pin, alias and key.
        settings = state.settings if state.config_path is None else load_settings(
            state.config_path, state.overrides, required=state.config_from_file)
    except ConfigError as exc:
        raise InvalidRequest(f"Config not reloaded (the running one stays): {exc}",
                             code="invalid_config") from None
    old = state.settings
    # The server section (bind, threads, CORS, keys) is wired into the running app: it stays.
    pending = sorted(k for k in type(old.server).model_fields if getattr(old.server, k) != getattr(settings.server, k))
    if pending:
        log.warning("reload: server settings need a restart to change: %s", ", ".join(pending))
    state.settings = settings.model_copy(update={"server": old.server})
    state.config_from_file = state.config_path is not None and state.config_path.exists()
    added, removed = state.manager.apply_settings(settings.model_manager, settings.models)
    if state.scheduler is not None and settings.model_manager.check_interval != old.model_manager.check_interval:
        tasks.reschedule(state.scheduler, settings.model_manager.check_interval)
    return jsonify({"reloaded": True, "added": added, "removed": removed, "restart_required": pending,
                    "models": [m["id"] for m in state.manager.models()]})


@bp.get("/admin/events")
def admin_events() -> Response:
    """Lifecycle events as Server-Sent Events (``event: loaded`` ...), recent history first."""
    state = app_state()
    manager = state.manager
    bus = manager.events
    with_history = request.args.get("history", "1") != "0"
    # Each open stream holds a waitress worker for as long as it lasts; a bounded share keeps
    # the rest free for requests, so many status-page tabs cannot starve /health.
    if not state.event_streams.acquire(blocking=False):
        raise TooManyStreams(f"At most {event_stream_limit(state.settings.server.threads)} event streams may be "
                             "open at once; close one (a status page tab) or raise server.threads",
                             headers={"Retry-After": "5"})

    def stream() -> Iterator[bytes]:
        # Subscribe inside the generator: a response that is never iterated (HEAD, a client
        # gone before the first byte) never runs a ``finally``, so it must never subscribe.
        subscriber = bus.subscribe()
        backlog = bus.history() if with_history else []
        try:
            seen = 0
            for event in backlog:
                seen = event["id"]
                yield _event_bytes(event)
            yield sse.comment("live")
            while not manager.closing:
                try:
                    event = subscriber.get(timeout=EVENTS_HEARTBEAT)
                except queue.Empty:
                    yield sse.comment("ping")
                    continue
                if event["id"] > seen:
                    yield _event_bytes(event)
        finally:
            bus.unsubscribe(subscriber)

    response = Response(stream(), mimetype=sse.MIMETYPE, headers=sse.HEADERS)
    response.call_on_close(state.event_streams.release)  # runs for HEAD and early hang-ups too
    return response


def event_stream_limit(threads: int) -> int:
    """How many ``/admin/events`` streams may be open: a quarter of the worker threads, at least one."""
    return max(1, threads // 4)


def _event_bytes(event: dict[str, Any]) -> bytes:
    return f"id: {event['id']}\nevent: {event['event']}\n".encode() + sse.event(event)
