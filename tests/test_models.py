"""Model references and checkpoints: safe loading only, clear errors, nothing downloaded, no code run."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from surgery.case import ModelSpec
from surgery.errors import SurgeryInputError
from surgery.running.builder import build_model
from surgery.models.model_refs import validate_model_ref
from surgery.models.checkpoints import build_architecture, clean_key, clean_prefixes, load_state_dict_file, load_weights

pytestmark = pytest.mark.usefixtures("isolated_cache")


@pytest.fixture
def tiny(make_tiny):
    return make_tiny(seed=0, in_chans=3)


def _equal_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert message and "\n" not in message
    return message


# --------------------------------------------------------------------------- loading files


def test_pt_state_dict_round_trip(tmp_path, tiny):
    torch.save(tiny.state_dict(), tmp_path / "w.pt")
    loaded = load_state_dict_file(tmp_path / "w.pt")
    assert _equal_state(loaded, tiny.state_dict())
    assert list(loaded) == list(tiny.state_dict())  # order kept (the `order` strategy relies on it)


@pytest.mark.parametrize("wrapper", ["state_dict", "model", "model_state_dict"])
@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_pth_wrapped_and_prefixed(tmp_path, tiny, wrapper, prefix):
    state = {prefix + k: v for k, v in tiny.state_dict().items()}
    torch.save({wrapper: state, "epoch": 3, "optimizer": {"lr": 0.1}}, tmp_path / "w.pth")
    loaded = load_state_dict_file(tmp_path / "w.pth")
    assert _equal_state(loaded, tiny.state_dict())


def test_safetensors(tmp_path, tiny):
    from safetensors.torch import save_file

    save_file({"module." + k: v.contiguous() for k, v in tiny.state_dict().items()}, str(tmp_path / "w.safetensors"))
    loaded = load_state_dict_file(tmp_path / "w.safetensors")
    assert _equal_state(loaded, tiny.state_dict())


def test_clean_prefixes():
    assert clean_key("module._orig_mod.layer1.0.conv1.weight") == "layer1.0.conv1.weight"
    assert clean_key("_orig_mod.module.fc.bias") == "fc.bias"
    assert clean_key("encoder.module.fc.bias") == "encoder.module.fc.bias"  # only leading prefixes
    t = torch.zeros(1)
    assert list(clean_prefixes({"module.b": t, "module.a": t})) == ["b", "a"]


def test_missing_file(tmp_path):
    with pytest.raises(SurgeryInputError) as info:
        load_state_dict_file(tmp_path / "absent.pt")
    assert str(tmp_path / "absent.pt") in _one_line(info) and "no such file" in str(info.value)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_truncated_file(tmp_path, tiny, suffix):
    from safetensors.torch import save_file

    path = tmp_path / f"w{suffix}"
    if suffix == ".pt":
        torch.save(tiny.state_dict(), path)
    else:
        save_file({k: v.contiguous() for k, v in tiny.state_dict().items()}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(SurgeryInputError) as info:
        load_state_dict_file(path)
    assert str(path) in _one_line(info)


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".safetensors"])
@pytest.mark.parametrize("content", ["random", "empty", "text"])
def test_corrupt_bytes(tmp_path, suffix, content):
    path = tmp_path / f"w{suffix}"
    path.write_bytes({"random": os.urandom(4096), "empty": b"", "text": b"hello, I am not a checkpoint\n"}[content])
    with pytest.raises(SurgeryInputError) as info:
        load_state_dict_file(path)
    assert str(path) in _one_line(info)


def test_bit_flips_never_escape_as_other_errors(tmp_path, tiny):
    """Corrupting a real checkpoint anywhere gives a good load or SurgeryInputError, never KeyError & co."""
    import random

    torch.save(tiny.state_dict(), tmp_path / "good.pt")
    good = (tmp_path / "good.pt").read_bytes()
    rng = random.Random(0)
    outcomes = set()
    for i in range(150):
        data = bytearray(good)
        for _ in range(1 + i % 8):
            data[rng.randrange(len(data))] = rng.randrange(256)
        (tmp_path / "bad.pt").write_bytes(bytes(data))
        try:
            load_state_dict_file(tmp_path / "bad.pt")
            outcomes.add("loaded")
        except SurgeryInputError as exc:
            assert "\n" not in str(exc)
            outcomes.add("refused")
    assert "refused" in outcomes


@pytest.mark.parametrize("content", ["list", "empty-dict", "non-tensor-values"])
def test_not_a_state_dict(tmp_path, content):
    obj = {"list": [torch.zeros(1)], "empty-dict": {}, "non-tensor-values": {"a": 1, "b": "x"}}[content]
    torch.save(obj, tmp_path / "w.pt")
    with pytest.raises(SurgeryInputError, match="expected a state_dict"):
        load_state_dict_file(tmp_path / "w.pt")


# --------------------------------------------------------------------------- code in pickles never runs


class _OpensFile:
    """Unpickling this calls ``open(path, 'w')``: it would create the file."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


class _RunsShell:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


@pytest.mark.parametrize("payload", ["open", "os.system", "nested", "legacy-format", "plain-pickle"])
def test_pickle_payload_is_refused_and_never_runs(tmp_path, tiny, payload):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    if payload == "open":
        torch.save(_OpensFile(str(marker)), path)
    elif payload == "os.system":
        torch.save({"state_dict": {"w": torch.zeros(1)}, "x": _RunsShell(str(marker))}, path)
    elif payload == "nested":
        state = dict(tiny.state_dict())
        state["hook"] = _OpensFile(str(marker))
        torch.save({"state_dict": state}, path)
    elif payload == "legacy-format":
        torch.save({"w": _RunsShell(str(marker))}, path, _use_new_zipfile_serialization=False)
    else:
        with open(path, "wb") as fh:
            pickle.dump({"w": _RunsShell(str(marker))}, fh, protocol=2)
    assert not marker.exists()
    with pytest.raises(SurgeryInputError) as info:
        load_state_dict_file(path)
    message = _one_line(info)
    assert str(path) in message and ("refused" in message or "corrupt" in message)
    assert not marker.exists()
    # and through the case-level API, as a checkpoint of a model spec
    with pytest.raises(SurgeryInputError):
        build_model(ModelSpec(model="surgery.train.zoo:stem_trainer", checkpoint=str(path)))
    assert not marker.exists()


def test_refusal_message_says_why(tmp_path):
    torch.save(_OpensFile(str(tmp_path / "pwned")), tmp_path / "evil.pt")
    with pytest.raises(SurgeryInputError, match="not weights-only.*never unpickles code"):
        load_state_dict_file(tmp_path / "evil.pt")


# --------------------------------------------------------------------------- loading into a model


def test_load_weights_copies_everything(make_tiny):
    source, target = make_tiny(seed=1, in_chans=3), make_tiny(seed=2, in_chans=3)
    assert not _equal_state(source.state_dict(), target.state_dict())
    load_weights(target, source.state_dict(), origin="ck.pt")
    assert _equal_state(source.state_dict(), target.state_dict())


def test_keys_match_nothing(tmp_path, make_tiny):
    torch.save({"encoder.conv.weight": torch.zeros(3)}, tmp_path / "other.pt")
    spec = ModelSpec(model="surgery.train.zoo:stem_trainer", checkpoint=str(tmp_path / "other.pt"))
    with pytest.raises(SurgeryInputError) as info:
        build_model(spec)
    message = _one_line(info)
    assert "other.pt" in message and "none of its 1 keys match" in message and "encoder.conv.weight" in message


def test_shape_mismatch_names_both_shapes(make_tiny):
    target = make_tiny(in_chans=3, width=8)
    wider = make_tiny(in_chans=3, width=16).state_dict()
    with pytest.raises(SurgeryInputError) as info:
        load_weights(target, wider, origin="checkpoint wide.pt")
    message = _one_line(info)
    assert message.startswith("checkpoint wide.pt:") and "wrong shape" in message
    assert "(16, 3, 3, 3)" in message and "(8, 3, 3, 3)" in message


def test_partial_checkpoint_is_an_error(make_tiny):
    target = make_tiny(in_chans=3)
    state = {k: v for k, v in target.state_dict().items() if not k.startswith("head.")}
    with pytest.raises(SurgeryInputError, match=r"2 model key\(s\) missing .*head\."):
        load_weights(target, state, origin="ck")


def test_checkpoint_through_build_model(tmp_path):
    torch.manual_seed(0)
    trained = build_architecture("surgery.train.zoo:stem_trainer", num_classes=4)
    torch.save({"module." + k: v for k, v in trained.state_dict().items()}, tmp_path / "stem.pt")
    spec = ModelSpec(model="surgery.train.zoo:stem_trainer", num_classes=4, checkpoint=str(tmp_path / "stem.pt"))
    model = build_model(spec)
    assert _equal_state(model.state_dict(), trained.state_dict())


# --------------------------------------------------------------------------- references


def test_torchvision_ref_with_classes_and_channels():
    model = build_model(ModelSpec(model="torchvision:resnet18", num_classes=7, in_chans=1))
    assert model.fc.out_features == 7 and model.conv1.in_channels == 1
    assert model(torch.zeros(2, 1, 32, 32)).shape == (2, 7)


def test_timm_ref_with_classes_and_channels():
    model = build_model(ModelSpec(model="timm:resnet18", num_classes=5, in_chans=1))
    assert model(torch.zeros(2, 1, 32, 32)).shape == (2, 5)


def test_factory_ref():
    model = build_model(ModelSpec(model="surgery.train.zoo:stem_trainer", num_classes=3, in_chans=1))
    from surgery.train.zoo import StemTrainer

    assert isinstance(model, StemTrainer)
    assert model(torch.zeros(2, 1, 32, 32)).shape == (2, 3)


def test_factory_without_those_keywords():
    """A factory that takes no num_classes (a fixed architecture) still builds; defaults are not forced on it."""
    model = build_model(ModelSpec(model="surgery.train.zoo:make_stem"), num_classes=10, in_chans=1)
    assert isinstance(model, nn.Conv2d) and model.in_channels == 1


@pytest.mark.parametrize(
    "ref, fragment",
    [
        ("nosuchpkg.models:net", "cannot import"),
        ("surgery.train.zoo:no_such_factory", "cannot import"),
        ("surgery.train.zoo:ZOO", "expected a factory"),
        ("surgery.models.recipes:asdict", "not in 'surgery.models.recipes'"),
        ("os:getcwd", "standard library"),
    ],
)
def test_bad_factory_refs(ref, fragment):
    """Refused when the architecture is built (a case file refuses them earlier, at parse time)."""
    with pytest.raises(SurgeryInputError) as info:
        build_architecture(ref, num_classes=3)
    message = _one_line(info)
    assert ref in message and fragment in message


def test_factory_that_raises_is_bad_input():
    with pytest.raises(SurgeryInputError, match="factory raised"):
        build_architecture("surgery.train.zoo:stem_trainer", num_classes=-3)


@pytest.mark.parametrize(
    "ref, fragment",
    [
        ("torchvision:resnet19", "did you mean resnet18"),
        ("timm:resnet19d", "did you mean"),
        ("timm:qqqqqq", "expected a name in timm.list_models"),
        ("torchvision:qqqq", "expected a name in torchvision.models"),
        ("zoo:nope", "expected one of: mnist-resnet18"),
        ("zoo:mnist-resnet19", "did you mean mnist-resnet18"),
        ("resnet18", "torchvision:NAME"),
        ("torchvision:", "torchvision:NAME"),
        ("my-pkg:net", "package.module:factory"),
    ],
)
def test_validate_model_ref(ref, fragment):
    with pytest.raises(ValueError, match=fragment):
        validate_model_ref(ref)
    with pytest.raises(SurgeryInputError, match=fragment):
        build_architecture(ref)


@pytest.mark.parametrize("ref", ["torchvision:resnet18", "timm:resnet18"])
def test_pretrained_without_cache_names_the_path(tmp_path, ref, monkeypatch):
    torch_home = tmp_path / "torch-home"
    monkeypatch.setenv("TORCH_HOME", str(torch_home))

    def no_network(*args, **kwargs):
        raise AssertionError("tried to download")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    with pytest.raises(SurgeryInputError) as info:
        build_model(ModelSpec(model=ref, pretrained=True))
    message = _one_line(info)
    assert str(torch_home / "hub" / "checkpoints") in message and "never downloads" in message
    assert not (torch_home / "hub" / "checkpoints").exists() or not any((torch_home / "hub" / "checkpoints").iterdir())


def test_pretrained_from_local_cache(tmp_path, monkeypatch):
    """A file placed in the torch hub cache is used, with no network."""
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    url = torchvision.models.get_model_weights("resnet18").DEFAULT.url
    path = tmp_path / "th" / "hub" / "checkpoints" / Path(url).name
    path.parent.mkdir(parents=True)
    torch.manual_seed(3)
    reference = torchvision.models.resnet18()
    torch.save(reference.state_dict(), path)
    model = build_model(ModelSpec(model="torchvision:resnet18", pretrained=True))
    assert _equal_state(model.state_dict(), reference.state_dict())


def test_pretrained_for_factory_refs_is_an_error():
    with pytest.raises(SurgeryInputError, match="'pretrained' applies to"):
        build_model(ModelSpec(model="surgery.train.zoo:stem_trainer", pretrained=True))


def test_weights_digest_is_of_the_tensors_not_the_file(tmp_path):
    """Two files of the same tensors (other metadata, so other bytes) share a digest; one changed value does not."""
    from safetensors.torch import save_file

    from surgery.files import file_sha256
    from surgery.running.builder import weights_digest

    torch.manual_seed(0)
    state = {k: v.contiguous() for k, v in nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).state_dict().items()}
    save_file(state, str(tmp_path / "a.safetensors"), metadata={"built": "monday"})
    save_file(state, str(tmp_path / "b.safetensors"), metadata={"built": "tuesday", "by": "another process"})
    assert file_sha256(tmp_path / "a.safetensors") != file_sha256(tmp_path / "b.safetensors")
    assert weights_digest(tmp_path / "a.safetensors") == weights_digest(tmp_path / "b.safetensors")
    state["0.weight"][0, 0, 0, 0] += 1e-6
    save_file(state, str(tmp_path / "c.safetensors"))
    assert weights_digest(tmp_path / "c.safetensors") != weights_digest(tmp_path / "a.safetensors")
