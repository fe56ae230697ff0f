"""Accuracy across seeds: mean, std and worst of each figure, and recovery against the source."""

from __future__ import annotations

import math
from typing import Any, Iterable, Literal

from pydantic import Field

from surgery.checks.base import Check, register_check, seeds_label
from surgery.spec import ModelSpec, NonNegativeThreshold, SignedUnitThreshold, Strict, UnitThreshold

ACCURACY_FIGURES = ("source", "before", "after", "baseline", "recovery", "bn_before", "bn_after", "bn_gain")


def aggregate(values: Iterable[float | None]) -> dict[str, float] | None:
    """mean, std (population), worst (minimum) and n of the non-missing values; None if there are none."""
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not vals:
        return None
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / len(vals))
    return {"mean": mean, "std": std, "worst": min(vals), "n": len(vals)}


def recovery(after: float | None, source: float | None) -> float | None:
    """after / source: the fraction of the source's accuracy the patient got back."""
    if after is None or not source:
        return None
    return after / source


def accuracy_metrics(per_seed: list[dict[str, Any]]) -> dict[str, dict[str, float] | None]:
    """Aggregate every accuracy figure the seeds recorded."""
    return {name: aggregate(seed.get("accuracy", {}).get(name) for seed in per_seed) for name in ACCURACY_FIGURES}


class BeatsBaseline(Strict):
    """``expect.accuracy.beats_baseline``: the patient against the same budget from random init."""

    margin: SignedUnitThreshold = Field(0.0, description="after must exceed the baseline by at least this much")
    model: ModelSpec | None = Field(None, description="baseline model; default: the patient's architecture")


class AccuracyExpect(Strict):
    """``expect.accuracy``: accuracies of the source, the patient before and after the fine-tune, recovery."""

    source_min: UnitThreshold | None = Field(
        None, description="lowest test accuracy (0 to 1) the source must reach, its mean or worst over the seeds"
    )
    before_min: UnitThreshold | None = Field(
        None, description="lowest test accuracy (0 to 1) of the patient right after surgery, before any fine-tune step"
    )
    after_min: UnitThreshold | None = Field(
        None, description="lowest test accuracy (0 to 1) of the patient after the fine-tune"
    )
    recovery_min: NonNegativeThreshold | None = Field(
        None, description="lowest ratio of the patient's accuracy after the fine-tune to the source's (1: all of it)"
    )
    beats_baseline: BeatsBaseline | None = Field(
        None, description="the patient after the fine-tune against the same fine-tune from random init"
    )
    aggregate: Literal["mean", "worst"] = Field(
        "mean", description="what the thresholds compare: the seeds' mean or their worst (lowest) figure"
    )


@register_check
class AccuracyCheck(Check):
    """Accuracy figures over the seeds (their mean or worst), and the gap to a random-init baseline."""

    key = "accuracy"
    spec = AccuracyExpect
    FIGURES = ("source", "before", "after", "recovery")

    def items(self, spec: AccuracyExpect) -> list[str]:
        names = [f"accuracy.{f}_min" for f in self.FIGURES if getattr(spec, f"{f}_min") is not None]
        return names + (["accuracy.beats_baseline"] if spec.beats_baseline is not None else [])

    def evaluate(self, spec, per_seed, judge, metrics):
        acc, how, out = metrics["accuracy"], spec.aggregate, []
        seeds = seeds_label(per_seed)
        where = f"accuracy, {how} of {seeds}" if len(per_seed) > 1 else f"accuracy, {seeds}"
        for figure in self.FIGURES:
            value = getattr(spec, f"{figure}_min")
            if value is not None:
                agg = acc.get(figure)
                out.append(
                    judge(
                        f"accuracy.{figure}_min",
                        None if agg is None else agg[how],
                        value,
                        "lower",
                        how,
                        where,
                        {"figures": agg},
                    )
                )
        if spec.beats_baseline is not None:
            gaps = aggregate(
                s["accuracy"]["after"] - s["accuracy"]["baseline"]
                for s in per_seed
                if s["accuracy"].get("baseline") is not None
            )
            acc["gap_to_baseline"] = gaps
            skipped = not gaps and baseline_undecidable(spec, judge)
            out.append(
                judge(
                    "accuracy.beats_baseline",
                    gaps[how] if gaps else None,
                    spec.beats_baseline.margin,
                    "lower",
                    how,
                    f"after - baseline, {where}"
                    + ("; the baseline was not run, since these seeds cannot decide the claim" if skipped else ""),
                    {"after": acc.get("after"), "baseline": acc.get("baseline"), "baseline_run": not skipped},
                )
            )
        return out


def baseline_undecidable(spec: AccuracyExpect, judge: Any) -> bool:
    """True when ``beats_baseline`` is a claim the judge's seeds cannot decide (see ``Judge.foresee``): the
    random-init baseline would cost a fine-tune per seed and change no verdict, so the run leaves it out."""
    return spec.beats_baseline is not None and judge.foresee(
        "accuracy.beats_baseline", spec.beats_baseline.margin, "lower", spec.aggregate
    )
