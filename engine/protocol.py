"""The messages between the server process and a model's worker process.

Framing is ``multiprocessing.connection.Connection`` over a socket pair: each ``send`` is one
length-prefixed pickle. Pickle is acceptable here because both ends are our own code, started
by us, on one machine; nothing else can write to the socket pair (it is never bound to an
address). Messages are small frozen dataclasses; keep them plain data (str, int, float, lists,
dicts, numpy arrays) so that neither end ever unpickles a live object.

Every message from the parent that expects an answer carries an ``id`` chosen by the parent;
every answer carries the same ``id``. ``Ready``, ``Log`` and ``Heartbeat`` carry none.

Parent to worker: ``Load``, ``Generate``, ``Cancel``, ``Embed``, ``Tokenize``, ``Detokenize``, ``MediaCells``,
``GetStats``, ``Shutdown``, and ``Tune`` (tests only).
Worker to parent: ``Ready``, ``Progress``, ``Log``, ``Loaded``, ``LoadFailed``, ``Started``,
``Delta``, ``Done``, ``Error``, ``Reply``, ``Heartbeat``, and ``Bundle`` (several of these from
one decode step, in order).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Literal

ErrorKind = Literal["invalid_request", "internal"]
FinishReason = Literal["stop", "length", "cancelled"]
MediaKind = Literal["image", "audio"]
# Where a picture (or a sound) goes in a rendered prompt: llama.cpp's mtmd default marker.
MEDIA_MARKER = "<__media__>"
# The sounds a worker takes: mtmd aborts the process on a sound of one sample (or a few
# frames, for some encoders), and resampling a sound of a few samples per second to its
# encoder's 16 kHz would make a small file a huge one.
MIN_AUDIO_RATE = 8000  # samples per second (telephone quality)
MIN_AUDIO_SECONDS = 0.1


@dataclass
class SamplingParams:
    """Everything a request says about how to pick tokens."""

    max_tokens: int | None = None
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logit_bias: dict[int, float] = field(default_factory=dict)
    ignore_eos: bool = False
    grammar: str | None = None  # GBNF, already judged by grammar.checker
    grammar_token_seconds: float = 1.0  # not a request field: grammar work allowed for one token
    logprobs: int | None = None  # None: none; 0: the chosen token's; k: and the k most likely
    # Control tokens written out as their text (a dialect's markers, such as ``<tool_call>``):
    # a plain detokenize drops them, and the parser must see them.
    preserved_tokens: tuple[int, ...] = ()


@dataclass(frozen=True)
class ModelOptions:
    """How a worker loads its model; fixed for the worker's life."""

    n_ctx: int = 2048
    n_gpu_layers: int = 0
    n_threads: int | None = None
    n_batch: int = 512  # tokens per decode step, all sequences together
    embedding: bool = False
    parallel: int = 4  # sequences decoded together (slots)
    prompt_cache_bytes: int = 128 * 2**20  # RAM for the KV state of conversations pushed out of a slot
    extra: dict[str, Any] = field(default_factory=dict)  # more llama_cpp.Llama arguments
    rpc_servers: tuple[str, ...] = ()  # host:port of ggml RPC servers to place layers on
    rpc_timeout: float = 5.0  # seconds for each RPC server's connection and handshake
    mmproj: str | None = None  # the multimodal projector file (images, audio), if the model has one


@dataclass(frozen=True)
class ModelInfo:
    """What the server needs to know about a loaded model."""

    n_ctx: int  # usable context of one sequence (all of the KV cache)
    n_ctx_train: int
    n_vocab: int
    n_embd: int
    n_batch: int
    n_ubatch: int
    parallel: int
    embedding: bool
    pooling_type: int
    bos_token: int
    eos_token: int
    bos_text: str
    eos_text: str
    add_bos: bool
    chat_template: str | None
    metadata: dict[str, str]
    add_eos: bool = False
    add_sep: bool = False  # a pair is <bos> a <eos> <sep> b <eos> (RoBERTa-style rerankers)
    sep_token: int = -1
    n_cls_out: int = 0  # a reranker's scores per input (pooling type rank), else 0
    # Where the weights went: llama.cpp's buffer name (``CPU_Mapped``, ``RPC0[host:port]``,
    # ``CUDA0``...) and its bytes, as its loader reported them.
    devices: dict[str, int] = field(default_factory=dict)
    media: tuple[MediaKind, ...] = ()  # what its projector reads: "image", "audio"; () without one


# ---- parent to worker ----

@dataclass(frozen=True)
class Load:
    id: int
    path: str
    options: ModelOptions
    # The lowest level of llama.cpp's log lines the server writes: a load logs about 2,000 lines
    # at debug level, and sending them only to be dropped cost a cold start about 50 ms.
    log_level: int = logging.DEBUG


@dataclass(frozen=True)
class MediaInput:
    """One picture (or sound) of a prompt, already decoded and checked by the server: the
    worker's own decoders never see what a client sent.

    An image is ``width`` x ``height`` RGB pixels (``data``: 3 bytes each, row by row); audio
    is ``width`` samples of mono float32 PCM at ``height`` samples per second (the worker
    resamples it to its projector's rate).
    ``digest`` identifies the content (the prompt cache keys on it); ``param`` is where the
    client put it (``messages[0].content[1]``), for errors.
    """

    at: int  # index in the prompt's tokens before which it goes
    kind: MediaKind
    width: int
    height: int
    data: bytes
    digest: bytes
    param: str = "messages"


@dataclass(frozen=True)
class Generate:
    id: int
    prompt: list[int]
    params: SamplingParams
    media: tuple[MediaInput, ...] = ()  # each spliced into ``prompt`` at its ``at``, in order


@dataclass(frozen=True)
class GenerateMany:
    """One prompt's several generations (a request's ``n`` choices), each as a ``Generate``
    with its id and params: the prompt and its media cross the pipe once, not once a choice."""
    ids: tuple[int, ...]
    prompt: list[int]
    params: tuple[SamplingParams, ...]
    media: tuple[MediaInput, ...] = ()


@dataclass(frozen=True)
class Cancel:
    id: int


@dataclass(frozen=True)
class Embed:
    id: int
    inputs: list[list[int]]


@dataclass(frozen=True)
class Tokenize:
    id: int
    text: str
    add_special: bool
    parse_special: bool


@dataclass(frozen=True)
class Detokenize:
    """Token ids back to text: the bytes of each token (``per_token``) or the whole text.
    Control tokens are written as their text, as llama.cpp's server does."""

    id: int
    tokens: list[int]
    per_token: bool = False


@dataclass(frozen=True)
class MediaCells:
    """How many prompt cells (tokens and embeddings) each of ``media`` takes: a ``Reply`` with
    one count per input, or an ``Error`` naming the input that cannot be used."""

    id: int
    media: tuple[MediaInput, ...]


@dataclass(frozen=True)
class GetStats:
    id: int


@dataclass(frozen=True)
class Shutdown:
    pass


@dataclass(frozen=True)
class Tune:
    """A test seam, like a clock passed in: slow every decode step down, or make the decode fail
    after ``fail_after_steps`` more steps, so tests can hold a stream open or fail it on cue
    with a real model. Nothing in the server sends it."""

    step_delay: float = 0.0
    fail_after_steps: int | None = None


# ---- worker to parent ----

@dataclass(frozen=True)
class Ready:
    """The interpreter is up and llama_cpp imported: a warm spare waiting for its ``Load``."""

    pid: int


@dataclass(frozen=True)
class Progress:
    id: int
    fraction: float


@dataclass(frozen=True)
class Log:
    """One line of llama.cpp's native log; ``level`` is a ``logging`` level."""

    level: int
    text: str


@dataclass(frozen=True)
class Loaded:
    id: int
    info: ModelInfo


@dataclass(frozen=True)
class LoadFailed:
    """The load failed; ``reason`` is llama.cpp's last warning or error line. The worker then exits."""

    id: int
    reason: str


@dataclass(frozen=True)
class Started:
    """A generation has a slot; ``cached_tokens`` of its prompt were reused rather than decoded.
    ``prompt_tokens`` counts the positions its media took too."""

    id: int
    prompt_tokens: int
    cached_tokens: int


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log probability, and the most likely alternatives at its place
    (``top``: (bytes, logprob) pairs, most likely first). ``logprob`` is from the model's own
    distribution, before sampling settings reshape it."""

    token: bytes
    logprob: float
    top: tuple[tuple[bytes, float], ...] = ()


@dataclass(frozen=True)
class Delta:
    """Text to append, and when asked for, the log probabilities of the tokens sampled since
    the last ``Delta`` (the text may lag them: it is held back while a stop string may begin)."""

    id: int
    text: str
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class Done:
    id: int
    completion_tokens: int
    finish_reason: FinishReason
    first_token_at: float | None  # time.monotonic() in the worker: CLOCK_MONOTONIC, the same clock on Linux
    stop: str | None = None  # the stop string that ended it (Anthropic's stop_sequence), if one did


@dataclass(frozen=True)
class Error:
    """A request failed; the worker carries on. ``kind`` says how the parent should report it."""

    id: int
    kind: ErrorKind
    message: str
    param: str | None = None
    code: str | None = None


@dataclass(frozen=True)
class Reply:
    """The answer to ``Embed`` (a list of float32 arrays), ``Tokenize`` (a list of ids) or ``GetStats`` (a dict)."""

    id: int
    value: Any


@dataclass(frozen=True)
class Heartbeat:
    """Sent between decode steps when nothing else was sent for a while: the worker is alive and busy."""


@dataclass(frozen=True)
class Bundle:
    """The messages one decode step produced (a delta per sequence, say), sent as one: one
    write and one wake-up of the parent's reader per step instead of one per sequence."""

    messages: tuple[Any, ...]
