"""The ``surgery`` section of a graft (no torch: a case is parsed without it; see :mod:`surgery.ops.base`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from surgery.ops.base import register_op_spec
from surgery.spec import ModelSpec, Strict


class GraftPolicy(Strict):
    """How the grafted module trains: frozen, at a scaled learning rate, or unfrozen at a step."""

    freeze: bool = False
    lr_scale: float = Field(1.0, ge=0, le=1e6)
    unfreeze_at: int | None = Field(None, ge=0, description="step at which a frozen graft starts training")


@register_op_spec(applied_in="surgery.ops.graft")
class GraftSpec(Strict):
    """``surgery: {op: graft}``: a donor module put into the source at a dotted ``path``."""

    op: Literal["graft"]
    donor: ModelSpec
    path: str
    policy: GraftPolicy = GraftPolicy()
