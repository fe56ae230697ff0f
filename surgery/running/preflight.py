"""Every input error of a case that its models show, found before the first pass over its data.

A probed layer that does not exist, a parameter group's glob that matches nothing, a distillation the
widths forbid, a baseline model whose checkpoint is missing or whose forward fails at this image size:
each is a fact about the models, not about training. :func:`preflight` checks them all right after a seed
has built its source and patient (one forward on two images each), so the run reports the first one as
one located line before it evaluates, probes or trains anything. Found where they are used, they came
after the source's and the patient's evaluations (a ResNet-50 → ResNet-18 case on 400 test images at
224 px: 39 s on 2 cores, against 6 s now) or, for the baseline, after every seed's fine-tune (98 s).
"""

from __future__ import annotations

import fnmatch

import torch
import torch.nn as nn

from surgery.case import Case, ParamGroupSpec
from surgery.data.datasets import Split
from surgery.errors import SurgeryInputError
from surgery.models.checkpoints import build_architecture
from surgery.ops import get_op
from surgery.running.prepare import architecture_ref, blame, build, check_forward, paired_probed_layers
from surgery.train.finetune import unmatched_group


def has_baseline(case: Case) -> bool:
    """Whether the case asks for a random-init baseline (``expect.accuracy.beats_baseline``)."""
    return case.expect.accuracy is not None and case.expect.accuracy.beats_baseline is not None


def baseline_model(case: Case, split: Split) -> nn.Module:
    """The patient's architecture from random init (or ``beats_baseline.model``), for the same budget."""
    spec = case.expect.accuracy.beats_baseline
    op = get_op(case.surgery.op)
    if spec.model is not None:
        return build(
            case,
            spec.model,
            "expect.accuracy.beats_baseline.model",
            num_classes=split.num_classes,
            in_chans=case.data.channels,
        )
    with blame(case, "expect.accuracy.beats_baseline"):
        ref = architecture_ref(op.baseline_architecture(case.surgery, case.source.model))
    model = build_architecture(ref, num_classes=split.num_classes, in_chans=case.data.channels)
    return op.baseline(case.surgery, model)


def trainable_names(model: nn.Module) -> list[str]:
    """The names of ``model``'s parameters that train (those an operation froze, a bridge's backbone, are not)."""
    return [name for name, p in model.named_parameters() if p.requires_grad]


def finetune_groups(case: Case, patient: nn.Module) -> list[ParamGroupSpec]:
    """The patient's parameter groups: the operation's own (a graft's policy) where they take a trainable
    parameter, then ``finetune.groups``. A graft of a donor without parameters (an ``Identity``) has nothing
    for its policy to act on, so its group is left out rather than being an error the user did not write."""
    names = trainable_names(patient)
    own = [
        g for g in get_op(case.surgery.op).groups(case.surgery) if any(fnmatch.fnmatchcase(n, g.params) for n in names)
    ]
    return own + list(case.finetune.groups)


def preflight(case: Case, source: nn.Module, source_width: int, patient: nn.Module, split: Split) -> None:
    """Raise the first input error the case's models show (located: ``FILE:LINE: field: …``), or return.

    ``source`` and ``patient`` as the seed built them, ``source_width`` the source's output width. Nothing of
    the seed's random streams is drawn: the baseline is built under a forked generator."""
    paired_probed_layers(case, source, patient)
    check_groups(case, patient, finetune_groups(case, patient), "the patient")
    distill = get_op(case.surgery.op).distill(case.surgery)
    if distill is not None and source_width != split.num_classes:
        raise SurgeryInputError(
            f"{case.where('surgery.distill')}: the source has {source_width} outputs, the data "
            f"{split.num_classes} classes; distillation needs them equal"
        )
    if has_baseline(case):
        with torch.random.fork_rng(devices=[]):
            baseline = baseline_model(case, split)
        check_forward(case, baseline, split, "the random-init baseline")
        # the baseline fine-tunes with finetune.groups too (run_baseline), whose globs may name the patient only
        check_groups(case, baseline, list(case.finetune.groups), "the random-init baseline")


def check_groups(case: Case, model: nn.Module, groups: list[ParamGroupSpec], what: str) -> None:
    """A group that no trainable parameter of ``model`` (``what`` it is) falls into is bad input at its glob:
    ``finetune.groups[i].params``, or the operation's field for a group of its own (those come first in
    ``groups``). The first match wins, so an earlier group may take every parameter a later one matches."""
    index = unmatched_group(model, groups)
    if index is None:
        return
    own = len(groups) - len(case.finetune.groups)
    field = (
        f"surgery.{get_op(case.surgery.op).blamed_field}" if index < own else f"finetune.groups[{index - own}].params"
    )
    glob = groups[index].params
    names = trainable_names(model)
    if any(fnmatch.fnmatchcase(name, glob) for name in names):
        why = "every trainable parameter it matches is taken by an earlier group (the first match wins)"
    else:
        why = f"matches no trainable parameter of {what} (names look like {', '.join(names[:3]) or 'none'})"
    raise SurgeryInputError(f"{case.where(field)}: {glob!r} {why}")
