"""Chat and text completions: from a validated request to OpenAI-shaped responses.

A request's life: lease the model (loading it if needed), build prompt tokens and the
``Generation`` before any response byte is sent (so bad input still gets a 4xx), then
either run it to the end under the model's generation lock, or return a stream whose
iteration takes that lock. The lease is released when the response closes, which the
WSGI server guarantees even when the client disconnects before the first chunk.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

from flask import Response
from pydantic import BaseModel

import sse
from chat_format import ChatTemplate, extract_tool_calls
from errors import InvalidRequest, ServiceError
from generation import Generation, SamplingParams
from grammar.request import grammar_param
from model_manager import Lease, ModelManager
from schemas import ChatCompletionRequest, CompletionRequest, _Generation

log = logging.getLogger(__name__)

Disconnected = Callable[[], bool]
COALESCE_SECONDS = 0.002  # tokens closer together than this share one SSE event


Observer = Callable[[str, int, int, "float | None", float], None]


@dataclass
class Job:
    """One prepared completion: everything decided before the first byte goes out."""

    kind: str  # "chat" or "text"
    lease: Lease
    request: _Generation
    generations: list[Generation]
    parse_tools: bool = False
    observer: Observer | None = None
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))
    started: float = field(default_factory=time.monotonic)

    @property
    def object_prefix(self) -> str:
        return "chat.completion" if self.kind == "chat" else "text_completion"

    def usage(self) -> dict[str, int]:
        prompt = sum(g.result.prompt_tokens for g in self.generations)
        completion = sum(g.result.completion_tokens for g in self.generations)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def prepare(manager: ModelManager, kind: str, request: _Generation, disconnected: Disconnected,
            observer: Observer | None = None, grammar: str | None = None) -> Job:
    """Lease the model and build the generations; releases the lease on any error.

    ``observer(model, prompt_tokens, completion_tokens, first_token_seconds, seconds)`` is
    told about the completion when it ends (metrics). ``grammar`` is the request's grammar
    as ``grammar.request.grammar_for`` returned it, judged before the lease.
    """
    lease = manager.acquire(request.model, keep_alive=request.keep_alive)
    try:
        llama = lease.llama
        settings = lease.settings
        # Judged before the model's defaults fill in: only what the client sent can be refused.
        asked = request.max_tokens if "max_tokens" in request.model_fields_set else None
        apply_defaults(request, settings.default)
        limit = manager.settings.max_tokens_limit
        if limit is not None:
            if asked is not None and asked > limit:
                raise InvalidRequest(f"max_tokens {asked} is above this server's limit of {limit}",
                                     param="max_tokens")
            request.max_tokens = min(request.max_tokens or limit, limit)
        params = _sampling(request)
        params.grammar, params.grammar_param = grammar, grammar_param(request)
        parse_tools = False
        if isinstance(request, ChatCompletionRequest):
            template = lease.cache.get("chat_template")
            if template is None:
                template = lease.cache["chat_template"] = ChatTemplate(llama, settings.chat_template)
            prompt = template.render(request)
            params.stop = params.stop + prompt.stops
            parse_tools = prompt.parse_tools
            prompts: list[list[int]] = [_tokenize(llama, prompt.text, chat=True)]
        else:
            assert isinstance(request, CompletionRequest)
            prompts = [p if isinstance(p, list) else _tokenize(llama, p, chat=False) for p in request.prompts()]
        pieces = lease.cache.setdefault("pieces", {})
        generations = [Generation(llama, tokens, params, pieces, disconnected) for tokens in prompts]
        return Job(kind, lease, request, generations, parse_tools, observer)
    except BaseException:
        lease.release()
        raise


def apply_defaults(request: _Generation, defaults: BaseModel) -> None:
    """Fill the fields the request left out with the model's configured defaults."""
    for name in defaults.model_fields_set:
        if name not in request.model_fields_set:
            setattr(request, name, getattr(defaults, name))


def _sampling(request: _Generation) -> SamplingParams:
    return SamplingParams(
        max_tokens=request.max_tokens, temperature=request.temperature, top_p=request.top_p,
        top_k=request.top_k, min_p=request.min_p, repeat_penalty=request.repeat_penalty,
        presence_penalty=request.presence_penalty, frequency_penalty=request.frequency_penalty,
        seed=request.seed, stop=request.stops, ignore_eos=request.ignore_eos,
        logit_bias={int(k): v for k, v in (request.logit_bias or {}).items()},
    )


def _tokenize(llama: Any, text: str, *, chat: bool) -> list[int]:
    """Tokenize with special tokens parsed; add BOS when the model wants one and it is absent."""
    tokens = llama.tokenize(text.encode("utf-8"), add_bos=False, special=True)
    bos = llama.token_bos()
    if llama._model.add_bos_token() and bos >= 0 and tokens[:1] != [bos]:
        tokens.insert(0, bos)
    if not tokens:
        raise InvalidRequest("The prompt is empty", param="messages" if chat else "prompt")
    return tokens


# ------------------------------------------------------------------ non-streaming


def complete(job: Job) -> dict[str, Any]:
    """Run every generation of ``job`` to the end and build the response body."""
    try:
        with job.lease.generating():
            texts = ["".join(generation) for generation in job.generations]
    finally:
        job.lease.release()
    choices = [_choice(job, i, text, g.result.finish_reason) for i, (text, g) in
               enumerate(zip(texts, job.generations, strict=True))]
    _log_done(job, 200)
    return {"id": _response_id(job), "object": job.object_prefix, "created": job.created,
            "model": job.lease.model_id, "choices": choices, "usage": job.usage()}


def _choice(job: Job, index: int, text: str, finish_reason: str | None) -> dict[str, Any]:
    if job.kind == "text":
        return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if job.parse_tools:
        content, calls = extract_tool_calls(text)
        if calls:
            message = {"role": "assistant", "content": content, "tool_calls": calls}
            finish_reason = "tool_calls"
    return {"index": index, "message": message, "logprobs": None, "finish_reason": finish_reason}


def _response_id(job: Job) -> str:
    return ("chatcmpl-" if job.kind == "chat" else "cmpl-") + job.id


# ---------------------------------------------------------------------- streaming


def stream(job: Job) -> Response:
    """A text/event-stream response; the lease is released when the response closes."""
    response = Response(_events(job), mimetype=sse.MIMETYPE, headers=sse.HEADERS)
    response.call_on_close(job.lease.release)
    return response


def stream_after_load(manager: ModelManager, kind: str, request: _Generation, disconnected: Disconnected,
                      model_id: str, pool: Executor, observer: Observer | None = None,
                      grammar: str | None = None) -> Response:
    """A stream for a model that is not loaded yet: headers now, ``: loading`` comments until it is.

    Clients that give up on a silent connection (30 s is common) survive a slow load.
    ``prepare`` runs on ``pool``; whoever finishes last releases its lease.
    """
    pending = _PendingJob(lambda: prepare(manager, kind, request, disconnected, observer, grammar), pool)

    def events() -> Iterator[bytes]:
        yield sse.comment(f"loading {model_id}")
        while not pending.done.wait(sse.LOADING_COMMENT_INTERVAL):
            yield sse.comment(f"loading {model_id} {manager.loading_progress(model_id) * 100:.0f}%")
        if pending.error is not None:
            if not isinstance(pending.error, ServiceError):
                log.error("preparing a stream failed model=%s", model_id, exc_info=pending.error)
            error = pending.error if isinstance(pending.error, ServiceError) else ServiceError("Load failed")
            yield sse.event(error.body())
            yield sse.DONE
            return
        assert pending.job is not None
        yield from _events(pending.job)

    response = Response(events(), mimetype=sse.MIMETYPE, headers=sse.HEADERS)
    response.call_on_close(pending.release)
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
        """Release the lease once ``prepare`` is done (now, or later on its own thread)."""
        self._future.add_done_callback(lambda _: self.job.lease.release() if self.job is not None else None)


def _events(job: Job) -> Iterator[bytes]:
    base = {"id": _response_id(job), "object": job.object_prefix + ".chunk", "created": job.created,
            "model": job.lease.model_id}
    status = 200
    try:
        if job.lease.busy():
            yield sse.comment(f"queued for {job.lease.model_id}")  # headers now, not when our turn comes
        with job.lease.generating():
            for index, generation in enumerate(job.generations):
                yield from _choice_events(job, base, index, generation)
        if job.request.stream_options is not None and job.request.stream_options.include_usage:
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


def _choice_events(job: Job, base: dict[str, Any], index: int, generation: Generation) -> Iterator[bytes]:
    if job.kind == "chat":
        yield sse.event({**base, "choices": [{"index": index, "delta": {"role": "assistant", "content": ""},
                                              "logprobs": None, "finish_reason": None}]})
        chunk = sse.ChunkTemplate({**base, "choices": [{"index": index, "delta": {"content": sse.ChunkTemplate.MARK},
                                                        "logprobs": None, "finish_reason": None}]})
    else:
        chunk = sse.ChunkTemplate({**base, "choices": [{"index": index, "text": sse.ChunkTemplate.MARK,
                                                        "logprobs": None, "finish_reason": None}]})
    if job.parse_tools:
        # A tool call is only known once complete: buffer, then send it whole.
        choice = _choice(job, index, "".join(generation), None)
        finish = choice["finish_reason"] or generation.result.finish_reason
        delta = {k: v for k, v in choice["message"].items() if k != "role"}
        if delta.get("tool_calls"):
            delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(delta["tool_calls"])]
        yield sse.event({**base, "choices": [{"index": index, "delta": delta, "logprobs": None,
                                              "finish_reason": None}]})
    else:
        yield from _coalesced(generation, chunk)
        finish = generation.result.finish_reason
    last: dict[str, Any] = {"index": index, "logprobs": None, "finish_reason": finish}
    last.update({"delta": {}} if job.kind == "chat" else {"text": ""})
    yield sse.event({**base, "choices": [last]})


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
    finish = ",".join(str(g.result.finish_reason) for g in job.generations)
    log.info("completion model=%s kind=%s stream=%s status=%d prompt_tokens=%d completion_tokens=%d "
             "seconds=%.3f tokens_per_s=%.1f finish=%s", job.lease.model_id, job.kind, streamed, status,
             usage["prompt_tokens"], usage["completion_tokens"], seconds, rate, finish)
    if job.observer is not None:
        first = next((g.result.first_token_at for g in job.generations if g.result.first_token_at), None)
        job.observer(job.lease.model_id, usage["prompt_tokens"], usage["completion_tokens"],
                     first - job.started if first is not None else None, seconds)
