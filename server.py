"""llama-cpp-server: the app factory and the command-line entry point.

``create_app`` builds an app and loads nothing; ``main`` reads the configuration (flag >
environment / .env > config.json > defaults), serves the app with waitress, and on
SIGTERM or SIGINT refuses new requests, lets running ones finish (bounded by
``unload_timeout``), unloads every model and exits 0.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from dotenv import find_dotenv, load_dotenv
from flask import Flask, Response, g, request
from flask_cors import CORS

import admin
import anthropic_api
import api
import ollama_api
import rerank
import responses_api
import status_page
import tasks
import tokens_api
from activity import ActivityLog
from auth import caller_is_admin, install_auth
from config import CONFIG_ENV, ConfigError, Settings, load_settings
from errors import register_error_handlers
from grammar.checker import GrammarChecker
from memory import MemoryProbe
from metrics import Metrics
from model_manager import Clock, Loader, ModelManager
from openapi import install_openapi
from response_store import ResponseStore
from state import EXTENSION, AppState
from workers import WorkerLauncher
from wsgi_server import build_wsgi_server, listen_addresses

log = logging.getLogger("llama_cpp_server")

QUIET_PATHS = ("/health", "/metrics", "/admin/stats")  # polled: logged at debug level


def create_app(settings: Settings, *, config_path: Path | None = None,
               overrides: dict[str, dict[str, Any]] | None = None, clock: Clock = time.monotonic,
               loader: Loader | None = None, background: bool = True,
               grammars: GrammarChecker | None = None) -> Flask:
    """Build the WSGI app around a fresh ``ModelManager``; nothing is loaded yet.

    ``grammars`` judges request grammars (default: a ``GrammarChecker`` with its default
    time limit; its helper process starts on the first grammar, not here).

    With ``background`` the idle-eviction scheduler starts and the ``preload`` models
    begin loading in a thread (the app answers meanwhile).
    """
    app = Flask(__name__, static_folder=None)  # the status page serves its own files
    app.config["MAX_CONTENT_LENGTH"] = settings.server.max_request_body
    app.json.sort_keys = False  # type: ignore[attr-defined]
    # The launcher keeps a warm spare worker, started in the background (never by a bare app).
    loader = loader or WorkerLauncher(settings.model_manager.worker_timeout, keep_spare=background)
    manager = ModelManager(settings.model_manager, settings.models, clock=clock, loader=loader)
    activity = ActivityLog()
    state = AppState(settings, manager, config_path, overrides or {}, metrics=Metrics(manager, activity),
                     activity=activity, memory=MemoryProbe(),
                     pool=ThreadPoolExecutor(settings.server.threads, thread_name_prefix="stream-load"),
                     grammars=grammars or GrammarChecker(),
                     responses=ResponseStore(settings.server.data_directory, settings.server.responses_max_count,
                                             settings.server.responses_max_age))
    if background:
        state.scheduler = tasks.start_scheduler(manager, settings.model_manager.check_interval)
        if settings.model_manager.preload:
            manager.preload(settings.model_manager.preload)
    state.config_from_file = config_path is not None and config_path.exists()
    state.event_streams = threading.BoundedSemaphore(admin.event_stream_limit(settings.server.threads))
    app.extensions[EXTENSION] = state
    CORS(app, origins=settings.server.cors_origins, supports_credentials=False)
    register_error_handlers(app, lambda: caller_is_admin(settings.server))
    install_auth(app, settings.server)
    state.metrics.install(app)
    install_openapi(app)
    app.register_blueprint(api.bp)
    app.register_blueprint(anthropic_api.bp)
    app.register_blueprint(ollama_api.bp)
    app.register_blueprint(admin.bp)
    app.register_blueprint(status_page.bp)
    app.register_blueprint(tokens_api.bp)
    app.register_blueprint(rerank.bp)
    app.register_blueprint(responses_api.bp)
    _install_request_log(app)
    if not manager.models():
        log.warning("no models found in %s: put .gguf files there (sub-folders are scanned too), "
                    "then POST /admin/reload or just request them by name",
                    settings.model_manager.models_directory)
    return app


def close_app(app: Flask, timeout: float | None = None) -> None:
    """Stop the scheduler, let requests finish for up to ``timeout`` s (default: the current
    ``unload_timeout``), unload every model."""
    state: AppState = app.extensions[EXTENSION]
    if state.scheduler is not None:
        state.scheduler.shutdown(wait=False)
    state.manager.shutdown(state.manager.settings.unload_timeout if timeout is None else timeout)
    state.pool.shutdown(wait=False)
    state.grammars.close()
    state.responses.close()


def _install_request_log(app: Flask) -> None:
    @app.before_request
    def _start_timer() -> None:
        g.started = time.monotonic()

    @app.after_request
    def _log_request(response: Response) -> Response:
        level = logging.DEBUG if request.path in QUIET_PATHS else logging.INFO
        seconds = time.monotonic() - g.get("started", time.monotonic())
        log.log(level, "request method=%s path=%s status=%d seconds=%.3f stream=%s", request.method,
                request.path, response.status_code, seconds, response.is_streamed)
        return response


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="OpenAI-compatible llama.cpp server for GGUF models")
    parser.add_argument("--config", type=Path, help=f"config file (default: ./config.json; env {CONFIG_ENV})")
    parser.add_argument("--host", help="address to bind (LLAMA_SERVER_HOST)")
    parser.add_argument("--port", type=int, help="port to listen on (LLAMA_SERVER_PORT)")
    parser.add_argument("--models-dir", type=Path, help="folder of .gguf files (LLAMA_SERVER_MODELS_DIRECTORY)")
    return parser.parse_args(argv)


def _overrides(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    overrides: dict[str, dict[str, Any]] = {}
    if args.host is not None:
        overrides.setdefault("server", {})["host"] = args.host
    if args.port is not None:
        overrides.setdefault("server", {})["port"] = args.port
    if args.models_dir is not None:
        overrides.setdefault("model_manager", {})["models_directory"] = str(args.models_dir.resolve())
    return overrides


def main(argv: list[str] | None = None) -> int:
    """Run the server until SIGTERM/SIGINT; returns the exit status."""
    load_dotenv(find_dotenv(usecwd=True), override=False)  # .env of the working directory
    args = parse_args(argv)
    named = args.config or (Path(os.environ[CONFIG_ENV]) if os.environ.get(CONFIG_ENV) else None)
    config_path = (named or Path("config.json")).resolve()
    overrides = _overrides(args)
    try:
        settings = load_settings(config_path, overrides, required=named is not None)
    except ConfigError as exc:
        print(f"llama-cpp-server: config error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.server.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    return serve(create_app(settings, config_path=config_path, overrides=overrides), settings)


def serve(app: Flask, settings: Settings) -> int:
    """Serve ``app`` with waitress until a signal; drain, unload, and return 0."""
    server_settings = settings.server
    try:
        server = build_wsgi_server(app, server_settings)
    except OSError as exc:
        print(f"llama-cpp-server: cannot listen on {server_settings.host}:{server_settings.port}: "
              f"{exc.strerror}", file=sys.stderr)
        close_app(app, 0)
        return 1
    if server_settings.host not in ("127.0.0.1", "localhost", "::1") and not server_settings.api_keys:
        log.warning("listening on %s without api_keys: anyone who can reach this address can use the models",
                    server_settings.host)
    stopping = threading.Event()

    def _drain_then_stop() -> None:
        close_app(app)  # the unload_timeout in force now: /admin/reload may have changed it
        # A real signal (unlike _thread.interrupt_main) also wakes the main thread from
        # waitress's select(); _on_signal then stops the loop.
        os.kill(os.getpid(), signal.SIGINT)

    def _on_signal(signum: int, _frame: Any) -> None:
        if stopping.is_set():
            raise KeyboardInterrupt  # drained, or a second signal: leave waitress's loop now
        stopping.set()
        # At once, on the thread that accepts connections: anything accepted from now on is refused.
        app.extensions[EXTENSION].manager.begin_shutdown()
        log.info("shutdown requested signal=%s; finishing in-flight requests", signal.Signals(signum).name)
        threading.Thread(target=_drain_then_stop, name="shutdown", daemon=True).start()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    for host, port in listen_addresses(server):
        log.info("listening on http://%s:%s models_directory=%s", f"[{host}]" if ":" in host else host, port,
                 settings.model_manager.models_directory)
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    log.info("shutdown complete")
    return 0


if __name__ == "__main__":
    sys.exit(main())
