"""The ``surgery`` section of a graft (no torch: a case is parsed without it; see :mod:`surgery.ops.base`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from surgery.ops.base import register_op_spec
from surgery.spec import ModelSpec, Strict


class GraftPolicy(Strict):
    """How the grafted module trains: frozen, at a scaled learning rate, or unfrozen at a step."""

    freeze: bool = Field(False, description="the grafted module does not train (until unfreeze_at, if set)")
    lr_scale: float = Field(1.0, ge=0, le=1e6, description="factor on finetune.optimizer.lr for the grafted module")
    unfreeze_at: int | None = Field(None, ge=0, description="step at which a frozen graft starts training")


@register_op_spec(applied_in="surgery.ops.graft")
class GraftSpec(Strict):
    """``surgery: {op: graft}``: a donor module put into the source at a dotted ``path``."""

    op: Literal["graft"] = Field(description="graft: a donor module put into the source")
    donor: ModelSpec = Field(
        description="the model put in place, built like the source (in_chans default: data.channels)"
    )
    path: str = Field(
        description="dotted name of the source's module the donor replaces, e.g. 'layer4.1' (see `surgery inspect`); "
        "the donor's output must have that module's shape"
    )
    policy: GraftPolicy = Field(GraftPolicy(), description="how the donor trains in the fine-tune")
