"""Seeded augmentation of a training batch where the batch is (``finetune.augment``).

Two transforms, both on the whole batch at once on the device: a horizontal flip of half the
images, and a random resized crop (an area fraction drawn from ``scale``, an aspect ratio drawn
log-uniformly from ``ratio``, a position drawn uniformly, resized back to the batch's size). Both
are one affine resampling (``affine_grid`` + ``grid_sample``); a flip alone is an exact index flip.
The draws come from a CPU generator of their own, so a case without augmentation draws the same
batch order as before, and a seed gives the same augmented batches on every device.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from surgery.spec import AugmentSpec

AUGMENT_SEED_OFFSET = 0x5EED_A06  # the augmentation generator's seed is the run's seed plus this


def augment_generator(seed: int) -> torch.Generator:
    """The CPU generator of a fine-tune's augmentation draws."""
    return torch.Generator().manual_seed((seed + AUGMENT_SEED_OFFSET) % 2**63)


def augment_batch(images: torch.Tensor, spec: AugmentSpec, generator: torch.Generator) -> torch.Tensor:
    """``images`` (B, C, H, W, float) flipped and/or cropped as ``spec`` says, with draws from ``generator``."""
    n = images.shape[0]
    flip = torch.rand(n, generator=generator) < 0.5 if spec.hflip else torch.zeros(n, dtype=torch.bool)
    crop = spec.random_resized_crop
    if crop is None:
        if not spec.hflip:
            return images
        mask = flip.to(images.device).view(n, 1, 1, 1)
        return torch.where(mask, images.flip(-1), images)
    area = torch.empty(n).uniform_(crop.scale[0], crop.scale[1], generator=generator)
    log_ratio = torch.empty(n).uniform_(math.log(crop.ratio[0]), math.log(crop.ratio[1]), generator=generator)
    ratio = log_ratio.exp()
    # NOTE: width and height as fractions of the side, clamped to the image (torchvision re-draws instead)
    width = (area * ratio).sqrt().clamp(max=1.0)
    height = (area / ratio).sqrt().clamp(max=1.0)
    centre_x = (1 - width) * (2 * torch.rand(n, generator=generator) - 1)
    centre_y = (1 - height) * (2 * torch.rand(n, generator=generator) - 1)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = torch.where(flip, -width, width)
    theta[:, 0, 2] = centre_x
    theta[:, 1, 1] = height
    theta[:, 1, 2] = centre_y
    grid = F.affine_grid(theta.to(images.device, images.dtype), list(images.shape), align_corners=False)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return (
        out.contiguous(memory_format=torch.channels_last)
        if images.is_contiguous(memory_format=torch.channels_last)
        else out
    )
