"""``server.py`` as a real process: configuration errors, startup, precedence, .env, SIGTERM."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from conftest import ROOT
from gguf_factory import write_llama_model

SERVER = ROOT / "server.py"
TIMEOUT = 20  # every wait on the process is bounded by this


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Process:
    popen: subprocess.Popen[bytes]
    stderr_path: Path

    def stderr(self) -> str:
        return self.stderr_path.read_text(encoding="utf-8", errors="replace")

    def last_line(self) -> str:
        lines = self.stderr().strip().splitlines()
        return lines[-1] if lines else ""

    def wait(self) -> int:
        return self.popen.wait(timeout=TIMEOUT)

    def wait_healthy(self, *ports: int) -> int:
        """Poll /health on ``ports`` until one answers 200; return that port."""
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise AssertionError(f"server exited with {self.popen.returncode}: {self.last_line()}")
            for port in ports:
                try:
                    if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                        return port
                except requests.ConnectionError:
                    pass
            time.sleep(0.05)
        raise AssertionError(f"no /health answer on {ports} within {TIMEOUT} s")


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """The server's working directory (where it looks for config.json and .env)."""
    directory = tmp_path / "cwd"
    directory.mkdir()
    return directory


@contextmanager
def launch(workdir: Path, *args: str, env: dict[str, str] | None = None) -> Iterator[Process]:
    """Run ``server.py`` with ``args``; the process is killed on the way out whatever happens."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("LLAMA_SERVER_")}
    environ.update({"LLAMA_SERVER_N_GPU_LAYERS": "0", "LLAMA_SERVER_N_CTX": "512", "LLAMA_SERVER_N_THREADS": "1",
                    "LLAMA_SERVER_MODELS_DIRECTORY": str(workdir.parent / "models"), **(env or {})})
    stderr_path = workdir.parent / "stderr.log"
    with open(workdir.parent / "stdout.log", "wb") as out, open(stderr_path, "wb") as err:
        popen = subprocess.Popen([sys.executable, str(SERVER), *args], cwd=workdir, env=environ,
                                 stdin=subprocess.DEVNULL, stdout=out, stderr=err)
        try:
            yield Process(popen, stderr_path)
        finally:
            if popen.poll() is None:
                popen.kill()
            popen.wait(timeout=TIMEOUT)


def write_json(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_unknown_config_key_exits_with_one_line_naming_file_and_key(workdir):
    config = write_json(workdir / "config.json", {"server": {"port": 1, "bogus": True}})
    with launch(workdir) as proc:
        assert proc.wait() != 0
    assert str(config) in proc.last_line()
    assert "server.bogus: unknown key" in proc.last_line()
    assert "Traceback" not in proc.stderr()


def test_invalid_json_config_exits_with_one_line_naming_file_and_position(workdir, tmp_path):
    config = tmp_path / "broken.json"
    config.write_text('{"server": {"port": 8080,}}', encoding="utf-8")
    with launch(workdir, "--config", str(config)) as proc:
        assert proc.wait() != 0
    assert str(config) in proc.last_line()
    assert "line 1 column 26" in proc.last_line()
    assert "Traceback" not in proc.stderr()


def test_port_in_use_exits_with_one_line_naming_the_port(workdir):
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        with launch(workdir, "--port", str(port)) as proc:
            assert proc.wait() != 0
    assert f"cannot listen on 127.0.0.1:{port}" in proc.last_line()
    assert "Traceback" not in proc.stderr()


def test_missing_models_folder_starts_empty_and_says_where_to_put_models(workdir, tmp_path):
    port, absent = free_port(), tmp_path / "no-such-folder"
    env = {"LLAMA_SERVER_PORT": str(port), "LLAMA_SERVER_MODELS_DIRECTORY": str(absent)}
    with launch(workdir, env=env) as proc:
        proc.wait_healthy(port)
        assert requests.get(f"http://127.0.0.1:{port}/v1/models", timeout=TIMEOUT).json()["data"] == []
    assert any(str(absent) in line and "put .gguf files there" in line for line in proc.stderr().splitlines())


def test_sigterm_unloads_the_loaded_model(workdir, tmp_path):
    (tmp_path / "models").mkdir()
    write_llama_model(tmp_path / "models" / "tiny.gguf", seed=1)
    port = free_port()
    with launch(workdir, env={"LLAMA_SERVER_PORT": str(port)}) as proc:
        proc.wait_healthy(port)
        body = {"model": "tiny", "prompt": "Hi", "max_tokens": 2}
        reply = requests.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=TIMEOUT)
        assert reply.status_code == 200, reply.text
        proc.popen.send_signal(signal.SIGTERM)
        proc.wait()
    assert any("model unloaded" in line and "model=tiny" in line and "reason=shutdown" in line
               for line in proc.stderr().splitlines())


def test_sigterm_exits_zero_after_shutdown_complete(workdir):
    port = free_port()
    with launch(workdir, env={"LLAMA_SERVER_PORT": str(port)}) as proc:
        proc.wait_healthy(port)
        proc.popen.send_signal(signal.SIGTERM)
        assert proc.wait() == 0
    assert "shutdown complete" in proc.stderr()


def test_startup_logs_the_listening_address_without_traceback(workdir):
    port = free_port()
    with launch(workdir, env={"LLAMA_SERVER_PORT": str(port)}) as proc:
        proc.wait_healthy(port)
    assert f"listening on http://127.0.0.1:{port}" in proc.stderr()
    assert "Traceback" not in proc.stderr()


def test_flag_beats_environment_beats_config_file(workdir):
    file_port, env_port, flag_port = free_port(), free_port(), free_port()
    write_json(workdir / "config.json", {"server": {"port": file_port}})
    with launch(workdir, "--port", str(flag_port), env={"LLAMA_SERVER_PORT": str(env_port)}) as proc:
        assert proc.wait_healthy(file_port, env_port, flag_port) == flag_port


def test_dotenv_in_working_directory_sets_the_port(workdir):
    file_port, dotenv_port = free_port(), free_port()
    write_json(workdir / "config.json", {"server": {"port": file_port}})
    (workdir / ".env").write_text(f"LLAMA_SERVER_PORT={dotenv_port}\n", encoding="utf-8")
    with launch(workdir) as proc:
        assert proc.wait_healthy(file_port, dotenv_port) == dotenv_port


def test_environment_beats_dotenv(workdir):
    env_port, dotenv_port = free_port(), free_port()
    (workdir / ".env").write_text(f"LLAMA_SERVER_PORT={dotenv_port}\n", encoding="utf-8")
    with launch(workdir, env={"LLAMA_SERVER_PORT": str(env_port)}) as proc:
        assert proc.wait_healthy(env_port, dotenv_port) == env_port


def test_sigterm_during_streams_lets_them_finish_then_exits_zero(workdir, tmp_path):
    (tmp_path / "models").mkdir()
    write_llama_model(tmp_path / "models" / "mid.gguf", n_embd=512, n_layer=6, n_ff=1536, seed=4)
    port = free_port()
    with launch(workdir, env={"LLAMA_SERVER_PORT": str(port), "LLAMA_SERVER_N_CTX": "1024"}) as proc:
        proc.wait_healthy(port)
        body = {"model": "mid", "prompt": "Hello", "max_tokens": 900, "ignore_eos": True, "stream": True,
                "temperature": 0, "stream_options": {"include_usage": True}}
        with requests.post(f"http://127.0.0.1:{port}/v1/completions", json=body, stream=True,
                           timeout=TIMEOUT) as stream:
            lines = stream.iter_lines()
            assert next(line for line in lines if line.startswith(b"data: {"))
            proc.popen.send_signal(signal.SIGTERM)
            refused = requests.post(f"http://127.0.0.1:{port}/v1/completions",
                                    json={"model": "mid", "prompt": "Hi", "max_tokens": 1}, timeout=TIMEOUT)
            rest = [line for line in lines if line.startswith(b"data: ")]
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
        assert rest[-1] == b"data: [DONE]"
        assert json.loads(rest[-2][len(b"data: "):])["usage"]["completion_tokens"] == 900
        assert proc.wait() == 0
    log = proc.stderr()
    assert "shutdown requested" in log and "reason=shutdown" in log and "shutdown complete" in log


def test_binding_beyond_localhost_without_keys_warns(workdir):
    port = free_port()
    with launch(workdir, "--host", "127.0.0.2", env={"LLAMA_SERVER_PORT": str(port)}) as proc:
        deadline = time.monotonic() + TIMEOUT
        while "listening on http://127.0.0.2" not in proc.stderr() and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.popen.send_signal(signal.SIGTERM)
        assert proc.wait() == 0
    assert "without api_keys: anyone who can reach this address can use the models" in proc.stderr()


def test_shutdown_uses_the_unload_timeout_in_force(tmp_path):
    """A reload that shortens unload_timeout is honoured by the shutdown (process test)."""
    smollm = Path(__file__).resolve().parents[2] / "shared" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not smollm.exists():
        pytest.skip(f"{smollm} not found")
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    (tmp_path / "models").mkdir()
    shutil.copy(smollm, tmp_path / "models" / "smol.gguf")
    config = write_json(workdir / "config.json", {"model_manager": {"unload_timeout": 120}})
    port = free_port()
    with launch(workdir, env={"LLAMA_SERVER_PORT": str(port), "LLAMA_SERVER_N_CTX": "4096"}) as proc:
        proc.wait_healthy(port)
        write_json(config, {"model_manager": {"unload_timeout": 0.5}})
        assert requests.post(f"http://127.0.0.1:{port}/admin/reload", timeout=20).status_code == 200
        body = {"model": "smol", "prompt": "Hello", "max_tokens": 4000, "ignore_eos": True, "stream": True}
        with requests.post(f"http://127.0.0.1:{port}/v1/completions", json=body, stream=True, timeout=20) as stream:
            next(line for line in stream.iter_lines() if line.startswith(b"data: {"))
            proc.popen.terminate()
            started = time.monotonic()
            assert proc.wait() == 0
            waited = time.monotonic() - started
    assert waited < 10, f"shutdown waited {waited:.1f} s for a stream: the start-up unload_timeout was used"
