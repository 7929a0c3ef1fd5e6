"""``python -m bench``: parse the options, set up both sides, run the figures, report.

Without ``--base-url`` it builds a temporary models folder (stories260K copied, the
"mid" and "big" models generated), starts our server on it in a subprocess, and stops
it with SIGTERM at the end. With ``--base-url`` it measures that server instead, on
the one model it is told about, and skips the figures only our server can take part in.
With ``--real`` it runs the real-model set instead (``bench.real``): our server and
llama-server on a real GGUF, each with its own defaults.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from bench.client import BenchError, Endpoint
from bench.cpu import CpuMeter, cores_busy
from bench.figures import FIGURES, NEEDS_OURS, Bench, SkipFigure
from bench.inprocess import N_CTX, N_THREADS, LocalModels
from bench.real import REAL_FIGURES, RealBench
from bench.real_setup import RealServers, real_model_path
from bench.report import machine, print_table, write_json
from bench.serverproc import LlamaServerProcess, ServerProcess, pinned_options
from bench.stats import Row
from bench.workspace import STORIES_ID, Model, Workspace, stories_path

log = logging.getLogger("bench")

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SMOKE_RUNS, SMOKE_TOKENS = 2, 16
REAL_TOKENS, REAL_SMOKE_TOKENS = 128, 32  # --real: one stream's length (the long stream is twice that)
# --real rounds: a decode step's time drifts by 10-20% from one second to the next on a shared
# virtual machine; with 5 rounds the same settings gave median ratios 0.92 and 0.98 in one run.
REAL_RUNS = 11
BUSY_CORES = 0.3  # cores in use by others before the start above which the figures are suspect
DESCRIPTION = "Benchmark llama-cpp-server (or --base-url) against llama-cpp-python in-process."


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=DESCRIPTION)
    parser.add_argument("--runs", type=int, help="measured rounds per comparison, after one warm-up "
                                                 f"(default 5; {REAL_RUNS} with --real)")
    parser.add_argument("--tokens", type=int,
                        help=f"tokens per long stream (default 512; with --real {REAL_TOKENS}, "
                             f"the stream figures' length)")
    parser.add_argument("--real", action="store_true",
                        help="the real-model set: our server against llama-server (--llama-server) on "
                             "SmolLM2-135M-Instruct (or --model-path), each with its own defaults")
    parser.add_argument("--base-url", help="measure this running OpenAI-compatible server instead of ours")
    parser.add_argument("--model", default=STORIES_ID,
                        help="with --base-url: the name that server knows stories260K (or --model-path) by")
    parser.add_argument("--model-path", type=Path,
                        help="with --base-url: the GGUF file that server serves, for the in-process side "
                             "(default: stories260K.gguf); with --real: the real model "
                             "(default: SmolLM2-135M-Instruct.Q4_1.gguf)")
    parser.add_argument("--only", type=_figure_names,
                        help=f"comma-separated figures: {', '.join(FIGURES)}; with --real: {', '.join(REAL_FIGURES)}")
    parser.add_argument("--smoke", action="store_true",
                        help=f"a quick check that everything runs: {SMOKE_RUNS} runs, {SMOKE_TOKENS} tokens, "
                             "stories260K only (copies stand in for the generated models); "
                             f"with --real: {SMOKE_RUNS} runs, {REAL_SMOKE_TOKENS}-token streams")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="where the JSON files go")
    parser.add_argument("--profile-server", type=Path, metavar="OUT.prof",
                        help="run our server with cProfile in every thread; stats written at exit")
    parser.add_argument("--llama-server", type=Path, metavar="PATH",
                        help="a llama-server binary built from the llama.cpp that llama-cpp-python vendors; "
                             "enables the 'versus' figure, and is the other side of the --real figures")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    args.runs = args.runs or (SMOKE_RUNS if args.smoke else REAL_RUNS if args.real else 5)
    if args.real:
        args.tokens = args.tokens or (REAL_SMOKE_TOKENS if args.smoke else REAL_TOKENS)
    args.tokens = args.tokens or (SMOKE_TOKENS if args.smoke else 512)
    if args.runs < 1 or args.tokens < 1:
        parser.error("--runs and --tokens must be at least 1")
    if args.base_url and args.profile_server:
        parser.error("--profile-server profiles our server; it cannot be combined with --base-url")
    if args.real and (args.base_url or args.profile_server):
        parser.error("--real starts both servers itself; it cannot be combined with --base-url or --profile-server")
    chosen = REAL_FIGURES if args.real else FIGURES
    if args.only and any(name not in chosen for name in args.only):
        parser.error(f"with{'' if args.real else 'out'} --real, --only chooses from {', '.join(chosen)}")
    return args


def _figure_names(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in FIGURES and name not in REAL_FIGURES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown figure {', '.join(unknown) or '(none)'}; "
                                         f"choose from {', '.join([*FIGURES, *REAL_FIGURES])}")
    return names


def main(argv: list[str] | None = None) -> int:
    """Run the selected figures; 0 when every one ran (missed targets included), 1 otherwise."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    started = time.monotonic()
    args.busy_before = cores_busy()
    if args.busy_before is not None and args.busy_before >= BUSY_CORES:
        log.warning("%.1f cores busy before starting: other processes use the CPU, figures will be noisy",
                    args.busy_before)
    if args.real:
        return _main_real(args, started)
    local = LocalModels()
    with ExitStack() as stack:
        try:
            bench = _remote_bench(args, local) if args.base_url else _our_bench(args, local, stack)
        except (BenchError, OSError) as exc:
            log.error("cannot set up the benchmark: %s", exc)
            return 1
        stack.callback(local.close)  # runs first: close the in-process models before their files go
        skip = set() if bench.ours else NEEDS_OURS
        rows, skipped, failed = run_figures(bench, FIGURES, args.only or list(FIGURES), args, _context(args), skip)
    header = (f"llama-cpp-server bench: {args.base_url or 'our server.py'}; {_machine_line()}; "
              f"runs={args.runs} tokens={args.tokens}{' (smoke)' if args.smoke else ''}; "
              f"{time.monotonic() - started:.0f} s")
    print_table(rows, skipped, header, sys.stdout)
    return 1 if failed else 0


def _main_real(args: argparse.Namespace, started: float) -> int:
    """The real-model set: both servers on one real GGUF, started here and stopped at the end."""
    path = args.model_path or real_model_path()
    with ExitStack() as stack:
        try:
            servers = RealServers(path, args.llama_server, stack)
        except OSError as exc:
            log.error("cannot set up the benchmark: %s", exc)
            return 1
        bench = RealBench(args.runs, args.tokens, args.smoke, servers)
        context = _real_context(args, servers)
        rows, skipped, failed = run_figures(bench, REAL_FIGURES, args.only or list(REAL_FIGURES), args, context)
    header = (f"llama-cpp-server bench --real: our server.py vs llama-server on {path.name}, each with its defaults; "
              f"{_machine_line()}; runs={args.runs} tokens={args.tokens}{' (smoke)' if args.smoke else ''}; "
              f"{time.monotonic() - started:.0f} s")
    print_table(rows, skipped, header, sys.stdout)
    return 1 if failed else 0


def _our_bench(args: argparse.Namespace, local: LocalModels, stack: ExitStack) -> Bench:
    workspace = stack.enter_context(Workspace(smoke=args.smoke))
    server = ServerProcess(workspace.write_config(), workspace.root / "server.log", args.profile_server)
    stack.callback(_stop, server)
    endpoint = Endpoint(server.start())
    return Bench(args.runs, args.tokens, args.smoke, endpoint, workspace.models, local, ours=True,
                 server_pid=server.pid, llama_server=_llama_servers(args, workspace, stack))


def _llama_servers(args: argparse.Namespace, workspace: Workspace,
                   stack: ExitStack) -> Callable[[Model], Endpoint] | None:
    """Start llama.cpp's C++ server on a model when a figure first asks for it (one process each)."""
    if args.llama_server is None:
        return None
    started: dict[str, Endpoint] = {}

    def endpoint(model: Model) -> Endpoint:
        if model.role not in started:
            log_path = workspace.root / f"llama-server-{model.role}.log"
            process = LlamaServerProcess(args.llama_server, model.path, log_path, pinned_options(N_CTX, N_THREADS))
            stack.callback(process.stop)
            started[model.role] = Endpoint(process.start())
        return started[model.role]

    return endpoint


def _stop(server: ServerProcess) -> None:
    code = server.stop()
    if code not in (0, None):
        log.warning("the server exited with %s after SIGTERM; its log:\n%s", code, server.log_tail())


def _remote_bench(args: argparse.Namespace, local: LocalModels) -> Bench:
    path = args.model_path or stories_path()
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (give the served model's file with --model-path)")
    models = {"stories": Model("stories", args.model, path)}
    return Bench(args.runs, args.tokens, args.smoke, Endpoint(args.base_url), models, local, ours=False)


def run_figures(bench: Any, figures: dict[str, Callable[[Any], list[Row]]], names: list[str],
                args: argparse.Namespace, context: dict[str, Any],
                needs_ours: frozenset[str] | set[str] = frozenset()) -> tuple[list[Row], dict[str, str], list[str]]:
    """Run each figure, writing its JSON; a figure that fails is logged and the others still run.

    ``needs_ours`` are figures skipped because the server under test is not ours (``--base-url``).
    """
    rows: list[Row] = []
    skipped: dict[str, str] = {}
    failed: list[str] = []
    for name in names:
        if name in needs_ours:
            skipped[name] = "not run: needs our server (its admin API or several models), not --base-url"
            write_json(args.results_dir, name, [], context, skipped=skipped[name])
            continue
        log.info("figure %s: running", name)
        started = time.monotonic()
        meter = CpuMeter([os.getpid()])  # the benchmark, the servers it started, and their workers
        meter.start()
        try:
            figure_rows = figures[name](bench)
        except SkipFigure as exc:
            skipped[name] = f"not run: {exc}"
            write_json(args.results_dir, name, [], context, skipped=skipped[name])
            continue
        except Exception as exc:
            log.exception("figure %s failed", name)
            skipped[name] = f"FAILED: {type(exc).__name__}: {exc}"
            failed.append(name)
            write_json(args.results_dir, name, [], context, skipped=skipped[name])  # no stale file left
            continue
        cpu = meter.stop()
        for row in figure_rows:
            row.cpu = cpu
        log.info("figure %s: done in %.1f s; cores used by us %s, by other processes %s", name,
                 time.monotonic() - started, *((cpu["ours"], cpu["others"]) if cpu else ("?", "?")))
        write_json(args.results_dir, name, figure_rows, context)
        rows += figure_rows
    return rows, skipped, failed


def _context(args: argparse.Namespace) -> dict[str, Any]:
    return {"server": args.base_url or "ours", "machine": {**machine(), "cores_busy_before": args.busy_before},
            "settings": {"runs": args.runs, "tokens": args.tokens, "smoke": args.smoke, "n_threads": 1,
                         "n_ctx": 2048, "sampling": "greedy (temperature 0)"}}


def _real_context(args: argparse.Namespace, servers: RealServers) -> dict[str, Any]:
    return {"server": "ours vs llama-server", "machine": {**machine(), "cores_busy_before": args.busy_before},
            "settings": {"runs": args.runs, "tokens": args.tokens, "smoke": args.smoke,
                         "model": servers.model.path.name,
                         "llama_server": str(args.llama_server) if args.llama_server else None,
                         "profiles": servers.plan(), "sampling": "greedy (temperature 0)"}}


def _machine_line() -> str:
    info = machine()
    tree = f"{info['commit']}{' + changes' if info['dirty'] else ''}"
    return f"{info['usable_cores']} cores ({info['cpu']}), llama-cpp-python {info['llama_cpp_python']}, tree {tree}"
