"""The shipped example and the core benchmark keep working (benchmarks at tiny size)."""

from __future__ import annotations

import json
import runpy
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_keras_question_example_runs_and_checks(capsys):
    runpy.run_path(str(ROOT / "examples" / "keras_question.py"), run_name="__main__")
    assert "np.allclose(sk_dist, ours): True" in capsys.readouterr().out


def test_core_benchmark_quick():
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_core.py"), "--quick", "--repeat", "2", "--primed"],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout  # fmt: skip
    assert '"workload": "W2"' in out and '"workload": "W1"' in out and "ratio_to_limit" in out
    assert "ratio_kept_buffers" in out  # both sides without faulting in fresh output
    assert '"workload": "tiny"' in out and "t_call_ms" in out and "tokenize hash" in out
    assert "primed True" in out.splitlines()[0]  # the machine line says how fresh outputs were timed
    rows = {r["workload"]: r for r in map(json.loads, (x for x in out.splitlines() if x.startswith("{")))}
    fresh = rows["fresh_memory"]  # a W1-sized result (1/64 of it here) faulted in, reused and after idling
    assert fresh["bytes"] == 100 * 400 * 500 * 8 // 64 and fresh["t_reused_ms"] > 0 and fresh["t_idle_ms"] > 0
    for name in ("self_16", "self_96"):  # the triangle rows: exact mirror, right values
        assert rows[name]["symmetric"] and rows[name]["max_abs_err_vs_limit"] < 1e-5, rows[name]
        assert rows[name]["row_blocks"] > 1 and rows[name]["copy_over_self_paired"] > 0


@pytest.mark.skipif(
    not (shutil.which("chromium") or shutil.which("chromium-browser")),
    reason="needs chromium (apt-get install chromium)",
)
def test_dashboard_screenshots_script_draws_the_panels(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "dashboard_screenshots.py"), "--out", str(tmp_path),
         "--pages", "status,groups", "--settle", "1", "--n", "256", "--size", "800x600"],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    for page in ("status", "groups"):
        png = (tmp_path / f"{page}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        assert struct.unpack(">I", png[16:20])[0] == 800  # the width asked for (IHDR)
        assert len(png) > 5000  # more than the navigation bar on a blank page


def test_dashboard_screenshots_script_without_chromium_says_so(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "dashboard_screenshots.py"), "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120, env={"PATH": "/nonexistent", "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert out.returncode == 2 and "no chromium on PATH" in out.stderr


def test_scale_benchmark_quick():
    """Graph sizes and the scheduler's share at tiny size (the resume part: the next test)."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_scale.py"), "--quick", "--part", "graph"]
        + ["--part", "scheduler"],
        capture_output=True, text=True, timeout=300, check=True,
    ).stdout  # fmt: skip
    assert '"bench": "graph"' in out and '"job_tasks"' in out and '"scheduler_share"' in out
    machine = json.loads(next(line for line in out.splitlines() if '"bench": "machine"' in line))
    # what changes the command's fixed cost on this install (the test extras bring these three)
    assert set(machine["installed"]) == {"bokeh", "scipy", "sparse", "numba"}
    assert machine["installed"]["bokeh"] and machine["installed"]["scipy"] and machine["installed"]["sparse"]
    assert 0 < machine["import_dask_array_s"] < 60


def test_scale_benchmark_resume_quick():
    """The resume part at tiny size: four runs of the command (uninterrupted, interrupted,
    resumed, uninterrupted again), one row with both ratios and equal results."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_scale.py"), "--quick", "--part", "resume"],
        capture_output=True, text=True, timeout=600, check=True,
    ).stdout  # fmt: skip
    row = json.loads(next(line for line in out.splitlines() if '"bench": "resume"' in line))
    assert row["interrupted_exit"] == 130 and row["resumed_exit"] == 0 and row["same_result"]
    # the times are printed rounded to 0.01 s: the ratios agree with them to a few 0.001
    assert abs(row["resume_ratio"] - row["resumed_s"] / row["uninterrupted_s"]) < 5e-3
    bracket = (row["uninterrupted_s"] + row["uninterrupted_again_s"]) / 2
    assert abs(row["resume_ratio_bracketed"] - row["resumed_s"] / bracket) < 5e-3
