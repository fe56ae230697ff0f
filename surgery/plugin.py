"""pytest plugin: ``pytest cases/`` collects each case file, one item per expectation.

The items of one file share one cached run of the case. A failed expectation prints one line —
observed value, threshold, where — not a traceback. Registered through the ``pytest11`` entry point.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pytest

from surgery.errors import SurgeryInputError


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("surgery", "model-surgery cases (YAML files under a 'cases' directory)")
    group.addoption("--surgery-device", default=None, help="device for every case: auto, cpu, cuda, cuda:N")
    group.addoption("--surgery-report", default=None, metavar="DIR", help="write results and HTML reports here")
    group.addoption("--surgery-seeds", type=int, default=None, metavar="N", help="run at most N seeds per case")
    group.addoption("--surgery-threads", type=int, default=None, metavar="N",
                    help="torch threads per process (default: $SURGERY_THREADS, else 2; under xdist cores / workers)")


class TerminalLines(logging.Handler):
    """Shows log records (the zoo's "training …" lines) in pytest's terminal, between the dots."""

    def __init__(self, reporter: Any):
        super().__init__(logging.INFO)
        self.reporter = reporter

    def emit(self, record: logging.LogRecord) -> None:
        self.reporter.ensure_newline()
        self.reporter.write_line(self.format(record))


ZOO_LINES = pytest.StashKey[TerminalLines]()
CASE = pytest.StashKey[Any]()      # a case file's parsed Case, or the SurgeryInputError its parsing raised
OUTCOME = pytest.StashKey[Any]()   # a case file's run: its CaseResult or the SurgeryInputError it raised
ZOO_LOGGER = "surgery.zoo"


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


def pytest_unconfigure(config: pytest.Config) -> None:
    handler = config.stash.get(ZOO_LINES, None)
    if handler is not None:
        logging.getLogger(ZOO_LOGGER).removeHandler(handler)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Items marked ``gpu`` (cases and ordinary tests alike) are skipped without CUDA."""
    if not any(item.get_closest_marker("gpu") for item in items):
        return
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs CUDA, which is not available")
        for item in items:
            if item.get_closest_marker("gpu"):
                item.add_marker(skip)


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
        from surgery.case import load_case
        from surgery.checks.expect import expectation_names

        try:
            self.stash[CASE] = load_case(self.path)
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
        """The cached run of this case (run on first use; a bad-input error is cached too)."""
        if OUTCOME not in self.stash:
            from surgery.runner import RunOptions, run_case

            config = self.config
            options = RunOptions(device=_worker_device(config.getoption("surgery_device")),
                                 max_seeds=config.getoption("surgery_seeds"), progress=False,
                                 threads=config.getoption("surgery_threads"))
            try:
                self.stash[OUTCOME] = run_case(self.case, options)
            except SurgeryInputError as exc:
                self.stash[OUTCOME] = exc
            else:
                report_dir = config.getoption("surgery_report")
                if report_dir:
                    from surgery.report.render import write_case_report

                    write_case_report(self.stash[OUTCOME], Path(report_dir))
        return self.stash[OUTCOME]


class CaseItem(pytest.Item):
    """One expectation of a case."""

    def __init__(self, *, expectation: str, **kwargs: Any):
        super().__init__(**kwargs)
        self.expectation = expectation

    def runtest(self) -> None:
        parent: CaseFile = self.parent
        if parent.case is None:
            raise parent.stash[CASE]
        outcome = parent.result()
        if isinstance(outcome, SurgeryInputError):
            raise outcome
        found = outcome.expectation(self.expectation)
        if found is None:
            raise ExpectationFailed(f"expectation {self.expectation} produced no result")
        if found.undecided:  # a claim these seeds cannot decide: never a pass
            pytest.skip(found.message)
        if not found.passed:
            raise ExpectationFailed(found.message)

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style=None) -> str:
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
        from surgery.calibration import yaml_path

        line = item.parent.case.lines.get(".".join(yaml_path(item.expectation)), 1)
        report.longrepr = (str(item.path), line, report.longrepr[2])  # pytest shows this 1-based line as is


def pytest_sessionfinish(session: pytest.Session) -> None:
    report_dir = session.config.getoption("surgery_report", None)
    if report_dir and Path(report_dir).is_dir() and not os.environ.get("PYTEST_XDIST_WORKER"):
        from surgery.report.render import write_index

        write_index(Path(report_dir))
