"""Repository-wide pytest set-up for tests/, cases/ and benchmarks/: the pinned numeric profile.

Figures depend on torch's thread count (the order of float sums), so every session of this project
runs with the count the runner uses (``$SURGERY_THREADS``, else ``surgery.numerics.DEFAULT_THREADS``;
``--surgery-threads`` overrides), and the header says what it ran under. Under pytest-xdist each
worker gets cores / workers threads instead, which is one of the calibrated profiles' neighbours.
"""

from __future__ import annotations

import pytest

pytest_plugins = ("pytester",)  # in-process pytest runs for the plugin's own tests


def pytest_configure(config: pytest.Config) -> None:
    from surgery.numerics import pin_numerics

    pin_numerics(config.getoption("surgery_threads", None))


def pytest_report_header(config: pytest.Config) -> str:
    from surgery.numerics import numeric_profile

    profile = numeric_profile()
    return (f"surgery numerics: {profile['threads']} threads, cpu capability {profile['cpu_capability']}, "
            f"torch {profile['torch']}")
