"""Which case files share work, so that pytest-xdist runs them on one worker.

A process reuses a random-init baseline it trained for an earlier case on equal inputs
(:mod:`surgery.running.reuse`): the two bridges of ``cases/`` each fine-tune a fresh ResNet-18 on the
digits for the same budget. Under pytest-xdist that reuse happens only when both files land on the
same worker; with ``--dist loadfile`` they land on different ones about half the time, and the
baseline is trained twice (about 15 s of a worker's time in ``make test``).

:class:`CaseGroupScheduling` is xdist's ``loadfile`` scheduling with one change: case files whose
baselines would be equal form one work unit. The key is read from the parsed case (no torch), and
it is a hint: two cases it groups by mistake only run on one worker, with the same figures.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from xdist.scheduler import LoadFileScheduling

from surgery.case import CASE_SUFFIXES, Case, load_case
from surgery.errors import SurgeryInputError


def shared_baseline_key(case: Case) -> str | None:
    """A key equal for cases whose random-init baselines train on equal inputs; None without a baseline.

    Equal inputs: the same data, fine-tune, seeds and device, and the same baseline model (declared,
    or by default the patient, which the source and the surgery determine)."""
    accuracy = getattr(case.expect, "accuracy", None)
    if case.arms or accuracy is None or accuracy.beats_baseline is None:
        return None
    model = accuracy.beats_baseline.model
    inputs = {
        "data": case.data.model_dump(mode="json"),
        "finetune": case.finetune.model_dump(mode="json"),
        "seed": case.seed,
        "device": case.device,
        "model": model.model_dump(mode="json")
        if model is not None
        else [case.source.model_dump(mode="json"), case.surgery.model_dump(mode="json")],
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


class CaseGroupScheduling(LoadFileScheduling):
    """``--dist loadfile``, but case files that would train the same baseline are one work unit."""

    def __init__(self, config: pytest.Config, log: Any = None) -> None:
        super().__init__(config, log)
        self.rootpath = Path(config.rootpath)
        self.groups: dict[str, str] = {}  # file part of a node id -> its work unit

    def _split_scope(self, nodeid: str) -> str:
        file = super()._split_scope(nodeid)
        if file not in self.groups:
            self.groups[file] = self._group_of(file)
        return self.groups[file]

    def _group_of(self, file: str) -> str:
        if not file.endswith(CASE_SUFFIXES):
            return file
        try:
            key = shared_baseline_key(load_case(self.rootpath / file))
        except (SurgeryInputError, OSError):  # the worker reports it as the file's own failing item
            return file
        return file if key is None else f"baseline-{key}"
