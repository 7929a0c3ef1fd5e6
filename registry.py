"""What models there are and how each is configured: the discovered files, the aliases, the settings.

Concurrency: one lock (``lock``) guards the file list, the settings and the alias map. The
owner passes it in so that the model manager guards its instances with the same lock
(one lock, one place in the lock order: after ``_room``, before any instance's ``cond``).
It is held only for dictionary work, never for a scan of the folder or a header read, so
a rescan never stalls ``/health``. Methods named ``*_locked`` expect their caller to hold
it, and ``rediscover`` calls its ``sync`` hook with it held; every other method takes it
itself, so call those holding neither it nor an instance's ``cond``. A rescan prompted by
a lookup (``rescan_if_stale``) runs the owner's ``rescan``, because a file that went away
also concerns the owner's instances.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from config import ManagerSettings, ModelSettings
from discovery import ModelFile, discover
from errors import InvalidRequest, ModelNotFound
from gguf_meta import Shape, model_shape

log = logging.getLogger("model_manager")  # discovery lines keep the logger name they always had

Clock = Callable[[], float]
Sync = Callable[[dict[str, ModelFile]], None]

MAX_NAME_LENGTH = 512
REDISCOVER_INTERVAL = 1.0  # seconds between rescans prompted by unknown model names
NO_SETTINGS = ModelSettings()


class Registry:
    """The models folder as last scanned, and the ``model_manager`` and ``models`` settings."""

    def __init__(self, settings: ManagerSettings, models: dict[str, ModelSettings] | None = None, *,
                 lock: threading.Lock | None = None, rescan: Callable[[], Any] | None = None,
                 clock: Clock = time.monotonic) -> None:
        """``rescan``: what a stale lookup runs (default: ``rediscover``); ``clock`` times rescans."""
        self.lock = lock or threading.Lock()
        self._settings = settings
        self._models = dict(models or {})
        self._aliases = _alias_map(self._models)
        self._files: dict[str, ModelFile] = {}
        self._last_scan = float("-inf")
        self._rescan = rescan or (lambda: self.rediscover(quiet=True))
        self._clock = clock

    @property
    def settings(self) -> ManagerSettings:
        """The ``model_manager`` section in force (replaced whole by ``configure``)."""
        return self._settings

    def configure(self, settings: ManagerSettings, models: dict[str, ModelSettings] | None = None) -> None:
        """Use new settings from now on; the caller rescans (``rediscover``) afterwards."""
        with self.lock:
            self._settings = settings
            self._models = dict(models or {})
            self._aliases = _alias_map(self._models)

    def model_settings(self, model_id: str) -> ModelSettings:
        """The ``models`` section entry for ``model_id`` (empty defaults if none)."""
        with self.lock:
            return self._models.get(model_id, NO_SETTINGS)

    def settings_for(self, model_id: str) -> tuple[ManagerSettings, ModelSettings]:
        """The global and the model's settings, from one and the same configuration."""
        with self.lock:
            return self._settings, self._models.get(model_id, NO_SETTINGS)

    # ----------------------------------------------------------------- discovery

    def rediscover(self, *, quiet: bool = False, sync: Sync | None = None) -> tuple[list[str], list[str]]:
        """Rescan the models folder; return (added ids, removed ids).

        ``sync`` gets the new file list with the lock held, in the same step that installs
        it, so the owner's bookkeeping never disagrees with the list. ``quiet`` (a rescan
        prompted by a listing or an unknown name) leaves out the warnings that a start or a
        reload gives: a missing folder, and config entries without a file unless the
        folder changed.
        """
        directory = self._settings.models_directory
        if not directory.is_dir() and not quiet:
            log.warning("models folder %s does not exist; put .gguf files there and POST /admin/reload",
                        directory)
        found = discover(directory)
        with self.lock:
            self._last_scan = self._clock()
            added = sorted(set(found) - set(self._files))
            removed = sorted(set(self._files) - set(found))
            self._files = found
            if sync is not None:
                sync(found)
            unknown = sorted(set(self._models) - set(found))
        for model_id in added:
            file = found[model_id]
            log.info("model discovered model=%s path=%s mmproj=%s", model_id, file.path, file.mmproj or "-")
            if file.unpaired:
                log.warning("model %s has several projectors beside it and none fits its name best (%s); set its "
                            "mmproj setting to use one", model_id, ", ".join(file.unpaired))
        for model_id in removed:
            log.info("model removed model=%s reason=file_gone", model_id)
        if unknown and (added or removed or not quiet):
            log.warning("config names models that are not in the models folder: %s", ", ".join(unknown))
        if added:
            # Read the new files' headers now, off the request path: the listings show their
            # memory estimates, and a large vocabulary takes tens of milliseconds to skip.
            threading.Thread(target=_read_shapes, args=([found[i] for i in added],), name="gguf-meta",
                             daemon=True).start()
        return added, removed

    def rescan_if_stale(self) -> bool:
        """Pick up files copied in or deleted since the last scan, at most once a second;
        whether it rescanned."""
        with self.lock:
            now = self._clock()
            if now - self._last_scan <= REDISCOVER_INTERVAL:
                return False
            self._last_scan = now  # claimed: callers meanwhile use what is known
        self._rescan()
        return True

    # ------------------------------------------------------------------ lookups

    def resolve(self, name: str | None) -> str:
        """Map a request's model name, alias, or None (the default) to a model id."""
        if name is None:
            name = self._settings.default_model
            if name is None:
                raise InvalidRequest("you must provide a model parameter (no default_model is configured)",
                                     param="model", code="missing_model")
        if not name or len(name) > MAX_NAME_LENGTH or "\x00" in name:
            raise ModelNotFound(f"The model '{name[:100]}' does not exist", param="model")
        for attempt in range(2):
            with self.lock:
                for candidate in (name, name[:-5] if name.endswith(".gguf") else None):
                    if candidate is None:
                        continue
                    candidate = self._aliases.get(candidate, candidate)
                    if candidate in self._files:
                        return candidate
                available = list(self._files)
            # A file may have been dropped in since the last scan.
            if attempt == 1 or not self.rescan_if_stale():
                break
        hint = f"; available: {', '.join(available[:5])}" if available else "; no models are installed"
        more = f" and {len(available) - 5} more" if len(available) > 5 else ""
        raise ModelNotFound(f"The model '{name[:100]}' does not exist{hint}{more}", param="model")

    def model_file(self, model_id: str) -> ModelFile:
        """The discovered file of ``model_id`` (an id from ``resolve``)."""
        with self.lock:
            file = self._files.get(model_id)
        if file is None:
            raise ModelNotFound(f"The model '{model_id}' does not exist", param="model")
        return file

    def header(self, model_id: str) -> Shape | None:
        """What the model's GGUF header says (vocabulary size, width...), without loading it."""
        file = self.model_file(model_id)
        return model_shape(file.path, file.size, file.created)

    def file_locked(self, model_id: str) -> ModelFile | None:
        """The file of ``model_id``, or None. Caller holds ``lock``."""
        return self._files.get(model_id)

    def listing_locked(self) -> tuple[list[ModelFile], dict[str, ModelSettings]]:
        """Every file and a copy of the per-model settings, for a listing. Caller holds ``lock``."""
        return list(self._files.values()), dict(self._models)


def _read_shapes(files: list[ModelFile]) -> None:
    for file in files:
        model_shape(file.path, file.size, file.created)


def _alias_map(models: dict[str, ModelSettings]) -> dict[str, str]:
    return {alias: model_id for model_id, model in models.items() for alias in model.aliases}
