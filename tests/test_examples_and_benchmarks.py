"""The shipped example and the core benchmark keep working (benchmarks at tiny size)."""

from __future__ import annotations

import runpy
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_keras_question_example_runs_and_checks(capsys):
    runpy.run_path(str(ROOT / "examples" / "keras_question.py"), run_name="__main__")
    assert "np.allclose(sk_dist, ours): True" in capsys.readouterr().out


def test_core_benchmark_quick():
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_core.py"), "--quick", "--repeat", "2"],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout  # fmt: skip
    assert '"workload": "W2"' in out and '"workload": "W1"' in out and "ratio_to_limit" in out
