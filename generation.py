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
from dataclasses import dataclass

import llama_cpp
from llama_cpp import _internals as internals
from llama_cpp.llama_grammar import LlamaGrammar

from engine.protocol import SamplingParams
from engine.text import StopMatcher
from errors import ContextLengthExceeded, InvalidRequest
from llama_backend import token_piece

__all__ = ["Generation", "Result", "SamplingParams", "context_size"]

PENALTY_LAST_N = 64


@dataclass
class Result:
    """Filled in as the generation runs; complete once the iterator is exhausted."""

    prompt_tokens: int = 0
    cached_tokens: int = 0  # of prompt_tokens, those reused from the KV cache instead of evaluated
    completion_tokens: int = 0
    finish_reason: str | None = None
    first_token_at: float | None = None  # time.monotonic() when the first token was sampled


class Generation:
    """An iterator of text deltas for one completion; ``result`` holds counts and finish reason."""

    def __init__(self, llama: llama_cpp.Llama, prompt: list[int], params: SamplingParams,
                 pieces: dict[int, bytes], should_stop: Callable[[], bool] = lambda: False,
                 prompt_param: str = "messages") -> None:
        n_ctx = context_size(llama)
        if len(prompt) >= n_ctx:
            raise ContextLengthExceeded(
                f"This model's context window is {n_ctx} tokens; the prompt has {len(prompt)} "
                "tokens, leaving no room for a completion", param=prompt_param)
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
        stops = StopMatcher(params.stop)
        try:
            cached = _eval_prompt(llama, self.prompt, self.should_stop)
            if cached is None:
                return  # the client hung up before or during the prompt: nobody to answer
            result.cached_tokens = cached
            while result.completion_tokens < self.max_tokens:
                token = self.sampler.sample(llama._ctx, -1)
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


def _eval_prompt(llama: llama_cpp.Llama, prompt: list[int], should_stop: Callable[[], bool]) -> int | None:
    """Evaluate ``prompt``, reusing the longest prefix already in the KV cache; return that
    prefix's length (the prompt tokens served from the cache).

    One batch at a time, asking ``should_stop`` before each, so a client that hung up stops
    a long prompt within a batch; returns None then. What was evaluated stays cached and
    consistent (``n_tokens`` moves with every batch) for the next request to reuse.
    """
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
    step = max(1, llama.n_batch)
    for start in range(prefix, len(prompt), step):
        if should_stop():
            return None
        llama.eval(prompt[start:start + step])
    return prefix


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


def _build_sampler(llama: llama_cpp.Llama, params: SamplingParams) -> internals.LlamaSampler:
    n_vocab = llama.n_vocab()
    bias = dict(params.logit_bias)
    for token in bias:
        if not 0 <= token < n_vocab:
            raise InvalidRequest(f"logit_bias token {token} is outside the vocabulary (0..{n_vocab - 1})",
                                 param="logit_bias")
    if params.ignore_eos:
        vocab = llama._model.vocab
        bias.update({t: float("-inf") for t in _eog_tokens(llama) if llama_cpp.llama_vocab_is_eog(vocab, t)})
    grammar = _compile_grammar(params.grammar) if params.grammar else None
    sampler = internals.LlamaSampler()
    if bias:
        sampler.add_logit_bias(n_vocab, bias)
    sampler.add_penalties(n_vocab=n_vocab, penalty_last_n=PENALTY_LAST_N,
                          penalty_repeat=params.repeat_penalty, penalty_freq=params.frequency_penalty,
                          penalty_present=params.presence_penalty)
    if grammar is not None:
        sampler.add_grammar(llama._model, grammar)
    if params.temperature <= 0:
        sampler.add_greedy()
    else:
        seed = params.seed if params.seed is not None else random.getrandbits(32)
        sampler.add_top_k(params.top_k if params.top_k > 0 else n_vocab)
        sampler.add_top_p(params.top_p, 1)
        sampler.add_min_p(params.min_p, 1)
        sampler.add_temp(params.temperature)
        sampler.add_dist(seed & 0xFFFFFFFF)
    return sampler


def _eog_tokens(llama: llama_cpp.Llama) -> set[int]:
    model = llama._model
    candidates = {model.token_eos(), model.token_eot(), model.token_sep()}
    return {t for t in candidates if t is not None and t >= 0}


def _compile_grammar(gbnf: str) -> LlamaGrammar:
    try:
        return LlamaGrammar.from_string(gbnf, verbose=False)
    except Exception as exc:  # llama.cpp reports grammar errors as a generic failure
        raise InvalidRequest(f"invalid grammar: {exc}", param="response_format") from None
