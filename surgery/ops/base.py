"""What every operation shares: the registry, and the questions a run asks of an operation.

An *operation* is one value of a case's ``surgery.op``. It lives in one module: its pydantic spec (the
``surgery`` section), the mechanics that perform it, and a registered :class:`Operation` that tells a run
how to apply it, which baseline it is compared with, which parameter groups its fine-tune adds and which
models it builds. Registering is the only wiring, as torchvision's ``register_model``::

    @register_op
    class Transplant(Operation):
        name = "transplant"
        spec = TransplantSpec
        ...

:mod:`surgery.case` builds the ``surgery`` union from the registry at parse time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, ClassVar

from surgery.spec import DistillSpec, ModelSpec, ParamGroupSpec, Strict

if TYPE_CHECKING:
    import torch.nn as nn

    from surgery.ops.record import SurgeryRecord

# build(spec, field, **defaults): a model spec of the case built with its relative paths resolved and its
# errors located at ``field`` (the run passes surgery.prepare.build).
Build = Callable[..., "nn.Module"]


class Operation:
    """One ``surgery.op``. Subclass, set ``name`` and ``spec``, implement ``apply``."""

    name: ClassVar[str]
    spec: ClassVar[type[Strict]]
    # The case field that sets how many classes the patient's head outputs.
    classes_field: ClassVar[str] = "source.num_classes"
    # The ``surgery`` field an input error from ``apply`` is reported at (the models it builds name their own).
    blamed_field: ClassVar[str] = "op"
    # Whether a probed run draws the source-blocks x patient-blocks CKA layer map (architectures that differ).
    layer_map: ClassVar[bool] = False

    def apply(self, spec: Any, source: "nn.Module", *, example: Any, num_classes: int, in_chans: int,
              build: Build) -> tuple["nn.Module", "SurgeryRecord"]:
        """The patient and the record of what the surgery did; ``source`` is never modified."""
        raise NotImplementedError

    def models(self, spec: Any) -> list[tuple[str, ModelSpec]]:
        """The model specs the operation builds, with their case fields (for weight hashes and errors)."""
        return []

    def baseline_architecture(self, spec: Any, source_ref: str) -> str:
        """The architecture a random-init baseline trains, when ``beats_baseline`` names no model."""
        return source_ref

    def baseline(self, spec: Any, model: "nn.Module") -> "nn.Module":
        """The baseline made like the patient (an activation swap swaps it too)."""
        return model

    def groups(self, spec: Any) -> list[ParamGroupSpec]:
        """Parameter groups the operation adds to the fine-tune (before the case's own)."""
        return []

    def distill(self, spec: Any) -> DistillSpec | None:
        """Distillation from the source during the fine-tune, if the operation asks for it."""
        return None


OPS: dict[str, Operation] = {}


def register_op(cls: type[Operation]) -> type[Operation]:
    """Class decorator: file an operation under its ``name``; a second one with the same name is refused."""
    if not getattr(cls, "name", None) or not isinstance(getattr(cls, "spec", None), type):
        raise TypeError(f"{cls.__name__}: an operation needs a 'name' and a pydantic 'spec' class")
    if cls.name in OPS:
        raise ValueError(f"an operation named {cls.name!r} is registered already")
    OPS[cls.name] = cls()
    return cls


def list_ops() -> list[str]:
    """The registered operations' names, in registration order."""
    return list(OPS)


def get_op(name: str) -> Operation:
    """The registered operation ``name``."""
    return OPS[name]
