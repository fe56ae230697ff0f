"""Pinned numerics: the thread count and deterministic flags a run uses, and a record of them.

A 30-step fine-tune is chaotic: the order of float sums (set by the thread count and the CPU's
instruction set) moves its accuracy by about ±0.015. So a run pins torch's thread count to a fixed,
documented default instead of "all cores", and writes what it ran under into ``results.json``
(``provenance``): the CPU capability, the threads, the deterministic flags and the versions.

The thread count comes from, in order: an explicit argument (``--threads``, ``--surgery-threads``,
``surgery.run(threads=...)``), the ``SURGERY_THREADS`` environment variable, cores / workers in a
pytest-xdist worker (so workers never oversubscribe the cores), then :data:`DEFAULT_THREADS`.
``ATEN_CPU_CAPABILITY`` (``default``, ``avx2``, ``avx512``) must be set in the environment before torch
is imported; it is recorded, not set, here. The zoo trains with a count of its own
(:func:`zoo_threads`), whatever the caller pinned.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch

from surgery.errors import SurgeryInputError

DEFAULT_THREADS = 2
THREADS_ENV = "SURGERY_THREADS"
ZOO_THREADS_ENV = "SURGERY_ZOO_THREADS"


def outside_xdist(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` without pytest-xdist's ``PYTEST_XDIST_*`` variables: for a process started from a worker that must
    run as a session of its own (its thread count chosen as outside pytest, no worker's behaviour)."""
    return {key: value for key, value in env.items() if not key.startswith("PYTEST_XDIST_")}


def _env_int(name: str) -> int | None:
    """The integer an environment variable holds, None when unset or blank; anything else is bad input."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError:
        raise SurgeryInputError(f"{name}={raw!r}: expected a positive integer") from None


def xdist_workers() -> int | None:
    """The pytest-xdist session's worker count when this process is one of its workers, else None."""
    count = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    return int(count) if count else None


def _cores_per_worker(workers: int | None) -> int:
    """The cores each of ``workers`` processes may keep busy (all of them when None or 0)."""
    return max(1, (os.cpu_count() or 1) // (workers or 1))


def cores_of_this_process() -> int:
    """The cores this process may keep busy: all of them, or its share of them in a pytest-xdist worker."""
    return _cores_per_worker(xdist_workers())


def requested_threads(threads: int | None = None, *, workers: int | None = None) -> int:
    """The thread count a run should use: ``threads``, else ``$SURGERY_THREADS``, else the cores shared among
    ``workers`` pytest-xdist workers (default: this worker's session's count, when in one; 0: as a process outside
    xdist), else the default."""
    if threads is None:
        threads = _env_int(THREADS_ENV)
    if workers is None:
        workers = xdist_workers()
    if threads is None and workers:
        threads = _cores_per_worker(workers)
    threads = DEFAULT_THREADS if threads is None else threads
    if threads < 1:
        raise SurgeryInputError(f"threads: got {threads}; expected a positive integer")
    return threads


def pin_numerics(threads: int | None = None) -> int:
    """Set torch's intra-op thread count (see :func:`requested_threads`) and cuDNN's deterministic flags.

    Returns the thread count in force. Safe to call repeatedly.
    """
    count = requested_threads(threads)
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)
    # NOTE: on CUDA, autotuned convolution algorithms differ from run to run; pin them. On the CPU
    # these flags change nothing. torch.use_deterministic_algorithms is left to the user: on the CPU
    # every op the harness uses is already deterministic for a fixed thread count.
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    return count


def zoo_threads() -> int:
    """The thread count a zoo model trains with: ``$SURGERY_ZOO_THREADS``, else :data:`DEFAULT_THREADS`.

    Never the caller's count: the thread count moves a trained model's weights (and, through them, figures
    such as a swap's activation drift by a factor of two), and a recipe has one cached file per machine,
    whoever trains it first (a 1-thread pytest-xdist worker, a Ray task of one CPU, ``surgery zoo build``).
    """
    count = _env_int(ZOO_THREADS_ENV)
    if count is None:
        return DEFAULT_THREADS
    if count < 1:
        raise SurgeryInputError(f"{ZOO_THREADS_ENV}={count}: expected a positive integer")
    return count


@contextmanager
def torch_threads(count: int) -> Iterator[int]:
    """torch's intra-op thread count set to ``count`` inside the block, put back after it."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield count
    finally:
        torch.set_num_threads(previous)


def numeric_profile() -> dict[str, Any]:
    """What the figures of a run depend on beyond its inputs: CPU capability, threads, flags, versions."""
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "aten_cpu_capability_env": os.environ.get("ATEN_CPU_CAPABILITY"),
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "torch": torch.__version__,
        "cudnn": cudnn,
        "cuda": torch.version.cuda,
    }
