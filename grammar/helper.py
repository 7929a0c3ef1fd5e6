"""The grammar helper process: compiles grammars with llama.cpp where a crash or a hang costs nothing.

``grammar.checker`` starts it (``python -m grammar.helper MEMORY_LIMIT``) and talks to
it over stdin/stdout, one request and one reply at a time, each a 4-byte big-endian
length and a UTF-8 JSON object:

* ``{"op": "load", "path": P}`` loads the vocabulary of the GGUF file ``P`` (llama.cpp's
  ``vocab_only``: no weights, milliseconds), kept for later checks;
* ``{"op": "check", "path": P, "grammar": G, "tokens": [ids]}`` builds llama.cpp's
  grammar sampler for ``G`` on that vocabulary, then applies it once to every token;

each answered by ``{"ok": true}`` or ``{"ok": false, "error": why}``. The helper is
single-threaded and stateless apart from its vocabularies: the parent may kill it at
any moment and start another. Its data segment is capped (``RLIMIT_DATA``), so a grammar
that makes llama.cpp allocate without end fails here instead of swapping the machine.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import resource
import struct
import sys
import tempfile
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any, BinaryIO

import numpy as np

MAX_VOCABS = 4  # vocabularies kept loaded; each costs a few MB
_GGML_LOG_ERROR = 4
TOKEN_DATA = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])  # llama_token_data


def read_message(stream: BinaryIO) -> dict[str, Any] | None:
    """One framed message from ``stream``, or None at end of file."""
    header = stream.read(4)
    if len(header) < 4:
        return None
    (size,) = struct.unpack(">I", header)
    return json.loads(stream.read(size))


def write_message(stream: BinaryIO, message: dict[str, Any]) -> None:
    """Frame and send ``message``."""
    data = json.dumps(message).encode("utf-8")
    stream.write(struct.pack(">I", len(data)) + data)
    stream.flush()


class _Helper:
    def __init__(self, llama_cpp: Any) -> None:
        self.llama_cpp = llama_cpp
        self.vocabs: OrderedDict[str, tuple[Any, Any]] = OrderedDict()  # path -> (model, vocab)
        self.errors: list[str] = []
        self._log = llama_cpp.llama_log_callback(self._on_log)  # kept referenced: C holds the pointer
        llama_cpp.llama_log_set(self._log, ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()

    def _on_log(self, level: int, text: bytes, _user_data: Any) -> None:
        if level == _GGML_LOG_ERROR:
            message = text.decode("utf-8", errors="replace").strip()
            if message:
                self.errors.append(message)

    def handle(self, message: dict[str, Any]) -> dict[str, Any]:
        op = message.get("op")
        if op == "load":
            return self.load(message["path"])
        if op == "check":
            return self.check(message["path"], message["grammar"], message.get("tokens", []))
        return {"ok": False, "error": f"unknown op {op!r}"}

    def load(self, path: str) -> dict[str, Any]:
        if path in self.vocabs:
            self.vocabs.move_to_end(path)
            return {"ok": True}
        params = self.llama_cpp.llama_model_default_params()
        params.vocab_only = True
        model = self.llama_cpp.llama_model_load_from_file(path.encode("utf-8"), params)
        if not model:
            return {"ok": False, "error": f"llama.cpp cannot read the vocabulary of {path}"}
        self.vocabs[path] = (model, self.llama_cpp.llama_model_get_vocab(model))
        while len(self.vocabs) > MAX_VOCABS:
            _, (old, _) = self.vocabs.popitem(last=False)
            self.llama_cpp.llama_model_free(old)
        return {"ok": True}

    def check(self, path: str, grammar: str, tokens: list[int]) -> dict[str, Any]:
        loaded = self.load(path)
        if not loaded["ok"]:
            return loaded
        llama_cpp = self.llama_cpp
        vocab = self.vocabs[path][1]
        self.errors.clear()
        with _captured_stderr() as printed:
            sampler = llama_cpp.llama_sampler_init_grammar(vocab, grammar.encode("utf-8"), b"root")
        if not sampler:
            return {"ok": False, "error": _reason("".join(printed), self.errors)}
        try:
            return self._usable(sampler, vocab, tokens)
        finally:
            llama_cpp.llama_sampler_free(sampler)

    def _usable(self, sampler: Any, vocab: Any, tokens: list[int]) -> dict[str, Any]:
        """Refuse a grammar that requires a token the vocabulary lacks or that no first token satisfies."""
        llama_cpp = self.llama_cpp
        n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
        for token in tokens:
            if token >= n_vocab:
                return {"ok": False, "error": f"token <[{token}]> is outside this model's vocabulary "
                                              f"(0..{n_vocab - 1})"}
            if llama_cpp.llama_vocab_is_eog(vocab, token):
                return {"ok": False, "error": f"token <[{token}]> ends generation; a grammar cannot require it"}
        data = (llama_cpp.llama_token_data * n_vocab)()
        view = np.frombuffer(data, dtype=TOKEN_DATA)
        view["id"] = np.arange(n_vocab, dtype=np.int32)
        candidates = llama_cpp.llama_token_data_array(data, n_vocab, -1, False)
        llama_cpp.llama_sampler_apply(sampler, ctypes.byref(candidates))
        if not np.isfinite(view["logit"][:candidates.size]).any():
            return {"ok": False, "error": "no token of this model's vocabulary can start text the grammar allows"}
        return {"ok": True}


@contextlib.contextmanager
def _captured_stderr() -> Iterator[list[str]]:
    """Send file descriptor 2 to a temporary file (llama.cpp prints parse errors there).

    Yields a list that holds what was printed once the block ends.
    """
    printed: list[str] = []
    with tempfile.TemporaryFile() as capture:
        saved = os.dup(2)
        sys.stderr.flush()
        os.dup2(capture.fileno(), 2)
        try:
            yield printed
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            printed.append(capture.read(64 * 1024).decode("utf-8", errors="replace"))


def _reason(printed: str, logged: list[str]) -> str:
    """llama.cpp's own words for a refused grammar, without the grammar text it echoes."""
    for line in printed.splitlines():
        if "error parsing grammar:" in line:
            return "llama.cpp: " + line.split("error parsing grammar:", 1)[1].strip()[:300]
    useful = [line for line in logged if line != "failed to parse grammar"]
    return "llama.cpp: " + ("; ".join(useful) if useful else "the grammar was refused")[:300]


def main() -> int:
    """Serve requests on stdin/stdout until stdin closes."""
    protocol_out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything llama.cpp prints to stdout must not corrupt the protocol
    if len(sys.argv) > 1 and int(sys.argv[1]) > 0:
        limit = int(sys.argv[1])
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    import llama_cpp  # after the limit: its import is part of what the limit must allow

    helper = _Helper(llama_cpp)
    write_message(protocol_out, {"ok": True, "ready": True})
    protocol_in = sys.stdin.buffer
    while (message := read_message(protocol_in)) is not None:
        try:
            reply = helper.handle(message)
        except Exception as exc:  # a bug here must not look like a crash of llama.cpp
            reply = {"ok": False, "error": f"the grammar check failed: {type(exc).__name__}: {exc}"}
        write_message(protocol_out, reply)
    return 0


if __name__ == "__main__":
    sys.exit(main())
