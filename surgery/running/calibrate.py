"""``surgery calibrate``: run a case over many seeds and numeric profiles, and derive its thresholds.

For each case, every profile (an environment: thread count, CPU instruction set, a zoo rebuilt
under other numerics) runs in subprocesses of its own, because ``ATEN_CPU_CAPABILITY`` must be set
before torch loads; a profile that sets no more than the thread count, and needs one process, runs
in this one instead (the same figures: a run pins its thread count, and this process's is put back).
Each run of one seed yields every expectation's figure; :mod:`surgery.stats.bounds` turns the figures
into, per expectation and per seed count k (1 for CI, all of the case's seeds for the nightly run),
a prediction bound at false-alarm rate alpha. The record
(:mod:`surgery.stats.calibration`) is written beside the case; ``--write`` also puts the bounds into the
case file's calibrated thresholds (``{1: …, 3: …}`` or the ``calibrate`` placeholder), keeping its
comments and layout. Thresholds written as plain numbers are claims: they are kept, and the record
says whether the seeds can decide them.

Example::

    surgery calibrate cases/transplant --seeds 10 --write
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from surgery.files import write_atomic
from surgery.stats.bounds import (
    Calibrated,
    calibration_seeds_to_decide,
    decide,
    prediction_bound,
    rounded_bound,
    seeds_to_decide,
    seeds_to_decide_together,
)
from surgery.stats.calibration import CalibrationRecord, ItemCalibration, Rule, load_record, record_path, save_record
from surgery.case import Case, experiment_hash, load_case, threshold_range
from surgery.checks.expect import threshold_location, threshold_path
from surgery.errors import SurgeryInputError

DEFAULT_ALPHA = 0.001
DEFAULT_SEEDS = 10

# Each profile is an environment for the subprocess that runs the seeds. ``{cache}`` is the zoo cache.
PROFILES: dict[str, dict[str, str]] = {
    "native": {},
    "threads1": {"SURGERY_THREADS": "1"},
    "isa-default": {"ATEN_CPU_CAPABILITY": "default"},
    "isa-avx2": {"ATEN_CPU_CAPABILITY": "avx2"},
    # A zoo trained again with one thread, in a cache of its own: how much the source models move.
    "zoo-threads1": {
        "SURGERY_THREADS": "1",
        "SURGERY_ZOO_THREADS": "1",
        "SURGERY_CACHE": "{cache}/perturbed-zoo-threads1",
    },
}
DEFAULT_PROFILES = ("native", "threads1", "isa-default", "zoo-threads1")


def profile_env(name: str) -> dict[str, str]:
    """The environment of a profile, on top of this process's."""
    from surgery.train.zoo import cache_dir

    if name not in PROFILES:
        raise SurgeryInputError(f"--profiles: unknown profile {name!r}; expected some of: {', '.join(PROFILES)}")
    return {k: v.format(cache=cache_dir()) for k, v in PROFILES[name].items()}


def calibration_seeds(case: Case, count: int) -> list[int]:
    """The case's seeds, then fresh ones (the next integers not listed), ``count`` in all."""
    seeds = list(dict.fromkeys(case.seed))[:count]
    candidate = 0
    while len(seeds) < count:
        if candidate not in seeds:
            seeds.append(candidate)
        candidate += 1
    return seeds


# ----------------------------------------------------------------------------- one profile: subprocesses or this one


def figures_of_run(case_path: str, seeds: list[int], threads: int | None = None) -> dict[str, Any]:
    """Run ``seeds`` of a case in this process at ``threads`` (default: as a run would choose); return each
    expectation's figure per seed, and provenance."""
    from surgery.running.cases import run_case
    from surgery.running.runner import RunOptions

    from surgery.running.variants import seed_expectations

    case = load_case(case_path)
    options = RunOptions(seeds=seeds, threads=threads, progress=False, calibrating=True, curves=False)  # figures only
    result = run_case(case, options)
    figures: dict[str, dict[str, float | None]] = {}
    rules: dict[str, Rule] = {}
    for seed, items in seed_expectations(case, result).items():
        for item in items:
            if "rule" not in item.details:  # finite: a fact, not a figure with a threshold
                continue
            figures.setdefault(item.name, {})[str(seed)] = item.observed
            rules[item.name] = item.details["rule"]
    keep = (
        "cpu_capability",
        "aten_cpu_capability_env",
        "threads",
        "torch",
        "cudnn",
        "device_type",
        "weights",
        "machine",
        "python",
    )
    arm_figures = {  # a variant case: each arm's accuracy per seed, and each random init's (pairing's effect)
        arm: {
            seed: {
                "after": after,
                **({"inits": result.variants["inits"][arm][seed]} if arm in result.variants["inits"] else {}),
            }
            for seed, after in by_seed.items()
        }
        for arm, by_seed in result.variants.get("after", {}).items()
    }
    return {
        "figures": figures,
        "rules": rules,
        "arm_figures": arm_figures,
        "provenance": {k: result.provenance.get(k) for k in keep},
    }


def _runs_here(profile: str, jobs: int) -> bool:
    """Whether a profile can run in this process: one job, and nothing in its environment but the thread count
    (the instruction set must be chosen before torch loads; another zoo cache would be read by this process's
    later runs)."""
    return jobs == 1 and set(PROFILES[profile]) <= {"SURGERY_THREADS"}


def _run_profile_here(case_path: str, profile: str, seeds: list[int], threads: int) -> dict[str, Any]:
    """Run a profile's seeds in this process at ``threads``, as its subprocess would, and put this process's
    thread count back; the figures as a subprocess returns them (through JSON)."""
    from surgery.train.numerics import torch_threads

    with torch_threads(threads):
        try:
            figures = figures_of_run(case_path, seeds, threads=threads)
        except SurgeryInputError as exc:
            raise SurgeryInputError(f"{case_path}: calibration profile {profile!r}, seeds {seeds}: {exc}") from None
    return json.loads(json.dumps(figures))


def _run_profile(case_path: str, profile: str, seeds: list[int], jobs: int) -> dict[str, Any]:
    """Run a profile's seeds in ``jobs`` subprocesses; merge their figures."""
    from surgery.train.numerics import outside_xdist

    # NOTE: idle OpenMP threads sleep instead of spinning, so a 2-thread profile does not collapse when
    # something else runs beside it. This changes how threads wait, not which sums they compute.
    env = outside_xdist({**os.environ, "OMP_WAIT_POLICY": "PASSIVE", **profile_env(profile)})
    chunks = [seeds[i::jobs] for i in range(jobs) if seeds[i::jobs]]
    with tempfile.TemporaryDirectory(prefix="surgery-calibrate-") as tmp:
        procs = []
        for i, chunk in enumerate(chunks):
            out = Path(tmp) / f"{i}.json"
            cmd = [
                sys.executable,
                "-m",
                "surgery.running.calibrate",
                "--worker",
                case_path,
                "--worker-seeds",
                ",".join(map(str, chunk)),
                "--worker-out",
                str(out),
            ]
            procs.append(
                (
                    subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True),
                    out,
                    chunk,
                )
            )
        merged: dict[str, Any] = {"figures": {}, "rules": {}, "arm_figures": {}, "provenance": None}
        for proc, out, chunk in procs:
            _, err = proc.communicate()
            if proc.returncode != 0:
                last = (err.strip().splitlines() or ["no output"])[-1]
                raise SurgeryInputError(f"{case_path}: calibration profile {profile!r}, seeds {chunk}: {last}")
            part = json.loads(out.read_text(encoding="utf-8"))
            for item, per_seed in part["figures"].items():
                merged["figures"].setdefault(item, {}).update(per_seed)
            merged["rules"].update(part["rules"])
            for arm, per_seed in part.get("arm_figures", {}).items():
                merged["arm_figures"].setdefault(arm, {}).update(per_seed)
            merged["provenance"] = merged["provenance"] or part["provenance"]
    return merged


# ----------------------------------------------------------------------------- deriving thresholds


def summarise(samples: dict[str, dict[str, float | None]], rule: Rule) -> ItemCalibration | None:
    """Mean and spread of an item's figures over every run; None when fewer than two seeds gave one."""
    values = [v for per_seed in samples.values() for v in per_seed.values() if v is not None and math.isfinite(v)]
    seeds = {s for per_seed in samples.values() for s, v in per_seed.items() if v is not None and math.isfinite(v)}
    if len(seeds) < 2:
        return None
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return ItemCalibration(
        direction=rule["direction"],
        aggregate=rule["aggregate"],
        samples=samples,
        mean=mean,
        std=std,
        seeds=len(seeds),
        runs=len(values),
    )


def derive(case: Case, cal: ItemCalibration, item: str, alpha: float) -> dict[str, Any]:
    """Per seed count k: the calibrated bound, and for a claim whether k seeds decide it."""
    calibrated: Calibrated = cal.calibrated()
    counts = sorted({1, len(case.seed)})
    spec, field = threshold_location(case, item)
    raw = getattr(spec, field)
    legal = threshold_range(spec, field)
    out: dict[str, Any] = {"form": "claim" if isinstance(raw, float) else "calibrated", "bounds": {}, "vacuous": []}
    for k in counts:
        bound = prediction_bound(calibrated, alpha=alpha, k=k, direction=cal.direction, aggregate=cal.aggregate)
        clipped = legal.clip(rounded_bound(bound, cal.direction))
        out["bounds"][str(k)] = clipped
        if clipped != rounded_bound(bound, cal.direction):  # the bound lies outside what the figure can be
            out["vacuous"].append(str(k))
    if isinstance(raw, float):
        out["claim"] = raw
        out["decision"] = {
            str(k): decide(calibrated, raw, alpha=alpha, k=k, direction=cal.direction, aggregate=cal.aggregate)
            for k in counts
        }
        out["seeds_to_decide"] = seeds_to_decide(
            calibrated, raw, alpha=alpha, direction=cal.direction, aggregate=cal.aggregate
        )
        if out["seeds_to_decide"] is None and "undecided" in out["decision"].values():
            # neither more run seeds nor a larger calibration alone: both, N each
            out["seeds_to_decide_together"] = seeds_to_decide_together(
                calibrated, raw, alpha=alpha, direction=cal.direction, aggregate=cal.aggregate
            )
    return out


# ----------------------------------------------------------------------------- writing the case file


def write_thresholds(case: Case, thresholds: dict[str, dict[str, Any]]) -> list[str]:
    """Put calibrated bounds into the case file, keeping comments and layout; return the fields changed."""
    from ruamel.yaml import YAML
    from ruamel.yaml.comments import CommentedMap

    path = Path(case.path)
    yaml = YAML()  # round-trip: comments, key order, quoting and flow style survive
    yaml.preserve_quotes = True
    yaml.width = 4096
    yaml.indent(mapping=2, sequence=4, offset=2)  # block lists as the seed cases write them (``  - item``)
    document = yaml.load(path.read_text(encoding="utf-8"))
    changed = []
    for item, derived in thresholds.items():
        if derived["form"] == "claim":
            continue
        keys = threshold_path(case, item)
        node = document
        for key in keys[:-1]:
            if isinstance(key, str) and key not in node:  # an arm's first threshold of its own: make its section
                node[key] = CommentedMap()
            node = node[key]
        value = CommentedMap((int(k), v) for k, v in derived["bounds"].items())
        value.fa.set_flow_style()
        node[keys[-1]] = value
        changed.append(".".join(map(str, keys)))
    if changed:

        def dump(tmp: Path) -> None:
            with open(tmp, "w", encoding="utf-8") as fh:
                yaml.dump(document, fh)

        write_atomic(path, dump)
    return changed


# ----------------------------------------------------------------------------- the command


def _log(message: str) -> None:
    print(message, flush=True)


def calibrate_case(
    case_path: str | Path,
    *,
    seeds: int = DEFAULT_SEEDS,
    perturbed_seeds: int | None = None,
    profiles: tuple[str, ...] = DEFAULT_PROFILES,
    alpha: float = DEFAULT_ALPHA,
    write: bool = False,
    log: Callable[[str], None] = _log,
) -> CalibrationRecord:
    """Calibrate one case file: run it, derive its thresholds, write its record (and the case with ``write``)."""
    from surgery.train.numerics import cores_of_this_process, requested_threads

    case = load_case(case_path)
    if seeds < 2:
        raise SurgeryInputError("--seeds: a calibration needs at least 2 seeds")
    all_seeds = calibration_seeds(case, seeds)
    samples: dict[str, dict[str, dict[str, float | None]]] = {}
    rules: dict[str, Rule] = {}
    provenance: dict[str, dict[str, Any]] = {}
    arm_figures: dict[str, dict[str, dict[str, Any]]] = {}
    cores = cores_of_this_process()  # in a pytest-xdist worker, its share: the other workers keep theirs busy
    for profile in profiles:
        env = profile_env(profile)
        # The count a profile's runs pin, as outside xdist (its subprocesses are), whatever this process runs at.
        threads = requested_threads(int(env["SURGERY_THREADS"]) if "SURGERY_THREADS" in env else None, workers=0)
        chosen = all_seeds if profile == profiles[0] else all_seeds[: perturbed_seeds or seeds]
        jobs = max(1, min(len(chosen), cores // threads))
        start = time.perf_counter()
        if _runs_here(profile, jobs):
            merged, where = _run_profile_here(str(case.path), profile, chosen, threads), "this process"
        else:
            merged = _run_profile(str(case.path), profile, chosen, jobs)
            where = f"{jobs} process{'es' if jobs > 1 else ''}"
        log(
            f"{case.name}: profile {profile}: {len(chosen)} seed{'s' if len(chosen) > 1 else ''} in "
            f"{time.perf_counter() - start:.0f}s "
            f"({where} × {threads} thread{'s' if threads > 1 else ''})"
        )
        provenance[profile] = {**merged["provenance"], "env": env, "seeds": chosen}
        rules.update(merged["rules"])
        for item, per_seed in merged["figures"].items():
            samples.setdefault(item, {})[profile] = per_seed
        if merged["arm_figures"]:
            arm_figures[profile] = merged["arm_figures"]
    record = CalibrationRecord(
        case=case.name,
        experiment_hash=experiment_hash(case),
        alpha=alpha,
        seeds=all_seeds,
        profiles=provenance,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        arm_figures=arm_figures,
    )
    for item, per_profile in samples.items():
        cal = summarise(per_profile, rules[item])
        if cal is None:
            log(f"{case.name}: {item}: no figure from two seeds or more; not calibrated")
            continue
        record.items[item] = cal
        record.thresholds[item] = derive(case, cal, item, alpha)
    save_record(record, record_path(case.path))
    if write:
        changed = write_thresholds(case, record.thresholds)
        if changed:
            log(f"{case.path}: wrote {', '.join(changed)}")
    log(format_table(record))
    for line in pairing_lines(case, record):
        log(line)
    return record


def rederive_case(
    case_path: str | Path, *, alpha: float = DEFAULT_ALPHA, write: bool = False, log: Callable[[str], None] = _log
) -> CalibrationRecord:
    """Derive a case's thresholds and claims' decisions again from its record's samples, at ``alpha``: what a
    new alpha or a new derivation gives without running anything. The record must be fresh."""
    case = load_case(case_path)
    path = record_path(case.path)
    if not path.is_file():
        raise SurgeryInputError(f"{case.path}: no calibration record ({path}); run `surgery calibrate` first")
    record = load_record(path)
    if record.experiment_hash != experiment_hash(case):
        raise SurgeryInputError(f"{path}: stale (the case changed since); run `surgery calibrate` instead")
    record.alpha = alpha
    record.thresholds = {item: derive(case, cal, item, alpha) for item, cal in record.items.items()}
    save_record(record, path)
    if write:
        changed = write_thresholds(case, record.thresholds)
        if changed:
            log(f"{case.path}: wrote {', '.join(changed)}")
    log(format_table(record))
    return record


def pairing_lines(case: Case, record: CalibrationRecord) -> list[str]:
    """For each comparison of a variant case: the sd of its difference unpaired, paired and paired with the
    random arm's inits averaged (:func:`surgery.stats.pairing.pairing_spread`)."""
    from surgery.checks.comparisons import comparisons
    from surgery.stats.pairing import pairing_spread

    lines = []
    for comparison in comparisons(case):
        spread = pairing_spread(record.arm_figures, *comparison.arms)
        if not spread["runs"]:
            continue
        shown = {
            k: "n/a" if spread[k] is None else f"{spread[k]:.3g}" for k in ("unpaired", "paired", "paired_averaged")
        }
        averaged = (
            f", paired with the {spread['inits']} random inits averaged {shown['paired_averaged']}"
            if spread["inits"] > 1
            else ""
        )
        lines.append(
            f"{comparison.name}: sd of the difference over {spread['runs']} runs: unpaired {shown['unpaired']}, "
            f"paired {shown['paired']}{averaged}"
        )
    return lines


def format_table(record: CalibrationRecord) -> str:
    """A Markdown table of a record: per expectation, the distribution, the bounds and claims' decisions."""
    lines = [
        f"{record.case} (alpha = {record.alpha:g}; seeds {record.seeds}; profiles {', '.join(record.profiles)})",
        "| expectation | calibrated mean ± sd | runs | thresholds by seed count | claim |",
        "|---|---|---|---|---|",
    ]
    for item, derived in record.thresholds.items():
        cal = record.items[item]
        bounds = ", ".join(
            f"{k}: {v:g}{' (vacuous)' if k in derived.get('vacuous', []) else ''}" for k, v in derived["bounds"].items()
        )
        claim = ""
        if derived["form"] == "claim":
            decisions = ", ".join(f"{k} seed{'s' if k != '1' else ''} {v}" for k, v in derived["decision"].items())
            needed = derived["seeds_to_decide"]
            claim = (
                f"{derived['claim']:g}: {decisions}"
                + (f"; {needed} seeds decide it" if needed and "undecided" in decisions else "")
                + (
                    f"; seeds alone cannot decide it{_wider_calibration(cal, derived, record.alpha)}"
                    if needed is None
                    else ""
                )
            )
        spread = cal.std if cal.std > 1e-12 * max(1.0, abs(cal.mean)) else 0.0  # float noise of a constant
        lines.append(f"| {item} | {cal.mean:.4g} ± {spread:.2g} | {cal.runs} | {bounds} | {claim} |")
    return "\n".join(lines)


def _wider_calibration(cal: ItemCalibration, derived: dict[str, Any], alpha: float) -> str:
    """`` (N calibration seeds would, for one seed)`` when a larger calibration would decide a claim, else
    `` (a run of N seeds against a calibration of N would)`` when only both together would."""
    if cal.seeds < 2:
        return ""
    wanted = calibration_seeds_to_decide(
        cal.calibrated(), derived["claim"], alpha=alpha, k=1, direction=cal.direction, aggregate=cal.aggregate
    )
    if wanted:
        return f" ({wanted} calibration seeds would, for a one-seed run)"
    together = derived.get("seeds_to_decide_together")
    return f" (a run of {together} seeds against a calibration of {together} would)" if together else ""


def main(argv: list[str] | None = None) -> int:
    """The subprocess entry point of one profile (``python -m surgery.running.calibrate --worker``)."""
    parser = argparse.ArgumentParser(prog="python -m surgery.running.calibrate")
    parser.add_argument("--worker", required=True)
    parser.add_argument("--worker-seeds", required=True)
    parser.add_argument("--worker-out", required=True)
    args = parser.parse_args(argv)
    out = figures_of_run(args.worker, [int(s) for s in args.worker_seeds.split(",")])
    Path(args.worker_out).write_text(json.dumps(out), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
