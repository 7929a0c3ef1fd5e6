"""Responses items and chat messages, both ways.

A Responses conversation is a list of items: messages, ``reasoning``, ``function_call`` and
``function_call_output``. The completion core speaks chat messages, so the items become
messages (``messages``), an answer's ``ChoiceResult`` becomes output items (``output_items``),
and the client's input items are written down in the shapes OpenAI returns them in
(``stored_items``: ids, statuses, content parts), which is how they are stored and listed.

One assistant turn is spread over several items (its reasoning, its text, its calls, in that
order); ``messages`` folds each run of them back into one assistant message.
"""

from __future__ import annotations

import uuid
from typing import Any

from completions import ChoiceResult
from responses_schemas import FunctionCallItem, FunctionCallOutputItem, MessageItem, ReasoningItem, TextContent

Item = dict[str, Any]


def new_id(prefix: str) -> str:
    """A fresh id in OpenAI's style (``resp_…``, ``msg_…``, ``fc_…``, ``rs_…``)."""
    return f"{prefix}_{uuid.uuid4().hex}"


# ------------------------------------------------------------- client input, stored


def stored_items(request_input: str | list[Any]) -> list[Item]:
    """The request's ``input`` as stored items: ids and statuses filled in, text as content parts."""
    if isinstance(request_input, str):
        return [_message_item(MessageItem(role="user", content=request_input))]
    return [_STORE[type(item)](item) for item in request_input]


def _message_item(item: MessageItem) -> Item:
    parts = [TextContent(type="input_text", text=item.content)] if isinstance(item.content, str) else item.content
    if item.role == "assistant":
        content = [_output_text(part.text) for part in parts]
    else:
        content = [{"type": "input_text", "text": part.text} for part in parts]
    return {"type": "message", "id": item.id or new_id("msg"), "role": item.role, "content": content,
            "status": "completed"}


def _call_item(item: FunctionCallItem) -> Item:
    return {"type": "function_call", "id": item.id or new_id("fc"), "call_id": item.call_id, "name": item.name,
            "arguments": item.arguments, "status": "completed"}


def _call_output_item(item: FunctionCallOutputItem) -> Item:
    output = item.output if isinstance(item.output, str) else "".join(part.text for part in item.output)
    return {"type": "function_call_output", "id": item.id or new_id("fco"), "call_id": item.call_id,
            "output": output, "status": "completed"}


def _reasoning_item(item: ReasoningItem) -> Item:
    stored: Item = {"type": "reasoning", "id": item.id or new_id("rs"),
                    "summary": [part.model_dump() for part in item.summary]}
    if item.content is not None:
        stored["content"] = [part.model_dump() for part in item.content]
    return stored


_STORE = {MessageItem: _message_item, FunctionCallItem: _call_item, FunctionCallOutputItem: _call_output_item,
          ReasoningItem: _reasoning_item}


def _output_text(text: str) -> Item:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


# ------------------------------------------------------------- items to chat messages


def messages(instructions: str | None, items: list[Item]) -> list[dict[str, Any]]:
    """Chat messages for ``instructions`` (a system message) and the conversation ``items``."""
    chat: list[dict[str, Any]] = [{"role": "system", "content": instructions}] if instructions else []
    turn: dict[str, Any] | None = None  # the assistant message the current run of output items builds
    for item in items:
        kind = item.get("type", "message")
        if kind == "function_call_output":
            turn = None
            chat.append({"role": "tool", "tool_call_id": item["call_id"], "content": _text(item["output"])})
        elif kind == "message" and item["role"] != "assistant":
            turn = None
            chat.append({"role": item["role"], "content": _text(item["content"])})
        else:
            if turn is None or _begins_a_turn(turn, kind):
                turn = {"role": "assistant", "content": ""}
                chat.append(turn)
            _add_to_turn(turn, kind, item)
    return chat


def _begins_a_turn(turn: dict[str, Any], kind: str) -> bool:
    """A turn reads reasoning, then text, then calls: an item of an earlier kind starts the next one."""
    if kind == "reasoning":
        return "reasoning_content" in turn or bool(turn["content"]) or "tool_calls" in turn
    if kind == "message":
        return bool(turn["content"]) or "tool_calls" in turn
    return False


def _add_to_turn(turn: dict[str, Any], kind: str, item: Item) -> None:
    if kind == "reasoning":
        turn["reasoning_content"] = reasoning_text(item)
    elif kind == "message":
        turn["content"] = _text(item["content"])
    else:
        turn.setdefault("tool_calls", []).append({"id": item["call_id"], "type": "function", "function": {
            "name": item["name"], "arguments": item["arguments"]}})


def reasoning_text(item: Item) -> str:
    """A reasoning item's text: its full text where it has one, else its summary."""
    parts = item.get("content") or item.get("summary") or []
    return "\n".join(part["text"] for part in parts)


def _text(content: str | list[Item]) -> str:
    if isinstance(content, str):
        return content
    return "\n".join(part["text"] for part in content)


# ------------------------------------------------------------- an answer as output items


def output_items(result: ChoiceResult, incomplete: bool, summary: bool) -> list[Item]:
    """The output items of a whole answer: its reasoning, its text, its calls (the last item
    ``incomplete`` when the answer was cut short). ``summary``: the reasoning also fills the
    item's ``summary``, which some clients show instead of its content."""
    items: list[Item] = []
    if result.reasoning:
        items.append(reasoning_item(new_id("rs"), result.reasoning, summary))
    if result.content or not (items or result.tool_calls):
        items.append(message_item(new_id("msg"), result.content or ""))
    for call in result.tool_calls:
        items.append(call_item(new_id("fc"), call["id"], call["function"]["name"], call["function"]["arguments"]))
    if incomplete:
        items[-1]["status"] = "incomplete"
    return items


def reasoning_item(item_id: str, text: str, summary: bool, status: str = "completed") -> Item:
    return {"type": "reasoning", "id": item_id, "summary": [{"type": "summary_text", "text": text}] if summary else [],
            "content": [{"type": "reasoning_text", "text": text}], "status": status}


def message_item(item_id: str, text: str, status: str = "completed") -> Item:
    return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": [_output_text(text)]}


def call_item(item_id: str, call_id: str, name: str, arguments: str, status: str = "completed") -> Item:
    return {"type": "function_call", "id": item_id, "call_id": call_id, "name": name, "arguments": arguments,
            "status": status}


def estimated_reasoning_tokens(items: list[Item], output_tokens: int) -> int:
    """The model's tokens spent thinking, estimated by the reasoning's share of the text it wrote
    (the worker counts tokens per answer, not per part)."""
    reasoning = sum(len(reasoning_text(item)) for item in items if item["type"] == "reasoning")
    written = reasoning + sum(len(_text(item["content"])) for item in items if item["type"] == "message")
    written += sum(len(item["name"]) + len(item["arguments"]) for item in items if item["type"] == "function_call")
    return round(output_tokens * reasoning / written) if written else 0
