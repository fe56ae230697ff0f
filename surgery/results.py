"""Result objects and their files: ``results.json`` (versioned schema, with provenance) and per-layer CSVs."""

from __future__ import annotations

import functools
import hashlib
import json
import platform
import subprocess
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from surgery.files import strict_json, write_atomic

SCHEMA_VERSION = 2
READABLE_SCHEMAS = (1, 2)


@dataclass
class ExpectationResult:
    """One checked expectation: the unit a pytest item and a report row show."""

    name: str  # e.g. "accuracy.after_min"
    passed: bool
    observed: float | None
    threshold: float | None
    details: dict[str, Any] = field(default_factory=dict)
    message: str = ""  # one line: "observed 0.71 < after_min 0.90 (accuracy, mean of seeds 0, 1)"
    status: str = ""  # passed | failed | undecided (a claim the seeds run cannot decide)
    calibration: dict[str, Any] | None = None  # the calibrated distribution the threshold came from

    def __post_init__(self) -> None:
        if not self.status:
            self.status = "passed" if self.passed else "failed"

    @property
    def undecided(self) -> bool:
        return self.status == "undecided"


@dataclass
class CaseResult:
    """Everything a run of one case produced; ``results.json`` is this, serialised."""

    case: str
    path: str
    expectations: list[ExpectationResult] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)  # aggregated numbers (accuracy, coverage …)
    per_seed: list[dict[str, Any]] = field(default_factory=list)  # curves, accuracies, drift per seed
    record: dict[str, Any] = field(default_factory=dict)  # the surgery record of the first seed
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # per-layer rows (coverage, activations)
    description: str = ""
    provenance: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0
    schema_version: int = SCHEMA_VERSION

    # A variant case: each arm's own result (CaseResult.to_dict()), and what spans arms: per arm its spec and
    # per-seed accuracies, the paired differences of each comparison and the decided order (running.variants).
    arms: dict[str, dict[str, Any]] = field(default_factory=dict)
    variants: dict[str, Any] = field(default_factory=dict)

    calibration: str = ""  # calibrated, stale or missing, in one line
    calibration_notes: list[str] = field(default_factory=list)  # where this run's provenance differs from it
    # Seed -> the fine-tuned patient's state_dict, when the run was asked to export them (never serialised).
    patients: dict[int, dict[str, Any]] = field(default_factory=dict, repr=False, compare=False)

    @property
    def passed(self) -> bool:
        """No error and no failed expectation (undecided ones do not fail a run; they never count as held)."""
        return self.error is None and all(e.passed or e.undecided for e in self.expectations)

    @property
    def failures(self) -> list[ExpectationResult]:
        """The expectations that failed."""
        return [e for e in self.expectations if not e.passed and not e.undecided]

    @property
    def undecided(self) -> list[ExpectationResult]:
        """The claims the seeds run could not decide."""
        return [e for e in self.expectations if e.undecided]

    @property
    def verdict(self) -> str:
        """``error``, ``fail``, ``undecided`` (nothing failed, a claim undecided) or ``pass`` (every claim held)."""
        if self.error is not None:
            return "error"
        return "fail" if not self.passed else "undecided" if self.undecided else "pass"

    def _repr_html_(self) -> str:
        """The report page, for a notebook cell (Jupyter renders it inline)."""
        from surgery.report.pages import page_html  # matplotlib and jinja2 only when a notebook asks

        return page_html(self)

    def arm(self, name: str) -> "CaseResult":
        """One arm of a variant case's result, as a result of its own."""
        return CaseResult.from_dict(self.arms[name])

    def expectation(self, name: str) -> ExpectationResult | None:
        return next((e for e in self.expectations if e.name == name), None)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(replace(self, patients={}))  # weights are exported as files, never into JSON
        del out["patients"]
        out["passed"] = self.passed
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CaseResult":
        data = {k: v for k, v in data.items() if k != "passed"}
        data["expectations"] = [ExpectationResult(**e) for e in data.get("expectations", [])]
        return cls(**data)


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).resolve().parent
        )
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def provenance(*, device: str, case_hash: str, seeds: list[int]) -> dict[str, Any]:
    """Where a result came from, as pytest-benchmark records it: versions, machine, commit, case."""
    from importlib.metadata import version  # timm's version without importing timm (a second or two)

    import torch
    import torchvision

    import surgery

    return {
        "surgery": surgery.__version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": version("timm"),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "device": device,
        "cuda": torch.cuda.get_device_name() if device.startswith("cuda") else None,
        "git_commit": _git_commit(),
        "case_hash": case_hash,
        "seeds": seeds,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def safe_name(name: str) -> str:
    """A file-system-safe directory name for a case (no path separators, no traversal)."""
    clean = "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip("._") or "case"
    return clean[:80] + ("-" + hashlib.sha1(name.encode()).hexdigest()[:8] if clean != name else "")


def write_results(result: CaseResult, out_dir: str | Path) -> Path:
    """Write ``results.json`` and one CSV per table into ``out_dir`` atomically; return the JSON path."""
    import pandas as pd

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "results.json"
    text = json.dumps(strict_json(result.to_dict()), indent=1, allow_nan=False)
    write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    for name, rows in result.tables.items():
        if rows:
            frame = pd.DataFrame(rows)
            write_atomic(out_dir / f"{safe_name(name)}.csv", functools.partial(frame.to_csv, index=False))
    return path


def load_results(path: str | Path) -> CaseResult:
    """Read a ``results.json`` written by :func:`write_results`."""
    from surgery.errors import SurgeryInputError

    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SurgeryInputError(f"{path}: not a readable results file ({exc.__class__.__name__}: {exc})") from None
    if not isinstance(data, dict) or data.get("schema_version") not in READABLE_SCHEMAS:
        raise SurgeryInputError(f"{path}: expected results.json with schema_version {SCHEMA_VERSION}")
    return CaseResult.from_dict(data)
