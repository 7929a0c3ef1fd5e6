"""The one typed configuration schema, fed by the file, the environment and the command line.

Precedence, highest first: command-line flag > environment variable (a ``.env`` file is
read into the environment but never overrides a variable already set) > ``config.json`` >
the defaults written here. Unknown keys and wrong types are errors that name the file
and the key. Relative paths from the file resolve against the file's folder; relative
paths from a flag or the environment resolve against the working directory.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from chat_options import ChatOptions
from engine.ggml_rpc import MAX_SERVERS, parse_endpoint
from sampling import SamplingFields

ENV_PREFIX = "LLAMA_SERVER_"
CONFIG_ENV = ENV_PREFIX + "CONFIG"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ServerSettings(_Section):
    """HTTP side: where to listen, who may call from a browser, waitress limits."""

    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    cors_origins: list[str] = ["http://localhost:5000"]
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    # Streams hold a worker thread each; enough threads keep /health answering.
    threads: int = Field(16, ge=2, le=1024)
    max_request_body: int = Field(4 * 1024 * 1024, ge=1024)
    connection_limit: int = Field(100, ge=1)
    api_keys: list[str] = []  # guard /v1 (an admin key works there too)
    admin_api_keys: list[str] = []  # guard /admin and /metrics (default: the api_keys)
    health_requires_key: bool = False
    # Where the server keeps what it must remember (the stored Responses, ``responses.db``).
    data_directory: Path = Path("./data")
    # Stored responses (``store``, ``previous_response_id``): the newest this many are kept,
    # none older than this many seconds; older ones go as new ones are stored. 0: store none.
    responses_max_count: int = Field(1000, ge=0)
    responses_max_age: float = Field(30 * 86400, gt=0)


class ManagerSettings(_Section):
    """Model side: where models live, how they load, when they unload."""

    models_directory: Path = Path("./models")
    idle_timeout: float = Field(300, ge=0)
    check_interval: float = Field(60, gt=0)
    # Shared by the `parallel` conversations (one unified KV cache): 4,096 cells pushed one of two
    # 2,000-token conversations out to the RAM cache on every turn of the other.
    n_ctx: int = Field(8192, ge=0)
    n_gpu_layers: int = -1
    n_threads: int | None = Field(None, ge=1)
    default_model: str | None = None
    # How long /admin/unload and /admin/reload wait for in-flight requests to finish.
    unload_timeout: float = Field(30, ge=0)
    max_loaded_models: int = Field(0, ge=0)  # 0: no limit
    memory_budget: int | None = None  # bytes, or a size string such as "12GiB"
    load_wait_timeout: float = Field(60, ge=0)  # how long a load waits for room
    max_queue: int = Field(16, ge=1)  # requests waiting per model before 429
    max_tokens_limit: int | None = Field(None, ge=1)  # refuse larger max_tokens with 400 (None: the context)
    preload: list[str] = []
    # Conversations one model serves at once (continuous batching); more wait in its queue.
    parallel: int = Field(4, ge=1, le=64)
    # RAM for the KV state of conversations pushed out of their slot, per model (0: none kept).
    prompt_cache_bytes: int = Field(256 * 2**20, ge=0)
    # A worker that answers nothing for this long while requests wait is killed (a crash).
    worker_timeout: float = Field(60, gt=0)
    # ggml RPC servers (host:port, rpc_worker.py or llama.cpp's rpc-server) every model places
    # layers on; a model's own ``rpc_servers`` replaces this list.
    rpc_servers: list[str] = []
    rpc_timeout: float = Field(5, gt=0)  # seconds for each RPC server's connection and handshake

    # Pictures in chat requests (models with a projector): the largest image file accepted, and
    # the most pixels it may decode to (a small file can hold a huge picture).
    max_image_bytes: int = Field(20 * 2**20, ge=1)
    max_image_pixels: int = Field(40_000_000, ge=1)
    # Different pictures and sounds in one request (a picture sent again is counted once): a
    # small file can decode to tens of megabytes, and decoding is the server's CPU.
    max_media_per_request: int = Field(16, ge=1)
    # Sounds (``input_audio``, WAV) for models whose projector hears: the largest file accepted.
    max_audio_bytes: int = Field(20 * 2**20, ge=1)
    # ``image_url`` parts with http(s) URLs are fetched only from these hosts (none: data: URLs
    # only), within this many seconds, and never from loopback or private addresses unless
    # ``image_url_private`` allows it.
    image_url_hosts: list[str] = []
    image_url_timeout: float = Field(10, gt=0)
    image_url_private: bool = False

    @field_validator("rpc_servers")
    @classmethod
    def _check_rpc_servers(cls, value: list[str]) -> list[str]:
        return check_rpc_servers(value)

    @field_validator("memory_budget", "prompt_cache_bytes", "max_image_bytes", "max_audio_bytes",
                     mode="before")
    @classmethod
    def _parse_size(cls, value: Any) -> Any:
        return parse_size(value) if isinstance(value, str) else value


class SamplingDefaults(_Section, SamplingFields, ChatOptions):
    """Per-model defaults merged under each request's own fields (only those set here): the
    sampling fields, and for chat the dialect options (``chat_options``)."""


class ModelSettings(_Section):
    """Settings of one model, keyed by its id in the top-level ``models`` section."""

    aliases: list[str] = []
    idle_timeout: float | None = Field(None, ge=-1)  # 0: unload when idle; -1: never
    pinned: bool = False  # never evicted by the idle job or capacity pressure
    n_ctx: int | None = Field(None, ge=0)
    n_gpu_layers: int | None = None
    n_threads: int | None = Field(None, ge=1)
    n_batch: int | None = Field(None, ge=1)
    parallel: int | None = Field(None, ge=1, le=64)
    flash_attn: bool | None = None
    use_mlock: bool | None = None
    use_mmap: bool | None = None
    embedding: bool = False  # an embedding model: /v1/embeddings only
    rpc_servers: list[str] | None = None  # replaces model_manager.rpc_servers ([]: this model stays local)
    chat_template: str | None = None  # a Jinja template replacing the model's own
    # The multimodal projector (images, audio): a path (relative: to the models folder), or ""
    # for none. Unset: the ``mmproj*.gguf`` beside the model file, by the rule in ``discovery``.
    mmproj: str | None = None
    load: dict[str, Any] = {}  # any other llama_cpp.Llama argument, checked by name and type
    default: SamplingDefaults = SamplingDefaults()

    @field_validator("rpc_servers")
    @classmethod
    def _check_rpc_servers(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else check_rpc_servers(value)

    @field_validator("load")
    @classmethod
    def _check_llama_arguments(cls, value: dict[str, Any]) -> dict[str, Any]:
        check_llama_arguments(value)
        return value

    def load_arguments(self) -> dict[str, Any]:
        """The llama_cpp.Llama arguments this section sets (beyond the global ones)."""
        keys = ("n_batch", "flash_attn", "use_mlock", "use_mmap")
        named = {key: getattr(self, key) for key in keys if getattr(self, key) is not None}
        return {**self.load, **named}


class Settings(_Section):
    """The whole configuration."""

    server: ServerSettings = ServerSettings()
    model_manager: ManagerSettings = ManagerSettings()
    models: dict[str, ModelSettings] = {}

    @model_validator(mode="after")
    def _aliases_are_unique(self) -> Settings:
        seen: dict[str, str] = {}
        for model_id, model in self.models.items():
            for alias in model.aliases:
                if alias in seen or alias in self.models:
                    raise ValueError(f"alias {alias!r} of {model_id} is already used by {seen.get(alias, alias)}")
                seen[alias] = model_id
        return self


_SIZE_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
               "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """``"12GiB"`` -> bytes; plain numbers are bytes."""
    number = text.strip().lower()
    digits = number.rstrip("abcdefghijklmnopqrstuvwxyz ").strip()
    unit = number[len(digits):].strip()
    if unit not in _SIZE_UNITS:
        raise ValueError(f"unknown size unit {unit!r} (use e.g. 512MiB, 12GiB, 8GB)")
    try:
        return int(float(digits) * _SIZE_UNITS[unit])
    except ValueError:
        raise ValueError(f"not a size: {text!r}") from None


# Arguments the server itself decides; a config may not set them through ``load``.
_RESERVED_LLAMA_ARGUMENTS = {"self", "model_path", "verbose", "embedding", "chat_handler", "draft_model", "tokenizer",
                             "kwargs", "n_ctx", "n_gpu_layers", "n_threads", "chat_format"}


def check_llama_arguments(arguments: dict[str, Any]) -> None:
    """Raise ValueError unless every key is a ``llama_cpp.Llama`` argument of a fitting type."""
    import inspect

    from llama_cpp import Llama

    parameters = inspect.signature(Llama.__init__).parameters
    for name, value in arguments.items():
        if name in _RESERVED_LLAMA_ARGUMENTS or name not in parameters:
            raise ValueError(f"{name!r} is not a llama_cpp.Llama argument that can be set here")
        default = parameters[name].default
        if default is None or default is inspect.Parameter.empty or value is None:
            continue
        expected = (int, float) if isinstance(default, float) else type(default)
        if isinstance(value, bool) is not isinstance(default, bool) or not isinstance(value, expected):
            raise ValueError(f"{name!r} must be of type {type(default).__name__}")


def check_rpc_servers(endpoints: list[str]) -> list[str]:
    """Each ``host:port`` as ggml's RPC client reads it; duplicates are refused."""
    # Its ValueError says what is wrong. Compared as (host, port): "h:50052" and "H:050052" are one
    # server, which would serve the second connection only after the first closed (a hung load).
    servers = {(host.lower(), port) for host, port in map(parse_endpoint, endpoints)}
    if len(servers) != len(endpoints):
        raise ValueError("an RPC server is listed twice")
    if len(endpoints) > MAX_SERVERS:
        raise ValueError(f"at most {MAX_SERVERS} RPC servers (ggml's limit)")
    return endpoints


class ConfigError(ValueError):
    """A configuration that cannot be used; the message is one line for a person."""


# Every leaf key can be set as LLAMA_SERVER_<KEY>; keys are unique across sections.
ENV_KEYS: dict[str, tuple[str, str]] = {
    ENV_PREFIX + key.upper(): (section, key)
    for section, model in (("server", ServerSettings), ("model_manager", ManagerSettings))
    for key in model.model_fields
}


def load_settings(path: Path | None, overrides: dict[str, dict[str, Any]] | None = None,
                  environ: dict[str, str] | None = None, *, required: bool = False) -> Settings:
    """Read ``path``, apply the environment then ``overrides``, and validate.

    A missing file means built-in defaults unless ``required`` (the user named it).
    """
    if path is not None and not path.exists() and required:
        raise ConfigError(f"{path}: file not found")
    data = _read_file(path) if path is not None and path.exists() else {}
    base_dir = path.parent if path is not None else Path.cwd()
    _resolve_file_paths(data, base_dir)
    env_layer = _from_environ(os.environ if environ is None else environ)
    layers = [env_layer, overrides or {}]
    for layer in layers:
        for section, values in layer.items():
            target = data.setdefault(section, {})
            if not isinstance(target, dict):
                break
            target.update(values)
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(path, exc, env_layer, overrides or {})) from None


def _read_file(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a JSON object")
    return data


_PATH_KEYS = (("model_manager", "models_directory"), ("server", "data_directory"))


def _resolve_file_paths(data: dict[str, Any], base_dir: Path) -> None:
    for section_name, key in _PATH_KEYS:
        section = data.get(section_name)
        if isinstance(section, dict) and isinstance(section.get(key), str):
            directory = Path(section[key]).expanduser()
            section[key] = str(directory if directory.is_absolute() else base_dir / directory)


def _from_environ(environ: dict[str, str] | os._Environ[str]) -> dict[str, dict[str, Any]]:
    layer: dict[str, dict[str, Any]] = {}
    for name, (section, key) in ENV_KEYS.items():
        if name in environ:
            layer.setdefault(section, {})[key] = _parse_env_value(key, environ[name])
    return layer


def _parse_env_value(key: str, raw: str) -> Any:
    if key in ("cors_origins", "api_keys", "admin_api_keys", "rpc_servers", "image_url_hosts"):
        if raw.lstrip().startswith("["):  # a JSON list, as the other list settings take
            with contextlib.suppress(json.JSONDecodeError):
                return json.loads(raw)
        return [item.strip() for item in raw.split(",") if item.strip()]
    if key in ("models_directory", "data_directory"):
        return str(Path(raw).expanduser().resolve())
    if raw.strip().lower() in ("", "null", "none"):
        return None
    if key in _STRING_KEYS:
        return raw  # a model named "2024" stays a string
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def _is_text(annotation: Any) -> bool:
    """str, Optional[str] or a Literal: values taken verbatim from the environment."""
    origin = get_origin(annotation)
    return annotation is str or origin is Literal or (origin in (Union, UnionType) and str in get_args(annotation))


_STRING_KEYS = {key for model in (ServerSettings, ManagerSettings)
                for key, info in model.model_fields.items() if _is_text(info.annotation)}


def _describe(path: Path | None, exc: ValidationError, env_layer: dict[str, dict[str, Any]],
              overrides: dict[str, dict[str, Any]]) -> str:
    """One line per problem, naming where the bad value came from: flag, environment or file."""
    parts = []
    for error in exc.errors():
        loc = tuple(str(p) for p in error["loc"])
        key = ".".join(loc) or "(top level)"
        message = "unknown key" if error["type"] == "extra_forbidden" else error["msg"]
        section, leaf = (*loc, "", "")[:2]
        if leaf in overrides.get(section, {}):
            where = "command line"
        elif leaf in env_layer.get(section, {}):
            where = f"environment {ENV_PREFIX}{leaf.upper()}"
        else:
            where = str(path) if path is not None else "configuration"
        parts.append(f"{where}: {key}: {message}")
    return "; ".join(parts)
