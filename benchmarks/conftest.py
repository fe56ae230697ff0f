"""Shared set-up for the benchmarks: the measured ratios (summarised, saved), and the machine's speed saved
with every run so that docs/performance.md can put each figure beside it."""

from __future__ import annotations

import functools
import os

import pytest

from benchmarks.timing import resnet18_step_seconds

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


@functools.cache
def machine_step_seconds() -> float:
    """The step time, measured once a session: pytest-benchmark asks for the machine's facts when it saves a
    run and again when it compares one (``make bench-gpu``)."""
    return round(resnet18_step_seconds(), 3)


def pytest_benchmark_update_machine_info(config, machine_info: dict) -> None:
    """Save the machine's facts with the run: cores, torch and its CPU kernels, the ResNet-18 step time."""
    import torch

    machine_info["surgery"] = {
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "resnet18_step_s": machine_step_seconds(),
    }
