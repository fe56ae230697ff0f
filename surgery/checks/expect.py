"""Turn a case's per-seed figures into expectation results: observed, threshold, passed or undecided, one line.

Thresholds come in three forms (see :data:`surgery.case.Threshold`): a claim (a number), a
calibrated threshold per seed count (``{1: 0.884, 3: 0.902}``) or the placeholder ``calibrate``.
With a fresh calibration record, a claim the seeds of this run cannot decide at the record's alpha
is *undecided*, and every message shows the calibrated distribution behind its threshold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from surgery.bounds import Aggregate, Direction, decide, prediction_bound, seeds_to_decide
from surgery.calibration import CalibrationRecord, yaml_path
from surgery.case import CALIBRATE, Case, Threshold
from surgery.checks.accuracy import accuracy_metrics, aggregate
from surgery.results import ExpectationResult


def fmt(value: float | None) -> str:
    """A figure as shown in messages: four significant digits, ``n/a`` when missing."""
    return "n/a" if value is None else f"{value:.4g}"


def check(name: str, observed: float | None, threshold: float, ok: Callable[[float, float], bool], op: str,
          where: str, details: dict[str, Any] | None = None) -> ExpectationResult:
    """One expectation against a plain threshold; a missing or NaN observation fails."""
    field = name.rsplit(".", 1)[-1]
    passed = observed is not None and not math.isnan(observed) and ok(observed, threshold)
    shown_op = op if passed else {">=": "<", "<=": ">", "<": ">=", "==": "!="}[op]
    message = f"observed {fmt(observed)} {shown_op} {field} {fmt(threshold)} ({where})"
    return ExpectationResult(name, passed, observed, threshold, details or {}, message)


def at_least(name: str, observed: float | None, threshold: float, where: str,
             details: dict[str, Any] | None = None) -> ExpectationResult:
    """``observed >= threshold``."""
    return check(name, observed, threshold, lambda o, t: o >= t, ">=", where, details)


def at_most(name: str, observed: float | None, threshold: float, where: str,
            details: dict[str, Any] | None = None) -> ExpectationResult:
    """``observed <= threshold``."""
    return check(name, observed, threshold, lambda o, t: o <= t, "<=", where, details)


def below(name: str, observed: float | None, threshold: float, where: str,
          details: dict[str, Any] | None = None) -> ExpectationResult:
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


def _seeds(per_seed: list[dict[str, Any]]) -> str:
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

    def __call__(self, name: str, observed: float | None, raw: Threshold, direction: Direction,
                 aggregate_by: Aggregate, where: str, details: dict[str, Any] | None = None,
                 strict: bool = False) -> ExpectationResult:
        threshold = resolve_threshold(raw, self.seeds)
        details = {**(details or {}), "rule": {"direction": direction, "aggregate": aggregate_by}}
        cal = self.record.items.get(name) if self.record is not None else None
        calibration = None
        if cal is not None:
            alpha = self.record.alpha
            calibration = {"mean": cal.mean, "std": cal.std, "seeds": cal.seeds, "runs": cal.runs,
                           "profiles": sorted(cal.samples), "alpha": alpha, "k": self.seeds,
                           "aggregate": aggregate_by, "direction": direction,
                           "bound": prediction_bound(cal.calibrated(), alpha=alpha, k=self.seeds,
                                                     direction=direction, aggregate=aggregate_by),
                           "form": "calibrated" if isinstance(raw, dict) else "claim",
                           "samples": [v for runs in cal.samples.values() for v in runs.values() if v is not None]}
        if threshold is None:
            why = ("threshold not calibrated yet (run `surgery calibrate --write`)" if raw == CALIBRATE else
                   f"calibrated for {min(raw)} or more seeds only, this run has {self.seeds}")
            return ExpectationResult(name, False, observed, None, details or {},
                                     f"undecided: {why} (observed {fmt(observed)}, {where})",
                                     status="undecided", calibration=calibration)
        if direction == "lower":
            result = at_least(name, observed, threshold, where, details)
        elif strict:
            result = below(name, observed, threshold, where, details)
        else:
            result = at_most(name, observed, threshold, where, details)
        result.calibration = calibration
        if cal is None:
            return result
        shown = self.record.describe(name)
        plural = "s" if self.seeds != 1 else ""
        if isinstance(raw, dict):
            result.message += (f"; calibrated {shown}; threshold for {self.seeds} seed{plural} "
                               f"({aggregate_by}) at α = {self.record.alpha:g}")
            return result
        decision = decide(cal.calibrated(), threshold, alpha=self.record.alpha, k=self.seeds, direction=direction,
                          aggregate=aggregate_by)
        calibration["decision"] = decision
        if decision != "undecided":
            result.message += f"; calibrated {shown}: a claim decided ({decision}) for {self.seeds} seed{plural}"
            return result
        needed = seeds_to_decide(cal.calibrated(), threshold, alpha=self.record.alpha, direction=direction,
                                 aggregate=aggregate_by)
        calibration["seeds_to_decide"] = needed
        remedy = (f"{needed} seeds would decide it" if needed is not None else
                  "more seeds alone cannot decide it: make the experiment quieter (more fine-tune steps, "
                  "a larger evaluation set)")
        field = name.rsplit(".", 1)[-1]
        result.status, result.passed = "undecided", False
        result.message = (f"undecided at α = {self.record.alpha:g} with {self.seeds} seed{plural}: {field} "
                          f"{fmt(threshold)} against calibrated {shown}; {remedy} (observed {fmt(observed)}, {where})")
        return result


def expectation_names(case: Case) -> list[str]:
    """The expectation results ``evaluate_expectations`` will produce for ``case``, in order."""
    expect, names = case.expect, []
    for section, fields in (("coverage", ("tensors_min", "elements_min", "tensors_max")),
                            ("accuracy", ("source_min", "before_min", "after_min", "recovery_min", "beats_baseline")),
                            ("activations", ("drift_max", "dead_max"))):
        spec = getattr(expect, section)
        if spec is not None:
            names += [f"{section}.{f}" for f in fields if getattr(spec, f) is not None]
    if expect.bn_recalibration is not None:
        names.append("bn_recalibration.gain_min")
    if expect.finite:
        names.append("finite")
    return names


def evaluate_expectations(case: Case, per_seed: list[dict[str, Any]], *,
                          record: CalibrationRecord | None = None) -> tuple[list[ExpectationResult], dict[str, Any]]:
    """Check every expectation the case declares against the seeds' figures; return results and metrics.

    ``record``: the case's calibration record, when it is fresh (see :mod:`surgery.calibration`).
    """
    out: list[ExpectationResult] = []
    seeds = _seeds(per_seed)
    judge = Judge(seeds=len(per_seed), record=record)
    metrics: dict[str, Any] = {"accuracy": accuracy_metrics(per_seed),
                               "coverage": {k: min(s["coverage"][k] for s in per_seed) for k in ("tensors", "elements")}}
    expect = case.expect

    if expect.coverage is not None:
        cov, spec = metrics["coverage"], expect.coverage
        details = {"by_method": per_seed[0]["coverage"]["by_method"],
                   "fresh_reasons": per_seed[0]["coverage"]["fresh_reasons"]}
        if spec.tensors_min is not None:
            out.append(judge("coverage.tensors_min", cov["tensors"], spec.tensors_min, "lower", "worst",
                             "coverage, tensors", details))
        if spec.elements_min is not None:
            out.append(judge("coverage.elements_min", cov["elements"], spec.elements_min, "lower", "worst",
                             "coverage, elements", details))
        if spec.tensors_max is not None:
            out.append(judge("coverage.tensors_max", cov["tensors"], spec.tensors_max, "upper", "worst",
                             "coverage, tensors", details))

    if expect.accuracy is not None:
        spec, acc = expect.accuracy, metrics["accuracy"]
        how = spec.aggregate
        where = f"accuracy, {how} of {seeds}" if len(per_seed) > 1 else f"accuracy, {seeds}"

        def pick(figure: str) -> float | None:
            agg = acc.get(figure)
            return None if agg is None else agg[how]

        for figure in ("source", "before", "after", "recovery"):
            threshold = getattr(spec, f"{figure}_min")
            if threshold is not None:
                out.append(judge(f"accuracy.{figure}_min", pick(figure), threshold, "lower", how, where,
                                 {"figures": acc.get(figure)}))
        if spec.beats_baseline is not None:
            gaps = aggregate(s["accuracy"]["after"] - s["accuracy"]["baseline"] for s in per_seed
                             if s["accuracy"].get("baseline") is not None)
            metrics["accuracy"]["gap_to_baseline"] = gaps
            out.append(judge("accuracy.beats_baseline", gaps[how] if gaps else None, spec.beats_baseline.margin,
                             "lower", how, f"after - baseline, {where}",
                             {"after": acc.get("after"), "baseline": acc.get("baseline")}))

    if expect.activations is not None:
        spec = expect.activations
        rows = [r for s in per_seed for r in s.get("activations", []) if r["stage"] == spec.at]
        if spec.drift_max is not None:
            worst = worst_drift_row(rows)
            per_layer = {r["layer"]: r["w1_norm"] for r in rows}
            out.append(judge("activations.drift_max", worst["w1_norm"], spec.drift_max, "upper", "worst",
                             f"normalised W1 after {spec.at}, layer {worst['layer']}, {seeds}",
                             {"layer": worst["layer"], "per_layer": per_layer}, strict=True))
        if spec.dead_max is not None:
            worst = worst_dead_row(rows)
            out.append(judge("activations.dead_max", worst["dead_channel_frac"], spec.dead_max, "upper", "worst",
                             f"dead-channel fraction after {spec.at}, layer {worst['layer']}, {seeds}",
                             {"layer": worst["layer"]}))

    if expect.bn_recalibration is not None:
        gain = aggregate(s["accuracy"].get("bn_gain") for s in per_seed)
        out.append(judge("bn_recalibration.gain_min", gain["mean"] if gain else None,
                         expect.bn_recalibration.gain_min, "lower", "mean", f"AdaBN accuracy gain, mean of {seeds}",
                         {"before": metrics["accuracy"].get("bn_before"),
                          "after": metrics["accuracy"].get("bn_after")}))

    if expect.finite:
        bad = [s["seed"] for s in per_seed if not s["finite"]]
        steps = {s["seed"]: s["finetune"]["nonfinite_step"] for s in per_seed if not s["finite"]}
        where = f"non-finite loss or weights in seed(s) {bad}, at step {steps}" if bad else f"finite, {seeds}"
        out.append(check("finite", 0.0 if bad else 1.0, 1.0, lambda o, t: o == t, "==", where,
                         {"nonfinite_seeds": bad, "nonfinite_step": steps}))
    return out, metrics


def uncalibrated_fields(case: Case) -> list[str]:
    """Dotted case-file paths of thresholds still written as the ``calibrate`` placeholder."""
    found = []
    for name in expectation_names(case):
        if name == "finite":
            continue
        section, _, field = name.partition(".")
        spec = getattr(case.expect, section)
        value = spec.beats_baseline.margin if field == "beats_baseline" else getattr(spec, field)
        if value == CALIBRATE:
            found.append(".".join(yaml_path(name)))
    return found
