"""The chat fields that shape a model's dialect, defined once.

Chat requests take them (``schemas.ChatCompletionRequest``) and a model's ``default`` section
may set them (``config.SamplingDefaults``), named as llama.cpp's server names them:

* ``reasoning_format``: ``"auto"`` (the default) and ``"deepseek"`` return a thinking model's
  reasoning apart from its answer (``reasoning_content``); ``"none"`` leaves it inline in
  ``content``.
* ``chat_template_kwargs``: extra variables for the model's chat template, such as Qwen3's
  ``{"enable_thinking": false}``.
* ``reasoning_effort``: gpt-oss's (and OpenAI's) effort level; the template reads it.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

ReasoningFormat = Literal["auto", "deepseek", "none"]
ReasoningEffort = Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"]
# Variables the renderer itself passes to every template: a request may not replace them.
RESERVED_TEMPLATE_VARIABLES = frozenset({
    "messages", "tools", "tool_choice", "functions", "function_call", "add_generation_prompt",
    "bos_token", "eos_token", "raise_exception", "strftime_now", "reasoning_effort",
    "self"})  # the formatter's own first argument
MAX_TEMPLATE_KWARGS = 32


class ChatOptions(BaseModel):
    """How a chat request's prompt is rendered and its answer read (see the module docstring)."""

    reasoning_format: ReasoningFormat = "auto"
    chat_template_kwargs: dict[str, Any] | None = Field(None, max_length=MAX_TEMPLATE_KWARGS)
    reasoning_effort: ReasoningEffort | None = None

    @field_validator("chat_template_kwargs")
    @classmethod
    def _no_reserved_names(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        clash = sorted(RESERVED_TEMPLATE_VARIABLES & set(value or {}))
        if clash:
            raise ValueError(f"{', '.join(clash)} cannot be set through chat_template_kwargs")
        return value

    @property
    def separates_reasoning(self) -> bool:
        """Whether reasoning goes to ``reasoning_content`` rather than staying in ``content``."""
        return self.reasoning_format != "none"

