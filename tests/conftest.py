"""Fixtures: generated GGUF models, a live waitress server on a loopback port, an SSE reader.

The server runs in this process (so tests can wrap the loader and read the manager), but
every request goes over a real socket to real waitress, and every model is a real GGUF
file run by real llama.cpp.
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

import pytest
import requests
from hypothesis import settings as hypothesis_settings
from waitress import wasyncore

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gguf_factory import CHATML_TEMPLATE, write_llama_model  # noqa: E402

from config import Settings  # noqa: E402
from llama_backend import LoadOptions, load_llama  # noqa: E402
from server import close_app, create_app  # noqa: E402
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
    """The real loader, counting loads and decodes, optionally slowed or failing on cue."""

    def __init__(self) -> None:
        self.loads: list[str] = []
        self.delay = 0.0
        self.fail_next: Exception | None = None
        self.token_delay = 0.0
        self.fail_eval_after: int | None = None  # raise inside llama.cpp's decode after this many more calls
        self.evals = 0
        self._lock = threading.Lock()

    def __call__(self, model: Any, options: LoadOptions) -> Any:
        with self._lock:
            self.loads.append(model.id)
            failure, self.fail_next = self.fail_next, None
        if self.delay:
            time.sleep(self.delay)
        if failure is not None:
            raise failure
        llama = load_llama(model, options)
        context = llama._ctx
        real_decode = context.decode

        def decode(batch: Any) -> None:
            self.evals += 1
            if self.token_delay:
                time.sleep(self.token_delay)
            if self.fail_eval_after is not None:
                if self.fail_eval_after <= 0:
                    self.fail_eval_after = None
                    raise RuntimeError("llama_decode returned -3 (on cue)")
                self.fail_eval_after -= 1
            real_decode(batch)

        context.decode = decode  # every llama.cpp decode passes here; the model stays real
        return llama


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
        return requests.get(self.url + path, timeout=JOIN_TIMEOUT, **kwargs)

    def post(self, path: str, body: Any = None, **kwargs: Any) -> requests.Response:
        if body is not None:
            kwargs["json"] = body
        return requests.post(self.url + path, timeout=JOIN_TIMEOUT, **kwargs)

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
    settings = Settings.model_validate({"server": {"port": 0, "threads": 8, **(server or {})},
                                        "model_manager": manager_settings, "models": models or {}})
    loader = CountingLoader()
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


def sse_events(response: requests.Response) -> Iterator[Any]:
    """Parse a streaming response into JSON events; yields the string "[DONE]" at the end."""
    for line in response.iter_lines():
        if not line or line.startswith(b":"):
            continue
        assert line.startswith(b"data: "), line
        data = line[len(b"data: "):]
        yield "[DONE]" if data == b"[DONE]" else json.loads(data)


def chat_body(model: str = "tiny-chat", content: str = "Hello", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}], "temperature": 0, **extra}
