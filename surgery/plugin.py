"""pytest plugin: ``pytest cases/`` collects each case file, one item per expectation.

The items of one file share one cached run of the case. A failed expectation prints one line —
observed value, threshold, where — not a traceback. Registered through the ``pytest11`` entry point.

``--surgery-ray [ADDRESS]`` runs the cases on a Ray cluster (:mod:`surgery.running.ray_runner`). Every collected
case is submitted up front, in ``pytest_collection_finish``, and each item then waits for its own case:
submitting lazily, on a case's first item, would run the cases one after another (an item must have its
result before the next item starts), which is the local run with Ray's overhead on top. Items, their
names, outcomes and reports stay as they are locally. Deselected cases (``-k``, ``-m``) and skipped ones
are not submitted; ``-x`` cancels the tasks still out when the session ends.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pytest

from surgery.nightly import nights
from surgery.errors import SurgeryInputError


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("surgery", "model-surgery cases (YAML files under a 'cases' directory)")
    group.addoption("--surgery-device", default=None, help="device for every case: auto, cpu, cuda, cuda:N")
    group.addoption("--surgery-report", default=None, metavar="DIR", help="write results and HTML reports here")
    group.addoption(
        "--surgery-report-dated",
        action="store_true",
        help="write the reports into a new DIR/<UTC date and time>/ and point DIR/latest at it "
        "(nights side by side, for `surgery history DIR`)",
    )
    group.addoption("--surgery-seeds", type=int, default=None, metavar="N", help="run at most N seeds per case")
    group.addoption(
        "--surgery-threads",
        type=int,
        default=None,
        metavar="N",
        help="torch threads per process (default: $SURGERY_THREADS, else 2; under xdist cores / workers)",
    )
    group.addoption(
        "--surgery-ray",
        nargs="?",
        const=LOCAL_CLUSTER,
        default=None,
        metavar="ADDRESS",
        help="run the cases on Ray (one task per case and seed), joining ADDRESS or starting a local "
        "cluster; needs pip install 'surgery[ray]'",
    )
    group.addoption(
        "--surgery-ray-weights",
        choices=["auto", "shared", "object-store"],
        default="auto",
        help="how zoo weights reach Ray workers (default auto: shared when every node sees the cache)",
    )


class TerminalLines(logging.Handler):
    """Shows log records (the zoo's "training …" lines) in pytest's terminal, between the dots."""

    def __init__(self, reporter: Any):
        super().__init__(logging.INFO)
        self.reporter = reporter

    def emit(self, record: logging.LogRecord) -> None:
        self.reporter.ensure_newline()
        self.reporter.write_line(self.format(record))


LOCAL_CLUSTER = "local"  # --surgery-ray without an address
ZOO_LINES = pytest.StashKey[TerminalLines]()
RAY_RUN = pytest.StashKey[Any]()  # the RayRun the collected cases were submitted to (--surgery-ray)
RAY_CONNECTED = pytest.StashKey[bool]()  # whether this session connected to Ray (and so disconnects)
CASE = pytest.StashKey[Any]()  # a case file's parsed Case, or the SurgeryInputError its parsing raised
OUTCOME = pytest.StashKey[Any]()  # a case file's run: its CaseResult or the SurgeryInputError it raised
DATED = pytest.StashKey[bool]()  # --surgery-report-dated: this session named a new dated report directory
DATED_INPUT = "surgery_report_dated"  # the key of that directory in an xdist worker's workerinput
ZOO_LOGGER = "surgery.train.zoo"


@pytest.hookimpl(trylast=True)  # after pytest has registered its terminal reporter
def pytest_configure(config: pytest.Config) -> None:
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:  # not in xdist workers, whose output pytest does not show
        handler = TerminalLines(reporter)
        logger = logging.getLogger(ZOO_LOGGER)
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        config.stash[ZOO_LINES] = handler
    config.addinivalue_line("markers", "slow: long-running case")
    config.addinivalue_line("markers", "gpu: needs CUDA (skipped without it)")
    # Items of one case share one run: keep a file's items on one xdist worker.
    if getattr(config.option, "dist", "no") == "load":
        config.option.dist = "loadfile"
    if _workers_oversubscribe(config):
        _workers_wait_passively(config)
    if config.getoption("surgery_ray", None) is not None:
        _check_ray_options(config)
    dated = getattr(config, "workerinput", {}).get(DATED_INPUT)
    if dated:  # an xdist worker writes where its controller's --surgery-report-dated said
        config.option.surgery_report = dated
    elif (
        config.getoption("surgery_report_dated", False)
        and config.getoption("surgery_report", None)
        and not os.environ.get("PYTEST_XDIST_WORKER")
    ):
        config.option.surgery_report = str(nights.new_dated_dir(config.getoption("surgery_report")))
        config.stash[DATED] = True


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """xdist: each worker re-parses the command line, so it is told the dated directory its controller named."""
    if node.config.stash.get(DATED, False):
        node.workerinput[DATED_INPUT] = node.config.option.surgery_report


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """``loadfile``, with the case files that would train the same baseline on one worker (where it is reused)."""
    if config.getvalue("dist") != "loadfile":
        return None
    from surgery.running.worker_groups import CaseGroupScheduling  # xdist: only in the xdist controller

    return CaseGroupScheduling(config, log)


def _workers_oversubscribe(config: pytest.Config) -> bool:
    """Whether this session starts xdist workers whose threads, with a zoo build's in one of them, outnumber
    the cores (``make test``: 2 workers of 1 thread on 2 cores, and a build of 2 threads)."""
    workers = getattr(config.option, "numprocesses", None)
    if not isinstance(workers, int) or workers < 1 or os.environ.get("PYTEST_XDIST_WORKER"):
        return False
    from surgery.train.numerics import requested_threads, zoo_threads  # torch: only for xdist sessions

    try:
        per_worker = requested_threads(config.getoption("surgery_threads"), workers=workers)
        build = zoo_threads()
    except SurgeryInputError:  # reported where the count is used
        return False
    return (workers - 1) * per_worker + max(per_worker, build) > (os.cpu_count() or 1)


def _workers_wait_passively(config: pytest.Config) -> None:
    """``OMP_WAIT_POLICY=PASSIVE`` for the xdist workers this session starts, unless the user set a policy.

    Called when the workers oversubscribe the cores (:func:`_workers_oversubscribe`): a zoo build trains with
    the zoo's 2 threads whatever a worker's count (:func:`surgery.train.numerics.zoo_threads`), and beside the other,
    busy worker OpenMP's default (threads spin at each barrier) left one thread waiting for the other to be
    scheduled: on 2 cores beside one busy process, training ``zoo:mnist-resnet18`` took 134 s spinning and
    77 s passive, its weights bit for bit the same. Alone on the machine it took 40 s spinning and 56 s
    passive, which is why a session whose workers fit the cores keeps the default. Workers of one thread
    never reach a barrier, so their own runs do not change. Set before the workers start: OpenMP reads it
    once, when torch loads it.
    """
    if "OMP_WAIT_POLICY" in os.environ:
        return
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

    def restore() -> None:
        os.environ.pop("OMP_WAIT_POLICY", None)

    config.add_cleanup(restore)


def _ray_address(config: pytest.Config) -> str | None:
    address = config.getoption("surgery_ray")
    return None if address == LOCAL_CLUSTER else address


def _check_ray_options(config: pytest.Config) -> None:
    """--surgery-ray without Ray installed, with a path for an address, or beside xdist: a usage error."""
    if getattr(config.option, "numprocesses", None) or os.environ.get("PYTEST_XDIST_WORKER"):
        raise pytest.UsageError("--surgery-ray and pytest-xdist (-n) both spread the cases: use one")
    from surgery.running.ray_check import check_address, require_ray

    try:
        check_address(_ray_address(config), "--surgery-ray")
        require_ray("--surgery-ray")
    except SurgeryInputError as exc:
        raise pytest.UsageError(str(exc)) from None


def _ray_connect(config: pytest.Config) -> None:
    if RAY_CONNECTED not in config.stash:
        from surgery.running.ray_runner import connect

        try:
            config.stash[RAY_CONNECTED] = connect(_ray_address(config), option="--surgery-ray", quiet=True)
        except SurgeryInputError as exc:
            raise pytest.UsageError(str(exc)) from None


def pytest_unconfigure(config: pytest.Config) -> None:
    handler = config.stash.get(ZOO_LINES, None)
    if handler is not None:
        logging.getLogger(ZOO_LOGGER).removeHandler(handler)
    run = config.stash.get(RAY_RUN, None)
    if run is not None:
        run.close()  # tasks still out (-x, Ctrl-C) are cancelled
        del config.stash[RAY_RUN]
    if config.stash.get(RAY_CONNECTED, False):
        from surgery.running.ray_runner import disconnect

        disconnect()
        config.stash[RAY_CONNECTED] = False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Items marked ``gpu`` (cases and ordinary tests alike) are skipped without CUDA; with ``--surgery-ray``,
    a case's items are skipped when no node of the cluster has a GPU."""
    if not any(item.get_closest_marker("gpu") for item in items):
        return
    import torch

    cluster_gpus = None
    if config.getoption("surgery_ray") is not None and any(isinstance(item, CaseItem) for item in items):
        _ray_connect(config)
        import ray

        cluster_gpus = ray.cluster_resources().get("GPU", 0)
    local = torch.cuda.is_available()
    for item in items:
        if not item.get_closest_marker("gpu"):
            continue
        if isinstance(item, CaseItem) and cluster_gpus is not None:
            if not cluster_gpus:
                item.add_marker(pytest.mark.skip(reason="needs CUDA, and no node of the Ray cluster has a GPU"))
        elif not local:
            item.add_marker(pytest.mark.skip(reason="needs CUDA, which is not available"))


def _run_options(config: pytest.Config) -> Any:
    from surgery.running.runner import RunOptions

    return RunOptions(
        device=_worker_device(config.getoption("surgery_device")),
        max_seeds=config.getoption("surgery_seeds"),
        progress=False,
        threads=config.getoption("surgery_threads"),
        curves=bool(config.getoption("surgery_report", None)),  # a curve only where a report draws it
    )


def pytest_collection_finish(session: pytest.Session) -> None:
    """With ``--surgery-ray``: submit every case that has an item left to run (see the module's docstring)."""
    config = session.config
    if config.getoption("surgery_ray", None) is None:
        return
    files = [
        item.parent
        for item in session.items
        if isinstance(item, CaseItem)
        and item.parent.case is not None
        and not any(m.name == "skip" for m in item.iter_markers())
    ]
    files = list(dict.fromkeys(files))
    if not files:
        return
    _ray_connect(config)
    from surgery.running.ray_runner import RayOptions, RayRun

    try:
        config.stash[RAY_RUN] = RayRun(
            [f.case for f in files],
            _run_options(config),
            RayOptions(weights=config.getoption("surgery_ray_weights"), progress=False),
        )
    except SurgeryInputError as exc:  # the run as a whole cannot start (threads larger than every node ...)
        raise pytest.UsageError(str(exc)) from None


def _in_cases_dir(path: Path) -> bool:
    return any(part == "cases" for part in path.parent.parts)


def pytest_collect_file(parent: pytest.Collector, file_path: Path) -> pytest.Collector | None:
    if file_path.suffix in (".yaml", ".yml") and _in_cases_dir(file_path):
        return CaseFile.from_parent(parent, path=file_path)
    return None


def _worker_device(requested: str | None) -> str | None:
    """With several CUDA devices and xdist workers, worker gwN takes device N modulo the count."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if requested in (None, "auto", "cuda") and worker.startswith("gw"):
        import torch

        if torch.cuda.is_available() and torch.cuda.device_count() > 1:
            return f"cuda:{int(worker[2:]) % torch.cuda.device_count()}"
    return requested


class ExpectationFailed(Exception):
    """An expectation did not hold; the message is the one line to show."""


class CaseFile(pytest.File):
    """A YAML case file: parses at collection, runs the case once when its first item runs."""

    def collect(self):
        from surgery.case import load_cases
        from surgery.checks.expect import expectation_names

        try:
            self.stash[CASE] = load_cases([self.path])[0]  # parsed, and its factories imported and checked
        except SurgeryInputError as exc:
            self.stash[CASE] = exc
            yield CaseItem.from_parent(self, name="case", expectation="case")
            return
        for name in expectation_names(self.case):
            item = CaseItem.from_parent(self, name=name, expectation=name)
            for marker in self.case.markers:
                item.add_marker(marker)
            yield item

    @property
    def case(self) -> Any:
        """The parsed case, or None when the file is bad input."""
        found = self.stash.get(CASE, None)
        return None if isinstance(found, SurgeryInputError) else found

    def result(self):
        """The cached run of this case (run on first use, or on Ray; a bad-input error is cached too, and so is an
        internal error from a Ray task)."""
        if OUTCOME not in self.stash:
            from surgery.running.cases import run_case

            config = self.config
            ray_run = config.stash.get(RAY_RUN, None)
            try:
                if ray_run is not None and any(plan.case is self.case for plan in ray_run.plans):
                    self.stash[OUTCOME] = ray_run.outcome(self.case)
                else:
                    self.stash[OUTCOME] = run_case(self.case, _run_options(config))
            except SurgeryInputError as exc:
                self.stash[OUTCOME] = exc
            if not isinstance(self.stash[OUTCOME], Exception):
                report_dir = config.getoption("surgery_report")
                if report_dir:
                    from surgery.report.render import write_case_report

                    write_case_report(self.stash[OUTCOME], Path(report_dir))
        return self.stash[OUTCOME]


class CaseItem(pytest.Item):
    """One expectation of a case."""

    parent: CaseFile  # a CaseItem is made by its case file (CaseFile.collect)

    def __init__(self, *, expectation: str, **kwargs: Any):
        super().__init__(**kwargs)
        self.expectation = expectation

    def runtest(self) -> None:
        parent: CaseFile = self.parent
        if parent.case is None:
            raise parent.stash[CASE]
        outcome = parent.result()
        if isinstance(outcome, Exception):  # bad input, or a Ray task's internal error
            raise outcome
        found = outcome.expectation(self.expectation)
        if found is None:
            raise ExpectationFailed(f"expectation {self.expectation} produced no result")
        if found.undecided:  # a claim these seeds cannot decide: never a pass
            pytest.skip(found.message)
        if not found.passed:
            raise ExpectationFailed(found.message)

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style=None) -> Any:
        if isinstance(excinfo.value, ExpectationFailed):
            return f"{self.parent.case.name}: {self.expectation}: {excinfo.value}"
        if isinstance(excinfo.value, SurgeryInputError):
            return f"bad input: {excinfo.value}"
        return super().repr_failure(excinfo)

    def reportinfo(self) -> tuple[Path, int, str]:
        name = self.parent.case.name if self.parent.case is not None else self.path.name
        return self.path, 0, f"case {name}: {self.expectation}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):
    """An undecided expectation's skip points at its threshold's line in the case file, not at this plugin."""
    outcome = yield
    report = outcome.get_result()
    if isinstance(item, CaseItem) and report.skipped and isinstance(report.longrepr, tuple) and item.parent.case:
        from surgery.checks.expect import threshold_line

        line = threshold_line(item.parent.case, item.expectation)
        report.longrepr = (str(item.path), line, report.longrepr[2])  # pytest shows this 1-based line as is


def pytest_sessionfinish(session: pytest.Session) -> None:
    report_dir = session.config.getoption("surgery_report", None)
    dated = session.config.stash.get(DATED, False)
    if dated and not nights.is_night(Path(report_dir)):  # no case wrote a report: leave no empty night
        if not any(Path(report_dir).iterdir()):
            Path(report_dir).rmdir()
        return
    if report_dir and Path(report_dir).is_dir() and not os.environ.get("PYTEST_XDIST_WORKER"):
        from surgery.report.render import write_index

        write_index(Path(report_dir))
        if dated:
            nights.point_latest(Path(report_dir))
