"""OpenAI's Responses API (``/v1/responses``): a thin adapter over the chat completion core.

A request becomes a ``ChatCompletionRequest`` (instructions and items as messages, function
tools, ``text.format`` as ``response_format``, ``max_output_tokens`` as ``max_tokens``) and is
judged, leased, queued, generated and read in the model's dialect exactly as
``/v1/chat/completions`` is; only the shapes differ. With ``store`` (the default, as OpenAI) the
response and the conversation it answered are kept in the ``ResponseStore``, so
``previous_response_id`` continues it and the client sends only the new turn.

Errors come back in OpenAI's ``{"error": {...}}`` shape, naming this API's parameters
(``max_output_tokens``, ``text.format``, ``input``); once a stream has started they travel as
an ``error`` event followed by ``response.failed``.
"""

from __future__ import annotations

import copy
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from flask import Blueprint, Response, jsonify, request
from pydantic import ValidationError

import completions
import sse
from completions import ChoiceEvent, Finished, Job
from dialects import Content, Reasoning, ToolCallArgs, ToolCallStart
from errors import InvalidRequest, NotFound, ServiceError
from request_checks import judge
from response_store import ResponseStore, StoredResponse
from responses_items import (
    Item,
    call_item,
    estimated_reasoning_tokens,
    message_item,
    messages,
    new_id,
    output_items,
    reasoning_item,
    stored_items,
)
from responses_schemas import InputItemsQuery, ResponseRequest
from schemas import ChatCompletionRequest, _invalid, parse_body
from state import app_state

bp = Blueprint("responses", __name__, url_prefix="/v1/responses")


@bp.post("")
def create_response() -> Response:
    """Generate a response to ``input`` (after ``previous_response_id``'s conversation, if given)."""
    body = parse_body(request.get_data(), ResponseRequest)
    state = app_state()
    store: ResponseStore = state.responses
    with _own_params():
        previous = _previous(store, body.previous_response_id)
        history = (previous.items + previous.response["output"] if previous else []) + stored_items(body.input)
        chat = chat_request(body, history, previous.response["model"] if previous else None)
        verdict = judge(state.manager, chat, state.grammars)
        turn = Turn(body, chat, history, store)
        disconnected = request.environ.get("waitress.client_disconnected") or (lambda: False)
        observer = state.metrics.observe_completion
        if body.stream:
            return completions.stream_with(state.manager, "chat", chat, verdict, disconnected, state.pool,
                                           ResponseStream(turn), observer)
        job = completions.prepare(state.manager, "chat", chat, verdict, disconnected, observer)
        result = completions.results(job)[0]
    incomplete = result.finish_reason == "length"
    summary = body.reasoning is not None and body.reasoning.summary is not None
    return jsonify(turn.finish(job, output_items(result, incomplete, summary), incomplete))


@bp.get("/<response_id>")
def get_response(response_id: str) -> Response:
    """A stored response."""
    return jsonify(_stored(response_id).response)


@bp.delete("/<response_id>")
def delete_response(response_id: str) -> Response:
    """Forget a stored response (continuing from it is no longer possible)."""
    if not app_state().responses.delete(response_id):
        raise _not_found(response_id)
    return jsonify({"id": response_id, "object": "response.deleted", "deleted": True})


@bp.get("/<response_id>/input_items")
def input_items(response_id: str) -> Response:
    """The items a stored response answered (earlier turns included), newest first unless
    ``order=asc``, ``limit`` at a time, from after the item ``after``."""
    try:
        query = InputItemsQuery.model_validate(request.args.to_dict(), strict=False)
    except ValidationError as exc:
        raise _invalid(exc) from None
    items = _stored(response_id).items
    if query.order == "desc":
        items = items[::-1]
    start = 0
    if query.after is not None:
        start = next((i + 1 for i, item in enumerate(items) if item.get("id") == query.after), -1)
        if start < 0:
            raise InvalidRequest(f"No input item '{query.after[:100]}' in response '{response_id[:100]}'",
                                 param="after")
    page = items[start:start + query.limit]
    return jsonify({"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                    "last_id": page[-1]["id"] if page else None, "has_more": start + query.limit < len(items)})


def _previous(store: ResponseStore, response_id: str | None) -> StoredResponse | None:
    if response_id is None:
        return None
    previous = store.get(response_id)
    if previous is None:
        raise NotFound(f"Previous response with id '{response_id[:100]}' not found", param="previous_response_id",
                       code="previous_response_not_found")
    return previous


def _stored(response_id: str) -> StoredResponse:
    stored = app_state().responses.get(response_id)
    if stored is None:
        raise _not_found(response_id)
    return stored


def _not_found(response_id: str) -> NotFound:
    return NotFound(f"No response found with id '{response_id[:100]}'", param="response_id")


# ------------------------------------------------------------- the request, as chat


def chat_request(body: ResponseRequest, items: list[Item], model: str | None) -> ChatCompletionRequest:
    """The chat request that answers ``body`` given the conversation ``items``; ``model`` is the
    previous response's, used when the body names none."""
    data: dict[str, Any] = {"messages": messages(body.instructions, items), "stream": body.stream,
                            **body.extensions()}
    if body.model or model:
        data["model"] = body.model or model
    if "keep_alive" in body.model_fields_set:
        data["keep_alive"] = body.keep_alive
    if body.tools:
        data["tools"] = [{"type": "function", "function": {
            key: value for key, value in tool.model_dump(include={"name", "description", "parameters"}).items()
            if value is not None}} for tool in body.tools]
    if body.tool_choice is not None:
        choice = body.tool_choice
        data["tool_choice"] = choice if isinstance(choice, str) else {"type": "function",
                                                                       "function": {"name": choice.name}}
    for ours, theirs in (("parallel_tool_calls", "parallel_tool_calls"), ("max_output_tokens", "max_tokens"),
                         ("temperature", "temperature"), ("top_p", "top_p")):
        if getattr(body, ours) is not None:
            data[theirs] = getattr(body, ours)
    fmt = body.text.format if body.text is not None else None
    if fmt is not None and fmt.type == "json_schema":
        data["response_format"] = {"type": "json_schema", "json_schema": {
            "name": fmt.name, "schema": fmt.schema_ or {}, "strict": fmt.strict}}
    elif fmt is not None and fmt.type == "json_object":
        data["response_format"] = {"type": "json_object"}
    if body.reasoning is not None and body.reasoning.effort is not None:
        data["reasoning_effort"] = body.reasoning.effort
    try:
        return ChatCompletionRequest.model_validate(data)
    except ValidationError as exc:
        raise _invalid(exc) from None


# The chat request's parameter names, as the Responses request calls them.
_PARAMS = {"messages": "input", "max_tokens": "max_output_tokens", "response_format": "text.format",
           "reasoning_effort": "reasoning.effort"}
_TOOL_PARAM = re.compile(r"tools\[(\d+)\]\.function\.")


def own_param(param: str | None) -> str | None:
    """``param`` of an error from the chat core, named as this API names it."""
    if param is None:
        return None
    head, dot, rest = param.partition(".")
    if head in _PARAMS:
        return _PARAMS[head] + dot + rest
    return _TOOL_PARAM.sub(r"tools[\1].", param)


@contextmanager
def _own_params() -> Iterator[None]:
    try:
        yield
    except ServiceError as exc:
        exc.rename_param(own_param(exc.param))
        raise


# ------------------------------------------------------------- the response


@dataclass
class Turn:
    """One request's answer in the making: what its response echoes, and where it is stored."""

    body: ResponseRequest
    chat: ChatCompletionRequest
    items: list[Item]  # the conversation it answers
    store: ResponseStore
    id: str = field(default_factory=lambda: new_id("resp"))
    created: int = field(default_factory=lambda: int(time.time()))

    def response(self, model: str, status: str, output: list[Item], usage: dict[str, Any] | None) -> dict[str, Any]:
        """The response object in ``status`` (``in_progress``, ``completed``, ``incomplete``, ``failed``)."""
        body = self.body
        fmt = body.text.format if body.text is not None else None
        choice = body.tool_choice
        response = {
            "id": self.id, "object": "response", "created_at": self.created, "status": status,
            "completed_at": int(time.time()) if status == "completed" else None, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": body.instructions, "max_output_tokens": body.max_output_tokens, "model": model,
            "output": output, "parallel_tool_calls": body.parallel_tool_calls is not False,
            "previous_response_id": body.previous_response_id,
            "reasoning": {"effort": body.reasoning.effort if body.reasoning else None,
                          "summary": body.reasoning.summary if body.reasoning else None},
            "store": body.store, "temperature": self.chat.temperature, "top_p": self.chat.top_p,
            "text": {"format": _format_echo(fmt)},
            "tool_choice": "auto" if choice is None else choice if isinstance(choice, str) else choice.model_dump(),
            "tools": [tool.model_dump() for tool in body.tools], "truncation": "disabled",
            "metadata": body.metadata or {},
        }
        if usage is not None:  # the spec has no null usage: it is left out until known
            response["usage"] = usage
        return response

    def finish(self, job: Job, output: list[Item], incomplete: bool) -> dict[str, Any]:
        """The final response of ``job``, stored if the request asked for that."""
        response = self.response(job.lease.model_id, "incomplete" if incomplete else "completed", output,
                                 _usage(job, output))
        if self.body.store:
            self.store.put(response, self.items)
        return response


def _format_echo(fmt: Any) -> dict[str, Any]:
    if fmt is None or fmt.type == "text":
        return {"type": "text"}
    if fmt.type == "json_object":
        return {"type": "json_object"}
    echo = {"type": "json_schema", "name": fmt.name or "response", "schema": fmt.schema_ or {}, "strict": fmt.strict}
    if fmt.description is not None:
        echo["description"] = fmt.description
    return echo


def _usage(job: Job, output: list[Item]) -> dict[str, Any]:
    usage = job.usage()
    prompt, completion = usage["prompt_tokens"], usage["completion_tokens"]
    cached = usage["prompt_tokens_details"]["cached_tokens"]
    return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": cached,
                                                             "cache_write_tokens": prompt - cached},
            "output_tokens": completion,
            "output_tokens_details": {"reasoning_tokens": estimated_reasoning_tokens(output, completion)},
            "total_tokens": prompt + completion}


# ------------------------------------------------------------- streaming


_ERROR_CODES = {400: "invalid_prompt", 429: "rate_limit_exceeded"}  # the spec's codes for a failed response


class ResponseStream(completions.StreamRenderer):
    """A response streamed as OpenAI's typed events.

    Each output item opens with ``response.output_item.added`` (and its content part), grows by
    deltas, and closes with its ``.done`` events when the next item opens or the answer ends;
    the last event is ``response.completed`` (or ``response.incomplete``), or ``error`` then
    ``response.failed``.
    """

    def __init__(self, turn: Turn) -> None:
        self.turn = turn
        self.sequence = 0
        self.model = turn.chat.model or ""
        self.output: list[Item] = []
        self.open: Item | None = None  # the item receiving deltas
        self.calls: dict[int, Item] = {}  # the dialect's call index -> its item
        self.started = False
        self.incomplete = False  # the answer ran out of max_output_tokens
        self._summary = turn.body.reasoning is not None and turn.body.reasoning.summary is not None
        self._handlers: dict[type, Callable[[Any], Iterator[bytes]]] = {
            Content: self._content, Reasoning: self._reasoning, ToolCallStart: self._call_start,
            ToolCallArgs: self._call_args, Finished: self._finished}

    def start(self, job: Job) -> Iterator[bytes]:
        self.model = job.lease.model_id
        yield from self._begin()

    def event(self, job: Job, index: int, event: ChoiceEvent) -> Iterator[bytes]:
        return self._handlers[type(event)](event)

    def end(self, job: Job) -> Iterator[bytes]:
        if not self.output:  # an answer with nothing in it is still one (empty) message
            yield from self._open(message_item(new_id("msg"), "", "in_progress"))
            yield from self._close("incomplete" if self.incomplete else "completed")
        response = self.turn.finish(job, self.output, self.incomplete)
        yield self._emit("response.incomplete" if self.incomplete else "response.completed", response=response)

    def error(self, error: ServiceError) -> Iterator[bytes]:
        if not self.started:
            yield from self._begin()
        error.rename_param(own_param(error.param))
        yield self._emit("error", code=error.code, message=error.message, param=error.param)
        failed = self.turn.response(self.model, "failed", self.output, None)
        failed["error"] = {"code": _ERROR_CODES.get(error.status, "server_error"), "message": error.message}
        yield self._emit("response.failed", response=failed)

    def _begin(self) -> Iterator[bytes]:
        self.started = True
        response = self.turn.response(self.model, "in_progress", [], None)
        yield self._emit("response.created", response=response)
        yield self._emit("response.in_progress", response=response)

    def _emit(self, kind: str, **fields: Any) -> bytes:
        payload = {"type": kind, **fields, "sequence_number": self.sequence}
        self.sequence += 1
        return sse.typed_event(payload)

    def _where(self, item: Item) -> dict[str, Any]:
        return {"item_id": item["id"], "output_index": self.output.index(item)}

    def _open(self, item: Item) -> Iterator[bytes]:
        """Close the open item and open ``item`` (its one content part, if any, starts empty)."""
        yield from self._close()
        parts = item.get("content") or []
        added = {**item, "content": []} if "content" in item else item
        self.output.append(item)
        self.open = item
        yield self._emit("response.output_item.added", output_index=len(self.output) - 1, item=added)
        for part in parts:
            yield self._emit("response.content_part.added", **self._where(item), content_index=0, part=part)

    def _close(self, status: str = "completed") -> Iterator[bytes]:
        item, self.open = self.open, None
        if item is None:
            return
        where = self._where(item)
        if item["type"] == "message":
            part = item["content"][0]
            yield self._emit("response.output_text.done", **where, content_index=0, text=part["text"], logprobs=[])
            yield self._emit("response.content_part.done", **where, content_index=0, part=part)
        elif item["type"] == "reasoning":
            part = item["content"][0]
            if self._summary:
                item["summary"] = [{"type": "summary_text", "text": part["text"]}]
            yield self._emit("response.reasoning_text.done", **where, content_index=0, text=part["text"])
            yield self._emit("response.content_part.done", **where, content_index=0, part=part)
        else:
            yield self._emit("response.function_call_arguments.done", **where, name=item["name"],
                             arguments=item["arguments"])
        item["status"] = status
        yield self._emit("response.output_item.done", output_index=where["output_index"], item=copy.deepcopy(item))

    def _content(self, event: Content) -> Iterator[bytes]:
        if self.open is None or self.open["type"] != "message":
            if not event.text.strip():  # layout between items, not a message
                return
            yield from self._open(message_item(new_id("msg"), "", "in_progress"))
        assert self.open is not None
        self.open["content"][0]["text"] += event.text
        yield self._emit("response.output_text.delta", **self._where(self.open), content_index=0, delta=event.text,
                         logprobs=[])

    def _reasoning(self, event: Reasoning) -> Iterator[bytes]:
        if not event.text:
            return
        if self.open is None or self.open["type"] != "reasoning":
            yield from self._open(reasoning_item(new_id("rs"), "", False, "in_progress"))
        assert self.open is not None
        self.open["content"][0]["text"] += event.text
        yield self._emit("response.reasoning_text.delta", **self._where(self.open), content_index=0,
                         delta=event.text)

    def _call_start(self, event: ToolCallStart) -> Iterator[bytes]:
        item = call_item(new_id("fc"), event.id, event.name, "", "in_progress")
        self.calls[event.index] = item
        yield from self._open(item)

    def _call_args(self, event: ToolCallArgs) -> Iterator[bytes]:
        item = self.calls.get(event.index)
        if item is None or not event.fragment:
            return
        item["arguments"] += event.fragment
        yield self._emit("response.function_call_arguments.delta", **self._where(item), delta=event.fragment)

    def _finished(self, event: Finished) -> Iterator[bytes]:
        self.incomplete = event.reason == "length"
        yield from self._close("incomplete" if self.incomplete else "completed")
