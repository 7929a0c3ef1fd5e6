"""The benchmark harness runs end to end; no timing is asserted (benchmarks are never timed tests)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import ROOT

FIGURES = ("stream", "ttft", "cold", "rps", "parallel", "health")


def test_bench_smoke_prints_a_table_and_writes_json(stories_path, tmp_path):
    env = {**os.environ, "LLAMA_TEST_MODELS": str(stories_path.parent)}
    result = subprocess.run([sys.executable, "-m", "bench", "--smoke", "--results-dir", str(tmp_path)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-4000:]
    table = result.stdout
    assert "A median" in table and "target" in table
    for figure in FIGURES:
        assert f"\n{figure} " in table, f"no row for {figure}:\n{table}"
        document = json.loads((tmp_path / f"{figure}.json").read_text(encoding="utf-8"))
        assert document["figure"] == figure and document["skipped"] is None
        assert document["machine"]["cores"] >= 1
        for row in document["rows"]:
            assert len(row["a"]["samples"]) == len(row["b"]["samples"]) >= 2
            assert row["a"]["median"] > 0 and row["b"]["median"] > 0
