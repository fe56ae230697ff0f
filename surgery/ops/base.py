"""What every operation shares: the registries, and the questions a run asks of an operation.

An *operation* is one value of a case's ``surgery.op``. It has two parts, registered apart so that a case
file is parsed without importing torch (issue 30: a typo is answered in a second):

- its pydantic spec (the ``surgery`` section), in a module that imports no torch and names, without
  importing it, the module that applies the operation (:func:`register_op_spec`);
- a registered :class:`Operation` that tells a run how to apply it, which baseline it is compared with,
  which parameter groups its fine-tune adds and which models it builds (:func:`register_op`). Its module
  is imported when a run first asks for it (:func:`get_op`).

Registering is the only wiring, as torchvision's ``register_model``::

    @register_op_spec(applied_in="surgery.ops.transplant")     # surgery/ops/transplant_spec.py
    class TransplantSpec(Strict):
        op: Literal["transplant"]
        ...

    @register_op                                               # surgery/ops/transplant.py
    class Transplant(Operation):
        name = "transplant"
        spec = TransplantSpec
        ...

An operation may also be one module: :func:`register_op` files the spec of an operation whose spec was not
registered before (parsing a case then imports that module). :mod:`surgery.case` builds the ``surgery``
union from :data:`SPECS` at parse time.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Callable, ClassVar, get_args

from surgery.spec import DistillSpec, ModelSpec, ParamGroupSpec, Strict

if TYPE_CHECKING:
    import torch.nn as nn

    from surgery.ops.record import SurgeryRecord

# build(spec, field, **defaults): a model spec of the case built with its relative paths resolved and its
# errors located at ``field`` (the run passes surgery.running.prepare.build).
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

    def apply(
        self, spec: Any, source: "nn.Module", *, example: Any, num_classes: int, in_chans: int, build: Build
    ) -> tuple["nn.Module", "SurgeryRecord"]:
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


SPECS: dict[str, type[Strict]] = {}  # op name -> its ``surgery`` section, in registration order
APPLIED_IN: dict[str, str] = {}  # op name -> the module whose import registers its Operation
OPS: dict[str, Operation] = {}  # op name -> its Operation, for the apply modules imported so far


def op_name(spec: type[Strict]) -> str:
    """The op a ``surgery`` section is for: the one value of its ``op: Literal[...]`` field."""
    field = spec.model_fields.get("op")
    values = get_args(field.annotation) if field is not None else ()
    if len(values) != 1 or not isinstance(values[0], str):
        raise TypeError(f"{spec.__name__}: an operation's spec needs a field op: Literal['<name>']")
    return values[0]


def register_op_spec(*, applied_in: str) -> Callable[[type[Strict]], type[Strict]]:
    """Class decorator: file an operation's ``surgery`` section; ``applied_in`` names (imports nothing) the
    module that registers its :class:`Operation`. A second spec for the same op is refused."""

    def register(spec: type[Strict]) -> type[Strict]:
        name = op_name(spec)
        if name in SPECS:
            raise ValueError(f"an operation named {name!r} is registered already")
        SPECS[name], APPLIED_IN[name] = spec, applied_in
        return spec

    return register


def register_op(cls: type[Operation]) -> type[Operation]:
    """Class decorator: file an operation under its ``name``; a second one with the same name is refused.

    Its spec must be the one registered for that name, if one was; otherwise it is registered here.
    """
    if not getattr(cls, "name", None) or not isinstance(getattr(cls, "spec", None), type):
        raise TypeError(f"{cls.__name__}: an operation needs a 'name' and a pydantic 'spec' class")
    if cls.name in OPS:
        raise ValueError(f"an operation named {cls.name!r} is registered already")
    if op_name(cls.spec) != cls.name:
        raise TypeError(
            f"{cls.__name__}: its spec {cls.spec.__name__} is for op {op_name(cls.spec)!r}, not {cls.name!r}"
        )
    declared = SPECS.get(cls.name)
    if declared is None:  # an operation in one module: its spec is registered with it
        SPECS[cls.name], APPLIED_IN[cls.name] = cls.spec, cls.__module__
    elif declared is not cls.spec:
        raise TypeError(
            f"{cls.__name__}: op {cls.name!r} has the spec {declared.__module__}."
            f"{declared.__name__}, not {cls.spec.__module__}.{cls.spec.__name__}"
        )
    OPS[cls.name] = cls()
    return cls


def list_ops() -> list[str]:
    """The registered operations' names, in registration order."""
    return list(SPECS)


def get_op(name: str) -> Operation:
    """The registered operation ``name``, its module imported on first use (it imports torch)."""
    if name not in OPS:
        module = APPLIED_IN[name]
        importlib.import_module(module)  # named by its spec's registration, imported only when a run needs it
        if name not in OPS:
            raise LookupError(f"{module} registers no operation {name!r}, which its spec names it for")
    return OPS[name]
