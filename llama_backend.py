"""Everything that touches llama-cpp-python's loading: constructing ``Llama`` safely, and
turning a failed load into a precise error.

Why not ``Llama(verbose=False)``: it silences output by ``dup2``-ing file descriptors 1
and 2 to /dev/null for the whole process during the load. In a threaded server that
swallows every other thread's log lines while a model loads, and two loads racing on
``dup2`` can leave stderr pointing at /dev/null for good. So we load with
``verbose=True`` and instead (a) route llama.cpp's C log callback into Python logging and
(b) route the Python-level prints of a loading thread into that thread's log buffer.
Both are installed once, process-wide, and are thread-aware; nothing is swapped back.
"""

from __future__ import annotations

import ctypes
import io
import logging
import sys
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import llama_cpp

from discovery import ModelFile
from errors import LoadFailed, NotAModel

log = logging.getLogger(__name__)
native_log = logging.getLogger("llama_cpp.native")

_local = threading.local()
_install_lock = threading.Lock()
_installed = False
# ggml's levels: 1 debug, 2 info, 3 warn, 4 error, 5 continues the previous line.
# llama.cpp's info output is a page per load, so it goes to DEBUG.
_GGML_LEVELS = {1: logging.DEBUG, 2: logging.DEBUG, 3: logging.WARNING, 4: logging.ERROR}
_GGML_WARN = 3
_GGML_CONT = 5
EMBEDDING_BATCH = 512  # tokens per embedding input; bigger batches cost compute memory


@dataclass(frozen=True)
class LoadOptions:
    """What a load needs besides the file; fixed at the moment the load starts."""

    n_ctx: int
    n_gpu_layers: int
    n_threads: int | None
    embedding: bool = False
    extra: dict[str, Any] = field(default_factory=dict)  # more llama_cpp.Llama arguments
    progress: Callable[[float], None] | None = field(default=None, compare=False)


def load_llama(model: ModelFile, options: LoadOptions) -> llama_cpp.Llama:
    """Load ``model`` with llama-cpp-python; raise ``NotAModel`` or ``LoadFailed`` with the reason."""
    install_log_routing()
    _local.capture = deque(maxlen=40)
    _local.progress = _progress_callback(options.progress) if options.progress else None
    kwargs: dict[str, Any] = {
        "n_ctx": options.n_ctx,
        "n_gpu_layers": options.n_gpu_layers,
        "n_threads": options.n_threads,
        "n_threads_batch": options.n_threads,
        "embedding": options.embedding,
        "verbose": True,  # see the module docstring: verbose=False dup2s stdout/stderr
        **options.extra,
    }
    if options.embedding:
        # An embedding input is decoded in one micro-batch, so the batch bounds its length.
        n_batch = min(options.n_ctx, EMBEDDING_BATCH) if options.n_ctx else EMBEDDING_BATCH
        kwargs.update(n_batch=n_batch, n_ubatch=n_batch)
    try:
        return llama_cpp.Llama(model_path=str(model.path), **kwargs)
    except Exception as exc:  # llama-cpp-python raises ValueError/RuntimeError/OSError alike
        raise _diagnose(model, exc) from None
    finally:
        _local.capture = None
        _local.progress = None


def _diagnose(model: ModelFile, exc: Exception) -> Exception:
    """Tell a file that is not a model (422) from a model llama.cpp could not load (500)."""
    problem = inspect_gguf(model.path)
    if problem:
        return NotAModel(f"{model.id} is not a loadable model: {problem}", param="model")
    native = [line for line in (getattr(_local, "capture", None) or ()) if line]
    reason = native[-1] if native else str(exc)
    return LoadFailed(f"failed to load model {model.id}: {reason}")


def inspect_gguf(path: Path) -> str | None:
    """Return why ``path`` is not a usable GGUF model file, or None if it looks like one."""
    try:
        with path.open("rb") as handle:
            magic = handle.read(4)
    except OSError as exc:
        return f"cannot read the file: {exc.strerror}"
    if magic != b"GGUF":
        return "not a GGUF file"
    from gguf import GGUFReader  # only on the failure path: parsing a large vocab is slow

    try:
        reader = GGUFReader(path)
    except Exception as exc:  # the reader raises assorted errors on damaged files
        return f"truncated or corrupt GGUF ({type(exc).__name__}: {exc})"
    if not reader.tensors:
        return "the file holds no tensors (a vocab-only GGUF)"
    end = max(t.data_offset + t.n_bytes for t in reader.tensors)
    if end > path.stat().st_size:
        return "truncated GGUF: tensor data runs past the end of the file"
    return None


def install_log_routing() -> None:
    """Route llama.cpp's native log and loading threads' stderr prints into logging (once)."""
    global _installed
    with _install_lock:
        if _installed:
            return
        llama_cpp.llama_log_set(_native_log_callback, ctypes.c_void_p(0))
        sys.stderr = _ThreadRoutedStderr(sys.stderr)
        _install_progress_hook()
        _installed = True


def _install_progress_hook() -> None:
    """Let a loading thread receive llama.cpp's load progress.

    ``Llama.__init__`` takes no progress callback, but it builds its model parameters with
    ``llama_model_default_params()`` looked up on the ``llama_cpp.llama_cpp`` module at call
    time; wrapping that function adds the calling thread's callback, if it set one.
    """
    bindings = llama_cpp.llama_cpp
    original = bindings.llama_model_default_params

    def default_params_with_progress() -> Any:
        params = original()
        callback = getattr(_local, "progress", None)
        if callback is not None:
            params.progress_callback = callback
        return params

    bindings.llama_model_default_params = default_params_with_progress


def _progress_callback(report: Callable[[float], None]) -> Any:
    @llama_cpp.llama_progress_callback
    def on_progress(progress: float, _user_data: ctypes.c_void_p) -> bool:
        try:
            report(float(progress))
        except Exception:  # an exception must not cross into C
            log.exception("load progress callback failed")
        return True

    return on_progress


@llama_cpp.llama_log_callback
def _native_log_callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    if level == _GGML_CONT:
        level = getattr(_local, "last_level", 1)
    _local.last_level = level
    message = text.decode("utf-8", errors="replace").rstrip()
    if not message:
        return
    capture = getattr(_local, "capture", None)
    if capture is not None and level >= _GGML_WARN:
        capture.append(message)
    native_log.log(_GGML_LEVELS.get(level, logging.DEBUG), "%s", message)


class _ThreadRoutedStderr(io.TextIOBase):
    """sys.stderr that sends a loading thread's prints to the debug log instead of the tty."""

    def __init__(self, target: Any) -> None:
        self._target = target

    def write(self, text: str) -> int:
        if getattr(_local, "capture", None) is not None:
            if text.strip():
                native_log.debug("%s", text.rstrip())
            return len(text)
        return self._target.write(text)

    def flush(self) -> None:
        self._target.flush()

    def fileno(self) -> int:
        return self._target.fileno()

    def isatty(self) -> bool:
        return self._target.isatty()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self._target, "encoding", "utf-8")


def token_piece(llama: llama_cpp.Llama, token: int, cache: dict[int, bytes]) -> bytes:
    """The bytes of one token, memoised per model (llama.cpp's lookup costs a ctypes call)."""
    piece = cache.get(token)
    if piece is None:
        buffer = ctypes.create_string_buffer(64)
        vocab = llama._model.vocab
        n = llama_cpp.llama_token_to_piece(vocab, token, buffer, 64, 0, False)
        if n < 0:
            buffer = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(vocab, token, buffer, -n, 0, False)
        piece = buffer.raw[:n]
        cache[token] = piece
    return piece
