"""Graft: put a module trained elsewhere (a donor) into a host network at a named path.

Compatibility is checked with one probe forward, not assumed: the host runs ``example_input``, the
input that reaches the module at ``path`` is captured, the donor runs on that same input, and the two
output shapes must be equal; then the host runs again with the donor in place. The training policy
(``freeze``, ``lr_scale``, ``unfreeze_at``) is not this op's business: the fine-tune engine applies it
to the parameters matched by ``notes["param_glob"]`` (``<path>.*``).
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from surgery.errors import SurgeryInputError, first_line
from surgery.ops.base import Operation, register_op
from surgery.ops.graft_spec import GraftSpec
from surgery.spec import ParamGroupSpec
from surgery.models.checkpoints import set_module
from surgery.ops.record import SurgeryRecord, recordable_state

# Attribute a donor may carry to say which of its tensors were adapted from a source of another
# shape ({key: source shape}); ``donor_from_state_dict`` sets it. Such tensors are recorded "adapted".
SOURCE_SHAPES_ATTR = "surgery_source_shapes"


def _shapes(out: Any) -> Any:
    """Output structure with tensors replaced by their shapes (tuples), for comparison and messages."""
    if isinstance(out, Tensor):
        return tuple(out.shape)
    if isinstance(out, (list, tuple)):
        return tuple(_shapes(o) for o in out)
    if isinstance(out, Mapping):
        return {k: _shapes(v) for k, v in out.items()}
    return type(out).__name__


def _module_at(host: nn.Module, path: str) -> nn.Module:
    names = [n for n, _ in host.named_modules() if n]
    if not path or path not in names:
        close = difflib.get_close_matches(path, names, n=3, cutoff=0.5)
        top = ", ".join(n for n in names if "." not in n)
        hint = f"; close matches: {', '.join(close)}" if close else f"; top-level modules: {top}"
        raise SurgeryInputError(f"graft: no module at path {path!r} in {type(host).__name__}{hint}")
    return host.get_submodule(path)


def _device_dtype(module: nn.Module) -> tuple[torch.device, torch.dtype] | None:
    for t in [*module.parameters(), *module.buffers()]:
        if t.is_floating_point():
            return t.device, t.dtype
    return None


def graft(host: nn.Module, donor: nn.Module, path: str, *, example_input: Tensor) -> tuple[nn.Module, SurgeryRecord]:
    """Return a copy of ``host`` with ``donor`` at the dotted ``path``, and the record.

    Neither argument is modified (both are deep-copied). The donor is moved to the host's device and
    dtype. The probe runs in eval mode without gradient (BatchNorm statistics are not touched) and the
    training flags are restored afterwards.

    Raises ``SurgeryInputError`` (one line) when the path does not exist, when the module at ``path`` is
    not called by the host's forward, when the donor's output shape differs from the replaced module's,
    or when the host fails with the donor in place.

    Example::

        >>> donor = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        >>> new, rec = graft(torchvision.models.resnet18(), donor, "conv1", example_input=torch.randn(1, 3, 32, 32))
        >>> rec.notes["param_glob"]
        'conv1.*'
    """
    old = _module_at(host, path)
    host = copy.deepcopy(host)
    old = host.get_submodule(path)
    donor = copy.deepcopy(donor)
    source_shapes = dict(getattr(donor, SOURCE_SHAPES_ATTR, None) or {})
    dd = _device_dtype(host)
    if dd is not None:
        donor = donor.to(device=dd[0], dtype=dd[1])
    also_at = [n for n, m in host.named_modules(remove_duplicate=False) if m is old and n != path]

    modes = {m: m.training for m in [*host.modules(), *donor.modules()]}
    try:
        host.eval()
        donor.eval()
        with torch.no_grad():
            captured: list[tuple[tuple, dict, Any]] = []

            def hook(_m, args, kwargs, out):
                if not captured:
                    captured.append((args, kwargs, _shapes(out)))

            handle = old.register_forward_hook(hook, with_kwargs=True)
            try:
                host(example_input)
            except Exception as exc:
                raise SurgeryInputError(
                    f"graft at {path!r}: the host fails on example_input of shape "
                    f"{tuple(example_input.shape)} before grafting: {first_line(exc)}"
                ) from exc
            finally:
                handle.remove()
            if not captured:
                raise SurgeryInputError(
                    f"graft at {path!r}: the host's forward never calls the module there "
                    f"({type(old).__name__}), so the graft cannot be checked"
                )
            args, kwargs, host_shape = captured[0]
            try:
                donor_shape = _shapes(donor(*args, **kwargs))
            except Exception as exc:
                in_shape = _shapes(args[0]) if len(args) == 1 else _shapes(args)
                raise SurgeryInputError(
                    f"graft at {path!r}: donor fails on the host module's input {in_shape}: {first_line(exc)}"
                ) from exc
            if donor_shape != host_shape:
                raise SurgeryInputError(
                    f"graft at {path!r}: donor output {donor_shape} != host module output {host_shape}"
                )

            set_module(host, path, donor)
            try:
                host(example_input)
            except Exception as exc:
                raise SurgeryInputError(
                    f"graft at {path!r}: the host fails with the donor in place: {first_line(exc)}"
                ) from exc
    finally:
        for m, mode in modes.items():
            m.training = mode
    donor.train(modes[old])  # the donor takes the training flag of the module it replaces

    record = SurgeryRecord(op="graft")
    donor_state = recordable_state(donor)
    prefix = path + "."
    for key, tensor in recordable_state(host).items():
        if key.startswith(prefix):
            dkey = key[len(prefix) :]
            src_shape = source_shapes.get(dkey)
            if src_shape is not None and tuple(src_shape) != tuple(tensor.shape):
                record.add(key, tensor, "adapted", source_key=f"donor:{dkey}", source_shape=src_shape)
            else:
                record.add(key, tensor, "exact", source_key=f"donor:{dkey}", source_shape=donor_state[dkey].shape)
        else:
            record.add(key, tensor, "exact", source_key=key, source_shape=tensor.shape)
    in_shape = _shapes(args[0]) if len(args) == 1 and not kwargs else _shapes(args)
    record.notes = {
        "path": path,
        "donor_params": sum(p.numel() for p in donor.parameters()),
        "donor": type(donor).__name__,
        "replaced": type(old).__name__,
        "replaced_params": sum(p.numel() for p in old.parameters()),
        "input_shape": in_shape,
        "output_shape": host_shape,
        "param_glob": f"{path}.*",  # what the fine-tune engine's graft policies (freeze, lr_scale…) select
        "also_registered_at": also_at,  # other paths of the replaced instance: they keep the old module
    }
    return host, record


def donor_from_state_dict(
    state_dict: Mapping[str, Tensor],
    *,
    in_channels: int | None = None,
    stride: int = 1,
    padding: int | str | None = None,
    prefix: str | None = None,
) -> nn.Module:
    """Build a single-layer donor (``nn.Conv2d`` or ``nn.Linear``) from its ``weight`` (and ``bias``).

    Keys may carry one module prefix (``conv1.weight``): it is found, or given as ``prefix``. The conv's
    kernel comes from the weight; stride and padding cannot be read from weights, so they are
    arguments (``padding=None`` means ``kernel // 2``). With ``in_channels`` different from the weight's,
    the input dimension is adapted with timm's ``adapt_input_conv`` (1 → 3 repeats and rescales), and
    the donor carries ``surgery_source_shapes`` so that ``graft`` records the weight as ``adapted``.

    The zoo's ``mnist-stem`` is the main use: ``donor_from_state_dict(sd, stride=2, padding=3)`` gives
    ``nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)``. Anything else is built by the model loader.
    """
    keys = [k for k, v in state_dict.items() if isinstance(v, Tensor)]
    if prefix is None:
        heads = {k.rsplit(".", 1)[0] if "." in k else "" for k in keys}
        if len(heads) != 1:
            raise SurgeryInputError(
                f"donor state_dict holds more than one module ({', '.join(sorted(heads))}); "
                f"give prefix= or build the donor as a model"
            )
        prefix = heads.pop()
    pre = prefix + "." if prefix else ""
    sd = {k[len(pre) :]: v for k, v in state_dict.items() if k.startswith(pre)}
    if set(sd) - {"weight", "bias"} or "weight" not in sd:
        raise SurgeryInputError(
            f"donor state_dict under {prefix!r} has keys {sorted(sd)}; a single-layer donor needs 'weight' (and 'bias')"
        )
    weight, bias = sd["weight"], sd.get("bias")
    source_shapes: dict[str, list[int]] = {}
    if weight.ndim == 4:
        out_c, in_c, kh, kw = weight.shape
        if in_channels is not None and in_channels != in_c:
            from timm.models import adapt_input_conv

            source_shapes["weight"] = list(weight.shape)
            weight = adapt_input_conv(in_channels, weight, base_chans=in_c)
            in_c = in_channels
        pad = (kh // 2, kw // 2) if padding is None else padding
        module: nn.Conv2d | nn.Linear = nn.Conv2d(
            in_c, out_c, (kh, kw), stride=stride, padding=pad, bias=bias is not None
        )
    elif weight.ndim == 2:
        if in_channels is not None and in_channels != weight.shape[1]:
            raise SurgeryInputError(
                f"donor Linear takes {weight.shape[1]} features, in_channels={in_channels} cannot be adapted"
            )
        module = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    else:
        raise SurgeryInputError(
            f"donor weight of shape {tuple(weight.shape)}: only Conv2d (4-D) and Linear (2-D) donors are built here"
        )
    if tuple(module.weight.shape) != tuple(weight.shape):  # copy_ would broadcast silently
        raise SurgeryInputError(
            f"donor weight {tuple(weight.shape)} cannot fill "
            f"{type(module).__name__} weight {tuple(module.weight.shape)}"
        )
    with torch.no_grad():
        module.weight.copy_(weight.to(module.weight.dtype))
        if bias is not None and module.bias is not None:  # the module has a bias exactly when the donor has one
            module.bias.copy_(bias.to(module.bias.dtype))
    setattr(module, SOURCE_SHAPES_ATTR, source_shapes)
    return module


@register_op
class Graft(Operation):
    """The donor at ``path``, trained by its policy (a parameter group of its own)."""

    name = "graft"
    spec = GraftSpec
    blamed_field = "path"

    def apply(self, spec, source, *, example, num_classes, in_chans, build):
        donor = build(spec.donor, "surgery.donor", in_chans=in_chans)
        return graft(source, donor, spec.path, example_input=example)

    def models(self, spec):
        return [("surgery.donor", spec.donor)]

    def groups(self, spec):
        p = spec.policy
        return [
            ParamGroupSpec(params=f"{spec.path}.*", freeze=p.freeze, lr_scale=p.lr_scale, unfreeze_at=p.unfreeze_at)
        ]
