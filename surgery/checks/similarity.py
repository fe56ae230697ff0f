"""The ``similarity`` check: linear CKA between each patient layer and its reference layer, from the probe.

CKA (see ``surgery.stats.cka``) says whether a layer still represents what its reference layer did,
which drift of the value distributions cannot: a rotated representation has the same marginals.
The figures come from the same probe pass as the activation statistics (``surgery.running.prepare.Probes``);
the check judges the worst pair over layers and seeds.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field

from surgery.checks.base import Check, register_check, seeds_label
from surgery.spec import Strict, UnitThreshold


class SimilarityExpect(Strict):
    """``expect.similarity``: the smallest linear CKA between a patient layer and its reference layer."""

    layers: list[str] = Field(min_length=1, description="module names or globs of the patient")
    reference_layers: list[str] | None = Field(None, description="the reference's names, if they differ")
    cka_min: UnitThreshold | None = Field(None, description="the smallest CKA any pair may have")
    at: Literal["surgery", "finetune"] = Field("surgery", description="which patient cka_min applies to")


def worst_cka_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The row with the smallest CKA; a missing (undefined) CKA counts as the worst."""
    return min(rows, key=lambda r: -math.inf if r.get("cka") is None else r["cka"])


@register_check
class SimilarityCheck(Check):
    """The worst pair over the seeds, at the stage ``at`` names."""

    key = "similarity"
    spec = SimilarityExpect

    def items(self, spec: SimilarityExpect) -> list[str]:
        return ["similarity.cka_min"] if spec.cka_min is not None else []

    def evaluate(self, spec, per_seed, judge, metrics):
        rows = [r for s in per_seed for r in s.get("activations", []) if r["stage"] == spec.at]
        if spec.cka_min is None or not rows:
            return []
        worst = worst_cka_row(rows)
        observed = worst.get("cka")
        metrics["similarity"] = {"cka_min": observed, "layer": worst["layer"]}
        return [
            judge(
                "similarity.cka_min",
                observed if observed is not None else math.nan,
                spec.cka_min,
                "lower",
                "worst",
                f"linear CKA after {spec.at}, layer {worst['layer']} vs {worst['reference_layer']}, "
                f"{seeds_label(per_seed)}",
                {"layer": worst["layer"], "per_layer": {r["layer"]: r.get("cka") for r in rows}},
            )
        ]
