"""The zoo: recipes trained once, cached by recipe hash, written atomically under a file lock.

Recipes are shrunk to a few steps (``dataclasses.replace``); the cache lives in ``tmp_path``.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import time
from pathlib import Path

import pytest
import torch

from surgery.train import zoo
from surgery.files import write_atomic
from surgery.errors import SurgeryInputError
from surgery.models.checkpoints import load_state_dict_file

NAME = "mnist-stem"  # the cheapest recipe: a 7×7 stem inside a small net
STEPS = 3


def _shrink(name: str = NAME, steps: int = STEPS) -> zoo.Recipe:
    """The recipe with few steps, in ``zoo.ZOO`` (in this process)."""
    small = dataclasses.replace(zoo.ZOO[name], steps=steps)
    zoo.ZOO[name] = small
    return small


@pytest.fixture
def small_zoo(isolated_cache, monkeypatch):
    monkeypatch.setitem(zoo.ZOO, NAME, dataclasses.replace(zoo.ZOO[NAME], steps=STEPS))
    return isolated_cache


def _files(cache: Path) -> list[Path]:
    return sorted(p for p in (cache / "zoo").iterdir()) if (cache / "zoo").exists() else []


def _leftovers(cache: Path) -> list[Path]:
    """Temporary files write_atomic would leave behind on a failure."""
    return [p for p in _files(cache) if p.name.endswith(".tmp")]


def test_cache_dir_follows_env(tmp_path, monkeypatch):
    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path / "c"))
    assert zoo.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("SURGERY_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert zoo.cache_dir() == tmp_path / "xdg" / "surgery"


def test_recipe_key_changes_with_the_recipe():
    recipe = zoo.ZOO[NAME]
    assert recipe.key() == dataclasses.replace(recipe).key()
    assert recipe.key() != dataclasses.replace(recipe, steps=recipe.steps + 1).key()
    assert recipe.key() != dataclasses.replace(recipe, seed=1).key()
    assert zoo.zoo_path(recipe) != zoo.zoo_path(dataclasses.replace(recipe, lr=1e-4))


def test_required_models_are_in_the_zoo():
    assert {"mnist-resnet50", "mnist-resnet18", "shapes-resnet18", "mnist-stem"} <= set(zoo.ZOO)
    stem = zoo.make_stem()
    assert (stem.in_channels, stem.out_channels, stem.kernel_size, stem.stride) == (3, 64, (7, 7), (2, 2))


def test_build_writes_one_file_atomically_with_metadata(small_zoo):
    path = zoo.build(NAME)
    assert path == zoo.zoo_path(zoo.ZOO[NAME]) and path.is_file() and path.suffix == ".safetensors"
    assert [p for p in _files(small_zoo) if p.suffix == ".safetensors"] == [path]
    assert not _leftovers(small_zoo)
    meta = zoo.metadata(NAME)
    assert 0.0 <= meta["test_accuracy"] <= 1.0
    recipe = json.loads(meta["recipe"])
    assert recipe["steps"] == STEPS and recipe["name"] == NAME
    state = load_state_dict_file(path)
    assert list(state) == ["weight"] and state["weight"].shape == (64, 3, 7, 7)  # the stem alone


def test_second_build_reuses_the_file(small_zoo, monkeypatch):
    path = zoo.build(NAME)
    mtime = path.stat().st_mtime_ns
    time.sleep(0.01)

    def must_not_train(*args, **kwargs):
        raise AssertionError("rebuilt a cached model")

    monkeypatch.setattr(zoo, "train_recipe", must_not_train)
    assert zoo.build(NAME) == path
    assert path.stat().st_mtime_ns == mtime


def test_load_zoo_model_uses_the_cache(small_zoo):
    model = zoo.load_zoo_model(NAME)
    assert isinstance(model, torch.nn.Conv2d) and not model.training
    assert torch.equal(model.weight, load_state_dict_file(zoo.zoo_path(zoo.ZOO[NAME]))["weight"])
    rows = {r["name"]: r for r in zoo.status()}
    assert set(rows) == set(zoo.ZOO)
    assert rows[NAME]["cached"] and rows[NAME]["test_accuracy"] is not None
    assert not rows["mnist-resnet50"]["cached"] and rows["mnist-resnet50"]["test_accuracy"] is None


def test_build_is_deterministic(small_zoo, tmp_path, monkeypatch):
    first = load_state_dict_file(zoo.build(NAME))
    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path / "other-cache"))
    second = load_state_dict_file(zoo.build(NAME))
    assert torch.equal(first["weight"], second["weight"])


def test_the_zoo_trains_with_its_own_thread_count_whatever_the_caller_pinned(small_zoo, tmp_path, monkeypatch):
    """A 1-thread pytest worker and a 2-thread ``surgery zoo build`` cache the same model (threads move weights)."""
    weights, before = {}, torch.get_num_threads()
    try:
        for caller, zoo_env in ((1, None), (2, None), (2, "1")):
            if zoo_env is None:
                monkeypatch.delenv("SURGERY_ZOO_THREADS", raising=False)
            else:
                monkeypatch.setenv("SURGERY_ZOO_THREADS", zoo_env)
            monkeypatch.setenv("SURGERY_CACHE", str(tmp_path / f"caller{caller}-zoo{zoo_env}"))
            torch.set_num_threads(caller)
            weights[caller, zoo_env] = load_state_dict_file(zoo.build(NAME))["weight"]
            assert torch.get_num_threads() == caller  # the caller's count is back
            assert zoo.metadata(NAME)["threads"] == (zoo_env or "2")
    finally:
        torch.set_num_threads(before)
    assert torch.equal(weights[1, None], weights[2, None])
    assert not torch.equal(weights[2, "1"], weights[2, None])  # so the thread count does matter here


def test_unknown_name(small_zoo):
    with pytest.raises(SurgeryInputError, match="unknown zoo model 'nope'.*mnist-resnet18"):
        zoo.build("nope")
    with pytest.raises(SurgeryInputError, match="did you mean mnist-stem"):
        zoo.load_zoo_model("mnist-stm")


def test_corrupt_cached_file_is_bad_input(small_zoo):
    path = zoo.zoo_path(zoo.ZOO[NAME])
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\x00" * 64)
    with pytest.raises(SurgeryInputError, match=str(path.name)):
        zoo.load_zoo_model(NAME)
    with pytest.raises(SurgeryInputError, match=str(path.name)):
        zoo.metadata(NAME)


# --------------------------------------------------------------------------- failures mid-write


class _DiskFull(OSError):
    pass


def _failing_save(state, filename, metadata=None):
    """Write half a file, then fail: what a full disk or a kill in the middle looks like."""
    Path(filename).write_bytes(b"partial safetensors bytes" * 10)
    raise _DiskFull("no space left on device")


def test_failure_mid_write_leaves_no_partial_file(small_zoo, monkeypatch):
    import safetensors.torch

    real_save = safetensors.torch.save_file
    monkeypatch.setattr(safetensors.torch, "save_file", _failing_save)
    with pytest.raises(_DiskFull):
        zoo.build(NAME)
    path = zoo.zoo_path(zoo.ZOO[NAME])
    assert not path.exists()
    assert not _leftovers(small_zoo)
    assert zoo.metadata(NAME) is None
    monkeypatch.setattr(safetensors.torch, "save_file", real_save)  # the lock was released: a later build works
    assert zoo.build(NAME) == path and load_state_dict_file(path)


@pytest.mark.parametrize("error", [_DiskFull("disk full"), KeyboardInterrupt()])
def test_write_atomic_keeps_the_previous_file(tmp_path, error):
    target = tmp_path / "out" / "model.safetensors"
    write_atomic(target, lambda tmp: tmp.write_bytes(b"version 1"))
    assert target.read_bytes() == b"version 1"

    def fail_halfway(tmp: Path) -> None:
        tmp.write_bytes(b"version 2, half writ")
        raise error

    with pytest.raises(type(error)):
        write_atomic(target, fail_halfway)
    assert target.read_bytes() == b"version 1"
    assert sorted(p.name for p in target.parent.iterdir()) == ["model.safetensors"]
    write_atomic(target, lambda tmp: tmp.write_bytes(b"version 2"))
    assert target.read_bytes() == b"version 2"
    assert sorted(p.name for p in target.parent.iterdir()) == ["model.safetensors"]


# --------------------------------------------------------------------------- two processes at once


def _build_in_child(cache: str, name: str, steps: int, log_dir: str, barrier) -> None:
    """Run in a spawned process: build the (shrunk) recipe; log each actual training."""
    os.environ["SURGERY_CACHE"] = cache
    _shrink(name, steps)
    train = zoo.train_recipe

    def logged_train(recipe, **kwargs):
        (Path(log_dir) / f"trained-{os.getpid()}").write_text("")
        time.sleep(1.0)  # hold the lock long enough for the other process to be waiting on it
        return train(recipe, **kwargs)

    zoo.train_recipe = logged_train
    barrier.wait(timeout=240)  # both processes call build at the same moment: neither finds a cached file
    path = zoo.build(name)
    (Path(log_dir) / f"built-{os.getpid()}").write_text(str(path))


def test_two_processes_build_once(small_zoo, tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [
        ctx.Process(target=_build_in_child, args=(str(small_zoo), NAME, STEPS, str(logs), barrier)) for _ in range(2)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0, 0]
    built = [f.read_text() for f in logs.glob("built-*")]
    trained = list(logs.glob("trained-*"))
    path = zoo.zoo_path(zoo.ZOO[NAME])
    assert built == [str(path), str(path)]
    assert len(trained) == 1  # the second process waited on the lock, then found the file (no double training)
    assert [p for p in _files(small_zoo) if p.suffix == ".safetensors"] == [path]
    assert not _leftovers(small_zoo)
    assert load_state_dict_file(path)["weight"].shape == (64, 3, 7, 7)
    assert 0.0 <= zoo.metadata(NAME)["test_accuracy"] <= 1.0


def test_pytest_shows_one_line_per_zoo_model_trained(small_zoo, pytester):
    """A case whose zoo model is not cached yet: pytest prints what it trains, and how long it took."""
    cases = pytester.mkdir("cases")
    (cases / "graft.yaml").write_text("""\
name: zoo-progress
device: cpu
data: {train: {name: digits, limit: 100}, image_size: 16, split_seed: 0}
source: {model: "surgery.train.zoo:stem_trainer", num_classes: 10}
surgery: {op: graft, donor: {model: "zoo:mnist-stem"}, path: conv1}
finetune: {steps: 1, batch_size: 8}
expect: {coverage: {tensors_min: 0.0}}
""")
    result = pytester.runpytest_inprocess(str(cases), "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(
        [
            "*zoo: training mnist-stem (surgery.train.zoo:stem_trainer on mnist5k, 3 steps*",
            "*zoo: mnist-stem trained in * s, test accuracy *",
        ]
    )
