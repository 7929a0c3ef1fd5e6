"""One model split across machines with llama.cpp's RPC backend, on loopback.

Real ``rpc_worker.py`` processes lend their CPU; real workers load real models with
``rpc_servers`` and put their layers there. What is checked: the layers went to the RPC
devices (the loader's own buffer report, in the listings and /metrics), greedy output is the
same as a local load, a bad endpoint fails the load quickly with its name, and a worker that
vanishes mid-stream fails that model's requests and nothing else.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from conftest import JOIN_TIMEOUT, ROOT, LiveServer, sse_events
from gguf_factory import CHATML_TEMPLATE, write_llama_model, write_mlp_projector
from test_vision import ask, image_part, picture

from config import ConfigError, load_settings
from engine import ggml_rpc

pytestmark = pytest.mark.skipif(not ggml_rpc.supported(), reason="llama-cpp-python was built without GGML_RPC "
                                "(scripts/setup-venv.sh builds it with the RPC backend)")

PROMPT = "Once upon a time"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# llama.cpp's own RPC server (``ggml-rpc-server``, built with -DGGML_RPC=ON from the llama.cpp
# that llama-cpp-python vendors), for the interoperability test; without it that test skips.
LLAMA_RPC_SERVER = os.environ.get("LLAMA_RPC_SERVER_BIN")


class RpcWorker:
    """``rpc_worker.py`` (or llama.cpp's ``ggml-rpc-server``) in its own process on a free loopback port."""

    def __init__(self, log: Path, binary: str | None = None) -> None:
        self.endpoint = f"127.0.0.1:{free_port()}"
        host, port = self.endpoint.split(":")
        self.log = log
        command = ([binary, "-H", host, "-p", port, "-t", "1"] if binary else
                   [sys.executable, str(ROOT / "rpc_worker.py"), "--host", host, "--port", port, "--threads", "1"])
        self.process = subprocess.Popen(command, stdout=log.open("wb"), stderr=subprocess.STDOUT, cwd=ROOT)
        deadline = time.monotonic() + JOIN_TIMEOUT
        while True:
            try:
                ggml_rpc.probe(self.endpoint, 1.0)
                return
            except ggml_rpc.RpcError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"rpc_worker did not start: {log.read_text()}") from None
                time.sleep(0.05)

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(JOIN_TIMEOUT)


@pytest.fixture
def rpc_workers(tmp_path: Path) -> Iterator[Callable[..., RpcWorker]]:
    started: list[RpcWorker] = []

    def start(binary: str | None = None) -> RpcWorker:
        worker = RpcWorker(tmp_path / f"rpc-{len(started)}.log", binary)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.kill()


def greedy(server: LiveServer, model: str, max_tokens: int = 40) -> str:
    response = server.post("/v1/completions", {"model": model, "prompt": PROMPT, "max_tokens": max_tokens,
                                                "temperature": 0})
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def rpc_bytes(view: dict[str, Any], endpoint: str) -> int:
    """Bytes of weights the loader put on ``endpoint``'s devices, by its own report."""
    return sum(size for name, size in (view["devices"] or {}).items() if name.endswith(f"[{endpoint}]"))


def test_split_model_puts_its_layers_on_the_rpc_worker_and_answers_as_the_local_one(
        models_dir: Path, stories_path: Path, rpc_workers: Callable[[], RpcWorker],
        make_server: Callable[..., LiveServer]) -> None:
    worker = rpc_workers()
    shutil.copy(stories_path, models_dir / "split.gguf")
    shutil.copy(stories_path, models_dir / "local.gguf")
    server = make_server(manager={"rpc_servers": [worker.endpoint], "n_gpu_layers": -1},
                     models={"local": {"rpc_servers": []}})

    assert greedy(server, "split") == greedy(server, "local")
    split, local = server.model_view("split"), server.model_view("local")
    assert split["rpc_servers"] == [worker.endpoint] and local["rpc_servers"] == []
    # stories260K is ~1.1 MB of F32 weights: nearly all of them must have gone to the worker.
    assert rpc_bytes(split, worker.endpoint) > 0.8 * split["size_bytes"], split["devices"]
    assert not any("RPC" in name for name in local["devices"]), local["devices"]
    metrics = server.get("/metrics").text
    assert f'llama_server_model_device_bytes{{device="RPC0[{worker.endpoint}]",model="split"}}' in metrics
    loaded = [e for e in server.manager.events.history() if e["event"] == "loaded" and e["model"] == "split"]
    assert rpc_bytes(loaded[-1], worker.endpoint) > 0

    # Unloading frees the worker for the next client: the same model loads there again.
    assert server.post("/admin/unload", {"model": "split"}).status_code == 200
    assert greedy(server, "split", 8) == greedy(server, "local", 8)


@pytest.mark.skipif(not LLAMA_RPC_SERVER, reason="set LLAMA_RPC_SERVER_BIN to llama.cpp's ggml-rpc-server")
def test_llama_cpp_rpc_server_serves_our_workers(models_dir: Path, stories_path: Path,
                                                 rpc_workers: Callable[..., RpcWorker],
                                                 make_server: Callable[..., LiveServer]) -> None:
    theirs = rpc_workers(LLAMA_RPC_SERVER)
    shutil.copy(stories_path, models_dir / "split.gguf")
    shutil.copy(stories_path, models_dir / "local.gguf")
    server = make_server(models={"split": {"rpc_servers": [theirs.endpoint], "n_gpu_layers": -1}})
    assert greedy(server, "split") == greedy(server, "local")
    assert rpc_bytes(server.model_view("split"), theirs.endpoint) > 0


def test_generated_model_spreads_over_two_workers_with_the_same_output(
        models_dir: Path, rpc_workers: Callable[[], RpcWorker], make_server: Callable[..., LiveServer]) -> None:
    first, second = rpc_workers(), rpc_workers()
    for name in ("split", "local"):
        write_llama_model(models_dir / f"{name}.gguf", n_layer=4, seed=7)
    server = make_server(models={"split": {"rpc_servers": [first.endpoint, second.endpoint],
                                               "n_gpu_layers": -1}})

    assert greedy(server, "split", 24) == greedy(server, "local", 24)
    split = server.model_view("split")
    assert rpc_bytes(split, first.endpoint) > 0 and rpc_bytes(split, second.endpoint) > 0, split["devices"]


def silent_listener() -> Iterator[str]:
    """A port that accepts connections (the kernel's backlog) and never says a word."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield f"127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture
def silent_endpoint() -> Iterator[str]:
    yield from silent_listener()


def test_unusable_endpoints_fail_the_load_with_their_name_and_nothing_else(
        models_dir: Path, silent_endpoint: str, rpc_workers: Callable[[], RpcWorker],
        make_server: Callable[..., LiveServer]) -> None:
    busy = rpc_workers()
    closed = f"127.0.0.1:{free_port()}"
    long_label = "a" * 64 + ":50052"  # a label over 63 characters: Python's resolver refuses it
    for name in ("refused", "silent", "first", "second", "long", "dots", "local"):
        write_llama_model(models_dir / f"{name}.gguf", seed=3)
    server = make_server(manager={"rpc_timeout": 0.5},
                     models={"refused": {"rpc_servers": [closed]}, "silent": {"rpc_servers": [silent_endpoint]},
                             "first": {"rpc_servers": [busy.endpoint]}, "second": {"rpc_servers": [busy.endpoint]},
                             "long": {"rpc_servers": [long_label]}, "dots": {"rpc_servers": ["..:50052"]}})

    cases = {"refused": (closed, "unreachable"), "silent": (silent_endpoint, "did not answer within 0.5 s"),
             "second": (busy.endpoint, "busy with another client"),
             "long": (long_label, "not a valid host name"), "dots": ("..:50052", "not a valid host name")}
    assert greedy(server, "first", 4)  # holds the only connection the RPC worker serves
    for model, (endpoint, reason) in cases.items():
        response = server.post("/v1/completions", {"model": model, "prompt": PROMPT, "max_tokens": 4})
        error = response.json()["error"]
        assert response.status_code == 500 and error["code"] == "model_load_failed", response.text
        assert endpoint in error["message"] and reason in error["message"], error
        assert server.model_view(model)["state"] == "failed"
    assert greedy(server, "local", 4) and greedy(server, "first", 4)  # everyone else is untouched


@pytest.fixture
def hello_then_silence() -> Iterator[str]:
    """An RPC server that answers one handshake (our probe) and then accepts and never answers:
    what ggml's client meets when another model's worker took the server in between."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    held: list[socket.socket] = []

    def serve() -> None:
        with contextlib.suppress(OSError):
            conn, _ = listener.accept()
            held.append(conn)
            conn.recv(64)
            conn.sendall(struct.pack("<QBBBB", ggml_rpc.HELLO_REPLY_SIZE, ggml_rpc.PROTOCOL_MAJOR, 0, 0, 0)
                         + bytes(ggml_rpc.CAPS_SIZE))
            conn.close()
            while True:
                held.append(listener.accept()[0])

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"127.0.0.1:{listener.getsockname()[1]}"
    with contextlib.suppress(OSError):
        listener.shutdown(socket.SHUT_RDWR)  # wakes the accept (a close alone does not, on Linux)
    listener.close()
    thread.join(JOIN_TIMEOUT)
    assert not thread.is_alive()
    for conn in held:
        conn.close()


def test_rpc_server_silent_after_the_handshake_fails_the_load_within_worker_timeout(
        models_dir: Path, hello_then_silence: str, make_server: Callable[..., LiveServer]) -> None:
    endpoint = hello_then_silence
    for name in ("split", "local"):
        write_llama_model(models_dir / f"{name}.gguf", seed=3)
    server = make_server(manager={"rpc_timeout": 0.5, "worker_timeout": 2},
                         models={"split": {"rpc_servers": [endpoint]}})
    started = time.monotonic()
    response = server.post("/v1/completions", {"model": "split", "prompt": PROMPT, "max_tokens": 2})
    assert time.monotonic() - started < 15
    error = response.json()["error"]
    assert response.status_code == 500 and error["code"] == "model_load_failed", response.text
    assert endpoint in error["message"], error
    assert server.model_view("split")["state"] == "failed"
    assert greedy(server, "local", 4)


def test_two_models_loading_at_once_on_one_rpc_worker_never_hang(
        models_dir: Path, rpc_workers: Callable[[], RpcWorker], make_server: Callable[..., LiveServer]) -> None:
    """Each probe may find the server free, and then one worker's ggml client waits behind the
    other's for ever: that load must fail within worker_timeout instead."""
    worker = rpc_workers()
    for name in ("a", "b"):
        write_llama_model(models_dir / f"{name}.gguf", seed=3, n_layer=4)
    server = make_server(manager={"rpc_timeout": 1, "worker_timeout": 2, "rpc_servers": [worker.endpoint],
                                  "n_gpu_layers": -1})
    for _ in range(3):  # the race is not hit every time
        statuses: dict[str, int] = {}

        def complete(model: str, statuses: dict[str, int] = statuses) -> None:
            statuses[model] = server.post("/v1/completions", {"model": model, "prompt": PROMPT,
                                                               "max_tokens": 2}).status_code

        threads = [threading.Thread(target=complete, args=(model,)) for model in ("a", "b")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(JOIN_TIMEOUT)
        assert sorted(statuses.values()) == [200, 500], statuses
        assert server.post("/admin/unload", {"model": "all"}).status_code == 200


def test_rpc_worker_killed_mid_stream_fails_that_model_only(
        models_dir: Path, rpc_workers: Callable[[], RpcWorker], make_server: Callable[..., LiveServer]) -> None:
    worker = rpc_workers()
    for name in ("split", "local"):
        write_llama_model(models_dir / f"{name}.gguf", seed=5)
    server = make_server(models={"split": {"rpc_servers": [worker.endpoint], "n_gpu_layers": -1}})
    greedy(server, "split", 2)
    server.loader.token_delay = 0.05  # a long stream, so the kill lands in its middle
    body = {"model": "split", "prompt": PROMPT, "max_tokens": 400, "ignore_eos": True, "stream": True}
    response = requests.post(server.url + "/v1/completions", json=body, stream=True, timeout=JOIN_TIMEOUT)
    events = sse_events(response)
    assert "choices" in next(events)
    worker.kill()
    rest = list(events)
    assert rest[-1] == "[DONE]" and "error" in rest[-2], rest[-3:]
    error = rest[-2]["error"]
    assert error["code"] == "model_crashed" and "split" in error["message"], error
    server.wait_for(lambda: server.model_view("split")["state"] == "failed")
    server.loader.token_delay = 0
    assert greedy(server, "local", 4)
    assert server.get("/health").status_code == 200


@pytest.mark.parametrize("endpoints", [["localhost"], ["host:0"], ["host:99999"], ["[::1]:50052"],
                                       ["a:1", "a:1"], ["box:50052", "Box:050052"],
                                       [f"h:{port}" for port in range(1, 18)],
                                       ["h:\uff15\uff10\uff10\uff15\uff12"], [" box:50052"], ["b\tox:1"],
                                       ["b\u00fccher:1"]])
def test_bad_rpc_servers_setting_is_a_config_error(endpoints: list[str]) -> None:
    with pytest.raises(ConfigError, match="rpc_servers"):
        load_settings(None, {"model_manager": {"rpc_servers": endpoints}}, environ={})
    with pytest.raises(ConfigError, match="rpc_servers"):
        load_settings(None, {"models": {"m": {"rpc_servers": endpoints}}}, environ={})


def test_rpc_servers_from_the_environment() -> None:
    settings = load_settings(None, environ={"LLAMA_SERVER_RPC_SERVERS": "10.0.0.2:50052, box:50053"})
    assert settings.model_manager.rpc_servers == ["10.0.0.2:50052", "box:50053"]


def test_handshake_refuses_a_server_that_is_not_ggml_rpc() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        endpoint = f"127.0.0.1:{listener.getsockname()[1]}"

        def answer() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.recv(64)
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n" + bytes(40))

        thread = threading.Thread(target=answer, daemon=True)
        thread.start()
        with pytest.raises(ggml_rpc.RpcError, match="not as a ggml RPC server"):
            ggml_rpc.probe(endpoint, 5)
        thread.join(JOIN_TIMEOUT)


@pytest.mark.parametrize(("args", "environ"), [(["--port", "0"], {}), (["--host", "::1"], {}),
                                              (["--threads", "0"], {}), ([], {"LLAMA_RPC_PORT": "http"}),
                                              ([], {"LLAMA_RPC_THREADS": "many"})])
def test_rpc_worker_refuses_bad_arguments(args: list[str], environ: dict[str, str]) -> None:
    result = subprocess.run([sys.executable, str(ROOT / "rpc_worker.py"), *args], capture_output=True, text=True,
                            timeout=JOIN_TIMEOUT, check=False, cwd=ROOT, env={**os.environ, **environ})
    assert result.returncode == 2 and "rpc_worker.py: error" in result.stderr


def test_rpc_worker_stops_on_sigterm(rpc_workers: Callable[[], RpcWorker]) -> None:
    worker = rpc_workers()
    os.kill(worker.process.pid, signal.SIGTERM)
    assert worker.process.wait(JOIN_TIMEOUT) == -signal.SIGTERM


def test_public_health_hides_rpc_addresses(models_dir: Path, make_server: Callable[..., LiveServer]) -> None:
    """RPC servers take anyone's work: without an admin key, /health names neither them nor devices."""
    write_llama_model(models_dir / "local.gguf", seed=3)
    write_llama_model(models_dir / "split.gguf", seed=4)
    server = make_server(server={"api_keys": ["user"], "admin_api_keys": ["admin"]},
                     models={"split": {"rpc_servers": ["10.0.0.9:50052"]}})
    admin = {"Authorization": "Bearer admin"}
    assert server.post("/v1/completions", {"model": "local", "prompt": "Hi", "max_tokens": 1},
                       headers={"Authorization": "Bearer user"}).status_code == 200

    def views(**kwargs: Any) -> dict[str, Any]:
        return {m["id"]: m for m in server.get("/health", **kwargs).json()["models"]}

    public, private = views(), views(headers=admin)
    assert "rpc_servers" not in public["split"] and "devices" not in public["local"]
    assert private["split"]["rpc_servers"] == ["10.0.0.9:50052"] and private["local"]["devices"]


def test_a_failed_rpc_load_names_its_endpoint_to_admins_only(models_dir: Path,
                                                             make_server: Callable[..., LiveServer]) -> None:
    """The load error names the unreachable endpoint to admins only: a user key's 500, public
    /health and a user key's /v1/models say "(an RPC server)"; an admin key's 500 and listings
    (and the log and events) have all of it."""
    dead = f"127.0.0.1:{free_port()}"
    write_llama_model(models_dir / "split.gguf", seed=4)
    server = make_server(server={"api_keys": ["user"], "admin_api_keys": ["admin"]},
                         models={"split": {"rpc_servers": [dead]}})
    user, admin = {"Authorization": "Bearer user"}, {"Authorization": "Bearer admin"}
    body = {"model": "split", "prompt": "Hi", "max_tokens": 1}
    failed = server.post("/v1/completions", body, headers=user)
    assert failed.status_code == 500 and failed.json()["error"]["code"] == "model_load_failed", failed.text
    assert "(an RPC server)" in failed.text
    seen = server.post("/v1/completions", body, headers=admin)  # the next request loads again, and fails
    assert seen.status_code == 500 and dead in seen.json()["error"]["message"], seen.text
    public = [failed.text, server.get("/health").text, server.get("/health", headers=user).text,
              server.get("/v1/models", headers=user).text, server.get("/v1/models/split", headers=user).text]
    for body in public:
        assert "unreachable" in body and dead not in body and str(models_dir) not in body, body
        assert '"rpc_servers"' not in body and '"devices"' not in body, body
    private = next(m for m in server.get("/health", headers=admin).json()["models"] if m["id"] == "split")
    assert dead in private["error"] and private["rpc_servers"] == [dead]
    assert server.get("/v1/models/split", headers=admin).json()["rpc_servers"] == [dead]


def test_a_stream_whose_load_fails_after_its_headers_names_the_endpoint_to_admins_only(
        models_dir: Path, make_server: Callable[..., LiveServer], monkeypatch: pytest.MonkeyPatch) -> None:
    """A load slower than the stream's header deadline fails inside the stream, as an error
    event after the headers: that event too says "(an RPC server)" to a user key."""
    import completions

    monkeypatch.setattr(completions, "STREAM_HEADERS_DEADLINE", 0.0)  # every load outlasts it
    dead = f"127.0.0.1:{free_port()}"
    write_llama_model(models_dir / "split.gguf", seed=4)
    server = make_server(server={"api_keys": ["user"], "admin_api_keys": ["admin"]},
                         models={"split": {"rpc_servers": [dead]}})
    body = {"model": "split", "prompt": "Hi", "max_tokens": 1, "stream": True}
    for key, shows in (("user", False), ("admin", True)):
        reply = requests.post(server.url + "/v1/completions", json=body, stream=True, timeout=JOIN_TIMEOUT,
                              headers={"Authorization": f"Bearer {key}"})
        assert reply.status_code == 200  # the headers went out before the load failed
        events = list(sse_events(reply))
        assert events[-1] == "[DONE]", events
        error = next(e for e in events if e != "[DONE]" and "error" in e)["error"]
        assert error["code"] == "model_load_failed"
        assert (dead in error["message"]) is shows and ("(an RPC server)" in error["message"]) is not shows, error


def test_a_silent_endpoint_is_named_even_when_rpc_timeout_outlasts_worker_timeout(
        models_dir: Path, silent_endpoint: str, make_server: Callable[..., LiveServer]) -> None:
    write_llama_model(models_dir / "silent.gguf", seed=3)
    server = make_server(manager={"rpc_timeout": 30, "worker_timeout": 2},
                         models={"silent": {"rpc_servers": [silent_endpoint]}})
    response = server.post("/v1/completions", {"model": "silent", "prompt": PROMPT, "max_tokens": 4})
    error = response.json()["error"]
    assert response.status_code == 500 and silent_endpoint in error["message"], error
    assert "did not answer within 1 s" in error["message"], error


def test_pictures_are_encoded_on_this_box_not_on_an_rpc_server(
        models_dir: Path, rpc_workers: Callable[[], RpcWorker], make_server: Callable[..., LiveServer],
        caplog: pytest.LogCaptureFixture) -> None:
    """RPC devices are GPUs to ggml: left to choose, mtmd would put the projector on the first RPC
    server and send every picture over the network. It runs on a local GPU, or the CPU."""
    worker = rpc_workers()
    (models_dir / "vision").mkdir()
    write_llama_model(models_dir / "vision" / "seeing.gguf", seed=3, chat_template=CHATML_TEMPLATE)
    write_mlp_projector(models_dir / "vision" / "mmproj-seeing.gguf")
    server = make_server(manager={"n_gpu_layers": -1}, models={"seeing": {"rpc_servers": [worker.endpoint]}})
    caplog.set_level(logging.DEBUG, logger="llama_cpp.native")
    body = {"model": "seeing", "messages": ask(image_part(picture(1))), "max_tokens": 2, "temperature": 0}
    assert server.post("/v1/chat/completions", body).status_code == 200
    assert rpc_bytes(server.model_view("seeing"), worker.endpoint) > 0  # the text model's layers did go there
    backends = [r.getMessage() for r in caplog.records if "CLIP using" in r.getMessage()]
    assert backends and not any("RPC" in line for line in backends), backends
