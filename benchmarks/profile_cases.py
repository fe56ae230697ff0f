"""Where a case's time goes: each case at seed 0, its time split by phase (training, evaluations, data, ...).

    python -m benchmarks.profile_cases cases/            # every seed case
    python -m benchmarks.profile_cases cases/swap/*.yaml

Times are exclusive (an evaluation inside the fine-tune is not counted as training) and come from
wrapping the runner's own functions for the length of this process; nothing is changed on disk.
"""

from __future__ import annotations

import collections
import functools
import sys
import time
from pathlib import Path
from typing import Any, Callable

import surgery
import surgery.train.finetune as finetune_module
import surgery.running.runner as runner_module
from surgery.case import find_cases

PHASES = [  # (module or class, attribute, label)
    (runner_module, "finetune", "training steps"),
    (finetune_module, "evaluate", "evaluations in the fine-tune"),
    (runner_module, "evaluate", "other evaluations"),
    (runner_module, "load_data", "data"),
    (runner_module, "build_source", "source model"),
    (runner_module, "perform_surgery", "surgery"),
    (runner_module, "recalibrate_bn", "AdaBN"),
    (runner_module.Probes, "probe", "probes"),
    (runner_module, "weight_digests", "weight digests"),
]


class PhaseClock:
    """Exclusive seconds and calls per phase, for functions wrapped with :meth:`wrap`."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = collections.defaultdict(float)
        self.calls: collections.Counter[str] = collections.Counter()
        self._inner: list[float] = []  # time spent in wrapped callees, per open call

    def wrap(self, fn: Callable[..., Any], label: str) -> Callable[..., Any]:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            self._inner.append(0.0)
            try:
                return fn(*args, **kwargs)
            finally:
                total = time.perf_counter() - start
                self.seconds[label] += total - self._inner.pop()
                self.calls[label] += 1
                if self._inner:
                    self._inner[-1] += total

        return timed

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()


def main(argv: list[str]) -> int:
    clock = PhaseClock()
    for owner, name, label in PHASES:
        setattr(owner, name, clock.wrap(getattr(owner, name), label))
    for path in find_cases([Path(a) for a in argv or ["cases"]]):
        clock.reset()
        start = time.perf_counter()
        surgery.run(surgery.load_case(path), seeds=1, progress=False)
        total = time.perf_counter() - start
        parts = sorted(clock.seconds.items(), key=lambda kv: -kv[1])
        print(
            f"{path}: {total:.1f} s; "
            + ", ".join(f"{label} {s:.1f} s ({clock.calls[label]})" for label, s in parts if s >= 0.05),
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
