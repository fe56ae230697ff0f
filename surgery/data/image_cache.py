"""Decode once, read many: a user's images as uint8 records on disk, read a batch at a time.

The first read of a source (:mod:`surgery.data.image_sources`) decodes every image once, in DataLoader
workers, at the case's geometry (resize, centre crop, channels, interpolation), and writes the
pixels as fixed-size records to ``$SURGERY_CACHE/images/KEY.u8`` with ``KEY.json`` beside it (labels,
classes, shape). KEY hashes the source's fingerprint (every file's path, size and mtime; a tar's
size and mtime; a dataset's reference and arguments) and the geometry, so every seed, case and
process that reads the same folder at the same size shares one cache, and a changed file makes a
new one. A file lock lets one process build while the others wait; both files are written atomically.

:class:`CachedImages` reads records with ``pread`` into a batch buffer, and normalises the batch
where it is used (on the device). NOTE: ``pread``, not a memory map: the pages of a mapped file
count in a process's resident set once touched, so a run over 10,000 images would look as if it
held them all. Read into a buffer, the pixels stay in the page cache (shared between processes,
reclaimable) and the resident set stays about one batch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from filelock import FileLock
from tqdm.auto import tqdm

from surgery.files import cache_dir, write_atomic, write_json
from surgery.errors import SurgeryInputError, first_line
from surgery.data.image_sources import DecodeItems, Geometry, ImageSource, ReadFiles, decode_files, pixels_of_bytes
from surgery.data.preprocess import Preprocess

log = logging.getLogger(__name__)

CACHE_FORMAT = 1  # bump when decoding changes the pixels it writes
DECODE_BATCH = 64  # images per DataLoader batch while decoding


def default_workers() -> int:
    """Decoding processes when a case does not say: the CPUs this process may use, at most 8."""
    return min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


@dataclass(frozen=True)
class CacheEntry:
    """One decoded source in the cache: the record file and what it holds."""

    path: Path
    count: int
    channels: int
    size: int
    labels: np.ndarray  # int64, one per record
    classes: list[str]
    description: str
    geometry: dict[str, Any]
    key: str

    @property
    def record_bytes(self) -> int:
        return self.channels * self.size * self.size


def cache_key(source: ImageSource, geometry: Geometry) -> str:
    """The cache's name for ``source`` decoded at ``geometry``."""
    blob = json.dumps({"format": CACHE_FORMAT, "source": source.fingerprint, **geometry.as_dict()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _read_entry(meta_path: Path, key: str) -> CacheEntry | None:
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return None
    path = meta_path.with_suffix(".u8")
    expected = meta["count"] * meta["channels"] * meta["size"] ** 2
    if meta.get("format") != CACHE_FORMAT or not path.is_file() or path.stat().st_size != expected:
        return None
    return CacheEntry(
        path=path,
        count=meta["count"],
        channels=meta["channels"],
        size=meta["size"],
        labels=np.asarray(meta["labels"], dtype=np.int64),
        classes=meta["classes"],
        description=meta["description"],
        geometry=meta["geometry"],
        key=key,
    )


def cached_entry(
    source: ImageSource, geometry: Geometry, *, workers: int | None = None, progress: bool | None = None
) -> CacheEntry:
    """The cache entry of ``source`` at ``geometry``, decoded now unless another run did it already."""
    if len(source) == 0:
        raise SurgeryInputError(f"{source.description} holds no images")
    key = cache_key(source, geometry)
    folder = cache_dir() / "images"
    folder.mkdir(parents=True, exist_ok=True)
    meta_path = folder / f"{key}.json"
    entry = _read_entry(meta_path, key)
    if entry is not None:
        return entry
    with FileLock(str(folder / f"{key}.lock")):
        entry = _read_entry(meta_path, key)  # another process may have built it while this one waited
        if entry is None:
            _decode_into(
                folder / f"{key}.u8",
                source,
                geometry,
                workers=default_workers() if workers is None else workers,
                progress=progress,
            )
            write_json(
                meta_path,
                {
                    "format": CACHE_FORMAT,
                    "count": len(source),
                    "channels": geometry.channels,
                    "size": geometry.crop,
                    "labels": source.labels,
                    "classes": source.classes,
                    "description": source.description,
                    "geometry": geometry.as_dict(),
                },
            )
            entry = _read_entry(meta_path, key)
    assert entry is not None
    return entry


class _DecodeIntoFile(torch.utils.data.Dataset):
    """Decode item ``i`` and write its pixels at record ``i`` of a pre-sized file, in the worker itself.

    NOTE: the pixels never cross to the main process: a shared-memory batch, its file descriptor and
    the main process's copy into the file cost as much as a fifth of the first read on 2 cores.
    """

    def __init__(self, items: DecodeItems, path: Path, record: int):
        self.items, self.path, self.record = items, str(path), record
        self._fd: int | None = None
        self._pid = -1

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> str | None:
        pixels, error = self.items[index]
        if error is not None:
            return error
        assert pixels is not None and pixels.size == self.record
        if self._pid != os.getpid():  # one descriptor per worker process, opened there
            self._fd, self._pid = os.open(self.path, os.O_WRONLY), os.getpid()
        if self._fd is None:  # closed in this process
            raise TypeError("the cache writer is closed")
        os.pwrite(self._fd, np.ascontiguousarray(pixels).data, index * self.record)
        return None

    def close(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = None

    __del__ = close


def _first_error(errors: list[str | None]) -> tuple[int, str | None]:
    """A DataLoader batch of written items: how many, and the first error among them."""
    return len(errors), next((e for e in errors if e is not None), None)


def _decode_batched(tmp: Path, source: ImageSource, geometry: Geometry, *, workers: int, bar: tqdm) -> None:
    """``data.decoder: cpu | cuda``: workers read the files' bytes; this process decodes each batch with
    torchvision.io on the decoder's device and writes the pixels at their records."""
    device = torch.device(geometry.decoder)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SurgeryInputError("data.decoder is 'cuda' but this machine has no CUDA device; use 'pil' or 'cpu'")
    record = geometry.channels * geometry.crop * geometry.crop
    loader = torch.utils.data.DataLoader(
        ReadFiles(source), batch_size=DECODE_BATCH, num_workers=workers, collate_fn=list, pin_memory=False
    )
    fd = os.open(tmp, os.O_WRONLY)
    try:
        start = 0
        for batch in loader:
            error = next((e for _, e in batch if e is not None), None)
            if error is not None:
                raise SurgeryInputError(error)
            blobs = [blob for blob, _ in batch]
            for offset, (blob, image) in enumerate(zip(blobs, decode_files(blobs, geometry, device))):
                index = start + offset
                try:
                    pixels = pixels_of_bytes(blob, geometry) if image is None else image.numpy()
                except Exception as exc:  # PIL raises several types for an unreadable or truncated file
                    raise SurgeryInputError(f"cannot read image {source.item_name(index)}: {first_line(exc)}") from None
                os.pwrite(fd, np.ascontiguousarray(pixels).data, index * record)
            start += len(batch)
            bar.update(len(batch))
    finally:
        os.close(fd)


def _decode_in_workers(tmp: Path, source: ImageSource, geometry: Geometry, *, workers: int, bar: tqdm) -> None:
    """``data.decoder: pil``: each DataLoader worker decodes its items with PIL and writes them at their records."""
    items = _DecodeIntoFile(DecodeItems(source, geometry), tmp, geometry.channels * geometry.crop * geometry.crop)
    loader = torch.utils.data.DataLoader(
        items,
        batch_size=DECODE_BATCH,
        num_workers=workers,
        collate_fn=_first_error,
        prefetch_factor=4 if workers else None,
    )
    try:
        for count, error in loader:
            if error is not None:
                raise SurgeryInputError(error)
            bar.update(count)
    finally:
        items.close()  # the main process's descriptor, when it decoded without workers


def _decode_into(path: Path, source: ImageSource, geometry: Geometry, *, workers: int, progress: bool | None) -> None:
    """Decode every item of ``source`` and write its pixels to ``path`` as fixed-size records (atomically)."""
    log.info("decoding %d images of %s once into the cache (%s)", len(source), source.description, path.parent)
    show = sys.stderr.isatty() if progress is None else progress
    decode = _decode_in_workers if geometry.decoder == "pil" else _decode_batched

    def write(tmp: Path) -> None:
        os.truncate(tmp, geometry.channels * geometry.crop * geometry.crop * len(source))
        desc = f"decoding {source.description}"
        with tqdm(total=len(source), desc=desc, unit="img", disable=not show, leave=False) as bar:
            decode(tmp, source, geometry, workers=workers, bar=bar)

    write_atomic(path, write)


class CachedImages:
    """Images of a cache entry, in the order ``rows`` gives: indexed like a tensor of normalised float images.

    ``images[i:j]`` and ``images[index_tensor]`` return float32 ``(B, C, S, S)`` tensors on the CPU,
    normalised by ``preprocess``; :meth:`batch` does the same on a device from a uint8 copy (pinned
    and non-blocking on CUDA), which is what the fine-tune and the evaluations use. :meth:`subset`
    is a view (no pixels read).
    """

    def __init__(self, entry: CacheEntry, rows: np.ndarray, preprocess: Preprocess):
        self.entry, self.rows, self.preprocess = entry, np.asarray(rows, dtype=np.int64), preprocess
        self._fd: int | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def __repr__(self) -> str:
        return f"CachedImages({len(self)} of {self.entry.description}, {self.entry.size} px)"

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fd": None}  # a file descriptor does not cross a process boundary

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.rows), self.entry.channels, self.entry.size, self.entry.size)

    @property
    def labels(self) -> torch.Tensor:
        return torch.from_numpy(self.entry.labels[self.rows])

    def subset(self, positions: Sequence[int] | torch.Tensor | np.ndarray) -> "CachedImages":
        """The images at ``positions`` of this set (a view)."""
        return CachedImages(self.entry, self.rows[np.asarray(positions, dtype=np.int64)], self.preprocess)

    def read(self, positions: Any) -> torch.Tensor:
        """The uint8 pixels ``(B, C, S, S)`` of the images at ``positions`` (an int, slice or index array)."""
        rows = np.atleast_1d(self.rows[_as_index(positions)])
        if self._fd is None:
            self._fd = os.open(self.entry.path, os.O_RDONLY)
        size = self.entry.record_bytes
        out = np.empty((len(rows), size), dtype=np.uint8)
        for i, row in enumerate(rows):
            if os.preadv(self._fd, [out[i]], int(row) * size) != size:
                raise SurgeryInputError(f"image cache {self.entry.path} is shorter than its index says; delete it")
        return torch.from_numpy(out).view(len(rows), self.entry.channels, self.entry.size, self.entry.size)

    def batch(self, positions: Any, device: torch.device) -> torch.Tensor:
        """Normalised float32 images at ``positions`` on ``device`` (the uint8 copy travels, not the floats)."""
        pixels = self.read(positions)
        if device.type == "cuda":
            pixels = pixels.pin_memory()
        pixels = pixels.to(device, non_blocking=True)
        return self.preprocess.normalize(pixels.float().div_(255))

    def fingerprint(self) -> bytes:
        """What these images are, for a digest: the cache entry, the rows and the normalisation."""
        return f"{self.entry.key}|{self.preprocess.mean}|{self.preprocess.std}|".encode() + self.rows.tobytes()

    def __getitem__(self, positions: Any) -> torch.Tensor:
        images = self.batch(positions, torch.device("cpu"))
        return images[0] if isinstance(positions, int) else images

    def __del__(self) -> None:
        fd = getattr(self, "_fd", None)
        if fd is not None:
            os.close(fd)


Images = torch.Tensor | CachedImages  # what a split holds: an embedded set's tensor, or cached images


def _as_index(positions: Any) -> Any:
    if isinstance(positions, torch.Tensor):
        return positions.cpu().numpy()
    return positions


def subset(images: Images, positions: torch.Tensor) -> Images:
    """The images at ``positions``: a tensor's rows, or a view of cached images."""
    return images.subset(positions) if isinstance(images, CachedImages) else images[positions]


def head(images: Images, count: int) -> Images:
    """The first ``count`` images, as :func:`subset` gives them."""
    return subset(images, torch.arange(min(count, len(images))))


def on_device(images: Images, positions: Any, device: torch.device) -> torch.Tensor:
    """Images at ``positions`` as float32 on ``device``, normalised (cached images: read and normalised here)."""
    if isinstance(images, CachedImages):
        return images.batch(positions, device)
    return images[positions].to(device, non_blocking=True)
