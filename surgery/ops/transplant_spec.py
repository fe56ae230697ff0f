"""The ``surgery`` section of a transplant (no torch: a case is parsed without it; see :mod:`surgery.ops.base`)."""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import Field

from surgery.ops.base import register_op_spec
from surgery.spec import ModelSpec, Strict

Strategy = Literal["exact", "order", "select"]
STRATEGIES: tuple[str, ...] = get_args(Strategy)


@register_op_spec(applied_in="surgery.ops.transplant")
class TransplantSpec(Strict):
    """``surgery: {op: transplant}``: the source's tensors copied into a different target architecture."""

    op: Literal["transplant"] = Field(description="transplant: the source's tensors copied into another architecture")
    target: ModelSpec = Field(
        description="the architecture the source's tensors are copied into (the rest keeps its random init); "
        "the baseline's architecture unless beats_baseline names one"
    )
    strategy: Strategy = Field(
        "exact",
        description="how target tensors find their source: exact (same name and shape), order (registration order, "
        "same shape) or select (by name, larger tensors sliced evenly: weight selection)",
    )
    adapt_input: bool = Field(
        True, description="adapt the stem conv's weight when target and source differ in input channels (RGB <-> grey)"
    )
