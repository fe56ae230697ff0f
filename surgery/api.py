"""The Python API: what the CLI and the pytest plugin do, as functions with keyword arguments.

Reached through the package (``surgery.run``, ``surgery.load_case`` …), which imports this module
only when one of its names is used, so ``import surgery`` costs no torch.

>>> import surgery
>>> surgery.list_ops()
['transplant', 'activation_swap', 'graft', 'bridge']
>>> case = surgery.parse_case('''
... name: doc-example
... data: {train: {name: digits, limit: 200}, image_size: 16, split_seed: 0}
... source: {model: "surgery.train.zoo:stem_trainer", num_classes: 10}
... surgery: {op: transplant, target: {model: "surgery.train.zoo:stem_trainer", num_classes: 10}}
... finetune: {steps: 2, batch_size: 16}
... expect: {coverage: {tensors_min: 1.0}}
... ''')
>>> result = surgery.run(case, device="cpu", seeds=1)
>>> result.passed, [e.name for e in result.expectations]
(True, ['coverage.tensors_min', 'finite'])
"""

from __future__ import annotations

from pathlib import Path
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn
from pydantic import ValidationError

from surgery.case import Case, ModelSpec
from surgery.stats.activation_probe import LayerStats, ProbeStats, probe_activations
from surgery.errors import SurgeryInputError
from surgery.running.release_gate import run_gate
from surgery.running.builder import build_model
from surgery.ops import list_ops as registered_ops
from surgery.report.render import write_case_report
from surgery.results import CaseResult
from surgery.running.cases import run_case
from surgery.running.runner import RunOptions
from surgery.models.recipes import ZOO


def run(
    case: Case,
    *,
    device: str | None = None,
    seeds: int | Sequence[int] | None = None,
    threads: int | None = None,
    progress: bool | None = False,
) -> CaseResult:
    """Run a case (from :func:`load_case` or :func:`parse_case`) and check its expectations.

    ``seeds``: an int runs the case's first n seeds (as ``--seeds n``); a list runs exactly those.
    ``threads`` pins torch's thread count (default ``$SURGERY_THREADS``, else 2). Bad input raises
    :class:`~surgery.errors.SurgeryInputError`; a failed expectation is data in the result
    (``result.passed``, ``result.failures``), shown as the report page in a notebook.
    """
    if isinstance(seeds, int):
        options = RunOptions(device=device, max_seeds=seeds, threads=threads, progress=progress)
    else:
        options = RunOptions(device=device, seeds=list(seeds) if seeds else None, threads=threads, progress=progress)
    return run_case(case, options)


def write_report(result: CaseResult, directory: str | Path) -> Path:
    """Write ``directory/<case>/results.json``, per-layer CSVs and ``report.html``; return the page's path."""
    return write_case_report(result, Path(directory))


def gate(
    checkpoint: str | Path,
    *,
    case: Case,
    report_dir: str | Path,
    champion: str | Path | None = None,
    device: str | None = None,
) -> CaseResult:
    """Judge a release candidate against a case (and a champion) on the case's gate data; writes the verdict.

    ``result.passed`` is the verdict; ``result.provenance["gate"]`` holds every figure with its interval
    (what ``gate.json`` holds). See :mod:`surgery.running.release_gate`.
    """
    return run_gate(
        Path(checkpoint),
        case,
        report_dir=Path(report_dir),
        device=device,
        champion=Path(champion) if champion else None,
    )


def create_model(
    model: str,
    *,
    num_classes: int | None = None,
    in_chans: int | None = None,
    checkpoint: str | None = None,
    pretrained: bool = False,
) -> nn.Module:
    """A model from a reference as a case file writes it: ``torchvision:``, ``timm:``, ``zoo:`` or a factory.

    A ``zoo:`` model is trained and cached on first use; weights never come from the network.
    """
    try:
        spec = ModelSpec(
            model=model, num_classes=num_classes, in_chans=in_chans, checkpoint=checkpoint, pretrained=pretrained
        )
    except ValidationError as exc:
        raise SurgeryInputError(f"{model}: {exc.errors()[0]['msg'].removeprefix('Value error, ')}") from None
    return build_model(spec)


def probe(
    model: nn.Module,
    inputs: Any,
    layers: Sequence[str],
    *,
    batch_size: int = 256,
    reference: Mapping[str, LayerStats] | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> ProbeStats:
    """Streamed statistics of the outputs of ``layers`` (names or globs) on ``inputs``: a tensor, a
    ``DataLoader`` (batches of images or of ``(images, labels)``) or a list of batches.

    Per layer: exact count, mean, std, min, max, near-zero and dead-channel fractions; a
    uniform sample of 16,384 values and a histogram counted on it; memory that does not grow
    with the inputs, and a cost within about 10% of a bare forward (see docs/performance.md,
    the probe rows). With ``reference`` (another probe's result for the same layer names)
    the histograms use the reference's bins, so :func:`surgery.drift_table` compares
    the two::

        ref = surgery.probe(source, x, ["layer?"])
        pat = surgery.probe(patient, x, ["layer?"], reference=ref)
        surgery.drift_table(ref, pat)      # pandas.DataFrame, one row per layer
    """
    return probe_activations(model, inputs, layers, batch_size=batch_size, device=device, edges=reference, seed=seed)


def list_ops() -> list[str]:
    """The surgery operations a case can name in ``surgery.op``."""
    return registered_ops()


def list_models(kind: str = "zoo") -> list[str]:
    """Model references of one kind: ``zoo`` (trained here), ``torchvision`` or ``timm``."""
    if kind == "zoo":
        return [f"zoo:{name}" for name in ZOO]
    if kind == "torchvision":
        import torchvision

        return [f"torchvision:{name}" for name in torchvision.models.list_models()]
    if kind == "timm":
        import timm

        return [f"timm:{name}" for name in timm.list_models()]
    raise SurgeryInputError(f"list_models: unknown kind {kind!r}; expected zoo, torchvision or timm")


__all__ = ["run", "write_report", "gate", "create_model", "probe", "list_ops", "list_models"]
