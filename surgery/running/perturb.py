"""The perturbation matrix: the CI seed of every case under several numeric profiles, as one table.

``python -m surgery.running.perturb cases`` (``make perturb``) runs ``surgery run CASES --seeds 1`` once per
profile (native; 1 thread; ``ATEN_CPU_CAPABILITY=default``; 1 thread with a fresh zoo cache, so the
zoo is rebuilt under other numerics), each in its own process, then prints one row per case and
one column per profile. Exit 0 when no expectation failed anywhere: calibrated thresholds are meant
to hold under exactly these perturbations.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from surgery.running.calibrate import profile_env

MATRIX = ("native", "threads1", "isa-default", "zoo-fresh-threads1")


def matrix_env(profile: str, fresh_cache: Path) -> dict[str, str]:
    """The environment of one column; ``zoo-fresh-threads1`` points the zoo cache at ``fresh_cache``."""
    if profile == "zoo-fresh-threads1":
        return {"SURGERY_THREADS": "1", "SURGERY_ZOO_THREADS": "1", "SURGERY_CACHE": str(fresh_cache)}
    return profile_env(profile)


def cell(results: dict) -> str:
    """``ok 4/4`` or ``FAIL accuracy.after_min …``, with undecided items counted."""
    items = results["expectations"]
    failed = [e["name"] for e in items if e.get("status", "passed" if e["passed"] else "failed") == "failed"]
    undecided = sum(1 for e in items if e.get("status") == "undecided")
    held = sum(1 for e in items if e["passed"])
    extra = f", {undecided} undecided" if undecided else ""
    return f"FAIL {', '.join(failed)}" if failed else f"ok {held}/{len(items)}{extra}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m surgery.running.perturb", description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="+")
    parser.add_argument("--report", default="reports/perturb", help="one report directory per profile here")
    parser.add_argument("--profiles", default=",".join(MATRIX))
    args = parser.parse_args(argv)
    profiles = [p for p in args.profiles.split(",") if p]
    table: dict[str, dict[str, str]] = {}
    failed = False
    with tempfile.TemporaryDirectory(prefix="surgery-fresh-zoo-") as fresh:
        for profile in profiles:
            out = Path(args.report) / profile
            env = {**os.environ, **matrix_env(profile, Path(fresh))}
            print(
                f"== {profile}: {' '.join(f'{k}={v}' for k, v in matrix_env(profile, Path(fresh)).items()) or '-'}",
                flush=True,
            )
            proc = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "surgery.cli",
                    "run",
                    *args.cases,
                    "--seeds",
                    "1",
                    "--quiet",
                    "--report",
                    str(out),
                ],
                env=env,
            )
            failed |= proc.returncode != 0
            for path in sorted(out.glob("*/results.json")):
                results = json.loads(path.read_text(encoding="utf-8"))
                table.setdefault(results["case"], {})[profile] = cell(results)
    print()
    print("| case | " + " | ".join(profiles) + " |")
    print("|---|" + "---|" * len(profiles))
    for case, row in sorted(table.items()):
        print(f"| {case} | " + " | ".join(row.get(p, "no result") for p in profiles) + " |")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
