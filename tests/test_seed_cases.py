"""Every threshold in cases/ is a measurement: each seed case has a fresh calibration record behind it."""

from __future__ import annotations

from pathlib import Path

import pytest

from surgery.case import case_calibration, find_cases, load_case
from surgery.checks.expect import expectation_names, uncalibrated_fields

CASES = find_cases([Path(__file__).resolve().parent.parent / "cases"])


@pytest.mark.parametrize("path", CASES, ids=lambda p: p.stem)
def test_each_seed_case_is_calibrated(path):
    case = load_case(path)
    assert not uncalibrated_fields(case), f"run: surgery calibrate {path} --write"
    calibration = case_calibration(case)
    assert calibration.record is not None, f"no calibration record beside {path}"
    assert calibration.fresh, f"{calibration.path} is stale: the case changed since it was calibrated"
    record = calibration.record
    assert record.alpha == 0.001 and len(record.seeds) >= 8 and len(record.profiles) >= 4
    for name in expectation_names(case):
        if name != "finite":
            assert name in record.items, f"{name} has no calibration in {calibration.path}"
            derived = record.thresholds[name]
            assert derived["form"] in ("claim", "calibrated")
