"""Calibration records: the samples behind a case's thresholds, kept beside the case file.

``cases/x.yaml`` is calibrated by ``cases/x.calibration.json`` (written by ``surgery calibrate``,
committed with the case). The record holds, per expectation, every figure the calibration runs
produced (per numeric profile and seed), their mean and spread, the alpha used and the provenance of
each profile. A run reads it to judge claims (decided or undecided for the seeds it runs) and to
show each observed figure against its calibrated distribution.

A record belongs to one *experiment*: the case with its thresholds, name, description, seeds and
markers left out (:func:`experiment_hash`). Rewriting the thresholds (``--write``) keeps the record
valid; changing the data, the models, the surgery, the fine-tune or what is probed makes it stale.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

from surgery.files import write_json
from surgery.stats.bounds import Aggregate, Calibrated, Direction
from surgery.errors import SurgeryInputError

RECORD_SCHEMA = 1
# The version of the code that computes a case's figures (the probe's estimators, the fine-tune loop,
# the data splits). It is part of every experiment hash: bump it with a change that moves figures,
# and every record goes stale until the cases are recalibrated. 2: the streamed probe of issue 14.
MEASUREMENT = 2
RECORD_SUFFIX = ".calibration.json"
THRESHOLD_SUFFIXES = ("_min", "_max")
THRESHOLD_NAMES = ("margin",)


def is_threshold_key(key: str) -> bool:
    """Whether an ``expect`` field holds a threshold (``*_min``, ``*_max``, ``margin``)."""
    return key.endswith(THRESHOLD_SUFFIXES) or key in THRESHOLD_NAMES


def record_path(case_path: str | Path) -> Path:
    """``cases/x.yaml`` → ``cases/x.calibration.json``."""
    path = Path(case_path)
    return path.with_name(path.stem + RECORD_SUFFIX)


def yaml_path(item: str) -> tuple[str, ...]:
    """The case-file keys of an expectation's threshold:
    ``accuracy.beats_baseline`` → expect.accuracy.beats_baseline.margin."""
    parts = ("expect",) + tuple(item.split("."))
    return parts + ("margin",) if item == "accuracy.beats_baseline" else parts


class Rule(TypedDict):
    """How an expectation judges its figure (an expectation result's ``details["rule"]``)."""

    direction: Direction
    aggregate: Aggregate


@dataclass
class ItemCalibration:
    """One expectation's calibration: its samples and summary."""

    direction: Direction
    aggregate: Aggregate
    samples: dict[str, dict[str, float | None]]  # profile -> seed -> figure
    mean: float
    std: float
    seeds: int
    runs: int

    def calibrated(self) -> Calibrated:
        return Calibrated(mean=self.mean, std=self.std, seeds=self.seeds, runs=self.runs)

    def to_dict(self) -> dict[str, Any]:
        return {
            "direction": self.direction,
            "aggregate": self.aggregate,
            "mean": self.mean,
            "std": self.std,
            "seeds": self.seeds,
            "runs": self.runs,
            "samples": self.samples,
        }


@dataclass
class CalibrationRecord:
    """Everything ``surgery calibrate`` measured for one case."""

    case: str
    experiment_hash: str
    alpha: float
    seeds: list[int]
    profiles: dict[str, dict[str, Any]]  # profile name -> its environment and provenance
    items: dict[str, ItemCalibration] = field(default_factory=dict)
    thresholds: dict[str, dict[str, Any]] = field(default_factory=dict)  # item -> derived bounds / decisions
    # variant cases: profile -> arm -> seed -> accuracy after the fine-tune, and each random init's (``inits``)
    arm_figures: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    method: str = (
        "one-sided normal prediction bound for the mean (or worst) of k seeds, t quantile with "
        "n - 1 degrees of freedom, n = calibration seeds (surgery.stats.bounds)"
    )
    created: str = ""
    schema: int = RECORD_SCHEMA

    def describe(self, item: str) -> str:
        """``0.939 ± 0.015 (10 seeds × 3 numeric profiles)`` for an item, or ``""``."""
        cal = self.items.get(item)
        if cal is None:
            return ""
        return (
            f"{cal.mean:.4g} ± {cal.std:.2g} ({cal.seeds} seeds × {len(cal.samples)} numeric "
            f"profile{'s' if len(cal.samples) != 1 else ''})"
        )

    def arm_view(self, arm: str, separator: str = "/") -> "CalibrationRecord":
        """The record as one arm of a variant case sees it: its items (``ARM/name``) under their own names."""
        prefix = arm + separator
        return CalibrationRecord(
            case=f"{self.case}.{arm}",
            experiment_hash=self.experiment_hash,
            alpha=self.alpha,
            seeds=self.seeds,
            profiles=self.profiles,
            items={k.removeprefix(prefix): v for k, v in self.items.items() if k.startswith(prefix)},
            thresholds={k.removeprefix(prefix): v for k, v in self.thresholds.items() if k.startswith(prefix)},
            method=self.method,
            created=self.created,
            schema=self.schema,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": self.schema,
            "case": self.case,
            "experiment_hash": self.experiment_hash,
            "alpha": self.alpha,
            "method": self.method,
            "created": self.created,
            "seeds": self.seeds,
            "profiles": self.profiles,
            "thresholds": self.thresholds,
            "items": {k: v.to_dict() for k, v in self.items.items()},
            **({"arm_figures": self.arm_figures} if self.arm_figures else {}),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CalibrationRecord":
        items = {k: ItemCalibration(**v) for k, v in data.get("items", {}).items()}
        return cls(
            case=data["case"],
            experiment_hash=data["experiment_hash"],
            alpha=float(data["alpha"]),
            seeds=list(data["seeds"]),
            profiles=dict(data["profiles"]),
            items=items,
            thresholds=dict(data.get("thresholds", {})),
            arm_figures=dict(data.get("arm_figures", {})),
            method=data.get("method", ""),
            created=data.get("created", ""),
            schema=int(data.get("schema", RECORD_SCHEMA)),
        )


def load_record(path: str | Path) -> CalibrationRecord:
    """Read a calibration record; a damaged one is bad input naming the file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("schema") != RECORD_SCHEMA:
            raise ValueError(f"schema {data.get('schema')!r}, expected {RECORD_SCHEMA}")
        return CalibrationRecord.from_dict(data)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise SurgeryInputError(
            f"{path}: not a readable calibration record ({exc.__class__.__name__}: {exc}); "
            "re-run `surgery calibrate` to rebuild it"
        ) from None


def save_record(record: CalibrationRecord, path: str | Path) -> Path:
    """Write the record atomically (strict JSON); return its path."""
    write_json(Path(path), record.to_dict())
    return Path(path)
