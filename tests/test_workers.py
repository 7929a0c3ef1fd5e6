"""Models in worker processes, through the server: a crash costs one model's requests only,
the server never holds a model's memory, and workers never outlive their model."""

from __future__ import annotations

import os
import signal
import time

import psutil
import pytest
from conftest import LiveServer, sse_events
from helpers import completion, open_stream, raw_request


def worker_children() -> list[psutil.Process]:
    """This process's worker processes (the spare included), zombies excepted."""
    return [p for p in psutil.Process().children() if "engine.worker" in " ".join(p.cmdline() or [])
            and p.status() != psutil.STATUS_ZOMBIE]


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGSEGV, signal.SIGABRT])
def test_a_worker_dying_mid_stream_costs_only_its_own_requests(server: LiveServer, signum):
    for model in ("tiny", "tiny-chat"):
        assert completion(server, model).status_code == 200
    server.loader.token_delay = 0.01
    with open_stream(server, "tiny", max_tokens=300) as doomed, open_stream(server, "tiny-chat", 300) as other:
        doomed_events, other_events = sse_events(doomed), sse_events(other)
        next(doomed_events), next(other_events)
        pid = server.model_view("tiny")["pid"]
        os.kill(pid, signum)
        rest = list(doomed_events)
        assert server.get("/health").status_code == 200
        survivor = list(other_events)
    assert rest[-1] == "[DONE]"
    error = rest[-2]["error"]
    assert error["code"] == "model_crashed" and signal.Signals(signum).name in error["message"]
    assert survivor[-1] == "[DONE]" and survivor[-2]["choices"][0]["finish_reason"] == "length"
    view = server.model_view("tiny")
    assert view["state"] == "failed" and signal.Signals(signum).name in view["error"]
    crashed = [e for e in server.manager.events.history() if e["event"] == "crashed"]
    assert [(e["model"], e["pid"]) for e in crashed] == [("tiny", pid)]
    assert 'llama_server_model_crashes_total{model="tiny"} 1.0' in server.get("/metrics").text
    server.loader.token_delay = 0
    assert completion(server, "tiny").status_code == 200  # loaded again
    assert server.loader.loads.count("tiny") == 2
    assert server.model_view("tiny")["pid"] != pid


def test_a_request_without_a_stream_gets_a_500_when_its_worker_dies(server: LiveServer):
    assert completion(server).status_code == 200
    server.loader.token_delay = 0.02
    pid = server.model_view("tiny")["pid"]
    import threading

    killer = threading.Timer(0.3, os.kill, (pid, signal.SIGKILL))
    killer.start()
    reply = completion(server, max_tokens=200, ignore_eos=True)
    killer.join()
    assert reply.status_code == 500 and reply.json()["error"]["code"] == "model_crashed"
    assert server.model_view("tiny")["state"] == "failed"


def test_a_stopped_worker_is_killed_after_worker_timeout(make_server):
    server = make_server({"worker_timeout": 1})
    assert completion(server).status_code == 200
    pid = server.model_view("tiny")["pid"]
    os.kill(pid, signal.SIGSTOP)
    started = time.monotonic()
    reply = completion(server, max_tokens=5)
    assert reply.status_code == 500 and "did not answer" in reply.json()["error"]["message"]
    assert time.monotonic() - started < 10
    assert completion(server).status_code == 200


def test_load_unload_cycles_leave_no_worker_and_no_memory_behind(server: LiveServer):
    rss = psutil.Process().memory_info().rss
    pids = set()
    for _ in range(20):
        assert completion(server).status_code == 200
        pids.add(server.model_view("tiny")["pid"])
        assert server.post("/admin/unload", {"model": "tiny"}).status_code == 200
    assert len(pids) == 20
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in pids)
    assert len(worker_children()) <= 1  # the warm spare
    assert psutil.Process().memory_info().rss - rss < 30 * 2**20


def test_health_shows_each_loaded_instance_worker_pid(server: LiveServer):
    assert server.model_view("tiny")["pid"] is None
    assert completion(server).status_code == 200
    pid = server.model_view("tiny")["pid"]
    assert psutil.Process(pid).cmdline()[-2:-1] == ["engine.worker"]


def test_a_client_gone_while_tokens_flow_is_noticed_without_a_stream(server: LiveServer):
    """Tokens arriving faster than the hang-up poll used to hide the hang-up until max_tokens."""
    assert completion(server).status_code == 200
    server.loader.token_delay = 0.02
    sock = raw_request(server, "/v1/completions", {"model": "tiny", "prompt": "Hello", "max_tokens": 400,
                                                   "ignore_eos": True})
    server.wait_for(lambda: server.model_view("tiny")["in_flight"] == 1)
    time.sleep(0.5)
    sock.close()
    server.wait_for(lambda: server.model_view("tiny")["in_flight"] == 0, timeout=3)
    decoded = server.loader.decoded_tokens
    time.sleep(0.3)
    assert server.loader.decoded_tokens == decoded  # cancelled in the worker, long before 400 tokens


def test_a_worker_dead_right_after_its_load_is_a_failed_load_not_a_wedged_model(server: LiveServer):
    def kill_it(worker) -> None:
        os.kill(worker.pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while worker.alive and time.monotonic() < deadline:
            time.sleep(0.01)

    server.loader.after_load = kill_it
    reply = completion(server)
    assert reply.status_code == 500 and "SIGKILL" in reply.json()["error"]["message"]
    assert server.model_view("tiny")["state"] == "failed"
    server.loader.after_load = None
    assert completion(server).status_code == 200  # the next request loads it again


def test_streams_cut_by_the_shutdown_say_so(server: LiveServer):
    assert completion(server).status_code == 200
    server.loader.token_delay = 0.02
    import threading

    with open_stream(server, max_tokens=300) as stream:
        events = sse_events(stream)
        next(events)
        threading.Thread(target=server.manager.shutdown, args=(0.2,), daemon=True).start()
        rest = list(events)
    assert rest[-1] == "[DONE]" and rest[-2]["error"]["code"] == "shutting_down"


def test_a_waiting_worker_runs_one_thread(monkeypatch):
    """No BLAS thread pool beside llama.cpp's own threads: numpy's OpenBLAS would start one per
    core at import and spin, taking CPU from the models generating beside a starting spare."""
    from engine.client import Worker

    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    worker = Worker()
    worker.start()
    try:
        assert psutil.Process(worker.pid).num_threads() == 1
    finally:
        worker.close()
