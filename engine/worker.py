"""The worker process: one model, one thread, one pipe to the server process.

Started by ``engine.client.Worker`` as ``python -m engine.worker FD``, FD being its end of a
socket pair wrapped in ``multiprocessing.connection.Connection`` (see ``engine.protocol``).

Life: ``Ready`` as soon as llama_cpp is imported (a warm spare waits here for its ``Load``),
then ``Load`` -> ``Progress``... -> ``Loaded`` or ``LoadFailed`` (and exit), then serve until
``Shutdown``. llama.cpp's native log is forwarded as ``Log`` messages throughout.

Concurrency model: a single thread (see ``engine.scheduler`` for why). While sequences are in
flight the loop drains every waiting message without blocking, then runs one step; while idle
it blocks on the pipe for up to a second at a time.

An orphan never lingers: the worker exits when the pipe reaches EOF (the server's end closes
when the server dies, however it dies), when a send fails, or when its parent pid changes
(checked every idle second). ``PR_SET_PDEATHSIG`` is deliberately not used: it fires when the
*thread* that started the child exits, and the server starts workers from request threads.
SIGINT is ignored: a Ctrl-C at the terminal reaches the whole process group, and stopping the
workers is the server's decision.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from engine import ggml_rpc
from engine import protocol as p
from engine.llama_adapter import LoadedModel, LoadError, NativeLog
from engine.projector import MediaChunk, MediaError
from engine.scheduler import Scheduler

HEARTBEAT_SECONDS = 1.0
IDLE_POLL_SECONDS = 1.0
PROGRESS_STEP = 0.01  # send load progress in steps of at least 1%


class ParentGone(Exception):
    """The server's end of the pipe is closed: time to exit."""


class Channel:
    """The worker's end of the pipe; remembers when it last sent, for heartbeats."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.last_sent = time.monotonic()
        self._bundle: list[Any] | None = None

    def send(self, message: Any) -> None:
        if self._bundle is not None:
            self._bundle.append(message)
            return
        try:
            self.conn.send(message)
        except OSError as exc:  # BrokenPipeError, ConnectionResetError
            raise ParentGone from exc
        self.last_sent = time.monotonic()

    @contextmanager
    def bundled(self) -> Iterator[None]:
        """Collect what is sent inside, and send it as one ``Bundle`` (or alone) at the end."""
        self._bundle = []
        try:
            yield
        finally:
            messages, self._bundle = self._bundle, None
            if len(messages) == 1:
                self.send(messages[0])
            elif messages:
                self.send(p.Bundle(tuple(messages)))

    def heartbeat(self) -> None:
        if time.monotonic() - self.last_sent >= HEARTBEAT_SECONDS:
            self.send(p.Heartbeat())


class WorkerLoop:
    """Everything the worker does after start-up: wait for the load, load, serve."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        # One poll object for the worker's life: Connection.poll builds and tears down a
        # selector on every call, and the serving loop asks once per decode step.
        self._ready = select.poll()
        self._ready.register(conn.fileno(), select.POLLIN)
        self.channel = Channel(conn)
        self.parent = os.getppid()
        self.native_log = NativeLog(self._forward_log)
        self.model: LoadedModel | None = None
        self.scheduler: Scheduler | None = None
        self.running = True
        self.handlers: dict[type, Callable[[Any], None]] = {
            p.Generate: self._generate, p.GenerateMany: self._generate_many, p.Cancel: self._cancel,
            p.Embed: self._embed,
            p.Tokenize: self._tokenize, p.Detokenize: self._detokenize, p.MediaCells: self._media_cells,
            p.GetStats: self._stats,
            p.Shutdown: self._shutdown,
            p.Tune: self._tune,
        }

    def run(self) -> None:
        try:
            self.channel.send(p.Ready(os.getpid()))
            if self._load():
                self._serve()
        except ParentGone:
            pass
        finally:
            if self.model is not None:
                self.model.close()

    def _forward_log(self, level: int, text: str) -> None:
        # A gone parent is noticed again at the next ordinary send, outside this C callback.
        with contextlib.suppress(ParentGone):
            self.channel.send(p.Log(level, text))

    # ---- loading ----

    def _load(self) -> bool:
        """Wait for ``Load`` and load; False when the worker should exit instead."""
        message = self._next_message()
        while not isinstance(message, p.Load):
            if isinstance(message, p.Shutdown):
                return False
            self._refuse_before_load(message)
            message = self._next_message()
        self.native_log.min_level = message.log_level
        sent = [-1.0]

        def progress(fraction: float) -> None:
            if fraction >= 1.0 or fraction - sent[0] >= PROGRESS_STEP:
                sent[0] = fraction
                self.channel.send(p.Progress(message.id, fraction))
            else:  # called per tensor: a load over RPC on a slow link is slow, not silent
                self.channel.heartbeat()

        try:
            if message.options.rpc_servers:
                self._connect_rpc(message.options)
            self.model = LoadedModel.load(message.path, message.options, self.native_log, progress)
        except (LoadError, ggml_rpc.RpcError) as exc:
            self.channel.send(p.LoadFailed(message.id, str(exc)))
            return False
        if not message.options.embedding:
            self.scheduler = Scheduler(self.model, self.channel.send, message.options.parallel,
                                       message.options.prompt_cache_bytes)
        self.channel.send(p.Loaded(message.id, self.model.info()))
        return True

    def _connect_rpc(self, options: p.ModelOptions) -> None:
        """Make the RPC servers ggml devices, so the load places layers on them."""
        for device in ggml_rpc.connect(options.rpc_servers, options.rpc_timeout):
            self.channel.send(p.Log(logging.INFO, f"RPC device {device.name} at {device.description}: "
                                                  f"{device.free / 2**20:.0f} of {device.total / 2**20:.0f} MiB free"))

    def _refuse_before_load(self, message: Any) -> None:
        request_id = getattr(message, "id", None)
        if request_id is not None:
            self.channel.send(p.Error(request_id, "internal", "the worker has no model loaded yet"))

    # ---- serving ----

    def _serve(self) -> None:
        while self.running:
            busy = self.scheduler is not None and self.scheduler.busy
            if self._readable(0 if busy else IDLE_POLL_SECONDS):
                self._drain()
            elif not busy and os.getppid() != self.parent:
                return  # reparented: the server died without closing our pipe
            if self.running and self.scheduler is not None and self.scheduler.busy:
                with self.channel.bundled():
                    self.scheduler.step()
                self.channel.heartbeat()

    def _drain(self) -> None:
        """Handle every message already waiting (at least one)."""
        while self.running:
            message = self._recv()
            handler = self.handlers.get(type(message))
            if handler is None:
                self._refuse_unknown(message)
            else:
                self._handle(handler, message)
            if not self._readable(0):
                return

    def _handle(self, handler: Callable[[Any], None], message: Any) -> None:
        """Run one handler; a bug it hits fails that request, never the worker and every
        other request on the model."""
        try:
            handler(message)
        except ParentGone:
            raise
        except Exception as exc:
            request_id = getattr(message, "id", None)
            print(f"worker: {type(message).__name__} failed: {exc!r}", file=sys.stderr, flush=True)
            if request_id is not None:
                self.channel.send(p.Error(request_id, "internal", f"{type(message).__name__} failed: "
                                                                  f"{type(exc).__name__}"))

    def _next_message(self) -> Any:
        while not self._readable(IDLE_POLL_SECONDS):
            if os.getppid() != self.parent:
                raise ParentGone
        return self._recv()

    def _readable(self, timeout: float) -> bool:
        """Whether a message (or the pipe's end) is waiting, within ``timeout`` seconds."""
        return bool(self._ready.poll(timeout * 1000))

    def _recv(self) -> Any:
        try:
            return self.conn.recv()
        except (EOFError, OSError) as exc:
            raise ParentGone from exc

    def _refuse_unknown(self, message: Any) -> None:
        request_id = getattr(message, "id", None)
        if request_id is not None:
            self.channel.send(p.Error(request_id, "internal", f"unknown message {type(message).__name__}"))

    def _generate(self, message: p.Generate) -> None:
        if self.scheduler is None:
            self.channel.send(p.Error(message.id, "invalid_request",
                                      "this model instance is loaded for embeddings", param="model"))
            return
        self.scheduler.submit(message)

    def _generate_many(self, message: p.GenerateMany) -> None:
        for request_id, params in zip(message.ids, message.params, strict=True):
            # One at a time through _handle: a failure is answered under each choice's own id.
            self._handle(self._generate, p.Generate(request_id, message.prompt, params, message.media))

    def _cancel(self, message: p.Cancel) -> None:
        if self.scheduler is not None:
            self.scheduler.cancel(message.id)

    def _embed(self, message: p.Embed) -> None:
        model = self.model
        assert model is not None
        if not model.options.embedding:
            self.channel.send(p.Error(message.id, "invalid_request",
                                      "this model instance is loaded for text generation", param="model"))
            return
        for index, tokens in enumerate(message.inputs):
            problem = self._embedding_problem(model, tokens)
            if problem is not None:
                self.channel.send(p.Error(message.id, "invalid_request", f"input[{index}] {problem[0]}",
                                          param="input", code=problem[1]))
                return
        vectors: list[np.ndarray] = []
        for group in model.embedding_groups(message.inputs):
            vectors.extend(model.embed(group))
            self.channel.heartbeat()
        self.channel.send(p.Reply(message.id, vectors))

    @staticmethod
    def _embedding_problem(model: LoadedModel, tokens: list[int]) -> tuple[str, str | None] | None:
        if not tokens:
            return "is empty", None
        if not all(model.valid_token(t) for t in tokens):
            return f"has token ids outside 0..{model.n_vocab - 1}", None
        if len(tokens) > model.n_batch:
            return f"has {len(tokens)} tokens; this model embeds at most {model.n_batch}", "context_length_exceeded"
        return None

    def _tokenize(self, message: p.Tokenize) -> None:
        assert self.model is not None
        tokens = self.model.tokenize(message.text, message.add_special, message.parse_special)
        self.channel.send(p.Reply(message.id, tokens))

    def _detokenize(self, message: p.Detokenize) -> None:
        model = self.model
        assert model is not None
        bad = next((t for t in message.tokens if not model.valid_token(t)), None)
        if bad is not None:
            self.channel.send(p.Error(message.id, "invalid_request",
                                      f"token id {bad} is outside this model's vocabulary (0..{model.n_vocab - 1})",
                                      param="tokens"))
            return
        pieces = [model.piece(t, special=True) for t in message.tokens]
        value: Any = pieces if message.per_token else b"".join(pieces).decode("utf-8", errors="replace")
        self.channel.send(p.Reply(message.id, value))

    def _media_cells(self, message: p.MediaCells) -> None:
        model = self.model
        assert model is not None
        counts = []
        for item in message.media:
            try:
                pieces = model.split_media(item)
            except MediaError as exc:
                self.channel.send(p.Error(message.id, "invalid_request", str(exc), param=exc.param,
                                          code="invalid_media"))
                return
            counts.append(sum(piece.n_tokens if isinstance(piece, MediaChunk) else len(piece) for piece in pieces))
            for piece in pieces:
                if isinstance(piece, MediaChunk):
                    model.free_media(piece)
        self.channel.send(p.Reply(message.id, counts))

    def _stats(self, message: p.GetStats) -> None:
        stats = self.scheduler.snapshot() if self.scheduler is not None else {}
        self.channel.send(p.Reply(message.id, stats))

    def _tune(self, message: p.Tune) -> None:
        if self.scheduler is not None:
            self.scheduler.step_delay = message.step_delay
            self.scheduler.fail_after_steps = message.fail_after_steps

    def _shutdown(self, _message: p.Shutdown) -> None:
        self.running = False


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    conn = Connection(int(argv[1]))
    WorkerLoop(conn).run()
    conn.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
