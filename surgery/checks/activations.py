"""The ``activations`` check: per-layer drift from the reference and dead channels, from the probe."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from surgery.checks.base import Check, register_check, seeds_label, worst_dead_row, worst_drift_row
from surgery.spec import NonNegativeThreshold, Strict, UnitThreshold


class ActivationsExpect(Strict):
    """``expect.activations``: per-layer drift from the reference (normalised W1) and dead channels."""

    layers: list[str] = Field(min_length=1, description="module names or globs of the patient")
    reference_layers: list[str] | None = Field(None, description="the reference's names, if they differ")
    drift_max: NonNegativeThreshold | None = Field(None, description="normalised W1; Evidently's default is 0.1")
    dead_max: UnitThreshold | None = Field(
        None,
        description="highest fraction of a layer's channels that may be dead (never positive on the probe set), "
        "worst layer and seed",
    )
    at: Literal["surgery", "finetune"] = Field(
        "surgery",
        description="which patient drift_max and dead_max apply to: right after surgery, or after the fine-tune",
    )


@register_check
class ActivationsCheck(Check):
    """The worst layer over the seeds, at the stage ``at`` names; a NaN distance is the worst."""

    key = "activations"
    spec = ActivationsExpect

    def items(self, spec: ActivationsExpect) -> list[str]:
        return [f"activations.{f}" for f in ("drift_max", "dead_max") if getattr(spec, f) is not None]

    def evaluate(self, spec, per_seed, judge, metrics):
        rows = [r for s in per_seed for r in s.get("activations", []) if r["stage"] == spec.at]
        which = seeds_label(per_seed)
        out = []
        if spec.drift_max is not None:
            worst = worst_drift_row(rows)
            out.append(
                judge(
                    "activations.drift_max",
                    worst["w1_norm"],
                    spec.drift_max,
                    "upper",
                    "worst",
                    f"normalised W1 after {spec.at}, layer {worst['layer']}, {which}",
                    {"layer": worst["layer"], "per_layer": {r["layer"]: r["w1_norm"] for r in rows}},
                    strict=True,
                )
            )
        if spec.dead_max is not None:
            worst = worst_dead_row(rows)
            out.append(
                judge(
                    "activations.dead_max",
                    worst["dead_channel_frac"],
                    spec.dead_max,
                    "upper",
                    "worst",
                    f"dead-channel fraction after {spec.at}, layer {worst['layer']}, {which}",
                    {"layer": worst["layer"]},
                )
            )
        return out
