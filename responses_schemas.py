"""The request body of ``POST /v1/responses`` (OpenAI's Responses API), in pydantic.

What a local model can honour is taken; what it cannot is refused by name rather than
ignored: built-in tools (web search, file search, ...) and non-text inputs fail as shapes,
``background``, ``conversation`` and ``truncation: "auto"`` are refused. Fields with no
effect here (``user``, ``include``, ``service_tier``, ...) are ignored, as OpenAI's clients
send them. llama.cpp's extensions (``grammar``, ``logit_bias``, ``top_k``, ``seed``, ...) are
accepted and passed on to the chat request under the same names.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag, model_validator

from chat_options import ReasoningEffort
from schemas import KeepAlive, _Body, _field_error

MAX_METADATA_KEYS = 16


class TextContent(_Body):
    """A text part of a message: ``input_text`` from the client, ``output_text`` from the model."""

    type: Literal["input_text", "output_text"]
    text: str


class MessageItem(_Body):
    type: Literal["message"] = "message"
    id: str | None = None
    role: Literal["user", "assistant", "system", "developer"]
    content: list[TextContent] | str = Field(union_mode="left_to_right")


class FunctionCallItem(_Body):
    type: Literal["function_call"]
    id: str | None = None
    call_id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    arguments: str


class FunctionCallOutputItem(_Body):
    type: Literal["function_call_output"]
    id: str | None = None
    call_id: str = Field(min_length=1)
    output: list[TextContent] | str = Field(union_mode="left_to_right")


class SummaryText(_Body):
    type: Literal["summary_text"]
    text: str


class ReasoningText(_Body):
    type: Literal["reasoning_text"]
    text: str


class ReasoningItem(_Body):
    type: Literal["reasoning"]
    id: str | None = None
    summary: list[SummaryText] = []
    content: list[ReasoningText] | None = None


# Tags are capitalised so that an error's parameter path leaves them out (``input[0].content``).
_TAGS = {"message": "Message", "function_call": "FunctionCall", "function_call_output": "FunctionCallOutput",
         "reasoning": "Reasoning"}


def _item_tag(value: Any) -> str | None:
    """An item's tag by its ``type``; a message may leave ``type`` out (OpenAI's "easy" input message)."""
    kind = value.get("type", "message") if isinstance(value, dict) else getattr(value, "type", None)
    return _TAGS.get(kind) if isinstance(kind, str) else None


InputItem = Annotated[
    Annotated[MessageItem, Tag("Message")] | Annotated[FunctionCallItem, Tag("FunctionCall")]
    | Annotated[FunctionCallOutputItem, Tag("FunctionCallOutput")] | Annotated[ReasoningItem, Tag("Reasoning")],
    Discriminator(_item_tag, custom_error_type="unsupported_item", custom_error_message=(
        "only message, function_call, function_call_output and reasoning items are supported"))]


class FunctionTool(_Body):
    """Responses' flat function tool (``{"type": "function", "name", "parameters", ...}``)."""

    type: Literal["function"]
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class FunctionChoice(_Body):
    type: Literal["function"]
    name: str = Field(min_length=1)


class TextFormat(_Body):
    type: Literal["text", "json_schema", "json_object"]
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class TextParam(_Body):
    format: TextFormat | None = None


class ReasoningParam(_Body):
    effort: ReasoningEffort | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None


# llama.cpp's extensions, handed to the chat request as sent (it checks their bounds).
EXTENSIONS = ("top_k", "min_p", "seed", "stop", "repeat_penalty", "presence_penalty", "frequency_penalty",
              "ignore_eos", "logit_bias", "grammar", "reasoning_format", "chat_template_kwargs")


class ResponseRequest(_Body):
    """``POST /v1/responses``."""

    model: str | None = None
    input: list[InputItem] | str = Field(union_mode="left_to_right")  # a list's errors are the ones to report
    instructions: str | None = None
    previous_response_id: str | None = None
    store: bool = True
    stream: bool = False
    tools: list[FunctionTool] = []
    tool_choice: Literal["none", "auto", "required"] | FunctionChoice | None = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    text: TextParam | None = None
    reasoning: ReasoningParam | None = None
    metadata: dict[str, str] | None = Field(None, max_length=MAX_METADATA_KEYS)
    keep_alive: KeepAlive = None
    background: bool | None = None
    conversation: Any = None
    truncation: Literal["auto", "disabled"] | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    repeat_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    ignore_eos: bool | None = None
    logit_bias: dict[str, float] | None = None
    grammar: str | None = None
    reasoning_format: Literal["auto", "deepseek", "none"] | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _refuse_unsupported(self) -> ResponseRequest:
        if self.background:
            raise _field_error("background", "background responses are not supported; stream instead")
        if self.conversation is not None:
            raise _field_error("conversation", "conversations are not supported; use previous_response_id")
        if self.truncation == "auto":
            raise _field_error("truncation", "truncation 'auto' is not supported; the context window is the limit")
        if isinstance(self.input, list) and not self.input and self.previous_response_id is None:
            raise _field_error("input", "input must not be empty")
        return self

    def extensions(self) -> dict[str, Any]:
        """The llama.cpp extension fields the client sent."""
        return {name: getattr(self, name) for name in EXTENSIONS
                if name in self.model_fields_set and getattr(self, name) is not None}


class InputItemsQuery(_Body):
    """``GET /v1/responses/{id}/input_items``'s query."""

    limit: int = Field(20, ge=1, le=100)
    order: Literal["asc", "desc"] = "desc"
    after: str | None = None
