"""The ``surgery`` command run in-process, as the tests need it: exit code, stdout, stderr, and for ``run`` the
case file and the report directory. (Imported by test modules: pytest puts ``tests/`` on ``sys.path``.)"""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from surgery import cli


class CliRun(NamedTuple):
    """What one command printed and returned; unpacks as ``rc, out, err``."""

    rc: int
    out: str
    err: str


def run_cli(*args: str | Path) -> CliRun:
    """``surgery ARGS…`` in this process, its stdout and stderr captured."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main([str(a) for a in args])
    return CliRun(rc, out.getvalue(), err.getvalue())


@dataclass
class CaseRun:
    """One ``surgery run CASE --report DIR``: exit code, stdout, stderr, the case file and the report directory."""

    rc: int
    out: str
    err: str
    case: Path
    report: Path

    @property
    def results(self) -> dict[str, Any]:
        """The ``results.json`` the run wrote (the first, for a run of one case)."""
        return json.loads(next(self.report.glob("*/results.json")).read_text())


def run_case_file(case: Path, report: Path, *options: str) -> CaseRun:
    """``surgery run CASE --report REPORT --quiet OPTIONS…`` in this process."""
    rc, out, err = run_cli("run", case, "--report", report, "--quiet", *options)
    return CaseRun(rc, out, err, case, report)
