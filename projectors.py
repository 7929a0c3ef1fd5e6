"""Which multimodal projector a model uses, what it reads, and the capabilities listings show.

A projector (``mmproj*.gguf``) is the model's ``mmproj`` setting when set (a path, relative to
the models folder; ``""`` for none), else the one ``discovery`` paired with the model file by
the folder rule. What it reads (pictures, sounds) comes from its GGUF header
(``clip.has_vision_encoder``, ``clip.has_audio_encoder``), read once per file version.
Pure functions over paths and settings: no locks, no llama.cpp.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from config import ModelSettings
from discovery import ModelFile
from gguf_meta import GGUFError, read_metadata

# The header keys of a projector's encoders and the media each reads.
_ENCODERS = (("clip.has_vision_encoder", "image"), ("clip.has_audio_encoder", "audio"))
_CAPABILITY = {"image": "vision", "audio": "audio"}


def projector_path(file: ModelFile, settings: ModelSettings, models_directory: Path) -> Path | None:
    """The projector file ``file``'s model loads with, or None."""
    if settings.mmproj is None:
        return file.mmproj
    if not settings.mmproj:
        return None
    path = Path(settings.mmproj).expanduser()
    return path if path.is_absolute() else models_directory / path


def projector_media(path: Path | None) -> tuple[str, ...]:
    """What the projector at ``path`` reads (``"image"``, ``"audio"``); () when none or unreadable."""
    if path is None:
        return ()
    try:
        stat = path.stat()
    except OSError:
        return ()
    return _media(path, stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=64)
def _media(path: Path, _mtime_ns: int, _size: int) -> tuple[str, ...]:
    try:
        meta = read_metadata(path)
    except (OSError, GGUFError):
        return ()
    return tuple(kind for key, kind in _ENCODERS if meta.get(key) is True)


def projector_size(path: Path | None) -> int:
    """The projector file's size in bytes (0: none), for memory estimates."""
    try:
        return path.stat().st_size if path is not None else 0
    except OSError:
        return 0


def capabilities(settings: ModelSettings, media: tuple[str, ...]) -> list[str]:
    """What a model can be asked for: ``embedding`` (an embedding model), or ``completion``
    and what its projector reads (``vision``, ``audio``)."""
    if settings.embedding:
        return ["embedding"]
    return ["completion", *(_CAPABILITY[kind] for kind in media if kind in _CAPABILITY)]
