"""Model references and checkpoints: ``torchvision:NAME``, ``timm:NAME``, ``zoo:NAME``, ``package.module:factory``.

Checkpoints load safely only: ``.pt``/``.pth`` through ``torch.load(weights_only=True)`` (never a
fallback to full pickle), ``.safetensors`` through safetensors. Pretrained weights come from the
local cache only; nothing is downloaded.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
import pickle
import sys
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn

from surgery.errors import SurgeryInputError, first_line

PREFIXES = ("module.", "_orig_mod.")


@lru_cache(maxsize=1)
def _torchvision_names() -> frozenset[str]:
    import torchvision

    return frozenset(torchvision.models.list_models())


def _suggest(name: str, known: Any) -> str:
    close = difflib.get_close_matches(name, list(known), n=3, cutoff=0.6)
    return f"; did you mean {', '.join(close)}?" if close else ""


def validate_model_ref(ref: str) -> None:
    """Raise ValueError (for the case schema) when ``ref`` names no model this harness can build."""
    kind, sep, name = ref.partition(":")
    if not sep or not name:
        raise ValueError(f"model {ref!r}: expected torchvision:NAME, timm:NAME, zoo:NAME or package.module:factory")
    if kind == "torchvision":
        if name not in _torchvision_names():
            hint = _suggest(name, _torchvision_names()) or "; expected a name in torchvision.models.list_models()"
            raise ValueError(f"unknown torchvision model {name!r}{hint}")
    elif kind == "timm":
        import timm

        if not timm.is_model(name):
            hint = _suggest(name, timm.list_models()) or "; expected a name in timm.list_models()"
            raise ValueError(f"unknown timm model {name!r}{hint}")
    elif kind == "zoo":
        from surgery.zoo import ZOO

        if name not in ZOO:
            hint = _suggest(name, ZOO) or ";"
            raise ValueError(f"unknown zoo model {name!r}{hint} expected one of: {', '.join(ZOO)}")
    elif not all(part.isidentifier() for part in kind.split(".")) or not name.isidentifier():
        raise ValueError(f"model {ref!r}: expected torchvision:NAME, timm:NAME, zoo:NAME or package.module:factory")
    else:
        resolve_factory(ref)


def resolve_factory(ref: str) -> Any:
    """The class or function a ``package.module:factory`` ref names, refused (ValueError) unless safe to call.

    A case file is code (see README, Trust model), yet a ref may not reach what no model factory is:
    a module of the standard library or ``builtins`` and private names are refused before anything is
    imported; otherwise the named module is imported (only it and its parents) and the factory must be a
    class or a function defined in that module or one of its submodules, not one it imports from
    elsewhere. Nothing is called.
    """
    module_name, _, name = ref.partition(":")
    parts = module_name.split(".")
    private = next((part for part in [*parts, name] if part.startswith("_")), None)
    if private is not None:
        raise ValueError(f"model {ref!r}: {private!r} is a private name; expected a public "
                         "package.module:factory")
    if parts[0] in sys.stdlib_module_names or parts[0] in sys.builtin_module_names:
        raise ValueError(f"model {ref!r}: {parts[0]!r} is a module of the standard library, not a model factory; "
                         "expected a package.module:factory of your own")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or whatever the module's own code raised on import
        raise ValueError(f"model {ref!r}: cannot import {module_name!r} ({first_line(exc)})") from None
    factory = module.__dict__.get(name)
    if factory is None:
        raise ValueError(f"model {ref!r}: cannot import {name!r} from {module_name!r}: no such name")
    if not (inspect.isclass(factory) or inspect.isfunction(factory)):
        raise ValueError(f"model {ref!r}: {name} is a {type(factory).__name__}, expected a factory "
                         f"(a class or function defined in {module_name})")
    # NOTE: a package's public re-export of its own code counts (torch.nn:Identity lives in
    # torch.nn.modules.linear, torchvision.models:resnet18 in torchvision.models.resnet); an import
    # from elsewhere (a module re-exporting os.system) does not.
    defined_in = getattr(factory, "__module__", None) or ""
    if defined_in != module_name and not defined_in.startswith(module_name + "."):
        raise ValueError(f"model {ref!r}: {name} is defined in {defined_in!r}, not in {module_name!r} or "
                         f"its submodules; expected a factory defined in the package named")
    return factory


def clean_key(key: str) -> str:
    """``module._orig_mod.layer1.0.conv1.weight`` → ``layer1.0.conv1.weight``."""
    changed = True
    while changed:
        changed = False
        for prefix in PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
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
                raise SurgeryInputError(f"checkpoint {path}: corrupt or not a torch checkpoint ({operand}); "
                                        "expected a file written by torch.save or safetensors") from None
            why = next((ln for ln in first if "Unsupported" in ln or "global" in ln.lower()), first[0] if first else "")
            raise SurgeryInputError(f"checkpoint {path}: refused, it is not weights-only ({why.strip()[:160]}); "
                                    "surgery never unpickles code") from None
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
        raise SurgeryInputError(f"{origin}: none of its {len(state_dict)} keys match the model "
                                f"(checkpoint has e.g. {next(iter(state_dict))!r}, model has {next(iter(own))!r})")
    # NOTE: torchvision's own checkpoints (and older PyTorch ones) carry no num_batches_tracked;
    # PyTorch fills it in, so its absence is not a missing weight.
    missing = [k for k in own if k not in state_dict and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state_dict if k not in own]
    bad_shape = [k for k in own if k in state_dict and own[k].shape != state_dict[k].shape]  # model order: stable
    if bad_shape:
        k = bad_shape[0]
        raise SurgeryInputError(f"{origin}: {len(bad_shape)} tensor(s) have the wrong shape, e.g. {k!r}: "
                                f"checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}")
    if missing or unexpected:
        raise SurgeryInputError(f"{origin}: {len(missing)} model key(s) missing (e.g. {missing[:1]}), "
                                f"{len(unexpected)} unexpected (e.g. {unexpected[:1]})")
    model.load_state_dict(state_dict, strict=not any(k.endswith("num_batches_tracked") for k in own
                                                     if k not in state_dict))
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
            set_module(model, name, nn.Conv2d(in_chans, module.out_channels, module.kernel_size, module.stride,
                                              module.padding, module.dilation, module.groups, module.bias is not None))
            return


def _hub_file(url: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def _pretrained_torchvision(name: str) -> dict[str, torch.Tensor]:
    import torchvision

    weights = torchvision.models.get_model_weights(name).DEFAULT
    path = _hub_file(weights.url)
    if not path.is_file():
        raise SurgeryInputError(f"torchvision:{name} pretrained weights are not in the local cache ({path}); "
                                "surgery never downloads: put the file there or use 'checkpoint:'")
    return load_state_dict_file(path)


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
    factory = resolve_factory(ref)  # validate_model_ref above has vetted it: this only looks it up again
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
        raise SurgeryInputError(f"model {ref!r}: the factory returned a value of type {type(model).__name__}, "
                                "expected an nn.Module")
    return model


def build_model(spec, *, device: torch.device | str = "cpu", num_classes: int | None = None,
                in_chans: int | None = None) -> nn.Module:
    """Build the model a case's ``ModelSpec`` describes, with its checkpoint or cached weights loaded.

    ``num_classes`` / ``in_chans`` are defaults the spec's own fields override.
    """
    num_classes = spec.num_classes or num_classes
    in_chans = spec.in_chans or in_chans
    kind, _, name = spec.model.partition(":")
    if kind == "zoo":
        from surgery.zoo import load_zoo_model

        model = load_zoo_model(name, device="cpu")
    else:
        model = build_architecture(spec.model, num_classes=num_classes, in_chans=in_chans)
        if spec.pretrained:
            if kind == "torchvision":
                load_weights(model, _pretrained_torchvision(name), origin=f"{spec.model} pretrained")
            elif kind == "timm":
                cfg = getattr(model, "pretrained_cfg", {}) or {}
                url = cfg.get("url") or ""
                path = _hub_file(url) if url else Path(torch.hub.get_dir()) / "checkpoints" / f"{name}.safetensors"
                if not path.is_file():
                    raise SurgeryInputError(f"{spec.model} pretrained weights are not in the local cache ({path}); "
                                            "surgery never downloads: put the file there or use 'checkpoint:'")
                load_weights(model, load_state_dict_file(path), origin=str(path))
            else:
                raise SurgeryInputError(f"{spec.model}: 'pretrained' applies to torchvision: and timm: models only")
    if spec.checkpoint:
        load_weights(model, load_state_dict_file(spec.checkpoint), origin=f"checkpoint {spec.checkpoint}")
    return model.to(device)

