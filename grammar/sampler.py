"""The grammar in the token loop: never a NULL sampler, never a token the grammar refuses.

Two ways llama.cpp kills the process at sampling time, both reproduced in a subprocess
with the tiny test model and SmolLM2:

* ``llama_sampler_sample`` applies the chain and then accepts the chosen token, even
  when the grammar has set every candidate to -inf. The chooser still picks one; the
  grammar then either aborts (``GGML_ABORT`` in ``llama_grammar_accept_impl``: an
  end-of-generation token while the grammar is incomplete) or throws
  ``std::runtime_error("Unexpected empty grammar stack ...")`` through the C API, which
  ends in ``std::terminate``. Every candidate is -inf when the grammar is complete but
  ``ignore_eos`` forced the end-of-generation tokens to -inf, or when the grammar
  requires text that no token produces (a token id that ends generation, ``[z-a]``).
* ``llama_sampler_init_grammar`` returns NULL for a grammar it cannot parse, and
  llama-cpp-python adds NULL to the chain; the first sample dereferences it (SIGSEGV).

So a request with a grammar samples in two stages: a constraints chain (logit bias,
penalties, grammar) applied to the logits, a look at what is left, then a selection
chain (greedy, or top-k/top-p/min-p/temperature/dist), and the grammar accepts only a
token it allowed. ``ignore_eos`` is honoured after the grammar: end-of-generation is
suppressed while the grammar can go on, and when the grammar is complete (only
end-of-generation is left) generation stops cleanly, as the grammar leaves nothing to
say. A grammar that allows no token at all is the request's fault: ``InvalidRequest``.

Precondition, as for the rest of the token loop: the caller holds the model's generation lock.
"""

from __future__ import annotations

import ctypes
import time

import llama_cpp
import numpy as np
from llama_cpp import _internals as internals

from errors import InvalidRequest

GRAMMAR_COMPLETE = -1  # returned by ``GuardedSampler.sample``: the grammar has nothing more to add
TOKEN_SECONDS = 1.0  # grammar work allowed for one token before the request is refused
TOKEN_DATA = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])  # llama_token_data


def add_grammar(chain: internals.LlamaSampler, vocab: llama_cpp.llama_vocab_p, grammar: str, param: str) -> None:
    """Add llama.cpp's sampler for GBNF ``grammar`` to ``chain``; raise ``InvalidRequest`` if it will not build.

    Behind ``GrammarChecker`` this should never refuse; it keeps a NULL out of the chain
    if anything ever reaches here unchecked.
    """
    sampler = llama_cpp.llama_sampler_init_grammar(vocab, grammar.encode("utf-8"), b"root")
    if not sampler:
        raise InvalidRequest(f"Invalid '{param}': llama.cpp could not compile the grammar", param=param)
    llama_cpp.llama_sampler_chain_add(chain.sampler, sampler)


class GuardedSampler:
    """Samples through a grammar without ever handing it a token it refused (see the module docstring)."""

    def __init__(self, model: llama_cpp.llama_model_p, constraints: internals.LlamaSampler,
                 selection: internals.LlamaSampler, *, ignore_eos: bool, param: str,
                 token_seconds: float = TOKEN_SECONDS) -> None:
        vocab = llama_cpp.llama_model_get_vocab(model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
        self.constraints = constraints
        self.selection = selection
        self.param = param
        self.token_seconds = token_seconds
        self.tokens = 0
        self._data = (llama_cpp.llama_token_data * self.n_vocab)()
        self._view = np.frombuffer(self._data, dtype=TOKEN_DATA)
        self._ids = np.arange(self.n_vocab, dtype=np.int32)
        self._array = llama_cpp.llama_token_data_array(self._data, self.n_vocab, -1, False)
        # Every end-of-generation token, not only eos/eot: any one left allowed would be sampled.
        self._eog = (np.fromiter((llama_cpp.llama_vocab_is_eog(vocab, t) for t in range(self.n_vocab)), bool,
                                 self.n_vocab) if ignore_eos else None)

    def sample(self, ctx: internals.LlamaContext, idx: int = -1) -> int:
        """The next token, or ``GRAMMAR_COMPLETE``; raises ``InvalidRequest`` when the grammar allows nothing."""
        started = time.perf_counter()
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx.ctx, idx), shape=(self.n_vocab,))
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
            raise InvalidRequest(f"Invalid '{self.param}': after {self.tokens} generated tokens the grammar "
                                 "allows no token this model can produce", param=self.param)
        llama_cpp.llama_sampler_apply(self.selection.sampler, ctypes.byref(array))
        token = int(view["id"][array.selected])
        llama_cpp.llama_sampler_accept(self.constraints.sampler, token)
        llama_cpp.llama_sampler_accept(self.selection.sampler, token)
        self.tokens += 1
        seconds = time.perf_counter() - started
        if seconds > self.token_seconds:
            raise InvalidRequest(f"Invalid '{self.param}': matching the grammar took {seconds:.1f} s for one token "
                                 f"(the limit is {self.token_seconds:g} s); its alternatives multiply as text "
                                 "grows, so simplify it", param=self.param)
        return token

    def close(self) -> None:
        """Free both chains (and the grammar in them)."""
        self.constraints.close()
        self.selection.close()
