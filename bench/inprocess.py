"""The baseline side: llama-cpp-python driven directly in the benchmark's own process.

Every model is constructed the same way the server under test is configured: one
thread for decoding and for batches, CPU only, the same context. Sampling is greedy
(``temp=0``), as the server side's requests ask.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import llama_cpp

from bench.stats import Sample

N_CTX = 2048
N_THREADS = 1


def construct(path: Path) -> llama_cpp.Llama:
    """A ``Llama`` as the issue specifies (``verbose=False`` is fine in this process)."""
    return llama_cpp.Llama(model_path=str(path), n_ctx=N_CTX, n_threads=N_THREADS, n_threads_batch=N_THREADS,
                           n_gpu_layers=0, verbose=False)


class LocalModels:
    """One in-process ``Llama`` per model file, constructed on first use."""

    def __init__(self) -> None:
        self._llamas: dict[Path, llama_cpp.Llama] = {}

    def get(self, path: Path) -> llama_cpp.Llama:
        llama = self._llamas.get(path)
        if llama is None:
            llama = self._llamas[path] = construct(path)
        return llama

    def discard(self, path: Path) -> None:
        """Close the model of ``path`` if one is open (the next ``get`` constructs a fresh one)."""
        llama = self._llamas.pop(path, None)
        if llama is not None:
            llama.close()

    def close(self) -> None:
        for path in list(self._llamas):
            self.discard(path)


def generate_loop(llama: llama_cpp.Llama, prompt: str, n_tokens: int) -> Sample:
    """Tokenize ``prompt`` and pull ``n_tokens`` tokens from ``Llama.generate`` (EOS does not stop it)."""
    started = time.perf_counter()
    generator = llama.generate(llama.tokenize(prompt.encode()), temp=0.0)
    count = 0
    for _token in generator:
        count += 1
        if count >= n_tokens:
            break
    seconds = time.perf_counter() - started
    generator.close()
    return {"tokens": count, "seconds": seconds, "tokens_per_s": count / seconds}


def create_completion_stream(llama: llama_cpp.Llama, prompt: str, n_tokens: int) -> Sample:
    """llama-cpp-python's own ``create_completion(stream=True)``, counting its content chunks."""
    started = time.perf_counter()
    chunks = 0
    for chunk in llama.create_completion(prompt, max_tokens=n_tokens, temperature=0.0, stream=True):
        chunks += bool(chunk["choices"][0]["text"])
    seconds = time.perf_counter() - started
    return {"tokens": chunks, "seconds": seconds, "tokens_per_s": chunks / seconds}


def first_token(llama: llama_cpp.Llama, prompt: str) -> float:
    """Seconds to tokenize ``prompt``, decode it and have the first token's text."""
    started = time.perf_counter()
    generator = llama.generate(llama.tokenize(prompt.encode()), temp=0.0)
    llama.detokenize([next(generator)])
    seconds = time.perf_counter() - started
    generator.close()
    return seconds


class FreshInterpreter:
    """A new Python process with llama_cpp imported, waiting to load one model once.

    It stands for a script that loads a model the first time: the state our server's spare
    worker is in before its load (interpreter up, llama_cpp imported, nothing loaded yet).
    Only ``Llama(...)`` plus the first token are timed, by the child itself; the start and
    the imports are not.
    """

    def __init__(self, path: Path, n_ctx: int, prompt: str) -> None:
        args = json.dumps({"path": str(path), "n_ctx": n_ctx, "prompt": prompt})
        self._proc = subprocess.Popen([sys.executable, "-m", "bench.inprocess", args], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parent.parent)
        assert self._proc.stdout is not None
        if self._proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the fresh interpreter did not start")

    def cold_first_token(self) -> Sample:
        """Load and take the first token; the process exits afterwards."""
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.write("go\n")
        self._proc.stdin.flush()
        line = self._proc.stdout.readline()
        self._proc.wait(30)
        if not line:
            raise RuntimeError(f"the fresh interpreter exited with {self._proc.returncode}")
        return json.loads(line)


def _fresh_main(args: dict[str, object], read_line: Callable[[], str]) -> None:
    """The child of ``FreshInterpreter``: say ready, wait for the go, load, answer, exit."""
    print("ready", flush=True)
    read_line()
    started = time.perf_counter()
    llama = llama_cpp.Llama(model_path=str(args["path"]), n_ctx=int(str(args["n_ctx"])), verbose=False)
    loaded = time.perf_counter()
    first_token(llama, str(args["prompt"]))
    finished = time.perf_counter()
    print(json.dumps({"ms": (finished - started) * 1e3, "load_ms": (loaded - started) * 1e3}), flush=True)
    llama.close()


def cold_first_token(models: LocalModels, path: Path, prompt: str) -> Sample:
    """Seconds to construct ``Llama`` from ``path`` and have the first token (the old one closed untimed)."""
    models.discard(path)
    started = time.perf_counter()
    llama = models.get(path)
    load_seconds = time.perf_counter() - started
    first_token(llama, prompt)
    return {"seconds": time.perf_counter() - started, "load_seconds": load_seconds}


if __name__ == "__main__":
    _fresh_main(json.loads(sys.argv[1]), sys.stdin.readline)
