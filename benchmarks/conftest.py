"""Shared set-up for the benchmarks: the device option, and a summary of the measured ratios."""

from __future__ import annotations

import pytest

RATIOS: dict[str, tuple[float, str]] = {}


@pytest.fixture
def record_ratio(benchmark):
    """Record a measured ratio with its goal: shown in the terminal summary and saved with the benchmark."""

    def record(name: str, value: float, goal: str) -> None:
        RATIOS[name] = (value, goal)
        benchmark.extra_info[name] = value
        benchmark.extra_info[f"{name}_goal"] = goal

    return record


def pytest_terminal_summary(terminalreporter) -> None:
    if RATIOS:
        terminalreporter.section("surgery ratios (measured / goal)")
        for name, (value, goal) in RATIOS.items():
            terminalreporter.write_line(f"{name:<34} {value:8.3f}   goal {goal}")
