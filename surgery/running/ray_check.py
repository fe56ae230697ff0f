"""What ``--ray`` / ``--surgery-ray`` need before a run: an address that is no path, and Ray installed.

Light on purpose: the CLI and the plugin check the option before reading the cases, and the cases before
importing anything heavy (:mod:`surgery.running.ray_runner` imports torch); Ray itself is imported by
:func:`require_ray` only, when a run asks for it.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

from surgery.errors import SurgeryInputError

INSTALL_HINT = "pip install 'surgery[ray]'"


def require_ray(option: str = "--ray") -> ModuleType:
    """The ``ray`` module; without it, bad input naming the extra to install."""
    try:
        import ray
    except ImportError:
        raise SurgeryInputError(f"{option}: Ray is not installed; install the extra: {INSTALL_HINT}") from None
    return ray


def check_address(address: str | None, option: str = "--ray") -> None:
    """An address that is a path (``--ray cases/``) took a case argument by mistake: bad input that says so."""
    if address and (Path(address).exists() or address.endswith((".yaml", ".yml"))):
        raise SurgeryInputError(
            f"{option}: {address!r} is a path, not a Ray address; put {option} after the "
            f"case files, or write {option}=ADDRESS"
        )
