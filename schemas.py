"""Request schemas for the OpenAI-compatible and admin endpoints (pydantic, strict types).

Unknown fields are ignored, as OpenAI's own clients send fields we have no use for;
fields we know but cannot honour (``echo``, ``suffix``, ``best_of``) are refused by name, so
a client never silently gets less than it asked for.
"""

from __future__ import annotations

import json
import math
import re
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from chat_options import ChatOptions
from engine.protocol import MEDIA_MARKER
from errors import InvalidRequest
from sampling import SamplingFields

MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 1024
MAX_PROMPTS = 16
MAX_CHOICES = 16  # sequences one request may queue in a model's worker: prompts times n
MAX_TOP_LOGPROBS = 20
_TOKEN_ID = re.compile(r"-?[0-9]+")  # ASCII digits only: str.isdigit() takes other scripts' digits too
MAX_EMBEDDING_INPUTS = 2048


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Body):
    include_usage: bool = False


class JsonSchemaFormat(_Body):
    name: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")  # llama-server's shorthand


def parse_duration(value: Any) -> float | None:
    """``keep_alive``: seconds as a number, or ``"90s"``, ``"10m"``, ``"2h"``, ``"1h30m"``; negative: forever."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError("keep_alive must be a number of seconds or a duration such as '10m'")
    seconds: float | None = None
    if isinstance(value, int | float):
        seconds = float(value) if abs(value) < 1e300 else math.inf  # float() of a huge int raises
    elif isinstance(value, str):
        text = value.strip().lower()
        sign = -1.0 if text.startswith("-") else 1.0
        parts = _DURATION.fullmatch(text.lstrip("-"))
        if text.lstrip("-") and parts:
            seconds = sign * sum(float(n) * _UNITS[u] for n, u in _DURATION_PART.findall(text.lstrip("-")))
    if seconds is None:
        raise ValueError("keep_alive must be a number of seconds or a duration such as '30s', '10m', '2h'")
    if not math.isfinite(seconds):
        # An infinite timer would never fire and would put Infinity (invalid JSON) in /health.
        raise ValueError("keep_alive must be finite; use a negative value to keep the model loaded")
    return seconds


_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "": 1}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|)")
_DURATION = re.compile(r"(?:\d+(?:\.\d+)?(?:ms|s|m|h|d|))+")

KeepAlive = Annotated[float | None, BeforeValidator(parse_duration)]


class _Generation(_Body, SamplingFields):
    """Fields shared by chat and text completions (the sampling ones from ``SamplingFields``)."""

    model: str | None = None
    keep_alive: KeepAlive = None
    logit_bias: dict[str, float] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    response_format: ResponseFormat | None = None
    grammar: str | None = None  # llama-server's extension: a GBNF grammar

    @model_validator(mode="after")
    def _refuse_unsupported(self) -> _Generation:
        if isinstance(self.stop, list) and len(self.stop) > MAX_STOP_STRINGS:
            raise _field_error("stop", f"at most {MAX_STOP_STRINGS} stop strings are supported")
        if any(len(stop) > MAX_STOP_LENGTH for stop in self.stops):
            # Every token is checked against every tail of every stop string: a megabyte
            # stop string would make each token cost seconds.
            raise _field_error("stop", f"stop strings may be at most {MAX_STOP_LENGTH} characters long")
        for key, bias in (self.logit_bias or {}).items():
            if not _TOKEN_ID.fullmatch(key):
                raise _field_error("logit_bias", f"keys must be token ids, got {key[:40]!r}")
            if not -100 <= bias <= 100:
                raise _field_error("logit_bias", "values must be between -100 and 100")
        return self


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ImageURL(_Body):
    url: str = Field(min_length=1)
    detail: Literal["auto", "low", "high"] | None = None  # accepted; the projector decides the resolution


class ImagePart(_Body):
    """A picture: a ``data:`` URL (base64), or an http(s) URL from an allowed host."""

    type: Literal["image_url"]
    image_url: ImageURL
    # Where the client put it, when an adapter (Anthropic, Ollama) built this part from its own
    # shape: errors name that instead of this request's path.
    source: str | None = None


class InputAudio(_Body):
    data: str = Field(min_length=1)  # base64
    format: Literal["wav", "mp3"]


class AudioPart(_Body):
    type: Literal["input_audio"]
    input_audio: InputAudio
    source: str | None = None


ContentPart = Annotated[TextPart | ImagePart | AudioPart, Field(discriminator="type")]
MediaPart = ImagePart | AudioPart


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None  # an assistant turn's thinking, sent back (llama.cpp's name)

    def text(self) -> str:
        """The message's text, text parts joined by newlines as llama.cpp's server does; each
        picture or sound is ``MEDIA_MARKER`` where it was (the worker puts the media there)."""
        if isinstance(self.content, list):
            return "\n".join(part.text if isinstance(part, TextPart) else MEDIA_MARKER for part in self.content)
        return self.content or ""

    def media(self) -> list[tuple[int, MediaPart]]:
        """The message's pictures and sounds with their index in ``content``."""
        if not isinstance(self.content, list):
            return []
        return [(index, part) for index, part in enumerate(self.content) if isinstance(part, MediaPart)]


class FunctionDef(_Body):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})


class Tool(_Body):
    type: Literal["function"]
    function: FunctionDef


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: dict[str, str]


class ChatCompletionRequest(_Generation, ChatOptions):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None  # None: true, as OpenAI
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    def media_parts(self) -> list[tuple[str, MediaPart]]:
        """Every picture and sound of the conversation in order, each with where the client put
        it (``messages[0].content[1]``, or what an adapter recorded)."""
        return [(part.source or f"messages[{at}].content[{index}]", part)
                for at, message in enumerate(self.messages) for index, part in message.media()]

    @model_validator(mode="after")
    def _chat_checks(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise _field_error("top_logprobs", "top_logprobs needs logprobs set to true")
        # Assigning marks a field as sent; only copy a value the client really sent, so the
        # model's default max_tokens still applies to chat requests that name neither.
        if self.max_tokens is None and self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        return self


class CompletionRequest(_Generation):
    prompt: str | list[str] | list[int] = Field(...)
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    @model_validator(mode="after")
    def _completion_checks(self) -> CompletionRequest:
        if self.echo:
            raise _field_error("echo", "echo is not supported")
        if self.suffix:
            raise _field_error("suffix", "suffix (fill-in-the-middle) is not supported")
        if self.best_of not in (None, 1):
            raise _field_error("best_of", "only best_of=1 is supported")
        if isinstance(self.prompt, list) and not self.prompt:
            raise _field_error("prompt", "prompt must not be empty")
        if isinstance(self.prompt, list) and isinstance(self.prompt[0], str) and len(self.prompt) > MAX_PROMPTS:
            # Each prompt is a sequence in the model's worker: one request must not queue thousands.
            raise _field_error("prompt", f"at most {MAX_PROMPTS} prompts per request")
        if len(self.prompts()) * self.n > MAX_CHOICES:
            raise _field_error("n", f"at most {MAX_CHOICES} choices per request (prompts times n)")
        return self

    def prompts(self) -> list[str | list[int]]:
        """The prompts, each a string or a list of token ids; each gets ``n`` choices."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if self.prompt and isinstance(self.prompt[0], int):
            return [list(self.prompt)]  # type: ignore[arg-type]
        return list(self.prompt)  # type: ignore[arg-type]


class EmbeddingRequest(_Body):
    model: str | None = None
    keep_alive: KeepAlive = None
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _inputs(self) -> EmbeddingRequest:
        if isinstance(self.input, list):
            if not self.input:
                raise _field_error("input", "input must not be empty")
            if len(self.input) > MAX_EMBEDDING_INPUTS:
                raise _field_error("input", f"at most {MAX_EMBEDDING_INPUTS} inputs per request")
        return self

    def inputs(self) -> list[str | list[int]]:
        """One entry per embedding: a string or a list of token ids."""
        if isinstance(self.input, str):
            return [self.input]
        if isinstance(self.input[0], int):
            return [list(self.input)]  # type: ignore[arg-type]
        return list(self.input)  # type: ignore[arg-type]


class ModelRequest(_Body):
    """``/admin/load`` and ``/admin/unload``."""

    model: str = Field(min_length=1)
    timeout: float | None = Field(None, ge=0, le=3600)
    keep_alive: KeepAlive = None


class _FieldError(ValueError):
    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


def _field_error(param: str, message: str) -> _FieldError:
    return _FieldError(param, message)


Body = TypeVar("Body", bound=BaseModel)


def parse_body(raw: bytes, schema: type[Body]) -> Body:
    """Parse a JSON request body into ``schema`` or raise ``InvalidRequest`` naming the field."""
    try:
        data = json.loads(raw or b"null", parse_constant=_refuse_constant)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"We could not parse the JSON body of your request: {exc}",
                             code="invalid_json") from None
    except RecursionError:
        raise InvalidRequest("The JSON body is nested too deeply", code="invalid_json") from None
    except _NonFinite as exc:
        raise InvalidRequest(f"We could not parse the JSON body of your request: {exc}",
                             code="invalid_json") from None
    if not isinstance(data, dict):
        raise InvalidRequest("The request body must be a JSON object", code="invalid_json")
    bad = _unencodable(data)
    if bad is not None:
        # JSON's \ud800 escapes decode to lone surrogates, which are not text: llama.cpp and
        # every UTF-8 consumer downstream would choke on them.
        raise InvalidRequest(f"Invalid '{bad}': the string holds a lone UTF-16 surrogate, which is not text",
                             param=bad or None)
    return validate_body(data, schema)


def validate_body(data: dict[str, Any], schema: type[Body]) -> Body:
    """Validate parsed JSON (or a body another API's adapter built) into ``schema``, or raise
    ``InvalidRequest`` naming the field."""
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        raise _invalid(exc) from None
    except _FieldError as exc:
        raise InvalidRequest(str(exc), param=exc.param) from None


def _unencodable(value: Any, path: str = "") -> str | None:
    """The path of the first string (or key) that UTF-8 cannot encode, or None."""
    pending = [(value, path)]
    while pending:  # iterative: the body may nest as deep as the JSON parser allows
        item, where = pending.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return where
        elif isinstance(item, dict):
            for key, child in item.items():
                name = f"{where}.{key}" if where else str(key)
                pending.append((key, name))
                pending.append((child, name))
        elif isinstance(item, list):
            pending.extend((child, f"{where}[{i}]") for i, child in enumerate(item))
    return None


class _NonFinite(ValueError):
    pass


def _refuse_constant(name: str) -> Any:
    """``NaN``, ``Infinity`` and ``-Infinity`` are not JSON, though Python's parser accepts them."""
    raise _NonFinite(f"{name} is not a valid JSON value")


def _invalid(exc: ValidationError) -> InvalidRequest:
    first = exc.errors(include_url=False)[0]
    context = first.get("ctx") or {}
    error = context.get("error")
    if isinstance(error, _FieldError):
        return InvalidRequest(f"Invalid '{error.param}': {error}", param=error.param)
    param = _param_path(first["loc"])
    if first["type"] == "missing":
        return InvalidRequest(f"Missing required parameter: '{param}'", param=param, code="missing_required_parameter")
    message = first["msg"].removeprefix("Value error, ")
    return InvalidRequest(f"Invalid '{param}': {message}", param=param)


def _param_path(loc: tuple[Any, ...]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif not (isinstance(part, str) and (part[:1].isupper() or "[" in part or part in ("str", "int"))):
            path += f".{part}" if path else str(part)
    return path
