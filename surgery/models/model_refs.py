"""Model references as a case file writes them: ``torchvision:NAME``, ``timm:NAME``, ``zoo:NAME``,
``package.module:factory``. Building one is :mod:`surgery.running.builder`'s job.

Checking one has two stages, so that a case file is checked without importing torch (issue 30):
:func:`validate_model_ref` imports nothing (torchvision's and timm's names come from
:mod:`surgery.models.model_names`; a factory ref is checked for its syntax and the trust rules), and
:func:`resolve_factory` imports a factory's module and checks the factory, before anything heavy runs.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import sys
from typing import Any

from surgery.errors import first_line
from surgery.models.model_names import known_names
from surgery.models.recipes import ZOO

LIBRARY_KINDS = ("torchvision", "timm", "zoo")  # the prefixes that name no factory


def is_factory_ref(ref: str) -> bool:
    """Whether ``ref`` is a ``package.module:factory`` reference (not one of :data:`LIBRARY_KINDS`)."""
    return ref.partition(":")[0] not in LIBRARY_KINDS


def _suggest(name: str, known: Any) -> str:
    close = difflib.get_close_matches(name, list(known), n=3, cutoff=0.6)
    return f"; did you mean {', '.join(close)}?" if close else ""


def validate_model_ref(ref: str) -> None:
    """Raise ValueError (for the case schema) when ``ref`` names no model this harness can build.

    Imports nothing: a ``package.module:factory`` ref is checked for its syntax and the trust rules only
    (:func:`refuse_untrusted`); :func:`resolve_factory` imports it and checks the factory.
    """
    kind, sep, name = ref.partition(":")
    if not sep or not name:
        raise ValueError(f"model {ref!r}: expected torchvision:NAME, timm:NAME, zoo:NAME or package.module:factory")
    if kind == "torchvision":
        if name not in known_names("torchvision"):
            hint = _suggest(name, known_names("torchvision")) or "; expected a name in torchvision.models.list_models()"
            raise ValueError(f"unknown torchvision model {name!r}{hint}")
    elif kind == "timm":
        arch = name.split(".", 1)[0]  # timm.is_model's rule: a pretrained tag (resnet50.a1_in1k) is not checked
        if arch not in known_names("timm"):
            hint = _suggest(name, known_names("timm")) or "; expected a name in timm.list_models()"
            raise ValueError(f"unknown timm model {name!r}{hint}")
    elif kind == "zoo":
        if name not in ZOO:
            hint = _suggest(name, ZOO) or ";"
            raise ValueError(f"unknown zoo model {name!r}{hint} expected one of: {', '.join(ZOO)}")
    elif not all(part.isidentifier() for part in kind.split(".")) or not name.isidentifier():
        raise ValueError(f"model {ref!r}: expected torchvision:NAME, timm:NAME, zoo:NAME or package.module:factory")
    else:
        refuse_untrusted(ref)


# What an error calls a reference of each kind: (what it is not, what was expected instead).
REFERENCE_KINDS = {
    "model": ("a model factory", "package.module:factory", "a package.module:factory of your own"),
    "dataset": ("a dataset", "package.module:Name", "a package.module:Name such as torchvision.datasets:CIFAR10"),
}


def refuse_untrusted(ref: str, what: str = "model") -> None:
    """Refuse (ValueError) a ``package.module:factory`` ref to a private name, or to a module of the standard
    library or ``builtins``: no model factory (or dataset, ``what="dataset"``) is there. Imports nothing."""
    kind, public, own = REFERENCE_KINDS[what]
    module_name, _, name = ref.partition(":")
    parts = module_name.split(".")
    private = next((part for part in [*parts, name] if part.startswith("_")), None)
    if private is not None:
        raise ValueError(f"{what} {ref!r}: {private!r} is a private name; expected a public {public}")
    if parts[0] in sys.stdlib_module_names or parts[0] in sys.builtin_module_names:
        raise ValueError(
            f"{what} {ref!r}: {parts[0]!r} is a module of the standard library, not {kind}; expected {own}"
        )


def resolve_factory(ref: str, what: str = "model") -> Any:
    """The class or function a ``package.module:factory`` ref names, refused (ValueError) unless safe to call.

    A case file is code (see docs/safety.md, Trust model), yet a ref may not reach what no model factory is:
    a module of the standard library or ``builtins`` and private names are refused before anything is
    imported (:func:`refuse_untrusted`); otherwise the named module is imported (only it and its parents)
    and the factory must be a class or a function defined in that module or one of its submodules, not one
    it imports from elsewhere. Nothing is called. ``what`` names the kind of reference in errors
    (``model``, ``dataset``): a dataset reference follows the same rules.
    """
    refuse_untrusted(ref, what)
    module_name, _, name = ref.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or whatever the module's own code raised on import
        raise ValueError(f"{what} {ref!r}: cannot import {module_name!r} ({first_line(exc)})") from None
    factory = module.__dict__.get(name)
    if factory is None:
        raise ValueError(f"{what} {ref!r}: cannot import {name!r} from {module_name!r}: no such name")
    if not (inspect.isclass(factory) or inspect.isfunction(factory)):
        raise ValueError(
            f"{what} {ref!r}: {name} is a {type(factory).__name__}, expected a factory "
            f"(a class or function defined in {module_name})"
        )
    # NOTE: a package's public re-export of its own code counts (torch.nn:Identity lives in
    # torch.nn.modules.linear, torchvision.models:resnet18 in torchvision.models.resnet); an import
    # from elsewhere (a module re-exporting os.system) does not.
    defined_in = getattr(factory, "__module__", None) or ""
    if defined_in != module_name and not defined_in.startswith(module_name + "."):
        raise ValueError(
            f"{what} {ref!r}: {name} is defined in {defined_in!r}, not in {module_name!r} or "
            f"its submodules; expected a factory defined in the package named"
        )
    return factory
