"""Fine-tuned patients as ``.safetensors`` files that say where they came from.

``surgery run CASES --export DIR`` writes ``DIR/<case>/seed-<N>.safetensors`` per seed: the patient
after its fine-tune, weights only. The file's ``__metadata__`` (strings, as safetensors requires)
carries, under ``surgery.*`` keys:

- ``surgery.case``, ``surgery.case_path``, ``surgery.case_hash`` (the case file's), ``surgery.experiment_hash``
- ``surgery.seed``, ``surgery.commit``, ``surgery.versions`` (JSON: surgery, torch, torchvision, timm, python)
- ``surgery.verdict`` (``pass`` / ``fail`` of the whole run), ``surgery.coverage`` and ``surgery.metrics``
  (strict JSON: this seed's coverage summary and accuracies), ``surgery.format`` (this layout's version)

:func:`read_metadata` reads it back without loading a tensor; ``surgery gate`` prints it and warns
when the candidate's case differs from the case it is gated with. Files are written atomically.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn

from surgery.files import strict_json, write_atomic
from surgery.errors import SurgeryInputError
from surgery.results import CaseResult, safe_name

EXPORT_FORMAT = "1"
PREFIX = "surgery."


def patient_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of ``model``'s state_dict, contiguous and unshared, as safetensors stores it."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}


def export_metadata(result: CaseResult, seed_figures: Mapping[str, Any], *, experiment_hash: str) -> dict[str, str]:
    """The ``__metadata__`` of one seed's exported patient (every value a string)."""
    prov = result.provenance
    versions = {k: prov.get(k) for k in ("surgery", "torch", "torchvision", "timm", "python")}
    return {
        f"{PREFIX}format": EXPORT_FORMAT,
        f"{PREFIX}case": result.case,
        f"{PREFIX}case_path": result.path,
        f"{PREFIX}case_hash": str(prov.get("case_hash", "")),
        f"{PREFIX}experiment_hash": experiment_hash,
        f"{PREFIX}seed": str(seed_figures["seed"]),
        f"{PREFIX}commit": str(prov.get("git_commit") or "unknown"),
        f"{PREFIX}versions": json.dumps(strict_json(versions), sort_keys=True),
        f"{PREFIX}verdict": "pass" if result.passed else "fail",
        f"{PREFIX}coverage": json.dumps(strict_json(seed_figures.get("coverage", {})), sort_keys=True),
        f"{PREFIX}metrics": json.dumps(
            strict_json({"accuracy": seed_figures.get("accuracy", {}), "finite": seed_figures.get("finite")}),
            sort_keys=True,
        ),
    }


def export_path(out_dir: Path, case_name: str, seed: int) -> Path:
    """``out_dir/<case>/seed-<seed>.safetensors``."""
    return Path(out_dir) / safe_name(case_name) / f"seed-{seed}.safetensors"


def export_patients(
    result: CaseResult, states: Mapping[int, Mapping[str, torch.Tensor]], out_dir: Path, *, experiment_hash: str
) -> list[Path]:
    """Write each seed's patient of ``result`` under ``out_dir``; return the paths, in seed order."""
    from safetensors.torch import save_file

    def save(state: dict[str, torch.Tensor], metadata: dict[str, str], tmp: Path) -> None:
        save_file(state, str(tmp), metadata=metadata)

    paths = []
    for figures in result.per_seed:
        seed = figures["seed"]
        if seed not in states:
            continue
        path = export_path(out_dir, result.case, seed)
        meta = export_metadata(result, figures, experiment_hash=experiment_hash)
        tensors = dict(states[seed])
        write_atomic(path, functools.partial(save, tensors, meta))
        paths.append(path)
    return paths


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The ``surgery.*`` metadata of a checkpoint (JSON values decoded); ``{}`` for a file that has none.

    Only ``.safetensors`` files carry metadata; a damaged header is bad input naming the file.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        return {}
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = handle.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for damaged headers
        raise SurgeryInputError(f"checkpoint {path}: not a readable safetensors file ({exc})") from None
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if not key.startswith(PREFIX):
            continue
        name = key[len(PREFIX) :]
        if name in ("versions", "coverage", "metrics"):
            try:
                out[name] = json.loads(value)
            except ValueError:
                out[name] = value
        else:
            out[name] = value
    return out


def describe_origin(meta: Mapping[str, Any]) -> str:
    """One line on where an exported checkpoint came from, or ``""`` when it carries no metadata."""
    if not meta:
        return ""
    commit = str(meta.get("commit", "unknown"))[:12]
    return (
        f"case {meta.get('case')} (hash {meta.get('case_hash')}), seed {meta.get('seed')}, commit {commit}, "
        f"run verdict {meta.get('verdict')}"
    )
