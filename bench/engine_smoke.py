"""Micro-benchmark (not a test): the engine's worker against in-process ``Llama.generate()``.

    python -m bench.engine_smoke [--model PATH] [--tokens 256] [--runs 3] [--threads 1]

Prints tokens/s for one stream and for four concurrent streams (aggregate), both sides greedy
with EOS ignored, plus the latency of an 8-token request alone and while a long stream runs.
In-process ``Llama`` serves one sequence at a time, so its "four streams" run one after the
other; the engine decodes them together in one batch per step. Rounds run interleaved (engine,
in-process, engine, ...) after a warm-up; medians are printed.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import llama_cpp

from engine.client import Worker
from engine.protocol import ModelOptions, SamplingParams

DEFAULT_MODEL = Path(__file__).resolve().parent.parent.parent / "shared" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = ("Once upon a time", "The best way to learn", "Here is a recipe for", "In the year 2050")
N_CTX = 2048


def engine_streams(worker: Worker, prompts: list[list[int]], n_tokens: int) -> float:
    """Aggregate tokens/s of ``prompts`` generated at once by the worker."""
    params = SamplingParams(temperature=0, max_tokens=n_tokens, ignore_eos=True)
    started = time.perf_counter()
    streams = [worker.generate(p, params) for p in prompts]
    for stream in streams:
        for _delta in stream:
            pass
    seconds = time.perf_counter() - started
    return sum(s.result.completion_tokens for s in streams) / seconds


def inprocess_streams(llama: llama_cpp.Llama, prompts: list[list[int]], n_tokens: int) -> float:
    """Aggregate tokens/s of ``prompts`` generated one after the other by ``Llama.generate()``."""
    started = time.perf_counter()
    count = 0
    for prompt in prompts:
        llama.reset()  # no prefix reuse between prompts, as in the engine's first round
        generator = llama.generate(prompt, temp=0.0)
        for n, _token in enumerate(generator, 1):
            if n >= n_tokens:
                break
        generator.close()
        count += n_tokens
    return count / (time.perf_counter() - started)


def short_latency(worker: Worker, prompt: list[int], during: list[int] | None) -> float:
    """Seconds for an 8-token request, alone or while a long stream of ``during`` runs."""
    long = None
    if during is not None:
        long = worker.generate(during, SamplingParams(temperature=0, max_tokens=256, ignore_eos=True))
        next(long)  # the long stream is generating
    started = time.perf_counter()
    for _delta in worker.generate(prompt, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)):
        pass
    seconds = time.perf_counter() - started
    if long is not None:
        long.cancel()
        for _delta in long:
            pass
    return seconds


def median_of(runs: int, measure: Callable[[], float]) -> float:
    return statistics.median(measure() for _ in range(runs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    worker = Worker(name="bench")
    worker.start()
    worker.load(args.model, ModelOptions(n_ctx=N_CTX, n_threads=args.threads, parallel=4))
    llama = llama_cpp.Llama(model_path=str(args.model), n_ctx=N_CTX, n_threads=args.threads,
                            n_threads_batch=args.threads, verbose=False)
    prompts = [worker.tokenize(p) for p in PROMPTS]
    try:
        engine_streams(worker, prompts[:1], 16)  # warm-up both sides
        inprocess_streams(llama, prompts[:1], 16)
        rows = []
        for label, batch in (("1 stream", prompts[:1]), ("4 streams", prompts)):
            a, b = [], []
            for _ in range(args.runs):
                a.append(engine_streams(worker, batch, args.tokens))
                b.append(inprocess_streams(llama, batch, args.tokens))
            rows.append((label, statistics.median(a), statistics.median(b)))
        alone = median_of(args.runs, lambda: short_latency(worker, prompts[1], None))
        busy = median_of(args.runs, lambda: short_latency(worker, prompts[1], prompts[0]))
        stats = worker.stats()
    finally:
        worker.close()
        llama.close()

    print(f"model {args.model.name}, {args.tokens} tokens per stream, threads {args.threads}, "
          f"median of {args.runs} runs")
    print(f"{'':<12}{'engine tok/s':>14}{'in-process tok/s':>18}{'ratio':>8}")
    for label, a, b in rows:
        print(f"{label:<12}{a:>14.1f}{b:>18.1f}{a / b:>8.2f}")
    print(f"8-token request: alone {alone * 1000:.0f} ms, beside a 256-token stream {busy * 1000:.0f} ms "
          f"({busy / alone:.2f}x)")
    print(f"engine steps {stats['steps']}, of which batched {stats['multi_sequence_steps']}, "
          f"most sequences in one step {stats['max_sequences_in_step']}")


if __name__ == "__main__":
    main()
