"""The engine on real models in real worker processes: batching, prefill, caches, crashes, errors."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
import pytest
from gguf_factory import write_not_gguf

from engine.client import ExitInfo, LoadError, RequestFailed, Stream, Worker, WorkerCrashed
from engine.protocol import ModelOptions, SamplingParams

ROOT = Path(__file__).resolve().parent.parent
JOIN_TIMEOUT = 30
GREEDY = SamplingParams(temperature=0)
STORY = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. "


def greedy(max_tokens: int, **extra: Any) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, **extra)


def drain(stream: Stream, timeout: float = JOIN_TIMEOUT) -> str:
    """Read a stream to its end on a thread joined with a timeout; re-raise what it raised."""
    parts: list[str] = []
    failure: list[BaseException] = []

    def read() -> None:
        try:
            parts.extend(stream)
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=read)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), "the stream hung"
    if failure:
        raise failure[0]
    return "".join(parts)


@pytest.fixture
def make_worker(stories_path: Path) -> Iterator[Callable[..., Worker]]:
    """Start workers on stories260K (or no model); each is closed at teardown."""
    workers: list[Worker] = []

    def start(load: bool = True, path: Path = stories_path, **options: Any) -> Worker:
        worker = Worker(name="test", worker_timeout=options.pop("worker_timeout", 60.0),
                        on_exit=options.pop("on_exit", None))
        workers.append(worker)
        worker.start()
        if load:
            worker.load(path, ModelOptions(**{"n_ctx": 2048, "n_threads": 1, **options}))
        return worker

    yield start
    for worker in workers:
        worker.close()


def test_greedy_generation_matches_in_process_generation(make_worker: Callable[..., Worker],
                                                          stories_path: Path) -> None:
    worker = make_worker()
    prompt = worker.tokenize("Once upon a time")
    stream = worker.generate(prompt, greedy(40))
    text = drain(stream)

    llama = llama_cpp.Llama(model_path=str(stories_path), n_ctx=2048, n_threads=1, verbose=False)
    try:
        tokens = []
        for token in llama.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0):
            if token == llama.token_eos() or len(tokens) == 40:
                break
            tokens.append(token)
        expected = llama.detokenize(tokens, prev_tokens=prompt).decode("utf-8", errors="replace")
    finally:
        llama.close()
    assert text.startswith(", there was a little girl named Lily")
    assert text == expected
    assert (stream.result.prompt_tokens, stream.result.completion_tokens) == (len(prompt), 40)
    assert stream.result.finish_reason == "length"
    assert stream.result.first_token_at is not None


def test_four_concurrent_streams_match_their_solo_text_and_share_decode_steps(
        make_worker: Callable[..., Worker]) -> None:
    worker = make_worker(parallel=4)
    prompts = [worker.tokenize(t) for t in ("Once upon a time", "The dog", "Lily was", "Tom and Ben")]
    alone = [drain(worker.generate(p, greedy(48))) for p in prompts]
    before = worker.stats()

    streams = [worker.generate(p, greedy(48)) for p in prompts]  # all in flight before any is read
    together = [drain(s) for s in streams]

    after = worker.stats()
    assert together == alone
    assert after["max_sequences_in_step"] == 4
    steps = after["steps"] - before["steps"]
    # One after another would take 4 x 48 steps; batched they take about 48.
    assert steps < 2 * 48, steps
    assert after["multi_sequence_steps"] - before["multi_sequence_steps"] >= 40


def test_long_prompt_is_prefilled_in_chunks_while_another_sequence_generates(
        make_worker: Callable[..., Worker]) -> None:
    worker = make_worker(n_batch=64)
    short = worker.generate(worker.tokenize("Once upon a time"), greedy(900))
    arrivals: list[float] = []
    reader_failed: list[BaseException] = []

    def read_short() -> None:
        try:
            for _delta in short:
                arrivals.append(time.monotonic())
        except BaseException as exc:
            reader_failed.append(exc)

    reader = threading.Thread(target=read_short)
    reader.start()
    while len(arrivals) < 3 and reader.is_alive():
        time.sleep(0.001)
    long_prompt = worker.tokenize(STORY * 40)
    assert len(long_prompt) > 15 * 64
    submitted = time.monotonic()
    long = worker.generate(long_prompt, greedy(4))
    drain(long)
    reader.join(JOIN_TIMEOUT)
    assert not reader.is_alive() and not reader_failed

    assert long.result.first_token_at is not None
    during_prefill = [t for t in arrivals if submitted < t < long.result.first_token_at]
    assert len(during_prefill) >= 10, len(during_prefill)
    stats = worker.stats()
    assert stats["prefill_chunks"] >= len(long_prompt) // 64
    assert stats["mixed_steps"] >= 10


def test_cancel_stops_a_stream_and_frees_its_slot_for_the_next_request(make_worker: Callable[..., Worker]) -> None:
    worker = make_worker(parallel=1)
    first = worker.generate(worker.tokenize("Once upon a time"), greedy(None))
    waiting = worker.generate(worker.tokenize("The dog"), greedy(8))  # queued: the one slot is taken
    next(first)
    first.cancel()
    drain(first)
    assert first.result.finish_reason == "cancelled"
    assert first.result.completion_tokens < 500  # it would have run to the end of the context
    assert drain(waiting)
    assert waiting.result.finish_reason == "length"
    assert worker.stats()["active"] == 0


def test_cancel_of_a_queued_request_ends_it_without_a_slot(make_worker: Callable[..., Worker]) -> None:
    worker = make_worker(parallel=1)
    running = worker.generate(worker.tokenize("Once upon a time"), greedy(200))
    queued = worker.generate(worker.tokenize("The dog"), greedy(200))
    queued.cancel()
    assert drain(queued) == ""
    assert queued.result.finish_reason == "cancelled"
    assert drain(running)
    assert running.result.finish_reason == "length"


def test_a_prompt_sharing_a_prefix_reports_cached_tokens(make_worker: Callable[..., Worker]) -> None:
    worker = make_worker()
    prefix = worker.tokenize(STORY)
    first = worker.generate(prefix, greedy(8))
    drain(first)
    assert first.result.cached_tokens == 0
    second = worker.generate(prefix + worker.tokenize("One day", add_special=False), greedy(8))
    text = drain(second)
    assert second.result.cached_tokens >= len(prefix)

    fresh = make_worker()
    assert drain(fresh.generate(prefix + worker.tokenize("One day", add_special=False), greedy(8))) == text


def test_alternating_conversations_restore_the_first_from_the_ram_cache(make_worker: Callable[..., Worker]) -> None:
    worker = make_worker(parallel=1)
    a_prompt = worker.tokenize(STORY)
    a_text = drain(worker.generate(a_prompt, greedy(16)))
    drain(worker.generate(worker.tokenize("Tom and Ben went to the zoo. They saw a big lion."), greedy(16)))
    a_again = worker.tokenize(STORY + a_text + " The end.")

    third = worker.generate(a_again, greedy(16))
    text = drain(third)

    stats = worker.stats()
    assert stats["cache_saves"] >= 1 and stats["cache_restores"] == 1
    assert third.result.cached_tokens >= len(a_prompt)
    assert drain(make_worker().generate(a_again, greedy(16))) == text  # the restored state is the real one


def test_sequences_that_overflow_the_kv_cache_together_are_preempted_not_garbled(
        make_worker: Callable[..., Worker]) -> None:
    worker = make_worker(n_ctx=256, parallel=2)
    prompts = [worker.tokenize(STORY * 4), worker.tokenize("Tom and Ben went to the zoo. " * 6)]
    alone = [drain(worker.generate(p, greedy(100))) for p in prompts]
    assert sum(len(p) + 100 for p in prompts) > 256

    streams = [worker.generate(p, greedy(100)) for p in prompts]
    together = [drain(s) for s in streams]

    assert together == alone
    assert worker.stats()["preemptions"] >= 1


def test_a_small_cache_under_pressure_does_not_thrash(make_worker: Callable[..., Worker]) -> None:
    """Ten long generations on four slots of a 128-cell cache: a preempted sequence waits for
    another to finish instead of being readmitted (and preempted again) at every step."""
    worker = make_worker(n_ctx=128, parallel=4)
    prompts = [worker.tokenize(f"{name} went to the park.") for name in
               ("Lily", "Tom", "Ben", "Sue", "Max", "Amy", "Sam", "Tim", "Ann", "Bob")]
    alone = [drain(worker.generate(p, greedy(110, ignore_eos=True))) for p in prompts]
    before = worker.stats()
    streams = [worker.generate(p, greedy(110, ignore_eos=True)) for p in prompts]
    assert [drain(s) for s in streams] == alone
    after = worker.stats()
    decoded = after["decoded_tokens"] - before["decoded_tokens"]
    solo = sum(len(p) + 110 for p in prompts)
    # At most parallel - 1 preemptions per finished sequence (before the hold: 641 and 7x the reading).
    assert after["preemptions"] - before["preemptions"] <= 3 * len(prompts), after
    assert decoded < 3 * solo, (decoded, solo)  # re-reading preempted sequences stays bounded


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSEGV])
def test_a_worker_killed_mid_stream_fails_its_streams_promptly(make_worker: Callable[..., Worker],
                                                               sig: signal.Signals) -> None:
    exits: list[ExitInfo] = []
    worker = make_worker(parallel=1, on_exit=exits.append)
    running = worker.generate(worker.tokenize("Once upon a time"), greedy(None))
    queued = worker.generate(worker.tokenize("The dog"), greedy(None))
    next(running)
    assert worker.pid is not None
    os.kill(worker.pid, sig)
    started = time.monotonic()
    for stream in (running, queued):
        with pytest.raises(WorkerCrashed, match=sig.name):
            drain(stream, timeout=10)
    assert time.monotonic() - started < 5
    assert [(e.signal, e.expected) for e in exits] == [(sig.name, False)]
    with pytest.raises(WorkerCrashed):
        worker.generate([1, 2, 3], GREEDY)


def test_a_silent_worker_is_killed_after_worker_timeout(make_worker: Callable[..., Worker]) -> None:
    exits: list[ExitInfo] = []
    worker = make_worker(worker_timeout=1.0, on_exit=exits.append)
    assert worker.pid is not None
    os.kill(worker.pid, signal.SIGSTOP)  # wedged: alive, silent
    stream = worker.generate([1, 403], greedy(8))
    with pytest.raises(WorkerCrashed, match="did not answer"):
        drain(stream, timeout=10)
    assert exits and exits[0].signal == "SIGKILL"


def test_a_prompt_longer_than_the_context_gets_a_clear_error(make_worker: Callable[..., Worker]) -> None:
    worker = make_worker(n_ctx=256)
    prompt = worker.tokenize(STORY * 20)
    with pytest.raises(RequestFailed) as failure:
        drain(worker.generate(prompt, GREEDY))
    assert failure.value.kind == "invalid_request"
    assert failure.value.code == "context_length_exceeded"
    assert "256" in failure.value.message
    assert drain(worker.generate(worker.tokenize("Once upon a time"), greedy(4)))


def test_a_bad_grammar_is_an_invalid_request_and_the_worker_keeps_serving(
        make_worker: Callable[..., Worker]) -> None:
    worker = make_worker()
    prompt = worker.tokenize("Once upon a time")
    with pytest.raises(RequestFailed) as failure:
        drain(worker.generate(prompt, greedy(8, grammar="root ::= undefined-rule")))
    assert (failure.value.kind, failure.value.param) == ("invalid_request", "grammar")
    assert drain(worker.generate(prompt, greedy(8, grammar='root ::= " yes" | " no"'))) in {" yes", " no"}
    assert drain(worker.generate(prompt, greedy(8))).startswith(", there was")


def test_stop_strings_are_held_back_and_cut(make_worker: Callable[..., Worker]) -> None:
    worker = make_worker()
    stream = worker.generate(worker.tokenize("Once upon a time"), greedy(40, stop=["Zebra", "Lily", "girl named"]))
    assert drain(stream) == ", there was a little "
    assert stream.result.finish_reason == "stop"
    assert stream.result.stop == "girl named"  # the one that came first in the text, whatever the list's order


def test_a_warm_spare_waits_for_its_load(make_worker: Callable[..., Worker], stories_path: Path) -> None:
    worker = make_worker(load=False)
    assert worker.alive and worker.pid is not None
    with pytest.raises(RequestFailed, match="no model"):
        worker.tokenize("hello")
    progress: list[float] = []
    info = worker.load(stories_path, ModelOptions(n_ctx=1024, n_threads=1), on_progress=progress.append)
    assert (info.n_ctx, info.n_vocab, info.bos_text, info.eos_text) == (1024, 512, "<s>", "</s>")
    assert progress and progress[-1] == 1.0
    assert drain(worker.generate(worker.tokenize("Once upon a time"), greedy(8))).startswith(", there was")


def test_a_failed_load_raises_llama_cpp_reason(make_worker: Callable[..., Worker], tmp_path: Path) -> None:
    exits: list[ExitInfo] = []
    worker = make_worker(load=False, on_exit=exits.append)
    path = tmp_path / "broken.gguf"
    write_not_gguf(path)
    with pytest.raises(LoadError, match=r"(?i)gguf|magic|failed"):
        worker.load(path, ModelOptions(n_ctx=512, n_threads=1))
    deadline = time.monotonic() + 10
    while not exits and time.monotonic() < deadline:
        time.sleep(0.02)
    assert exits and exits[0].expected  # a worker whose load failed exits, and that is no crash


def test_embeddings_match_in_process_mean_pooling(make_worker: Callable[..., Worker], stories_path: Path) -> None:
    worker = make_worker(embedding=True, n_ctx=512)
    inputs = [worker.tokenize("Once upon a time"), worker.tokenize("The dog ran")]
    vectors = worker.embed(inputs)

    llama = llama_cpp.Llama(model_path=str(stories_path), n_ctx=512, n_threads=1, embedding=True, verbose=False)
    try:
        expected = [np.asarray(llama.embed(llama.detokenize(t).decode(), normalize=False)).mean(axis=0)
                    for t in inputs]
    finally:
        llama.close()
    assert [v.shape for v in vectors] == [(64,), (64,)]
    for got, want in zip(vectors, expected, strict=True):
        # The worker lets llama.cpp use flash attention (in-process Llama() cannot ask for
        # "auto"): the same vector up to float rounding.
        cosine = float(np.dot(got, want) / (np.linalg.norm(got) * np.linalg.norm(want)))
        assert cosine > 0.99999, cosine
        np.testing.assert_allclose(got, want, atol=5e-3)
    with pytest.raises(RequestFailed, match="embeddings"):
        drain(worker.generate(inputs[0], GREEDY))


def test_embedding_inputs_decoded_together_match_each_alone(make_worker: Callable[..., Worker]) -> None:
    worker = make_worker(embedding=True, n_ctx=512)
    texts = [("Once upon a time " * (i % 7 + 1)).strip() for i in range(20)]  # two groups of up to 16
    inputs = [worker.tokenize(text) for text in texts]
    together = worker.embed(inputs)
    alone = [worker.embed([tokens])[0] for tokens in inputs]
    for got, want in zip(together, alone, strict=True):  # equal up to flash attention's rounding
        cosine = float(np.dot(got, want) / (np.linalg.norm(got) * np.linalg.norm(want)))
        assert cosine > 0.99999, cosine
        np.testing.assert_allclose(got, want, atol=5e-3)


ORPHAN_SCRIPT = """
import os, signal, sys
sys.path.insert(0, {root!r})
from engine.client import Worker
from engine.protocol import ModelOptions, SamplingParams
worker = Worker(name="orphan")
worker.start()
worker.load({model!r}, ModelOptions(n_ctx=2048, n_threads=1))
if {generating!r}:
    stream = worker.generate(worker.tokenize("Once upon a time"), SamplingParams(temperature=0))
    next(stream)
print(worker.pid, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.parametrize("generating", [False, True], ids=["idle", "generating"])
def test_a_worker_whose_parent_dies_exits(stories_path: Path, generating: bool) -> None:
    script = ORPHAN_SCRIPT.format(root=str(ROOT), model=str(stories_path), generating=generating)
    parent = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert parent.returncode == -signal.SIGKILL, parent.stderr
    pid = int(parent.stdout.split()[0])
    deadline = time.monotonic() + 10
    while _running(pid):
        assert time.monotonic() < deadline, f"orphaned worker {pid} is still running"
        time.sleep(0.05)


def _running(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


def arrive_together(worker: Worker, prompt: list[int], params: SamplingParams, n: int) -> list[Stream]:
    """``n`` generations of ``prompt`` that reach the scheduler in one step, however loaded the
    machine: a short request holds the worker in a slow step while they are sent."""
    worker.tune(step_delay=0.3)
    blocker = worker.generate(worker.tokenize("The dog"), greedy(2))
    assert blocker.wait_started(JOIN_TIMEOUT)
    streams = [worker.generate(prompt, params) for _ in range(n)]
    worker.tune()
    drain(blocker)
    return streams


def test_identical_prompts_in_flight_together_are_prefilled_once(make_worker: Callable[..., Worker]) -> None:
    worker = make_worker(parallel=4)
    prompt = worker.tokenize(STORY * 3)
    alone = drain(worker.generate(prompt, greedy(24)))
    worker.generate(worker.tokenize("The dog"), greedy(1)).cancel()  # the slot's conversation changes
    before = worker.stats()

    streams = arrive_together(worker, prompt, greedy(24), 3)  # n=3, as the server sends it
    texts = [drain(s) for s in streams]

    after = worker.stats()
    assert texts == [alone] * 3
    assert after["shared_prompts"] - before["shared_prompts"] == 2
    # The prompt was decoded once, then 24 tokens per choice (less what the prefix cache kept).
    decoded = after["decoded_tokens"] - before["decoded_tokens"]
    assert decoded <= len(prompt) + 3 * 24, decoded
    assert [s.result.cached_tokens for s in streams[1:]] == [len(prompt)] * 2


def test_followers_prefill_for_themselves_when_their_leader_is_cancelled(make_worker: Callable[..., Worker]) -> None:
    worker = make_worker(parallel=3, n_batch=32)
    worker.tune(step_delay=0.2)  # the leader's prompt takes several steps: time to cancel it
    prompt = worker.tokenize(STORY * 8)
    leader, follower = worker.generate(prompt, greedy(8)), worker.generate(prompt, greedy(8))
    assert leader.wait_started(JOIN_TIMEOUT) and follower.wait_started(JOIN_TIMEOUT)
    leader.cancel()
    worker.tune()
    assert drain(leader) == "" and leader.result.finish_reason == "cancelled"
    assert drain(follower) == drain(worker.generate(prompt, greedy(8)))
    assert follower.result.completion_tokens == 8


def test_logprobs_are_the_models_distribution_and_greedy_picks_the_top(make_worker: Callable[..., Worker]) -> None:
    worker = make_worker()
    prompt = worker.tokenize("Once upon a time")
    stream = worker.generate(prompt, greedy(12, logprobs=3))
    text = drain(stream)
    entries = stream.logprobs
    assert len(entries) == stream.result.completion_tokens == 12
    assert b"".join(e.token for e in entries).decode() == text
    for entry in entries:
        assert len(entry.top) == 3
        assert [lp for _, lp in entry.top] == sorted((lp for _, lp in entry.top), reverse=True)
        assert entry.top[0] == (entry.token, entry.logprob)  # greedy takes the most likely token
        assert entry.logprob <= 0
        assert sum(np.exp(lp) for _, lp in entry.top) <= 1 + 1e-4
    plain = worker.generate(prompt, greedy(12))
    assert drain(plain) == text and plain.logprobs == []


def test_the_prompt_cache_hands_a_restored_entrys_buffer_to_the_next_save() -> None:
    from engine.scheduler import PromptCache

    cache = PromptCache(max_bytes=100)
    first = bytearray(40)
    assert cache.put([1, 2, 3], memoryview(first)[:30])
    assert cache.bytes == 40  # the buffer's real size counts, not the bytes written
    key, length = cache.best([1, 2, 3, 4])
    assert (key, length) == (0, 3)
    cache.recycle(cache.pop(key).data)
    assert cache.bytes == 0
    assert cache.take_spare() is first and cache.take_spare() is None
    assert not cache.put([5], memoryview(bytearray(101)))  # alone over the budget: not kept
    cache.recycle(memoryview(bytearray(101)))
    assert cache.take_spare() is None  # nor kept as the spare


def test_choices_sharing_a_prompt_count_its_cells_once(make_worker: Callable[..., Worker]) -> None:
    """Three choices of a 200-token prompt need 200 + 3 x 20 cells, which fit 512: no preemption."""
    worker = make_worker(parallel=4, n_ctx=512)
    prompt = worker.tokenize(STORY * 9)[:200]
    streams = arrive_together(worker, prompt, greedy(20), 3)
    texts = [drain(s) for s in streams]
    stats = worker.stats()
    assert stats["shared_prompts"] == 2
    assert stats["preemptions"] == 0, stats
    assert len(set(texts)) == 1


class LogSpy:
    """The server's ``llama_cpp.native`` logger, recording the level of every line a worker sends."""

    def __init__(self, logger: logging.Logger) -> None:
        self.logger = logger
        self.levels: list[int] = []

    def getEffectiveLevel(self) -> int:
        return self.logger.getEffectiveLevel()

    def log(self, level: int, message: str, *args: Any) -> None:
        self.levels.append(level)
        self.logger.log(level, message, *args)


@pytest.mark.parametrize("level", [logging.DEBUG, logging.INFO])
def test_native_log_lines_cross_the_pipe_only_down_to_the_servers_level(
        make_worker: Callable[..., Worker], caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
        level: int) -> None:
    """llama.cpp's lines arrive with the worker's pid; those below the level the server writes
    stay in the worker: a load logs thousands at debug level (llama.cpp's info included), and
    sending them only to be dropped made a cold start about 50 ms slower."""
    import engine.client

    spy = LogSpy(engine.client.native_log)
    monkeypatch.setattr(engine.client, "native_log", spy)
    caplog.set_level(level, logger="llama_cpp.native")
    worker = make_worker()
    lines = [r.getMessage() for r in caplog.records if r.name == "llama_cpp.native"]
    assert any(line.startswith(f"[worker {worker.pid}] load: bad special token") for line in lines)  # a warning
    debug = [lvl for lvl in spy.levels if lvl < logging.INFO]
    if level == logging.DEBUG:
        assert len(debug) > 100 and any("model buffer size" in line for line in lines)
    else:
        assert not debug and spy.levels


def test_generate_many_answers_each_choice_under_its_own_id(make_worker: Callable[..., Worker]) -> None:
    """One message for a request's choices; a choice the worker refuses fails alone."""
    worker = make_worker()
    prompt = worker.tokenize("Once upon a time")
    alone = drain(worker.generate(prompt, greedy(12)))
    streams = worker.generate_many(prompt, [greedy(12), greedy(12, grammar="root ::= ("), greedy(12)])
    assert drain(streams[0]) == alone and drain(streams[2]) == alone
    with pytest.raises(RequestFailed) as refused:
        drain(streams[1])
    assert refused.value.kind == "invalid_request" and "grammar" in str(refused.value)
