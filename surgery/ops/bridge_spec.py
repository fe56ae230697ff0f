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

    op: Literal["bridge"]
    nodes: list[str] = Field(min_length=1)
    head: Head = "linear"
    num_classes: int | None = Field(None, gt=0, description="default: the train dataset's class count")
    hidden: int = Field(256, gt=0)
    depth: int = Field(1, gt=0)
    num_heads: int = Field(4, gt=0)
    distill: DistillSpec | None = None
