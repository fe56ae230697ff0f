"""``expect.bn_recalibration``: what AdaBN alone recovers (BatchNorm statistics re-estimated on the new data).

AdaBN (Li et al. 2016) re-estimates every BatchNorm's running mean and variance on target-domain
images, with no label and no gradient. The check measures the patient's accuracy before and after it,
on a copy, right after surgery (the fine-tune's own ``finetune.bn_recalibrate`` is separate).
"""

from __future__ import annotations

import copy
from typing import Any

from pydantic import Field

from surgery.checks.accuracy import aggregate
from surgery.checks.base import Check, SeedContext, register_check, seeds_label
from surgery.spec import SignedUnitThreshold, Strict


class BnRecalibrationExpect(Strict):
    """``expect.bn_recalibration``: the accuracy gain of AdaBN, before any gradient step."""

    gain_min: SignedUnitThreshold = Field(
        0.0,
        description="lowest gain in test accuracy (-1 to 1) from re-estimating the patient's BatchNorm statistics "
        "on the train split right after surgery, mean over the seeds",
    )
    batches: int = Field(
        20, gt=0, description="batches of the train split (finetune.batch_size each) the statistics are estimated on"
    )


@register_check
class BnRecalibrationCheck(Check):
    """The mean over seeds of the AdaBN accuracy gain."""

    key = "bn_recalibration"
    spec = BnRecalibrationExpect

    def items(self, spec: BnRecalibrationExpect) -> list[str]:
        return ["bn_recalibration.gain_min"]

    def after_surgery(self, spec: BnRecalibrationExpect, context: SeedContext) -> dict[str, Any]:
        # here, not at the top: parsing a case imports this module, and surgery.train.finetune imports torch
        from surgery.train.finetune import evaluate, recalibrate_bn

        split = context.split
        calibrated = copy.deepcopy(context.patient)
        recalibrate_bn(
            calibrated,
            split.train_x,
            device=context.device,
            batches=spec.batches,
            batch_size=context.case.finetune.batch_size,
            seed=context.seed,
        )
        before = context.accuracy["before"]
        if before is None:  # the runner measures it before any check runs
            raise TypeError("bn_recalibration: no accuracy of the patient before the fine-tune")
        after = evaluate(calibrated, split.test_x, split.test_y, device=context.device)
        # Kept with the accuracies too, where the report and the summary table read them.
        context.accuracy.update(bn_before=before, bn_after=after, bn_gain=after - before)
        return {"before": before, "after": after, "gain": after - before}

    def evaluate(self, spec, per_seed, judge, metrics):
        gain = aggregate(s["accuracy"].get("bn_gain") for s in per_seed)
        return [
            judge(
                "bn_recalibration.gain_min",
                gain["mean"] if gain else None,
                spec.gain_min,
                "lower",
                "mean",
                f"AdaBN accuracy gain, mean of {seeds_label(per_seed)}",
                {"before": metrics["accuracy"].get("bn_before"), "after": metrics["accuracy"].get("bn_after")},
            )
        ]
