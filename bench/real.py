"""The real-model figures (``--real``): our server against llama.cpp's ``llama-server``.

Both serve the same real GGUF (SmolLM2-135M-Instruct by default), each with its own
default settings (see ``bench.real_setup``); side A is ours, side B llama-server, run
interleaved (A B A B ...). Requests are greedy and, except for the chat turns' length,
ignore EOS, so both sides generate exactly the asked number of tokens; the counts come
from each server's ``usage``. ``real_cold`` compares ours with llama-cpp-python
in-process instead, and is the one figure that runs without ``--llama-server``.
"""

from __future__ import annotations

import gc
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import llama_cpp

from bench import inprocess
from bench.chats import CONVERSATIONS, Message
from bench.client import Endpoint, StreamResult
from bench.cpu import wait_idle
from bench.figures import JOIN_TIMEOUT, PROMPT, SkipFigure, completion_body, run_threads, short_prompt
from bench.real_setup import DEFAULTS, PROFILES, RPC, RealServers
from bench.stats import Row, Sample, Target, compare, median_of, run_rounds
from bench.workspace import Model

OURS, THEIRS = "ours", "llama-server"
FOUR_PROMPTS = ("Once upon a time", "The best way to learn", "Here is a recipe for", "In the year 2050")
SHORT_TOKENS = 8  # the short request of real_short_during_long
HISTORY_PAIRS = 21  # exchanges before the first turn: about 1,500 prompt tokens with SmolLM2's template
TURN_TOKENS = 32  # the most tokens a chat turn's answer has (only its first token is timed)


@dataclass
class RealBench:
    """What the real figures may use: settings, and both servers on the real model."""

    runs: int
    tokens: int  # one stream's length; the long stream of real_short_during_long is twice that
    smoke: bool
    servers: RealServers

    @property
    def model(self) -> Model:
        return self.servers.model

    def pair(self, profile: str = DEFAULTS) -> tuple[Endpoint, Endpoint]:
        """(ours, llama-server) for ``profile``, started if need be."""
        try:
            theirs = self.servers.theirs(profile)
        except LookupError as exc:
            raise SkipFigure(str(exc)) from None
        return self.servers.ours(profile), theirs

    def label(self, profile: str) -> str:
        return f"{self.model.id} ({profile})"


def _stream(endpoint: Endpoint, model: Model, prompt: str, n: int,
            on_first_token: Callable[[], None] | None = None) -> StreamResult:
    return endpoint.stream("/v1/completions", completion_body(model, prompt, n), on_first_token)


def _check(result: StreamResult, expected: int, side: str) -> StreamResult:
    """A stream must report its usage and run to its length, or tokens/s compares nothing."""
    if not result.usage_reported or result.completion_tokens != expected:
        raise RuntimeError(f"{side}: expected {expected} tokens in usage, got {result.completion_tokens} "
                           f"(usage reported: {result.usage_reported})")
    return result


# ------------------------------------------------------------------------ real_stream


def real_stream(bench: RealBench) -> list[Row]:
    """Tokens/s of one stream: with each server's defaults, then with every core on both sides."""
    rows = []
    for profile in PROFILES:
        ours, theirs = bench.pair(profile)
        sides = {name: lambda _i, e=endpoint, n=name: _tokens_per_s(_check(
                     _stream(e, bench.model, PROMPT, bench.tokens), bench.tokens, n))
                 for name, endpoint in ((OURS, ours), (THEIRS, theirs))}
        samples = run_rounds(f"real_stream {profile}", sides, bench.runs)
        row = compare("real_stream", bench.label(profile), "tokens/s", samples, OURS, THEIRS, "tokens_per_s",
                      Target("ratio>=", 0.95))
        row.notes = {"tokens": bench.tokens, "settings": bench.servers.effective(profile)}
        rows.append(row)
    return rows


def _tokens_per_s(result: StreamResult) -> Sample:
    return {"tokens": result.completion_tokens, "seconds": result.seconds, "tokens_per_s": result.tokens_per_s}


# -------------------------------------------------------------------------- real_four


def real_four(bench: RealBench) -> list[Row]:
    """Aggregate tokens/s of four streams sent together (both servers have four slots by default)."""
    ours, theirs = bench.pair()
    sides = {name: lambda _i, e=endpoint, n=name: _four(bench, e, n) for name, endpoint in ((OURS, ours),
                                                                                          (THEIRS, theirs))}
    samples = run_rounds("real_four", sides, bench.runs)
    row = compare("real_four", bench.label(DEFAULTS), "aggregate tokens/s", samples, OURS, THEIRS, "tokens_per_s",
                  Target("ratio>=", 1.0))
    row.notes = {"streams": len(FOUR_PROMPTS), "tokens_each": bench.tokens,
                 "slowest_stream_s_ours": median_of(samples[OURS], "slowest_s"),
                 "slowest_stream_s_llama_server": median_of(samples[THEIRS], "slowest_s"),
                 "settings": bench.servers.effective(DEFAULTS)}
    return [row]


def _four(bench: RealBench, endpoint: Endpoint, side: str) -> Sample:
    results: list[StreamResult] = []
    started = time.perf_counter()
    run_threads([lambda p=prompt: results.append(_check(_stream(endpoint, bench.model, p, bench.tokens),
                                                        bench.tokens, side)) for prompt in FOUR_PROMPTS])
    seconds = time.perf_counter() - started
    return {"tokens_per_s": sum(r.completion_tokens for r in results) / seconds, "seconds": seconds,
            "slowest_s": max(r.seconds for r in results)}


# ------------------------------------------------------------- real_short_during_long


def real_short_during_long(bench: RealBench) -> list[Row]:
    """An 8-token request's latency while a long stream runs on the same model, and alone."""
    ours, theirs = bench.pair()
    long_tokens = 2 * bench.tokens
    sides: dict[str, Callable[[int], Sample]] = {}
    for name, endpoint in ((OURS, ours), (THEIRS, theirs)):
        sides[f"{name} idle"] = lambda i, e=endpoint: _short(e, bench.model, short_prompt(i))
        sides[f"{name} busy"] = lambda i, e=endpoint: _short_while_long(e, bench.model, short_prompt(i),
                                                                        long_tokens)
    samples = run_rounds("real_short_during_long", sides, bench.runs)
    label = bench.label(DEFAULTS)
    main = compare("real_short_during_long", label, "ms", samples, f"{OURS} busy", f"{THEIRS} busy", "ms",
                   Target("ratio<=", 1.5))
    main.notes = {"short_tokens": SHORT_TOKENS, "long_tokens": long_tokens,
                  "long_outlasted_short": {name: statistics.mean(s["overlapped"] for s in samples[f"{name} busy"])
                                           for name in (OURS, THEIRS)},
                  "settings": bench.servers.effective(DEFAULTS)}
    rows = [main]
    for name in (OURS, THEIRS):  # each server against itself: how much a running stream slows it
        row = compare("real_short_during_long", label, "ms", samples, f"{name} busy", f"{name} idle", "ms")
        row.notes = {"first_token_ms_busy": median_of(samples[f"{name} busy"], "first_token_ms"),
                     "first_token_ms_idle": median_of(samples[f"{name} idle"], "first_token_ms")}
        rows.append(row)
    return rows


def _short(endpoint: Endpoint, model: Model, prompt: str) -> Sample:
    result = _check(_stream(endpoint, model, prompt, SHORT_TOKENS), SHORT_TOKENS, endpoint.base_url)
    return {"ms": result.seconds * 1e3, "first_token_ms": (result.first_token or result.seconds) * 1e3}


def _short_while_long(endpoint: Endpoint, model: Model, prompt: str, long_tokens: int) -> Sample:
    """Start the long stream, send the short request once the long one streams, time the short one."""
    streaming = threading.Event()
    outcome: dict[str, Any] = {}

    def long_stream() -> None:
        try:
            outcome["result"] = _stream(endpoint, model, PROMPT, long_tokens, streaming.set)
            outcome["ended"] = time.perf_counter()
        except BaseException as exc:
            outcome["error"] = exc
        finally:
            streaming.set()

    thread = threading.Thread(target=long_stream, name="long-stream", daemon=True)
    thread.start()
    streaming.wait(JOIN_TIMEOUT)
    if "error" in outcome:
        raise outcome["error"]
    sample = _short(endpoint, model, prompt)
    short_ended = time.perf_counter()
    thread.join(JOIN_TIMEOUT)
    if "error" in outcome:
        raise outcome["error"]
    if "result" not in outcome:
        raise RuntimeError(f"the long stream did not end within {JOIN_TIMEOUT:g} s")
    _check(outcome["result"], long_tokens, endpoint.base_url)
    return {**sample, "overlapped": float(outcome["ended"] > short_ended)}


# ------------------------------------------------------------------- real_alternating


class Chats:
    """Two conversations on one server, taking turns as a chat client does; each turn's time to first token.

    A turn sends the conversation so far, then appends the server's own answer and the
    conversation's next question, so the next turn's prompt extends what the server
    last saw of that conversation.
    """

    def __init__(self, endpoint: Endpoint, model: Model) -> None:
        self.endpoint, self.model = endpoint, model
        self.messages: list[list[Message]] = [c.history(HISTORY_PAIRS) for c in CONVERSATIONS]
        self.turns = [HISTORY_PAIRS] * len(CONVERSATIONS)  # the question each conversation awaits an answer to

    def turn(self, index: int) -> StreamResult:
        """Send conversation ``index`` as it stands, then append the answer and the next question."""
        body = {"model": self.model.id, "messages": self.messages[index], "max_tokens": TURN_TOKENS,
                "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
        result = self.endpoint.stream("/v1/chat/completions", body)
        if result.first_token is None:
            raise RuntimeError(f"{self.endpoint.base_url}: no token in a chat turn")
        self.turns[index] += 1
        self.messages[index] = [*self.messages[index], {"role": "assistant", "content": result.text},
                                {"role": "user", "content": CONVERSATIONS[index].question(self.turns[index])}]
        return result

    def round(self) -> Sample:
        """One turn of each conversation, in order; the mean time to first token."""
        results = [self.turn(index) for index in range(len(self.messages))]
        sample = {"ms": statistics.mean(r.first_token or 0.0 for r in results) * 1e3}
        for index, result in enumerate(results):
            sample[f"ms_{index}"] = (result.first_token or 0.0) * 1e3
            sample[f"prompt_tokens_{index}"] = float(result.prompt_tokens or 0)
            sample[f"cached_tokens_{index}"] = float(result.cached_tokens or 0)
            sample[f"answer_tokens_{index}"] = float(result.completion_tokens)
        return sample


def real_alternating(bench: RealBench) -> list[Row]:
    """Two conversations with long histories alternating turns: time to first token of each turn.

    The first turn of each conversation (the whole history to prefill) is sent before the
    measured rounds and reported in the notes; every later turn's prompt is the previous
    one plus the server's answer (at most 32 tokens) and a new question.
    """
    ours, theirs = bench.pair()
    chats = {OURS: Chats(ours, bench.model), THEIRS: Chats(theirs, bench.model)}
    openings = {name: c.round() for name, c in chats.items()}
    samples = run_rounds("real_alternating", {name: lambda _i, c=c: c.round() for name, c in chats.items()},
                         bench.runs, warmup=0)
    row = compare("real_alternating", bench.label(DEFAULTS), "ms to first token", samples, OURS, THEIRS, "ms",
                  Target("ratio<=", 1.0))
    row.notes = {
        "conversations": len(CONVERSATIONS), "max_answer_tokens": TURN_TOKENS,
        "answer_tokens_median": {name: [median_of(samples[name], f"answer_tokens_{i}")
                                        for i in range(len(CONVERSATIONS))] for name in chats},
        "history_prompt_tokens": {name: [int(s[f"prompt_tokens_{i}"]) for i in range(len(CONVERSATIONS))]
                                  for name, s in openings.items()},
        "first_turn_ms": {name: round(s["ms"], 1) for name, s in openings.items()},
        "last_prompt_tokens": {name: [int(samples[name][-1][f"prompt_tokens_{i}"]) for i in range(len(CONVERSATIONS))]
                               for name in chats},
        "cached_tokens_median": {name: [median_of(samples[name], f"cached_tokens_{i}")
                                        for i in range(len(CONVERSATIONS))] for name in chats},
        "settings": bench.servers.effective(DEFAULTS),
    }
    return [row]


# -------------------------------------------------------------------------- real_cold


def real_cold(bench: RealBench) -> list[Row]:
    """First token of an unloaded model: ours after POST /admin/unload, against llama-cpp-python's
    ``Llama(path, n_ctx=<our default>)`` plus its first token, two ways.

    - In a fresh interpreter that has imported llama_cpp and loads this model for the first
      time (``inprocess.FreshInterpreter``): what "never loaded" means for a script, and the
      state our spare worker is in. This is the row with the target.
    - In this process, which loads the same file again and again: a warm repeat, which a
      first load never is (the C heap the tokenizer needs is already faulted in, about 6,000
      pages). Reported beside it.

    Both use llama-cpp-python's default threads (ours has none set). Before each side the
    benchmark waits for our server to be idle: after a load it starts its next spare worker,
    which should not land on another side's time.
    """
    ours = bench.servers.ours(DEFAULTS)
    pid = bench.servers.our_pid(DEFAULTS)
    n_ctx = our_default_n_ctx()

    def server(index: int) -> Sample:
        ours.post("/admin/unload", {"model": bench.model.id})
        wait_idle(pid)
        result = _stream(ours, bench.model, short_prompt(index), 1)
        if result.first_token is None:
            raise RuntimeError("no token from our server")
        return {"ms": result.first_token * 1e3}

    def quiet() -> None:
        # Our next spare starts once our workers have been quiet for a moment (workers.py);
        # give it that moment, so its start is counted on neither side.
        time.sleep(1.0)
        wait_idle(pid)

    def fresh(index: int) -> Sample:
        child = inprocess.FreshInterpreter(bench.model.path, n_ctx, short_prompt(index))
        quiet()
        return child.cold_first_token()

    def warm(index: int) -> Sample:
        quiet()
        started = time.perf_counter()
        llama = llama_cpp.Llama(model_path=str(bench.model.path), n_ctx=n_ctx, verbose=False)
        loaded = time.perf_counter()
        inprocess.first_token(llama, short_prompt(index))
        sample = {"ms": (time.perf_counter() - started) * 1e3, "load_ms": (loaded - started) * 1e3}
        llama.close()
        gc.collect()
        return sample

    fresh_name, warm_name = "in-process", "in-process (repeat)"
    samples = run_rounds("real_cold", {OURS: server, fresh_name: fresh, warm_name: warm}, bench.runs)
    rows = [compare("real_cold", bench.label(DEFAULTS), "ms", samples, OURS, fresh_name, "ms", Target("ratio<=", 1.2)),
            compare("real_cold", bench.label(DEFAULTS), "ms", samples, OURS, warm_name, "ms")]
    for row, name in zip(rows, (fresh_name, warm_name), strict=True):
        row.notes = {"in_process_n_ctx": n_ctx, "in_process_load_ms": median_of(samples[name], "load_ms"),
                     "settings": bench.servers.effective(DEFAULTS)}
    return rows


def our_default_n_ctx() -> int:
    """Our server's default context (config.py), which the in-process side is given too."""
    from config import ManagerSettings  # the server's own module, imported only here

    return ManagerSettings().n_ctx


# --------------------------------------------------------------------------- real_rpc


def real_rpc(bench: RealBench) -> list[Row]:
    """Tokens/s of one stream with every layer on an rpc_worker over loopback, against the same
    model local: the price of the RPC hops alone, with no network in between (both on this box)."""
    local, split = bench.servers.ours(DEFAULTS), bench.servers.ours(RPC)
    sides = {name: lambda _i, e=endpoint, n=name: _tokens_per_s(_check(
                 _stream(e, bench.model, PROMPT, bench.tokens), bench.tokens, n))
             for name, endpoint in (("split", split), ("local", local))}
    samples = run_rounds("real_rpc", sides, bench.runs)
    row = compare("real_rpc", f"{bench.model.id} (rpc_worker on loopback)", "tokens/s", samples, "split", "local",
                  "tokens_per_s")
    row.notes = {"tokens": bench.tokens}
    return [row]


RealFigure = Callable[[RealBench], list[Row]]
REAL_FIGURES: dict[str, RealFigure] = {
    "real_stream": real_stream,
    "real_four": real_four,
    "real_short_during_long": real_short_during_long,
    "real_alternating": real_alternating,
    "real_cold": real_cold,
    "real_rpc": real_rpc,
}
