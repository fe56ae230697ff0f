"""Suite time: the seed cases through pytest with a warm zoo cache (the zoo is built first, timed apart)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_zoo_build_cold(benchmark, record_ratio, isolated_cache):
    """Cold cache: train one zoo model (mnist-resnet18) from nothing."""
    from surgery.train import zoo

    benchmark.pedantic(zoo.build, args=("mnist-resnet18",), kwargs={"progress": False}, rounds=1)
    record_ratio("zoo_build_mnist_resnet18_s", benchmark.stats.stats.data[0], "")


@pytest.mark.slow
def test_seed_cases_warm(benchmark, record_ratio):
    """Warm cache: `pytest cases --surgery-seeds 1 -m "not slow"`, as CI runs it."""
    subprocess.run([sys.executable, "-m", "surgery.cli", "zoo", "build"], check=True, cwd=ROOT, capture_output=True)

    def suite() -> None:
        subprocess.run(
            [sys.executable, "-m", "pytest", "cases", "-q", "--surgery-seeds", "1", "-p", "no:cacheprovider"]
            + ["-m", "not slow"],
            check=True,
            cwd=ROOT,
            capture_output=True,
        )

    start = time.perf_counter()
    benchmark.pedantic(suite, rounds=1)
    record_ratio("seed_cases_warm_s", time.perf_counter() - start, "<= 120")
