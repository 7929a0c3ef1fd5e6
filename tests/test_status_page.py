"""What the status page reads and how it is served: ``GET /admin/stats`` on a real server,
the recent-activity ring (``activity.ActivityLog``, on a clock the test moves), the GPU
probe without and with NVML, and the page's caching and security headers."""

from __future__ import annotations

import sys
import types
from typing import Any

import pytest
from conftest import LiveServer, chat_body, sse_events
from helpers import open_stream

from activity import ActivityLog
from memory import MemoryProbe
from status_page import CONTENT_SECURITY_POLICY

ASSETS = ["/", "/ui/app.js", "/ui/markdown.js", "/ui/style.css"]


# ---------------------------------------------------------------- /admin/stats


def test_stats_before_anything_is_loaded(server: LiveServer):
    reply = server.get("/admin/stats")
    assert reply.status_code == 200
    assert reply.headers["Cache-Control"] == "no-store"
    stats = reply.json()
    memory = stats["memory"]
    assert memory["total_bytes"] > memory["used_bytes"] > 0
    assert memory["used_bytes"] + memory["available_bytes"] == memory["total_bytes"]
    assert memory["server_rss_bytes"] > 10 * 2**20  # this Python process, llama_cpp imported
    assert memory["budget_bytes"] is None and memory["estimated_bytes"] == 0
    assert memory["gpus"] == []  # no NVML here: nothing is reported, nothing fails
    assert stats["instances"] == []
    assert stats["activity"]["models"] == {}
    assert stats["activity"]["window_seconds"] == 300 and stats["activity"]["bucket_seconds"] == 10


def test_stats_show_a_loaded_worker_and_its_completions(make_server):
    server = make_server({"memory_budget": "1GiB", "parallel": 2})
    server.post("/admin/load", {"model": "tiny-chat"})
    pid = server.model_view("tiny-chat")["pid"]
    (instance,) = server.get("/admin/stats").json()["instances"]
    assert instance["model"] == "tiny-chat" and instance["mode"] == "generate" and instance["state"] == "loaded"
    assert instance["pid"] == pid
    assert 10 * 2**20 < instance["rss_bytes"] < 2**30  # the worker process, read by pid
    assert instance["vram_bytes"] is None
    assert (instance["in_flight"], instance["queued"], instance["generating"], instance["slots"]) == (0, 0, 0, 2)

    for _ in range(2):
        events = list(sse_events(server.post("/v1/chat/completions", chat_body(max_tokens=12, stream=True),
                                             stream=True)))
        assert events[-1] == "[DONE]"
    stats = server.get("/admin/stats").json()
    assert stats["memory"]["budget_bytes"] == 2**30
    assert stats["memory"]["estimated_bytes"] == instance["estimated_memory_bytes"] > 0
    recent = stats["activity"]["models"]["tiny-chat"]
    assert recent["completions"] == 2 and recent["tokens"] == 24
    assert len(recent["tokens_per_second"]) == 30 and recent["tokens_per_second"][-1] > 0
    assert 0 < recent["ttft_seconds"]["last"] < 30 and 0 < recent["ttft_seconds"]["median"] < 30
    assert recent["last"]["tokens"] == 12 and recent["last"]["tokens_per_second"] > 0


def test_stats_count_a_running_generation(make_server):
    server = make_server()
    server.post("/admin/load", {"model": "tiny"})
    server.loader.token_delay = 0.05
    stream = open_stream(server)  # 200 tokens, 10 s

    def running() -> dict[str, Any]:
        return server.get("/admin/stats").json()["instances"][0]

    server.wait_for(lambda: running()["generating"] == 1)
    assert running()["in_flight"] == 1 and running()["queued"] == 0
    stream.close()
    server.wait_for(lambda: running()["in_flight"] == 0)


def test_stats_need_the_admin_key(make_server):
    server = make_server(server={"api_keys": ["user"], "admin_api_keys": ["admin"]})
    assert server.get("/admin/stats").status_code == 401
    assert server.get("/admin/stats", headers={"Authorization": "Bearer user"}).status_code == 403
    assert server.get("/admin/stats", headers={"Authorization": "Bearer admin"}).status_code == 200


# ---------------------------------------------------------------- the activity ring


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_tokens_are_spread_over_the_seconds_they_were_generated_in():
    clock = Clock(1000.0)  # a bucket boundary: buckets of 10 s, the current one [1000, 1010)
    log = ActivityLog(window=60, bucket=10, clock=clock)
    clock.now = 995.0
    log.record("m", 100, first_token_seconds=5.0, seconds=25.0)  # generated from 975 to 995
    clock.now = 1000.0
    summary = log.summary()
    rates = summary["models"]["m"]["tokens_per_second"]
    assert summary["start"] == 950.0 and len(rates) == 6
    assert rates == [0.0, 0.0, 2.5, 5.0, 2.5, 0.0]  # 25, 50 and 25 tokens in 10 s buckets
    clock.now = 1004.0
    log.record("m", 20, first_token_seconds=None, seconds=0.0)  # no timing: all in its end's bucket
    assert log.summary()["models"]["m"]["tokens_per_second"][-1] == 5.0  # 20 tokens in the 4 s elapsed


def test_time_to_first_token_and_speed_of_the_last_completion():
    clock = Clock(500.0)
    log = ActivityLog(clock=clock)
    for ttft in (0.2, 0.1, 0.6):
        log.record("m", 10, first_token_seconds=ttft, seconds=ttft + 2.0)
    log.record("m", 0, first_token_seconds=None, seconds=0.5)  # nothing generated: no first token
    recent = log.summary()["models"]["m"]
    assert recent["ttft_seconds"] == {"last": 0.6, "median": 0.2}
    assert recent["completions"] == 4 and recent["tokens"] == 30
    assert recent["last"] == {"ended": 500.0, "tokens": 0, "seconds": 0.5, "tokens_per_second": None}
    log.record("m", 50, first_token_seconds=0.5, seconds=2.5)
    assert log.summary()["models"]["m"]["last"]["tokens_per_second"] == 25.0  # 50 tokens in the 2 s after the first


def test_the_ring_forgets_old_completions_and_quiet_models():
    clock = Clock(0.0)
    log = ActivityLog(window=60, bucket=10, per_model=3, clock=clock)
    for _ in range(5):
        log.record("busy", 1, 0.1, 0.2)
    assert log.summary()["models"]["busy"]["completions"] == 3  # bounded per model
    clock.now = 30.0
    log.record("other", 1, 0.1, 0.2)
    clock.now = 200.0
    assert log.summary()["models"] == {}
    assert log._rings == {}  # nothing kept for what no chart shows


# ---------------------------------------------------------------- GPUs through NVML


def test_gpus_are_empty_without_nvml():
    assert MemoryProbe().gpus() == []


def test_gpus_are_read_through_nvml_where_it_is_present(monkeypatch: pytest.MonkeyPatch):
    """No GPU here: a stand-in ``pynvml`` module with NVML's calls, to check what is read from it."""

    class NVMLError(Exception):
        pass

    memory = types.SimpleNamespace(total=8 * 2**30, used=3 * 2**30)
    process = types.SimpleNamespace(pid=4242, usedGpuMemory=2**30)
    nvml = types.SimpleNamespace(
        NVMLError=NVMLError, nvmlInit=lambda: None, nvmlDeviceGetCount=lambda: 1,
        nvmlDeviceGetHandleByIndex=lambda index: f"gpu{index}", nvmlDeviceGetName=lambda handle: b"Tiny GPU",
        nvmlDeviceGetMemoryInfo=lambda handle: memory,
        nvmlDeviceGetComputeRunningProcesses=lambda handle: [process])
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    probe = MemoryProbe()
    assert probe.gpus() == [{"index": 0, "name": "Tiny GPU", "total_bytes": 8 * 2**30, "used_bytes": 3 * 2**30}]
    assert probe.vram(4242) == 2**30

    def broken(handle: Any) -> Any:
        raise NVMLError("GPU is lost")

    nvml.nvmlDeviceGetMemoryInfo = broken
    assert probe.gpus() == []  # a failing driver hides the GPU; it never fails the page


# ---------------------------------------------------------------- headers


@pytest.mark.parametrize("path", ASSETS)
def test_the_page_and_its_files_revalidate_and_carry_the_csp(server: LiveServer, path: str):
    reply = server.get(path)
    assert reply.status_code == 200
    assert reply.headers["Cache-Control"] == "no-cache"  # kept, but asked about each time: never stale
    assert reply.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
    assert reply.headers["X-Content-Type-Options"] == "nosniff"
    assert reply.headers["Referrer-Policy"] == "no-referrer"
    assert reply.headers["X-Frame-Options"] == "DENY"
    etag = reply.headers["ETag"]
    again = server.get(path, headers={"If-None-Match": etag})
    assert again.status_code == 304 and again.content == b""
    assert again.headers["Cache-Control"] == "no-cache"
    assert server.get(path, headers={"If-None-Match": '"something else"'}).status_code == 200


def test_the_csp_allows_nothing_inline_and_nothing_from_elsewhere():
    directives = dict(d.strip().split(" ", 1) for d in CONTENT_SECURITY_POLICY.split(";"))
    assert directives["default-src"] == "'none'"
    for name in ("script-src", "style-src", "connect-src"):
        assert directives[name] == "'self'"  # no 'unsafe-inline', no 'unsafe-eval', no other host
    assert directives["frame-ancestors"] == "'none'"


def test_the_page_uses_no_inline_script_or_style(server: LiveServer):
    html = server.get("/").text
    assert "<script>" not in html and "style=" not in html and "<style" not in html
    assert 'src="ui/app.js"' in html and 'src="ui/markdown.js"' in html
    for script in ("/ui/app.js", "/ui/markdown.js"):
        assert ".innerHTML" not in server.get(script).text  # model output becomes nodes, never markup
