"""What every check shares: the registry, the rule that judges a figure against a threshold, worst rows.

A *check* is one section of a case's ``expect`` (``coverage``, ``accuracy``, ``activations`` …). It is
one module: a pydantic spec for its section, the names of the items (pytest items, report rows) it
yields, how it turns a run's per-seed figures into results, and, when it needs figures the runner
does not measure, hooks that measure them. The module registers it, as torchvision registers a
model builder::

    @register_check
    class Params(Check):
        key = "params"
        spec = ParamsExpect
        ...

:mod:`surgery.case` builds the ``expect`` section from the registry at parse time, and the runner,
the report and pytest read the results; adding a check edits no other file (docs/extending.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar

from surgery.stats.bounds import (
    Aggregate,
    Decision,
    Direction,
    calibration_seeds_to_decide,
    decide,
    prediction_bound,
    seeds_to_decide,
    seeds_to_decide_together,
)
from surgery.stats.calibration import CalibrationRecord, ItemCalibration
from surgery.results import ExpectationResult
from surgery.spec import CALIBRATE, Strict, Threshold

if TYPE_CHECKING:  # hooks receive these; checks never need to import them
    import torch
    import torch.nn as nn


@dataclass
class SeedContext:
    """What a check's hooks see during one seed of a run (models on ``device``, data on the CPU)."""

    case: Any
    seed: int
    split: Any
    source: "nn.Module"
    patient: "nn.Module"
    device: "torch.device"
    accuracy: dict[str, float | None] = field(default_factory=dict)  # figures so far; hooks may add their own


class Check:
    """One ``expect`` section. Subclass, set ``key`` and ``spec``, implement ``items`` and ``evaluate``."""

    key: ClassVar[str]
    spec: ClassVar[type[Strict]]

    def items(self, spec: Any) -> list[str]:
        """The names of the results ``evaluate`` will produce for ``spec``, in order (``key.field``)."""
        raise NotImplementedError

    def evaluate(
        self, spec: Any, per_seed: list[dict[str, Any]], judge: "Judge", metrics: dict[str, Any]
    ) -> list[ExpectationResult]:
        """Results for ``spec`` from the seeds' figures; may add aggregated figures to ``metrics``."""
        raise NotImplementedError

    def after_surgery(self, spec: Any, context: SeedContext) -> dict[str, Any] | None:
        """Figures of this seed measured right after surgery, kept in ``per_seed[...]["checks"][key]``."""
        return None

    def after_finetune(self, spec: Any, context: SeedContext) -> dict[str, Any] | None:
        """Figures of this seed measured after the fine-tune, merged into the same place."""
        return None


CHECKS: dict[str, Check] = {}


def register_check(cls: type[Check]) -> type[Check]:
    """Class decorator: file a check under its ``key``; a second check with the same key is refused."""
    if not getattr(cls, "key", None) or not isinstance(getattr(cls, "spec", None), type):
        raise TypeError(f"{cls.__name__}: a check needs a 'key' and a pydantic 'spec' class")
    if cls.key in CHECKS or cls.key in ("finite",):
        raise ValueError(f"a check named {cls.key!r} is registered already")
    CHECKS[cls.key] = cls()
    return cls


def list_checks() -> list[str]:
    """The registered checks' keys, in registration order."""
    return list(CHECKS)


def fmt(value: float | None) -> str:
    """A figure as shown in messages: four significant digits, ``n/a`` when missing."""
    return "n/a" if value is None else f"{value:.4g}"


def check(
    name: str,
    observed: float | None,
    threshold: float,
    ok: Callable[[float, float], bool],
    op: str,
    where: str,
    details: dict[str, Any] | None = None,
) -> ExpectationResult:
    """One expectation against a plain threshold; a missing or NaN observation fails."""
    field = name.rsplit(".", 1)[-1]
    passed = observed is not None and not math.isnan(observed) and ok(observed, threshold)
    shown_op = op if passed else {">=": "<", "<=": ">", "<": ">=", "==": "!="}[op]
    message = f"observed {fmt(observed)} {shown_op} {field} {fmt(threshold)} ({where})"
    return ExpectationResult(name, passed, observed, threshold, details or {}, message)


def at_least(
    name: str, observed: float | None, threshold: float, where: str, details: dict[str, Any] | None = None
) -> ExpectationResult:
    """``observed >= threshold``."""
    return check(name, observed, threshold, lambda o, t: o >= t, ">=", where, details)


def at_most(
    name: str, observed: float | None, threshold: float, where: str, details: dict[str, Any] | None = None
) -> ExpectationResult:
    """``observed <= threshold``."""
    return check(name, observed, threshold, lambda o, t: o <= t, "<=", where, details)


def below(
    name: str, observed: float | None, threshold: float, where: str, details: dict[str, Any] | None = None
) -> ExpectationResult:
    """``observed < threshold`` (Evidently's drift convention: drift is detected at the threshold)."""
    return check(name, observed, threshold, lambda o, t: o < t, "<", where, details)


def resolve_threshold(value: Threshold, seeds: int) -> float | None:
    """The number a run of ``seeds`` seeds is held to: a claim as written, a calibrated entry of the
    largest seed count <= ``seeds``; None for the ``calibrate`` placeholder or when no entry applies."""
    if isinstance(value, dict):
        usable = [count for count in value if count <= seeds]
        return value[max(usable)] if usable else None
    if value == CALIBRATE:
        return None
    return float(value)


def seeds_label(per_seed: list[dict[str, Any]]) -> str:
    """``seed 0`` or ``seeds 0, 1, 2``: which seeds a message speaks of."""
    seeds = [s["seed"] for s in per_seed]
    return f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {', '.join(map(str, seeds))}"


def worst_drift_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The activation row with the largest normalised W1; a NaN distance counts as the worst."""
    return max(rows, key=lambda r: math.inf if math.isnan(r["w1_norm"]) else r["w1_norm"])


def worst_dead_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The activation row with the largest dead-channel fraction."""
    return max(rows, key=lambda r: r["dead_channel_frac"])


@dataclass
class Judge:
    """Judges the expectations of one run of ``seeds`` seeds, with the case's calibration record if fresh."""

    seeds: int
    record: CalibrationRecord | None = None

    def foresee(self, name: str, raw: Threshold, direction: Direction, aggregate_by: Aggregate) -> bool:
        """True when this run's seeds cannot decide the claim ``name`` whatever they observe: a fixed
        threshold the fresh record calls undecided at this seed count (the figure need not be measured)."""
        record = self.record
        cal = record.items.get(name) if record is not None else None
        threshold = resolve_threshold(raw, self.seeds)
        if record is None or cal is None or threshold is None or isinstance(raw, dict):
            return False
        return self._claim_decision(record, cal, threshold, direction, aggregate_by) == "undecided"

    def _claim_decision(
        self,
        record: CalibrationRecord,
        cal: ItemCalibration,
        threshold: float,
        direction: Direction,
        aggregate_by: Aggregate,
    ) -> Decision:
        """What the record says a run of this many seeds makes of a fixed threshold: holds, fails or undecided."""
        return decide(
            cal.calibrated(),
            threshold,
            alpha=record.alpha,
            k=self.seeds,
            direction=direction,
            aggregate=aggregate_by,
        )

    def __call__(
        self,
        name: str,
        observed: float | None,
        raw: Threshold,
        direction: Direction,
        aggregate_by: Aggregate,
        where: str,
        details: dict[str, Any] | None = None,
        strict: bool = False,
    ) -> ExpectationResult:
        threshold = resolve_threshold(raw, self.seeds)
        details = {**(details or {}), "rule": {"direction": direction, "aggregate": aggregate_by}}
        record = self.record
        cal = record.items.get(name) if record is not None else None
        calibration: dict[str, Any] | None = None
        if record is not None and cal is not None:
            alpha = record.alpha
            calibration = {
                "mean": cal.mean,
                "std": cal.std,
                "seeds": cal.seeds,
                "runs": cal.runs,
                "profiles": sorted(cal.samples),
                "alpha": alpha,
                "k": self.seeds,
                "aggregate": aggregate_by,
                "direction": direction,
                "bound": prediction_bound(
                    cal.calibrated(), alpha=alpha, k=self.seeds, direction=direction, aggregate=aggregate_by
                ),
                "form": "calibrated" if isinstance(raw, dict) else "claim",
                "samples": [v for runs in cal.samples.values() for v in runs.values() if v is not None],
            }
        if threshold is None:
            why = (  # raw is the placeholder or a mapping (resolve_threshold refuses any other word)
                f"calibrated for {min(raw)} or more seeds only, this run has {self.seeds}"
                if isinstance(raw, dict)
                else "threshold not calibrated yet (run `surgery calibrate --write`)"
            )
            return ExpectationResult(
                name,
                False,
                observed,
                None,
                details,
                f"undecided: {why} (observed {fmt(observed)}, {where})",
                status="undecided",
                calibration=calibration,
            )
        if direction == "lower":
            result = at_least(name, observed, threshold, where, details)
        elif strict:
            result = below(name, observed, threshold, where, details)
        else:
            result = at_most(name, observed, threshold, where, details)
        result.calibration = calibration
        if record is None or cal is None or calibration is None:  # no calibration for this item
            return result
        shown = record.describe(name)
        plural = "s" if self.seeds != 1 else ""
        if isinstance(raw, dict):
            result.message += (
                f"; calibrated {shown}; threshold for {self.seeds} seed{plural} "
                f"({aggregate_by}) at α = {record.alpha:g}"
            )
            return result
        decision = self._claim_decision(record, cal, threshold, direction, aggregate_by)
        calibration["decision"] = decision
        if decision != "undecided":
            result.message += f"; calibrated {shown}: a claim decided ({decision}) for {self.seeds} seed{plural}"
            return result
        calibrated = cal.calibrated()
        needed = seeds_to_decide(calibrated, threshold, alpha=record.alpha, direction=direction, aggregate=aggregate_by)
        calibration["seeds_to_decide"] = needed
        calibration_needed = (
            None  # the run's own seeds can decide it: no larger calibration is needed
            if needed is not None
            else calibration_seeds_to_decide(
                calibrated, threshold, alpha=record.alpha, k=self.seeds, direction=direction, aggregate=aggregate_by
            )
        )
        calibration["calibration_seeds_to_decide"] = calibration_needed
        if needed is not None:
            remedy = f"{needed} seeds would decide it"
        elif calibration_needed is not None:
            remedy = (
                f"more seeds in this run alone cannot decide it; calibrating with {calibration_needed} seeds "
                f"would (the record has {calibrated.seeds})"
            )
        else:
            together = seeds_to_decide_together(
                calibrated, threshold, alpha=record.alpha, direction=direction, aggregate=aggregate_by
            )
            calibration["seeds_to_decide_together"] = together
            remedy = (
                f"neither more run seeds nor a larger calibration alone decides it; a run of {together} seeds "
                f"against a calibration of {together} would, or a quieter experiment"
                if together is not None
                else "more seeds alone cannot decide it: make the experiment quieter (more fine-tune steps, "
                "a larger evaluation set)"
            )
        field = name.rsplit(".", 1)[-1]
        result.status, result.passed = "undecided", False
        result.message = (
            f"undecided at α = {record.alpha:g} with {self.seeds} seed{plural}: {field} "
            f"{fmt(threshold)} against calibrated {shown}; {remedy} (observed {fmt(observed)}, {where})"
        )
        return result
