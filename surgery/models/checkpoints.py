"""Model references and checkpoints: ``torchvision:NAME``, ``timm:NAME``, ``zoo:NAME``, ``package.module:factory``.

Checkpoints load safely only: ``.pt``/``.pth`` through ``torch.load(weights_only=True)`` (never a
fallback to full pickle), ``.safetensors`` through safetensors. Pretrained weights come from the
local cache only; nothing is downloaded.
"""

from __future__ import annotations

import inspect
import pickle
import warnings
from pathlib import Path
from typing import Any, Mapping, cast

import torch
import torch.nn as nn

from surgery.errors import SurgeryInputError
from surgery.models.model_refs import resolve_factory, validate_model_ref

PREFIXES = ("module.", "_orig_mod.")


def clean_key(key: str) -> str:
    """``module._orig_mod.layer1.0.conv1.weight`` → ``layer1.0.conv1.weight``."""
    changed = True
    while changed:
        changed = False
        for prefix in PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix) :], True
    return key


def clean_prefixes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip ``module.`` (DataParallel/DDP) and ``_orig_mod.`` (torch.compile) prefixes, repeatedly; order kept."""
    return {clean_key(k): v for k, v in state_dict.items()}


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a state_dict from ``.safetensors`` or ``.pt``/``.pth`` (weights only), prefixes cleaned.

    A pickle that would build anything but tensors and plain containers is refused: its code never
    runs. Missing, truncated or corrupt files are bad input.
    """
    path = Path(path)
    if not path.is_file():
        raise SurgeryInputError(f"checkpoint {path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            data: Any = load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types for corrupt headers
            raise SurgeryInputError(f"checkpoint {path}: not a readable safetensors file ({exc})") from None
    else:
        try:
            with warnings.catch_warnings():  # torch's warnings about odd pickles: the error below says it in one line
                warnings.simplefilter("ignore")
                data = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            first = str(exc).strip().splitlines()
            operand = next((ln.strip() for ln in first if ln.strip().startswith("Unsupported operand")), None)
            if operand:  # random bytes, or a pickle framing the weights-only loader does not read
                raise SurgeryInputError(
                    f"checkpoint {path}: corrupt or not a torch checkpoint ({operand}); "
                    "expected a file written by torch.save or safetensors"
                ) from None
            why = next((ln for ln in first if "Unsupported" in ln or "global" in ln.lower()), first[0] if first else "")
            raise SurgeryInputError(
                f"checkpoint {path}: refused, it is not weights-only ({why.strip()[:160]}); "
                "surgery never unpickles code"
            ) from None
        except Exception as exc:  # RuntimeError, EOFError, KeyError, IndexError…: corrupt bytes, no code ran
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
            raise SurgeryInputError(f"checkpoint {path}: truncated or corrupt ({msg[:160]})") from None
    if isinstance(data, Mapping):
        for key in ("state_dict", "model", "model_state_dict", "module"):
            if key in data and isinstance(data[key], Mapping):
                data = data[key]
                break
    if not isinstance(data, Mapping) or not data or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise SurgeryInputError(f"checkpoint {path}: expected a state_dict (a mapping of names to tensors)")
    return clean_prefixes(data)


def load_weights(model: nn.Module, state_dict: Mapping[str, torch.Tensor], *, origin: str) -> nn.Module:
    """Load a complete state_dict into ``model``; mismatches are bad input with one clear line.

    A checkpoint whose keys match nothing in the model is an error: a load that would silently
    copy nothing is the failure this harness exists to catch.
    """
    own = model.state_dict()
    common = set(own) & set(state_dict)
    if not common:
        raise SurgeryInputError(
            f"{origin}: none of its {len(state_dict)} keys match the model "
            f"(checkpoint has e.g. {next(iter(state_dict))!r}, model has {next(iter(own))!r})"
        )
    # NOTE: torchvision's own checkpoints (and older PyTorch ones) carry no num_batches_tracked;
    # PyTorch fills it in, so its absence is not a missing weight.
    missing = [k for k in own if k not in state_dict and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state_dict if k not in own]
    bad_shape = [k for k in own if k in state_dict and own[k].shape != state_dict[k].shape]  # model order: stable
    if bad_shape:
        k = bad_shape[0]
        raise SurgeryInputError(
            f"{origin}: {len(bad_shape)} tensor(s) have the wrong shape, e.g. {k!r}: "
            f"checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        )
    if missing or unexpected:
        raise SurgeryInputError(
            f"{origin}: {len(missing)} model key(s) missing (e.g. {missing[:1]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:1]})"
        )
    model.load_state_dict(
        state_dict, strict=not any(k.endswith("num_batches_tracked") for k in own if k not in state_dict)
    )
    return model


def set_module(root: nn.Module, path: str, new: nn.Module) -> None:
    """Put ``new`` at the dotted ``path`` of ``root`` (replacing what is there)."""
    parent_path, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent_path) if parent_path else root, name, new)


def _set_in_chans(model: nn.Module, in_chans: int) -> None:
    """Replace the first Conv2d with a fresh one taking ``in_chans`` channels (torchvision has no in_chans)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            if module.in_channels == in_chans:
                return
            # A Conv2d's size fields are pairs (its constructor makes them so); torch types them tuple[int, ...].
            set_module(
                model,
                name,
                nn.Conv2d(
                    in_chans,
                    module.out_channels,
                    cast("tuple[int, int]", module.kernel_size),
                    cast("tuple[int, int]", module.stride),
                    cast("str | tuple[int, int]", module.padding),
                    cast("tuple[int, int]", module.dilation),
                    module.groups,
                    module.bias is not None,
                ),
            )
            return


def build_architecture(ref: str, *, num_classes: int | None = None, in_chans: int | None = None) -> nn.Module:
    """A randomly initialised model for ``torchvision:`` / ``timm:`` / ``package.module:factory`` refs."""
    try:
        validate_model_ref(ref)
    except ValueError as exc:
        raise SurgeryInputError(str(exc)) from None
    kind, _, name = ref.partition(":")
    kwargs: dict[str, Any] = {}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if kind == "torchvision":
        import torchvision

        model = torchvision.models.get_model(name, weights=None, **kwargs)
        if in_chans is not None:
            _set_in_chans(model, in_chans)
        return model
    if kind == "timm":
        import timm

        if in_chans is not None:
            kwargs["in_chans"] = in_chans
        return timm.create_model(name, pretrained=False, **kwargs)
    if kind == "zoo":
        raise SurgeryInputError(f"{ref}: zoo models are trained weights; use build_model")
    try:  # validate_model_ref checked the syntax and the trust rules; this imports the module and looks
        factory = resolve_factory(ref)
    except ValueError as exc:
        raise SurgeryInputError(str(exc)) from None
    if in_chans is not None:
        kwargs["in_chans"] = in_chans
    try:  # pass only the keywords the factory takes: a no-argument factory is a fixed architecture
        params = inspect.signature(factory).parameters.values()
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            kwargs = {k: v for k, v in kwargs.items() if k in {p.name for p in params}}
    except (TypeError, ValueError):  # builtins without a signature
        pass
    try:
        model = factory(**kwargs)
    except Exception as exc:
        raise SurgeryInputError(f"model {ref!r}: the factory raised {exc.__class__.__name__}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise SurgeryInputError(
            f"model {ref!r}: the factory returned a value of type {type(model).__name__}, expected an nn.Module"
        )
    return model
