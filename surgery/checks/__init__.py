"""The checks of a case's ``expect`` section, one module each; importing the package registers them all.

Registration order is the order of a case's expectations (pytest items, report rows). Checks of
other packages register through the ``surgery.checks`` entry point group (see docs/extending.md).
"""

from importlib.metadata import entry_points

from surgery.checks import coverage  # noqa: F401  (each import registers its check)
from surgery.checks import accuracy  # noqa: F401
from surgery.checks import activations  # noqa: F401
from surgery.checks import bn_recalibration  # noqa: F401
from surgery.checks import similarity  # noqa: F401
from surgery.checks.base import CHECKS, Check, SeedContext, list_checks, register_check

ENTRY_POINTS = "surgery.checks"


def load_plugin_checks() -> list[str]:
    """Import every module an installed package names in the ``surgery.checks`` entry points (once each)."""
    loaded = []
    for point in entry_points(group=ENTRY_POINTS):
        point.load()
        loaded.append(point.name)
    return loaded


load_plugin_checks()

__all__ = ["CHECKS", "Check", "SeedContext", "list_checks", "register_check", "load_plugin_checks"]
