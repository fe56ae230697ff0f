"""Where a user's images come from, and how one image becomes uint8 pixels at the case's size.

Two kinds of source, behind one :class:`ImageSource`:

- an image folder (one sub-folder per class) or a ``.tar`` of one, listed by timm's readers
  (``timm.data.create_reader``: the same classes, order and extensions as ``timm.create_dataset``);
- any map-style ``torch.utils.data.Dataset`` named by reference (``torchvision.datasets:CIFAR10``),
  built with the case's keyword arguments, whose items are ``(image, label)``.

Each image is decoded with PIL, converted to RGB or L (grayscale, RGBA, CMYK and palette images are
converted, not refused), its shorter side resized and centre-cropped as torchvision's
``ImageClassification`` transform does. An image that cannot be decoded (unreadable, truncated) is bad
input naming its path. Decoding runs in DataLoader workers; :mod:`surgery.data.image_cache` stores the result.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from surgery.errors import SurgeryInputError, first_line
from surgery.models.model_refs import resolve_factory


@dataclass(frozen=True)
class Geometry:
    """What every image becomes: ``channels`` × ``crop`` × ``crop`` uint8, its shorter side resized to ``resize``."""

    resize: int
    crop: int
    channels: int
    interpolation: str = "bilinear"
    decoder: str = "pil"  # "pil", or torchvision.io's decoder on "cpu" or "cuda" (see DECODERS)

    def as_dict(self) -> dict[str, Any]:
        geometry = {
            "resize": self.resize,
            "crop": self.crop,
            "channels": self.channels,
            "interpolation": self.interpolation,
        }
        # Another decoder writes (slightly) other pixels; PIL's entries keep the keys they always had.
        return geometry if self.decoder == "pil" else {**geometry, "decoder": self.decoder}


# ``data.decoder``: who turns a file's bytes into pixels. PIL (the default) matches torchvision's
# ImageFolder transforms exactly; "cpu" and "cuda" use torchvision.io.decode_jpeg in batches (on the
# GPU, nvJPEG), then resize and crop the tensors there. A file decode_jpeg cannot read (a PNG, a CMYK
# JPEG) goes through PIL, so both accept what PIL accepts.
DECODERS = ("pil", "cpu", "cuda")


def _resize_and_crop(image: torch.Tensor, geometry: Geometry) -> torch.Tensor:
    """A decoded ``(C, H, W)`` uint8 tensor, its shorter side resized and centre-cropped, on its own device."""
    image = TF.resize(image, [geometry.resize], interpolation=InterpolationMode(geometry.interpolation), antialias=True)
    return TF.center_crop(image, [geometry.crop])


def decode_files(blobs: list[np.ndarray], geometry: Geometry, device: torch.device) -> list[torch.Tensor | None]:
    """The encoded files ``blobs`` as ``(C, crop, crop)`` uint8 tensors on the CPU, decoded by
    ``torchvision.io.decode_jpeg`` on ``device`` in one batch; None for a file it cannot decode (PIL's turn)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    mode = ImageReadMode.GRAY if geometry.channels == 1 else ImageReadMode.RGB
    # NOTE: only whole JPEGs (SOI ... EOI): libjpeg fills a truncated file with grey and warns, where PIL
    # refuses it; PIL gets the rest, so a truncated file is bad input whichever decoder is asked for.
    whole = [len(b) > 4 and bytes(b[:2]) == b"\xff\xd8" and bytes(b[-2:]) == b"\xff\xd9" for b in blobs]
    data = [torch.from_numpy(blob) for blob, ok in zip(blobs, whole) if ok]
    try:
        decoded: list[torch.Tensor | None] = list(decode_jpeg(data, mode=mode, device=device)) if data else []
    except RuntimeError:  # one file of the batch is a JPEG decode_jpeg cannot read (CMYK, ...): each alone
        decoded = []
        for one in data:
            try:
                decoded.append(decode_jpeg(one, mode=mode, device=device))
            except RuntimeError:
                decoded.append(None)
    found = iter(decoded)
    images = [next(found) if ok else None for ok in whole]
    return [None if image is None else _resize_and_crop(image, geometry).cpu() for image in images]


def to_pixels(image: Any, geometry: Geometry) -> np.ndarray:
    """One image (PIL, a CHW tensor or an HWC array) as a ``(C, crop, crop)`` uint8 array."""
    if isinstance(image, torch.Tensor):
        image = TF.to_pil_image(image)
    elif isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise TypeError(f"an item's image is a {type(image).__name__}; expected a PIL image, a tensor or an array")
    image.load()  # a truncated file fails here, not later
    image = image.convert("L" if geometry.channels == 1 else "RGB")
    image = TF.resize(image, [geometry.resize], interpolation=InterpolationMode(geometry.interpolation), antialias=True)
    image = TF.center_crop(image, [geometry.crop])
    pixels = np.asarray(image, dtype=np.uint8)
    return pixels[None] if pixels.ndim == 2 else np.ascontiguousarray(pixels.transpose(2, 0, 1))


@dataclass
class ImageSource:
    """A listed source: its items, labels and class names, and a fingerprint of its content for the cache key."""

    description: str
    labels: list[int]
    classes: list[str]
    fingerprint: str
    reader: Any = None  # a timm reader (folder or tar)
    dataset: Any = None  # a map-style Dataset
    names: list[str] = field(default_factory=list)  # per item, what an error names (a file path)

    def __len__(self) -> int:
        return len(self.labels)

    def item_name(self, index: int) -> str:
        return self.names[index] if self.names else f"item {index} of {self.description}"

    def read_bytes(self, index: int) -> np.ndarray:
        """The encoded bytes of file item ``index`` (a folder's or a tar's; a dataset's items are not files)."""
        if self.reader is None:
            raise SurgeryInputError(
                f"{self.description} yields decoded images, not files: data.decoder applies to an imagefolder only"
            )
        fileobj, _ = self.reader[index]
        with fileobj:
            return np.frombuffer(fileobj.read(), dtype=np.uint8).copy()

    def open(self, index: int) -> Any:
        """The image of item ``index`` (a PIL image, tensor or array), not yet decoded for a file."""
        if self.reader is not None:
            fileobj, _ = self.reader[index]
            with fileobj:
                image = Image.open(fileobj)
                image.load()  # decoded before the file closes; a truncated file fails here
                return image
        image, _ = self.dataset[index]
        return image


class DecodeItems(torch.utils.data.Dataset):
    """The items of a source as ``(pixels or None, error or None)``, for a DataLoader's workers.

    A worker returns its error as text instead of raising it: the DataLoader would wrap it in a
    multi-line traceback, and the error the user sees is one line naming the image.
    """

    def __init__(self, source: ImageSource, geometry: Geometry):
        self.source, self.geometry = source, geometry

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[np.ndarray | None, str | None]:
        try:
            return to_pixels(self.source.open(index), self.geometry), None
        except Exception as exc:  # PIL raises several types for an unreadable or truncated file
            return None, f"cannot read image {self.source.item_name(index)}: {first_line(exc)}"


class ReadFiles(torch.utils.data.Dataset):
    """The items of a file source as ``(bytes or None, error or None)``: what a worker reads for a batched decoder."""

    def __init__(self, source: ImageSource):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[np.ndarray | None, str | None]:
        try:
            return self.source.read_bytes(index), None
        except OSError as exc:
            return None, f"cannot read image {self.source.item_name(index)}: {first_line(exc)}"


def pixels_of_bytes(blob: np.ndarray, geometry: Geometry) -> np.ndarray:
    """One encoded file decoded by PIL at ``geometry``: the fallback of the batched decoders."""
    return to_pixels(Image.open(io.BytesIO(blob.tobytes())), geometry)


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def folder_source(root: str) -> ImageSource:
    """An image folder (one sub-folder per class) or a ``.tar`` of one, listed by timm's reader."""
    from timm.data import create_reader  # NOTE: deferred on purpose: timm's import is seconds; embedded sets skip it

    path = Path(root).expanduser()
    is_tar = path.is_file() and path.suffix.lower() == ".tar"
    if not path.is_dir() and not is_tar:
        raise SurgeryInputError(
            f"imagefolder root {root!r} is neither a directory nor a .tar file; expected one folder per class"
        )
    try:
        options: dict[str, Any] = {"cache_tarinfo": False} if is_tar else {}
        reader = create_reader("", root=str(path), **options)
    except (RuntimeError, AssertionError, OSError, ValueError) as exc:
        raise SurgeryInputError(f"imagefolder root {root!r}: {first_line(exc)}") from None
    labels = [int(t) for t in (reader.targets if is_tar else [t for _, t in reader.samples])]
    class_to_idx = reader.class_name_to_idx if is_tar else reader.class_to_idx
    classes = sorted(class_to_idx, key=class_to_idx.__getitem__)
    if "" in classes or "." in classes:
        raise SurgeryInputError(
            f"imagefolder root {root!r} holds images outside any class folder; expected root/CLASS/IMAGE"
        )
    if not is_tar:
        empty = sorted(entry.name for entry in os.scandir(path) if entry.is_dir() and entry.name not in classes)
        if empty:
            raise SurgeryInputError(
                f"imagefolder root {root!r}: class folder {empty[0]!r} holds no images "
                f"(extensions timm reads: .jpg, .jpeg, .png, .webp, ...)"
            )
    if len(classes) < 2:
        raise SurgeryInputError(
            f"imagefolder root {root!r} has {len(classes)} class folder(s) {classes}; a classification needs at least 2"
        )
    if is_tar:
        stat = path.stat()
        names = [f"{path}:{reader.filename(i)}" for i in range(len(reader))]
        fingerprint = _digest("tar", str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    else:
        names = [p for p, _ in reader.samples]
        stats = [os.stat(p) for p in names]
        fingerprint = _digest(
            "folder",
            str(path.resolve()),
            [(os.path.relpath(p, path), s.st_size, s.st_mtime_ns) for p, s in zip(names, stats)],
        )
    return ImageSource(
        description=f"imagefolder {root}",
        labels=labels,
        classes=classes,
        fingerprint=fingerprint,
        reader=reader,
        names=names,
    )


def resolve_dataset_class(ref: str) -> Any:
    """The class or function ``package.module:Name`` names, by the trust rules of model factories
    (:func:`surgery.models.model_refs.resolve_factory`); nothing is called here."""
    try:
        return resolve_factory(ref, "dataset")
    except ValueError as exc:
        raise SurgeryInputError(str(exc)) from None


def dataset_source(ref: str, kwargs: dict[str, Any]) -> ImageSource:
    """A map-style Dataset built from ``ref`` and ``kwargs``; its labels are read once, item by item."""
    factory = resolve_dataset_class(ref)
    try:
        dataset = factory(**kwargs)
    except Exception as exc:  # the user's constructor: a missing root, a wrong keyword, ...
        raise SurgeryInputError(f"dataset {ref!r}: building it with {kwargs} fails: {first_line(exc)}") from None
    if not isinstance(dataset, torch.utils.data.Dataset) or not hasattr(dataset, "__len__"):
        raise SurgeryInputError(
            f"dataset {ref!r} returned a {type(dataset).__name__}, not a map-style "
            "torch.utils.data.Dataset with __len__ and __getitem__"
        )
    labels = _dataset_labels(ref, dataset)
    classes = [str(c) for c in getattr(dataset, "classes", [])] or [str(i) for i in range(max(labels) + 1)]
    if len(set(labels)) < 2:
        raise SurgeryInputError(f"dataset {ref!r} has {len(set(labels))} class(es); a classification needs at least 2")
    fingerprint = _digest("dataset", ref, kwargs, len(dataset), getattr(dataset, "root", None))
    return ImageSource(
        description=f"dataset {ref}", labels=labels, classes=classes, fingerprint=fingerprint, dataset=dataset
    )


def _dataset_labels(ref: str, dataset: Any) -> list[int]:
    """The labels of a dataset: its ``targets`` when it lists them (torchvision's do), else item by item."""
    targets = getattr(dataset, "targets", None)
    if targets is not None and len(targets) == len(dataset):
        return [int(t) for t in targets]
    labels = []
    for index in range(len(dataset)):
        item = dataset[index]
        if not isinstance(item, (tuple, list)) or len(item) < 2:
            raise SurgeryInputError(
                f"dataset {ref!r}: item {index} is a {type(item).__name__}; expected (image, label)"
            )
        labels.append(int(item[1]))
    return labels
