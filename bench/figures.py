"""The figures: each compares the server under test with a baseline and returns table rows.

A figure is a function of a ``Bench`` (what it may use) returning ``Row``s; ``FIGURES``
maps the names ``--only`` accepts to them. Server-side requests use the same greedy
sampling, context and thread count as the in-process side. Figures that need our
server's admin API or several models are skipped when ``--base-url`` points elsewhere.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bench import inprocess
from bench.client import Endpoint, StreamResult
from bench.cpu import wait_idle
from bench.inprocess import LocalModels
from bench.stats import Row, Sample, Target, compare, median_of, percentile, run_rounds
from bench.workspace import Model

log = logging.getLogger(__name__)

PROMPT = "Once upon a time"
# Short prompts for the first-token figures: consecutive rounds differ in their last tokens,
# so both sides re-decode a few tokens instead of one side finding the prompt cached.
SHORT_PROMPTS = tuple(f"Once upon a time, there was a {w}" for w in
                      ("girl", "boy", "dog", "cat", "bird", "king", "fish", "tree"))
STREAM_TARGETS = {"stories": 0.95, "big": 0.98}
JOIN_TIMEOUT = 600.0
BALANCE_STEPS = 3


@dataclass
class Bench:
    """What the figures may use: settings, the server under test, and the in-process models."""

    runs: int
    tokens: int
    smoke: bool
    endpoint: Endpoint
    models: dict[str, Model]  # by role: "stories", "mid", "big"
    local: LocalModels
    ours: bool  # our server, started here: the admin API and every role's model are there
    server_pid: int | None = None  # ours only (the CPU meter counts the benchmark's whole process tree)
    llama_server: Callable[[Model], Endpoint] | None = None  # starts (once per model) llama.cpp's C++ server

    def rounds(self, cheap: bool = False) -> int:
        """Rounds per comparison; cheap ones (milliseconds each) take more for a steadier median."""
        return self.runs * 4 if cheap else self.runs

    def roles(self, *wanted: str) -> list[Model]:
        return [self.models[role] for role in wanted if role in self.models]


Figure = Callable[[Bench], list[Row]]


def completion_body(model: Model, prompt: str, max_tokens: int, *, stream: bool = True) -> dict[str, Any]:
    """A greedy text completion that runs to ``max_tokens`` (``ignore_eos``)."""
    body: dict[str, Any] = {"model": model.id, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                            "ignore_eos": True, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


def server_stream(bench: Bench, model: Model, prompt: str, max_tokens: int) -> StreamResult:
    return bench.endpoint.stream("/v1/completions", completion_body(model, prompt, max_tokens))


def _stream_sample(result: StreamResult) -> Sample:
    return {"tokens": result.completion_tokens, "seconds": result.seconds, "tokens_per_s": result.tokens_per_s}


# ----------------------------------------------------------------------------- stream


def stream(bench: Bench) -> list[Row]:
    """Tokens/s of a long SSE stream against ``Llama.generate`` and ``create_completion(stream=True)``."""
    rows = []
    for model in bench.roles("stories", "big"):
        llama = bench.local.get(model.path)
        sides = {
            "server": lambda _i, m=model: _stream_sample(server_stream(bench, m, PROMPT, bench.tokens)),
            "generate": lambda _i, ll=llama: inprocess.generate_loop(ll, PROMPT, bench.tokens),
            "create_completion": lambda _i, ll=llama: inprocess.create_completion_stream(ll, PROMPT, bench.tokens),
        }
        samples = run_rounds(f"stream {model.id}", sides, bench.rounds())
        target = Target("ratio>=", STREAM_TARGETS.get(model.role, STREAM_TARGETS["stories"]))
        for baseline, goal in (("generate", target), ("create_completion", None)):
            row = compare("stream", model.id, "tokens/s", samples, "server", baseline, "tokens_per_s", goal)
            row.notes = {"tokens_server": median_of(samples["server"], "tokens"),
                         f"tokens_{baseline}": median_of(samples[baseline], "tokens")}
            rows.append(row)
    return rows


# ------------------------------------------------------------------------------ ttft


def ttft(bench: Bench) -> list[Row]:
    """Warm time to first token of a short streamed prompt against in-process, model loaded."""
    rows = []
    for model in bench.roles("stories", "big"):
        llama = bench.local.get(model.path)
        sides = {
            "server": lambda i, m=model: {"ms": _server_first_token(bench, m, short_prompt(i)) * 1e3},
            "in-process": lambda i, ll=llama: {"ms": inprocess.first_token(ll, short_prompt(i)) * 1e3},
        }
        samples = run_rounds(f"ttft {model.id}", sides, bench.rounds(cheap=True))
        rows.append(compare("ttft", model.id, "ms", samples, "server", "in-process", "ms", Target("diff<=", 5)))
    return rows


def short_prompt(index: int) -> str:
    return SHORT_PROMPTS[index % len(SHORT_PROMPTS)]


def _server_first_token(bench: Bench, model: Model, prompt: str) -> float:
    result = server_stream(bench, model, prompt, 1)
    if result.first_token is None:
        raise RuntimeError(f"no token in the stream of {model.id}")
    return result.first_token


# ------------------------------------------------------------------------------ cold


def cold(bench: Bench) -> list[Row]:
    """First token after POST /admin/unload against in-process ``Llama(...)`` plus first token."""
    rows = []
    for model in bench.roles("stories", "big"):
        sides = {
            "server": lambda i, m=model: _cold_server(bench, m, short_prompt(i)),
            "in-process": lambda i, m=model: _ms(inprocess.cold_first_token(bench.local, m.path, short_prompt(i))),
        }
        samples = run_rounds(f"cold {model.id}", sides, bench.rounds())
        row = compare("cold", model.id, "ms", samples, "server", "in-process", "ms", Target("ratio<=", 1.10))
        row.notes = {"in_process_load_ms": median_of(samples["in-process"], "load_ms")}
        rows.append(row)
    return rows


def _cold_server(bench: Bench, model: Model, prompt: str) -> Sample:
    bench.endpoint.post("/admin/unload", {"model": model.id})
    if bench.ours and bench.server_pid is not None:
        # Our next spare worker starts once our workers have been quiet a moment (workers.py):
        # measure a cold start as one that comes a second after the last, not back to back.
        time.sleep(1.0)
        wait_idle(bench.server_pid)
    return {"ms": _server_first_token(bench, model, prompt) * 1e3}


def _ms(sample: Sample) -> Sample:
    return {"ms": sample["seconds"] * 1e3, "load_ms": sample["load_seconds"] * 1e3}


# ------------------------------------------------------------------------------- rps


def rps(bench: Bench) -> list[Row]:
    """Non-streaming ``max_tokens: 1`` requests one after another on a keep-alive session."""
    model = bench.models["stories"]
    llama = bench.local.get(model.path)
    per_round = 5 if bench.smoke else 50

    def server(index: int) -> Sample:
        started = time.perf_counter()
        for k in range(per_round):
            body = completion_body(model, short_prompt(index + k), 1, stream=False)
            reply = bench.endpoint.post("/v1/completions", body)
            if reply["usage"]["completion_tokens"] != 1:
                raise RuntimeError(f"expected one token, got {reply['usage']}")
        return _per_request(time.perf_counter() - started, per_round)

    def local(index: int) -> Sample:
        started = time.perf_counter()
        for k in range(per_round):
            inprocess.first_token(llama, short_prompt(index + k))
        return _per_request(time.perf_counter() - started, per_round)

    samples = run_rounds("rps", {"server": server, "in-process": local}, bench.rounds())
    row = compare("rps", model.id, "ms/request", samples, "server", "in-process", "ms", Target("diff<=", 3))
    row.notes = {"requests_per_round": per_round, "server_rps": median_of(samples["server"], "rps"),
                 "in_process_rps": median_of(samples["in-process"], "rps")}
    return [row]


def _per_request(seconds: float, count: int) -> Sample:
    return {"ms": seconds / count * 1e3, "rps": count / seconds}


# -------------------------------------------------------------------------- parallel


def parallel(bench: Bench) -> list[Row]:
    """Two streams on two models at once against the same two streams one after the other.

    The token counts are tuned first so that both streams, each alone, last about as long:
    with unequal lengths the speedup is capped below 2 by the arithmetic, whatever the
    server does.
    """
    pair = bench.roles("stories", "mid")
    budget = _balanced_tokens(bench, pair)
    streams = [(model, budget[model.id]) for model in pair]
    total = sum(budget.values())

    def sequential(_index: int) -> Sample:
        started = time.perf_counter()
        for model, n in streams:
            server_stream(bench, model, PROMPT, n)
        return {"tokens_per_s": total / (time.perf_counter() - started)}

    def concurrent(_index: int) -> Sample:
        started = time.perf_counter()
        run_threads([lambda m=model, n=n: server_stream(bench, m, PROMPT, n) for model, n in streams])
        return {"tokens_per_s": total / (time.perf_counter() - started)}

    samples = run_rounds("parallel", {"concurrent": concurrent, "sequential": sequential}, bench.rounds())
    row = compare("parallel", "+".join(m.id for m in pair), "aggregate tokens/s", samples, "concurrent",
                  "sequential", "tokens_per_s", Target("ratio>=", 1.6))
    row.notes = {"max_tokens": budget}
    return [row]


def _balanced_tokens(bench: Bench, pair: list[Model]) -> dict[str, int]:
    """Token counts giving each model's solo stream about the same duration.

    Tokens get slower as the context fills, so one proportional step overshoots; a few
    steps of "scale by the duration ratio, measure again" converge.
    """
    budget = {model.id: bench.tokens for model in pair}
    cap = inprocess.N_CTX - 64  # room for the prompt
    for _ in range(BALANCE_STEPS):
        seconds = {m.id: min(server_stream(bench, m, PROMPT, budget[m.id]).seconds for _ in range(2)) for m in pair}
        slowest = max(seconds.values())
        budget = {model_id: min(cap, max(1, round(budget[model_id] * slowest / s))) for model_id, s in seconds.items()}
    return budget


def run_threads(jobs: list[Callable[[], Any]]) -> None:
    """Run ``jobs`` in threads started together; re-raise the first failure."""
    errors: list[BaseException] = []
    gate = threading.Barrier(len(jobs))

    def run(job: Callable[[], Any]) -> None:
        try:
            gate.wait(JOIN_TIMEOUT)
            job()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(job,), daemon=True) for job in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(JOIN_TIMEOUT)
    if any(thread.is_alive() for thread in threads):
        raise RuntimeError(f"a job did not finish within {JOIN_TIMEOUT:g} s")
    if errors:
        raise errors[0]


# ---------------------------------------------------------------------------- health


HEALTH_PACE = 0.005  # seconds between probes: a poller, not a load generator


def health(bench: Bench) -> list[Row]:
    """/health p99 while two streams run and a third model loads, against an idle server."""
    samples_per_round = 20 if bench.smoke else 200
    streaming = bench.roles("stories", "mid")
    loading = bench.models["big"]

    def idle(_index: int) -> Sample:
        return _latencies([_probe(bench) for _ in range(samples_per_round)])

    def busy(_index: int) -> Sample:
        return _busy_health(bench, streaming, loading, samples_per_round)

    samples = run_rounds("health", {"busy": busy, "idle": idle}, bench.rounds())
    row = compare("health", "/health", "p99 ms", samples, "busy", "idle", "p99_ms", Target("a<=", 20))
    row.notes = {"p50_ms_busy": median_of(samples["busy"], "p50_ms"),
                 "p50_ms_idle": median_of(samples["idle"], "p50_ms"),
                 "max_ms_busy": max(s["max_ms"] for s in samples["busy"]),
                 "probes_busy": median_of(samples["busy"], "probes"),
                 "probes_during_load": median_of(samples["busy"], "probes_during_load"),
                 "load_ms": median_of(samples["busy"], "load_ms")}
    return [row]


def _probe(bench: Bench) -> float:
    seconds = bench.endpoint.probe("/health")
    time.sleep(HEALTH_PACE)
    return seconds * 1e3


def _latencies(values: list[float], **extra: float) -> Sample:
    return {"p99_ms": percentile(values, 99), "p50_ms": percentile(values, 50), "max_ms": max(values),
            "probes": len(values), **extra}


def _busy_health(bench: Bench, streaming: list[Model], loading: Model, at_least: int) -> Sample:
    """Probe while ``streaming`` models stream in a loop and ``loading`` is unloaded and loaded."""
    stop, loaded = threading.Event(), threading.Event()
    errors: list[BaseException] = []
    load_ms = [0.0]

    def stream_until_stopped(model: Model) -> None:
        while not stop.is_set():
            server_stream(bench, model, PROMPT, bench.tokens)

    def reload() -> None:
        try:
            bench.endpoint.post("/admin/unload", {"model": loading.id})
            started = time.perf_counter()
            bench.endpoint.post("/admin/load", {"model": loading.id})
            load_ms[0] = (time.perf_counter() - started) * 1e3
        finally:
            loaded.set()  # also on failure, so the probing below ends

    def background() -> None:
        try:
            run_threads([*(lambda m=model: stream_until_stopped(m) for model in streaming), reload])
        except BaseException as exc:
            errors.append(exc)

    runner = threading.Thread(target=background, name="busy-health", daemon=True)
    runner.start()
    latencies: list[float] = []
    during_load = 0
    while not loaded.is_set() or len(latencies) < at_least:
        latencies.append(_probe(bench))
        during_load += not loaded.is_set()
    stop.set()
    runner.join(JOIN_TIMEOUT)
    if errors:
        raise errors[0]
    return _latencies(latencies, probes_during_load=during_load, load_ms=load_ms[0])


# ----------------------------------------------------------------------------- versus

VERSUS_TARGETS = {"stories": 1.5, "mid": 1.0}


def versus(bench: Bench) -> list[Row]:
    """Tokens/s of the same SSE stream from our server and from llama.cpp's C++ llama-server."""
    if bench.llama_server is None:
        raise SkipFigure("needs --llama-server PATH (a llama-server built from the vendored llama.cpp)")
    rows = []
    for model in bench.roles("stories", "mid"):
        other = bench.llama_server(model)
        sides = {
            "server": lambda _i, m=model: _stream_sample(server_stream(bench, m, PROMPT, bench.tokens)),
            "llama-server": lambda _i, m=model, e=other: _stream_sample(
                e.stream("/v1/completions", completion_body(m, PROMPT, bench.tokens))),
        }
        samples = run_rounds(f"versus {model.id}", sides, bench.rounds())
        rows.append(compare("versus", model.id, "tokens/s", samples, "server", "llama-server", "tokens_per_s",
                            Target("ratio>=", VERSUS_TARGETS[model.role])))
    return rows


class SkipFigure(Exception):
    """A figure that cannot run with the given options; the reason goes into the table."""


FIGURES: dict[str, Figure] = {
    "stream": stream,
    "ttft": ttft,
    "cold": cold,
    "rps": rps,
    "parallel": parallel,
    "health": health,
    "versus": versus,
}
# Figures that need our own server: its admin API, or several models served at once.
NEEDS_OURS = frozenset({"cold", "parallel", "health", "versus"})
