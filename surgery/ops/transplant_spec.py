"""The ``surgery`` section of a transplant (no torch: a case is parsed without it; see :mod:`surgery.ops.base`)."""

from __future__ import annotations

from typing import Literal, get_args

from surgery.ops.base import register_op_spec
from surgery.spec import ModelSpec, Strict

Strategy = Literal["exact", "order", "select"]
STRATEGIES: tuple[str, ...] = get_args(Strategy)


@register_op_spec(applied_in="surgery.ops.transplant")
class TransplantSpec(Strict):
    """``surgery: {op: transplant}``: the source's tensors copied into a different target architecture."""

    op: Literal["transplant"]
    target: ModelSpec
    strategy: Strategy = "exact"
    adapt_input: bool = True
