"""The release gate: judge a release candidate against a case, and against the champion, on held-out data.

``run_gate(candidate, case, champion=..., report_dir=...)`` loads the candidate (weights only: a
pickle that would run code is refused and the code never runs) into the case's *target*
architecture — the patient a run of the case builds — and scores it on the case's **gate data**:

- ``gate: {data: holdout}`` (the default): the examples ``data.holdout`` sets aside with a fixed
  draw of their own, which no seed's train or test split contains, so no fine-tune of the case
  has seen them;
- ``gate: {data: {name: imagefolder, root: …}}``: a dataset of its own, used whole;
- no ``gate`` section: the test split of the case's first seed, as before, with a warning in the
  verdict (other seeds of the case may have trained on those examples).

Absolute checks, with the case's own calibrated thresholds for one model (one seed):

- ``gate.accuracy``  — candidate accuracy ≥ ``expect.accuracy.after_min``;
- ``gate.recovery``  — candidate accuracy / source accuracy ≥ ``expect.accuracy.recovery_min``;
- ``gate.drift_max`` — worst normalised W1 against the source (the case's reference) on the probe set
  < ``expect.activations.drift_max``; ``gate.dead_max`` — worst dead-channel fraction;
- ``gate.finite``    — weights, buffers, logits and probed activations finite (always checked; the
  message names the first module whose output went non-finite);
- ``gate.bn_stats``  — BatchNorm running statistics sane (always checked).

With a **champion** (``--champion`` or ``gate.champion``), both models predict the same gate
examples and :mod:`surgery.stats.compare` gives the accuracy difference with a paired bootstrap
interval, McNemar's exact test and the flip rate; ``gate.not_worse_than`` holds when the one-sided
lower bound of the difference at ``confidence`` is at least ``−accuracy`` (default rule: 0.01 at
0.95). The per-layer drift of the candidate against the champion is measured too (information).
The verdict passes only when every check holds. A champion of another architecture, a missing
file or an unsafe one is bad input, raised before anything is written.

An exported candidate (``surgery run --export``) carries its origin in its safetensors metadata;
the gate records it and warns when the candidate's case hash differs from the case's.

The verdict is written under ``report_dir`` only: the case's report first, then ``gate.json``
(every figure with its interval; schema: ``surgery/schemas/gate.schema.json``), both atomically.

Example::

    >>> verdict = run_gate(Path("new.safetensors"), load_case("cases/release.yaml"),
    ...                    champion=Path("released.safetensors"), report_dir=Path("out/gate"))
    >>> verdict.passed, [e.message for e in verdict.failures]
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from surgery.case import Case, NotWorseThanSpec, experiment_hash
from surgery.stats.compare import DEFAULT_RESAMPLES, PairedComparison, accuracy_interval, compare_predictions
from surgery.stats.drift import drift
from surgery.errors import SurgeryInputError
from surgery.running.export import read_metadata
from surgery.stats.activation_probe import probe_activations
from surgery.checks.accuracy import aggregate, recovery
from surgery.checks.base import at_least, at_most, below, check, fmt, resolve_threshold, worst_dead_row, worst_drift_row
from surgery.data.datasets import Split, load_eval_set
from surgery.train.finetune import predict, to_device
from surgery.data.image_cache import CachedImages, Images
from surgery.models.checkpoints import load_state_dict_file, load_weights
from surgery.files import file_sha256, strict_json, write_atomic
from surgery.results import CaseResult, ExpectationResult, provenance
from surgery.running.prepare import (
    FORWARD_ERRORS,
    Probes,
    blame,
    build,
    dataset_field,
    dataset_spec,
    device_for,
    forward_error,
    load_data,
    map_layers,
    perform_surgery,
    probe_inputs,
    probed_layers,
    resolve_relative,
)

__all__ = [
    "GATE_FILE",
    "run_gate",
    "write_verdict",
    "file_sha256",
    "bn_stats_rows",
    "nonfinite_weights",
    "nonfinite_outputs",
    "gate_schema_path",
    "gate_data",
    "GateData",
    "champion_drift",
    "origin_warnings",
]

GATE_FILE = "gate.json"
GATE_SCHEMA = 1  # the version of gate.json's layout; its JSON Schema: gate_schema_path()
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
        if not isinstance(m, nn.modules.batchnorm._NormBase) or not m.track_running_stats:
            continue
        if m.running_var is None or m.running_mean is None:  # both or neither
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
        rows.append(
            {
                "layer": name,
                "type": type(m).__name__,
                "channels": int(var.numel()),
                "var_min": float(finite_var.min()) if finite_var.numel() else math.nan,
                "var_max": float(finite_var.max()) if finite_var.numel() else math.nan,
                "nonfinite_var": nonfinite_var,
                "nonpositive_var": nonpositive_var,
                "nonfinite_mean": nonfinite_mean,
                "num_batches_tracked": tracked,
                "ok": not problems,
                "problems": "; ".join(problems),
            }
        )
    return rows


def _logits(model: nn.Module, x: Images, device: torch.device, what: str, split: Split) -> torch.Tensor:
    """Logits on ``x``; a forward that fails (input too small for the architecture…) is bad input. A long pass
    shows a progress bar on a terminal."""
    try:
        return predict(model, x, device=device, progress=None, desc=f"evaluating {what}")
    except FORWARD_ERRORS as exc:
        raise forward_error(what, split, exc) from None


def _accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits.argmax(1) == y).float().mean())


def nonfinite_outputs(model: nn.Module, x: Images, *, device: torch.device) -> dict[str, int]:
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
        tensors = (
            [output]
            if isinstance(output, torch.Tensor)
            else (
                list(output.values())
                if isinstance(output, dict)
                else list(output)
                if isinstance(output, (tuple, list))
                else []
            )
        )
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


def _expectations(
    case: Case,
    seed: int,
    data: GateData,
    acc: dict[str, float | None],
    rows: list[dict[str, Any]],
    bad_weights: list[str],
    bad_outputs: dict[str, int],
    bn_rows: list[dict[str, Any]],
) -> list[ExpectationResult]:
    out: list[ExpectationResult] = []
    expect, where_seed = case.expect, f"seed {seed}"

    def one_model(value: Any) -> float | None:  # a checkpoint is one model: the threshold for one seed
        return None if value is None else resolve_threshold(value, 1)

    spec = expect.accuracy
    after_min = one_model(spec.after_min) if spec is not None else None
    recovery_min = one_model(spec.recovery_min) if spec is not None else None
    if after_min is not None:
        out.append(
            _named(
                at_least(
                    "accuracy.after_min",
                    acc["checkpoint"],
                    after_min,
                    f"checkpoint accuracy on {data.description}, {where_seed}",
                    {"accuracy": acc["checkpoint"]},
                ),
                "gate.accuracy",
            )
        )
    if recovery_min is not None:
        why = "" if acc["source"] is not None else ", the source cannot be evaluated on this data"
        out.append(
            _named(
                at_least(
                    "accuracy.recovery_min",
                    acc["recovery"],
                    recovery_min,
                    f"checkpoint / source accuracy, {fmt(acc['checkpoint'])} / {fmt(acc['source'])}{why}, {where_seed}",
                    {"checkpoint": acc["checkpoint"], "source": acc["source"]},
                ),
                "gate.recovery",
            )
        )
    act = expect.activations
    if act is not None and rows:
        per_layer = {r["layer"]: r["w1_norm"] for r in rows}
        drift_max, dead_max = one_model(act.drift_max), one_model(act.dead_max)
        if drift_max is not None:
            worst = worst_drift_row(rows)
            # Evidently's convention, as in the runner: drift is detected when the distance reaches the threshold.
            out.append(
                _named(
                    below(
                        "activations.drift_max",
                        worst["w1_norm"],
                        drift_max,
                        f"normalised W1, checkpoint vs source, layer {worst['layer']}, {where_seed}",
                        {"layer": worst["layer"], "per_layer": per_layer},
                    ),
                    "gate.drift_max",
                )
            )
        if dead_max is not None:
            worst = worst_dead_row(rows)
            out.append(
                _named(
                    at_most(
                        "activations.dead_max",
                        worst["dead_channel_frac"],
                        dead_max,
                        f"dead-channel fraction of the checkpoint, layer {worst['layer']}, {where_seed}",
                        {"layer": worst["layer"]},
                    ),
                    "gate.dead_max",
                )
            )

    problems = []
    if bad_weights:
        problems.append(f"{len(bad_weights)} weight tensor(s) non-finite, e.g. {bad_weights[0]}")
    if bad_outputs:
        first = next(iter(bad_outputs))
        problems.append(f"non-finite outputs of {len(bad_outputs)} module(s) on the gate data, first {first}")
    probed = [r["layer"] for r in rows if r.get("nonfinite")]
    if probed and not bad_outputs:
        problems.append(f"non-finite activations in probed layer(s) {', '.join(probed[:3])}")
    where = (
        "; ".join(problems) if problems else "weights, buffers, logits on the gate data and probed activations"
    ) + f", {where_seed}"
    details = {
        "nonfinite_weights": bad_weights[:50],
        "nonfinite_outputs": dict(list(bad_outputs.items())[:50]),
        "nonfinite_probed_layers": probed,
    }
    out.append(
        _named(check("finite", 0.0 if problems else 1.0, 1.0, lambda o, t: o == t, "==", where, details), "gate.finite")
    )

    bad_bn = [r for r in bn_rows if not r["ok"]]
    if bad_bn:
        where = (
            f"BatchNorm running statistics bad in {len(bad_bn)} of {len(bn_rows)} layer(s), e.g. "
            f"{bad_bn[0]['layer']}: {bad_bn[0]['problems']}"
        )
    else:
        where = (
            f"{len(bn_rows)} BatchNorm layer(s) checked" if bn_rows else "no BatchNorm layers with running statistics"
        )
    out.append(
        _named(
            at_most(
                "bn_stats.bad_layers",
                float(len(bad_bn)),
                0.0,
                where,
                {"layers": len(bn_rows), "bad": {r["layer"]: r["problems"] for r in bad_bn}},
            ),
            "gate.bn_stats",
        )
    )
    return out


DEFAULT_RULE = NotWorseThanSpec(accuracy=0.01, confidence=0.95)  # with a champion and no rule in the case


@dataclass
class GateData:
    """The examples a gate scores on, and what they are."""

    x: torch.Tensor | CachedImages
    y: torch.Tensor
    description: str
    held_out: bool  # disjoint from every seed's train split


def gate_data(case: Case, split: Split, seed: int) -> GateData:
    """The gate's examples: the held-out part, the ``gate.data`` dataset, or (no gate section) a test split."""
    spec = case.gate
    if spec is None:
        return GateData(
            split.test_x,
            split.test_y,
            f"the {split.name} test split of seed {seed} ({len(split.test_y)} "
            "examples; no gate section, so other seeds of the case may have trained on them)",
            False,
        )
    if spec.data == "holdout":
        if split.holdout_x is None or split.holdout_y is None:  # the case asks data.holdout > 0 for this
            raise TypeError("gate.data holdout: the split holds no held-out examples")
        return GateData(
            split.holdout_x,
            split.holdout_y,
            f"{len(split.holdout_y)} held-out {split.name} examples "
            f"(data.holdout {case.data.holdout:g}, in no seed's train or test split)",
            True,
        )
    with blame(case, dataset_field("gate.data", spec.data)):
        x, y = load_eval_set(
            dataset_spec(case, spec.data),
            image_size=case.data.image_size,
            channels=case.data.channels,
            preprocess=split.preprocess,
            workers=case.data.workers,
        )
        if int(y.max()) >= split.num_classes:
            raise SurgeryInputError(
                f"{spec.data.name} has labels up to {int(y.max())} but the case's data has "
                f"{split.num_classes} classes; expected the same classes"
            )
    return GateData(x, y, f"{len(y)} examples of {spec.data.name} (gate.data, used whole)", True)


def champion_path(case: Case, override: Path | None) -> tuple[Path | None, str]:
    """The champion's file (the CLI's, else ``gate.champion`` resolved against the case) and what to blame."""
    if override is not None:
        return Path(override), "--champion"
    if case.gate is not None and case.gate.champion:
        return Path(resolve_relative(case, case.gate.champion)), case.where("gate.champion")
    return None, ""


def load_gated(path: Path, what: str = "") -> tuple[dict[str, torch.Tensor], str, dict[str, Any]]:
    """A checkpoint's state_dict (weights only), SHA-256 and export metadata; bad input names ``what`` (if given)."""
    try:
        return load_state_dict_file(path), file_sha256(path), read_metadata(path)
    except SurgeryInputError as exc:
        if not what:
            raise
        raise SurgeryInputError(f"{what}: {exc}") from None


def origin_warnings(case: Case, meta: dict[str, Any], what: str) -> list[str]:
    """Warnings about where an exported checkpoint came from, against the case it is gated with."""
    if not meta:
        return []
    warnings = []
    if meta.get("case_hash") and meta["case_hash"] != case.file_hash:
        same = meta.get("experiment_hash") == experiment_hash(case)
        warnings.append(
            f"{what} was exported from case {meta.get('case')} with hash {meta['case_hash']}, gated "
            f"with {case.path} whose hash is {case.file_hash} ("
            f"{'same experiment, other thresholds or text' if same else 'a different experiment'})"
        )
    if meta.get("verdict") == "fail":
        warnings.append(f"{what}'s own run failed an expectation (surgery.verdict = fail)")
    return warnings


def drift_layers(case: Case, model: nn.Module) -> list[str]:
    """The layers compared between candidate and champion: the case's probed layers, else its blocks."""
    return probed_layers(case, model) or map_layers(model)


def champion_drift(
    case: Case, champion: nn.Module, candidate: nn.Module, x: Images, device: torch.device, seed: int
) -> list[dict[str, Any]]:
    """Per layer, the drift of the candidate's activations against the champion's on the gate examples."""
    layers = drift_layers(case, candidate)
    if not layers:
        return []
    x = x[: case.data.probe_size]
    ref = probe_activations(champion, x, layers, device=device, seed=seed)
    pat = probe_activations(candidate, x, layers, device=device, seed=seed, edges=ref)
    return [
        {"layer": name, "w1_norm": d["wasserstein_norm"], "ks": d["ks"], "psi": d["psi"]}
        for name in layers
        for d in [drift(ref[name], pat[name])]
    ]


def not_worse_than(comparison: PairedComparison, rule_source: str) -> ExpectationResult:
    """The non-inferiority verdict as an expectation: observed = the lower bound, threshold = −margin."""
    return ExpectationResult(
        name="gate.not_worse_than",
        passed=comparison.non_inferior,
        observed=comparison.lower_bound,
        threshold=-comparison.margin,
        message=(
            f"{'non-inferior' if comparison.non_inferior else 'not shown non-inferior'} at "
            f"{comparison.confidence:g}: {comparison.summary()} ({rule_source})"
        ),
        details={"rule": {"direction": "min", "aggregate": "one model"}, **comparison.to_dict()},
    )


def run_gate(
    candidate: Path, case: Case, *, report_dir: Path, champion: Path | None = None, device: str | None = None
) -> CaseResult:
    """Judge ``candidate`` against the case's checks and, with a champion, against the champion; write the verdict.

    Returns the result (``.passed`` is the verdict; ``.provenance["gate"]`` says on what, against what,
    and with which warnings). Writes ``report_dir/<case>/…`` and ``report_dir/gate.json``, atomically,
    nothing elsewhere. Raises :class:`SurgeryInputError` on bad input (candidate, champion, case, data,
    device), with nothing written.
    """
    start = time.perf_counter()
    if case.arms:
        raise SurgeryInputError(
            f"{case.where('variants')}: a variant case compares arms; expected a case of one surgery to gate a "
            "checkpoint against (an arm's fields merged into a case of its own)"
        )
    candidate, report_dir = Path(candidate), Path(report_dir)
    dev = device_for(case, device)
    # Load first: a bad or unsafe file is refused before any model is built (weights only, no code runs).
    state, digest, meta = load_gated(candidate)
    champ_file, champ_where = champion_path(case, champion)
    champ_state = champ_digest = None
    champ_meta: dict[str, Any] = {}
    if champ_file is not None:
        champ_state, champ_digest, champ_meta = load_gated(champ_file, f"{champ_where}: champion")
    seed = case.seed[0]

    torch.manual_seed(seed)
    split = load_data(case, seed)  # the split a run of this seed uses (data.split_seed and data.holdout honoured)
    data = gate_data(case, split, seed)
    source = to_device(
        build(case, case.source, "source", num_classes=split.num_classes, in_chans=case.data.channels).eval(), dev
    )
    source_logits = _logits(source, data.x, dev, f"source {case.source.model}", split)
    # The patient's architecture exactly as a run of the case builds it. The ops run on the CPU (their
    # example inputs are CPU tensors) and never modify the source.
    patient, _ = perform_surgery(case, source.cpu(), split)
    champ_model = copy.deepcopy(patient) if champ_state is not None else None
    load_weights(patient, state, origin=f"checkpoint {candidate}")
    counted = {k for k in state if k.endswith("num_batches_tracked")}
    del state
    if champ_model is not None and champ_state is not None:  # both or neither
        load_weights(
            champ_model, champ_state, origin=f"{champ_where}: champion {champ_file} (not the candidate's architecture?)"
        )
        del champ_state
        champ_model = to_device(champ_model, dev)
    source, patient = to_device(source, dev), to_device(patient, dev)
    logits = _logits(patient, data.x, dev, f"candidate {candidate}", split)

    acc: dict[str, float | None] = {}
    acc["source"] = _accuracy(source_logits, data.y) if source_logits.shape[-1] == split.num_classes else None
    acc["checkpoint"] = _accuracy(logits, data.y)
    acc["recovery"] = recovery(acc["checkpoint"], acc["source"])
    bad_weights = nonfinite_weights(patient)
    logits_finite = bool(torch.isfinite(logits).all())
    bad_outputs = nonfinite_outputs(patient, data.x, device=dev) if bad_weights or not logits_finite else {}
    if not logits_finite and not bad_outputs:  # the hooks saw nothing, the logits did
        bad_outputs = {"<output>": int((~torch.isfinite(logits)).sum())}
    bn_rows = bn_stats_rows(patient, counted=counted)

    rows: list[dict[str, Any]] = []
    histograms: dict[str, Any] = {}
    if case.expect.activations is not None:
        probes = Probes(case, source, patient, probe_inputs(case, split, seed), dev, seed, progress=None)
        probes.probe(STAGE, patient)
        rows, histograms = probes.rows(), probes.histograms()

    expectations = _expectations(case, seed, data, acc, rows, bad_weights, bad_outputs, bn_rows)
    comparison: PairedComparison | None = None
    drift_rows: list[dict[str, Any]] = []
    if champ_model is not None:
        champ_logits = _logits(champ_model, data.x, dev, f"champion {champ_file}", split)
        rule = case.gate.not_worse_than if case.gate is not None and case.gate.not_worse_than else DEFAULT_RULE
        rule_source = (
            f"rule of {case.where('gate.not_worse_than')}"
            if case.gate is not None and case.gate.not_worse_than
            else f"the default rule: at most {DEFAULT_RULE.accuracy:g} worse at {DEFAULT_RULE.confidence:g}"
        )
        comparison = compare_predictions(
            data.y.numpy(),
            logits.argmax(1).cpu().numpy(),
            champ_logits.argmax(1).cpu().numpy(),
            confidence=rule.confidence,
            margin=rule.accuracy,
            resamples=case.gate.resamples if case.gate is not None else DEFAULT_RESAMPLES,
        )
        expectations.append(not_worse_than(comparison, rule_source))
        drift_rows = champion_drift(case, champ_model, patient, data.x, dev, seed)
    correct = (logits.argmax(1).cpu() == data.y).numpy()
    confidence = comparison.confidence if comparison is not None else DEFAULT_RULE.confidence

    warnings = origin_warnings(case, meta, "candidate") + origin_warnings(case, champ_meta, "champion")
    if not data.held_out:
        warnings.append(f"scored on {data.description}; add a gate section with data.holdout for held-out data")
    finite = not bad_weights and not bad_outputs and not any(r.get("nonfinite") for r in rows)
    per_seed: dict[str, Any] = {
        "seed": seed,
        "accuracy": acc,
        "finite": finite,
        "data": {
            "name": split.name,
            "train": len(split.train_x),
            "test": len(split.test_x),
            "gate": len(data.y),
            "classes": split.num_classes,
        },
    }
    if rows:
        per_seed["activations"], per_seed["histograms"] = rows, histograms
    prov = provenance(device=str(dev), case_hash=case.file_hash, seeds=[seed])
    prov.update(
        {
            "gate": {
                "data": data.description,
                "examples": len(data.y),
                "held_out": data.held_out,
                "warnings": warnings,
                "candidate": {"path": str(candidate), "sha256": digest, "origin": meta},
                "champion": None
                if champ_file is None
                else {"path": str(champ_file), "sha256": champ_digest, "origin": champ_meta},
                "accuracy": {
                    "value": acc["checkpoint"],
                    "confidence": confidence,
                    "interval": list(accuracy_interval(correct, confidence=confidence)),
                },
                "comparison": None if comparison is None else comparison.to_dict(),
                "champion_drift": drift_rows,
            },
            "checkpoint": str(candidate),
            "checkpoint_sha256": digest,
        }
    )
    result = CaseResult(
        case=case.name,
        path=case.path,
        description=case.description,
        seeds=[seed],
        expectations=expectations,
        per_seed=[per_seed],
        provenance=prov,
        metrics={
            "accuracy": {k: aggregate([v]) for k, v in acc.items()},
            "nonfinite": {"weights": len(bad_weights), "modules": len(bad_outputs)},
            "bn_stats": {"layers": len(bn_rows), "bad": sum(not r["ok"] for r in bn_rows)},
        },
        tables={"activations": [dict(r, seed=seed) for r in rows], "bn_stats": bn_rows, "champion_drift": drift_rows},
    )
    result.seconds = time.perf_counter() - start
    write_verdict(result, report_dir, checkpoint=candidate, sha256=digest)
    return result


def gate_schema_path() -> Path:
    """The JSON Schema of ``gate.json``, shipped in the package (``surgery/schemas/gate.schema.json``)."""
    return Path(__file__).resolve().parent.parent / "schemas" / "gate.schema.json"


def write_verdict(result: CaseResult, report_dir: Path, *, checkpoint: Path, sha256: str) -> Path:
    """Write the HTML report, then ``report_dir/gate.json`` (strict JSON: NaN/inf become null); return its path."""
    from surgery.report.render import write_case_report

    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    write_case_report(result, report_dir)
    data = result.to_dict()
    gate = data["provenance"].pop("gate", None)
    verdict = {
        "gate_schema": GATE_SCHEMA,
        **data,
        "checkpoint": str(checkpoint),
        "sha256": sha256,
        "verdict": "pass" if result.passed else "fail",
        "gate": gate,
    }
    text = json.dumps(strict_json(verdict), indent=1, allow_nan=False)
    path = report_dir / GATE_FILE
    write_atomic(path, lambda tmp: tmp.write_text(text + "\n", encoding="utf-8"))
    return path
