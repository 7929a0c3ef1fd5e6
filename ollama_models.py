"""The models as Ollama's ``/api/tags``, ``/api/ps`` and ``/api/show`` describe them.

Names: Ollama clients send ``name:tag``. A model's id is its name and ``:latest`` its only tag
(``qwen3:latest`` is the model ``qwen3``); an id that itself holds a colon (a file named
``qwen3:8b.gguf``) is matched as it is. The ``digest`` is a fingerprint of the file's id, size
and modification time, not a hash of its bytes: hashing a many-gigabyte file on every listing
would cost minutes.

Pure functions over the manager's views and the files' GGUF headers (cached per file version).
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from chat_format import file_dialect
from config import ModelSettings
from discovery import ModelFile
from errors import ModelNotFound
from gguf_meta import ArrayLength, GGUFError, read_metadata
from model_manager import ModelManager
from ollama_schemas import OPTION_FIELDS
from projectors import capabilities

FOREVER = "9999-12-31T23:59:59Z"  # expires_at of a model that never unloads by itself
TEMPLATE_KEY = "tokenizer.chat_template"
# llama.cpp's ``general.file_type`` (enum llama_ftype) -> the name Ollama shows.
FILE_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
              11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M",
              18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S",
              25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S", 29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M",
              32: "BF16", 36: "TQ1_0", 37: "TQ2_0", 38: "MXFP4_MOE"}


def resolve_name(manager: ModelManager, name: str) -> str:
    """The model id an Ollama client's ``name`` (or ``name:tag``) means."""
    candidates = [name]
    base, colon, tag = name.rpartition(":")
    if colon and tag == "latest" and base:
        candidates.append(base)
    for candidate in candidates:
        try:
            return manager.resolve(candidate)
        except ModelNotFound:
            continue
    raise ModelNotFound(f'model "{name[:100]}" not found: models are the GGUF files in the server\'s models '
                        "folder (GET /api/tags lists them)", param="model")


def ollama_name(model_id: str) -> str:
    """How a model is listed: its id with the ``latest`` tag (ids with a colon as they are)."""
    return model_id if ":" in model_id else f"{model_id}:latest"


def tags(manager: ModelManager) -> dict[str, Any]:
    """``/api/tags``: every model in the folder."""
    models = []
    for view in manager.models():
        file = manager.model_file(view["id"])
        models.append({**_entry(file), "modified_at": _iso(file.created)})
    return {"models": models}


def running(manager: ModelManager, offload: bool) -> dict[str, Any]:
    """``/api/ps``: the loaded models, with their memory and when they unload if left idle.
    ``offload``: llama.cpp can put layers on a GPU (then a model's ``n_gpu_layers`` decides)."""
    models = []
    for view in manager.models():
        instances = [view] + ([view["embeddings"]] if "embeddings" in view else [])
        loaded = [i for i in instances if i["state"] == "loaded"]
        if not loaded:
            continue
        size = sum(i["estimated_memory_bytes"] for i in loaded)
        layers = manager.model_settings(view["id"]).n_gpu_layers
        gpu = offload and (layers if layers is not None else manager.settings.n_gpu_layers) != 0
        models.append({**_entry(manager.model_file(view["id"])), "size": size, "size_vram": size if gpu else 0,
                       "expires_at": _expires(loaded, view["pinned"])})
    return {"models": models}


def show(manager: ModelManager, model_id: str) -> dict[str, Any]:
    """``/api/show``: template, parameters, GGUF metadata and capabilities of one model."""
    file = manager.model_file(model_id)
    settings = manager.model_settings(model_id)
    meta = _metadata(file.path)
    template = settings.chat_template or meta.get(TEMPLATE_KEY)
    return {"license": meta.get("general.license", ""),
            "modelfile": f"# llama-cpp-server: {model_id} is a GGUF file in the models folder\nFROM {model_id}\n",
            "parameters": _parameters(settings), "template": template if isinstance(template, str) else "",
            "details": _details(meta), "model_info": _model_info(meta),
            "capabilities": _capabilities(file, settings, meta, manager.media(model_id)),
            "modified_at": _iso(file.created)}


def has_template(manager: ModelManager, model_id: str) -> bool:
    """Whether the model has a chat template (its own, or one set in the config)."""
    template = manager.model_settings(model_id).chat_template or _metadata(manager.model_file(model_id).path).get(
        TEMPLATE_KEY)
    return isinstance(template, str) and bool(template)


def _entry(file: ModelFile) -> dict[str, Any]:
    digest = hashlib.sha256(f"{file.id}\0{file.size}\0{file.created}".encode()).hexdigest()
    name = ollama_name(file.id)
    return {"name": name, "model": name, "size": file.size, "digest": digest,
            "details": _details(_metadata(file.path))}


def _expires(instances: list[dict[str, Any]], pinned: bool) -> str:
    """When the model unloads if nothing uses it (the latest of its instances)."""
    if pinned or any(i["idle_timeout"] < 0 for i in instances):
        return FOREVER
    now = datetime.now(UTC).timestamp()
    times = [i["expires_at"] if i["expires_at"] is not None else now + i["idle_timeout"] for i in instances]
    return _iso(max(times))


def _details(meta: dict[str, Any]) -> dict[str, Any]:
    arch = meta.get("general.architecture")
    family = arch if isinstance(arch, str) else ""
    file_type = meta.get("general.file_type")
    return {"parent_model": "", "format": "gguf", "family": family, "families": [family] if family else None,
            "parameter_size": _parameter_size(meta),
            "quantization_level": FILE_TYPES.get(file_type, "") if isinstance(file_type, int) else ""}


def _parameter_size(meta: dict[str, Any]) -> str:
    label = meta.get("general.size_label")
    if isinstance(label, str) and label:
        return label
    count = meta.get("general.parameter_count")
    if isinstance(count, int) and count > 0:
        for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
            if count >= scale:
                return f"{count / scale:.1f}{unit}"
        return str(count)
    return ""


def _model_info(meta: dict[str, Any]) -> dict[str, Any]:
    """The header's metadata; arrays (the vocabulary) as null, as Ollama shows them unless verbose."""
    return {key: None if isinstance(value, ArrayLength) else value
            for key, value in meta.items() if key != TEMPLATE_KEY}


def _capabilities(file: ModelFile, settings: ModelSettings, meta: dict[str, Any], media: tuple[str, ...]) -> list[str]:
    arch = meta.get("general.architecture")
    found = []
    if settings.embedding or f"{arch}.pooling_type" in meta:
        found.append("embedding")
    if settings.embedding:
        return found
    found.append("completion")
    template = settings.chat_template or meta.get(TEMPLATE_KEY)
    dialect = file_dialect(file.path, settings.chat_template)
    if (isinstance(template, str) and "tools" in template) or dialect.name != "generic":
        found.append("tools")
    if dialect.reasoning_markers is not None or dialect.program is not None:
        found.append("thinking")
    found.extend(capability for capability in capabilities(settings, media) if capability in ("vision", "audio"))
    return found


def _parameters(settings: ModelSettings) -> str:
    """The model's configured sampling defaults, one ``name value`` line each, as a Modelfile's."""
    theirs = {ours: name for name, ours in OPTION_FIELDS.items()}
    lines = []
    for field in sorted(settings.default.model_fields_set):
        value = getattr(settings.default, field)
        values = value if isinstance(value, list) else [value]
        lines.extend(f"{theirs.get(field, field)} {v!r}" if isinstance(v, str) else f"{theirs.get(field, field)} {v}"
                     for v in values)
    return "\n".join(lines)


def _metadata(path: Path) -> dict[str, Any]:
    try:
        stat = path.stat()
    except OSError:
        return {}
    return _read(path, stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=64)
def _read(path: Path, mtime_ns: int, size: int) -> dict[str, Any]:
    try:
        return read_metadata(path)
    except (OSError, GGUFError):
        return {}


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
