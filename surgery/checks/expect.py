"""Turn a case's per-seed figures into expectation results: observed, threshold, passed, one line."""

from __future__ import annotations

import math
from typing import Any, Callable

from surgery.case import Case
from surgery.checks.accuracy import accuracy_metrics, aggregate
from surgery.results import ExpectationResult


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def _check(name: str, observed: float | None, threshold: float, ok: Callable[[float, float], bool], op: str,
           where: str, details: dict[str, Any] | None = None) -> ExpectationResult:
    """One expectation; a missing or NaN observation fails."""
    field = name.rsplit(".", 1)[-1]
    passed = observed is not None and not math.isnan(observed) and ok(observed, threshold)
    shown_op = op if passed else {">=": "<", "<=": ">", "<": ">=", "==": "!="}[op]
    message = f"observed {_fmt(observed)} {shown_op} {field} {_fmt(threshold)} ({where})"
    return ExpectationResult(name, passed, observed, threshold, details or {}, message)


def _at_least(name, observed, threshold, where, details=None):
    return _check(name, observed, threshold, lambda o, t: o >= t, ">=", where, details)


def _at_most(name, observed, threshold, where, details=None):
    return _check(name, observed, threshold, lambda o, t: o <= t, "<=", where, details)


def _seeds(per_seed: list[dict[str, Any]]) -> str:
    seeds = [s["seed"] for s in per_seed]
    return f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {', '.join(map(str, seeds))}"


def worst_drift_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The activation row with the largest normalised W1; a NaN distance counts as the worst."""
    return max(rows, key=lambda r: math.inf if math.isnan(r["w1_norm"]) else r["w1_norm"])


def worst_dead_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The activation row with the largest dead-channel fraction."""
    return max(rows, key=lambda r: r["dead_channel_frac"])


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


def evaluate_expectations(case: Case, per_seed: list[dict[str, Any]]) -> tuple[list[ExpectationResult],
                                                                             dict[str, Any]]:
    """Check every expectation the case declares against the seeds' figures; return results and metrics."""
    out: list[ExpectationResult] = []
    seeds = _seeds(per_seed)
    metrics: dict[str, Any] = {"accuracy": accuracy_metrics(per_seed),
                               "coverage": {k: min(s["coverage"][k] for s in per_seed) for k in ("tensors", "elements")}}
    expect = case.expect

    if expect.coverage is not None:
        cov, spec = metrics["coverage"], expect.coverage
        details = {"by_method": per_seed[0]["coverage"]["by_method"],
                   "fresh_reasons": per_seed[0]["coverage"]["fresh_reasons"]}
        if spec.tensors_min is not None:
            out.append(_at_least("coverage.tensors_min", cov["tensors"], spec.tensors_min, "coverage, tensors", details))
        if spec.elements_min is not None:
            out.append(_at_least("coverage.elements_min", cov["elements"], spec.elements_min, "coverage, elements",
                                 details))
        if spec.tensors_max is not None:
            out.append(_at_most("coverage.tensors_max", cov["tensors"], spec.tensors_max, "coverage, tensors", details))

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
                out.append(_at_least(f"accuracy.{figure}_min", pick(figure), threshold, where,
                                     {"figures": acc.get(figure)}))
        if spec.beats_baseline is not None:
            gaps = aggregate(s["accuracy"]["after"] - s["accuracy"]["baseline"] for s in per_seed
                             if s["accuracy"].get("baseline") is not None)
            metrics["accuracy"]["gap_to_baseline"] = gaps
            out.append(_at_least("accuracy.beats_baseline", gaps[how] if gaps else None, spec.beats_baseline.margin,
                                 f"after - baseline, {where}", {"after": acc.get("after"),
                                                                "baseline": acc.get("baseline")}))

    if expect.activations is not None:
        spec = expect.activations
        rows = [r for s in per_seed for r in s.get("activations", []) if r["stage"] == spec.at]
        if spec.drift_max is not None:
            worst = worst_drift_row(rows)
            per_layer = {r["layer"]: r["w1_norm"] for r in rows}
            # Evidently's convention: drift is detected when the distance reaches the threshold.
            out.append(_check("activations.drift_max", worst["w1_norm"], spec.drift_max, lambda o, t: o < t, "<",
                              f"normalised W1 after {spec.at}, layer {worst['layer']}, {seeds}",
                              {"layer": worst["layer"], "per_layer": per_layer}))
        if spec.dead_max is not None:
            worst = worst_dead_row(rows)
            out.append(_at_most("activations.dead_max", worst["dead_channel_frac"], spec.dead_max,
                                f"dead-channel fraction after {spec.at}, layer {worst['layer']}, {seeds}",
                                {"layer": worst["layer"]}))

    if expect.bn_recalibration is not None:
        gain = aggregate(s["accuracy"].get("bn_gain") for s in per_seed)
        out.append(_at_least("bn_recalibration.gain_min", gain["mean"] if gain else None,
                             expect.bn_recalibration.gain_min, f"AdaBN accuracy gain, mean of {seeds}",
                             {"before": metrics["accuracy"].get("bn_before"),
                              "after": metrics["accuracy"].get("bn_after")}))

    if expect.finite:
        bad = [s["seed"] for s in per_seed if not s["finite"]]
        steps = {s["seed"]: s["finetune"]["nonfinite_step"] for s in per_seed if not s["finite"]}
        where = f"non-finite loss or weights in seed(s) {bad}, at step {steps}" if bad else f"finite, {seeds}"
        out.append(_check("finite", 0.0 if bad else 1.0, 1.0, lambda o, t: o == t, "==", where,
                          {"nonfinite_seeds": bad, "nonfinite_step": steps}))
    return out, metrics
