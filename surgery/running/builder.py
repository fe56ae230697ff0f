"""Building the model a case's ``ModelSpec`` describes: policy (which weights, from where) over the mechanics
of :mod:`surgery.models.checkpoints` (architectures, checkpoints) and :mod:`surgery.train.zoo` (trained, cached
sources).

Weights come from a ``zoo:`` model (trained here and cached), a checkpoint (weights only), or timm's and
torchvision's pretrained files in the local cache; nothing is ever downloaded.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torchvision

from surgery.errors import SurgeryInputError
from surgery.models.checkpoints import build_architecture, load_state_dict_file, load_weights
from surgery.train.zoo import ZOO, load_zoo_model, zoo_path


def _hub_file(url: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def _pretrained_torchvision(name: str) -> dict[str, torch.Tensor]:
    weights = torchvision.models.get_model_weights(name).DEFAULT
    path = _hub_file(weights.url)
    if not path.is_file():
        raise SurgeryInputError(
            f"torchvision:{name} pretrained weights are not in the local cache ({path}); "
            "surgery never downloads: put the file there or use 'checkpoint:'"
        )
    return load_state_dict_file(path)


def build_model(
    spec, *, device: torch.device | str = "cpu", num_classes: int | None = None, in_chans: int | None = None
) -> nn.Module:
    """Build the model a case's ``ModelSpec`` describes, with its checkpoint or cached weights loaded.

    ``num_classes`` / ``in_chans`` are defaults the spec's own fields override (a pretrained model keeps
    its own class count unless the spec sets one).
    """
    # NOTE: pretrained weights keep their own head (ImageNet's 1,000 classes) unless the spec says otherwise:
    # the data's class count is a default for models whose head the harness trains.
    num_classes = spec.num_classes or (None if spec.pretrained else num_classes)
    in_chans = spec.in_chans or in_chans
    kind, _, name = spec.model.partition(":")
    if kind == "zoo":
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
                    raise SurgeryInputError(
                        f"{spec.model} pretrained weights are not in the local cache ({path}); "
                        "surgery never downloads: put the file there or use 'checkpoint:'"
                    )
                load_weights(model, load_state_dict_file(path), origin=str(path))
            else:
                raise SurgeryInputError(f"{spec.model}: 'pretrained' applies to torchvision: and timm: models only")
    if spec.checkpoint:
        load_weights(model, load_state_dict_file(spec.checkpoint), origin=f"checkpoint {spec.checkpoint}")
    return model.to(device)


def weight_files(spec) -> list[Path]:
    """The weight files building ``spec`` reads (zoo file, checkpoint, cached pretrained weights) that exist."""
    kind, _, name = spec.model.partition(":")
    files: list[Path] = []
    if kind == "zoo":
        files.append(zoo_path(ZOO[name]))
    elif spec.pretrained and kind == "torchvision":
        files.append(_hub_file(torchvision.models.get_model_weights(name).DEFAULT.url))
    if spec.checkpoint:
        files.append(Path(spec.checkpoint))
    return [f for f in files if f.is_file()]


_DIGESTS: dict[tuple[str, int, int], str] = {}


def digest_tensor(digest: Any, name: str, tensor: torch.Tensor) -> None:
    """Feed ``name``, dtype, shape and bytes of ``tensor`` to a hashlib ``digest``."""
    tensor = tensor.detach().contiguous().cpu()
    digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
    if tensor.numel():
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())


def weights_digest(path: str | Path) -> str:
    """SHA-256 of a weight file's tensors: names, dtypes, shapes and bytes, in name order.

    NOTE: not of the file's bytes. safetensors keeps its ``__metadata__`` in a hash map, so the same tensors
    saved twice can be two different files; this digest is equal exactly when the weights are.
    """
    path = Path(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        digest = hashlib.sha256()
        state = load_state_dict_file(path)
        for name in sorted(state):
            digest_tensor(digest, name, state[name])
        _DIGESTS[key] = digest.hexdigest()
    return _DIGESTS[key]
