"""``surgery history`` over thirty nights: wall time and page size (issue 33's goal: under 5 s and 2 MB).

The nights are the history tests' (``tests/history_nights.py``): real runs of a tiny calibrated case
(3 seeds, ``surgery run --dated``), copied to thirty dated directories with their provenance edited.
Two sizes, both held to the goal: the one case of the tests, and a suite of 12 cases (copies of it under
other names, as many as ``cases/`` holds). Each is timed as a
user runs it: ``surgery history DIR`` in a fresh process, imports included; the in-process rendering
(reading and drawing, imports warm) is recorded beside it.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path.insert(0, str(TESTS))  # the history tests' helpers, and the modules they import (cli_runs, test_calibration)

from history_nights import real_runs, thirty_nights  # noqa: E402

from surgery.nightly.history import read_history  # noqa: E402
from surgery.report.history import write_history  # noqa: E402

GOAL_SECONDS, GOAL_BYTES = 5.0, 2_000_000


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    return real_runs(tmp_path_factory.mktemp("history-bench"))


@pytest.mark.parametrize("cases", [1, 12])
def test_history_of_thirty_nights(benchmark, record_ratio, runs, tmp_path, cases):
    nights = thirty_nights(runs, tmp_path / "nightly", cases=cases)
    page = nights / "history.html"
    command = [sys.executable, "-m", "surgery.cli", "history", str(nights)]

    def cli() -> None:
        subprocess.run(command, check=True, capture_output=True)

    benchmark.pedantic(cli, rounds=3, iterations=1)
    size = page.stat().st_size
    start = time.perf_counter()
    write_history(read_history([nights]), tmp_path / "again.html")
    in_process = time.perf_counter() - start
    record_ratio(f"history {cases} case(s): CLI s", benchmark.stats.stats.max, f"< {GOAL_SECONDS:g} s")
    record_ratio(f"history {cases} case(s): in-process s", in_process, "-")
    record_ratio(f"history {cases} case(s): MB", size / 1e6, f"< {GOAL_BYTES / 1e6:g} MB")
    assert size < GOAL_BYTES
    assert benchmark.stats.stats.max < GOAL_SECONDS
