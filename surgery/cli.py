"""The ``surgery`` command: run, gate, report, zoo, inspect.

Exit codes: 0 every expectation holds, 1 an expectation failed, 2 bad input (one line on stderr),
3 an internal error (a bug, or the environment failing: disk full …).
"""

from __future__ import annotations

import argparse
import enum
import os
import sys
from pathlib import Path
from typing import Any, Iterator, Sequence

from surgery.nightly import nights
from surgery.errors import SurgeryInputError


LOCAL_CLUSTER = "local"  # `--ray` without an address: start a cluster on this machine


class ExitCode(enum.IntEnum):
    """The exit codes of every ``surgery`` command."""

    OK = 0  # every expectation held (undecided claims listed, not counted as held)
    FAILED = 1  # an expectation failed
    BAD_INPUT = 2  # a case, model, checkpoint, data or device that cannot be used: one line on stderr
    INTERNAL = 3  # a bug, or the environment failing (disk full ...)
    INTERRUPTED = 130  # Ctrl-C


def _print_result(result, report: Path | None) -> None:
    passed = sum(e.passed for e in result.expectations)
    status = "PASS" if result.passed else "FAIL"
    undecided = f", {len(result.undecided)} undecided" if result.undecided else ""
    print(
        f"{status} {result.case}: {passed}/{len(result.expectations)} expectations held{undecided} "
        f"({result.seconds:.1f}s){f' -> {report}' if report else ''}"
    )
    if result.variants:  # a variant case: the arms in the order its comparisons decided
        print(f"    order: {result.variants['order_text']} (an arm stands above another only where a claim held)")
    for e in result.expectations:
        if not e.passed:
            print(f"    {e.name}: {e.message}")
    for note in result.calibration_notes:
        print(f"    note: differs from the calibration: {note}")


def _run_locally(cases: list[Any], options: Any) -> Iterator[tuple[Any, Any]]:
    """Each case with its outcome, run in this process: a CaseResult, or the SurgeryInputError that stopped it.

    The cases after the first are checked before the first runs (their models built, nothing trained), so
    their input errors come first, in seconds; the first case finds its own first thing when it runs."""
    from surgery.running.cases import check_case, run_case

    runnable = cases[:1]
    for case in cases[1:]:
        try:
            check_case(case, options)
            runnable.append(case)
        except SurgeryInputError as exc:  # this case cannot run; the others still do
            yield case, exc
    for case in runnable:
        try:
            yield case, run_case(case, options)
        except SurgeryInputError as exc:
            yield case, exc


def cmd_run(args: argparse.Namespace) -> int:
    from surgery.case import find_cases, load_cases
    from surgery.running.ray_check import check_address, require_ray

    if args.ray is not None:  # before the cases: an address that is a path took a case argument
        check_address(None if args.ray == LOCAL_CLUSTER else args.ray)
    paths = find_cases(args.cases)
    if not paths:
        raise SurgeryInputError(f"no case files (*.yaml) found in {' '.join(args.cases)}")
    cases = load_cases(paths)  # every file is validated before anything heavy is imported, let alone run
    if args.skip_slow:
        slow = [case.name for case in cases if "slow" in case.markers]
        cases = [case for case in cases if "slow" not in case.markers]
        if slow:
            print(f"left out {len(slow)} case(s) marked slow (--skip-slow): {', '.join(slow)}")
        if not cases:
            raise SurgeryInputError(
                f"every case in {' '.join(args.cases)} is marked slow, and --skip-slow leaves them out"
            )
    if args.ray is not None:  # without Ray installed this is one line, exit 2
        require_ray()
    # Imported once the cases are known to be good: the runner imports torch, the report matplotlib (seconds).
    from surgery.report.render import write_case_report, write_index
    from surgery.running.runner import RunOptions

    options = RunOptions(
        device=args.device,
        max_seeds=args.seeds,
        progress=None if not args.quiet else False,
        threads=args.threads,
        export=args.export is not None,
    )
    if args.ray is not None:
        from surgery.running.ray_runner import RayOptions, run_cases_on_ray

        outcomes = run_cases_on_ray(
            cases,
            options,
            RayOptions(
                address=None if args.ray == LOCAL_CLUSTER else args.ray,
                weights=args.ray_weights,
                progress=False if args.quiet else None,
            ),
        )
    else:
        outcomes = _run_locally(cases, options)
    report = nights.new_dated_dir(args.report) if args.dated else Path(args.report)  # --dated: one folder a run
    failed = bad = internal = False
    ran = 0
    for case, outcome in outcomes:
        if isinstance(outcome, SurgeryInputError):
            message = str(outcome) if str(outcome).startswith(case.path) else f"{case.path}: {outcome}"
            print(f"surgery: error: {message}", file=sys.stderr)
            bad = True
            continue
        if isinstance(outcome, Exception):  # a task's internal error (Ray): reported, and the other cases go on
            detail = getattr(outcome, "remote_traceback", "") if os.environ.get("SURGERY_DEBUG") else ""
            print(
                f"{detail}surgery: internal error: {case.path}: {outcome} (set SURGERY_DEBUG=1 for the traceback)",
                file=sys.stderr,
            )
            internal = True
            continue
        _print_result(outcome, write_case_report(outcome, report))
        if args.export is not None:
            from surgery.case import experiment_hash
            from surgery.running.export import export_patients

            for path in export_patients(
                outcome, outcome.patients, Path(args.export), experiment_hash=experiment_hash(case)
            ):
                print(f"    exported {path}")
        failed |= not outcome.passed
        ran += 1
    if ran:
        print(f"index: {write_index(report)}")
        if args.dated and nights.point_latest(report):
            print(f"latest: {report.parent / nights.LATEST} -> {report.name}")
    elif args.dated:
        report.rmdir()  # nothing was written: no empty night
    return ExitCode.INTERNAL if internal else ExitCode.BAD_INPUT if bad else ExitCode.FAILED if failed else ExitCode.OK


def cmd_calibrate(args: argparse.Namespace) -> int:
    from surgery.running.calibrate import calibrate_case, format_table, pairing_lines, rederive_case
    from surgery.stats.calibration import load_record, record_path
    from surgery.case import check_factories, find_cases, load_case

    paths = find_cases(args.cases)
    if not paths:
        raise SurgeryInputError(f"no case files (*.yaml) found in {' '.join(args.cases)}")
    cases = [load_case(path) for path in paths]  # every file is validated before anything runs
    if args.show:
        for path, case in zip(paths, cases):
            record_file = record_path(path)
            if not record_file.is_file():
                raise SurgeryInputError(f"{path}: no calibration record ({record_file}); run without --show first")
            record = load_record(record_file)
            print("\n".join([format_table(record), *pairing_lines(case, record)]) + "\n")
        return ExitCode.OK
    if not 0 < args.alpha < 1:
        raise SurgeryInputError(f"--alpha: got {args.alpha}; expected a false-alarm rate in (0, 1), e.g. 0.001")
    if args.rederive:
        for path in paths:
            rederive_case(path, alpha=args.alpha, write=args.write)
        return ExitCode.OK
    profiles = tuple(p.strip() for p in args.profiles.split(",") if p.strip())
    for case in cases:
        check_factories(case)
    from surgery.running.cases import check_case

    for case in cases:  # every case's models before the first calibration (minutes a case)
        check_case(case)
    for path in paths:
        calibrate_case(
            path,
            seeds=args.seeds,
            perturbed_seeds=args.perturbed_seeds,
            profiles=profiles,
            alpha=args.alpha,
            write=args.write,
        )
    return ExitCode.OK


def cmd_gate(args: argparse.Namespace) -> int:
    from surgery.case import load_cases

    case = load_cases([args.case])[0]
    # Imported once the case is known to be good: they import torch (seconds).
    from surgery.running.release_gate import run_gate
    from surgery.train.numerics import pin_numerics

    pin_numerics(args.threads)
    verdict = run_gate(
        Path(args.checkpoint),
        case,
        report_dir=Path(args.report),
        device=args.device,
        champion=Path(args.champion) if args.champion else None,
    )
    _print_gate_context(verdict.provenance["gate"])
    _print_result(verdict, Path(args.report))
    return ExitCode.OK if verdict.passed else ExitCode.FAILED


def _print_gate_context(gate: dict[str, Any]) -> None:
    """Where the candidate (and champion) came from, what they were scored on, and any warnings."""
    from surgery.running.export import describe_origin

    for role in ("candidate", "champion"):
        entry = gate.get(role)
        if entry:
            origin = describe_origin(entry["origin"]) or "no surgery metadata"
            print(f"{role}: {entry['path']} (sha256 {entry['sha256'][:12]}): {origin}")
    acc = gate["accuracy"]
    lo, hi = acc["interval"]
    print(f"scored on {gate['data']}: accuracy {acc['value']:.4f} [{lo:.4f}, {hi:.4f}]")
    for warning in gate["warnings"]:
        print(f"surgery: warning: {warning}", file=sys.stderr)


def cmd_report(args: argparse.Namespace) -> int:
    from surgery.results import load_results

    result = load_results(args.results)
    other = load_results(args.compare) if args.compare else None
    from surgery.report.render import render_report  # once the results are read: matplotlib takes a second

    out = Path(args.output) if args.output else Path(args.results).with_name("compare.html" if other else "report.html")
    render_report(result, out, compare=other)
    print(out)
    return ExitCode.OK


def cmd_summary(args: argparse.Namespace) -> int:
    if not Path(args.report_dir).is_dir():
        raise SurgeryInputError(f"{args.report_dir}: no such report directory")
    from surgery.report.render import summary_table  # once the directory is known: matplotlib takes a second

    print(summary_table(Path(args.report_dir)))
    return ExitCode.OK


def cmd_history(args: argparse.Namespace) -> int:
    nights.find_nights(args.dirs)  # bad directories are one line before scipy and matplotlib load (seconds)
    from surgery.nightly.history import read_history
    from surgery.report.history import write_history

    history = read_history(args.dirs, window=args.window, p_max=args.p)
    out = Path(args.output) if args.output else Path(args.dirs[0] if len(args.dirs) == 1 else ".") / "history.html"
    print(write_history(history, out))
    for series in history.series:
        if series.flags:
            print(f"    {series.case}: {series.name}: {', '.join(series.flags)}")
    return ExitCode.OK


def cmd_zoo(args: argparse.Namespace) -> int:
    from surgery.train import zoo

    if args.action == "build":
        names = args.names or list(zoo.ZOO)
        for name in names:
            path = zoo.build(name, progress=None)
            meta = zoo.metadata(name)
            if meta is None:  # build() has just written the file
                raise TypeError(f"zoo:{name}: no cached model after the build")
            print(f"{name}: test accuracy {meta['test_accuracy']:.4f} ({path})")
        return ExitCode.OK
    rows = zoo.status()
    print(f"{'name':<18} {'architecture':<22} {'dataset':<9} {'test acc':>8}  cached")
    for r in rows:
        acc = f"{r['test_accuracy']:.4f}" if r["test_accuracy"] is not None else "-"
        print(f"{r['name']:<18} {r['arch']:<22} {r['dataset']:<9} {acc:>8}  {'yes' if r['cached'] else 'no'}")
    print(f"cache: {zoo.cache_dir()}")
    return ExitCode.OK


def cmd_data(args: argparse.Namespace) -> int:
    from surgery.synthetic import folder_bytes, write_shapes_folder

    if args.count < 10 or args.size < 8:
        raise SurgeryInputError(
            f"data synth: --count {args.count} --size {args.size}; expected at least 10 images of at least 8 px"
        )
    root = write_shapes_folder(args.out, count=args.count, size=args.size, seed=args.seed)
    print(f"{root}: {args.count} JPEG images of {args.size} px in 5 class folders ({folder_bytes(root) / 1e6:.1f} MB)")
    return ExitCode.OK


def cmd_inspect(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from surgery.case import ModelSpec
    from surgery.running.builder import build_model
    from surgery.ops.bridge import list_feature_nodes

    try:
        spec = ModelSpec(model=args.model, num_classes=args.num_classes, checkpoint=args.checkpoint)
    except ValidationError as exc:
        raise SurgeryInputError(f"{args.model}: {exc.errors()[0]['msg'].removeprefix('Value error, ')}") from None
    model = build_model(spec)
    print(f"# modules and parameter shapes of {args.model}")
    for name, module in model.named_modules():
        if not name:
            continue
        shapes = ", ".join(f"{p}={list(t.shape)}" for p, t in module.named_parameters(recurse=False))
        print(f"{name:<40} {type(module).__name__:<18} {shapes}")
    print("# graph nodes usable by bridge (surgery.op: bridge, nodes: [...])")
    for node in list_feature_nodes(model):
        print(node)
    return ExitCode.OK


def cmd_schema(args: argparse.Namespace) -> int:
    import importlib
    import json

    for module in args.imports:  # a check registered by importing its module (entry points load by themselves)
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise SurgeryInputError(f"schema --import {module}: {exc}") from None
    from surgery.case import case_schema

    text = json.dumps(case_schema(), indent=2, sort_keys=False) + "\n"
    if args.output:
        from surgery.files import write_atomic

        write_atomic(Path(args.output), lambda tmp: tmp.write_text(text, encoding="utf-8"))
    else:
        sys.stdout.write(text)
    return ExitCode.OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="surgery", description="Verify model surgery with YAML cases.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run case files; exit 0 if every expectation holds")
    run.add_argument("cases", nargs="+", help="case files or directories")
    run.add_argument(
        "--report",
        default="reports",
        metavar="DIR",
        help="write results.json and report.html per case, and index.html, here (default: reports)",
    )
    run.add_argument(
        "--dated",
        action="store_true",
        help="write into a new DIR/<UTC date and time>/ and point DIR/latest at it, so that nights "
        "stay side by side for `surgery history DIR`",
    )
    run.add_argument("--device", default=None, help="override the cases' device: auto, cpu, cuda, cuda:N")
    run.add_argument("--seeds", type=int, default=None, metavar="N", help="run at most N seeds per case")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    run.add_argument(
        "--skip-slow",
        action="store_true",
        help="leave out the cases marked slow (the 224 px cases of cases/scale/: minutes each on a CPU)",
    )
    run.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="torch threads (default: $SURGERY_THREADS, else 2); results depend on it",
    )
    run.add_argument(
        "--export",
        default=None,
        metavar="DIR",
        help="write each seed's fine-tuned patient as DIR/<case>/seed-N.safetensors, its metadata "
        "holding the case hash, seed, commit, versions, coverage, metrics and the run's verdict",
    )
    run.add_argument(
        "--ray",
        nargs="?",
        const=LOCAL_CLUSTER,
        default=None,
        metavar="ADDRESS",
        help="run on Ray: one task per case and seed (and baseline, zoo model); without ADDRESS a "
        "local cluster sized to this machine (needs: pip install 'surgery[ray]')",
    )
    run.add_argument(
        "--ray-weights",
        choices=["auto", "shared", "object-store"],
        default="auto",
        help="how zoo weights reach Ray workers: a shared SURGERY_CACHE or Ray's object store "
        "(default auto: shared when every node sees the driver's cache)",
    )
    run.set_defaults(func=cmd_run)

    cal = sub.add_parser("calibrate", help="run cases over many seeds and numeric profiles; derive thresholds")
    cal.add_argument("cases", nargs="+", help="case files or directories")
    cal.add_argument(
        "--seeds",
        type=int,
        default=10,
        metavar="N",
        help="seeds of the first profile: the case's, then fresh ones (default 10)",
    )
    cal.add_argument(
        "--perturbed-seeds",
        type=int,
        default=None,
        metavar="M",
        help="the first M of those seeds under the other profiles (default: all N)",
    )
    cal.add_argument(
        "--profiles",
        default="native,threads1,isa-default,zoo-threads1",
        help="numeric profiles, comma-separated: native, threads1, isa-default, isa-avx2, zoo-threads1",
    )
    cal.add_argument("--alpha", type=float, default=0.001, help="false-alarm rate per expectation (default 0.001)")
    cal.add_argument(
        "--write", action="store_true", help="also write the calibrated thresholds into the case files (comments kept)"
    )
    cal.add_argument("--show", action="store_true", help="print the existing records' tables; run nothing")
    cal.add_argument(
        "--rederive",
        action="store_true",
        help="derive the thresholds and decisions again from a fresh record's samples (at --alpha); run nothing",
    )
    cal.set_defaults(func=cmd_calibrate)

    gate = sub.add_parser("gate", help="check a finished checkpoint against a case before release")
    gate.add_argument("checkpoint", help="the release candidate (.safetensors, or .pt/.pth loaded weights-only)")
    gate.add_argument("--case", required=True)
    gate.add_argument(
        "--champion",
        default=None,
        metavar="PATH",
        help="the released checkpoint to compare with on the same examples (overrides gate.champion)",
    )
    gate.add_argument("--report", default="reports/gate", metavar="DIR")
    gate.add_argument("--device", default=None)
    gate.add_argument("--threads", type=int, default=None, metavar="N", help="torch threads (default: 2)")
    gate.set_defaults(func=cmd_gate)

    report = sub.add_parser("report", help="render results.json to HTML (optionally against another run)")
    report.add_argument("results")
    report.add_argument("-o", "--output", default=None)
    report.add_argument("--compare", default=None, metavar="OTHER.json")
    report.set_defaults(func=cmd_report)

    summary = sub.add_parser("summary", help="a Markdown table of the key figures of every case in a report dir")
    summary.add_argument("report_dir")
    summary.set_defaults(func=cmd_summary)

    history = sub.add_parser(
        "history",
        help="every expectation over many report directories (nights), against "
        "its calibrated band; failed, undecided and drifting runs flagged",
    )
    history.add_argument(
        "dirs",
        nargs="+",
        metavar="DIR",
        help="report directories, or folders holding one per night (as --dated writes them)",
    )
    history.add_argument(
        "-o",
        "--output",
        default=None,
        metavar="FILE",
        help="the page (default: DIR/history.html for one DIR, else ./history.html)",
    )
    history.add_argument(
        "--window",
        type=int,
        default=7,
        metavar="K",
        help="the drift test compares the last K runs with the K before (default 7)",
    )
    history.add_argument(
        "--p", type=float, default=0.002, metavar="P", help="flag a drift at Mann-Whitney p < P (default 0.002, as ASV)"
    )
    history.set_defaults(func=cmd_history)

    zoo = sub.add_parser("zoo", help="build or list the zoo of source models")
    zoo.add_argument("action", choices=["build", "list"])
    zoo.add_argument("names", nargs="*")
    zoo.set_defaults(func=cmd_zoo)

    data = sub.add_parser("data", help="write a synthetic image folder (real JPEG files) to try the folder path")
    data.add_argument("action", choices=["synth"])
    data.add_argument("out", type=Path, help="the folder to write: OUT/CLASS/NNNNNN.jpg")
    data.add_argument("--count", type=int, default=1000)
    data.add_argument("--size", type=int, default=224)
    data.add_argument("--seed", type=int, default=0)
    data.set_defaults(func=cmd_data)

    schema = sub.add_parser("schema", help="print the case file's JSON Schema (for editors: yaml-language-server)")
    schema.add_argument("-o", "--output", default=None, help="write it to this file instead of stdout")
    schema.add_argument(
        "--import",
        dest="imports",
        action="append",
        default=[],
        metavar="MODULE",
        help="import a module that registers a check first (repeatable)",
    )
    schema.set_defaults(func=cmd_schema)
    inspect = sub.add_parser("inspect", help="module names, parameter shapes and graph nodes of a model")
    inspect.add_argument("model", help="torchvision:NAME, timm:NAME, zoo:NAME or package.module:factory")
    inspect.add_argument("--num-classes", type=int, default=None)
    inspect.add_argument("--checkpoint", default=None)
    inspect.set_defaults(func=cmd_inspect)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except SurgeryInputError as exc:
        print(f"surgery: error: {exc}", file=sys.stderr)
        return ExitCode.BAD_INPUT
    except KeyboardInterrupt:
        print("surgery: interrupted", file=sys.stderr)
        return ExitCode.INTERRUPTED
    except Exception as exc:  # a bug or an environment failure (disk full …): never exit 1, which means "failed"
        if os.environ.get("SURGERY_DEBUG"):
            raise
        print(
            f"surgery: internal error: {exc.__class__.__name__}: {exc} (set SURGERY_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        return ExitCode.INTERNAL


if __name__ == "__main__":
    sys.exit(main())
