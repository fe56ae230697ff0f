"""The ``surgery`` section of an activation swap, and the activation names it accepts.

No torch here: a case is parsed without it (see :mod:`surgery.ops.base`); :mod:`surgery.ops.activation`
maps these names onto classes, and a test holds the two to the same names.
"""

from __future__ import annotations

import difflib
from typing import Any, Literal, Sequence

from pydantic import Field, field_validator

from surgery.errors import SurgeryInputError
from surgery.ops.base import register_op_spec
from surgery.spec import Strict

# The kinds ``to`` accepts: each has a replacement module (surgery.ops.activation.TARGETS).
TARGET_KINDS: tuple[str, ...] = (
    "ReLU",
    "ReLU6",
    "SiLU",
    "GELU",
    "GELUTanh",
    "Hardswish",
    "Hardsigmoid",
    "LeakyReLU",
    "Mish",
    "Tanh",
    "Sigmoid",
    "ELU",
    "SELU",
    "CELU",
    "Softplus",
)

# timm's own activation classes (timm.layers.activations / activations_me) -> canonical kind. Named, not
# imported: timm takes a second or two to import, and parsing a case needs none of it.
TIMM_CLASS_KINDS: dict[str, str] = {
    "timm.layers.activations.Swish": "SiLU",
    "timm.layers.activations.Mish": "Mish",
    "timm.layers.activations.Sigmoid": "Sigmoid",
    "timm.layers.activations.Tanh": "Tanh",
    "timm.layers.activations.HardSwish": "Hardswish",
    "timm.layers.activations.HardSigmoid": "Hardsigmoid",
    "timm.layers.activations.HardMish": "HardMish",
    "timm.layers.activations.GELU": "GELU",
    "timm.layers.activations.GELUTanh": "GELUTanh",
    "timm.layers.activations.QuickGELU": "QuickGELU",
    "timm.layers.activations_me.SwishMe": "SiLU",
    "timm.layers.activations_me.MishMe": "Mish",
    "timm.layers.activations_me.HardSwishMe": "Hardswish",
    "timm.layers.activations_me.HardSigmoidMe": "Hardsigmoid",
    "timm.layers.activations_me.HardMishMe": "HardMish",
}

# Every kind that can be found in a model (``from`` accepts these): targets plus timm-only kinds.
ACTIVATION_KINDS: tuple[str, ...] = tuple(dict.fromkeys([*TARGET_KINDS, *TIMM_CLASS_KINDS.values()]))

# Other spellings users write (compared after lower-casing and dropping "_" and "-").
ALIASES = {"swish": "SiLU", "hswish": "Hardswish", "hsigmoid": "Hardsigmoid", "geluapprox": "GELUTanh"}


def canonical_kind(name: str, *, known: Sequence[str] = ACTIVATION_KINDS, what: str = "activation kind") -> str:
    """The canonical spelling of an activation name (case-insensitive; ``_``/``-`` ignored)."""
    norm = str(name).lower().replace("_", "").replace("-", "")
    table = {k.lower(): k for k in known}
    table.update({a: k for a, k in ALIASES.items() if k in known})
    if norm in table:
        return table[norm]
    close = difflib.get_close_matches(norm, list(table), n=3, cutoff=0.6)
    hint = f" (did you mean {', '.join(table[c] for c in close)}?)" if close else ""
    raise SurgeryInputError(f"unknown {what} {name!r}{hint}; known: {', '.join(known)}")


@register_op_spec(applied_in="surgery.ops.activation")
class ActivationSwapSpec(Strict):
    """``surgery: {op: activation_swap}``: every activation of the kinds ``from`` replaced by ``to``."""

    op: Literal["activation_swap"] = Field(description="activation_swap: activation modules replaced, weights kept")
    from_: list[str] = Field(
        alias="from",
        min_length=1,
        description="the activation kinds replaced, one or a list (e.g. ReLU; case, '_' and '-' ignored)",
    )
    to: str = Field(description="the activation kind put in their place, e.g. GELU")

    @field_validator("from_", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("from_")
    @classmethod
    def _known_kinds(cls, kinds: list[str]) -> list[str]:
        try:
            return [canonical_kind(kind) for kind in kinds]
        except SurgeryInputError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("to")
    @classmethod
    def _known_target(cls, kind: str) -> str:
        try:
            return canonical_kind(kind, known=TARGET_KINDS, what="target activation")
        except SurgeryInputError as exc:
            raise ValueError(str(exc)) from None
