"""A model's multimodal projector: llama.cpp's mtmd turning pictures (and sounds) into the
text model's embeddings.

``llama_adapter.LoadedModel`` owns one ``Projector`` when its model has an ``mmproj`` file,
and hands it the raw ``llama_model``/``llama_context`` pointers; this module touches only
the public ``llama_cpp.mtmd_cpp`` bindings, never llama-cpp-python's private parts.

A ``MediaInput`` arrives already decoded by the server (RGB pixels or float PCM), so mtmd's
own decoders (stb_image, miniaudio) never see a client's bytes. ``split`` runs mtmd's
preprocessing (resize, slices) and yields the pieces the media takes in the prompt: text
tokens (a model's image begin/end markers) and ``MediaChunk`` s, each a run of positions
the encoder fills. ``evaluate`` encodes one chunk and decodes its embeddings into one
sequence of the shared KV cache.

Concurrency: none; called from the worker's one thread, like everything in the engine.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Any

import llama_cpp
import llama_cpp.mtmd_cpp as mtmd
import numpy as np

from engine.protocol import MEDIA_MARKER, MIN_AUDIO_RATE, MIN_AUDIO_SECONDS, MediaInput, MediaKind

_CHUNK_MEDIA = {mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE, mtmd.MTMD_INPUT_CHUNK_TYPE_AUDIO}
_TOKENIZE_ERRORS = {1: "the number of media does not match the markers", 2: "preprocessing failed"}


class ProjectorError(RuntimeError):
    """The projector file could not be loaded for this model."""


class MediaError(ValueError):
    """One media input cannot be used; ``param`` names where the client put it."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass
class MediaChunk:
    """One encoder run of a media input: ``n_tokens`` KV cells, ``n_pos`` positions (fewer
    than the cells for M-RoPE models). Owns an ``mtmd_input_chunk``: ``Projector.free`` it."""

    handle: Any
    n_tokens: int
    n_pos: int


Piece = list[int] | MediaChunk


class Projector:
    """An ``mtmd_context`` for one loaded text model."""

    def __init__(self, path: str, text_model: Any, *, n_threads: int, device: int | None,
                 log_callback: Any) -> None:
        """``text_model``: the ``llama_model`` pointer; ``device``: the ggml device to encode on
        (None: the CPU); ``log_callback``: a ggml log callback (it must outlive the projector).
        Raises ``ProjectorError``."""
        mtmd.mtmd_log_set(log_callback, ctypes.c_void_p(0))
        mtmd.mtmd_helper_log_set(log_callback, ctypes.c_void_p(0))
        params = mtmd.mtmd_context_params_default()
        params.use_gpu = device is not None
        params.device = device
        params.n_threads = n_threads
        params.print_timings = False
        params.media_marker = MEDIA_MARKER.encode()
        self._marker = MEDIA_MARKER.encode()
        self._ctx = mtmd.mtmd_init_from_file(path.encode(), text_model, params)
        if not self._ctx:
            raise ProjectorError(f"the projector {path} could not be loaded for this model")
        kinds: list[MediaKind] = []
        if mtmd.mtmd_support_vision(self._ctx):
            kinds.append("image")
        if mtmd.mtmd_support_audio(self._ctx):
            kinds.append("audio")
        self.media: tuple[MediaKind, ...] = tuple(kinds)
        self.audio_sample_rate = int(mtmd.mtmd_get_audio_sample_rate(self._ctx)) if "audio" in kinds else 0
        self.uses_mrope = bool(mtmd.mtmd_decode_use_mrope(self._ctx))

    def close(self) -> None:
        if self._ctx:
            mtmd.mtmd_free(self._ctx)
            self._ctx = None

    def split(self, media: MediaInput) -> list[Piece]:
        """The pieces ``media`` takes in a prompt, in order. Raises ``MediaError``."""
        if media.kind not in self.media:
            raise MediaError(f"this model's projector does not read {media.kind}", media.param)
        bitmap = self._bitmap(media)
        chunks = mtmd.mtmd_input_chunks_init()
        try:
            text = mtmd.mtmd_input_text()
            text.text, text.text_len = self._marker, len(self._marker)
            text.add_special, text.parse_special = False, True
            bitmaps = (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap)
            rc = mtmd.mtmd_tokenize(self._ctx, chunks, ctypes.byref(text), bitmaps, 1)
            if rc != 0:
                raise MediaError(f"the {media.kind} could not be prepared for this model: "
                                 f"{_TOKENIZE_ERRORS.get(rc, f'error {rc}')}", media.param)
            return [self._piece(mtmd.mtmd_input_chunks_get(chunks, i))
                    for i in range(mtmd.mtmd_input_chunks_size(chunks))]
        finally:
            mtmd.mtmd_input_chunks_free(chunks)
            mtmd.mtmd_bitmap_free(bitmap)

    def _bitmap(self, media: MediaInput) -> Any:
        if media.kind == "image":
            if media.width <= 0 or media.height <= 0 or len(media.data) != media.width * media.height * 3:
                raise MediaError("the image's pixels do not match its size", media.param)
            pixels = (ctypes.c_uint8 * len(media.data)).from_buffer_copy(media.data)
            bitmap = mtmd.mtmd_bitmap_init(media.width, media.height, pixels)
        else:
            if media.width <= 0 or media.height <= 0 or len(media.data) != media.width * 4:
                raise MediaError("the audio's samples do not match its length", media.param)
            if media.height < MIN_AUDIO_RATE or media.width < media.height * MIN_AUDIO_SECONDS:
                raise MediaError("the sound is too short or its rate too low", media.param)
            pcm = _resampled(np.frombuffer(media.data, dtype=np.float32), media.height, self.audio_sample_rate)
            samples = (ctypes.c_float * len(pcm)).from_buffer_copy(pcm.tobytes())
            bitmap = mtmd.mtmd_bitmap_init_from_audio(len(pcm), samples)
        if not bitmap:
            raise MediaError(f"the {media.kind} could not be read", media.param)
        mtmd.mtmd_bitmap_set_id(bitmap, media.digest.hex().encode())
        return bitmap

    @staticmethod
    def _piece(chunk: Any) -> Piece:
        if mtmd.mtmd_input_chunk_get_type(chunk) in _CHUNK_MEDIA:
            n_tokens = int(mtmd.mtmd_input_chunk_get_n_tokens(chunk))
            n_pos = int(mtmd.mtmd_input_chunk_get_n_pos(chunk))
            return MediaChunk(mtmd.mtmd_input_chunk_copy(chunk), n_tokens, n_pos)
        count = ctypes.c_size_t(0)
        tokens = mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(count))
        return [int(tokens[i]) for i in range(count.value)]

    def evaluate(self, chunk: MediaChunk, context: Any, position: int, seq: int, n_batch: int) -> int:
        """Encode ``chunk`` and decode its embeddings into ``seq`` from ``position``; llama.cpp's
        return code (0: done)."""
        new_position = llama_cpp.llama_pos(0)
        return int(mtmd.mtmd_helper_eval_chunk_single(self._ctx, context, chunk.handle, position, seq, n_batch,
                                                      False, ctypes.byref(new_position)))

    @staticmethod
    def free(chunk: MediaChunk) -> None:
        """Release what ``split`` allocated for ``chunk`` (idempotent)."""
        if chunk.handle:
            mtmd.mtmd_input_chunk_free(chunk.handle)
            chunk.handle = None



def _resampled(samples: np.ndarray, rate: int, target: int) -> np.ndarray:
    """``samples`` at ``rate`` per second, linearly interpolated to ``target`` per second
    (speech encoders hear 16 kHz; the spectrum above the new Nyquist folds in only faintly
    for speech, and a client wanting better sends 16 kHz)."""
    if rate == target or not len(samples):
        return np.ascontiguousarray(samples, dtype=np.float32)
    n = max(1, round(len(samples) * target / rate))
    positions = np.arange(n, dtype=np.float64) * (rate / target)
    return np.interp(positions, np.arange(len(samples), dtype=np.float64), samples).astype(np.float32)
