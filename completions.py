"""Chat and text completions: from a validated request to OpenAI-shaped responses.

A request's life: judged without its model (``request_checks.judge``), then lease the model
(loading it if needed), tokenize in its worker and check what only the loaded model can
judge before any response byte is sent (so bad input still gets a 4xx), submit the
generation to the worker, and either collect it or stream it. The lease is released (and
anything still running in the worker cancelled) when the response closes, which the WSGI
server guarantees even when the client disconnects before the first chunk.

Concurrency: the view's thread (or, for a stream that waits for a load, a ``pool`` thread)
leases and prepares; the thread iterating the response reads the worker's deltas from its
queue (filled by the worker's reader thread). Generation itself runs in the worker,
batched with the model's other requests. A request waiting for a slot, or for its prompt
to be read, keeps looking for a hang-up (streams by writing ``: queued`` comments, all by
polling waitress), so a client that left is cancelled in the worker within a step.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import Executor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

from flask import Response

import sse
from chat_format import ChatPrompt, ChatTemplate
from dialects import Content, Event, Reasoning, Result, ToolCallArgs, ToolCallStart
from engine.client import RequestFailed, Stream, WorkerCrashed
from engine.protocol import MEDIA_MARKER, MediaInput, SamplingParams, TokenLogprob
from errors import (
    ContextLengthExceeded,
    InferenceFailed,
    InvalidRequest,
    ServiceError,
    caller_sees_detail,
    for_caller,
)
from fingerprint import SYSTEM_FINGERPRINT
from grammar.request import grammar_param
from media import Media
from model_manager import Lease, ModelManager
from request_checks import Verdict, check_token_ids
from schemas import ChatCompletionRequest, CompletionRequest, _Generation

log = logging.getLogger(__name__)

Disconnected = Callable[[], bool]
COALESCE_SECONDS = 0.002  # tokens closer together than this share one SSE event
HANG_UP_POLL_SECONDS = 0.25  # how often a request waiting for its worker looks for a hang-up
# A stream for a model that is not loaded waits this long before sending its headers: a load
# that ends sooner (most do) still answers a failure with its proper status, and no client
# gives up on a connection silent for so short a time. Longer loads get ": loading" comments.
STREAM_HEADERS_DEADLINE = 5.0
QUEUE_GRACE_SECONDS = 0.05  # a free slot answers within this; a longer wait means queued


Observer = Callable[[str, int, int, "float | None", float], None]


@dataclass
class Job:
    """One prepared completion: everything decided before the first byte goes out."""

    kind: str  # "chat" or "text"
    lease: Lease
    request: _Generation
    prompts: list[list[int]]  # as sent (without the cells their media take in the worker)
    streams: list[Stream]  # one per choice (``n`` per prompt, in prompt order), all submitted at once
    reading: ChatPrompt | None = None  # a chat answer's dialect and how to read it
    observer: Observer | None = None
    disconnected: Disconnected = lambda: False
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))
    started: float = field(default_factory=time.monotonic)
    generating: bool = False  # told the lease this job has a slot
    closed: bool = False
    _close_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def mark_generating(self) -> None:
        """The worker gave the job a slot: it no longer counts as queued."""
        if not self.generating:
            self.generating = True
            self.lease.started()

    def close(self) -> None:
        """Cancel what still runs in the worker and release the lease (idempotent)."""
        with self._close_lock:
            if self.closed:
                return
            self.closed = True
        for stream in self.streams:
            stream.cancel()
        if self.generating:
            self.lease.finished()
        self.lease.release()

    @property
    def object_type(self) -> str:
        """The ``object`` of a whole response."""
        return "chat.completion" if self.kind == "chat" else "text_completion"

    @property
    def chunk_object_type(self) -> str:
        """The ``object`` of a stream chunk: chat chunks have their own, text chunks are
        ``text_completion`` like the whole response (OpenAI's completions stream says so)."""
        return "chat.completion.chunk" if self.kind == "chat" else "text_completion"

    @property
    def n(self) -> int:
        """Choices per prompt."""
        return len(self.streams) // len(self.prompts)

    @property
    def logprobs(self) -> int | None:
        """Alternatives per token the request wants log probabilities for; None: none."""
        return self.streams[0].params.logprobs if self.streams else None

    def usage(self) -> dict[str, Any]:
        """OpenAI's ``usage``: each prompt counted once, completions summed over the choices;
        ``cached_tokens`` were reused from the KV cache."""
        prompt = sum(stream.result.prompt_tokens or len(tokens)  # the worker counts media cells too
                     for tokens, stream in zip(self.prompts, self.streams[::self.n], strict=False))
        completion = sum(s.result.completion_tokens for s in self.streams)
        cached = sum(s.result.cached_tokens for s in self.streams[::self.n])
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached}}


def prepare(manager: ModelManager, kind: str, request: _Generation, verdict: Verdict,
            disconnected: Disconnected, observer: Observer | None = None) -> Job:
    """Lease the judged request's model (loading it if needed) and build the generations.

    What needs the loaded model is judged here: the chat template, the prompt's tokens and
    their length against the context. Releases the lease on any error.
    ``observer(model, prompt_tokens, completion_tokens, first_token_seconds, seconds)`` is
    told about the completion when it ends (metrics).
    """
    lease = manager.acquire(verdict.model_id, keep_alive=request.keep_alive)
    try:
        worker = lease.worker
        info = worker.info
        params = replace(verdict.params, stop=list(verdict.params.stop))
        reading = None
        prompt_param = "messages" if kind == "chat" else "prompt"
        media: tuple[MediaInput, ...] = ()
        if isinstance(request, ChatCompletionRequest):
            template = chat_template(lease)
            reading = template.render(request)
            params.stop = params.stop + reading.stops
            params.preserved_tokens = template.preserved_tokens
            if verdict.media:
                log.info("media model=%s images=%d sounds=%d", lease.model_id,
                         sum(m.kind == "image" for m in verdict.media), sum(m.kind == "audio" for m in verdict.media))
                tokens, media = _tokenize_with_media(worker, reading.text, verdict.media)
                prompts: list[list[int]] = [tokens]
            else:
                prompts = [_tokenize(worker, reading.text, prompt_param)]
        else:
            assert isinstance(request, CompletionRequest)
            prompts = [p if isinstance(p, list) else _tokenize(worker, p, prompt_param) for p in request.prompts()]
            for tokens in prompts:  # the header may not have said; the loaded vocabulary does
                check_token_ids(tokens, info.n_vocab, "prompt")
        check_token_ids(params.logit_bias, info.n_vocab, "logit_bias")
        for tokens in prompts:
            if len(tokens) >= info.n_ctx:
                raise ContextLengthExceeded(
                    f"This model's context window is {info.n_ctx} tokens; the prompt has {len(tokens)} "
                    "tokens, leaving no room for a completion", param=prompt_param)
        # Before the generations are submitted: a small model's first token can come back
        # before the Job exists, and a time to first token is never negative.
        started = time.monotonic()
        choices = [_choice_params(params, choice) for choice in range(request.n)]
        streams = [stream for tokens in prompts for stream in worker.generate_many(tokens, choices, media)]
        return Job(kind, lease, request, prompts, streams, reading, observer, disconnected, started=started)
    except WorkerCrashed as exc:
        lease.release()
        raise lease.crashed(exc) from None
    except BaseException:
        lease.release()
        raise


def chat_template(lease: Lease) -> ChatTemplate:
    """The leased model's compiled chat template (compiled on first use, kept until it unloads)."""
    template = lease.cache.get("chat_template")
    if template is None:
        worker = lease.worker
        template = lease.cache["chat_template"] = ChatTemplate(
            worker.info, lease.settings.chat_template,
            lambda text: worker.tokenize(text, add_special=False, parse_special=True))
    return template


def count_prompt_tokens(manager: ModelManager, model_id: str, request: ChatCompletionRequest,
                        media: list[Media] | None = None) -> int:
    """The tokens of ``request``'s prompt: its messages and tools rendered with the model's
    template and tokenized in its worker, exactly as ``prepare`` would, with the cells its
    ``media`` (decoded by ``request_checks.decode_media``) take (loading the model if it must;
    the lease is held only while counting)."""
    lease = manager.acquire(model_id, keep_alive=request.keep_alive)
    try:
        text = chat_template(lease).render(request).text
        if not media:
            return len(_tokenize(lease.worker, text, "messages"))
        tokens, placed = _tokenize_with_media(lease.worker, text, media)
        return len(tokens) + sum(lease.worker.media_cells(placed))
    except RequestFailed as exc:
        raise InvalidRequest(exc.message, param=exc.param, code=exc.code) from None
    except WorkerCrashed as exc:
        raise lease.crashed(exc) from None
    finally:
        lease.release()


def _choice_params(params: SamplingParams, choice: int) -> SamplingParams:
    """Choice ``choice``'s sampling: a request's seed gives each of its ``n`` choices its own
    (seed + index), so they differ from each other yet repeat across identical requests."""
    if choice == 0 or params.seed is None:
        return params
    return replace(params, seed=(params.seed + choice) & 0xFFFFFFFF)


def _tokenize(worker: Any, text: str, param: str, allow_empty: bool = False) -> list[int]:
    """Tokenize with special tokens parsed; add BOS when the model wants one and it is absent."""
    tokens = worker.tokenize(text, add_special=False, parse_special=True)
    info = worker.info
    if info.add_bos and info.bos_token >= 0 and tokens[:1] != [info.bos_token]:
        tokens.insert(0, info.bos_token)
    if not tokens and not allow_empty:
        raise InvalidRequest("The prompt is empty", param=param)
    return tokens


def _tokenize_with_media(worker: Any, text: str, media: list[Media]) -> tuple[list[int], tuple[MediaInput, ...]]:
    """The prompt's text tokenized around its media markers, and each medium placed between
    them (the worker splices in the cells it takes). The text of each stretch between markers
    is tokenized alone, as llama.cpp's mtmd does."""
    pieces = text.split(MEDIA_MARKER)
    if len(pieces) - 1 != len(media):
        raise InvalidRequest(f"The rendered prompt holds {len(pieces) - 1} media markers for {len(media)} pictures: "
                             f"message text may not contain {MEDIA_MARKER!r}, and the chat template must keep "
                             "every message with a picture", param="messages")
    tokens = _tokenize(worker, pieces[0], "messages", allow_empty=True)
    placed = []
    for item, piece in zip(media, pieces[1:], strict=True):
        placed.append(item.at(len(tokens)))
        tokens.extend(worker.tokenize(piece, add_special=False, parse_special=True))
    return tokens, tuple(placed)


def _deltas(job: Job, index: int) -> Iterator[str]:
    """The text deltas of choice ``index``, as the worker sends them.

    Waits in short polls, so a client that hung up is noticed while the request is still
    queued or its prompt is being read, and the work is cancelled in the worker (within a
    step). Errors from the worker become the API's errors.
    """
    stream = job.streams[index]
    next_look = time.monotonic() + HANG_UP_POLL_SECONDS
    with _worker_errors(job):
        while True:
            try:
                text = stream.poll(HANG_UP_POLL_SECONDS)
            except StopIteration:
                return
            if stream.started:
                job.mark_generating()
            if text is not None:
                yield text
            # On a timer, not only when the worker is quiet: tokens may keep coming for a
            # client that left (a stream finds out by writing; a collected answer cannot).
            if time.monotonic() >= next_look:
                next_look = time.monotonic() + HANG_UP_POLL_SECONDS
                if job.disconnected():
                    job.close()
                    raise ClientGone("The client closed the connection")


@contextmanager
def _worker_errors(job: Job) -> Iterator[None]:
    """Map what a worker reports to the API's errors, naming the request's own parameters."""
    try:
        yield
    except RequestFailed as exc:
        if exc.kind != "invalid_request":
            raise InferenceFailed(f"Generation failed in {job.lease.model_id}: {exc.message}") from None
        error = ContextLengthExceeded if exc.code == "context_length_exceeded" else InvalidRequest
        raise error(exc.message, param=_request_param(job, exc.param), code=exc.code) from None
    except WorkerCrashed as exc:
        raise job.lease.crashed(exc) from None


def _request_param(job: Job, param: str | None) -> str | None:
    """The worker names its inputs (``prompt``, ``grammar``); the client knows them by its own."""
    if param == "prompt" and job.kind == "chat":
        return "messages"
    if param == "grammar":
        return grammar_param(job.request)
    return param


# ------------------------------------------------------------------ non-streaming


def complete(job: Job) -> dict[str, Any]:
    """Run every generation of ``job`` to the end and build the response body."""
    choices = [_choice(job, result) for result in results(job)]
    return {"id": _response_id(job), "object": job.object_type, "created": job.created,
            "model": job.lease.model_id, "system_fingerprint": SYSTEM_FINGERPRINT, "choices": choices,
            "usage": job.usage()}


class ClientGone(ServiceError):
    """Nobody is left to answer; the status only shows in the log."""

    status = 499
    type = "client_closed_request"
    code = "client_closed_request"


def _choice(job: Job, result: ChoiceResult) -> dict[str, Any]:
    logprobs = _logprobs(job, result.logprobs)
    if job.kind == "text":
        return {"index": result.index, "text": result.text, "logprobs": logprobs,
                "finish_reason": result.finish_reason}
    # OpenAI's message always carries "refusal" (null unless the model refused); clients read it.
    message: dict[str, Any] = {"role": "assistant", "refusal": None,
                               "content": result.content if result.content is not None or result.tool_calls else ""}
    if result.reasoning is not None:
        message["reasoning_content"] = result.reasoning
    if result.tool_calls:
        message["tool_calls"] = result.tool_calls
    return {"index": result.index, "message": message, "logprobs": logprobs, "finish_reason": result.finish_reason}


def _logprobs(job: Job, entries: list[TokenLogprob], offset: int = 0) -> dict[str, Any] | None:
    """OpenAI's ``logprobs`` of a choice (or of a stream chunk) from the worker's entries;
    ``offset`` is where the entries' text starts in the choice's text (completions only)."""
    if job.logprobs is None:
        return None
    if job.kind == "chat":
        return {"content": [{**_token(entry.token, entry.logprob),
                             "top_logprobs": [_token(token, logprob) for token, logprob in entry.top]}
                            for entry in entries], "refusal": None}
    offsets = []
    for entry in entries:
        offsets.append(offset)
        offset += len(_text(entry.token))
    return {"tokens": [_text(e.token) for e in entries], "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{_text(token): logprob for token, logprob in e.top} for e in entries],
            "text_offset": offsets}


def _token(token: bytes, logprob: float) -> dict[str, Any]:
    return {"token": _text(token), "logprob": logprob, "bytes": list(token)}


def _text(token: bytes) -> str:
    return token.decode("utf-8", errors="replace")


def _response_id(job: Job) -> str:
    return ("chatcmpl-" if job.kind == "chat" else "cmpl-") + job.id


# ---------------------------------------------------------------------- streaming


def stream(job: Job) -> Response:
    """A text/event-stream response; the lease is released when the response closes."""
    return _response(_events(job), job.close, sse.MIMETYPE, sse.HEADERS)


def stream_after_load(manager: ModelManager, kind: str, request: _Generation, verdict: Verdict,
                      disconnected: Disconnected, pool: Executor, observer: Observer | None = None) -> Response:
    """A stream for a model that is not loaded yet.

    ``prepare`` (and so the load) runs on ``pool``. If it ends within
    ``STREAM_HEADERS_DEADLINE`` the answer is as for a loaded model, a failure included
    (raised here, so it gets its own status). Otherwise the headers go out now, with a
    ``: loading`` comment every few seconds until the model is ready, so clients that give
    up on a silent connection survive a slow load; a failure then travels in the stream.
    Whoever finishes last releases the lease.
    """
    model_id = verdict.model_id

    def keepalive(first: bool) -> bytes:
        if first:
            return sse.comment(f"loading {model_id}")
        return sse.comment(f"loading {model_id} {manager.loading_progress(model_id) * 100:.0f}%")

    def failure(error: ServiceError) -> Iterator[bytes]:
        yield sse.event(error.body())
        yield sse.DONE

    pending = _PendingJob(lambda: prepare(manager, kind, request, verdict, disconnected, observer), pool)
    return _after_load(pending, model_id, _events, keepalive, failure, sse.MIMETYPE, sse.HEADERS)


def _after_load(pending: _PendingJob, model_id: str, body: Callable[[Job], Iterator[bytes]],
                keepalive: Callable[[bool], bytes], failure: Callable[[ServiceError], Iterator[bytes]],
                mimetype: str, headers: dict[str, str]) -> Response:
    """The stream of a job whose ``prepare`` (and load) runs on the pool, in any API's shapes:
    as for a loaded model if it ends within ``STREAM_HEADERS_DEADLINE`` (a failure raised, with
    its own status), else headers now, ``keepalive(first)`` every few seconds, and a failure
    as ``failure(error)`` in the stream. Whoever finishes last releases the lease."""
    if pending.done.wait(STREAM_HEADERS_DEADLINE):
        if pending.error is not None:
            raise pending.error
        assert pending.job is not None
        return _response(body(pending.job), pending.job.close, mimetype, headers)
    sees_detail = caller_sees_detail()  # now: the stream below runs after the request's context

    def events() -> Iterator[bytes]:
        yield keepalive(True)
        while not pending.done.wait(sse.LOADING_COMMENT_INTERVAL):
            yield keepalive(False)
        if pending.error is not None:
            if not isinstance(pending.error, ServiceError):
                log.error("preparing a stream failed model=%s", model_id, exc_info=pending.error)
            error = pending.error if isinstance(pending.error, ServiceError) else ServiceError("Load failed")
            yield from failure(for_caller(error, sees_detail))
            return
        assert pending.job is not None
        yield from body(pending.job)

    return _response(events(), pending.release, mimetype, headers)


def _response(body: Iterator[bytes], on_close: Callable[[], None], mimetype: str, headers: dict[str, str]) -> Response:
    response = Response(body, mimetype=mimetype, headers=headers)
    response.call_on_close(on_close)
    return response


class _PendingJob:
    """A ``prepare`` running on a pool thread, so a stream can send comments meanwhile.

    A pool, not a fresh thread per request: llama.cpp work in a brand-new thread costs
    about a millisecond more, which a cold start would pay every time.
    """

    def __init__(self, build: Callable[[], Job], pool: Executor) -> None:
        self.done = threading.Event()
        self.job: Job | None = None
        self.error: BaseException | None = None
        self._future = pool.submit(self._run, build)

    def _run(self, build: Callable[[], Job]) -> None:
        try:
            self.job = build()
        except BaseException as exc:
            self.error = exc
        finally:
            self.done.set()

    def release(self) -> None:
        """Close the job once ``prepare`` is done (now, or later on its own thread)."""
        self._future.add_done_callback(lambda _: self.job.close() if self.job is not None else None)


def _events(job: Job) -> Iterator[bytes]:
    base = {"id": _response_id(job), "object": job.chunk_object_type, "created": job.created,
            "model": job.lease.model_id, "system_fingerprint": SYSTEM_FINGERPRINT}
    include_usage = job.request.stream_options is not None and job.request.stream_options.include_usage
    if include_usage and job.kind == "chat":
        # OpenAI's chat chunks: "usage" null on every chunk but the last, which has no choices.
        # A text chunk is a CreateCompletionResponse, whose usage may be absent but not null.
        base["usage"] = None
    status = 200
    try:
        yield from _queued_comments(job)
        for index in range(len(job.streams)):
            yield from _choice_events(job, base, index)
        if include_usage:
            yield sse.event({**base, "choices": [], "usage": job.usage()})
    except GeneratorExit:
        status = 499  # the client went away; nothing more can be sent
        raise
    except ServiceError as exc:
        status = exc.status
        yield sse.event(exc.body())
    except Exception:
        log.exception("generation failed model=%s", job.lease.model_id)
        status = 500
        yield sse.event(ServiceError("Generation failed; see the server log").body())
    finally:
        _log_done(job, status, streamed=True)
    yield sse.DONE


def _queued_comments(job: Job) -> Iterator[bytes]:
    """Wait for the worker to give the job a slot; while every slot is busy, send ``: queued``
    at once (the headers go out now, not when the slot comes) and every few seconds after.

    Each comment is also a write that finds out a client that hung up: the stream is then
    closed, and its request cancelled in the worker before any of its prompt is read.
    """
    yield from wait_for_slot(job, lambda: sse.comment(f"queued for {job.lease.model_id}"))


def _choice_events(job: Job, base: dict[str, Any], index: int) -> Iterator[bytes]:
    if job.kind == "chat":
        yield sse.event({**base, "choices": [{"index": index, "delta": {"role": "assistant", "content": ""},
                                              "logprobs": None, "finish_reason": None}]})
        chunk = sse.ChunkTemplate({**base, "choices": [{"index": index, "delta": {"content": sse.ChunkTemplate.MARK},
                                                        "logprobs": None, "finish_reason": None}]})
    else:
        chunk = sse.ChunkTemplate({**base, "choices": [{"index": index, "text": sse.ChunkTemplate.MARK,
                                                        "logprobs": None, "finish_reason": None}]})
    if job.reading is not None and job.reading.parser_options is not None:
        result = yield from _read_events(job, base, index)
        finish = "tool_calls" if result.tool_calls else job.streams[index].result.finish_reason
    elif job.logprobs is not None:
        yield from _with_logprobs(job, base, index)
        finish = job.streams[index].result.finish_reason
    else:
        yield from _coalesced(_deltas(job, index), chunk)
        finish = job.streams[index].result.finish_reason
    last: dict[str, Any] = {"index": index, "logprobs": None, "finish_reason": finish}
    last.update({"delta": {}} if job.kind == "chat" else {"text": ""})
    yield sse.event({**base, "choices": [last]})


def _read_events(job: Job, base: dict[str, Any], index: int) -> Iterator[bytes]:
    """A chat answer read by its dialect as it streams: content and reasoning deltas as they
    are written, tool calls as OpenAI's call deltas. Returns the parser's ``Result``."""
    reader = _read(job, index)
    while True:
        try:
            events, entries = next(reader)
        except StopIteration as end:
            return end.value
        yield from _event_chunks(base, index, events, _logprobs(job, entries) if entries else None)


Reading = Generator[tuple[list[Event], list[TokenLogprob]], None, Result]


def _read(job: Job, index: int) -> Reading:
    """Choice ``index`` read by its dialect as it streams: per delta, the events it completes and
    the log probabilities that came with it; returns the parser's ``Result``."""
    reading = job.reading
    assert reading is not None and reading.parser_options is not None
    parser = reading.dialect.parser(replace(reading.parser_options, streaming=True))
    stream = job.streams[index]
    for text in _deltas(job, index):
        yield parser.feed(text), stream.take_logprobs()
    yield parser.flush(), []
    result = parser.finish()
    _log_refused_call(job, result)
    return result


def _event_chunks(base: dict[str, Any], index: int, events: list[Event],
                  logprobs: dict[str, Any] | None) -> Iterator[bytes]:
    """One chunk per run of same-kind events (text of one kind joined, one call's argument
    fragments joined); the delta's log probabilities ride on the first."""
    deltas: list[dict[str, Any]] = []
    for event in events:
        last = deltas[-1] if deltas else None
        if isinstance(event, Content | Reasoning):
            key = "content" if isinstance(event, Content) else "reasoning_content"
            if last is not None and list(last) == [key]:
                last[key] += event.text
            else:
                deltas.append({key: event.text})
        elif isinstance(event, ToolCallStart):
            deltas.append({"tool_calls": [{"index": event.index, "id": event.id, "type": "function",
                                           "function": {"name": event.name, "arguments": ""}}]})
        elif isinstance(event, ToolCallArgs):
            calls = last.get("tool_calls") if last is not None else None
            if calls and calls[-1]["index"] == event.index:
                calls[-1]["function"]["arguments"] += event.fragment
            else:
                deltas.append({"tool_calls": [{"index": event.index, "function": {"arguments": event.fragment}}]})
    if not deltas and logprobs is not None:
        deltas.append({"content": ""})  # a token held back (a marker may be starting): its logprobs go now
    for delta in deltas:
        yield sse.event({**base, "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                                              "finish_reason": None}]})
        logprobs = None


def _log_refused_call(job: Job, result: Result) -> None:
    if result.malformed:
        log.warning("tool call refused model=%s reason=%s", job.lease.model_id, result.malformed)


def _with_logprobs(job: Job, base: dict[str, Any], index: int) -> Iterator[bytes]:
    """One chunk per delta, each with the log probabilities of the tokens it brings."""
    stream, offset = job.streams[index], 0
    for text in _deltas(job, index):
        logprobs = _logprobs(job, stream.take_logprobs(), offset)
        offset += len(text)
        choice: dict[str, Any] = {"index": index, "logprobs": logprobs, "finish_reason": None}
        choice.update({"delta": {"content": text}} if job.kind == "chat" else {"text": text})
        yield sse.event({**base, "choices": [choice]})


def _coalesced(texts: Iterator[str], chunk: sse.ChunkTemplate) -> Iterator[bytes]:
    """One event per token, except that tokens arriving within ``COALESCE_SECONDS`` of the
    last write share the next one.

    Each write costs a syscall and a trip through the WSGI stack; on a small model that
    makes thousands of tokens a second, that cost is what separates the stream from
    llama.cpp's own speed. The first token always goes out at once, and a held token waits
    at most for the next one, so slow models stream exactly one token per event.
    """
    held: list[str] = []
    last_write = float("-inf")
    for text in texts:
        held.append(text)
        now = time.perf_counter()
        if now - last_write >= COALESCE_SECONDS:
            yield chunk.render("".join(held))
            held.clear()
            last_write = now
    if held:
        yield chunk.render("".join(held))


def _log_done(job: Job, status: int, streamed: bool = False) -> None:
    seconds = time.monotonic() - job.started
    usage = job.usage()
    rate = usage["completion_tokens"] / seconds if seconds > 0 else 0.0
    finish = ",".join(str(s.result.finish_reason) for s in job.streams)
    log.info("completion model=%s kind=%s stream=%s status=%d prompt_tokens=%d completion_tokens=%d "
             "seconds=%.3f tokens_per_s=%.1f finish=%s", job.lease.model_id, job.kind, streamed, status,
             usage["prompt_tokens"], usage["completion_tokens"], seconds, rate, finish)
    if job.observer is not None:
        first = next((s.result.first_token_at for s in job.streams if s.result.first_token_at), None)
        job.observer(job.lease.model_id, usage["prompt_tokens"], usage["completion_tokens"],
                     first - job.started if first is not None else None, seconds)


# ---------------------------------------------------------- for the other APIs' adapters
#
# Anthropic Messages, OpenAI Responses and Ollama's API answer from the same jobs: each builds
# a ChatCompletionRequest (or CompletionRequest), judges it, prepares a Job, and then renders
# either ``results(job)`` (a whole answer) or ``choice_events(job, index)`` through ``drive``
# (a stream) in its own shapes. Leases, queueing, hang-ups, metrics and the log line are the
# same as for /v1/chat/completions.


@dataclass(frozen=True)
class Finished:
    """The last event of a choice: why it ended (``stop``, ``length``, ``tool_calls``)."""

    reason: str


ChoiceEvent = Content | Reasoning | ToolCallStart | ToolCallArgs | Finished


@dataclass
class ChoiceResult:
    """One whole choice, read in the model's dialect."""

    index: int
    text: str  # as generated (markers the dialect reads included)
    content: str | None
    reasoning: str | None
    tool_calls: list[dict[str, Any]]
    finish_reason: str
    logprobs: list[TokenLogprob]


def results(job: Job) -> list[ChoiceResult]:
    """Run every choice of ``job`` to its end; closes the job and logs the request."""
    status = 500
    try:
        texts = ["".join(_deltas(job, index)) for index in range(len(job.streams))]
        status = 200
    except ServiceError as exc:
        status = exc.status
        raise
    finally:
        job.close()
        _log_done(job, status)
    return [_result(job, index, text) for index, text in enumerate(texts)]


def _result(job: Job, index: int, text: str) -> ChoiceResult:
    stream = job.streams[index]
    finish = stream.result.finish_reason or "stop"
    reading = job.reading
    if reading is None or reading.parser_options is None:
        return ChoiceResult(index, text, text, None, [], finish, stream.logprobs)
    read = reading.dialect.parse(text, reading.parser_options)
    _log_refused_call(job, read)
    return ChoiceResult(index, text, read.content, read.reasoning, read.tool_calls,
                        "tool_calls" if read.tool_calls else finish, stream.logprobs)


def choice_events(job: Job, index: int) -> Iterator[ChoiceEvent]:
    """Choice ``index`` as it streams: content and reasoning as written, tool calls as they are
    read, then ``Finished``. The job must have its slot (``wait_for_slot``)."""
    stream = job.streams[index]
    reading = job.reading
    if reading is None or reading.parser_options is None:
        for text in _deltas(job, index):
            if text:
                yield Content(text)
        yield Finished(stream.result.finish_reason or "stop")
        return
    read = yield from _flattened(_read(job, index))
    yield Finished("tool_calls" if read.tool_calls else stream.result.finish_reason or "stop")


def _flattened(reader: Reading) -> Generator[Event, None, Result]:
    """The events of ``_read``, one by one; returns its ``Result``."""
    while True:
        try:
            events, _ = next(reader)
        except StopIteration as end:
            return end.value
        yield from events


def wait_for_slot(job: Job, keepalive: Callable[[], bytes]) -> Iterator[bytes]:
    """Wait until the worker gives ``job`` a slot, yielding ``keepalive()`` at once when it
    queues and every few seconds after (each write also finds out a client that left)."""
    first = job.streams[0]
    with _worker_errors(job):
        next_beat = time.monotonic() + QUEUE_GRACE_SECONDS
        while not first.wait_started(min(HANG_UP_POLL_SECONDS, max(0.0, next_beat - time.monotonic()))):
            if job.disconnected():
                job.close()
                raise ClientGone("The client closed the connection while queued")
            if time.monotonic() >= next_beat:
                yield keepalive()
                next_beat = time.monotonic() + sse.LOADING_COMMENT_INTERVAL


class StreamRenderer:
    """How one API writes a stream; ``drive`` calls these in order. Override what you need."""

    mimetype = sse.MIMETYPE
    headers: dict[str, str] = sse.HEADERS

    def keepalive(self, job: Job | None) -> bytes:
        """Sent while the model loads or the request queues (``job`` None: still loading)."""
        return sse.comment("waiting")

    def start(self, job: Job) -> Iterator[bytes]:
        """Before the first choice's events."""
        return iter(())

    def event(self, job: Job, index: int, event: ChoiceEvent) -> Iterator[bytes]:
        raise NotImplementedError

    def end(self, job: Job) -> Iterator[bytes]:
        """After every choice ended (``job.usage()`` is final)."""
        return iter(())

    def error(self, error: ServiceError) -> Iterator[bytes]:
        """A failure once the stream has started, in the API's own shape."""
        raise NotImplementedError


def drive(job: Job, renderer: StreamRenderer) -> Iterator[bytes]:
    """A job's stream written by ``renderer``; logs the request when it ends."""
    status = 200
    try:
        yield from wait_for_slot(job, lambda: renderer.keepalive(job))
        yield from renderer.start(job)
        for index in range(len(job.streams)):
            for event in choice_events(job, index):
                yield from renderer.event(job, index, event)
        yield from renderer.end(job)
    except GeneratorExit:
        status = 499
        raise
    except ServiceError as exc:
        status = exc.status
        yield from renderer.error(exc)
    except Exception:
        log.exception("generation failed model=%s", job.lease.model_id)
        status = 500
        yield from renderer.error(ServiceError("Generation failed; see the server log"))
    finally:
        _log_done(job, status, streamed=True)


def stream_with(manager: ModelManager, kind: str, request: _Generation, verdict: Verdict,
                disconnected: Disconnected, pool: Executor, renderer: StreamRenderer,
                observer: Observer | None = None) -> Response:
    """A streamed answer in ``renderer``'s shapes, loading the model first if it must, with the
    rules of ``stream_after_load``: a failure within ``STREAM_HEADERS_DEADLINE`` is raised
    (its own status), a later one is ``renderer.error`` in the stream."""
    if manager.is_loaded(verdict.model_id):
        job = prepare(manager, kind, request, verdict, disconnected, observer)
        return _response(drive(job, renderer), job.close, renderer.mimetype, renderer.headers)
    pending = _PendingJob(lambda: prepare(manager, kind, request, verdict, disconnected, observer), pool)
    return _after_load(pending, verdict.model_id, lambda job: drive(job, renderer),
                       lambda _first: renderer.keepalive(None), renderer.error, renderer.mimetype, renderer.headers)
