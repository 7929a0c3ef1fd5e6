"""Run a script with cProfile in every thread, and write the merged stats when it exits.

``python -m cProfile server.py`` profiles only the main thread, which under waitress is
the socket loop; requests, and so the token loop, run in worker threads. Here a hook
installed with ``threading.setprofile`` starts a profiler in each new thread at its
first event, and at exit every profiler's stats are merged into one file::

    python -m bench.profile_server OUT.prof server.py --config cfg.json --port 8080

Read it with ``python -m pstats OUT.prof`` (``sort tottime``, ``stats 30``). Profiling
slows Python-heavy code down, so read shares of the time, not absolute figures.
"""

from __future__ import annotations

import cProfile
import pstats
import runpy
import sys
import threading
from pathlib import Path
from typing import Any

_profiles: list[cProfile.Profile] = []
_lock = threading.Lock()


def _start_thread_profile(_frame: Any, _event: str, _arg: Any) -> None:
    # The first profile event of a new thread: replace this hook with a real profiler.
    profile = cProfile.Profile()
    with _lock:
        _profiles.append(profile)
    profile.enable()


def main(argv: list[str]) -> int:
    """Profile ``argv[1:]`` (a script and its arguments), writing the stats to ``argv[0]``."""
    if len(argv) < 2:
        print("usage: python -m bench.profile_server OUT.prof SCRIPT [ARGS...]", file=sys.stderr)
        return 2
    out, script = Path(argv[0]), Path(argv[1])
    sys.argv = [str(script), *argv[2:]]
    sys.path.insert(0, str(script.resolve().parent))
    threading.setprofile(_start_thread_profile)
    main_profile = cProfile.Profile()
    code: Any = 0
    main_profile.enable()
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as exc:
        code = exc.code
    finally:
        main_profile.disable()
        threading.setprofile(None)  # type: ignore[arg-type]
        _dump([main_profile, *_profiles], out)
    return code if isinstance(code, int) else 0


def _dump(profiles: list[cProfile.Profile], out: Path) -> None:
    with _lock:
        stats = pstats.Stats(profiles[0])
        for profile in profiles[1:]:
            stats.add(profile)
    stats.dump_stats(out)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
