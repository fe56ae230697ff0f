"""Nights for the history tests and benchmark, made from real runs of a tiny case.

:func:`real_runs` calibrates test_calibration's tiny case (the zoo's stem trainer, random init, transplanted
exactly into itself) fine-tuned 12 steps on 300 UCI digits at 16 px, a few seconds a seed, and runs it with
``surgery run --dated`` once per seed, so each run is a real dated report directory with its
``latest`` link. :func:`thirty_nights` then makes a history from copies of those real runs: the
seeds vary because night ``i`` is a copy of real run ``i mod len(runs)``; the provenance varies because
the copies' provenance fields are edited (the night's time and commit; torch from night 12, the CPU
capability from night 20); and what a test plants (a step, a failure) is an edit of a copy's figures.
The case hash is made equal across copies: the real runs differ in their ``seed:`` line only.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable

from surgery.nightly.nights import STAMP, point_latest
from surgery.report.render import write_index

from cli_runs import run_cli
from test_calibration import CASE as CALIBRATED_CASE

NAME = "tiny-calibrated"


def case_text(*, seed: int, drift_max: str, after_min: str) -> str:
    """test_calibration's tiny case fine-tuned 12 steps (4 barely move it), activations probed after fine-tune."""
    return (
        CALIBRATED_CASE.format(steps=12, after_min=after_min)
        .replace("seed: [0, 1]", f"seed: [{seed}]")
        .replace(
            "  accuracy:\n",
            f"  activations: {{layers: [conv1, body.3], at: finetune, drift_max: {drift_max}}}\n  accuracy:\n",
        )
    )


FIRST_NIGHT = datetime(2026, 11, 1, 3, 15, tzinfo=timezone.utc)
TORCH_FROM, CPU_FROM = 12, 20  # the nights from which the copies' provenance says another torch, another CPU
# The CPU they then name: one no x86 machine running these tests reports (naming AVX512 showed no change
# on an AVX-512 machine, whose own runs already say AVX512).
LATER_CPU = "SVE256"


def real_runs(work: Path, seeds: tuple[int, ...] = (0, 1, 2)) -> Path:
    """Calibrate the tiny case (3 seeds, native numerics, α = 0.01), then run it once per seed with
    ``--dated``: return the folder holding one real dated report directory per run (and ``latest``)."""
    calibrated = work / "calibrate" / "tiny.yaml"
    calibrated.parent.mkdir(parents=True)
    calibrated.write_text(case_text(seed=0, drift_max="calibrate", after_min="calibrate"))
    rc, out, err = run_cli(
        "calibrate", calibrated, "--seeds", "3", "--profiles", "native", "--alpha", "0.01", "--write"
    )
    assert rc == 0, out + err
    text = calibrated.read_text()
    nights = work / "nightly"
    for seed in seeds:
        case = work / f"seed{seed}" / "tiny.yaml"
        case.parent.mkdir()
        case.write_text(text.replace("seed: [0]", f"seed: [{seed}]"))
        shutil.copy(calibrated.with_name("tiny.calibration.json"), case.with_name("tiny.calibration.json"))
        rc, out, err = run_cli("run", case, "--report", nights, "--dated", "--quiet")
        assert rc == 0, out + err
    return nights


def _commit(i: int) -> str:
    return hashlib.sha1(f"night {i}".encode()).hexdigest()


def thirty_nights(
    runs: Path,
    out: Path,
    *,
    nights: int = 30,
    cases: int = 1,
    edit: Callable[[int, dict[str, Any]], None] | None = None,
) -> Path:
    """``out/<dated night>/`` × ``nights``, each a copy of a real run (round robin) with its provenance
    edited as the module says and ``edit(i, results)`` applied; an index per night, and ``out/latest``.
    ``cases > 1`` adds copies of the case under other names (``<name>-2`` …), for a suite-sized history."""
    real = sorted(p for p in runs.iterdir() if p.is_dir() and not p.is_symlink())
    case_hash = None
    night = out
    for i in range(nights):
        source = real[i % len(real)]
        created = FIRST_NIGHT + timedelta(days=i)
        night = out / created.strftime(STAMP)
        shutil.copytree(source, night)
        for n in range(2, cases + 1):
            shutil.copytree(night / NAME, night / f"{NAME}-{n}")
            file = night / f"{NAME}-{n}" / "results.json"
            file.write_text(file.read_text().replace(f'"case": "{NAME}"', f'"case": "{NAME}-{n}"', 1))
        for file in night.glob("*/results.json"):
            data = json.loads(file.read_text())
            prov = data["provenance"]
            case_hash = case_hash or prov["case_hash"]
            prov.update(created=created.isoformat(), git_commit=_commit(i), case_hash=case_hash)
            if i >= TORCH_FROM:
                prov["torch"] = "2.15.0+cu130"
            if i >= CPU_FROM:
                prov["cpu_capability"] = LATER_CPU
            if edit is not None:
                edit(i, data)
            file.write_text(json.dumps(data, indent=1))
        write_index(night)
    point_latest(night)
    return out


def expectation(data: dict[str, Any], name: str) -> dict[str, Any]:
    """The expectation ``name`` of a ``results.json`` loaded as a dict."""
    return next(e for e in data["expectations"] if e["name"] == name)
