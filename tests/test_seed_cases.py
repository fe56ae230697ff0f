"""Every threshold in cases/ is a measurement: each seed case has a fresh calibration record behind it."""

from __future__ import annotations

from pathlib import Path

import pytest

from surgery.case import case_calibration, find_cases, load_case
from surgery.checks.comparisons import split_item
from surgery.checks.expect import expectation_names, uncalibrated_fields

CASES_DIR = Path(__file__).resolve().parent.parent / "cases"
CASES = find_cases([CASES_DIR])
# The 224 px cases are calibrated with what a 2-core CPU allows at that size (about 17 min per seed
# triple): 3 seeds, the native profile. Their records say so; the nightly GPU run can widen them.
SCALE_DIR = CASES_DIR / "scale"


def _minimum_calibration(path: Path) -> tuple[int, int]:
    """(seeds, profiles) a record must hold for the case at ``path``."""
    return (3, 1) if SCALE_DIR in path.parents else (8, 4)


@pytest.mark.parametrize("path", CASES, ids=lambda p: p.stem)
def test_each_seed_case_is_calibrated(path):
    case = load_case(path)
    assert not uncalibrated_fields(case), f"run: surgery calibrate {path} --write"
    calibration = case_calibration(case)
    assert calibration.record is not None, f"no calibration record beside {path}"
    assert calibration.fresh, f"{calibration.path} is stale: the case changed since it was calibrated"
    record = calibration.record
    min_seeds, min_profiles = _minimum_calibration(path)
    assert record.alpha == 0.001 and len(record.seeds) >= min_seeds and len(record.profiles) >= min_profiles
    for name in expectation_names(case):
        if split_item(name)[1] != "finite":  # a variant case's arms each have their own: ARM/finite
            assert name in record.items, f"{name} has no calibration in {calibration.path}"
            derived = record.thresholds[name]
            assert derived["form"] in ("claim", "calibrated")
