"""Judging a completion request before its model is leased, so a refused request never loads
(or evicts) anything and always answers with a 4xx status, streaming or not.

Everything here needs only the request, the model's settings and its GGUF header: the
model's id, the mode it serves, ``max_tokens`` against the server's limit, the model's
sampling defaults, token ids and ``logit_bias`` keys against the vocabulary size, and the
grammar a request asks for. What needs the loaded model (tokenizing, the chat template,
the prompt's length against the context) is judged in ``completions.prepare``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from chat_format import file_dialect
from dialects import GENERIC
from engine.protocol import SamplingParams
from errors import InvalidRequest
from grammar.checker import GrammarChecker
from grammar.request import grammar_for
from media import Media, MediaLimits, decode_parts
from model_manager import Mode, ModelManager
from sampling import SAMPLING_FIELDS
from schemas import ChatCompletionRequest, CompletionRequest, _Generation


@dataclass
class Verdict:
    """A request found acceptable: the model it goes to and how to sample."""

    model_id: str
    params: SamplingParams
    media: list[Media] = field(default_factory=list)  # the conversation's pictures, decoded, in order


def judge(manager: ModelManager, request: _Generation, grammars: GrammarChecker) -> Verdict:
    """Refuse what can be refused without the model; fill in the model's defaults."""
    model_id = manager.resolve(request.model)
    manager.check_mode(model_id, Mode.GENERATE)
    settings = manager.model_settings(model_id)
    # Judged before the model's defaults fill in: only what the client sent can be refused.
    asked = request.max_tokens if "max_tokens" in request.model_fields_set else None
    apply_defaults(request, settings.default)
    limit = manager.settings.max_tokens_limit
    if limit is not None:
        if asked is not None and asked > limit:
            raise InvalidRequest(f"max_tokens {asked} is above this server's limit of {limit}", param="max_tokens")
        request.max_tokens = min(request.max_tokens or limit, limit)
    header = manager.header(model_id)
    n_vocab = header.n_vocab if header is not None else 0
    logit_bias = {int(k): v for k, v in (request.logit_bias or {}).items()}
    check_token_ids(logit_bias, n_vocab, "logit_bias")
    if isinstance(request, CompletionRequest):
        for prompt in request.prompts():
            if isinstance(prompt, list):
                check_token_ids(prompt, n_vocab, "prompt")
    path = manager.model_file(model_id).path
    dialect = file_dialect(path, settings.chat_template) if isinstance(request, ChatCompletionRequest) else GENERIC
    grammar = grammar_for(request, path, grammars, dialect)
    media = decode_media(manager, model_id, request)
    return Verdict(model_id, sampling_params(request, grammar, logit_bias), media)


def decode_media(manager: ModelManager, model_id: str, request: _Generation) -> list[Media]:
    """The request's pictures decoded and checked (a model without a projector refuses them)."""
    parts = request.media_parts() if isinstance(request, ChatCompletionRequest) else []
    if not parts:
        return []
    return decode_parts(parts, MediaLimits.from_settings(manager.settings), manager.media(model_id), model_id)


def apply_defaults(request: _Generation, defaults: BaseModel) -> None:
    """Fill the fields the request left out with the model's configured defaults."""
    for name in defaults.model_fields_set:
        # The chat options apply to chat requests only: a text completion has no such fields.
        if name not in request.model_fields_set and name in type(request).model_fields:
            setattr(request, name, getattr(defaults, name))


def check_token_ids(tokens: Any, n_vocab: int, param: str) -> None:
    """Refuse token ids outside ``0..n_vocab-1`` (``n_vocab`` 0: only negative ids are known bad).

    llama.cpp indexes its tables with them unchecked: an id out of range reads out of bounds.
    """
    bad = next((t for t in tokens if t < 0 or (n_vocab and t >= n_vocab)), None)
    if bad is not None:
        vocab = f"0..{n_vocab - 1}" if n_vocab else "non-negative"
        raise InvalidRequest(f"token id {bad} in {param} is outside this model's vocabulary ({vocab})",
                             param=param)


def sampling_params(request: _Generation, grammar: str | None, logit_bias: dict[int, float]) -> SamplingParams:
    """The request's sampling fields, as the token loop takes them."""
    fields = {name: getattr(request, name) for name in SAMPLING_FIELDS if name != "stop"}
    return SamplingParams(**fields, stop=request.stops, grammar=grammar, logit_bias=logit_bias,
                          logprobs=logprobs_asked(request))


def logprobs_asked(request: _Generation) -> int | None:
    """How many alternatives per token the request wants log probabilities for; None: none."""
    if isinstance(request, CompletionRequest):
        return request.logprobs
    if getattr(request, "logprobs", None):
        return getattr(request, "top_logprobs", None) or 0
    return None
