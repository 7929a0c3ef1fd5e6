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
import os
import random
import re
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import llama_cpp
import numpy as np
from llama_cpp import _internals as internals

from engine import ggml_rpc
from engine.projector import MediaChunk, MediaError, Piece, Projector, ProjectorError
from engine.protocol import MediaInput, ModelInfo, ModelOptions, SamplingParams, TokenLogprob

PENALTY_LAST_N = 64
MIN_FLASH_ATTN_HEAD_SIZE = 32  # smaller heads run without flash attention by default (see _load_hooks)
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


# llama.cpp's loader names each buffer it put weights in: CPU_Mapped, RPC0[host:port], CUDA0...
_MODEL_BUFFER = re.compile(r"(\S+) model buffer size = +([0-9.]+) MiB")


class NativeLog:
    """Routes llama.cpp's log lines to ``sink(level, text)`` and remembers the last complaints.

    Installed once per worker process; the C callback must outlive every llama.cpp call.
    """

    def __init__(self, sink: Callable[[int, str], None]) -> None:
        self.sink = sink
        self.complaints: deque[str] = deque(maxlen=8)
        self.model_buffers: dict[str, int] = {}  # the loader's "<buffer> model buffer size" lines
        self._last_level = logging.DEBUG
        self.min_level = logging.DEBUG  # lines below it are not passed to the sink
        self.callback = llama_cpp.llama_log_callback(self._on_log)
        llama_cpp.llama_log_set(self.callback, ctypes.c_void_p(0))

    def _on_log(self, level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
        try:
            mapped = self._last_level if level == _GGML_CONT else _GGML_LEVELS.get(level, logging.DEBUG)
            self._last_level = mapped
            message = text.decode("utf-8", errors="replace").rstrip()
            if not message:
                return
            if mapped >= logging.WARNING:
                self.complaints.append(message)
            elif "model buffer size" in message and (found := _MODEL_BUFFER.search(message)) is not None:
                self.model_buffers[found[1]] = round(float(found[2]) * 2**20)
            if mapped >= self.min_level:
                self.sink(mapped, message)
        except Exception:  # an exception must never cross into C
            pass


@contextmanager
def _load_hooks(options: ModelOptions, on_progress: Callable[[float], None] | None) -> Iterator[None]:
    """Set n_seq_max/kv_unified, flash attention and the progress callback on the params
    ``Llama`` builds."""
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
        params.n_seq_max = EMBED_SEQUENCES if options.embedding else max(1, options.parallel)
        params.kv_unified = True
        return params

    init_context = _bindings.llama_init_from_model

    def init_from_model(model: Any, params: Any) -> Any:
        # llama-cpp-python can only force flash attention on or off; unless the config
        # says, let llama.cpp enable it where the backend supports it, as llama-server does:
        # SmolLM2-135M (head size 64) decodes 9-10% faster with it over 512 tokens on a CPU, and
        # reads a long prompt about 15% faster. Below a head size of 32 the CPU kernel's cost
        # per cached token dominates: stories260K (head size 8) decoded at half the speed.
        if "flash_attn" not in options.extra:
            n_head = max(1, llama_cpp.llama_model_n_head(model))
            small_heads = llama_cpp.llama_model_n_embd(model) // n_head < MIN_FLASH_ATTN_HEAD_SIZE
            params.flash_attn_type = (llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED if small_heads
                                      else llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO)
        return init_context(model, params)

    _bindings.llama_model_default_params = model_params
    _bindings.llama_context_default_params = context_params
    _bindings.llama_init_from_model = init_from_model
    try:
        yield
    finally:
        _bindings.llama_model_default_params = model_defaults
        _bindings.llama_context_default_params = context_defaults
        _bindings.llama_init_from_model = init_context


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
        self._special_pieces: dict[int, bytes] = {}
        self._eog: set[int] | None = None
        # llama.cpp may pad its context; llama-cpp-python's buffers are as asked.
        self.n_ctx = min(llama.n_ctx(), options.n_ctx) if options.n_ctx else llama.n_ctx()
        self.n_batch = llama.n_batch
        self.n_vocab = llama.n_vocab()
        self.batch = Batch(llama._batch.batch, self.n_batch)
        self.projector: Projector | None = None

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
        native_log.model_buffers.clear()
        try:
            with _load_hooks(options, on_progress):
                llama = llama_cpp.Llama(model_path=path, **kwargs)
        except Exception as exc:  # llama-cpp-python raises ValueError/RuntimeError/OSError alike
            reason = native_log.complaints[-1] if native_log.complaints else str(exc)
            raise LoadError(reason) from None
        model = cls(llama, options, native_log)
        if options.mmproj and not options.embedding:
            model._load_projector(options.mmproj)
        return model

    def _load_projector(self, path: str) -> None:
        self.native_log.complaints.clear()
        try:
            # Named, not left to mtmd: it would take an RPC server (a GPU to ggml) when this box has no GPU.
            device = ggml_rpc.local_gpu() if self.options.n_gpu_layers != 0 else None
            self.projector = Projector(path, self.llama._model.model, n_threads=self.options.n_threads or 1,
                                       device=device, log_callback=self.native_log.callback)
        except ProjectorError as exc:
            reason = self.native_log.complaints[-1] if self.native_log.complaints else str(exc)
            self.close()
            # The reason goes to clients and the public /health: the file's name, not where it lives.
            raise LoadError(f"multimodal projector: {reason.replace(path, os.path.basename(path))}") from None

    def close(self) -> None:
        if self.projector is not None:
            self.projector.close()
            self.projector = None
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
            metadata=metadata, add_eos=bool(llama_cpp.llama_vocab_get_add_eos(self._vocab)),
            add_sep=bool(llama_cpp.llama_vocab_get_add_sep(self._vocab)),
            sep_token=int(llama_cpp.llama_vocab_sep(self._vocab)),
            n_cls_out=(int(llama_cpp.llama_model_n_cls_out(model.model)) if self.is_reranker else 0),
            devices=dict(self.native_log.model_buffers),
            media=self.projector.media if self.projector is not None else ())

    @property
    def is_reranker(self) -> bool:
        """A cross-encoder: its pooled output is a relevance score per input."""
        return self.options.embedding and self.llama.pooling_type() == llama_cpp.LLAMA_POOLING_TYPE_RANK

    def _token_text(self, token: int) -> str:
        if token < 0:
            return ""
        return llama_cpp.llama_vocab_get_text(self._vocab, token).decode("utf-8", errors="replace")

    # ---- tokens ----

    def tokenize(self, text: str, add_special: bool, parse_special: bool) -> list[int]:
        return self.llama._model.tokenize(text.encode("utf-8"), add_special, parse_special)

    def piece(self, token: int, special: bool = False) -> bytes:
        """The bytes of one token, memoised (llama.cpp's lookup costs a ctypes call).
        ``special`` writes a control token as its text instead of nothing."""
        pieces = self._special_pieces if special else self._pieces
        piece = pieces.get(token)
        if piece is None:
            buffer = ctypes.create_string_buffer(64)
            n = llama_cpp.llama_token_to_piece(self._vocab, token, buffer, 64, 0, special)
            if n < 0:
                buffer = ctypes.create_string_buffer(-n)
                n = llama_cpp.llama_token_to_piece(self._vocab, token, buffer, -n, 0, special)
            piece = pieces[token] = buffer.raw[:n]
        return piece

    def logprobs(self, row: int, token: int, top: int) -> TokenLogprob:
        """Log probabilities at logits row ``row`` of the last decode: ``token``'s, and the
        ``top`` most likely tokens'. The raw distribution (a log-softmax of the logits), as
        llama-server reports by default."""
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self._ctx, row), shape=(self.n_vocab,))
        peak = float(logits.max())
        log_total = peak + float(np.log(np.exp(logits - peak, dtype=np.float64).sum()))
        best: tuple[tuple[bytes, float], ...] = ()
        if top > 0:
            ids = np.argpartition(logits, -top)[-top:]
            ids = ids[np.argsort(logits[ids])[::-1]]
            best = tuple((self.piece(int(i), True), float(logits[i]) - log_total) for i in ids)
        return TokenLogprob(self.piece(token, True), float(logits[token]) - log_total, best)

    def is_eog(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self._vocab, token))

    def valid_token(self, token: int) -> bool:
        return 0 <= token < self.n_vocab

    # ---- media (a projector's pictures and sounds) ----

    def split_media(self, media: MediaInput) -> list[Piece]:
        """The text tokens and encoder chunks ``media`` takes in a prompt (``projector.MediaError``
        when it cannot be used; a model without a projector reads no media)."""
        if self.projector is None:
            raise MediaError("this model has no multimodal projector", media.param)
        return self.projector.split(media)

    def eval_media(self, chunk: MediaChunk, seq: int, position: int) -> int:
        """Encode ``chunk`` and decode its embeddings into ``seq`` from ``position``; 0 when done."""
        assert self.projector is not None
        return self.projector.evaluate(chunk, self._ctx, position, seq, self.n_batch)

    @staticmethod
    def free_media(chunk: MediaChunk) -> None:
        Projector.free(chunk)

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

    def state_get(self, seq: int, reuse: bytearray | None = None) -> memoryview:
        """The KV state of one sequence, for the RAM prompt cache, written straight into
        ``reuse`` when it is big enough (else a new buffer): no copy beyond llama.cpp's own.

        A fresh buffer costs its page faults, about as much again as the write itself for a
        1,700-token conversation, hence ``reuse``.
        """
        size = llama_cpp.llama_state_seq_get_size(self._ctx, seq)
        fits = reuse is not None and size <= len(reuse) <= 2 * size  # not a big buffer for a small state
        buffer = reuse if fits and reuse is not None else bytearray(size)
        view = (ctypes.c_uint8 * size).from_buffer(buffer)
        written = llama_cpp.llama_state_seq_get_data(self._ctx, view, size, seq)
        del view  # a live ctypes view would pin the buffer's size
        return memoryview(buffer)[:written]

    def state_set(self, seq: int, data: memoryview) -> bool:
        """Restore a state from ``state_get`` into ``seq`` (which must be empty); False when it did not fit."""
        view = (ctypes.c_uint8 * len(data)).from_buffer(data)
        try:
            return llama_cpp.llama_state_seq_set_data(self._ctx, view, len(data), seq) > 0
        finally:
            del view

    # ---- sampling ----

    def sampler(self, params: SamplingParams) -> SequenceSampler:
        """A sampler chain for one sequence; raises ``SamplerError`` naming the bad parameter."""
        return SequenceSampler(self, params)

    def eog_tokens(self) -> set[int]:
        """Every end-of-generation token, not only eos/eot (``<|im_end|>`` too): any one left
        unsuppressed under ``ignore_eos`` would be sampled and shown. Computed once."""
        if self._eog is None:
            self._eog = {t for t in range(self.n_vocab) if self.is_eog(t)}
        return self._eog

    # ---- embeddings ----

    def embedding_groups(self, inputs: list[list[int]]) -> Iterator[list[list[int]]]:
        """``inputs`` in order, as groups that fit one decode: at most ``EMBED_SEQUENCES``
        sequences and ``n_batch`` tokens together (each input alone fits, as checked)."""
        group: list[list[int]] = []
        total = 0
        for tokens in inputs:
            if group and (len(group) == EMBED_SEQUENCES or total + len(tokens) > self.n_batch):
                yield group
                group, total = [], 0
            group.append(tokens)
            total += len(tokens)
        if group:
            yield group

    def embed(self, group: list[list[int]]) -> list[np.ndarray]:
        """One pooled, unnormalised vector per input of ``group``, all decoded at once, each as
        its own sequence (the mean of its token vectors when the model has no pooling)."""
        self.llama._ctx.kv_cache_clear()
        batch = self.batch
        batch.clear()
        spans = []
        for seq, tokens in enumerate(group):
            start = len(batch)
            for position, token in enumerate(tokens):
                batch.add(token, position, seq, True)
            spans.append((start, len(batch)))
        rc = self.decode()
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        n_embd = self.llama._model.n_embd()
        if self.is_reranker:  # a score (or a few) per input, not a vector
            n_embd = int(llama_cpp.llama_model_n_cls_out(self.llama._model.model))
        if self.llama.pooling_type() == llama_cpp.LLAMA_POOLING_TYPE_NONE:
            def row(i: int) -> np.ndarray:
                return np.ctypeslib.as_array(llama_cpp.llama_get_embeddings_ith(self._ctx, i), shape=(n_embd,))
            return [np.mean([row(i) for i in range(start, end)], axis=0).astype(np.float32) for start, end in spans]
        return [np.ctypeslib.as_array(llama_cpp.llama_get_embeddings_seq(self._ctx, seq), shape=(n_embd,))
                .astype(np.float32) for seq in range(len(group))]


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


EMBED_SEQUENCES = 16  # inputs an embedding worker decodes together (within n_batch tokens)
GRAMMAR_COMPLETE = -1  # from ``SequenceSampler.sample``: the grammar has nothing more to add
GRAMMAR_TOKEN_SECONDS = 1.0  # grammar work allowed for one token before the request is refused
TOKEN_DATA = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])  # llama_token_data


class SequenceSampler:
    """One sequence's sampler chain (bias, penalties, grammar, then greedy or top-k/top-p/min-p/temp/dist).

    With a grammar, llama.cpp can kill the process at sampling time: ``llama_sampler_sample``
    applies the chain and then accepts the chosen token even when the grammar set every
    candidate to -inf, and the grammar then aborts (``GGML_ABORT``: end-of-generation while it
    is incomplete) or throws through the C API (``std::terminate``). Every candidate is -inf
    when the grammar is complete but ``ignore_eos`` forced end-of-generation to -inf, or when
    it demands text no token produces. So with a grammar a token is sampled in two stages:
    the constraints (bias, penalties, grammar) are applied, what is left is looked at, then the
    selection chain picks, and the grammar only ever accepts a token it allowed. ``ignore_eos``
    applies after the grammar: end-of-generation is suppressed while the grammar can go on,
    and a complete grammar ends the sequence cleanly (``GRAMMAR_COMPLETE``). A grammar that
    allows nothing, or takes too long for one token, is the request's fault (``SamplerError``).
    """

    def __init__(self, model: LoadedModel, params: SamplingParams) -> None:
        n_vocab = model.n_vocab
        bias = dict(params.logit_bias)
        for token in bias:
            if not model.valid_token(token):
                raise SamplerError(f"logit_bias token {token} is outside the vocabulary (0..{n_vocab - 1})",
                                   "logit_bias")
        self._ctx = model._ctx
        self._guard: _GrammarGuard | None = None
        if params.ignore_eos and not params.grammar:
            bias.update({t: float("-inf") for t in model.eog_tokens()})
        self._chain = internals.LlamaSampler()
        chain = self._chain
        if bias:
            chain.add_logit_bias(n_vocab, bias)
        chain.add_penalties(n_vocab=n_vocab, penalty_last_n=PENALTY_LAST_N, penalty_repeat=params.repeat_penalty,
                            penalty_freq=params.frequency_penalty, penalty_present=params.presence_penalty)
        selection = chain
        if params.grammar:
            try:
                llama_cpp.llama_sampler_chain_add(chain.sampler, _grammar_sampler(model, params.grammar))
            except BaseException:
                chain.close()
                raise
            selection = internals.LlamaSampler()
            self._guard = _GrammarGuard(model, chain, selection, params)
        if params.temperature <= 0:
            selection.add_greedy()
        else:
            seed = params.seed if params.seed is not None else random.getrandbits(32)
            selection.add_top_k(params.top_k if params.top_k > 0 else n_vocab)
            selection.add_top_p(params.top_p, 1)
            selection.add_min_p(params.min_p, 1)
            selection.add_temp(params.temperature)
            selection.add_dist(seed & 0xFFFFFFFF)

    def sample(self, batch_index: int) -> int:
        """Sample (and accept) a token from the logits row of ``batch_index`` in the last decode;
        ``GRAMMAR_COMPLETE`` when the grammar has nothing more to add."""
        if self._guard is not None:
            return self._guard.sample(self._ctx, batch_index)
        return int(llama_cpp.llama_sampler_sample(self._chain.sampler, self._ctx, batch_index))

    def close(self) -> None:
        self._chain.close()
        if self._guard is not None:
            self._guard.selection.close()


class _GrammarGuard:
    """The two-stage sampling of a grammar-constrained sequence (see ``SequenceSampler``)."""

    def __init__(self, model: LoadedModel, constraints: internals.LlamaSampler,
                 selection: internals.LlamaSampler, params: SamplingParams) -> None:
        self.n_vocab = n = model.n_vocab
        self.constraints = constraints
        self.selection = selection
        self.token_seconds = params.grammar_token_seconds
        self.tokens = 0
        self._data = (llama_cpp.llama_token_data * n)()
        self._view = np.frombuffer(self._data, dtype=TOKEN_DATA)
        self._ids = np.arange(n, dtype=np.int32)
        self._array = llama_cpp.llama_token_data_array(self._data, n, -1, False)
        # Every end-of-generation token, not only eos/eot: any one left allowed would be sampled.
        self._eog = (np.fromiter((model.is_eog(t) for t in range(n)), bool, n) if params.ignore_eos else None)

    def sample(self, ctx: Any, batch_index: int) -> int:
        started = time.perf_counter()
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, batch_index), shape=(self.n_vocab,))
        view, array = self._view, self._array
        view["id"] = self._ids  # the selection chain sorts the array in place: rebuild it every token
        view["logit"] = logits
        view["p"] = 0.0
        array.size, array.selected, array.sorted = self.n_vocab, -1, False
        llama_cpp.llama_sampler_apply(self.constraints.sampler, ctypes.byref(array))
        allowed = np.isfinite(view["logit"])  # still in id order: these samplers do not reorder
        if self._eog is not None and allowed.any():
            if not (allowed & ~self._eog).any():
                return GRAMMAR_COMPLETE
            view["logit"][self._eog] = -np.inf
        elif not allowed.any():
            raise SamplerError(f"after {self.tokens} generated tokens the grammar allows no token this model "
                               "can produce", "grammar")
        llama_cpp.llama_sampler_apply(self.selection.sampler, ctypes.byref(array))
        token = int(view["id"][array.selected])
        llama_cpp.llama_sampler_accept(self.constraints.sampler, token)
        llama_cpp.llama_sampler_accept(self.selection.sampler, token)
        self.tokens += 1
        seconds = time.perf_counter() - started
        if seconds > self.token_seconds:
            raise SamplerError(f"matching the grammar took {seconds:.1f} s for one token (the limit is "
                               f"{self.token_seconds:g} s); its alternatives multiply as text grows, so simplify it",
                               "grammar")
        return token


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
