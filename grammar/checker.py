"""The grammar check: GBNF syntax in Python, then llama.cpp's own compile in a helper process.

Concurrency model. ``GrammarChecker.check`` is called from request threads (waitress
workers, the stream-load pool) and may block:

* ``_verdicts_lock`` guards the verdict cache (an LRU keyed by the grammar's SHA-256 and
  the model file's path, size and mtime); held for dictionary operations only. A cached
  verdict, good or bad, costs one lookup and never touches the helper.
* ``_lock`` guards the helper process: its handle, its pipes and the set of vocabularies
  it has loaded. A thread holds it for one request/reply exchange, which is bounded:
  ``timeout`` seconds for a compile, ``start_timeout`` for starting the helper or
  loading a vocabulary. When a compile overruns, the holder kills the helper (and reaps
  it) before releasing the lock, so a stuck llama.cpp never outlives its exchange; the
  next exchange starts a fresh helper. Waiting for ``_lock`` is itself bounded by
  ``queue_timeout``; past it the request gets 429 ``queue_full``.
* Nothing else blocks: the model's generation lock is never held here (the check runs
  before a model is leased), so a slow grammar delays only the requests that wait for
  the helper, never generation.

The helper is a ``python -m grammar.helper`` child (not ``fork``: this process is
multi-threaded) started on the first grammar that needs it. Its stdout carries only the
protocol (see ``grammar.helper``); its stderr is ours.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from errors import InvalidRequest, QueueFull, ServiceError, ShuttingDown
from grammar import gbnf
from grammar.helper import write_message

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 5.0  # seconds llama.cpp may spend compiling one grammar
PACKAGE_ROOT = Path(__file__).resolve().parent.parent  # the folder holding the grammar package


class CheckerUnavailable(ServiceError):
    status = 503
    type = "server_error"
    code = "grammar_checker_unavailable"


@dataclass
class CheckerStats:
    """Counters, for logs and tests."""

    checks: int = 0
    cache_hits: int = 0
    helper_starts: int = 0
    timeouts: int = 0
    crashes: int = 0


class _Unchecked:
    """The helper could not judge (the vocabulary would not load): no verdict to cache."""


_UNCHECKED = _Unchecked()
_TIMED_OUT = "timed out"
Verdict = str | None  # None: usable; a string: why not


class GrammarChecker:
    """Judges grammars for a model file; one per app. See the module docstring for threads."""

    def __init__(self, timeout: float = DEFAULT_TIMEOUT, *, start_timeout: float = 60.0,
                 queue_timeout: float = 30.0, cache_size: int = 1024, memory_limit: int = 2 << 30) -> None:
        self.timeout = timeout
        self.start_timeout = start_timeout
        self.queue_timeout = queue_timeout
        self.memory_limit = memory_limit
        self.stats = CheckerStats()
        self._cache_size = cache_size
        self._verdicts: OrderedDict[tuple[Any, ...], Verdict] = OrderedDict()
        self._verdicts_lock = threading.Lock()
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None
        self._loaded: set[str] = set()
        self._closed = False

    @property
    def helper_pid(self) -> int | None:
        """The running helper's process id (advisory), or None."""
        process = self._process
        return process.pid if process is not None else None

    def check(self, grammar: str, model_path: Path, param: str) -> None:
        """Return if ``grammar`` compiles for the model at ``model_path``; else raise ``InvalidRequest``.

        The message names ``param`` and, for a syntax error, the line and column.
        """
        key = _key(grammar, model_path)
        with self._verdicts_lock:
            self.stats.checks += 1
            cached = key in self._verdicts
            if cached:
                self.stats.cache_hits += 1
                self._verdicts.move_to_end(key)
                verdict: Verdict | _Unchecked = self._verdicts[key]
        if not cached:
            verdict = self._judge(grammar, model_path)
            if not isinstance(verdict, _Unchecked):
                self._remember(key, verdict)
        if isinstance(verdict, str):
            raise InvalidRequest(f"Invalid '{param}': {verdict}", param=param)

    def close(self) -> None:
        """Stop the helper; later checks raise ``ShuttingDown``."""
        self._closed = True
        process = self._process
        if process is not None:
            process.kill()  # an exchange in flight sees the end of its pipe and reports ShuttingDown
        with self._lock:
            self._stop_helper()

    # ---------------------------------------------------------------- verdicts

    def _remember(self, key: tuple[Any, ...], verdict: Verdict) -> None:
        with self._verdicts_lock:
            self._verdicts[key] = verdict
            self._verdicts.move_to_end(key)
            while len(self._verdicts) > self._cache_size:
                self._verdicts.popitem(last=False)

    def _judge(self, grammar: str, model_path: Path) -> Verdict | _Unchecked:
        try:
            parsed = gbnf.check(grammar)
        except gbnf.GbnfError as exc:
            return str(exc)
        return self._compile(grammar, model_path, parsed.tokens)

    def _compile(self, grammar: str, model_path: Path, tokens: list[int]) -> Verdict | _Unchecked:
        if not self._lock.acquire(timeout=self.queue_timeout):
            raise QueueFull("Grammar checks are queued behind slow ones; retry shortly", headers={"Retry-After": "1"})
        try:
            path = str(model_path.resolve())
            if path not in self._loaded:
                reply = self._exchange({"op": "load", "path": path}, self.start_timeout)
                if not isinstance(reply, dict) or not reply.get("ok"):
                    # The model's own load will fail and say why; nothing to judge the grammar against.
                    log.warning("grammar helper cannot read the vocabulary path=%s reply=%s", path, reply)
                    return _UNCHECKED
                self._loaded.add(path)
            started = time.monotonic()
            reply = self._exchange({"op": "check", "path": path, "grammar": grammar, "tokens": tokens}, self.timeout)
            log.debug("grammar compiled path=%s chars=%d seconds=%.4f", path, len(grammar),
                      time.monotonic() - started)
            return self._verdict(reply)
        finally:
            self._lock.release()

    def _verdict(self, reply: dict[str, Any] | str) -> Verdict:
        if isinstance(reply, dict):
            return None if reply.get("ok") else str(reply.get("error") or "llama.cpp refused the grammar")
        if reply == _TIMED_OUT:
            self.stats.timeouts += 1
            return f"llama.cpp did not finish compiling the grammar within {self.timeout:g} s; simplify it"
        self.stats.crashes += 1
        return f"llama.cpp crashed compiling the grammar ({reply}); simplify it"

    # ------------------------------------------------------------------ helper

    def _exchange(self, message: dict[str, Any], timeout: float) -> dict[str, Any] | str:
        """Send ``message`` and wait up to ``timeout`` s for the reply; caller holds ``_lock``.

        Returns the reply, ``_TIMED_OUT`` (the helper was killed) or how the helper died.
        """
        process = self._helper()
        try:
            assert process.stdin is not None
            write_message(process.stdin, message)
            reply = _read_reply(process, time.monotonic() + timeout)
        except (BrokenPipeError, EOFError, OSError, ValueError):
            reply = None
        if self._closed:
            raise ShuttingDown("The server is shutting down")
        if reply is None or reply == _TIMED_OUT:
            how = _TIMED_OUT if reply == _TIMED_OUT else _death(process)
            log.warning("grammar helper %s pid=%d; restarting it on the next grammar", how, process.pid)
            self._stop_helper()
            return how
        return reply

    def _helper(self) -> subprocess.Popen[bytes]:
        """The running helper, started if needed; caller holds ``_lock``."""
        if self._closed:
            raise ShuttingDown("The server is shutting down")
        if self._process is not None and self._process.poll() is None:
            return self._process
        self._stop_helper()
        env = {**os.environ, "GGML_NO_BACKTRACE": "1",  # no gdb attach (seconds) when llama.cpp aborts
               "PYTHONPATH": os.pathsep.join(filter(None, [str(PACKAGE_ROOT), os.environ.get("PYTHONPATH")]))}
        process = subprocess.Popen([sys.executable, "-m", "grammar.helper", str(self.memory_limit)],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        self.stats.helper_starts += 1
        ready = _read_reply(process, time.monotonic() + self.start_timeout)
        if not isinstance(ready, dict) or not ready.get("ready"):
            why = "did not start in time" if ready == _TIMED_OUT else _death(process)
            self._process = process
            self._stop_helper()
            raise CheckerUnavailable(f"The grammar checker could not start ({why}); see the server log")
        log.info("grammar helper started pid=%d", process.pid)
        self._process = process
        return process

    def _stop_helper(self) -> None:
        """Kill and reap the helper, if any; caller holds ``_lock`` (or it is closing)."""
        process, self._process = self._process, None
        self._loaded.clear()
        if process is None:
            return
        process.kill()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            log.error("grammar helper pid=%d did not exit after SIGKILL", process.pid)
        for pipe in (process.stdin, process.stdout):
            if pipe is not None:
                pipe.close()


def _key(grammar: str, model_path: Path) -> tuple[Any, ...]:
    digest = hashlib.sha256(grammar.encode("utf-8", errors="surrogatepass")).digest()
    try:
        stat = model_path.stat()
        identity: tuple[Any, ...] = (stat.st_size, stat.st_mtime_ns)  # a replaced file may have a new vocabulary
    except OSError:
        identity = ()
    return (digest, str(model_path), *identity)


def _read_reply(process: subprocess.Popen[bytes], deadline: float) -> dict[str, Any] | str | None:
    """The next message from the helper; ``_TIMED_OUT`` past ``deadline``; None if it closed its end."""
    assert process.stdout is not None
    fd = process.stdout.fileno()
    header = _read_exact(fd, 4, deadline)
    if not isinstance(header, bytes):
        return header
    (size,) = struct.unpack(">I", header)
    body = _read_exact(fd, size, deadline)
    return json.loads(body) if isinstance(body, bytes) else body


def _read_exact(fd: int, size: int, deadline: float) -> bytes | str | None:
    poller = select.poll()  # not select.select: a busy server's descriptors pass FD_SETSIZE
    poller.register(fd, select.POLLIN)
    chunks, remaining = [], size
    while remaining:
        left = deadline - time.monotonic()
        if left <= 0 or not poller.poll(left * 1000):
            return _TIMED_OUT
        chunk = os.read(fd, remaining)
        if not chunk:
            return None
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def _death(process: subprocess.Popen[bytes]) -> str:
    """How the helper ended, in words (it has closed its pipe, so it is exiting)."""
    try:
        code = process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        return "stopped answering"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with status {code}"
