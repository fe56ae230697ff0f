"""The names ``torchvision:NAME`` and ``timm:NAME`` accept, known without importing torchvision or timm.

Importing either takes seconds, and a case file is checked in well under one (issue 30). So the names are
shipped with the package in ``model_names.json``, with the versions they were listed from; when the
installed version is another, the library itself is asked (imported) instead, so a list never goes stale
silently. ``python -m surgery.models.model_names`` rewrites the list from the installed libraries, and a test
compares the two.
"""

from __future__ import annotations

import json
import sys
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Literal

Library = Literal["torchvision", "timm"]
LIBRARIES: tuple[Library, ...] = ("torchvision", "timm")
NAMES_FILE = Path(__file__).with_name("model_names.json")


def installed_version(library: Library) -> str | None:
    """The installed distribution's version without its local part (``0.29.1+cu130`` -> ``0.29.1``)."""
    try:
        return version(library).split("+", 1)[0]
    except PackageNotFoundError:
        return None


def listed_names(library: Library) -> list[str]:
    """What the installed library lists, asking it: ``torchvision.models.list_models()``, ``timm.list_models()``."""
    # Imported here, not at the top: seconds each, and only needed when the shipped list does not apply.
    if library == "torchvision":
        import torchvision

        return sorted(torchvision.models.list_models())
    import timm

    return sorted(timm.list_models())


@lru_cache(maxsize=None)
def known_names(library: Library) -> frozenset[str]:
    """The model names of ``library``: the shipped list when it was made from the installed version."""
    shipped = json.loads(NAMES_FILE.read_text(encoding="utf-8")).get(library, {})
    if shipped.get("version") is not None and shipped.get("version") == installed_version(library):
        return frozenset(shipped["names"])
    return frozenset(listed_names(library))


def generate() -> dict[str, Any]:
    """The content of ``model_names.json`` for the installed libraries."""
    return {library: {"version": installed_version(library), "names": listed_names(library)} for library in LIBRARIES}


def main() -> int:
    """Rewrite ``model_names.json`` from the installed torchvision and timm."""
    content = generate()
    NAMES_FILE.write_text(json.dumps(content, indent=0) + "\n", encoding="utf-8")
    print(
        f"{NAMES_FILE}: "
        + ", ".join(f"{lib} {entry['version']} ({len(entry['names'])} names)" for lib, entry in content.items())
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
