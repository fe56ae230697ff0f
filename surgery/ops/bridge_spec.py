"""The ``surgery`` section of a bridge (no torch: a case is parsed without it; see :mod:`surgery.ops.base`)."""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import Field

from surgery.ops.base import register_op_spec
from surgery.spec import DistillSpec, Strict

Head = Literal["linear", "mlp", "transformer"]
HEADS: tuple[str, ...] = get_args(Head)


@register_op_spec(applied_in="surgery.ops.bridge")
class BridgeSpec(Strict):
    """``surgery: {op: bridge}``: the frozen source as a feature extractor at ``nodes``, a new ``head`` on top."""

    op: Literal["bridge"] = Field(description="bridge: the frozen source as a feature extractor under a new head")
    nodes: list[str] = Field(
        min_length=1,
        description="graph nodes or module names of the source whose features feed the head (see `surgery inspect`)",
    )
    head: Head = Field(
        "linear",
        description="linear (pooled features, Linear), mlp (pooled, Linear-GELU-Linear) "
        "or transformer (ViT blocks over the features' positions as tokens)",
    )
    num_classes: int | None = Field(None, gt=0, description="default: the train dataset's class count")
    hidden: int = Field(
        256, gt=0, description="mlp: hidden units; transformer: token width (a multiple of num_heads); linear: unused"
    )
    depth: int = Field(1, gt=0, description="transformer: number of ViT blocks; other heads: unused")
    num_heads: int = Field(4, gt=0, description="transformer: attention heads per block; other heads: unused")
    distill: DistillSpec | None = Field(
        None,
        description="also distil the source's outputs in the fine-tune (they must be as many as the data's classes)",
    )
