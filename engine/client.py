"""The server's side of a worker process: start it, load a model, stream generations, notice its death.

Concurrency model:

* Any thread may call ``load``, ``generate``, ``embed``, ``tokenize``, ``stats`` and ``close``.
  Sends are serialised by ``_send_lock`` (a ``Connection`` must not be written by two threads
  at once); it is held only for one ``send``.
* One reader thread per worker receives every message and routes it by request id to the
  ``queue.SimpleQueue`` of the request waiting for it. ``_lock`` guards the routing table
  (``_waiters``), the id counter, ``_dead`` and ``_last_heard``; it is never held while
  sending, waiting or calling back.
* Callbacks run on the reader thread: ``on_progress`` (from ``load``) and ``on_exit``. They must
  be quick and must not call back into this ``Worker`` and wait for an answer (that answer could
  only be delivered by the thread they are blocking).
* Death: when the pipe reaches EOF (the worker exited: segfault, abort, kill -9, or a normal
  exit) the reader reaps the process, puts a ``WorkerCrashed`` (``WorkerClosed`` after
  ``close``) into every waiting queue, so every blocked caller raises promptly, after firing
  ``on_exit`` once (so the owner has marked the instance gone before any caller can retry).
  While requests are outstanding, a worker silent for ``worker_timeout`` seconds is killed,
  and the same follows. The worker sends a ``Heartbeat`` between decode
  steps when it has been quiet for a second, so only a wedged worker is ever that silent.
* Load has no timeout of its own by default (a big model from a slow disk takes what it takes;
  llama.cpp's progress arrives meanwhile); pass ``timeout`` to bound it. A load over RPC is
  held to ``worker_timeout`` of silence like a request: ggml's client waits on an RPC server
  without a timeout, so one that stops answering (or serves another model) would hang it.
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import IO, Any

import numpy as np

from engine import protocol as p

log = logging.getLogger(__name__)
native_log = logging.getLogger("llama_cpp.native")

ROOT = Path(__file__).resolve().parent.parent
READ_POLL_SECONDS = 0.5
STDERR_TAIL_BYTES = 2000


class WorkerError(Exception):
    """Base of everything a worker reports."""


class WorkerCrashed(WorkerError):
    """The worker process died (or was killed for not answering) with this request outstanding."""


class WorkerClosed(WorkerCrashed):
    """The worker was closed on purpose with this request outstanding."""


class LoadError(WorkerError):
    """llama.cpp could not load the model; the message carries its reason."""


class RequestFailed(WorkerError):
    """The worker refused or failed one request and carries on serving.

    ``kind`` is ``invalid_request`` (a 400: ``param`` and ``code`` say which and why, e.g.
    ``context_length_exceeded``) or ``internal`` (a 500).
    """

    def __init__(self, kind: str, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.param = param
        self.code = code


@dataclass(frozen=True)
class ExitInfo:
    """How a worker process ended."""

    pid: int
    returncode: int | None
    signal: str | None  # e.g. "SIGSEGV" when a signal ended it
    expected: bool  # True after close()
    reason: str  # one line, for logs and errors
    output: str = ""  # the end of the worker's stderr (an assertion, a traceback): for the log only


@dataclass
class StreamResult:
    """Filled in as the stream runs; complete once the iterator is exhausted."""

    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None
    stop: str | None = None  # the stop string that ended it, if one did
    first_token_at: float | None = None  # time.monotonic() (system-wide on Linux) of the first token


class Stream:
    """An iterator of text deltas for one generation; ``result`` fills in as it runs.

    ``cancel()`` stops the generation in the worker within a step; iteration then ends (with
    ``finish_reason="cancelled"``). Call it when the consumer goes away early.
    """

    def __init__(self, worker: Worker, request_id: int, inbox: queue.SimpleQueue[Any],
                 params: p.SamplingParams | None = None) -> None:
        self._worker = worker
        self.id = request_id
        self.params = params or p.SamplingParams()
        self._inbox = inbox
        self.result = StreamResult()
        self.finished = False
        self.logprobs: list[p.TokenLogprob] = []  # every token's, when the request asked for them
        self._logprobs_taken = 0

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        text = self.poll(None)
        assert text is not None
        return text

    def poll(self, timeout: float | None) -> str | None:
        """The next text delta, or None when none came within ``timeout`` s (None: wait for
        ever); ``StopIteration`` once the generation is over. With log probabilities asked
        for, a delta may be empty text: its tokens' entries are in ``logprobs``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.finished:
            message = self._next(deadline)
            if message is None:
                return None
            if isinstance(message, p.Delta):
                self.logprobs.extend(message.logprobs)
                return message.text
            self._absorb(message)
        raise StopIteration

    def take_logprobs(self) -> list[p.TokenLogprob]:
        """The log probability entries that arrived since the last call."""
        new = self.logprobs[self._logprobs_taken:]
        self._logprobs_taken = len(self.logprobs)
        return new

    def _next(self, deadline: float | None) -> Any:
        """The next message for this request, or None once ``deadline`` (monotonic) passed."""
        try:
            return self._inbox.get(timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            return None

    def _absorb(self, message: Any) -> None:
        if isinstance(message, p.Started):
            self.result.prompt_tokens = message.prompt_tokens
            self.result.cached_tokens = message.cached_tokens
            return
        self.finished = True
        if isinstance(message, p.Done):
            self.result.completion_tokens = message.completion_tokens
            self.result.finish_reason = message.finish_reason
            self.result.stop = message.stop
            self.result.first_token_at = message.first_token_at
        elif isinstance(message, p.Error):
            raise RequestFailed(message.kind, message.message, message.param, message.code)
        elif isinstance(message, BaseException):
            raise message

    @property
    def started(self) -> bool:
        """Whether the request has had a slot (or is already over)."""
        return self.finished or bool(self.result.prompt_tokens)

    def wait_started(self, timeout: float | None = None) -> bool:
        """Wait up to ``timeout`` s (None: for ever) until the request has a slot
        (``prompt_tokens``/``cached_tokens`` known) or is over; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.started:
            message = self._next(deadline)
            if message is None:
                return False
            if isinstance(message, p.Delta):
                raise RuntimeError("wait_started must be called before iterating")
            self._absorb(message)
        return True

    def cancel(self) -> None:
        """Stop the generation (idempotent; a no-op once it finished)."""
        if not self.finished:
            self._worker._send_quietly(p.Cancel(self.id))


class Worker:
    """One worker process: start it (a warm spare), load one model into it, then serve requests."""

    def __init__(self, *, name: str = "engine", worker_timeout: float = 60.0,
                 on_exit: Callable[[ExitInfo], None] | None = None) -> None:
        self.name = name
        self.worker_timeout = worker_timeout
        self.on_exit = on_exit
        self.info: p.ModelInfo | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._conn: Connection | None = None
        self._stderr: IO[bytes] | None = None
        self._reader: threading.Thread | None = None
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._waiters: dict[int, queue.SimpleQueue[Any]] = {}
        self._progress: dict[int, Callable[[float], None]] = {}
        self._rpc_loads: set[int] = set()  # loads that must not be quiet for long (see above)
        self._ids = itertools.count(1)
        self._dead: WorkerCrashed | None = None
        self._closing = False
        self._killed_for_silence = False
        self._last_heard = time.monotonic()
        self._ready = threading.Event()
        self.exit_info: ExitInfo | None = None

    # ---- lifecycle ----

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def alive(self) -> bool:
        with self._lock:
            return self._proc is not None and self._dead is None

    @property
    def busy(self) -> bool:
        """Whether any request (a load, a generation, a call) is waiting on this worker."""
        with self._lock:
            return bool(self._waiters)

    def start(self, timeout: float = 60.0) -> None:
        """Start the process and wait until it is ready for ``load`` (interpreter up, llama_cpp imported)."""
        ours, theirs = socket.socketpair()
        self._stderr = tempfile.TemporaryFile(prefix="engine-worker-")  # noqa: SIM115 - closed in _died
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        # numpy's OpenBLAS starts a thread per core at import, and they spin for a while: about
        # 150 ms of CPU per worker start, taken from the models generating beside it on a small
        # box. The worker does no BLAS work that threads would speed up (llama.cpp has its own).
        env.setdefault("OPENBLAS_NUM_THREADS", "1")
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "engine.worker", str(theirs.fileno())], pass_fds=(theirs.fileno(),),
            stdin=subprocess.DEVNULL, stdout=self._stderr, stderr=self._stderr, env=env)
        theirs.close()  # only the child holds that end now, so its death is our EOF
        self._conn = Connection(ours.detach())
        self._reader = threading.Thread(target=self._read_loop, name=f"{self.name}-reader", daemon=True)
        self._reader.start()
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.05):
            self._raise_if_dead()
            if time.monotonic() > deadline:
                self._kill()
                raise WorkerCrashed(f"worker {self.pid} did not start within {timeout:.0f} s")
        log.info("worker started name=%s pid=%s", self.name, self.pid)

    def load(self, path: str | Path, options: p.ModelOptions,
             on_progress: Callable[[float], None] | None = None, timeout: float | None = None) -> p.ModelInfo:
        """Load the model; return its info, or raise ``LoadError`` with llama.cpp's reason."""
        request_id, inbox = self._open()
        with self._lock:  # also marks the request as a load, which may be quiet for long
            self._progress[request_id] = on_progress or (lambda _fraction: None)
            if options.rpc_servers:
                self._rpc_loads.add(request_id)
        try:
            self._send(p.Load(request_id, str(path), options, native_log.getEffectiveLevel()), request_id)
            answer = self._wait(inbox, timeout, f"loading {path}")
        finally:
            with self._lock:
                self._rpc_loads.discard(request_id)
        if isinstance(answer, p.LoadFailed):
            with self._lock:
                self._closing = True  # the worker exits after a failed load: expected, not a crash
            raise LoadError(answer.reason)
        self.info = answer.info
        log.info("worker loaded name=%s pid=%s path=%s n_ctx=%d parallel=%d", self.name, self.pid, path,
                 answer.info.n_ctx, answer.info.parallel)
        return answer.info

    def close(self, timeout: float = 5.0) -> None:
        """Ask the worker to exit; kill it after ``timeout`` s. Outstanding requests raise ``WorkerClosed``."""
        with self._lock:
            self._closing = True
        if self._proc is None:
            return
        self._send_quietly(p.Shutdown())
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("worker %s did not exit within %.0f s; killing it", self.pid, timeout)
            self._kill()
        if self._reader is not None:
            self._reader.join(timeout + 5)

    # ---- requests ----

    def generate(self, prompt_tokens: list[int], params: p.SamplingParams,
                 media: tuple[p.MediaInput, ...] = ()) -> Stream:
        """Start a generation; iterate the returned ``Stream`` for its text deltas. ``media``
        go into the prompt at their ``at`` (the model must have a projector)."""
        request_id, inbox = self._open()
        self._send(p.Generate(request_id, list(prompt_tokens), params, media), request_id)
        return Stream(self, request_id, inbox, params)

    def generate_many(self, prompt_tokens: list[int], params: list[p.SamplingParams],
                      media: tuple[p.MediaInput, ...] = ()) -> list[Stream]:
        """``generate`` for each of ``params`` on one prompt (a request's choices), in one
        message: the prompt and its pictures are sent once."""
        if len(params) == 1:
            return [self.generate(prompt_tokens, params[0], media)]
        opened = [self._open() for _ in params]
        ids = tuple(request_id for request_id, _inbox in opened)
        self._send(p.GenerateMany(ids, list(prompt_tokens), tuple(params), media), *ids)
        return [Stream(self, request_id, inbox, choice)
                for (request_id, inbox), choice in zip(opened, params, strict=True)]

    def embed(self, inputs: list[list[int]]) -> list[np.ndarray]:
        """One pooled, unnormalised float32 vector per token list (an embedding worker only)."""
        return self._call(lambda i: p.Embed(i, [list(t) for t in inputs]), "embedding")

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        return self._call(lambda i: p.Tokenize(i, text, add_special, parse_special), "tokenizing")

    def detokenize(self, tokens: list[int]) -> str:
        """The text of ``tokens`` (control tokens as their text); ``RequestFailed`` for ids outside the vocabulary."""
        return self._call(lambda i: p.Detokenize(i, list(tokens)), "detokenizing")

    def token_pieces(self, tokens: list[int]) -> list[bytes]:
        """The bytes of each of ``tokens`` (a piece may be part of a UTF-8 character)."""
        return self._call(lambda i: p.Detokenize(i, list(tokens), per_token=True), "detokenizing")

    def tune(self, step_delay: float = 0.0, fail_after_steps: int | None = None) -> None:
        """Test seam: see ``protocol.Tune``."""
        self._send_quietly(p.Tune(step_delay, fail_after_steps))

    def media_cells(self, media: tuple[p.MediaInput, ...]) -> list[int]:
        """The prompt cells each of ``media`` takes in this model (``RequestFailed`` naming a bad one)."""
        return self._call(lambda i: p.MediaCells(i, tuple(media)), "counting media")

    def stats(self) -> dict[str, int]:
        """The scheduler's counters (steps, batched steps, preemptions, prompt cache use, ...)."""
        return self._call(p.GetStats, "stats")

    def _call(self, build: Callable[[int], Any], what: str) -> Any:
        request_id, inbox = self._open()
        self._send(build(request_id), request_id)
        answer = self._wait(inbox, None, what)
        if isinstance(answer, p.Error):
            raise RequestFailed(answer.kind, answer.message, answer.param, answer.code)
        return answer.value

    # ---- plumbing ----

    def _open(self) -> tuple[int, queue.SimpleQueue[Any]]:
        # SimpleQueue, not Queue: a put and a get happen per token, and Queue's are Python
        # code around a Condition, several lock operations each.
        inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        with self._lock:
            if self._dead is not None:
                raise self._dead
            if self._proc is None:
                raise WorkerError("the worker was not started")
            request_id = next(self._ids)
            if not self._waiters:
                self._last_heard = time.monotonic()  # the silence clock starts with the first request
            self._waiters[request_id] = inbox
        return request_id, inbox

    def _send(self, message: Any, *request_ids: int) -> None:
        try:
            with self._send_lock:
                assert self._conn is not None
                self._conn.send(message)
        except OSError:
            # The worker is gone; the reader is about to notice. Raise what it will report.
            with self._lock:
                for request_id in request_ids:
                    self._waiters.pop(request_id, None)
            self._reader_join_briefly()
            self._raise_if_dead()
            raise WorkerCrashed(f"worker {self.pid} is gone") from None

    def _send_quietly(self, message: Any) -> None:
        try:
            with self._send_lock:
                if self._conn is not None:
                    self._conn.send(message)
        except OSError:
            pass  # a dead worker needs no cancel or shutdown

    def _wait(self, inbox: queue.SimpleQueue[Any], timeout: float | None, what: str) -> Any:
        try:
            answer = inbox.get(timeout=timeout)
        except queue.Empty:
            self._kill()
            raise WorkerCrashed(f"worker {self.pid} took more than {timeout:.0f} s {what}; killed") from None
        if isinstance(answer, BaseException):
            raise answer
        return answer

    def _raise_if_dead(self) -> None:
        with self._lock:
            if self._dead is not None:
                raise self._dead

    def _reader_join_briefly(self) -> None:
        if self._reader is not None and self._reader is not threading.current_thread():
            self._reader.join(2)

    def _kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()

    # ---- the reader thread ----

    def _read_loop(self) -> None:
        conn = self._conn
        assert conn is not None
        # One poll object for the worker's life: Connection.poll builds and tears down a
        # selector on every call, which is per token here.
        ready = select.poll()
        ready.register(conn.fileno(), select.POLLIN)
        try:
            while True:
                if not ready.poll(READ_POLL_SECONDS * 1000):
                    self._check_silence()
                    continue
                message = conn.recv()
                with self._lock:
                    self._last_heard = time.monotonic()
                self._route(message)
        except (EOFError, OSError):
            pass
        except Exception:
            log.exception("worker %s reader failed; killing the worker", self.pid)
            self._kill()
        finally:
            self._died()

    def _check_silence(self) -> None:
        with self._lock:
            silent = time.monotonic() - self._last_heard
            # A local load may be quiet for long; one over RPC may not.
            waiting = any(i not in self._progress or i in self._rpc_loads for i in self._waiters)
        if waiting and silent > self.worker_timeout:
            log.error("worker %s silent for %.0f s with requests outstanding; killing it", self.pid, silent)
            self._killed_for_silence = True
            self._kill()

    def _route(self, message: Any) -> None:
        if isinstance(message, p.Bundle):
            for item in message.messages:
                self._route(item)
            return
        if isinstance(message, p.Log):
            native_log.log(message.level, "[worker %s] %s", self.pid, message.text)
            return
        if isinstance(message, p.Ready):
            self._ready.set()
            return
        if isinstance(message, p.Heartbeat):
            return
        if isinstance(message, p.Progress):
            with self._lock:
                callback = self._progress.get(message.id)
            if callback is not None:
                try:
                    callback(message.fraction)
                except Exception:
                    log.exception("load progress callback failed")
            return
        terminal = isinstance(message, (p.Done, p.Error, p.Reply, p.Loaded, p.LoadFailed))
        with self._lock:
            inbox = self._waiters.pop(message.id, None) if terminal else self._waiters.get(message.id)
            if terminal:
                self._progress.pop(message.id, None)
        if inbox is not None:
            inbox.put(message)

    def _died(self) -> None:
        """The pipe closed: reap the process, fail every waiter, tell ``on_exit``."""
        proc = self._proc
        assert proc is not None
        try:
            returncode = proc.wait(5)
        except subprocess.TimeoutExpired:  # the pipe closed but the process lingers: finish it
            proc.kill()
            returncode = proc.wait()
        info = self._exit_info(returncode)
        with self._lock:
            expected = self._closing
            error: WorkerCrashed = WorkerClosed(info.reason) if expected else WorkerCrashed(info.reason)
            self._dead = error
            waiters, self._waiters = self._waiters, {}
            self._progress.clear()
        self.exit_info = info
        if self._stderr is not None:
            self._stderr.close()
        if self._conn is not None:
            self._conn.close()
        (log.info if expected else log.error)("worker exited name=%s %s%s", self.name, info.reason,
                                              f"; its last output: {info.output}" if info.output else "")
        # The owner hears first, so a caller woken below that retries finds the instance already gone.
        if self.on_exit is not None:
            try:
                self.on_exit(info)
            except Exception:
                log.exception("on_exit callback failed")
        for inbox in waiters.values():
            inbox.put(error)

    def _exit_info(self, returncode: int) -> ExitInfo:
        with self._lock:
            expected = self._closing
        name = None
        if returncode < 0:
            try:
                name = signal.Signals(-returncode).name
            except ValueError:
                name = f"signal {-returncode}"
        if self._killed_for_silence:
            how = f"did not answer for {self.worker_timeout:.0f} s and was killed"
        elif name is not None:
            how = f"was killed by {name}"
        else:
            how = f"exited with code {returncode}"
        reason = f"worker {self.pid} ({self.name}) {how}"
        tail = self._stderr_tail() if not expected else ""
        return ExitInfo(self.pid or 0, returncode, name, expected, reason, tail)

    def _stderr_tail(self) -> str:
        if self._stderr is None:
            return ""
        try:
            self._stderr.seek(0, os.SEEK_END)
            size = self._stderr.tell()
            self._stderr.seek(max(0, size - STDERR_TAIL_BYTES))
            text = self._stderr.read().decode("utf-8", errors="replace")
        except (OSError, ValueError):
            return ""
        lines = [line for line in text.splitlines() if line.strip()]
        return " | ".join(lines[-3:])
