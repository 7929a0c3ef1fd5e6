"""Find the models in the models folder: which ``*.gguf`` files are models, and their ids.

Rules: every ``*.gguf`` below the folder, recursively; the id is the file name without
``.gguf``; split models (``name-00001-of-00003.gguf``) are one model named ``name`` and
loaded from the first part; when two files in different sub-folders share an id, both are
named by their relative path instead. Nothing outside the folder is ever returned: symlinks
that leave it are skipped.

Multimodal projectors (``mmproj*.gguf``, any case) are not models; a model is paired with
one in its own folder (a model's ``mmproj`` setting overrides this): the only one there, or,
when there are several, the one whose name after ``mmproj`` (and ``-``, ``_`` or ``.``)
shares the longest start with the model's file name, e.g. ``mmproj-gemma-3-4b-it-f16.gguf``
for ``gemma-3-4b-it-Q4_K_M.gguf`` beside ``mmproj-qwen2.5-vl-7b-f16.gguf``. A tie, or no
shared start at all, pairs none (a warning says so).
"""

from __future__ import annotations

import logging
import os
import re
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

log = logging.getLogger(__name__)

_SPLIT = re.compile(r"^(?P<base>.+)-(?P<part>\d{5})-of-(?P<total>\d{5})$")


@dataclass(frozen=True)
class ModelFile:
    """A discovered model: its id, the file to load, its size on disk (all parts), its mtime."""

    id: str
    path: Path
    size: int
    created: int = 0
    mmproj: Path | None = None  # the projector paired by the folder rule (see the module docstring)
    unpaired: tuple[str, ...] = ()  # the projectors beside it when the rule could pick none of several


def discover(models_dir: Path) -> dict[str, ModelFile]:
    """Scan ``models_dir`` and return the models found, keyed by id."""
    root = models_dir.resolve()
    if not root.is_dir():
        return {}
    groups: dict[str, list[tuple[int, Path]]] = defaultdict(list)
    projectors: dict[Path, list[Path]] = defaultdict(list)
    for path in _gguf_files(root):
        stem = path.name[: -len(".gguf")]
        if stem.lower().startswith("mmproj"):
            projectors[path.parent].append(path)
            continue
        match = _SPLIT.match(stem)
        part = int(match["part"]) if match else 1
        relative_stem = path.relative_to(root).with_name(match["base"] if match else stem)
        groups[relative_stem.as_posix()].append((part, path))
    models = _assign_ids(root, groups)
    return {model_id: _paired(file, projectors.get(file.path.parent, [])) for model_id, file in models.items()}


def _paired(file: ModelFile, candidates: list[Path]) -> ModelFile:
    mmproj = pair_projector(file.path, candidates)
    unpaired = tuple(sorted(p.name for p in candidates)) if mmproj is None and candidates else ()
    return replace(file, mmproj=mmproj, unpaired=unpaired)


def pair_projector(model: Path, candidates: list[Path]) -> Path | None:
    """The projector of ``model`` among the ``mmproj*.gguf`` files of its folder (the rule in
    the module docstring), or None."""
    if len(candidates) <= 1:
        return candidates[0] if candidates else None
    name = model.name.lower()

    def shared(candidate: Path) -> int:
        rest = candidate.name.lower()[len("mmproj"):].lstrip("-_.")
        return next((i for i, (a, b) in enumerate(zip(rest, name, strict=False)) if a != b), min(len(rest), len(name)))

    ranked = sorted(candidates, key=shared, reverse=True)
    if shared(ranked[0]) == 0 or shared(ranked[0]) == shared(ranked[1]):
        return None  # ambiguous: ``ModelFile.unpaired`` says so, and the registry logs it
    return ranked[0]


def _gguf_files(root: Path) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False, onerror=_warn_walk):
        dirnames.sort()
        for name in sorted(filenames):
            if not name.lower().endswith(".gguf"):
                continue
            path = Path(dirpath) / name
            if not is_inside(root, path):
                log.warning("skipping %s: it points outside the models folder", path)
                continue
            found.append(path)
    return found


def _warn_walk(error: OSError) -> None:
    log.warning("cannot read %s: %s", error.filename, error.strerror)


def _assign_ids(root: Path, groups: dict[str, list[tuple[int, Path]]]) -> dict[str, ModelFile]:
    by_name: dict[str, list[str]] = defaultdict(list)
    for relative in groups:
        by_name[relative.rsplit("/", 1)[-1]].append(relative)
    models: dict[str, ModelFile] = {}
    for name, relatives in by_name.items():
        if len(relatives) > 1:
            log.warning("model id %s is used by %s; using their relative paths as ids",
                        name, ", ".join(sorted(relatives)))
        for relative in relatives:
            model_id = name if len(relatives) == 1 else relative
            parts = sorted(groups[relative])
            first = parts[0][1]
            models[model_id] = ModelFile(model_id, first, sum(_size(p) for _, p in parts), _mtime(first))
    return dict(sorted(models.items()))


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _mtime(path: Path) -> int:
    try:
        return int(path.stat().st_mtime)
    except OSError:
        return 0


def is_inside(root: Path, path: Path) -> bool:
    """Whether ``path``, with every symlink followed, lies inside ``root`` (already resolved)."""
    try:
        return path.resolve().is_relative_to(root)
    except (OSError, RuntimeError):
        return False
