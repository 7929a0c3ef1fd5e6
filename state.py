"""The per-app objects the views need, kept in ``app.extensions`` (no module globals)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flask import current_app

from config import Settings
from grammar.checker import GrammarChecker
from model_manager import ModelManager

EXTENSION = "llama_cpp_server"


@dataclass
class AppState:
    """What one app instance owns: its settings, its model manager, its scheduler, its grammar checker."""

    settings: Settings
    manager: ModelManager
    config_path: Path | None
    overrides: dict[str, dict[str, Any]]
    metrics: Any = None
    activity: Any = None  # an ActivityLog: recent completions per model (the status page's charts)
    memory: Any = None  # a MemoryProbe: the machine's RAM and VRAM, the workers' RSS
    pool: Any = None  # runs the loads that streams wait for while they send ": loading" comments
    scheduler: Any = None
    event_streams: Any = None  # a BoundedSemaphore: open /admin/events streams
    config_from_file: bool = False  # the running config was read from config_path (so it must stay there)
    responses: Any = None  # a ResponseStore: the stored Responses (opens its file on first use)
    grammars: GrammarChecker = field(default_factory=GrammarChecker)  # starts its helper on the first grammar
    started: float = field(default_factory=time.monotonic)


def app_state() -> AppState:
    """The state of the app handling the current request."""
    return current_app.extensions[EXTENSION]
