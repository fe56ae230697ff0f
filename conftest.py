"""Repository-wide pytest set-up for tests/, cases/ and benchmarks/: the pinned numeric profile.

It also holds the fixtures all three share: an isolated zoo cache, and the device of a run.

Figures depend on torch's thread count (the order of float sums), so every session of this project
runs with the count the runner uses (``$SURGERY_THREADS``, else ``surgery.train.numerics.DEFAULT_THREADS``;
``--surgery-threads`` overrides), and the header says what it ran under. Under pytest-xdist each
worker gets cores / workers threads instead, which is one of the calibrated profiles' neighbours.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from surgery.train.finetune import resolve_device
from surgery.train.numerics import numeric_profile, pin_numerics

pytest_plugins = ("pytester",)  # in-process pytest runs for the plugin's own tests


def pytest_configure(config: pytest.Config) -> None:
    pin_numerics(config.getoption("surgery_threads", None))


def pytest_report_header(config: pytest.Config) -> str:
    profile = numeric_profile()
    return (f"surgery numerics: {profile['threads']} threads, cpu capability {profile['cpu_capability']}, "
            f"torch {profile['torch']}")


@pytest.fixture
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``$SURGERY_CACHE`` (the zoo) and ``$TORCH_HOME`` (pretrained weights) point into ``tmp_path``."""
    cache = tmp_path / "surgery-cache"
    monkeypatch.setenv("SURGERY_CACHE", str(cache))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    return cache


@pytest.fixture(scope="session")
def device(pytestconfig: pytest.Config) -> torch.device:
    return resolve_device(pytestconfig.getoption("surgery_device") or "auto")
