"""surgery: verify model surgery — moving trained weights across architectures.

The public API, loaded lazily (PEP 562): ``import surgery`` imports no torch (pytest imports the
package in every session through the plugin); the first use of a name imports its module.

>>> import surgery
>>> case = surgery.load_case("cases/transplant/resnet50-to-resnet18-strategies.yaml")  # doctest: +SKIP
>>> result = surgery.run(case, device="cpu", seeds=1)                              # doctest: +SKIP
>>> result.passed, [e.message for e in result.failures]                            # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "load_case": "surgery.case",
    "parse_case": "surgery.case",
    "Case": "surgery.case",
    "run": "surgery.api",
    "write_report": "surgery.api",
    "gate": "surgery.api",
    "create_model": "surgery.api",
    "probe": "surgery.api",
    "list_ops": "surgery.api",
    "list_models": "surgery.api",
    "ProbeStats": "surgery.stats.activation_probe",
    "LayerStats": "surgery.stats.activation_probe",
    "drift_table": "surgery.stats.drift",
    "transplant": "surgery.ops.transplant",
    "activation_swap": "surgery.ops.activation",
    "graft": "surgery.ops.graft",
    "bridge": "surgery.ops.bridge",
    "CaseResult": "surgery.results",
    "ExpectationResult": "surgery.results",
    "SurgeryInputError": "surgery.errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'surgery' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
