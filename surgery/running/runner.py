"""Run one case: data, source, surgery, probes, fine-tune, baseline, then the expectations.

``run_single_case(case) -> CaseResult`` knows nothing of pytest or the command line: the plugin and the
CLI are thin layers over :func:`surgery.running.cases.run_case`, which runs a variant case arm by arm with
this module's parts (:mod:`surgery.running.variants`). Bad input raises :class:`SurgeryInputError`; a
failed expectation is data in the result, never an exception.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from surgery.case import Case, CaseCalibration, DistillSpec, FinetuneSpec, ModelSpec, case_calibration
from surgery.checks.accuracy import baseline_undecidable, recovery
from surgery.checks.coverage import coverage_summary, coverage_table
from surgery.checks.base import Judge, SeedContext
from surgery.checks.expect import declared_checks, evaluate_expectations, uncalibrated_fields
from surgery.data.datasets import Split
from surgery.errors import SurgeryInputError
from surgery.running.export import patient_state
from surgery.train.finetune import FinetuneResult, all_finite, evaluate, finetune, recalibrate_bn, to_device
from surgery.running.builder import weight_files, weights_digest
from surgery.train.numerics import numeric_profile, pin_numerics
from surgery.ops import get_op
from surgery.ops.record import SurgeryRecord
from surgery.running.prepare import (
    Probes,
    build_source,
    case_preprocess,
    check_patient,
    device_for,
    load_data,
    model_spec,
    paired_init_seed,
    perform_surgery,
    probe_inputs,
)
from surgery.running.preflight import baseline_model, finetune_groups, has_baseline, preflight
from surgery.results import CaseResult, provenance
from surgery.running.reuse import BASELINES, baseline_key, source_accuracy

log = logging.getLogger(__name__)


@dataclass
class RunOptions:
    """How to run a case, beyond what the case file says."""

    device: str | None = None  # overrides the case's ``device``
    max_seeds: int | None = None  # run at most this many of the case's seeds
    progress: bool | None = None  # progress bars; None = only on a terminal
    seeds: list[int] | None = None  # run exactly these seeds instead of the case's (calibration does)
    threads: int | None = None  # torch threads; None = $SURGERY_THREADS or surgery.train.numerics.DEFAULT_THREADS
    calibrating: bool = False  # thresholds may still be the ``calibrate`` placeholder
    export: bool = False  # keep each seed's fine-tuned patient (CaseResult.patients) for --export
    # evaluate every ``eval_every`` steps for the report's curve; False: only after the last step, with the same
    # figures (pytest without --surgery-report and calibration draw no curve; the strategies case spent a fifth of
    # its time at one thread on the curve's points)
    curves: bool = True


def prepare_seed(case: Case, seed: int) -> tuple[Split, nn.Module, int, nn.Module, SurgeryRecord]:
    """The seed's split, source, the source's output width, patient and surgery record, on the CPU, checked for
    every input error the models show (:func:`~surgery.running.preflight.preflight`) before any real work."""
    torch.manual_seed(seed)
    split = load_data(case, seed)
    source, source_width = build_source(case, split)
    patient, record = perform_surgery(case, source, split, init_seed=paired_init_seed(seed) if case.variant else None)
    check_patient(case, patient, split)
    preflight(case, source, source_width, patient, split)
    return split, source, source_width, patient, record


def run_seed(case: Case, seed: int, device: torch.device, options: RunOptions) -> dict[str, Any]:
    """Everything one seed of a case produces (accuracies, curves, record, probes), its baseline aside.

    The random-init baseline is :func:`run_baseline`'s, a separate unit of work (a Ray task of its own);
    :func:`assemble` puts the two together.
    """
    split, source, source_width, patient, record = prepare_seed(case, seed)
    source, patient = to_device(source, device), to_device(patient, device)
    probes = None
    if case.expect.activations is not None or case.expect.similarity is not None:
        probes = Probes(case, source, patient, probe_inputs(case, split, seed), device, seed, progress=options.progress)

    acc: dict[str, float | None] = {}
    acc["source"] = (
        source_accuracy(source, split.test_x, split.test_y, device=device, progress=options.progress)
        if source_width == split.num_classes
        else None
    )
    acc["before"] = evaluate(
        patient, split.test_x, split.test_y, device=device, progress=options.progress, desc="evaluating the patient"
    )
    if probes is not None:
        probes.probe("surgery", patient)

    # Checks that measure something of their own do it now (on copies: the patient is theirs to read only).
    context = SeedContext(
        case=case, seed=seed, split=split, source=source, patient=patient, device=device, accuracy=acc
    )
    check_figures: dict[str, dict[str, Any]] = {}
    for check, check_spec in declared_checks(case):
        figures = check.after_surgery(check_spec, context)
        if figures:
            check_figures[check.key] = dict(figures)
    if case.finetune.bn_recalibrate:
        recalibrate_bn(patient, split.train_x, device=device, batch_size=case.finetune.batch_size, seed=seed)

    spec = case.finetune.model_copy(update={"groups": finetune_groups(case, patient)})
    distill = get_op(case.surgery.op).distill(case.surgery)  # its widths: checked by preflight
    run, acc["after"] = finetune_and_score(
        patient,
        split,
        spec,
        seed=seed,
        device=device,
        options=options,
        desc=f"{case.name} seed {seed}",
        teacher=source if distill else None,
        distill=distill,
    )
    acc["recovery"] = recovery(acc["after"], acc["source"])
    finite = run.finite and all_finite(patient)
    if probes is not None:
        probes.probe("finetune", patient)
    for check, check_spec in declared_checks(case):
        figures = check.after_finetune(check_spec, context)
        if figures:
            check_figures.setdefault(check.key, {}).update(figures)

    out: dict[str, Any] = {
        "seed": seed,
        "accuracy": acc,
        "finite": finite,
        "finetune": run.to_dict(),
        "baseline_curve": None,
        "record": record.to_dict(),  # the baseline's curve: filled in by assemble()
        "coverage": coverage_summary(record),
        "data": {
            "name": split.name,
            "train": len(split.train_x),
            "test": len(split.test_x),
            "classes": split.num_classes,
            "preprocess": split.preprocess.origin,
        },
    }
    if check_figures:
        out["checks"] = check_figures
    if probes is not None:
        out["activations"] = probes.rows()
        out["histograms"] = probes.histograms()
        if maps := probes.layer_maps():
            out["layer_maps"] = maps
    if options.export:
        out["patient_state"] = patient_state(patient)
    return out


def runs_baseline(case: Case, seeds: int, calibration: CaseCalibration, options: RunOptions) -> bool:
    """Whether a run of ``seeds`` seeds trains the baselines: the case asks for them, and its fresh calibration
    does not say that ``beats_baseline`` is a claim these seeds cannot decide. Calibration always trains them."""
    if not has_baseline(case):
        return False
    judge = Judge(seeds=seeds, record=calibration.usable)
    return options.calibrating or not baseline_undecidable(case.expect.accuracy, judge)


def finetune_and_score(
    model: nn.Module,
    split: Split,
    spec: FinetuneSpec,
    *,
    seed: int,
    device: torch.device,
    options: RunOptions,
    desc: str,
    teacher: nn.Module | None = None,
    distill: DistillSpec | None = None,
) -> tuple[FinetuneResult, float]:
    """Fine-tune ``model`` in place on the seed's train split (the seed's batch order; distilled from
    ``teacher`` with ``distill``), and its accuracy on the test split after: the patient's run, a random-init
    baseline's, a variant case's random arm's."""
    run = finetune(
        model,
        split.train_x,
        split.train_y,
        split.test_x,
        split.test_y,
        spec,
        seed=seed,
        device=device,
        teacher=teacher,
        distill=distill,
        progress=options.progress,
        desc=desc,
        curve=options.curves,
    )
    return run, run.accuracy_after(model, split.test_x, split.test_y, device=device)


def run_baseline(case: Case, seed: int, device: torch.device, options: RunOptions) -> dict[str, Any]:
    """The random-init baseline of one seed, fine-tuned on the same budget: ``{seed, accuracy, curve}``.

    It depends on the seed alone (the split and the initialisation are drawn from it), so it runs
    apart from :func:`run_seed`, in any order and any process, with the same figures. A baseline
    this process trained on equal inputs for another case is reused (:mod:`surgery.running.reuse`).
    """
    torch.manual_seed(seed)
    split = load_data(case, seed)
    torch.manual_seed(seed)
    base = to_device(baseline_model(case, split), device)
    key = baseline_key(base, split, case.finetune, seed=seed, device=device, curve=options.curves)
    if (reused := BASELINES.get(key)) is not None:
        log.info("%s: baseline of seed %d reused (trained on equal inputs for an earlier case)", case.name, seed)
        return reused
    base_run, accuracy = finetune_and_score(
        base, split, case.finetune, seed=seed, device=device, options=options, desc=f"{case.name} baseline"
    )
    result = {
        "seed": seed,
        "accuracy": accuracy,
        "curve": base_run.curve,
    }
    BASELINES.put(key, result)
    return result


def model_specs(case: Case) -> list[ModelSpec]:
    """Every model spec a run of ``case`` builds: source, target or donor, and the baseline's (a variant case:
    every arm's)."""
    if case.arms:
        return [spec for arm in case.arms.values() for spec in model_specs(arm)]
    specs = [case.source] + [spec for _, spec in get_op(case.surgery.op).models(case.surgery)]
    accuracy = case.expect.accuracy
    if accuracy is not None and accuracy.beats_baseline is not None and accuracy.beats_baseline.model is not None:
        specs.append(accuracy.beats_baseline.model)
    return specs


def weight_digests(case: Case) -> dict[str, str]:
    """SHA-256 of the tensors of every weight file the case reads (zoo models included), by file path."""
    return {
        str(path): weights_digest(path) for spec in model_specs(case) for path in weight_files(model_spec(case, spec))
    }


def calibration_notes(calibration: CaseCalibration, run_provenance: dict[str, Any]) -> list[str]:
    """Where this run's numerics or weights differ from every profile of the calibration (information only)."""
    record = calibration.usable
    if record is None:
        return []
    notes = []
    profiles = record.profiles.values()
    for key in ("cpu_capability", "threads", "torch", "device_type"):
        seen = {str(p.get(key)) for p in profiles if key in p}
        if seen and str(run_provenance.get(key)) not in seen:
            notes.append(f"{key} {run_provenance.get(key)} (calibrated under {', '.join(sorted(seen))})")
    calibrated_weights = {digest for p in profiles for digest in p.get("weights", {}).values()}
    for path, digest in run_provenance.get("weights", {}).items():
        if calibrated_weights and digest not in calibrated_weights:
            notes.append(f"weights {path} (sha256 {digest[:12]}) differ from the calibration's")
    return notes


def check_thresholds(case: Case, options: RunOptions) -> None:
    """A case still holding a ``calibrate`` placeholder is bad input, unless it is being calibrated. A variant
    case's arms are checked first, each as a case of its own (its error names the arm's field)."""
    if options.calibrating:
        return
    for checked in [*case.arms.values(), case]:
        missing = uncalibrated_fields(checked)
        if missing:
            raise SurgeryInputError(
                f"{checked.where(missing[0])}: the placeholder 'calibrate' is not a threshold yet; "
                f"run `surgery calibrate {case.path} --write` first"
            )


def case_seeds(case: Case, options: RunOptions) -> list[int]:
    """The seeds a run of ``case`` uses: ``options.seeds``, else the case's, capped at ``options.max_seeds``."""
    seeds = list(options.seeds) if options.seeds else list(case.seed)
    return seeds[: options.max_seeds] if options.max_seeds else seeds


def case_provenance(case: Case, seeds: list[int], device: torch.device, threads: int) -> dict[str, Any]:
    """What the figures of a run depend on, read in the process that ran its seeds (after they ran, so the
    zoo files it read exist): versions, commit, numeric profile, threads, device, weight digests."""
    out = provenance(device=str(device), case_hash=case.file_hash, seeds=seeds)
    out.update(
        numeric_profile(),
        threads=threads,
        device_type=device.type,
        weights=weight_digests(case),
        preprocess=case_preprocess(case).to_dict(case.data.image_size),
    )
    return out


def assemble(
    case: Case,
    per_seed: list[dict[str, Any]],
    baselines: list[dict[str, Any]],
    *,
    provenance: dict[str, Any],
    seconds: float,
    calibration: CaseCalibration | None = None,
) -> CaseResult:
    """The CaseResult of a run from its parts: :func:`run_seed`'s dicts (in seed order), :func:`run_baseline`'s
    (any order; none when the case has no baseline) and :func:`case_provenance`'s. Checks the expectations
    against ``calibration`` (read from beside the case file when not given).

    The local run and the Ray run both end here, so they write the same ``results.json``.
    """
    by_seed = {b["seed"]: b for b in baselines}
    per_seed = [dict(s) for s in per_seed]  # the caller's dicts stay as they were
    patients = {s["seed"]: s.pop("patient_state") for s in per_seed if "patient_state" in s}
    for s in per_seed:
        if s["seed"] in by_seed:
            base = by_seed[s["seed"]]
            s["accuracy"] = dict(s["accuracy"], baseline=base["accuracy"])
            s["baseline_curve"] = base["curve"]
    seeds = [s["seed"] for s in per_seed]
    calibration = calibration or case_calibration(case)
    result = CaseResult(
        case=case.name,
        path=case.path,
        description=case.description,
        seeds=seeds,
        provenance=dict(provenance),
        patients=patients,
    )
    result.calibration = calibration.status()
    result.calibration_notes = calibration_notes(calibration, result.provenance)
    first = per_seed[0]
    result.record = first.pop("record")
    for extra in per_seed[1:]:
        extra.pop("record")
    result.per_seed = per_seed
    result.tables["coverage"] = coverage_table(SurgeryRecord.from_dict(result.record)).to_dict("records")
    if "activations" in first:
        result.tables["activations"] = [dict(row, seed=s["seed"]) for s in per_seed for row in s["activations"]]
    result.expectations, result.metrics = evaluate_expectations(case, per_seed, record=calibration.usable)
    result.seconds = seconds
    return result


def run_single_case(case: Case, options: RunOptions | None = None) -> CaseResult:
    """Run every seed of ``case`` (and its baselines) here, and check its expectations; a case without
    variants (:func:`surgery.running.cases.run_case` runs any case).

    Bad input raises SurgeryInputError. :mod:`surgery.running.ray_runner` runs the same parts as Ray tasks.
    """
    options = options or RunOptions()
    start = time.perf_counter()
    check_thresholds(case, options)
    threads = pin_numerics(options.threads)
    device = device_for(case, options.device)
    seeds = case_seeds(case, options)
    calibration = case_calibration(case)  # a damaged record is bad input before anything runs
    per_seed = [run_seed(case, seed, device, options) for seed in seeds]
    baselines = (
        [run_baseline(case, seed, device, options) for seed in seeds]
        if runs_baseline(case, len(seeds), calibration, options)
        else []
    )
    return assemble(
        case,
        per_seed,
        baselines,
        provenance=case_provenance(case, seeds, device, threads),
        seconds=time.perf_counter() - start,
        calibration=calibration,
    )
