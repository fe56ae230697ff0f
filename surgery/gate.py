"""The release gate: check a finished checkpoint against a case before releasing it.

``run_gate(checkpoint, case, report_dir=...)`` loads the checkpoint (weights only: a pickle that
would run code is refused and the code never runs) into the case's *target* architecture — the
patient a run of the case builds: the transplant target, the source with its activations swapped,
the host with the donor grafted in, or the bridge — and checks the expectations that apply to a
finished model, on the test split of the case's first seed:

- ``gate.accuracy``  — the checkpoint's top-1 accuracy ≥ ``expect.accuracy.after_min``;
- ``gate.recovery``  — checkpoint accuracy / source accuracy ≥ ``expect.accuracy.recovery_min``;
- ``gate.drift_max`` — worst normalised W1 of the checkpoint's activations against the source's
  (the case's reference) on the probe set < ``expect.activations.drift_max``, whatever the
  case's ``at`` says (the gate has one stage, named ``gate``);
- ``gate.dead_max``  — worst dead-channel fraction ≤ ``expect.activations.dead_max``;
- ``gate.finite``    — every floating-point weight and buffer finite, the logits on the test split
  finite, and the probed layers' activations finite (always checked, whatever the case's
  ``finite`` says). When something is not, every module is hooked for one more pass and the
  message names the first module whose output went non-finite;
- ``gate.bn_stats``  — BatchNorm running statistics sane: every ``running_var`` > 0 and finite,
  every ``running_mean`` finite, and ``num_batches_tracked`` > 0 where the checkpoint carries it
  (always checked; a model without BatchNorm passes).

Coverage, ``before_min``, ``source_min``, ``beats_baseline`` and ``bn_recalibration`` describe a
surgery or a fine-tune, not a finished model, and are not checked here. The source (built from the
case, a zoo model included) is needed for the patient's architecture and as the reference.
NOTE: the gate evaluates on the test split a run of the case's first seed uses (``data.split_seed`` honoured); a checkpoint trained
on all of the case's data is scored on images it has seen.

The verdict is written under ``report_dir`` only: the case's report (``write_case_report``)
first, then ``gate.json`` (the result, the checkpoint's path and SHA-256, ``"verdict"``), both
atomically, so a ``gate.json`` on disk always belongs to a complete gate run. Bad input (an
unreadable, truncated or unsafe file, keys that match nothing, wrong shapes) raises
:class:`SurgeryInputError` before anything is written.

Example::

    >>> verdict = run_gate(Path("model.safetensors"), load_case("cases/release.yaml"),
    ...                    report_dir=Path("out/gate"))
    >>> verdict.passed, [e.message for e in verdict.expectations if not e.passed]
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from surgery.case import Case
from surgery.checks.accuracy import aggregate, recovery
from surgery.checks.base import (at_least, at_most, below, check, fmt, resolve_threshold, worst_dead_row,
                                   worst_drift_row)
from surgery.data import Split
from surgery.finetune import predict, to_device
from surgery.models import load_state_dict_file, load_weights
from surgery._io import file_sha256, strict_json, write_atomic
from surgery.results import CaseResult, ExpectationResult, provenance
from surgery.prepare import (FORWARD_ERRORS, Probes, build, device_for, forward_error, load_data, perform_surgery,
                             probe_inputs)

__all__ = ["GATE_FILE", "run_gate", "write_verdict", "file_sha256", "bn_stats_rows", "nonfinite_weights",
           "nonfinite_outputs"]

GATE_FILE = "gate.json"
STAGE = "gate"


def _named(result: ExpectationResult, name: str) -> ExpectationResult:
    """The same result under its gate name (the message keeps the case's field, e.g. ``after_min``)."""
    return dataclasses.replace(result, name=name)


# ----------------------------------------------------------------------------- model checks


def nonfinite_weights(model: nn.Module) -> list[str]:
    """Names of the floating-point state_dict entries (weights and buffers) holding a NaN or inf."""
    return [k for k, t in model.state_dict().items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def bn_stats_rows(model: nn.Module, *, counted: set[str] | None = None) -> list[dict[str, Any]]:
    """One row per normalisation layer with running statistics: the statistics and what is wrong with them.

    ``counted``: the state_dict keys of ``num_batches_tracked`` the checkpoint carried; only those are
    required to be > 0 (a checkpoint without the counter, like torchvision's own, is not penalised).
    ``None`` checks every counter.
    """
    rows = []
    for name, m in model.named_modules():
        if not isinstance(m, nn.modules.batchnorm._NormBase) or not m.track_running_stats or m.running_var is None:
            continue
        var, mean = m.running_var.detach().float().cpu(), m.running_mean.detach().float().cpu()
        problems = []
        nonfinite_var = int((~torch.isfinite(var)).sum())
        nonpositive_var = int((var <= 0).sum())  # NaN compares False: counted once, as non-finite
        nonfinite_mean = int((~torch.isfinite(mean)).sum())
        if nonfinite_var:
            problems.append(f"running_var non-finite in {nonfinite_var} channel(s)")
        if nonpositive_var:
            problems.append(f"running_var <= 0 in {nonpositive_var} channel(s)")
        if nonfinite_mean:
            problems.append(f"running_mean non-finite in {nonfinite_mean} channel(s)")
        tracked = None
        key = f"{name}.num_batches_tracked" if name else "num_batches_tracked"
        if m.num_batches_tracked is not None:
            tracked = int(m.num_batches_tracked)
            if (counted is None or key in counted) and tracked <= 0:
                problems.append("num_batches_tracked is 0 (statistics never updated)")
        finite_var = var[torch.isfinite(var)]
        rows.append({"layer": name, "type": type(m).__name__, "channels": int(var.numel()),
                     "var_min": float(finite_var.min()) if finite_var.numel() else math.nan,
                     "var_max": float(finite_var.max()) if finite_var.numel() else math.nan,
                     "nonfinite_var": nonfinite_var, "nonpositive_var": nonpositive_var,
                     "nonfinite_mean": nonfinite_mean, "num_batches_tracked": tracked,
                     "ok": not problems, "problems": "; ".join(problems)})
    return rows


def _logits(model: nn.Module, split: Split, device: torch.device, what: str) -> torch.Tensor:
    """Logits on the test split; a forward that fails (input too small for the architecture…) is bad input."""
    try:
        return predict(model, split.test_x, device=device)
    except FORWARD_ERRORS as exc:
        raise forward_error(what, split, exc) from None


def _accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits.argmax(1) == y).float().mean())


def nonfinite_outputs(model: nn.Module, x: torch.Tensor, *, device: torch.device) -> dict[str, int]:
    """Non-finite output values per module on ``x``, innermost module first, only modules that have some.

    Every module's output is hooked (the root's as ``<output>``) and modules are listed in the order
    their forward first returned, so the first entry is where a non-finite value appeared: a NaN
    weight in ``layer2.0.conv1`` names ``layer2.0.conv1``, not ``layer2``. Counts stay on the device
    until the end (no host sync per module). A diagnostic: the gate runs it only once the logits or a
    weight were found non-finite.
    """
    names = {m: (n or "<output>") for n, m in model.named_modules()}
    counts: dict[str, torch.Tensor] = {}
    order: dict[str, None] = {}

    def hook(module: nn.Module, _args: Any, output: Any) -> None:
        name = names[module]
        order.setdefault(name)
        tensors = [output] if isinstance(output, torch.Tensor) else (
            list(output.values()) if isinstance(output, dict) else list(output) if isinstance(output, (tuple, list))
            else [])
        for t in tensors:
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                bad = (~torch.isfinite(t)).sum()
                counts[name] = counts[name] + bad if name in counts else bad

    handles = [m.register_forward_hook(hook) for m in names]
    try:
        predict(model, x, device=device)
    finally:
        for h in handles:
            h.remove()
    return {n: int(counts[n]) for n in order if n in counts and int(counts[n])}


# ----------------------------------------------------------------------------- the gate


def _expectations(case: Case, seed: int, split: Split, acc: dict[str, float | None], rows: list[dict[str, Any]],
                  bad_weights: list[str], bad_outputs: dict[str, int],
                  bn_rows: list[dict[str, Any]]) -> list[ExpectationResult]:
    out: list[ExpectationResult] = []
    expect, where_seed = case.expect, f"seed {seed}"

    def one_model(value: Any) -> float | None:  # a checkpoint is one model: the threshold for one seed
        return None if value is None else resolve_threshold(value, 1)

    spec = expect.accuracy
    after_min = one_model(spec.after_min) if spec is not None else None
    recovery_min = one_model(spec.recovery_min) if spec is not None else None
    if after_min is not None:
        out.append(_named(at_least("accuracy.after_min", acc["checkpoint"], after_min,
                                    f"checkpoint accuracy on the {split.name} test split of {len(split.test_y)}, "
                                    f"{where_seed}", {"accuracy": acc["checkpoint"]}), "gate.accuracy"))
    if recovery_min is not None:
        why = "" if acc["source"] is not None else ", the source cannot be evaluated on this data"
        out.append(_named(at_least("accuracy.recovery_min", acc["recovery"], recovery_min,
                                    f"checkpoint / source accuracy, {fmt(acc['checkpoint'])} / {fmt(acc['source'])}"
                                    f"{why}, {where_seed}", {"checkpoint": acc["checkpoint"], "source": acc["source"]}),
                          "gate.recovery"))
    act = expect.activations
    if act is not None and rows:
        per_layer = {r["layer"]: r["w1_norm"] for r in rows}
        drift_max, dead_max = one_model(act.drift_max), one_model(act.dead_max)
        if drift_max is not None:
            worst = worst_drift_row(rows)
            # Evidently's convention, as in the runner: drift is detected when the distance reaches the threshold.
            out.append(_named(below("activations.drift_max", worst["w1_norm"], drift_max,
                                     f"normalised W1, checkpoint vs source, layer {worst['layer']}, {where_seed}",
                                     {"layer": worst["layer"], "per_layer": per_layer}), "gate.drift_max"))
        if dead_max is not None:
            worst = worst_dead_row(rows)
            out.append(_named(at_most("activations.dead_max", worst["dead_channel_frac"], dead_max,
                                       f"dead-channel fraction of the checkpoint, layer {worst['layer']}, {where_seed}",
                                       {"layer": worst["layer"]}), "gate.dead_max"))

    problems = []
    if bad_weights:
        problems.append(f"{len(bad_weights)} weight tensor(s) non-finite, e.g. {bad_weights[0]}")
    if bad_outputs:
        first = next(iter(bad_outputs))
        problems.append(f"non-finite outputs of {len(bad_outputs)} module(s) on the test split, first {first}")
    probed = [r["layer"] for r in rows if r.get("nonfinite")]
    if probed and not bad_outputs:
        problems.append(f"non-finite activations in probed layer(s) {', '.join(probed[:3])}")
    where = ("; ".join(problems) if problems
             else "weights, buffers, logits and probed activations on the test split") + f", {where_seed}"
    details = {"nonfinite_weights": bad_weights[:50], "nonfinite_outputs": dict(list(bad_outputs.items())[:50]),
               "nonfinite_probed_layers": probed}
    out.append(_named(check("finite", 0.0 if problems else 1.0, 1.0, lambda o, t: o == t, "==", where, details),
                      "gate.finite"))

    bad_bn = [r for r in bn_rows if not r["ok"]]
    if bad_bn:
        where = (f"BatchNorm running statistics bad in {len(bad_bn)} of {len(bn_rows)} layer(s), e.g. "
                 f"{bad_bn[0]['layer']}: {bad_bn[0]['problems']}")
    else:
        where = (f"{len(bn_rows)} BatchNorm layer(s) checked" if bn_rows
                 else "no BatchNorm layers with running statistics")
    out.append(_named(at_most("bn_stats.bad_layers", float(len(bad_bn)), 0.0, where,
                               {"layers": len(bn_rows), "bad": {r["layer"]: r["problems"] for r in bad_bn}}),
                      "gate.bn_stats"))
    return out


def run_gate(checkpoint: Path, case: Case, *, report_dir: Path, device: str | None = None) -> CaseResult:
    """Check ``checkpoint`` against the finished-model expectations of ``case``; write the verdict.

    Returns the result (``.passed`` is the verdict). Writes ``report_dir/<case>/…`` (the case report)
    and ``report_dir/gate.json``, atomically, nothing elsewhere. Raises :class:`SurgeryInputError` on
    bad input (checkpoint, case, data, device), with nothing written.
    """
    start = time.perf_counter()
    checkpoint, report_dir = Path(checkpoint), Path(report_dir)
    dev = device_for(case, device)
    # Load first: a bad or unsafe file is refused before any model is built (weights only, no code runs).
    state = load_state_dict_file(checkpoint)
    digest = file_sha256(checkpoint)
    seed = case.seed[0]

    torch.manual_seed(seed)
    split = load_data(case, seed)  # the split a run of this seed trains and tests on (data.split_seed honoured)
    source = to_device(build(case, case.source, "source", num_classes=split.num_classes,
                             in_chans=case.data.channels).eval(), dev)
    source_logits = _logits(source, split, dev, f"source {case.source.model}")
    # The patient's architecture exactly as a run of the case builds it. The ops run on the CPU (their
    # example inputs are CPU tensors) and never modify the source.
    patient, _ = perform_surgery(case, source.cpu(), split)
    load_weights(patient, state, origin=f"checkpoint {checkpoint}")
    counted = {k for k in state if k.endswith("num_batches_tracked")}
    del state
    source, patient = to_device(source, dev), to_device(patient, dev)
    logits = _logits(patient, split, dev, f"checkpoint {checkpoint}")

    acc: dict[str, float | None] = {}
    acc["source"] = (_accuracy(source_logits, split.test_y) if source_logits.shape[-1] == split.num_classes
                     else None)
    acc["checkpoint"] = _accuracy(logits, split.test_y)
    acc["recovery"] = recovery(acc["checkpoint"], acc["source"])
    bad_weights = nonfinite_weights(patient)
    logits_finite = bool(torch.isfinite(logits).all())
    bad_outputs = nonfinite_outputs(patient, split.test_x, device=dev) if bad_weights or not logits_finite else {}
    if not logits_finite and not bad_outputs:  # the hooks saw nothing, the logits did
        bad_outputs = {"<output>": int((~torch.isfinite(logits)).sum())}
    bn_rows = bn_stats_rows(patient, counted=counted)

    rows: list[dict[str, Any]] = []
    histograms: dict[str, Any] = {}
    if case.expect.activations is not None:
        probes = Probes(case, source, patient, probe_inputs(case, split, seed), dev, seed)
        probes.probe(STAGE, patient)
        rows, histograms = probes.rows(), probes.histograms()

    expectations = _expectations(case, seed, split, acc, rows, bad_weights, bad_outputs, bn_rows)
    finite = not bad_weights and not bad_outputs and not any(r.get("nonfinite") for r in rows)
    per_seed: dict[str, Any] = {"seed": seed, "accuracy": acc, "finite": finite,
                                "data": {"name": split.name, "train": len(split.train_x), "test": len(split.test_x),
                                         "classes": split.num_classes}}
    if rows:
        per_seed["activations"], per_seed["histograms"] = rows, histograms
    prov = provenance(device=str(dev), case_hash=case.file_hash, seeds=[seed])
    prov.update({"gate": True, "checkpoint": str(checkpoint), "checkpoint_sha256": digest})
    result = CaseResult(case=case.name, path=case.path, description=case.description, seeds=[seed],
                        expectations=expectations, per_seed=[per_seed], provenance=prov,
                        metrics={"accuracy": {k: aggregate([v]) for k, v in acc.items()},
                                 "nonfinite": {"weights": len(bad_weights), "modules": len(bad_outputs)},
                                 "bn_stats": {"layers": len(bn_rows), "bad": sum(not r["ok"] for r in bn_rows)}},
                        tables={"activations": [dict(r, seed=seed) for r in rows], "bn_stats": bn_rows})
    result.seconds = time.perf_counter() - start
    write_verdict(result, report_dir, checkpoint=checkpoint, sha256=digest)
    return result


def write_verdict(result: CaseResult, report_dir: Path, *, checkpoint: Path, sha256: str) -> Path:
    """Write the HTML report, then ``report_dir/gate.json`` (strict JSON: NaN/inf become null); return its path."""
    from surgery.report.render import write_case_report

    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    write_case_report(result, report_dir)
    verdict = {**result.to_dict(), "checkpoint": str(checkpoint), "sha256": sha256,
               "verdict": "pass" if result.passed else "fail"}
    text = json.dumps(strict_json(verdict), indent=1, allow_nan=False)
    path = report_dir / GATE_FILE
    write_atomic(path, lambda tmp: tmp.write_text(text + "\n", encoding="utf-8"))
    return path
