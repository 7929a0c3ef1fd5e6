"""The benchmark's temporary world: a models folder, the generated models, a server config.

Everything lives in one temporary folder that ``Workspace.close`` deletes, the ~190 MB
"big" model included. stories260K is copied in, not linked: the server refuses
symlinks that leave its models folder.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from bench.inprocess import N_CTX, N_THREADS

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
STORIES_ID = "stories260K"
# The folder holding stories260K.gguf; the tests read the same variable.
MODELS_ENV = "LLAMA_TEST_MODELS"
DEFAULT_SHARED_MODELS = ROOT.parent / "shared" / "models"

# Models generated with tests/gguf_factory.write_llama_model: id -> its arguments.
GENERATED: dict[str, dict[str, Any]] = {
    "mid": {"n_embd": 256, "n_layer": 4, "n_ff": 704, "seed": 11},
    "big": {"n_embd": 1024, "n_layer": 8, "n_ff": 2816, "dtype": "f16", "seed": 12},
}
# In a smoke run, copies of stories260K stand in for the generated models.
SMOKE_STAND_INS = {"mid": "stories260K-mid", "big": "stories260K-big"}


@dataclass(frozen=True)
class Model:
    """A model as both sides know it: the server's id and the file the in-process side loads."""

    role: str  # "stories", "mid" or "big"
    id: str
    path: Path


def stories_path() -> Path:
    """Where stories260K.gguf is (``$LLAMA_TEST_MODELS``, else ../shared/models)."""
    return Path(os.environ.get(MODELS_ENV, DEFAULT_SHARED_MODELS)) / f"{STORIES_ID}.gguf"


class Workspace:
    """A temporary models folder holding the benchmark's models, and a config for our server."""

    def __init__(self, *, smoke: bool) -> None:
        source = stories_path()
        if not source.is_file():
            raise FileNotFoundError(f"{source} not found (set {MODELS_ENV} to the folder holding it)")
        self.root = Path(tempfile.mkdtemp(prefix="llama-bench-"))
        self.models_dir = self.root / "models"
        self.models_dir.mkdir()
        try:
            self.models = {"stories": self._copy(source, "stories", STORIES_ID)}
            for role, spec in GENERATED.items():
                if smoke:
                    self.models[role] = self._copy(source, role, SMOKE_STAND_INS[role])
                else:
                    self.models[role] = self._generate(role, spec)
        except BaseException:
            self.close()
            raise

    def _copy(self, source: Path, role: str, model_id: str) -> Model:
        target = self.models_dir / f"{model_id}.gguf"
        shutil.copyfile(source, target)
        return Model(role, model_id, target)

    def _generate(self, role: str, spec: dict[str, Any]) -> Model:
        path = self.models_dir / f"{role}.gguf"
        log.info("writing the %s model %s", role, spec)
        _gguf_factory().write_llama_model(path, **spec)
        return Model(role, role, path)

    def write_config(self) -> Path:
        """Our server's config: these models, one thread, CPU only, the in-process side's context."""
        config = {
            "server": {"host": "127.0.0.1", "log_level": "INFO"},
            "model_manager": server_model_settings(self.models_dir),
        }
        path = self.root / "config.json"
        path.write_text(json.dumps(config, indent=2), encoding="utf-8")
        return path

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Workspace:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def server_model_settings(models_dir: Path) -> dict[str, Any]:
    """The ``model_manager`` section: nothing may unload a model behind the benchmark's back."""
    return {"models_directory": str(models_dir), "n_ctx": N_CTX, "n_threads": N_THREADS, "n_gpu_layers": 0,
            "idle_timeout": 86400, "check_interval": 3600}


def _gguf_factory() -> ModuleType:
    """tests/gguf_factory.py, loaded by path (tests/ is not a package)."""
    spec = importlib.util.spec_from_file_location("gguf_factory", ROOT / "tests" / "gguf_factory.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
