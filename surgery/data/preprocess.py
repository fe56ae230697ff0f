"""How a model wants its images: mean, std, the resize before the centre crop, the interpolation.

Preprocessing belongs to the model a case reads its data for (the source): a pretrained torchvision
model's ``weights.transforms()``, a timm model's pretrained config (``resolve_data_config``), the zoo's
own ``[-1, 1]``. A case may override any part with ``data.preprocess``. The crop is always the case's
``data.image_size``; the resize keeps the model's resize/crop ratio at that size (torchvision's
ResNet-50 resizes to 232 and crops 224, so a 112 px case resizes to 116).

Embedded sets (mnist5k, digits, shapes) keep their fast path: they are resized straight to
``image_size`` and only the mean and std apply. Normalisation happens per batch, where the batch is
(:mod:`surgery.imageset`), or once for an embedded set held as a tensor.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from surgery.errors import SurgeryInputError

INTERPOLATIONS = ("bilinear", "bicubic", "nearest")


@dataclass(frozen=True)
class Preprocess:
    """The preprocessing of a model's inputs, and where it came from (for provenance and the report)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_pct: float = 1.0  # crop / resize: the centre crop keeps this fraction of the shorter side
    interpolation: str = "bilinear"
    origin: str = "zoo"

    def resize_for(self, image_size: int) -> int:
        """The shorter side an image is resized to before its centre crop of ``image_size``."""
        return max(image_size, int(round(image_size / self.crop_pct)))

    def for_channels(self, channels: int) -> "Preprocess":
        """The same preprocessing for images of ``channels`` channels (a grayscale run averages RGB's)."""
        if len(self.mean) == channels:
            return self
        if len(self.mean) == 1:
            return Preprocess(self.mean * channels, self.std * channels, self.crop_pct, self.interpolation, self.origin)
        if channels == 1:
            return Preprocess(
                (sum(self.mean) / len(self.mean),),
                (sum(self.std) / len(self.std),),
                self.crop_pct,
                self.interpolation,
                self.origin,
            )
        raise SurgeryInputError(f"preprocess: {len(self.mean)} means for {channels}-channel images")

    def to_dict(self, image_size: int | None = None) -> dict[str, Any]:
        """The figures provenance and the report state (with the resize and crop at ``image_size``)."""
        out = asdict(self)
        out["mean"], out["std"] = list(self.mean), list(self.std)
        if image_size is not None:
            out["resize"], out["crop"] = self.resize_for(image_size), image_size
        return out

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """``(images - mean) / std`` per channel, for float images in [0, 1] of shape (N, C, H, W)."""
        channels = images.shape[1]
        p = self.for_channels(channels)
        if len(set(p.mean)) == 1 and len(set(p.std)) == 1:
            # NOTE: scalar arithmetic, so the zoo's (x - 0.5) / 0.5 is bit for bit what it always was
            return (images - p.mean[0]) / p.std[0]
        mean = torch.tensor(p.mean, dtype=images.dtype, device=images.device).view(1, channels, 1, 1)
        std = torch.tensor(p.std, dtype=images.dtype, device=images.device).view(1, channels, 1, 1)
        return (images - mean) / std


ZOO_PREPROCESS = Preprocess(mean=(0.5,), std=(0.5,), crop_pct=1.0, interpolation="bilinear", origin="zoo ([-1, 1])")
IMAGENET_PREPROCESS = Preprocess(
    mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), crop_pct=0.875, interpolation="bilinear", origin="imagenet"
)
PRESETS = {"zoo": ZOO_PREPROCESS, "imagenet": IMAGENET_PREPROCESS}


def torchvision_preprocess(name: str) -> Preprocess:
    """The preprocessing of torchvision's default pretrained weights for architecture ``name``."""
    import torchvision  # NOTE: deferred on purpose: only a pretrained torchvision source needs it

    weights = torchvision.models.get_model_weights(name).DEFAULT
    transforms = weights.transforms()
    crop, resize = transforms.crop_size[0], transforms.resize_size[0]
    return Preprocess(
        tuple(transforms.mean),
        tuple(transforms.std),
        crop_pct=crop / resize,
        interpolation=transforms.interpolation.value,
        origin=f"torchvision {weights}",
    )


def timm_preprocess(name: str) -> Preprocess:
    """The preprocessing of timm's default pretrained config for ``name`` (timm's ``resolve_data_config``)."""
    import timm  # NOTE: deferred on purpose: only a pretrained timm source needs it
    import timm.data

    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None:
        return IMAGENET_PREPROCESS
    config = timm.data.resolve_data_config(pretrained_cfg=cfg.to_dict())
    interpolation = config["interpolation"] if config["interpolation"] in INTERPOLATIONS else "bilinear"
    return Preprocess(
        tuple(config["mean"]),
        tuple(config["std"]),
        crop_pct=float(config["crop_pct"]),
        interpolation=interpolation,
        origin=f"timm {name}.{cfg.tag} pretrained_cfg",
    )


def model_preprocess(model_ref: str, *, pretrained: bool) -> Preprocess:
    """The preprocessing a model reference implies.

    NOTE: a choice: torchvision and timm models use their published preprocessing only when
    ``pretrained``; built from a checkpoint or from scratch they get the zoo's [-1, 1], as the
    harness has always fed them (``data.preprocess: imagenet`` says otherwise for a checkpoint
    fine-tuned from ImageNet weights).
    """
    kind, _, name = model_ref.partition(":")
    if pretrained and kind == "torchvision":
        return torchvision_preprocess(name)
    if pretrained and kind == "timm":
        return timm_preprocess(name)
    return ZOO_PREPROCESS


def resolve_preprocess(model_ref: str, *, pretrained: bool, override: Any = None) -> Preprocess:
    """The source model's preprocessing, with a case's ``data.preprocess`` (a preset name or fields) over it."""
    if override is None:
        return model_preprocess(model_ref, pretrained=pretrained)
    if isinstance(override, str):
        return PRESETS[override]
    base = PRESETS[override.preset] if override.preset else model_preprocess(model_ref, pretrained=pretrained)
    fields = {k: v for k, v in override.model_dump(exclude={"preset"}).items() if v is not None}
    if not fields:
        return base
    values = {**asdict(base), **{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}}
    values["origin"] = f"data.preprocess over {base.origin}"
    return Preprocess(**values)
