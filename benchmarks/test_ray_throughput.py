"""Throughput on Ray: the seed suite (``cases/``, one seed) on a local 2-CPU Ray cluster, one thread per task,
against the same suite run locally with 2 threads. Goal: ratio (local time / Ray time) >= 0.9.

Both runs are ``surgery run`` subprocesses with a warm zoo cache (built first, timed apart), so both pay the
same interpreter start; the cluster is started once beforehand (a nightly cluster is long-lived), and the Ray
run pays for its workers (start, import torch), the object store and the driver's assembling and writing.
``SURGERY_RAY_BENCH_CASES=a.yaml,b.yaml`` runs a subset instead of the whole suite.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SURGERY = [sys.executable, "-m", "surgery.cli"]


def _cases() -> list[str]:
    chosen = os.environ.get("SURGERY_RAY_BENCH_CASES", "").strip()
    return [c.strip() for c in chosen.split(",") if c.strip()] or ["cases"]


def _timed(args: list[str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run([*SURGERY, *args], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode in (0, 1), proc.stdout + proc.stderr  # 1: an expectation failed, still a full run
    return time.perf_counter() - start


@pytest.mark.slow
def test_seed_suite_on_ray_against_local(benchmark, record_ratio, tmp_path):
    ray = pytest.importorskip("ray")
    subprocess.run([*SURGERY, "zoo", "build"], check=True, cwd=ROOT, capture_output=True)
    context = ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    try:
        address = context.address_info["gcs_address"]
        cases = _cases()
        local = _timed(["run", *cases, "--seeds", "1", "--threads", "2", "--quiet", "--report", str(tmp_path / "l")])
        times: list[float] = []

        def on_ray() -> None:
            times.append(
                _timed(
                    [
                        "run",
                        *cases,
                        "--seeds",
                        "1",
                        "--threads",
                        "1",
                        "--quiet",
                        "--report",
                        str(tmp_path / "r"),
                        "--ray",
                        address,
                    ]
                )
            )

        benchmark.pedantic(on_ray, rounds=1)
    finally:
        ray.shutdown()
    record_ratio("ray_suite_local_s", local, "")
    record_ratio("ray_suite_ray_s", times[0], "")
    record_ratio("ray_suite_throughput_ratio", local / times[0], ">= 0.9")
