"""Soak: 16 clients for a fixed time against three models with room for two, idle eviction
every second, admin calls, deliberate hang-ups and worker kills (kill -9 of a loaded model's
worker every few seconds) mixed in. Then the books must balance.

Runs ``--soak-seconds`` (default 45) in CI; pass a larger value for a long run:
``./test.sh tests/test_soak.py --soak-seconds 1800``.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import psutil
import pytest
import requests
from conftest import JOIN_TIMEOUT, LiveServer
from gguf_factory import write_llama_model
from prometheus_client.parser import text_string_to_metric_families

MODELS = ["tiny", "tiny-chat", "third"]
CLIENTS = 16


@dataclass
class Tally:
    """What the clients saw, shared between their threads."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    statuses: Counter = field(default_factory=Counter)
    kinds: Counter = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    disconnects: int = 0
    crashed: int = 0  # requests that ended with model_crashed: expected, a kill hit their model
    kills: int = 0

    def record(self, kind: str, response: requests.Response) -> None:
        """Count an answer; a 500 that a deliberate worker kill explains is counted apart."""
        with self.lock:
            self.kinds[kind] += 1
            if killed(response):
                self.crashed += 1
            else:
                self.statuses[response.status_code] += 1

    def fail(self, message: str) -> None:
        with self.lock:
            self.failures.append(message)


def killed(response: requests.Response) -> bool:
    """A 500 from a worker the killer shot: its model crashed, or its load did."""
    if response.status_code != 500:
        return False
    error = response.json()["error"]
    return error["code"] == "model_crashed" or (error["code"] == "model_load_failed"
                                                 and "SIGKILL" in error["message"])


def one_call(server: LiveServer, rng: random.Random, tally: Tally) -> None:
    roll = rng.random()
    model = rng.choice(MODELS)
    if roll < 0.03:
        response = server.post("/admin/unload", {"model": rng.choice([*MODELS, "all"]), "timeout": 0.5})
        tally.record("unload", response)
    elif roll < 0.05:
        tally.record("reload", server.post("/admin/reload"))
    elif roll < 0.07:
        tally.record("load", server.post("/admin/load", {"model": model}))
    elif roll < 0.12:
        tally.record("health", server.get(rng.choice(["/health", "/metrics", "/v1/models"])))
    elif roll < 0.25:
        body = {"model": model, "input": [rng.choice(["Hello", "Once upon a time"])] * rng.randint(1, 3)}
        response = server.post("/v1/embeddings", body)
        tally.record("embeddings", response)
        if response.status_code == 200 and len(response.json()["data"]) != len(body["input"]):
            tally.fail("embeddings: wrong count")
    else:
        stream_call(server, rng, tally, model)


def stream_call(server: LiveServer, rng: random.Random, tally: Tally, model: str) -> None:
    chat = rng.random() < 0.5
    path = "/v1/chat/completions" if chat else "/v1/completions"
    body = {"model": model, "max_tokens": rng.randint(1, 40), "temperature": rng.choice([0, 0.8])}
    body.update({"messages": [{"role": "user", "content": "Hello"}]} if chat else {"prompt": "Once upon a time"})
    if rng.random() < 0.5:
        response = server.post(path, body)
        tally.record("complete", response)
        if response.status_code == 200 and not response.json()["choices"]:
            tally.fail("completion without choices")
        return
    hang_up_after = rng.randint(1, 5) if rng.random() < 0.2 else None
    with requests.post(server.url + path, json={**body, "stream": True}, stream=True, timeout=JOIN_TIMEOUT) as r:
        if r.status_code != 200:
            r.json()  # read the error body for record()
        tally.record("stream", r)
        if r.status_code != 200:
            return
        events = 0
        for line in r.iter_lines():
            if not line.startswith(b"data: "):
                continue
            if line == b"data: [DONE]":
                return
            if b'"model_crashed"' in line or (b'"model_load_failed"' in line and b"SIGKILL" in line):
                with tally.lock:
                    tally.crashed += 1
            elif b'"error"' in line:
                tally.fail(f"error event: {line[:200]!r}")
            events += 1
            if hang_up_after is not None and events >= hang_up_after:
                with tally.lock:
                    tally.disconnects += 1
                return  # leaving the with-block closes the connection mid-stream
        tally.fail("stream ended without [DONE]")


def client(server: LiveServer, seed: int, deadline: float, tally: Tally) -> None:
    rng = random.Random(seed)
    while time.monotonic() < deadline:
        try:
            one_call(server, rng, tally)
        except requests.RequestException as exc:
            tally.fail(f"connection error: {exc!r}")


def killer(server: LiveServer, deadline: float, tally: Tally) -> None:
    """Every few seconds, kill -9 the worker of a loaded model (generation or embeddings), as
    the OOM killer would; with three models in room for two, it looks until one is loaded."""
    rng = random.Random(99)
    while time.monotonic() < deadline - 2:
        time.sleep(rng.uniform(2, 4))
        for _ in range(50):
            try:
                pids = [i["pid"] for m in server.get("/health").json()["models"]
                        for i in (m, m.get("embeddings") or {}) if i.get("pid")]
            except (requests.RequestException, ValueError, KeyError) as exc:
                tally.fail(f"killer: {exc!r}")
                return
            if pids:
                break
            time.sleep(0.05)
        else:
            continue
        try:
            os.kill(rng.choice(pids), signal.SIGKILL)
        except ProcessLookupError:
            continue  # unloaded meanwhile
        with tally.lock:
            tally.kills += 1


def metric_total(server: LiveServer, name: str) -> float:
    text = server.get("/metrics").text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)


def test_soak(make_server, models_dir, request):
    seconds = request.config.getoption("--soak-seconds")
    write_llama_model(models_dir / "third.gguf", seed=3)
    server = make_server({"max_loaded_models": 2, "idle_timeout": 1, "check_interval": 0.3, "max_queue": 32},
                         server={"threads": 24})
    process = psutil.Process()
    threads_before = {t.ident for t in threading.enumerate()}
    server.post("/admin/unload", {"model": "all"})
    rss_start = process.memory_info().rss
    tally = Tally()
    deadline = time.monotonic() + seconds
    clients = [threading.Thread(target=client, args=(server, seed, deadline, tally)) for seed in range(CLIENTS)]
    clients.append(threading.Thread(target=killer, args=(server, deadline, tally)))
    for thread in clients:
        thread.start()
    for thread in clients:
        thread.join(seconds + 120)
        assert not thread.is_alive(), "a client hung"

    server.wait_for(lambda: all(m["in_flight"] == 0 and m.get("embeddings", m)["in_flight"] == 0
                                for m in server.get("/health").json()["models"]), timeout=30)
    assert tally.failures == [], tally.failures[:10]
    assert not [s for s in tally.statuses if s >= 500], tally.statuses
    for view in server.get("/health").json()["models"]:
        assert view["in_flight"] == 0 and view["queued"] == 0, view
    loads = metric_total(server, "llama_server_model_loads_total")
    assert loads == len(server.loader.loads), (loads, len(server.loader.loads))  # no double loads
    crashes = metric_total(server, "llama_server_model_crashes_total")
    assert crashes <= tally.kills and (crashes > 0 or seconds < 10), (crashes, tally.kills)
    for model in MODELS:
        reply = server.post("/v1/completions", {"model": model, "prompt": "Hello", "max_tokens": 2})
        assert reply.status_code == 200
    server.post("/admin/unload", {"model": "all"})
    rss_end = process.memory_info().rss
    assert rss_end - rss_start < 64 * 2**20, (rss_start // 2**20, rss_end // 2**20)
    time.sleep(0.5)  # helper threads of hung-up streams finish releasing
    leftover = [t.name for t in threading.enumerate() if t.ident not in threads_before
                and not t.name.startswith(("waitress", "stream-load", "idle-job", "gguf-meta")) and t.is_alive()]
    readers = [name for name in leftover if name.endswith("-reader")]  # one per live worker (the spare)
    assert [name for name in leftover if name not in readers] == [], leftover  # nothing else may linger
    workers = [p for p in process.children() if "engine.worker" in " ".join(p.cmdline())
               and p.status() != psutil.STATUS_ZOMBIE]
    assert len(readers) <= len(workers) <= 1, (readers, workers)  # every model unloaded: the spare at most
    unloads: Counter = Counter()
    for family in text_string_to_metric_families(server.get("/metrics").text):
        for sample in family.samples:
            if sample.name == "llama_server_model_unloads_total":
                unloads[sample.labels["reason"]] += int(sample.value)
    print(f"\nsoak {seconds}s: {sum(tally.kinds.values())} requests {dict(tally.kinds)}, statuses "
          f"{dict(tally.statuses)}, disconnects {tally.disconnects}, kills {tally.kills}, crashes {int(crashes)}, "
          f"requests ended by a crash {tally.crashed}, loads {int(loads)}, unloads {dict(unloads)}, "
          f"rss start {rss_start / 2**20:.0f} MiB end {rss_end / 2**20:.0f} MiB")


@pytest.fixture(autouse=True)
def _soak_only_when_asked(request):
    if request.config.getoption("--soak-seconds") <= 0:
        pytest.skip("--soak-seconds 0 disables the soak test")
