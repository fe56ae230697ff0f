"""Cases on a Ray cluster: one task per (case, seed), per random-init baseline and per zoo model; the driver
assembles each case's result with the local run's own code (:func:`surgery.running.runner.assemble`).

The task graph of a run::

    zoo builds (one per zoo: model the cases name)
        -> the seed tasks and baseline tasks of the cases that read them   (Ray waits for the builds)
            -> the driver: assemble, results.json, report.html, then index.html

Resources: a task takes ``num_cpus`` = the run's pinned thread count (:mod:`surgery.train.numerics`), so the
tasks on a node never ask for more threads than it has cores, and ``num_gpus=1`` when its case runs on
CUDA or is marked ``gpu``, so it never lands on a node without one. Zoo builds train on the CPU, as they
do in a local run, with the zoo's own thread count, and take that many CPUs (at most the largest node's).
A local cluster that :func:`connect` starts runs its workers at normal priority (``RAY_worker_niceness=0``
unless set): Ray's default of nice 15 starves torch's OpenMP threads beside any other busy process (a zoo
build at 2 threads beside one busy process took 75 s instead of 3 s). A task whose worker dies is retried
(``max_retries``); a case that raises comes back as that case's error, as data, and the other cases go on.

Weights reach the tasks one of two ways (``RayOptions.weights``, ``surgery run --ray-weights``):

- ``shared``: every node sees the driver's ``SURGERY_CACHE`` (a shared file system). A zoo build
  writes there under the zoo's file lock; tasks read the file. Nothing large crosses the object store.
- ``object-store``: no shared disk. A zoo build trains in its node's own cache and returns the file's
  bytes; Ray hands them to each task that needs them, which installs them in its node's cache
  (atomically, under the lock) unless the same bytes are there already.
- ``auto`` (the default): ``shared`` when a task on every node sees a marker file the driver writes
  into its cache, else ``object-store``.

Ray is imported by :func:`require_ray` only, when a run asks for it: ``import surgery`` never loads it.

>>> from surgery.case import load_case
>>> from surgery.running.runner import RunOptions
>>> cases = [load_case("cases/swap/resnet50-relu-to-silu.yaml")]                          # doctest: +SKIP
>>> for case, outcome in run_cases_on_ray(cases, RunOptions(max_seeds=1), RayOptions()):   # doctest: +SKIP
...     print(case.name, outcome.passed if isinstance(outcome, CaseResult) else outcome)
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import re
import signal
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterator

from surgery.files import write_atomic
from surgery.case import Case, CaseCalibration, case_calibration, parse_case
from surgery.errors import SurgeryInputError
from surgery.train.numerics import pin_numerics, requested_threads, zoo_threads
from surgery.running.prepare import device_for
from surgery.running.ray_check import check_address, require_ray
from surgery.running.ray_tracker import TaskTracker
from surgery.models.recipes import ZOO
from surgery.results import CaseResult
from surgery.running.runner import (
    RunOptions,
    assemble,
    case_provenance,
    case_seeds,
    check_thresholds,
    runs_baseline,
    model_specs,
    run_baseline,
    run_seed,
)
from surgery.running.variants import arms_left_out, assemble_variants, run_arm_seed
from surgery.train.zoo import build as build_zoo, cache_dir, zoo_path

WEIGHTS = ("auto", "shared", "object-store")
CACHE_ENV = ("SURGERY_CACHE", "TORCH_HOME")  # what a task on a shared file system reads from the driver
POLL_SECONDS = 0.2
WORKER_NICENESS_ENV = "RAY_worker_niceness"  # Ray's workers' nice value; read by a cluster when it starts
DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


@dataclass
class RayOptions:
    """How to run on Ray, beyond :class:`~surgery.running.runner.RunOptions`."""

    address: str | None = None  # join this cluster (host:port, auto, ray://...); None: start one on this machine
    weights: str = "auto"  # auto | shared | object-store: how zoo weights reach the tasks
    max_retries: int = 3  # retries of a task whose worker died (an exception it raises is never retried)
    progress: bool | None = None  # the bar over tasks (done / running / pending); None = only on a terminal


class RemoteError(Exception):
    """An internal error (a bug, the environment failing) raised in a task; ``remote_traceback`` says where."""

    def __init__(self, message: str, remote_traceback: str = ""):
        super().__init__(message)
        self.remote_traceback = remote_traceback


def connect(address: str | None, *, option: str = "--ray", quiet: bool = False, num_cpus: int | None = None) -> bool:
    """Connect to Ray: join ``address``, or start a local cluster when None (of ``num_cpus`` CPUs; default: this
    machine's), its workers at normal priority unless ``$RAY_worker_niceness`` says otherwise.

    Returns whether this call connected (the caller then calls :func:`disconnect`); an existing connection (a
    notebook's) is used as it is.
    """
    check_address(address, option)
    ray = require_ray(option)
    if ray.is_initialized():
        return False
    started_here = {} if address else {WORKER_NICENESS_ENV: os.environ.get(WORKER_NICENESS_ENV, "0")}
    try:
        with environment(started_here):  # the raylet reads it once, at start
            ray.init(
                address=address,
                num_cpus=None if address else num_cpus,
                include_dashboard=False,
                log_to_driver=not quiet,
                logging_level=logging.ERROR if quiet else logging.WARNING,
            )
    except (ConnectionError, ValueError, RuntimeError) as exc:
        where = f"{option} {address}" if address else option
        raise SurgeryInputError(f"{where}: cannot join or start a Ray cluster: {str(exc).splitlines()[0]}") from None
    return True


def disconnect() -> None:
    """Leave the cluster (a local one started by :func:`connect` stops)."""
    require_ray().shutdown()


# --------------------------------------------------------------------------------------------- the tasks


@dataclass(frozen=True)
class CaseSource:
    """A case as a task receives it: its file's path and text, parsed again in the worker (errors stay located)."""

    path: str
    text: str

    @classmethod
    def of(cls, case: Case) -> "CaseSource":
        """The source of a case loaded from a file; a file changed since it was loaded is bad input."""
        if case.path == "<memory>":
            raise SurgeryInputError(f"{case.name}: a case run on Ray must come from a file (load_case)")
        try:
            text = Path(case.path).read_text(encoding="utf-8")
        except OSError as exc:
            raise SurgeryInputError(f"{case.path}: cannot read case file: {exc}") from None
        if hashlib.sha256(text.encode()).hexdigest()[:16] != case.file_hash:
            raise SurgeryInputError(f"{case.path}: the file changed since it was loaded; run again")
        return cls(case.path, text)

    def load(self) -> Case:
        """The case, as :func:`surgery.case.load_case` gives it."""
        return parse_case(self.text, self.path)


@dataclass(frozen=True)
class TaskJob:
    """One seed or one baseline of a case: everything its task needs but the zoo weights (passed beside it)."""

    key: str  # "<case path> seed 0", "<case path> baseline 0"
    kind: str  # seed | baseline
    source: CaseSource
    seed: int
    options: RunOptions  # device decided by the driver, threads pinned, no progress bars
    env: dict[str, str]  # the driver's cache variables (shared weights), else empty
    zoo: tuple[str, ...]  # the zoo models whose build results follow the job, in order
    provenance_seeds: tuple[int, ...] | None = None  # the first seed's task also reads the case's provenance
    tracker: Any = None  # the TaskTracker actor
    arm: str = ""  # kind "arm": the arm of a variant case this seed runs


@contextlib.contextmanager
def environment(env: dict[str, str]) -> Iterator[None]:
    """``os.environ`` with ``env`` set for the block, then as it was (a worker process runs many tasks)."""
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def install_weights(name: str, data: bytes) -> Path:
    """Put a zoo model's file, as it came through the object store, into this process's cache (atomically, under
    the zoo's file lock) unless the same bytes are there already; return its path."""
    from filelock import FileLock

    path = zoo_path(ZOO[name])
    if path.is_file() and path.read_bytes() == data:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if not (path.is_file() and path.read_bytes() == data):
            write_atomic(path, lambda tmp: tmp.write_bytes(data))
    return path


def _start_task(tracker: Any, key: str) -> None:
    """Make the running task cancellable, then tell the tracker it started (key, worker pid).

    Ray cancels a running task by interrupting its worker as Ctrl-C would; a worker whose process started with
    SIGINT ignored (a cluster started from a background job or ``nohup``) ignores that too, and the cancelled task
    would run to its end. So the task puts Python's own handler back (tasks run in the worker's main thread).
    """
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if tracker is not None:
        tracker.started.remote(key, os.getpid())


def _error(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, SurgeryInputError):
        return {"error": "input", "message": str(exc)}
    return {"error": "internal", "message": f"{exc.__class__.__name__}: {exc}", "traceback": traceback.format_exc()}


def zoo_task(name: str, env: dict[str, str], inline: bool, tracker: Any = None) -> dict[str, Any]:
    """Build (or find cached) one zoo model, on the CPU with the zoo's own threads
    (:func:`surgery.train.numerics.zoo_threads`): ``{"value": path or bytes}``."""
    _start_task(tracker, f"zoo:{name}")
    start = time.perf_counter()
    try:
        with environment(env):
            path = build_zoo(name, progress=False)
            value: str | bytes = path.read_bytes() if inline else str(path)
    except Exception as exc:  # noqa: BLE001 - returned as data: the driver reports it as the dependent cases' error
        return _error(exc)
    return {"value": value, "seconds": time.perf_counter() - start, "pid": os.getpid()}


def case_task(job: TaskJob, *builds: dict[str, Any]) -> dict[str, Any]:
    """Run one seed (:func:`~surgery.running.runner.run_seed`) or one baseline
    (:func:`~surgery.running.runner.run_baseline`) of a case in a Ray worker.
    ``builds``: the zoo tasks' results, in ``job.zoo`` order. Errors come back as data."""
    _start_task(job.tracker, job.key)
    start = time.perf_counter()
    for build in builds:
        if "error" in build:
            return build
    try:
        with environment(job.env):
            for name, build in zip(job.zoo, builds):
                if isinstance(build["value"], bytes):
                    install_weights(name, build["value"])
            case = job.source.load()
            threads = pin_numerics(job.options.threads)
            device = device_for(case, job.options.device)
            if job.kind == "baseline":
                value: dict[str, Any] = {"baseline": run_baseline(case, job.seed, device, job.options)}
            elif job.kind == "arm":
                value = {"arm": job.arm, "seed": run_arm_seed(case, job.arm, job.seed, device, job.options)}
                if job.provenance_seeds is not None:
                    value["provenance"] = case_provenance(case, list(job.provenance_seeds), device, threads)
            else:
                value = {"seed": run_seed(case, job.seed, device, job.options)}
                if job.provenance_seeds is not None:
                    value["provenance"] = case_provenance(case, list(job.provenance_seeds), device, threads)
    except Exception as exc:  # noqa: BLE001 - returned as data, reported as this case's error
        return _error(exc)
    return {"value": value, "seconds": time.perf_counter() - start, "pid": os.getpid()}


# --------------------------------------------------------------------------------------------- the driver


def zoo_names(case: Case) -> list[str]:
    """The zoo models a run of ``case`` reads, in the order its specs name them."""
    names = [spec.model.partition(":")[2] for spec in model_specs(case) if spec.model.startswith("zoo:")]
    return list(dict.fromkeys(names))


def task_device(case: Case, override: str | None, cluster_gpus: float) -> tuple[str, bool]:
    """The device a case's tasks run on, and whether they need a GPU node.

    ``auto`` is CUDA when the cluster has a GPU; ``cuda:N`` is ``cuda``, since Ray picks the GPU (it sets the
    task's ``CUDA_VISIBLE_DEVICES``). A case marked ``gpu`` always takes one. Needing a GPU on a cluster without
    any is bad input, located at what asked for it.
    """
    requested = override or case.device
    if not DEVICE.match(requested):
        return requested, False  # the task's device_for reports it, as a local run does
    cuda = requested.startswith("cuda") or (requested == "auto" and cluster_gpus > 0)
    needs_gpu = cuda or "gpu" in case.markers
    if needs_gpu and cluster_gpus <= 0:
        where = f"--device {override}" if override and cuda else case.where("device") if cuda else case.where("markers")
        raise SurgeryInputError(f"{where}: needs a GPU, and no node of the Ray cluster has one")
    return ("cuda" if cuda else "cpu" if requested == "auto" else requested), needs_gpu


def shares_cache(ray: ModuleType, cache: Path) -> bool:
    """Whether a task on every node with CPUs sees the driver's ``cache`` (a file written there is visible)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    marker = cache / f".ray-probe-{uuid.uuid4().hex}"
    try:
        cache.mkdir(parents=True, exist_ok=True)
        marker.write_text("")
    except OSError:
        return False
    try:
        exists = ray.remote(num_cpus=0, max_retries=0)(os.path.isfile)
        nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0]
        refs = [
            exists.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(str(marker))
            for node in nodes
        ]
        return bool(refs) and all(ray.get(refs, timeout=120))
    finally:
        marker.unlink(missing_ok=True)


@dataclass
class CasePlan:
    """One case's tasks and, once they are all back, its outcome."""

    case: Case
    seeds: list[int] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)  # seed tasks in seed order, then baselines (arm by arm)
    calibration: CaseCalibration | None = None
    left_out: dict[str, str] = field(default_factory=dict)  # a variant case's arms this run leaves out, with why
    outcome: CaseResult | Exception | None = None


class RayRun:
    """Cases submitted to the connected Ray cluster; each case's result comes back when its tasks are all done.

    Submitting does all the driver-side checks first (placeholders, calibration records, GPUs, threads): a case
    that fails one is that case's error, and nothing of it is submitted.
    """

    def __init__(
        self,
        cases: list[Case],
        options: RunOptions,
        ray_options: RayOptions | None = None,
        *,
        on_progress: Callable[["RayRun"], None] | None = None,
    ):
        self.ray = require_ray()
        self.options = ray_options or RayOptions()
        self.on_progress = on_progress
        if self.options.weights not in WEIGHTS:
            raise SurgeryInputError(
                f"--ray-weights: got {self.options.weights!r}; expected one of {', '.join(WEIGHTS)}"
            )
        ray = self.ray
        self.threads = requested_threads(options.threads)
        nodes = [n for n in ray.nodes() if n["Alive"]]
        largest = max((n["Resources"].get("CPU", 0) for n in nodes), default=0)
        if largest < self.threads:
            raise SurgeryInputError(
                f"--threads {self.threads}: each task takes {self.threads} CPUs, and the largest "
                f"node of the Ray cluster has {largest:g}"
            )
        gpus = sum(n["Resources"].get("GPU", 0) for n in nodes)
        self.zoo_cpus = min(zoo_threads(), largest)  # a zoo build trains with the zoo's threads, not the run's
        self.weights = self.options.weights
        if self.weights == "auto":
            self.weights = "shared" if shares_cache(ray, cache_dir()) else "object-store"
        env = {}
        if self.weights == "shared":
            env = {key: str(Path(os.environ[key]).expanduser().resolve()) for key in CACHE_ENV if os.environ.get(key)}
            env["SURGERY_CACHE"] = str(cache_dir().expanduser().resolve())
        self.env = env
        self.tracker = ray.remote(num_cpus=0, max_restarts=0)(TaskTracker).remote()
        self.attempts: list[tuple[str, int]] = []  # (task key, pid) per attempt started, as the tracker heard them
        self.plans: list[CasePlan] = []
        self.refs: dict[Any, str] = {}  # outstanding ObjectRef -> task key
        self.plan_of: dict[str, CasePlan] = {}  # task key -> its case
        self.done: dict[str, dict[str, Any]] = {}  # task key -> what the task returned
        self.total = 0
        self.yielded: set[int] = set()
        self.bar: Any = None
        self.zoo_refs: dict[str, Any] = {}  # zoo model -> its build task's ref
        self.remote_case_task, self.remote_zoo_task = ray.remote(case_task), ray.remote(zoo_task)
        for case in cases:
            plan = CasePlan(case)
            self.plans.append(plan)
            try:
                self._submit(plan, options, gpus)
            except SurgeryInputError as exc:
                plan.outcome = exc

    def _submit_zoo(self, name: str) -> Any:
        if name not in self.zoo_refs:
            ref = self.remote_zoo_task.options(
                num_cpus=self.zoo_cpus, num_gpus=0, max_retries=self.options.max_retries, retry_exceptions=False
            ).remote(name, self.env, self.weights == "object-store", self.tracker)
            self.zoo_refs[name] = ref
            self.refs[ref] = f"zoo:{name}"
            self.total += 1
        return self.zoo_refs[name]

    def _submit(self, plan: CasePlan, options: RunOptions, gpus: float) -> None:
        """Check a case on the driver, then submit its seed and baseline tasks (after the zoo builds they read)."""
        case = plan.case
        check_thresholds(case, options)
        plan.calibration = case_calibration(case)
        device, needs_gpu = task_device(case, options.device, gpus)
        source = CaseSource.of(case)
        plan.seeds = case_seeds(case, options)
        names = tuple(zoo_names(case))
        builds = [self._submit_zoo(name) for name in names]
        task_options = dataclasses.replace(
            options, device=device, threads=self.threads, progress=False, seeds=None, max_seeds=None
        )
        kinds = [("seed", s, "") for s in plan.seeds]
        kinds += (
            [("baseline", s, "") for s in plan.seeds]
            if runs_baseline(case, len(plan.seeds), plan.calibration, options)
            else []
        )
        if case.arms:  # a variant case: one task per arm and seed
            plan.left_out = arms_left_out(case, len(plan.seeds), plan.calibration.usable, options)
            kinds = [("arm", s, arm) for arm in case.arms if arm not in plan.left_out for s in plan.seeds]
        for index, (kind, seed, arm) in enumerate(kinds):
            key = f"{case.path} {arm + ' ' if arm else ''}{kind} {seed}"
            if key in plan.keys:  # a seed listed twice runs twice, as it does locally
                key += f" #{index}"
            job = TaskJob(
                key=key,
                kind=kind,
                source=source,
                seed=seed,
                options=task_options,
                env=self.env,
                zoo=names,
                provenance_seeds=tuple(plan.seeds) if index == 0 else None,
                tracker=self.tracker,
                arm=arm,
            )
            ref = self.remote_case_task.options(
                num_cpus=self.threads,
                num_gpus=1 if needs_gpu else 0,
                max_retries=self.options.max_retries,
                retry_exceptions=False,
            ).remote(job, *builds)
            self.refs[ref] = key
            self.plan_of[key] = plan
            plan.keys.append(key)
            self.total += 1

    # ------------------------------------------------------------------ progress

    def running(self) -> dict[str, int]:
        """Tasks started and not back yet: task key -> the process id of its latest attempt."""
        latest = dict(self.attempts)
        outstanding = set(self.refs.values())
        return {key: pid for key, pid in latest.items() if key in outstanding}

    def _show(self) -> None:
        if self.options.progress is False:
            return
        if self.bar is None:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=self.total,
                unit="task",
                desc="ray",
                dynamic_ncols=True,
                disable=None if self.options.progress is None else False,
            )  # None: only on a terminal
        running = len(self.running())
        done = len(self.done)
        self.bar.n = done
        self.bar.set_postfix_str(
            f"{done} done, {running} running, {self.total - done - running} pending", refresh=False
        )
        self.bar.refresh()

    # ------------------------------------------------------------------ collecting

    def _finish(self, plan: CasePlan) -> None:
        results = [self.done[key] for key in plan.keys]
        errors = [r for r in results if "error" in r]
        if errors:
            plan.outcome = self._exception(errors[0])
            return
        provenance = next(r["value"]["provenance"] for r in results if "provenance" in r["value"])
        if plan.case.arms:
            self._finish_variants(plan, results, provenance)
            return
        per_seed = [r["value"]["seed"] for r in results if "seed" in r["value"]]
        baselines = [r["value"]["baseline"] for r in results if "baseline" in r["value"]]
        try:
            plan.outcome = assemble(
                plan.case,
                per_seed,
                baselines,
                provenance=provenance,
                seconds=sum(r["seconds"] for r in results),
                calibration=plan.calibration,
            )
        except SurgeryInputError as exc:
            plan.outcome = exc
        except Exception as exc:  # noqa: BLE001 - reported as this case's internal error; the others go on
            plan.outcome = RemoteError(f"{exc.__class__.__name__}: {exc}", traceback.format_exc())

    def _finish_variants(self, plan: CasePlan, results: list[dict[str, Any]], provenance: dict[str, Any]) -> None:
        per_arm: dict[str, list[dict[str, Any]]] = {}
        seconds: dict[str, float] = {}
        for r in results:  # in submission order: arm by arm, each in seed order
            arm = r["value"]["arm"]
            per_arm.setdefault(arm, []).append(r["value"]["seed"])
            seconds[arm] = seconds.get(arm, 0.0) + r["seconds"]
        try:
            plan.outcome = assemble_variants(
                plan.case,
                per_arm,
                plan.left_out,
                provenance=provenance,
                seconds=seconds,
                total_seconds=sum(seconds.values()),
                calibration=plan.calibration or case_calibration(plan.case),
            )
        except SurgeryInputError as exc:
            plan.outcome = exc
        except Exception as exc:  # noqa: BLE001 - reported as this case's internal error; the others go on
            plan.outcome = RemoteError(f"{exc.__class__.__name__}: {exc}", traceback.format_exc())

    @staticmethod
    def _exception(error: dict[str, Any]) -> Exception:
        if error["error"] == "input":
            return SurgeryInputError(error["message"])
        return RemoteError(error["message"], error.get("traceback", ""))

    def _step(self) -> None:
        """Wait a moment for tasks; take in what came back; finish the cases that are complete."""
        ray = self.ray
        if self.refs:
            ready, _ = ray.wait(list(self.refs), num_returns=1, timeout=POLL_SECONDS)  # back as soon as one is done
            if ready:  # and take whatever else is done by now
                ready, _ = ray.wait(list(self.refs), num_returns=len(self.refs), timeout=0)
            for ref in ready:
                if ref not in self.refs:  # cancelled just now, with the rest of a case that failed
                    continue
                key = self.refs.pop(ref)
                try:
                    self.done[key] = ray.get(ref)
                except ray.exceptions.RayError as exc:  # the worker died more often than max_retries, OOM ...
                    self.done[key] = {
                        "error": "internal",
                        "message": f"{exc.__class__.__name__}: "
                        f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}",
                    }
                plan = self.plan_of.get(key)
                if plan is not None and plan.outcome is None:
                    if "error" in self.done[key]:  # the case has failed: its other tasks need not run
                        for other, other_key in list(self.refs.items()):
                            if self.plan_of.get(other_key) is plan:
                                ray.cancel(other)
                                del self.refs[other]
                                self.done[other_key] = {"error": "cancelled"}
                        plan.outcome = self._exception(self.done[key])
                    elif all(k in self.done for k in plan.keys):
                        self._finish(plan)
        self.attempts += ray.get(self.tracker.since.remote(len(self.attempts)))
        self._show()
        if self.on_progress is not None:
            self.on_progress(self)

    def results(self) -> Iterator[tuple[Case, CaseResult | Exception]]:
        """Each case with its outcome (a CaseResult, or the exception that stopped it, not raised) as it finishes.

        Leaving early (Ctrl-C, an exception in the caller) cancels the tasks still out.
        """
        try:
            while True:
                for index, plan in enumerate(self.plans):
                    if plan.outcome is not None and index not in self.yielded:
                        self.yielded.add(index)
                        if self.bar is not None:
                            self.bar.clear()
                        yield plan.case, plan.outcome
                if len(self.yielded) == len(self.plans):
                    return
                self._step()
        finally:
            self.close()

    def outcome(self, case: Case) -> CaseResult | Exception:
        """The outcome of one submitted case, waiting for it (other cases finish meanwhile, kept for later)."""
        plan = next(p for p in self.plans if p.case is case)
        while plan.outcome is None:
            self._step()
        return plan.outcome

    def close(self) -> None:
        """Cancel every task still out (its results are dropped), stop the tracker, close the bar."""
        for ref in list(self.refs):
            self.ray.cancel(ref)
        self.refs.clear()
        with contextlib.suppress(Exception):
            self.ray.kill(self.tracker)
        if self.bar is not None:
            self.bar.close()
            self.bar = None


Outcome = CaseResult | Exception  # a case's result, or the exception that stopped it (returned, not raised)


def run_cases_on_ray(
    cases: list[Case],
    options: RunOptions,
    ray_options: RayOptions | None = None,
    *,
    on_progress: Callable[[RayRun], None] | None = None,
) -> Iterator[tuple[Case, Outcome]]:
    """Run ``cases`` on Ray (joining or starting a cluster, see :func:`connect`): each case with its outcome as it
    finishes, a CaseResult equal to a local run's or the exception that stopped the case (not raised)."""
    ray_options = ray_options or RayOptions()
    connected = connect(ray_options.address, quiet=ray_options.progress is False)
    try:
        yield from RayRun(cases, options, ray_options, on_progress=on_progress).results()
    finally:
        if connected:
            disconnect()
