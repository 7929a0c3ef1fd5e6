"""Fixtures: generated GGUF models, a live waitress server on a loopback port, an SSE reader.

The server runs in this process (so tests can wrap the loader and read the manager), but
every request goes over a real socket to real waitress, and every model is a real GGUF
file run by real llama.cpp. Every JSON reply of the OpenAI endpoints that passes through
``LiveServer.get``/``post``, and every chunk ``sse_events`` reads, is checked against
OpenAI's own schema for it (tests/openai_spec.py).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests
from hypothesis import settings as hypothesis_settings
from waitress import wasyncore

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import openai_spec  # noqa: E402
from gguf_factory import CHATML_TEMPLATE, write_llama_model  # noqa: E402

from config import Settings  # noqa: E402
from server import close_app, create_app  # noqa: E402
from workers import LoadOptions, WorkerLauncher  # noqa: E402
from wsgi_server import build_wsgi_server  # noqa: E402

# CI explores the same examples every run, so a red build always reproduces; local runs
# keep exploring new ones.
hypothesis_settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    hypothesis_settings.load_profile("ci")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--soak-seconds", type=float, default=45.0,
                     help="how long tests/test_soak.py runs its clients (0 skips it)")


STORIES = Path(os.environ.get("LLAMA_TEST_MODELS", ROOT.parent / "shared" / "models")) / "stories260K.gguf"
JOIN_TIMEOUT = 30


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    """A models folder with two tiny generated models: ``tiny`` (no template) and ``tiny-chat`` (ChatML)."""
    directory = tmp_path / "models"
    directory.mkdir()
    write_llama_model(directory / "tiny.gguf", seed=1)
    write_llama_model(directory / "tiny-chat.gguf", seed=2, chat_template=CHATML_TEMPLATE)
    return directory


@pytest.fixture
def stories_path() -> Path:
    """The trained stories260K model from ../shared/models (skips when absent)."""
    if not STORIES.exists():
        pytest.skip(f"{STORIES} not found (set LLAMA_TEST_MODELS to the folder holding stories260K.gguf)")
    return STORIES


class CountingLoader:
    """The real loader (one worker process per model), counting loads, optionally slowed or
    failing on cue.

    ``delay`` and ``fail_next`` act on the load here; ``token_delay`` (seconds per decode
    step) and ``fail_eval_after`` (a decode fails after this many more steps) reach every
    worker through the engine's test seam, ``engine.protocol.Tune``; the model stays real.
    """

    def __init__(self, worker_timeout: float = 30) -> None:
        self.launcher = WorkerLauncher(worker_timeout)
        self.loads: list[str] = []
        self.spans: list[tuple[float, float]] = []  # (start, end) of each load, monotonic
        self.delay = 0.0
        self.fail_next: Exception | None = None
        self.close_gate: threading.Event | None = None  # when set, a model's close waits for it
        self.after_load: Callable[[Any], None] | None = None  # runs on each loaded worker before the manager sees it
        self.workers: list[Any] = []
        self._token_delay = 0.0
        self._fail_eval_after: int | None = None
        self._lock = threading.Lock()

    @property
    def token_delay(self) -> float:
        return self._token_delay

    @token_delay.setter
    def token_delay(self, seconds: float) -> None:
        self._token_delay = seconds
        self._tune()

    @property
    def fail_eval_after(self) -> int | None:
        return self._fail_eval_after

    @fail_eval_after.setter
    def fail_eval_after(self, steps: int | None) -> None:
        self._fail_eval_after = steps
        self._tune()
        self._fail_eval_after = None  # one-shot, as in the worker

    @property
    def decoded_tokens(self) -> int:
        """Tokens the live workers decoded, prompts included."""
        return sum(self._stat(w, "decoded_tokens") for w in self.live())

    @property
    def evals(self) -> int:
        """Decode steps of the live workers."""
        return sum(self._stat(w, "steps") for w in self.live())

    def live(self) -> list[Any]:
        return [w for w in self.workers if w.alive]

    def __call__(self, model: Any, options: LoadOptions) -> Any:
        with self._lock:
            self.loads.append(model.id)
            failure, self.fail_next = self.fail_next, None
        started = time.monotonic()
        if self.delay:
            time.sleep(self.delay)
        if failure is not None:
            raise failure
        worker = self.launcher(model, options)
        self.spans.append((started, time.monotonic()))
        if self.after_load is not None:
            self.after_load(worker)
        if self._token_delay or self._fail_eval_after is not None:
            worker.tune(self._token_delay, self._fail_eval_after)
        real_close = worker.close

        def close(timeout: float = 5.0) -> None:
            if self.close_gate is not None:
                self.close_gate.wait(60)
            real_close(timeout)

        worker.close = close
        self.workers.append(worker)
        return worker

    def close(self) -> None:
        self.launcher.close()

    def _tune(self) -> None:
        for worker in self.live():
            worker.tune(self._token_delay, self._fail_eval_after)

    @staticmethod
    def _stat(worker: Any, name: str) -> int:
        try:
            return worker.stats().get(name, 0)
        except Exception:  # gone meanwhile
            return 0


@dataclass
class LiveServer:
    """A running server: its URL, app, manager and the loader it uses."""

    url: str
    app: Any
    loader: CountingLoader
    clock: Callable[[], float]
    _stop: Callable[[], None] = field(repr=False, default=lambda: None)

    @property
    def manager(self) -> Any:
        return self.app.extensions["llama_cpp_server"].manager

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        """GET ``path``; a JSON reply of an OpenAI endpoint must match OpenAI's schema."""
        return check_response(requests.get(self.url + path, timeout=JOIN_TIMEOUT, **kwargs))

    def post(self, path: str, body: Any = None, **kwargs: Any) -> requests.Response:
        """POST ``body`` as JSON to ``path``; a JSON reply of an OpenAI endpoint must match OpenAI's schema."""
        if body is not None:
            kwargs["json"] = body
        return check_response(requests.post(self.url + path, timeout=JOIN_TIMEOUT, **kwargs))

    def model_view(self, model_id: str) -> dict[str, Any]:
        return next(m for m in self.get("/health").json()["models"] if m["id"] == model_id)

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError("condition not reached in time")
            time.sleep(0.02)


def start_live_server(models_dir: Path, manager: dict[str, Any] | None = None,
                      server: dict[str, Any] | None = None, clock: Callable[[], float] = time.monotonic,
                      config_path: Path | None = None, background: bool = True,
                      models: dict[str, Any] | None = None, grammars: Any = None) -> LiveServer:
    """Start the app under waitress on a free loopback port; call ``_stop()`` when done.

    ``grammars``: the app's ``GrammarChecker`` (default: one with the default time limit).
    """
    manager_settings = {"models_directory": models_dir, "n_ctx": 512, "n_gpu_layers": 0,
                        "n_threads": 1, **(manager or {})}
    server = {"port": 0, "threads": 8, "data_directory": models_dir.parent / "data", **(server or {})}
    settings = Settings.model_validate({"server": server,
                                        "model_manager": manager_settings, "models": models or {}})
    loader = CountingLoader(settings.model_manager.worker_timeout)
    app = create_app(settings, config_path=config_path, loader=loader, clock=clock, background=background,
                     grammars=grammars)
    wsgi = build_wsgi_server(app, settings.server)
    stopping = threading.Event()

    def serve() -> None:
        # waitress's own run() loop cannot be stopped from outside without closing sockets
        # under its select(); this loop stops itself and closes everything in its own thread.
        while not stopping.is_set():
            wasyncore.loop(timeout=0.05, map=wsgi._map, count=1)
        for channel in list(wsgi._map.values()):
            channel.close()

    thread = threading.Thread(target=serve, name="waitress", daemon=True)
    thread.start()

    def stop() -> None:
        close_app(app, 2)
        stopping.set()
        thread.join(JOIN_TIMEOUT)
        wsgi.task_dispatcher.shutdown(timeout=5)

    return LiveServer(f"http://127.0.0.1:{wsgi.effective_port}", app, loader, clock, stop)


@pytest.fixture
def make_server(models_dir: Path) -> Iterator[Callable[..., LiveServer]]:
    """Start servers with chosen settings; every one is stopped at teardown."""
    started: list[LiveServer] = []

    def start(manager: dict[str, Any] | None = None, **kwargs: Any) -> LiveServer:
        live = start_live_server(models_dir, manager, **kwargs)
        started.append(live)
        return live

    yield start
    for live in started:
        live._stop()


@pytest.fixture
def server(make_server: Callable[..., LiveServer]) -> LiveServer:
    """A server on the generated models with default lifecycle settings."""
    return make_server()


def check_response(response: requests.Response) -> requests.Response:
    """Validate a JSON reply of ``/v1/...`` against OpenAI's schema for its endpoint and status.

    Streams are left alone here: ``sse_events`` checks them chunk by chunk.
    """
    if response.headers.get("Content-Type", "").startswith("application/json"):
        schema = openai_spec.response_schema(_path(response), response.status_code, _request_json(response),
                                             response.request.method or "GET")
        if schema is not None:
            openai_spec.validate(response.json(), schema)
    return response


def sse_events(response: requests.Response) -> Iterator[Any]:
    """Parse a streaming response into JSON events; yields the string "[DONE]" at the end.

    Each chunk of a chat or text completion stream must match OpenAI's chunk schema (an
    in-band error event, its error schema).
    """
    named = None
    for line in response.iter_lines():
        if line.startswith(b"event: "):  # a typed stream (Responses): the name must be the data's type
            named = line[len(b"event: "):].decode()
        elif line and not line.startswith(b":"):
            event = sse_data(response, line)
            assert named is None or event["type"] == named, (named, event)
            named = None
            yield event


def sse_data(response: requests.Response, line: bytes) -> Any:
    """One ``data:`` line of ``response``'s stream as JSON (checked as ``sse_events`` does), or "[DONE]"."""
    assert line.startswith(b"data: "), line
    data = line[len(b"data: "):]
    if data == b"[DONE]":
        return "[DONE]"
    event = json.loads(data)
    schema = openai_spec.chunk_schema(_path(response), event)
    if schema is not None:
        openai_spec.validate(event, schema)
    return event


def _path(response: requests.Response) -> str:
    return urlsplit(response.request.url).path


def _request_json(response: requests.Response) -> Any:
    body = response.request.body
    try:
        return json.loads(body) if body else None
    except (ValueError, TypeError, RecursionError):
        return None  # not JSON (or absurdly nested): the tests that send broken bodies on purpose


def chat_body(model: str = "tiny-chat", content: str = "Hello", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}], "temperature": 0, **extra}
