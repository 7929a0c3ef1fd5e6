"""The one module that touches llama-cpp-python's private parts and raw ``llama_cpp.llama_*`` calls.

Everything else in the engine calls ``LoadedModel``, ``Batch`` and ``SequenceSampler``; a
llama-cpp-python upgrade is checked here and nowhere else. Private attributes used:
``Llama._model`` (``.model``, ``.vocab``), ``Llama._ctx`` (``.ctx``, ``.memory``),
``Llama._batch.batch`` (the ``llama_batch`` struct), ``internals.LlamaSampler.sampler``.

Why a ``Llama`` and not our own context: ``Llama`` accepts every load argument the server's
config may pass through (``extra``), and owns the free order of model, context and batch.
It has no argument for ``n_seq_max`` or ``kv_unified``, so for the duration of the
constructor we wrap ``llama_context_default_params`` (looked up on the bindings module at call
time) to set them, as we wrap ``llama_model_default_params`` for the progress callback.
Only a worker process loads models, one at a time, on one thread, so the wrap cannot race.

KV memory: one unified KV cache of ``n_ctx`` cells shared by ``parallel`` sequences
(``kv_unified=True``, ``n_seq_max=parallel``). Any one sequence may use the whole context;
the scheduler keeps the sum of all sequences' tokens within ``n_ctx``.

Precondition for everything here: called from the worker's one thread.
"""

from __future__ import annotations

import ctypes
import logging
import random
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import llama_cpp
import numpy as np
from llama_cpp import _internals as internals

from engine.protocol import ModelInfo, ModelOptions, SamplingParams

PENALTY_LAST_N = 64
EMBEDDING_BATCH = 512  # tokens per embedding input; bigger batches cost compute memory
_bindings = llama_cpp.llama_cpp
# ggml's levels: 1 debug, 2 info, 3 warn, 4 error, 5 continues the previous line.
_GGML_LEVELS = {1: logging.DEBUG, 2: logging.DEBUG, 3: logging.WARNING, 4: logging.ERROR}
_GGML_CONT = 5


class SamplerError(ValueError):
    """A request's sampling parameters cannot be honoured; ``param`` names the culprit."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


class LoadError(RuntimeError):
    """llama.cpp could not load the model; the message is its own last complaint."""


class NativeLog:
    """Routes llama.cpp's log lines to ``sink(level, text)`` and remembers the last complaints.

    Installed once per worker process; the C callback must outlive every llama.cpp call.
    """

    def __init__(self, sink: Callable[[int, str], None]) -> None:
        self.sink = sink
        self.complaints: deque[str] = deque(maxlen=8)
        self._last_level = logging.DEBUG
        self._callback = llama_cpp.llama_log_callback(self._on_log)
        llama_cpp.llama_log_set(self._callback, ctypes.c_void_p(0))

    def _on_log(self, level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
        try:
            mapped = self._last_level if level == _GGML_CONT else _GGML_LEVELS.get(level, logging.DEBUG)
            self._last_level = mapped
            message = text.decode("utf-8", errors="replace").rstrip()
            if not message:
                return
            if mapped >= logging.WARNING:
                self.complaints.append(message)
            self.sink(mapped, message)
        except Exception:  # an exception must never cross into C
            pass


@contextmanager
def _load_hooks(options: ModelOptions, on_progress: Callable[[float], None] | None) -> Iterator[None]:
    """Set n_seq_max/kv_unified and the progress callback on the params ``Llama`` builds."""
    model_defaults = _bindings.llama_model_default_params
    context_defaults = _bindings.llama_context_default_params

    @llama_cpp.llama_progress_callback
    def progress(fraction: float, _user_data: ctypes.c_void_p) -> bool:
        try:
            if on_progress is not None:
                on_progress(float(fraction))
        except Exception:  # an exception must never cross into C
            pass
        return True

    def model_params() -> Any:
        params = model_defaults()
        params.progress_callback = progress
        return params

    def context_params() -> Any:
        params = context_defaults()
        if not options.embedding:
            params.n_seq_max = max(1, options.parallel)
            params.kv_unified = True
        return params

    _bindings.llama_model_default_params = model_params
    _bindings.llama_context_default_params = context_params
    try:
        yield
    finally:
        _bindings.llama_model_default_params = model_defaults
        _bindings.llama_context_default_params = context_defaults


class LoadedModel:
    """A loaded model and its context: tokens, pieces, the batch, KV sequences and samplers."""

    def __init__(self, llama: llama_cpp.Llama, options: ModelOptions, native_log: NativeLog) -> None:
        self.llama = llama
        self.options = options
        self.native_log = native_log
        self._ctx = llama._ctx.ctx
        self._memory = llama._ctx.memory
        self._vocab = llama._model.vocab
        self._pieces: dict[int, bytes] = {}
        # llama.cpp may pad its context; llama-cpp-python's buffers are as asked.
        self.n_ctx = min(llama.n_ctx(), options.n_ctx) if options.n_ctx else llama.n_ctx()
        self.n_batch = llama.n_batch
        self.n_vocab = llama.n_vocab()
        self.batch = Batch(llama._batch.batch, self.n_batch)

    @classmethod
    def load(cls, path: str, options: ModelOptions, native_log: NativeLog,
             on_progress: Callable[[float], None] | None = None) -> LoadedModel:
        """Load ``path``; raise ``LoadError`` with llama.cpp's reason."""
        n_batch = options.n_batch
        if options.n_ctx:
            n_batch = min(n_batch, options.n_ctx)
        kwargs: dict[str, Any] = {
            "n_ctx": options.n_ctx, "n_batch": n_batch, "n_gpu_layers": options.n_gpu_layers,
            "n_threads": options.n_threads, "n_threads_batch": options.n_threads,
            "embedding": options.embedding, "verbose": False, **options.extra,
        }
        if options.embedding:
            # An embedding input is decoded in one micro-batch, so the batch bounds its length.
            size = min(options.n_ctx, EMBEDDING_BATCH) if options.n_ctx else EMBEDDING_BATCH
            kwargs.update(n_batch=size, n_ubatch=size)
        native_log.complaints.clear()
        try:
            with _load_hooks(options, on_progress):
                llama = llama_cpp.Llama(model_path=path, **kwargs)
        except Exception as exc:  # llama-cpp-python raises ValueError/RuntimeError/OSError alike
            reason = native_log.complaints[-1] if native_log.complaints else str(exc)
            raise LoadError(reason) from None
        return cls(llama, options, native_log)

    def close(self) -> None:
        self.llama.close()

    def info(self) -> ModelInfo:
        """The model's shape and texts, for the server."""
        model = self.llama._model
        metadata = dict(self.llama.metadata)
        bos, eos = model.token_bos(), model.token_eos()
        return ModelInfo(
            n_ctx=self.n_ctx, n_ctx_train=model.n_ctx_train(), n_vocab=self.n_vocab, n_embd=model.n_embd(),
            n_batch=self.n_batch, n_ubatch=int(self.llama.context_params.n_ubatch),
            parallel=1 if self.options.embedding else max(1, self.options.parallel),
            embedding=self.options.embedding, pooling_type=self.llama.pooling_type(),
            bos_token=bos, eos_token=eos, bos_text=self._token_text(bos), eos_text=self._token_text(eos),
            add_bos=bool(model.add_bos_token()), chat_template=metadata.get("tokenizer.chat_template"),
            metadata=metadata)

    def _token_text(self, token: int) -> str:
        if token < 0:
            return ""
        return llama_cpp.llama_vocab_get_text(self._vocab, token).decode("utf-8", errors="replace")

    # ---- tokens ----

    def tokenize(self, text: str, add_special: bool, parse_special: bool) -> list[int]:
        return self.llama._model.tokenize(text.encode("utf-8"), add_special, parse_special)

    def piece(self, token: int) -> bytes:
        """The bytes of one token, memoised (llama.cpp's lookup costs a ctypes call)."""
        piece = self._pieces.get(token)
        if piece is None:
            buffer = ctypes.create_string_buffer(64)
            n = llama_cpp.llama_token_to_piece(self._vocab, token, buffer, 64, 0, False)
            if n < 0:
                buffer = ctypes.create_string_buffer(-n)
                n = llama_cpp.llama_token_to_piece(self._vocab, token, buffer, -n, 0, False)
            piece = self._pieces[token] = buffer.raw[:n]
        return piece

    def is_eog(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self._vocab, token))

    def valid_token(self, token: int) -> bool:
        return 0 <= token < self.n_vocab

    # ---- decode and KV sequences ----

    def decode(self) -> int:
        """Decode ``self.batch``; llama.cpp's return code (0 ok, 1 no KV room: memory unchanged)."""
        return int(llama_cpp.llama_decode(self._ctx, self.batch.raw))

    def seq_rm(self, seq: int, p0: int = -1, p1: int = -1) -> bool:
        """Drop positions [p0, p1) of ``seq``; False when the memory cannot cut there (e.g. SWA)."""
        return bool(llama_cpp.llama_memory_seq_rm(self._memory, seq, p0, p1))

    def seq_clear(self, seq: int) -> None:
        llama_cpp.llama_memory_seq_rm(self._memory, seq, -1, -1)

    def seq_cp(self, src: int, dst: int, p0: int = -1, p1: int = -1) -> None:
        llama_cpp.llama_memory_seq_cp(self._memory, src, dst, p0, p1)

    def seq_pos_max(self, seq: int) -> int:
        """The last position ``seq`` holds, -1 when empty."""
        return int(llama_cpp.llama_memory_seq_pos_max(self._memory, seq))

    def state_get(self, seq: int) -> bytes:
        """The KV state of one sequence, for the RAM prompt cache."""
        size = llama_cpp.llama_state_seq_get_size(self._ctx, seq)
        buffer = (ctypes.c_uint8 * size)()
        written = llama_cpp.llama_state_seq_get_data(self._ctx, buffer, size, seq)
        return bytes(buffer[:written])

    def state_set(self, seq: int, data: bytes) -> bool:
        """Restore a state from ``state_get`` into ``seq`` (which must be empty); False when it did not fit."""
        buffer = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        return llama_cpp.llama_state_seq_set_data(self._ctx, buffer, len(data), seq) > 0

    # ---- sampling ----

    def sampler(self, params: SamplingParams) -> SequenceSampler:
        """A sampler chain for one sequence; raises ``SamplerError`` naming the bad parameter."""
        return SequenceSampler(self, params)

    def eog_tokens(self) -> set[int]:
        model = self.llama._model
        candidates = {model.token_eos(), model.token_eot(), model.token_sep()}
        return {t for t in candidates if t is not None and t >= 0 and self.is_eog(t)}

    # ---- embeddings ----

    def embed(self, tokens: list[int]) -> np.ndarray:
        """One pooled, unnormalised vector for ``tokens`` (mean of token vectors when the model has no pooling)."""
        self.llama._ctx.kv_cache_clear()
        batch = self.batch
        batch.clear()
        for position, token in enumerate(tokens):
            batch.add(token, position, 0, True)
        rc = self.decode()
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        n_embd = self.llama._model.n_embd()
        if self.llama.pooling_type() == llama_cpp.LLAMA_POOLING_TYPE_NONE:
            rows = [np.ctypeslib.as_array(llama_cpp.llama_get_embeddings_ith(self._ctx, i), shape=(n_embd,))
                    for i in range(len(tokens))]
            return np.mean(rows, axis=0).astype(np.float32)
        pointer = llama_cpp.llama_get_embeddings_seq(self._ctx, 0)
        return np.ctypeslib.as_array(pointer, shape=(n_embd,)).astype(np.float32)


class Batch:
    """The context's one ``llama_batch``: tokens of several sequences, each with its position."""

    def __init__(self, raw: Any, capacity: int) -> None:
        self.raw = raw
        self.capacity = capacity

    def clear(self) -> None:
        self.raw.n_tokens = 0

    def __len__(self) -> int:
        return int(self.raw.n_tokens)

    def add(self, token: int, position: int, seq: int, logits: bool) -> int:
        """Append one token; return its index in the batch (the logits row when ``logits``)."""
        raw = self.raw
        i = raw.n_tokens
        raw.token[i] = token
        raw.pos[i] = position
        raw.n_seq_id[i] = 1
        raw.seq_id[i][0] = seq
        raw.logits[i] = logits
        raw.n_tokens = i + 1
        return i


class SequenceSampler:
    """One sequence's sampler chain (bias, penalties, grammar, then greedy or top-k/top-p/min-p/temp/dist)."""

    def __init__(self, model: LoadedModel, params: SamplingParams) -> None:
        n_vocab = model.n_vocab
        bias = dict(params.logit_bias)
        for token in bias:
            if not model.valid_token(token):
                raise SamplerError(f"logit_bias token {token} is outside the vocabulary (0..{n_vocab - 1})",
                                   "logit_bias")
        if params.ignore_eos:
            bias.update({t: float("-inf") for t in model.eog_tokens()})
        grammar = _grammar_sampler(model, params.grammar) if params.grammar else None
        self._chain = internals.LlamaSampler()
        chain = self._chain
        if bias:
            chain.add_logit_bias(n_vocab, bias)
        chain.add_penalties(n_vocab=n_vocab, penalty_last_n=PENALTY_LAST_N, penalty_repeat=params.repeat_penalty,
                            penalty_freq=params.frequency_penalty, penalty_present=params.presence_penalty)
        if grammar is not None:
            llama_cpp.llama_sampler_chain_add(chain.sampler, grammar)  # the chain owns and frees it
        if params.temperature <= 0:
            chain.add_greedy()
        else:
            seed = params.seed if params.seed is not None else random.getrandbits(32)
            chain.add_top_k(params.top_k if params.top_k > 0 else n_vocab)
            chain.add_top_p(params.top_p, 1)
            chain.add_min_p(params.min_p, 1)
            chain.add_temp(params.temperature)
            chain.add_dist(seed & 0xFFFFFFFF)
        self._ctx = model._ctx

    def sample(self, batch_index: int) -> int:
        """Sample (and accept) a token from the logits row of ``batch_index`` in the last decode."""
        return int(llama_cpp.llama_sampler_sample(self._chain.sampler, self._ctx, batch_index))

    def close(self) -> None:
        self._chain.close()


def _grammar_sampler(model: LoadedModel, gbnf: str) -> Any:
    """llama.cpp's grammar sampler for ``gbnf``; a NULL (parse failure) never reaches a chain."""
    complaints = model.native_log.complaints
    complaints.clear()
    sampler = llama_cpp.llama_sampler_init_grammar(model._vocab, gbnf.encode("utf-8"), b"root")
    if not sampler:
        # llama.cpp says what is wrong with a grammar only in its log.
        detail = "; ".join(complaints)
        raise SamplerError(f"invalid grammar{': ' + detail if detail else ''}", "grammar")
    return sampler
