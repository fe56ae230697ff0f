"""``surgery run --ray`` and ``pytest --surgery-ray`` against a real local Ray cluster (never a mock).

One cluster of 2 CPUs serves the module (started by ``surgery.running.ray_runner.connect`` in a session fixture); a
subprocess joins it by its address. The long forms are marked ``slow`` (``make test-slow``, nightly): a test that
starts a second cluster with ``ray start --head`` and drives it from a subprocess, and the killed-worker tests
on a task five times longer. The case is tiny: a ResNet stem trained in the zoo (``zoo:mnist-stem``, about 3 s
to train) grafted into a small net on 240 UCI digits at 16 px, so most of the time is Ray's: starting workers
that import torch.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from surgery.case import load_case, parse_case
from surgery.errors import SurgeryInputError
from surgery.train.numerics import outside_xdist
from surgery.running.ray_check import INSTALL_HINT
from surgery.running.ray_runner import (
    WORKER_NICENESS_ENV,
    RayOptions,
    RemoteError,
    connect,
    disconnect,
    install_weights,
    run_cases_on_ray,
    task_device,
)
from surgery.models.recipes import ZOO
from surgery.report.render import write_case_report
from surgery.results import CaseResult
from surgery.running.cases import run_case
from surgery.running.runner import RunOptions
from surgery.train.zoo import zoo_path

from cli_runs import CaseRun, run_case_file, run_cli  # the in-process CLI harness of tests/

ROOT = Path(__file__).resolve().parent.parent
SURGERY = [sys.executable, "-m", "surgery.cli"]

CASE = """\
name: {name}
seed: [0, 1]
device: cpu
data: {{train: {{name: digits, limit: 240}}, image_size: 16, split_seed: 0}}
source: {{model: "surgery.train.zoo:stem_trainer", num_classes: 10}}
surgery: {{op: graft, donor: {{model: "zoo:mnist-stem"}}, path: {path}}}
finetune: {{steps: {steps}, batch_size: 16, eval_every: {eval_every}, optimizer: {{name: adamw, lr: 0.003}}}}
expect:
  coverage: {{tensors_min: 0.0}}
  accuracy: {{after_min: 0.0{baseline}}}
"""
ONE_SEED = ("--seeds", "1", "--threads", "1")  # what the local and the Ray run of a case compare under


def write_case(directory: Path, name: str, *, steps: int = 30, path: str = "conv1", baseline: bool = True) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    file = directory / f"{name}.yaml"
    file.write_text(
        CASE.format(
            name=name,
            steps=steps,
            eval_every=min(steps, 10),
            path=path,
            baseline=", beats_baseline: {margin: -1.0}" if baseline else "",
        )
    )
    return file


def figures(results: dict) -> dict:
    """What must not differ between two runs of a case: verdicts, metrics, per-seed accuracies and curves."""
    return {
        "expectations": [(e["name"], e["passed"], e["observed"]) for e in results["expectations"]],
        "metrics": results["metrics"],
        "seeds": results["seeds"],
        "accuracy": [s["accuracy"] for s in results["per_seed"]],
        "curves": [(s["finetune"]["curve"], s["baseline_curve"]) for s in results["per_seed"]],
        "weights": list(results["provenance"]["weights"].values()),
        "threads": results["provenance"]["threads"],
    }


def report_files(report: Path) -> list[str]:
    return sorted(str(p.relative_to(report)) for p in report.rglob("*") if p.is_file())


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """A real local cluster of 2 CPUs for the session. Its workers' own ``SURGERY_CACHE`` (the node's disk, for
    object-store weights) is a directory of their own, apart from any test's."""
    pytest.importorskip("ray")
    node_cache = tmp_path_factory.mktemp("ray-node-cache")
    with pytest.MonkeyPatch.context() as mp:  # the cluster's processes inherit the environment at start
        mp.setenv("SURGERY_CACHE", str(node_cache))
        mp.delenv(WORKER_NICENESS_ENV, raising=False)  # connect's own default, which a test below checks
        mp.delenv("RAY_ADDRESS", raising=False)
        # and SIGINT ignored, as a cluster started from a background job has it: a cancelled task must stop anyway
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            assert connect(None, quiet=True, num_cpus=2)  # what `surgery run --ray` with no address starts
        finally:
            signal.signal(signal.SIGINT, previous)
    yield node_cache
    disconnect()


@pytest.fixture(scope="module")
def driver_cache(tmp_path_factory):
    """The driver's zoo cache (empty at first: the first Ray run builds the zoo model as a task)."""
    with pytest.MonkeyPatch.context() as mp:
        cache = tmp_path_factory.mktemp("driver-cache")
        mp.setenv("SURGERY_CACHE", str(cache))
        mp.setenv("TORCH_HOME", str(cache / "torch"))
        yield cache


@pytest.fixture(scope="module")
def runs(ray_cluster, driver_cache, tmp_path_factory) -> dict[str, CaseRun | bool]:
    """The tiny case run with ``--ray`` first (cold zoo cache), then locally, both at 1 seed and 1 thread."""
    directory = tmp_path_factory.mktemp("runs")
    case = write_case(directory / "cases", "tiny")
    ray_run = run_case_file(case, directory / "ray", *ONE_SEED, "--ray", "--export", directory / "ray-export")
    zoo_built = zoo_path(ZOO["mnist-stem"]).is_file()
    local = run_case_file(case, directory / "local", *ONE_SEED, "--export", directory / "local-export")
    return {"ray": ray_run, "local": local, "zoo_built_by_ray": zoo_built, "exports": directory}


def test_ray_run_writes_what_a_local_run_writes(runs):
    ray_run, local = runs["ray"], runs["local"]
    assert (ray_run.rc, local.rc) == (0, 0), ray_run.err + local.err
    assert ray_run.err == ""  # --quiet: no bar, no Ray log lines
    assert ray_run.out.splitlines()[0].startswith("PASS tiny: 4/4 expectations held")
    assert report_files(ray_run.report) == report_files(local.report)
    assert {"index.html", "tiny/report.html", "tiny/results.json"} <= set(report_files(ray_run.report))
    assert figures(ray_run.results) == figures(local.results)
    accuracy = ray_run.results["per_seed"][0]["accuracy"]
    assert accuracy["after"] != accuracy["before"] and "baseline" in accuracy  # a real run, baseline merged in
    assert ray_run.results["provenance"]["threads"] == 1
    assert runs["zoo_built_by_ray"]  # the zoo model came from a Ray task into the shared (driver's) cache


def test_a_variant_case_on_ray_runs_one_task_per_arm_and_seed_with_the_local_figures(runs, tmp_path):
    """Each arm and seed of a variant case is a task of its own; the comparisons come out as a local run's."""
    from test_variants import variant_text  # the tiny variant case of tests/test_variants.py

    case = tmp_path / "cases" / "variants.yaml"
    case.parent.mkdir()
    case.write_text(variant_text())
    ray_run = run_case_file(case, tmp_path / "ray", *ONE_SEED, "--ray")
    local = run_case_file(case, tmp_path / "local", *ONE_SEED)
    assert (ray_run.rc, local.rc) == (local.rc, local.rc) and ray_run.err == "", ray_run.err + local.err
    assert ray_run.results["variants"]["after"] == local.results["variants"]["after"]
    assert ray_run.results["variants"]["inits"] == local.results["variants"]["inits"]
    shown = [(e["name"], e["status"], e["observed"]) for e in ray_run.results["expectations"]]
    assert shown == [(e["name"], e["status"], e["observed"]) for e in local.results["expectations"]]
    assert set(ray_run.results["arms"]) == {"exact", "select", "random"}


def test_ray_export_writes_the_local_runs_patients(runs):
    """--export on Ray: the patients come back through the object store, bit-identical to a local run's."""
    from safetensors.torch import load_file

    from surgery.running.export import read_metadata

    ray_file, local_file = (
        runs["exports"] / side / "tiny" / "seed-0.safetensors" for side in ("ray-export", "local-export")
    )
    ray_state, local_state = load_file(str(ray_file)), load_file(str(local_file))
    assert ray_state.keys() == local_state.keys()
    assert all(ray_state[k].equal(local_state[k]) for k in local_state)
    assert read_metadata(ray_file) == read_metadata(local_file)
    assert read_metadata(ray_file)["verdict"] == "pass"


def test_a_cluster_connect_starts_runs_its_workers_at_normal_priority(ray_cluster):
    """At Ray's default nice 15, torch's OpenMP threads stall beside any other busy process (a 2-thread zoo
    build beside the other pytest-xdist worker took 75 s instead of 3 s); a cluster :func:`connect` starts
    runs them at the driver's own priority."""
    import ray

    assert ray.get(ray.remote(num_cpus=1)(lambda: os.nice(0)).remote()) == os.nice(0)


def test_object_store_weights_reach_workers_without_the_drivers_disk(runs, ray_cluster, tmp_path, monkeypatch, capsys):
    """Weights through the object store: the driver's cache stays empty, the node's own cache gets the model,
    and the figures are the local run's. The bar (forced on: no terminal here) shows done / running / pending."""
    empty = tmp_path / "driver-cache"
    monkeypatch.setenv("SURGERY_CACHE", str(empty))
    case = load_case(runs["local"].case)
    seen: set[str] = set()
    outcomes = list(
        run_cases_on_ray(
            [case],
            RunOptions(max_seeds=1, threads=1),
            RayOptions(weights="object-store", progress=True),
            on_progress=lambda run: seen.update(key for key, _ in run.attempts),
        )
    )
    [(_, result)] = outcomes
    assert isinstance(result, CaseResult), result
    assert figures(json.loads(json.dumps(result.to_dict()))) == figures(runs["local"].results)
    assert not empty.exists()
    assert (ray_cluster / "zoo" / zoo_path(ZOO["mnist-stem"]).name).is_file()
    assert {"zoo:mnist-stem", f"{case.path} seed 0", f"{case.path} baseline 0"} <= seen
    err = capsys.readouterr().err
    assert "ray: 100%" in err and "3 done, 0 running, 0 pending" in err and " pending" in err


def test_install_weights_writes_the_bytes_once_and_replaces_others(runs, driver_cache, tmp_path, monkeypatch):
    data = zoo_path(ZOO["mnist-stem"]).read_bytes()
    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path / "node"))
    path = install_weights("mnist-stem", data)
    assert path == zoo_path(ZOO["mnist-stem"]) and path.read_bytes() == data
    mtime = path.stat().st_mtime_ns
    assert install_weights("mnist-stem", data) == path and path.stat().st_mtime_ns == mtime  # same bytes: kept
    path.write_bytes(b"weights trained elsewhere")
    install_weights("mnist-stem", data)
    assert path.read_bytes() == data  # the run's weights win, so every task of a run reads the same model
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


# How long a seed task a test kills runs: long enough to be seen running (its process id is known at its start,
# polled every 0.2 s), short enough for CI; the long form (minutes on 2 busy cores) is the nightly's.
KILLED_STEPS = [300, pytest.param(1500, marks=pytest.mark.slow, id="1500-slow")]


@pytest.mark.parametrize("steps", KILLED_STEPS)
def test_a_killed_worker_is_retried_and_nothing_is_lost(runs, driver_cache, tmp_path, steps):
    """SIGKILL the worker process of a running seed task: Ray retries it, the case completes with the figures
    of a local run."""
    case = load_case(write_case(tmp_path, "long", steps=steps, baseline=False))
    key = f"{case.path} seed 0"
    killed: list[int] = []

    def kill_once(run) -> None:
        pid = run.running().get(key)
        if pid is not None and not killed:
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    [(_, result)] = list(
        run_cases_on_ray([case], RunOptions(max_seeds=1, threads=1), RayOptions(progress=False), on_progress=kill_once)
    )
    assert killed, "the seed task never showed as running"
    assert isinstance(result, CaseResult), result
    local = run_case(case, RunOptions(max_seeds=1, threads=1, progress=False))
    as_json = lambda r: json.loads(json.dumps(r.to_dict()))  # noqa: E731
    assert figures(as_json(result)) == figures(as_json(local))


@pytest.mark.parametrize("steps", KILLED_STEPS)
def test_a_worker_killed_past_its_retries_is_that_cases_internal_error(runs, driver_cache, tmp_path, steps):
    cases = [
        load_case(write_case(tmp_path, "doomed", steps=steps, baseline=False)),
        load_case(write_case(tmp_path, "fine", steps=5, baseline=False)),
    ]
    key = f"{cases[0].path} seed 0"

    killed: set[int] = set()

    def kill(run) -> None:
        # Each worker once: a killed worker can still show as running for a poll or two.
        pid = run.running().get(key)
        if pid is not None and pid not in killed:
            killed.add(pid)
            with contextlib.suppress(ProcessLookupError):  # it died between the poll and the kill
                os.kill(pid, signal.SIGKILL)

    outcomes = dict(
        (c.name, o)
        for c, o in run_cases_on_ray(
            cases, RunOptions(max_seeds=1, threads=1), RayOptions(progress=False, max_retries=0), on_progress=kill
        )
    )
    assert isinstance(outcomes["doomed"], RemoteError) and "Worker" in str(outcomes["doomed"])
    assert isinstance(outcomes["fine"], CaseResult) and outcomes["fine"].passed


def test_a_case_that_raises_is_its_error_and_the_others_finish(runs, tmp_path):
    """A graft path that does not exist is found only when the case runs: the same located line and exit 2 as a
    local run, and the good case's report is written all the same."""
    cases = tmp_path / "cases"
    write_case(cases, "good")
    write_case(cases, "bad", path="nope")
    local = run_cli("run", cases, "--report", tmp_path / "local", "--quiet", *ONE_SEED)
    on_ray = run_cli("run", cases, "--report", tmp_path / "ray", "--quiet", *ONE_SEED, "--ray")
    assert (local.rc, on_ray.rc) == (2, 2), on_ray.err
    assert on_ray.err == local.err and len(on_ray.err.splitlines()) == 1
    assert on_ray.err.startswith(f"surgery: error: {cases / 'bad.yaml'}:6: surgery.path: ")
    assert (tmp_path / "ray" / "good" / "results.json").is_file() and not (tmp_path / "ray" / "bad").exists()
    assert "PASS good" in on_ray.out and (tmp_path / "ray" / "index.html").is_file()


@pytest.fixture
def default_sigint():
    """Python's own Ctrl-C handler for the test (KeyboardInterrupt in the main thread), whatever ran before it
    in this process left installed; put back afterwards."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_cancels_the_tasks_and_writes_nothing(runs, driver_cache, ray_cluster, tmp_path, default_sigint):
    import ray

    case = load_case(write_case(tmp_path, "interrupted", steps=100_000, baseline=False))  # minutes, alone
    report = tmp_path / "reports"
    key = f"{case.path} seed 0"
    interrupts: list[bool] = []  # per Ctrl-C sent: whether the task showed as running then

    def interrupt(run) -> None:
        # Ctrl-C while the driver waits on the task: once it shows as running, or, on a machine so busy that its
        # start is not reported yet, 20 s after the run began (then the task is cancelled while pending).
        running = key in run.running()
        if running or time.monotonic() - started > 20:
            interrupts.append(running)
            os.kill(os.getpid(), signal.SIGINT)

    outcomes: list = []
    started = time.monotonic()
    try:
        for _, outcome in run_cases_on_ray(
            [case], RunOptions(max_seeds=1, threads=1), RayOptions(progress=False), on_progress=interrupt
        ):
            outcomes.append(outcome)
            write_case_report(outcome, report)  # what the CLI does with a finished case
        interrupted = False
    except KeyboardInterrupt:
        interrupted = True
    assert interrupted, f"the run was not interrupted (interrupts sent: {interrupts}; outcomes: {outcomes})"
    assert not report.exists() and not outcomes
    deadline = time.monotonic() + 60  # far less than the task alone would run (minutes)
    while ray.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:  # the task was cancelled
        time.sleep(0.2)
    assert ray.available_resources().get("CPU", 0) == 2


def test_pytest_surgery_ray_keeps_one_item_per_expectation(runs, pytester):
    cases = pytester.mkdir("cases")
    shutil.copy(runs["local"].case, cases / "tiny.yaml")
    report = pytester.path / "reports"
    result = pytester.runpytest_inprocess(
        str(cases),
        "--surgery-ray",
        "--surgery-seeds",
        "1",
        "--surgery-threads",
        "1",
        "--surgery-report",
        str(report),
        "-p",
        "no:cacheprovider",
        "-v",
    )
    result.assert_outcomes(passed=4)
    result.stdout.fnmatch_lines(["*tiny.yaml::coverage.tensors_min PASSED*", "*tiny.yaml::finite PASSED*"])
    on_ray = json.loads((report / "tiny" / "results.json").read_text())
    assert figures(on_ray) == figures(runs["local"].results)


def test_pytest_surgery_ray_with_xdist_is_a_usage_error(runs, pytester):
    cases = pytester.mkdir("cases")
    shutil.copy(runs["local"].case, cases / "tiny.yaml")
    result = pytester.runpytest_inprocess(str(cases), "--surgery-ray", "-n", "2", "-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: --surgery-ray and pytest-xdist (-n) both spread the cases: use one"])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_joining(address: str, runs, report: Path) -> None:
    """``surgery run --ray ADDRESS`` in a process of its own on the tiny case: exit 0 and the local run's figures."""
    proc = subprocess.run(
        [*SURGERY, "run", str(runs["local"].case), "--report", str(report), "--quiet", *ONE_SEED, "--ray", address],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert figures(json.loads((report / "tiny" / "results.json").read_text())) == figures(runs["local"].results)


def test_surgery_run_joins_a_running_cluster_by_its_address(runs, driver_cache, ray_cluster, tmp_path):
    """Another process joins the session's cluster by its address (``surgery run --ray HOST:PORT``), as it would
    join one started with ``ray start`` (that form, which starts a second cluster, is the slow test below)."""
    import ray

    address = ray.get_runtime_context().gcs_address
    assert address and ":" in address
    _run_joining(address, runs, tmp_path / "reports")


@pytest.mark.slow
def test_surgery_run_joins_a_cluster_started_with_ray_start(runs, driver_cache, tmp_path):
    """``ray start --head`` on 127.0.0.1 (its own temp dir and process group, so stopping it stops nothing
    else: ``ray stop`` would stop every Ray process on the machine), then ``surgery run --ray 127.0.0.1:P``."""
    port = _free_port()
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    head = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("ray")),
            "start",
            "--head",
            "--block",
            "--port",
            str(port),
            "--num-cpus",
            "2",
            "--node-ip-address",
            "127.0.0.1",
            "--include-dashboard",
            "false",
            "--disable-usage-stats",
            "--temp-dir",
            temp_dir,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        env={**os.environ, WORKER_NICENESS_ENV: "0"},
    )  # as connect sets it
    try:
        for line in head.stdout:
            if "Ray runtime started" in line:
                break
        else:
            pytest.fail("ray start --head did not start")
        _run_joining(f"127.0.0.1:{port}", runs, tmp_path / "reports")
    finally:  # the cluster's processes share the group of `ray start` (its session): stop them all, and only them
        try:
            os.killpg(head.pid, signal.SIGTERM)
            head.wait(timeout=3)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)
        head.wait(timeout=30)
        shutil.rmtree(temp_dir, ignore_errors=True)


# ------------------------------------------------------------------------- no cluster needed


def test_without_ray_installed_ray_options_are_one_line_errors(tmp_path):
    """Blocking the import of ray (as if not installed): ``--ray`` is exit 2 with one line naming the extra,
    ``--surgery-ray`` a pytest usage error; neither ``surgery`` nor a local run imports ray."""
    case = write_case(tmp_path / "cases", "tiny")
    code = f"""
import sys
import surgery, surgery.cli, surgery.plugin, surgery.running.runner, surgery.running.ray_runner
assert "ray" not in sys.modules, "importing surgery imported ray"
sys.modules["ray"] = None  # what an environment without Ray gives: ImportError
rc = surgery.cli.main(["run", {str(case)!r}, "--report", {str(tmp_path / "reports")!r}, "--ray"])
print("rc", rc)
import pytest
print("pytest", int(pytest.main([{str(tmp_path / "cases")!r}, "--surgery-ray", "-p", "no:cacheprovider", "-q"])))
"""
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        env=outside_xdist(os.environ),
    )  # a plain session, not a worker
    assert "rc 2" in proc.stdout and "pytest 4" in proc.stdout, proc.stdout + proc.stderr
    lines = proc.stderr.splitlines()
    assert lines[0] == f"surgery: error: --ray: Ray is not installed; install the extra: {INSTALL_HINT}"
    assert f"ERROR: --surgery-ray: Ray is not installed; install the extra: {INSTALL_HINT}" in lines
    assert not (tmp_path / "reports").exists()


def test_a_path_given_as_the_address_is_bad_input(tmp_path):
    case = write_case(tmp_path / "cases", "tiny")
    rc, out, err = run_cli("run", tmp_path / "other.yaml", "--ray", case, "--report", tmp_path / "r")
    assert rc == 2 and out == ""
    assert (
        err == f"surgery: error: --ray: {str(case)!r} is a path, not a Ray address; put --ray after the case "
        "files, or write --ray=ADDRESS\n"
    )


def test_task_device_puts_cuda_and_gpu_cases_on_gpu_nodes_only():
    text = CASE.format(name="d", steps=1, eval_every=1, path="conv1", baseline="")
    cpu, auto = parse_case(text, "c.yaml"), parse_case(text.replace("device: cpu", "device: auto"), "c.yaml")
    cuda1 = parse_case(text.replace("device: cpu", "device: cuda:1"), "c.yaml")
    marked = parse_case(text.replace("device: cpu", "device: auto\nmarkers: [gpu]"), "c.yaml")
    assert task_device(cpu, None, 0) == ("cpu", False) and task_device(auto, None, 0) == ("cpu", False)
    assert task_device(auto, None, 2) == ("cuda", True)  # auto takes the cluster's GPUs
    assert task_device(cuda1, None, 2) == ("cuda", True)  # Ray picks the GPU: cuda:N is cuda
    assert task_device(cpu, "cuda", 1) == ("cuda", True)
    assert task_device(marked, None, 1) == ("cuda", True)
    with pytest.raises(SurgeryInputError, match=r"^c.yaml:3: device: needs a GPU, and no node"):
        task_device(cuda1, None, 0)
    with pytest.raises(SurgeryInputError, match=r"^c.yaml:4: markers: needs a GPU"):
        task_device(marked, "cpu", 0)
    with pytest.raises(SurgeryInputError, match=r"^--device cuda: needs a GPU"):
        task_device(cpu, "cuda", 0)
