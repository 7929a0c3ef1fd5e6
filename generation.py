"""The token loop: prompt tokens in, text deltas out, as fast as llama.cpp makes tokens.

We drive llama.cpp ourselves (``Llama.eval`` plus a native sampler chain) instead of
``create_completion(stream=True)``, which re-detokenizes the whole completion at every
token (quadratic). Here each token costs one memoised piece lookup, an incremental UTF-8
decode that holds back only an incomplete multi-byte tail, and a stop-string check over
the few characters that could still begin a stop string.

Precondition for everything here: the caller holds the model's generation lock, because a
``Llama`` object is not thread-safe.
"""

from __future__ import annotations

import codecs
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import llama_cpp
from llama_cpp import _internals as internals

from errors import ContextLengthExceeded, InvalidRequest
from grammar.sampler import GRAMMAR_COMPLETE, TOKEN_SECONDS, GuardedSampler, add_grammar
from llama_backend import token_piece

PENALTY_LAST_N = 64


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
    grammar_param: str = "grammar"  # the request parameter a grammar failure names
    grammar_token_seconds: float = TOKEN_SECONDS  # not a request field: the guard's limit per token


@dataclass
class Result:
    """Filled in as the generation runs; complete once the iterator is exhausted."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None
    first_token_at: float | None = None  # time.monotonic() when the first token was sampled


class Generation:
    """An iterator of text deltas for one completion; ``result`` holds counts and finish reason."""

    def __init__(self, llama: llama_cpp.Llama, prompt: list[int], params: SamplingParams,
                 pieces: dict[int, bytes], should_stop: Callable[[], bool] = lambda: False) -> None:
        n_ctx = context_size(llama)
        if len(prompt) >= n_ctx:
            raise ContextLengthExceeded(
                f"This model's context window is {n_ctx} tokens; the prompt has {len(prompt)} "
                "tokens, leaving no room for a completion", param="messages")
        room = n_ctx - len(prompt)
        self.max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        self.llama = llama
        self.prompt = prompt
        self.params = params
        self.pieces = pieces
        self.should_stop = should_stop
        self.result = Result(prompt_tokens=len(prompt))
        self.sampler = _build_sampler(llama, params)

    def __iter__(self) -> Iterator[str]:
        llama, params, result = self.llama, self.params, self.result
        vocab = llama._model.vocab
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        stops = _StopMatcher(params.stop)
        try:
            _eval_prompt(llama, self.prompt)
            while result.completion_tokens < self.max_tokens:
                token = self.sampler.sample(llama._ctx, -1)
                if token == GRAMMAR_COMPLETE:
                    result.finish_reason = "stop"
                    break
                if llama_cpp.llama_vocab_is_eog(vocab, token) and not params.ignore_eos:
                    result.finish_reason = "stop"
                    break
                result.completion_tokens += 1
                if result.first_token_at is None:
                    result.first_token_at = time.monotonic()
                text, stopped = stops.feed(decoder.decode(token_piece(llama, token, self.pieces)))
                if text:
                    yield text
                if stopped:
                    result.finish_reason = "stop"
                    break
                if result.completion_tokens >= self.max_tokens or self.should_stop():
                    break
                _decode_next(llama, token)
            if result.finish_reason is None:
                result.finish_reason = "length"
            tail = stops.flush()  # empty after a stop string: the match cleared it
            if tail:
                yield tail
        except GeneratorExit:
            raise  # stopped between tokens (a hang-up): the cache is consistent, keep it for reuse
        except BaseException:
            # A failed decode can leave the KV cache out of step with n_tokens; the next
            # request must not reuse it ("failed to find a memory slot").
            llama.reset()
            raise
        finally:
            self.sampler.close()


def context_size(llama: llama_cpp.Llama) -> int:
    """Usable context: llama.cpp may pad its context, but llama-cpp-python's token buffer is as asked."""
    return min(llama.n_ctx(), len(llama.input_ids))


def _eval_prompt(llama: llama_cpp.Llama, prompt: list[int]) -> None:
    """Evaluate ``prompt``, reusing the longest prefix already in the KV cache."""
    cached = llama.n_tokens
    prefix = 0
    if cached:
        for a, b in zip(llama._input_ids.tolist(), prompt, strict=False):
            if a != b:
                break
            prefix += 1
    # Re-evaluate at least the last prompt token so fresh logits exist to sample from.
    prefix = min(prefix, len(prompt) - 1)
    if prefix > 0 and llama._ctx.kv_cache_seq_rm(-1, prefix, -1):
        llama.n_tokens = prefix
    else:
        llama.reset()
        prefix = 0
    llama.eval(prompt[prefix:])


def _decode_next(llama: llama_cpp.Llama, token: int) -> None:
    """Decode one generated token: ``Llama.eval([token])`` without its per-call overhead.

    ``eval`` first clears the KV cache past ``n_tokens`` and rebuilds the batch in a Python
    loop; mid-generation nothing lies past ``n_tokens`` and the batch holds one token, so
    this writes the one slot and decodes (about 3% faster on a small model). Room for the
    token is guaranteed by the caller's ``max_tokens`` clamp.
    """
    position = llama.n_tokens
    batch = llama._batch.batch
    batch.n_tokens = 1
    batch.token[0] = token
    batch.pos[0] = position
    batch.n_seq_id[0] = 1
    batch.seq_id[0][0] = 0
    batch.logits[0] = True
    llama._ctx.decode(llama._batch)
    llama.input_ids[position] = token
    llama.n_tokens = position + 1


def _build_sampler(llama: llama_cpp.Llama, params: SamplingParams) -> internals.LlamaSampler | GuardedSampler:
    n_vocab = llama.n_vocab()
    bias = dict(params.logit_bias)
    for token in bias:
        if not 0 <= token < n_vocab:
            raise InvalidRequest(f"logit_bias token {token} is outside the vocabulary (0..{n_vocab - 1})",
                                 param="logit_bias")
    if params.ignore_eos and not params.grammar:  # with a grammar, GuardedSampler applies ignore_eos after it
        vocab = llama._model.vocab
        bias.update({t: float("-inf") for t in _eog_tokens(llama) if llama_cpp.llama_vocab_is_eog(vocab, t)})
    sampler = internals.LlamaSampler()
    if bias:
        sampler.add_logit_bias(n_vocab, bias)
    sampler.add_penalties(n_vocab=n_vocab, penalty_last_n=PENALTY_LAST_N,
                          penalty_repeat=params.repeat_penalty, penalty_freq=params.frequency_penalty,
                          penalty_present=params.presence_penalty)
    if not params.grammar:
        _add_selection(sampler, params, n_vocab)
        return sampler
    selection = internals.LlamaSampler()
    try:
        add_grammar(sampler, llama._model.vocab, params.grammar, params.grammar_param)
        _add_selection(selection, params, n_vocab)
        return GuardedSampler(llama._model.model, sampler, selection, ignore_eos=params.ignore_eos,
                              param=params.grammar_param, token_seconds=params.grammar_token_seconds)
    except BaseException:
        sampler.close()
        selection.close()
        raise


def _add_selection(sampler: internals.LlamaSampler, params: SamplingParams, n_vocab: int) -> None:
    """The samplers that pick one token from what the constraints left."""
    if params.temperature <= 0:
        sampler.add_greedy()
    else:
        seed = params.seed if params.seed is not None else random.getrandbits(32)
        sampler.add_top_k(params.top_k if params.top_k > 0 else n_vocab)
        sampler.add_top_p(params.top_p, 1)
        sampler.add_min_p(params.min_p, 1)
        sampler.add_temp(params.temperature)
        sampler.add_dist(seed & 0xFFFFFFFF)


def _eog_tokens(llama: llama_cpp.Llama) -> set[int]:
    model = llama._model
    candidates = {model.token_eos(), model.token_eot(), model.token_sep()}
    return {t for t in candidates if t is not None and t >= 0}


class _StopMatcher:
    """Finds stop strings in streamed text, holding back only what could begin one."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Add ``text``; return what is safe to emit and whether a stop string was hit."""
        if not self.stops:
            return text, False
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        keep = self._partial_suffix()
        out = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out

    def _partial_suffix(self) -> int:
        """Length of the longest tail of ``pending`` that is a proper prefix of a stop string."""
        best = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self.pending)), best, -1):
                if self.pending.endswith(stop[:n]):
                    best = n
                    break
        return best
