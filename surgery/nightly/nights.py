"""Nights side by side: dated report directories, the ``latest`` link, and finding the nights again.

A *night* is one report directory: ``<case>/results.json`` (and ``report.html``) per case and an
``index.html``, as ``surgery run --report DIR`` writes it. With ``--dated`` (``--surgery-report-dated``
under pytest) a run writes into a new directory named by its UTC start time inside ``DIR`` and then
points ``DIR/latest`` at it::

    reports/nightly/2026-12-04T031500Z/<case>/results.json …
    reports/nightly/2026-12-05T031502Z/<case>/results.json …
    reports/nightly/latest -> 2026-12-05T031502Z

so ``surgery history reports/nightly`` finds every night with no extra step. Only the standard library
is used here: the pytest plugin names the directory before any worker starts.
"""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path

from surgery.errors import SurgeryInputError

LATEST = "latest"
STAMP = "%Y-%m-%dT%H%M%SZ"  # sortable, and no ":" (a valid directory name everywhere)
RESULTS = "results.json"


def new_dated_dir(parent: str | Path, now: datetime | None = None) -> Path:
    """Create and return ``parent/<UTC time>`` for one run (``-2``, ``-3`` … appended when the second is taken)."""
    parent = Path(parent)
    stamp = (now or datetime.now(timezone.utc)).astimezone(timezone.utc).strftime(STAMP)
    parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, 1000):
        night = parent / (stamp if n == 1 else f"{stamp}-{n}")
        try:
            night.mkdir()
            return night
        except FileExistsError:
            continue
    raise SurgeryInputError(f"{parent}: 999 report directories named {stamp}; remove some")


def point_latest(night: str | Path) -> Path | None:
    """Point ``<parent>/latest`` at ``night`` (a relative symbolic link, replaced atomically); return the link.

    Returns ``None`` where the file system refuses symbolic links (the nights are still found without it).
    A ``latest`` that is a real directory or file is left alone.
    """
    night = Path(night)
    link = night.parent / LATEST
    if link.exists() and not link.is_symlink():
        return None
    tmp = night.parent / f".{LATEST}.{os.getpid()}"
    try:
        if tmp.is_symlink():
            tmp.unlink()
        tmp.symlink_to(night.name, target_is_directory=True)
        os.replace(tmp, link)
    except OSError:
        return None
    return link


def is_night(path: Path) -> bool:
    """Whether ``path`` is a report directory: at least one ``<case>/results.json`` in it."""
    return path.is_dir() and any(p.is_file() for p in path.glob(f"*/{RESULTS}"))


def find_nights(dirs: list[str | Path]) -> list[Path]:
    """The report directories named by ``dirs``: each one itself if it is a report directory, else the report
    directories directly inside it. ``latest`` and other links to a directory already found count once."""
    found: dict[Path, Path] = {}
    for given in dirs:
        given = Path(given)
        if not given.is_dir():
            raise SurgeryInputError(f"{given}: no such directory")
        candidates = [given] if is_night(given) else sorted(p for p in given.iterdir() if is_night(p))
        if not candidates:
            raise SurgeryInputError(
                f"{given}: no report directory here (expected {given}/<case>/{RESULTS}, "
                f"or one such directory per night inside it)"
            )
        for night in candidates:
            key = night.resolve()
            if key not in found or found[key].name == LATEST:  # prefer the dated name over the link
                found[key] = night
    return list(found.values())
