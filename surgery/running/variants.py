"""Run a variant case: every arm on the same seeds, paired, then the comparisons between them.

An arm with a surgery runs as a case of its own (:func:`surgery.running.runner.run_seed`, which builds
its models from :func:`surgery.running.prepare.paired_init_seed`); a random arm trains the surgery's
architecture from random init, ``inits`` times per seed, and its figure is their mean. Within a seed every
arm shares the split, the batch order, the probe samples and the fresh tensors' initial values, so the
comparisons (:mod:`surgery.checks.comparisons`) are judged on per-seed differences.

The result is one :class:`~surgery.results.CaseResult`: each arm's expectations under ``ARM/name``, then the
comparisons; ``arms`` holds each arm's full result and ``variants`` what spans them.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import torch

from surgery.case import Case, CaseCalibration, case_calibration
from surgery.checks.base import Judge
from surgery.checks.comparisons import (
    arm_item,
    comparisons,
    decided_order,
    describe_order,
    evaluate_comparisons,
)
from surgery.checks.expect import evaluate_expectations, expectation_names
from surgery.results import CaseResult, ExpectationResult
from surgery.running.prepare import device_for, load_data, paired_init_seed, random_init_model
from surgery.running.runner import (
    RunOptions,
    assemble,
    case_provenance,
    case_seeds,
    check_thresholds,
    finetune_and_score,
    run_seed,
)
from surgery.train.finetune import all_finite, to_device
from surgery.train.numerics import pin_numerics


def run_random_arm(case: Case, seed: int, device: torch.device, options: RunOptions, inits: int = 1) -> dict[str, Any]:
    """One seed of a random arm (``case`` is the arm): ``inits`` random initialisations fine-tuned on the
    seed's split and batch order; ``accuracy.after`` is their mean, ``accuracy.inits`` each one's."""
    split = load_data(case, seed)
    accuracies: list[float] = []
    curves: list[list[dict[str, float]]] = []
    finite, first = True, {}
    for init in range(inits):
        model = to_device(random_init_model(case, split, paired_init_seed(seed, init)), device)
        run, accuracy = finetune_and_score(
            model,
            split,
            case.finetune,
            seed=seed,
            device=device,
            options=options,
            desc=f"{case.name} seed {seed} init {init}",
        )
        accuracies.append(accuracy)
        curves.append(run.curve)
        finite = finite and run.finite and all_finite(model)
        if init == 0:
            first = run.to_dict()
    return {
        "seed": seed,
        "accuracy": {"after": sum(accuracies) / len(accuracies), "inits": accuracies},
        "finite": finite,
        "finetune": first,
        "init_curves": curves,
    }


def _random_result(case: Case, per_seed: list[dict[str, Any]], calibration: Any, seconds: float) -> CaseResult:
    result = CaseResult(
        case=case.name, path=case.path, description=case.description, seeds=[s["seed"] for s in per_seed]
    )
    result.per_seed = per_seed
    result.calibration = calibration.status()
    result.expectations, result.metrics = evaluate_expectations(case, per_seed, record=calibration.usable)
    result.seconds = seconds
    return result


def arms_left_out(case: Case, seeds: int, record: Any, options: RunOptions) -> dict[str, str]:
    """Random arms a run of ``seeds`` seeds leaves out, with why: every comparison they take part in is a claim
    the record says these seeds cannot decide (as a single case leaves out its baseline). Calibration runs
    them all."""
    if options.calibrating:
        return {}
    judge = Judge(seeds=seeds, record=record)
    left_out = {}
    for arm, spec in (case.variants or {}).items():
        involved = [c for c in comparisons(case) if arm in c.arms]
        if (
            spec.init == "random"
            and involved
            and all(judge.foresee(c.name, c.spec.margin, "lower", c.spec.aggregate) for c in involved)
        ):
            left_out[arm] = "these seeds cannot decide any comparison with it"
    return left_out


def run_arm_seed(case: Case, arm: str, seed: int, device: torch.device, options: RunOptions) -> dict[str, Any]:
    """One seed of one arm of a variant case (a unit of work: a Ray task of its own)."""
    spec = (case.variants or {})[arm]
    if spec.init == "random":
        return run_random_arm(case.arms[arm], seed, device, options, spec.inits)
    return run_seed(case.arms[arm], seed, device, options)


def run_variant_case(case: Case, options: RunOptions) -> CaseResult:
    """Run every arm of a variant case on the same seeds, then judge its comparisons on paired differences."""
    start = time.perf_counter()
    check_thresholds(case, options)
    threads = pin_numerics(options.threads)
    device = device_for(case, options.device)
    seeds = case_seeds(case, options)
    calibration = case_calibration(case)
    left_out = arms_left_out(case, len(seeds), calibration.usable, options)
    per_arm: dict[str, list[dict[str, Any]]] = {}
    seconds: dict[str, float] = {}
    for arm in case.arms:
        if arm not in left_out:
            arm_start = time.perf_counter()
            per_arm[arm] = [run_arm_seed(case, arm, seed, device, options) for seed in seeds]
            seconds[arm] = time.perf_counter() - arm_start
    return assemble_variants(
        case,
        per_arm,
        left_out,
        provenance=case_provenance(case, seeds, device, threads),
        seconds=seconds,
        total_seconds=time.perf_counter() - start,
        calibration=calibration,
    )


def assemble_variants(
    case: Case,
    per_arm: dict[str, list[dict[str, Any]]],
    left_out: dict[str, str],
    *,
    provenance: dict[str, Any],
    seconds: dict[str, float],
    total_seconds: float,
    calibration: CaseCalibration,
) -> CaseResult:
    """The CaseResult of a variant case from each arm's :func:`run_arm_seed` dicts (in seed order): each arm
    assembled as a case of its own, then the comparisons judged. The local run and the Ray run end here."""
    arm_results: dict[str, CaseResult] = {}
    for arm, per_seed in per_arm.items():
        arm_calibration = calibration.for_arm(arm)
        if (case.variants or {})[arm].init == "random":
            arm_results[arm] = _random_result(case.arms[arm], per_seed, arm_calibration, seconds.get(arm, 0.0))
        else:
            arm_results[arm] = assemble(
                case.arms[arm],
                per_seed,
                [],
                provenance=provenance,
                seconds=seconds.get(arm, 0.0),
                calibration=arm_calibration,
            )
    seeds = [s["seed"] for s in next(iter(per_arm.values()), [])]
    figures = {
        arm: {s["seed"]: s["accuracy"].get("after") for s in result.per_seed} for arm, result in arm_results.items()
    }
    judge = Judge(seeds=len(seeds), record=calibration.usable)
    compared = evaluate_comparisons(case, figures, judge, left_out)
    result = CaseResult(
        case=case.name, path=case.path, description=case.description, seeds=seeds, provenance=dict(provenance)
    )
    result.calibration = calibration.status()
    for arm in case.arms:
        if arm in arm_results:
            result.expectations += [_as_arm_item(arm, e) for e in arm_results[arm].expectations]
        else:  # left out: its own items are undecided, never passed
            result.expectations += [
                ExpectationResult(
                    arm_item(arm, name),
                    False,
                    None,
                    None,
                    {"arm": arm},
                    f"undecided: arm {arm} was not run: {left_out[arm]}",
                    status="undecided",
                )
                for name in expectation_names(case.arms[arm])
            ]
    result.expectations += compared
    tiers = decided_order(case, compared, [arm for arm in case.arms if arm in arm_results])
    result.arms = {arm: arm_result.to_dict() for arm, arm_result in arm_results.items()}
    result.variants = {
        "arms": {
            arm: {
                "init": spec.init,
                "inits": spec.inits,
                "description": case.arms[arm].description,
                "run": arm not in left_out,
                "why_not_run": left_out.get(arm),
                "verdict": arm_results[arm].verdict if arm in arm_results else None,
            }
            for arm, spec in (case.variants or {}).items()
        },
        "after": {arm: {str(seed): value for seed, value in by_seed.items()} for arm, by_seed in figures.items()},
        "inits": {
            arm: {str(s["seed"]): s["accuracy"]["inits"] for s in r.per_seed}
            for arm, r in arm_results.items()
            if (case.variants or {})[arm].init == "random"
        },
        "order": tiers,
        "order_text": describe_order(tiers),
        "winner": tiers[0] if tiers else [],
    }
    result.metrics = {
        "accuracy_after": {arm: r.metrics.get("accuracy", {}).get("after") for arm, r in arm_results.items()}
    }
    result.seconds = total_seconds
    return result


def _as_arm_item(arm: str, result: ExpectationResult) -> ExpectationResult:
    return replace(result, name=arm_item(arm, result.name), details={**result.details, "arm": arm})


def seed_expectations(case: Case, result: CaseResult) -> dict[int, list[ExpectationResult]]:
    """Every expectation of a run judged on each seed alone (raw figures for calibration), by seed."""
    if not case.arms:
        return {s["seed"]: evaluate_expectations(case, [s])[0] for s in result.per_seed}
    out: dict[int, list[ExpectationResult]] = {seed: [] for seed in result.seeds}
    figures: dict[str, dict[int, float | None]] = {}
    for arm, arm_case in case.arms.items():
        if arm not in result.arms:
            continue
        arm_result = result.arm(arm)
        for s in arm_result.per_seed:
            out[s["seed"]] += [_as_arm_item(arm, e) for e in evaluate_expectations(arm_case, [s])[0]]
            figures.setdefault(arm, {})[s["seed"]] = s["accuracy"].get("after")
    for seed in out:
        one = {arm: {seed: by_seed.get(seed)} for arm, by_seed in figures.items()}
        out[seed] += evaluate_comparisons(case, one, Judge(seeds=1))
    return out


__all__ = [
    "arms_left_out",
    "assemble_variants",
    "run_arm_seed",
    "run_random_arm",
    "run_variant_case",
    "seed_expectations",
]
