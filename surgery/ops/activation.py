"""Activation swap: replace every activation of some kinds by another kind, keeping all weights.

Module activations are found by class (``torch.nn`` classes and timm's own activation classes, see
``ACTIVATION_KINDS``) at every path they are registered at, shared instances included. Activations
called functionally in ``forward`` (``F.relu``, ``torch.sigmoid``, ``x.relu()``…) cannot be replaced
without rewriting the model, so they are found with torch.fx and *reported* as not swapped; a model
that torch.fx cannot trace is reported as not inspected. Nothing is missed silently.
"""

from __future__ import annotations

import copy
import functools
import importlib
import inspect
import sys
from collections import Counter
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from surgery.errors import SurgeryInputError, first_line
from surgery.models.checkpoints import set_module
from surgery.ops.record import SurgeryRecord, recordable_state
from surgery.ops.activation_spec import (
    ACTIVATION_KINDS,
    TARGET_KINDS,
    TIMM_CLASS_KINDS,
    ActivationSwapSpec,
    canonical_kind,
)
from surgery.ops.base import Operation, register_op

# Canonical kind -> factory of the replacement module: one for each name ``to`` accepts (TARGET_KINDS).
TARGETS: dict[str, Callable[[], nn.Module]] = {
    "ReLU": nn.ReLU,
    "ReLU6": nn.ReLU6,
    "SiLU": nn.SiLU,
    "GELU": nn.GELU,
    "GELUTanh": lambda: nn.GELU(approximate="tanh"),
    "Hardswish": nn.Hardswish,
    "Hardsigmoid": nn.Hardsigmoid,
    "LeakyReLU": nn.LeakyReLU,
    "Mish": nn.Mish,
    "Tanh": nn.Tanh,
    "Sigmoid": nn.Sigmoid,
    "ELU": nn.ELU,
    "SELU": nn.SELU,
    "CELU": nn.CELU,
    "Softplus": nn.Softplus,
}

# Module class -> canonical kind, for torch.nn's classes (the TARGETS that are classes; GELUTanh is a
# configured GELU); timm's are in TIMM_CLASS_KINDS.
# NOTE: parametrised activations (PReLU) are left out on purpose: swapping them would drop or add
# weights, and this op promises that every weight is kept.
_CLASS_KINDS: dict[type, str] = {cls: kind for kind, cls in TARGETS.items() if isinstance(cls, type)}


@functools.cache
def _timm_class_kinds() -> dict[type, str]:
    """TIMM_CLASS_KINDS by class, for the classes this timm has; called only once timm is imported."""
    kinds: dict[type, str] = {}
    for dotted, kind in TIMM_CLASS_KINDS.items():
        mod_name, cls_name = dotted.rsplit(".", 1)
        try:
            kinds[getattr(importlib.import_module(mod_name), cls_name)] = kind
        except (ImportError, AttributeError):  # an older/newer timm without this class
            continue
    return kinds


# Functional activations that fx records as call_function / call_method nodes -> kind.
_FUNCTIONAL_KINDS: dict[Any, str] = {
    F.relu: "ReLU",
    F.relu_: "ReLU",
    torch.relu: "ReLU",
    torch.relu_: "ReLU",
    F.relu6: "ReLU6",
    F.silu: "SiLU",
    F.gelu: "GELU",
    F.hardswish: "Hardswish",
    F.hardsigmoid: "Hardsigmoid",
    F.leaky_relu: "LeakyReLU",
    F.leaky_relu_: "LeakyReLU",
    F.mish: "Mish",
    torch.tanh: "Tanh",
    torch.tanh_: "Tanh",
    F.tanh: "Tanh",
    torch.sigmoid: "Sigmoid",
    torch.sigmoid_: "Sigmoid",
    F.sigmoid: "Sigmoid",
    F.elu: "ELU",
    F.elu_: "ELU",
    F.selu: "SELU",
    torch.selu_: "SELU",
    F.celu: "CELU",
    F.softplus: "Softplus",
}
_METHOD_KINDS = {
    "relu": "ReLU",
    "relu_": "ReLU",
    "sigmoid": "Sigmoid",
    "sigmoid_": "Sigmoid",
    "tanh": "Tanh",
    "tanh_": "Tanh",
}


def kind_of(module: nn.Module) -> str | None:
    """The canonical kind of an activation module, or None if it is not a known activation."""
    timm_kinds = _timm_class_kinds() if "timm" in sys.modules else {}  # no timm module exists before timm does
    for cls in type(module).__mro__:
        kind = _CLASS_KINDS.get(cls) or timm_kinds.get(cls)
        if kind is not None:
            if kind == "GELU" and getattr(module, "approximate", "none") == "tanh":
                return "GELUTanh"
            return kind
    return None


def _new_activation(to: str, old: nn.Module) -> nn.Module:
    new = TARGETS[to]()
    # keep `inplace` where both classes support it (the position is the same, so it is as safe as before)
    if hasattr(new, "inplace") and isinstance(getattr(old, "inplace", None), bool):
        new.inplace = old.inplace
    return new


class _ActivationTracer(fx.Tracer):
    """A plain fx tracer that keeps activation modules (and, optionally, other module types) as leaves.

    With ``open_if_activation_inside`` an extra leaf type is traced into when it holds an activation
    module, so that activations inside e.g. timm's ``BatchNormAct2d`` are still seen as call sites.
    """

    def __init__(
        self,
        leaf_types: Sequence[type],
        autowrap_functions: Sequence[Callable] = (),
        open_if_activation_inside: bool = False,
    ):
        super().__init__(autowrap_functions=tuple(autowrap_functions))
        self._leaf_types = tuple(leaf_types)
        self._open = open_if_activation_inside

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if kind_of(m) is not None:
            return True
        if self._leaf_types and isinstance(m, self._leaf_types):
            return not (self._open and any(kind_of(sub) is not None for sub in m.modules()))
        return super().is_leaf_module(m, module_qualified_name)


def tracer_leaves() -> tuple[list[type], list[Callable]]:
    """Leaf module types and autowrapped functions for tracing: timm's no-trace registry and torchvision.ops."""
    import torchvision.ops  # here, not at the top: parsing a case needs neither torchvision nor timm

    leaves: list[type] = []
    functions: list[Callable] = []
    try:
        from timm.layers import get_notrace_functions, get_notrace_modules

        leaves += list(get_notrace_modules())
        functions += [f for f in get_notrace_functions() if callable(f)]
    except ImportError:
        pass
    # torchvision.ops' modules are leaves, as torchvision's own feature extraction treats them.
    leaves += [
        obj for _, obj in inspect.getmembers(torchvision.ops) if inspect.isclass(obj) and issubclass(obj, nn.Module)
    ]
    return leaves, functions


def _trace(model: nn.Module) -> fx.Graph:
    """Trace ``model`` in eval mode. Activations are leaves; the first attempt traces through every other
    module, so call sites everywhere are seen. If that fails, timm's no-trace modules and torchvision.ops
    become leaves too — first only those holding no activation, then all of them."""
    leaves, functions = tracer_leaves()
    was_training = model.training
    model.eval()
    attempts = [
        _ActivationTracer([], functions),
        _ActivationTracer(leaves, functions, open_if_activation_inside=True),
        _ActivationTracer(leaves, functions),
    ]
    try:
        for i, tracer in enumerate(attempts):
            try:
                return tracer.trace(model)
            except Exception:
                if i == len(attempts) - 1:
                    raise
        raise AssertionError("unreachable")
    finally:
        model.train(was_training)


def _call_name(target: Any) -> str:
    if isinstance(target, str):
        return f"Tensor.{target}"
    mod = getattr(target, "__module__", None) or "torch"
    return f"{mod}.{getattr(target, '__name__', repr(target))}"


def _inspect_graph(
    model: nn.Module, graph: fx.Graph, wanted: set[str]
) -> tuple[Counter, list[dict[str, str]], list[str]]:
    """Call sites of activation modules (by kind), functional activation calls of the wanted kinds, and
    the composite modules fx kept as leaves (not looked inside: ``nn.TransformerEncoderLayer``, timm no-trace
    modules when the plain trace failed)."""
    call_sites: Counter = Counter()
    functional: list[dict[str, str]] = []
    opaque: list[str] = []
    for node in graph.nodes:
        if node.op == "call_module":
            sub = model.get_submodule(node.target)
            kind = kind_of(sub)
            if kind in wanted:
                call_sites[kind] += 1
            elif kind is None and next(sub.children(), None) is not None and node.target not in opaque:
                opaque.append(node.target)
            continue
        if node.op == "call_function":
            kind = _FUNCTIONAL_KINDS.get(node.target) if _hashable(node.target) else None
        elif node.op == "call_method":
            kind = _METHOD_KINDS.get(node.target)
        else:
            continue
        if kind in wanted:
            stack = node.meta.get("nn_module_stack") or {}
            owner = next(reversed(stack.values()))[0] if stack else ""
            functional.append({"node": node.name, "kind": kind, "call": _call_name(node.target), "module": owner})
    return call_sites, functional, opaque


def _hashable(x: Any) -> bool:
    try:
        hash(x)
    except TypeError:
        return False
    return True


def activation_swap(
    model: nn.Module, kinds: Sequence[str], to: str, *, example_input: Tensor | None = None
) -> tuple[nn.Module, SurgeryRecord]:
    """Replace every activation module whose kind is in ``kinds`` by a new ``to`` module.

    The input model is not modified: a deep copy is returned with the record. Kinds are matched by
    class (subclasses included), case-insensitively: ``torch.nn`` classes and timm's own classes
    (``timm.layers.activations.Swish`` counts as ``SiLU``, ``HardSwish``/``HardSwishMe`` as
    ``Hardswish``… see ``TIMM_CLASS_KINDS``). A module instance registered at several paths is
    replaced at every path by one new instance, so sharing is kept. ``inplace`` is kept where both
    classes have it.

    Functional activations in ``forward`` are found with torch.fx and listed, not rewritten
    (rewriting would turn the model into a ``GraphModule`` and lose its class and methods). With
    ``example_input`` the swapped model is run once (eval, no grad) and the calls made to the
    replaced modules are counted.

    Example::

        >>> new, rec = activation_swap(torchvision.models.resnet18(), ["ReLU"], "SiLU")
        >>> rec.notes["replaced"], rec.notes["call_sites"]
        ({'ReLU': 9}, {'ReLU': 17})
    """
    if isinstance(kinds, str):
        kinds = [kinds]
    if not kinds:
        raise SurgeryInputError(f"activation_swap: no kinds given; known: {', '.join(ACTIVATION_KINDS)}")
    from_kinds = list(dict.fromkeys(canonical_kind(k) for k in kinds))
    to_kind = canonical_kind(to, known=TARGET_KINDS, what="target activation")
    wanted = set(from_kinds)

    model = copy.deepcopy(model)
    present = Counter(k for _, m in model.named_modules(remove_duplicate=False) if (k := kind_of(m)) is not None)

    # Inspect the graph before the swap (call sites of the old kinds, functional calls).
    traced, trace_error = True, None
    call_sites: Counter = Counter()
    functional: list[dict[str, str]] = []
    opaque: list[str] = []
    try:
        graph = _trace(model)
    except Exception as exc:  # fx raises many types (TraceError, TypeError, NotImplementedError…)
        traced, trace_error = False, first_line(exc)
    else:
        call_sites, functional, opaque = _inspect_graph(model, graph, wanted)

    # Replace at every registered path; one new instance per old instance keeps sharing intact.
    targets = [(p, m) for p, m in model.named_modules(remove_duplicate=False) if kind_of(m) in wanted]
    replacements: dict[int, nn.Module] = {}
    old_kind: dict[int, str] = {}
    replaced: Counter = Counter()
    for path, old in targets:
        if id(old) not in replacements:
            replacements[id(old)] = _new_activation(to_kind, old)
            old_kind[id(replacements[id(old)])] = kind_of(old)  # type: ignore[assignment]
        new = replacements[id(old)]
        if path == "":
            model = new
        else:
            set_module(model, path, new)
        replaced[kind_of(old)] += 1
    instances = Counter(old_kind.values())

    if not targets and not functional:
        found = ", ".join(sorted(present)) or "none"
        raise SurgeryInputError(
            f"activation_swap: no activation of kind {', '.join(from_kinds)} in {type(model).__name__} "
            f"(activation modules found: {found})"
        )

    calls = None
    if example_input is not None:
        counted = _count_calls(model, replacements, old_kind, example_input)
        calls = {k: counted.get(k, 0) for k in from_kinds}

    record = SurgeryRecord(op="activation_swap")
    for key, tensor in recordable_state(model).items():
        record.add(key, tensor, "exact", source_key=key, source_shape=tensor.shape)
    record.notes = {
        "from": from_kinds,
        "to": to_kind,
        "replaced": {k: replaced[k] for k in from_kinds},  # module paths replaced
        "instances": {k: instances[k] for k in from_kinds},  # distinct module objects replaced
        "call_sites": {k: call_sites[k] for k in from_kinds} if traced else None,  # fx call_module nodes seen
        "calls": calls,  # calls observed in one forward of example_input (None without it)
        "paths": [p for p, _ in targets],
        "functional_not_swapped": [f["node"] for f in functional],
        "functional_calls": functional,  # [{node, kind, call, module}]
        "functional": "inspected" if traced else "not inspected, model not traceable",
        "not_traced_into": opaque,  # composite leaf modules: call sites / functional calls inside are not seen
        "traced": traced,
        "trace_error": trace_error,
    }
    return model, record


def _count_calls(
    model: nn.Module, replacements: dict[int, nn.Module], old_kind: dict[int, str], example_input: Tensor
) -> dict[str, int]:
    """Run ``example_input`` once (eval, no grad) and count the calls made to the new modules, by old kind."""
    counts: Counter = Counter()
    handles = []
    for new in replacements.values():
        kind = old_kind[id(new)]
        handles.append(new.register_forward_hook(lambda _m, _i, _o, kind=kind: counts.update([kind])))
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            model(example_input)
    except Exception as exc:
        raise SurgeryInputError(
            f"activation_swap: the swapped model fails on example_input of shape {tuple(example_input.shape)}: "
            f"{first_line(exc)}"
        ) from exc
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    return dict(counts)


@register_op
class ActivationSwap(Operation):
    """Weights kept, activations swapped; the baseline is the source's architecture, swapped the same way."""

    name = "activation_swap"
    spec = ActivationSwapSpec
    blamed_field = "from"

    def apply(self, spec, source, *, example, num_classes, in_chans, build):
        return activation_swap(source, spec.from_, spec.to, example_input=example)

    def baseline(self, spec, model):
        return activation_swap(model, spec.from_, spec.to)[0]
