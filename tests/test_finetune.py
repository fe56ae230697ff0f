"""The fine-tune engine: parameter-group policies, determinism, schedules, non-finite runs, AdaBN, devices."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from surgery.case import FinetuneSpec, OptimizerSpec, ParamGroupSpec, ScheduleSpec
from surgery.errors import SurgeryInputError
from surgery.train.finetune import evaluate, finetune, recalibrate_bn, resolve_device

CPU = torch.device("cpu")


def _spec(
    steps=6, *, groups=(), lr=0.05, name="sgd", momentum=0.0, weight_decay=0.0, batch_size=32, eval_every=None, **kwargs
):
    return FinetuneSpec(
        steps=steps,
        batch_size=batch_size,
        eval_every=eval_every or max(steps, 1),
        optimizer=OptimizerSpec(name=name, lr=lr, momentum=momentum, weight_decay=weight_decay),
        groups=[ParamGroupSpec(**g) for g in groups],
        **kwargs,
    )


def _run(model, data, spec, seed=0):
    return finetune(
        model, data.train_x, data.train_y, data.test_x, data.test_y, spec, seed=seed, device=CPU, progress=False
    )


def _params(model, prefix=""):
    return {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith(prefix)}


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def _all_differ(a, b):
    return all(not torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- parameter groups


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_frozen_group_is_bit_identical(make_tiny, digits16, optimizer):
    model = make_tiny()
    before = _params(model)
    run = _run(
        model,
        digits16,
        _spec(groups=[{"params": "stem.*", "freeze": True}], name=optimizer, momentum=0.9, weight_decay=0.1),
    )
    after = _params(model)
    assert run.steps_done == 6 and run.finite
    stem = [k for k in before if k.startswith("stem.")]
    assert stem and all(torch.equal(before[k], after[k]) for k in stem)  # weight decay did not touch them either
    assert _all_differ({k: before[k] for k in before if k not in stem}, after)


def test_unfreeze_at_holds_the_group_until_its_step(make_tiny, digits16):
    k = 3
    group = [{"params": "head.*", "freeze": True, "unfreeze_at": k}]
    initial = _params(make_tiny(), "head.")

    model = make_tiny()
    _run(model, digits16, _spec(steps=k, groups=group))  # steps 0 .. k-1: all frozen
    assert _same(initial, _params(model, "head."))
    assert _all_differ(_params(make_tiny(), "stem."), _params(model, "stem."))  # the rest trained meanwhile

    model = make_tiny()
    _run(model, digits16, _spec(steps=k + 2, groups=group))
    assert _all_differ(initial, _params(model, "head."))

    model = make_tiny()
    _run(model, digits16, _spec(steps=k + 2, groups=[{"params": "head.*", "freeze": True}]))  # never unfrozen
    assert _same(initial, _params(model, "head."))


def test_unfreeze_at_alone_implies_frozen_before(make_tiny, digits16):
    """``{params: head.*, unfreeze_at: 3}`` without ``freeze: true`` still holds the group until step 3."""
    initial = _params(make_tiny(), "head.")
    model = make_tiny()
    _run(model, digits16, _spec(steps=3, groups=[{"params": "head.*", "unfreeze_at": 3}]))
    assert _same(initial, _params(model, "head."))
    model = make_tiny()
    _run(model, digits16, _spec(steps=4, groups=[{"params": "head.*", "unfreeze_at": 3}]))
    assert _all_differ(initial, _params(model, "head."))


def test_everything_frozen_until_a_step_does_not_crash(make_tiny, digits16):
    model = make_tiny()
    initial = _params(model)
    run = _run(model, digits16, _spec(steps=2, groups=[{"params": "*", "freeze": True, "unfreeze_at": 2}]))
    assert run.steps_done == 2 and run.finite and _same(initial, _params(model))
    run = _run(model, digits16, _spec(steps=4, groups=[{"params": "*", "freeze": True, "unfreeze_at": 2}]))
    assert run.steps_done == 4 and _all_differ(initial, _params(model))


def test_lr_scale_scales_the_first_update(make_tiny, digits16):
    """Plain SGD (no momentum, no decay): the first step moves a 0.1-scaled group exactly 10× less."""
    plain, scaled = make_tiny(), make_tiny()
    start = _params(plain)
    _run(plain, digits16, _spec(steps=1))
    _run(scaled, digits16, _spec(steps=1, groups=[{"params": "head.*", "lr_scale": 0.1}]))
    moved_plain = {k: _params(plain)[k] - start[k] for k in start}
    moved_scaled = {k: _params(scaled)[k] - start[k] for k in start}
    for k in start:
        factor = 0.1 if k.startswith("head.") else 1.0
        assert moved_plain[k].abs().max() > 0
        torch.testing.assert_close(moved_scaled[k], factor * moved_plain[k], rtol=1e-4, atol=1e-7)


def test_lr_scale_zero_is_frozen_in_effect(make_tiny, digits16):
    model = make_tiny()
    initial = _params(model, "body.")
    _run(model, digits16, _spec(steps=3, groups=[{"params": "body.*", "lr_scale": 0.0}]))
    assert _same(initial, _params(model, "body."))


def test_first_matching_group_wins(make_tiny, digits16):
    model = make_tiny()
    initial = _params(model)
    _run(
        model,
        digits16,
        _spec(steps=2, groups=[{"params": "head.bias", "freeze": True}, {"params": "head.*", "lr_scale": 0.5}]),
    )
    after = _params(model)
    assert torch.equal(initial["head.bias"], after["head.bias"])
    assert not torch.equal(initial["head.weight"], after["head.weight"])


def test_glob_matching_nothing_is_bad_input(make_tiny, digits16):
    with pytest.raises(SurgeryInputError) as info:
        _run(make_tiny(), digits16, _spec(groups=[{"params": "layer4.*", "freeze": True}]))
    message = str(info.value)
    assert "finetune.groups" in message and "'layer4.*'" in message and "matches no" in message
    assert "stem.0.weight" in message  # shows what names look like


# --------------------------------------------------------------------------- determinism, curve, schedule


def test_same_seed_same_curve_and_weights(make_tiny, digits16):
    spec = _spec(steps=8, eval_every=2, name="adamw", lr=3e-3, groups=[{"params": "head.*", "lr_scale": 0.5}])
    a, b, c = make_tiny(), make_tiny(), make_tiny()
    run_a, run_b, run_c = _run(a, digits16, spec), _run(b, digits16, spec), _run(c, digits16, spec, seed=1)
    assert run_a.curve == run_b.curve and len(run_a.curve) == 4
    assert _same(_params(a), _params(b))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))  # BN buffers too
    assert run_c.curve != run_a.curve  # the seed draws the batches


def test_without_a_curve_only_the_last_step_is_evaluated_and_the_run_is_the_same(make_tiny, digits16):
    """``curve=False`` (pytest without a report, calibration): evaluations change neither the model nor a
    random stream, so leaving out all but the last gives the same weights, BN buffers and final accuracy."""
    spec = _spec(steps=9, eval_every=2, name="adamw", lr=3e-3, groups=[{"params": "head.*", "lr_scale": 0.5}])
    with_curve, without = make_tiny(), make_tiny()
    run_a = _run(with_curve, digits16, spec)
    data = (digits16.train_x, digits16.train_y, digits16.test_x, digits16.test_y)
    run_b = finetune(without, *data, spec, seed=0, device=CPU, progress=False, curve=False)
    assert [p["step"] for p in run_a.curve] == [2, 4, 6, 8, 9] and [p["step"] for p in run_b.curve] == [9]
    assert run_b.final_accuracy == run_a.final_accuracy == run_a.curve[-1]["accuracy"]
    assert all(torch.equal(x, y) for x, y in zip(with_curve.state_dict().values(), without.state_dict().values()))


def test_training_learns(make_tiny, digits16):
    model = make_tiny()
    before = evaluate(model, digits16.test_x, digits16.test_y, device=CPU)
    run = _run(model, digits16, _spec(steps=40, eval_every=10, name="adamw", lr=1e-2, batch_size=64))
    assert [p["step"] for p in run.curve] == [10, 20, 30, 40]
    assert run.curve[-1]["loss"] < run.curve[0]["loss"]
    assert run.curve[-1]["accuracy"] > max(0.85, before + 0.3)
    assert run.curve[-1]["accuracy"] == pytest.approx(evaluate(model, digits16.test_x, digits16.test_y, device=CPU))
    assert not model.training  # left in eval mode
    # The accuracy after training is the last step's evaluation, not a second one that could differ.
    assert run.final_accuracy == run.curve[-1]["accuracy"]
    assert run.accuracy_after(model, digits16.test_x, digits16.test_y, device=CPU) == evaluate(
        model, digits16.test_x, digits16.test_y, device=CPU
    )


def test_curve_records_last_partial_interval(make_tiny, digits16):
    run = _run(make_tiny(), digits16, _spec(steps=5, eval_every=2))
    assert [p["step"] for p in run.curve] == [2, 4, 5]
    assert all(set(p) == {"step", "loss", "accuracy", "lr"} for p in run.curve)


def test_cosine_schedule_with_warmup(make_tiny, digits16):
    from dataclasses import replace

    base, steps, warmup = 0.02, 20, 5
    small = replace(digits16, test_x=digits16.test_x[:16], test_y=digits16.test_y[:16])  # 20 cheap evaluations
    run = _run(
        make_tiny(),
        small,
        _spec(
            steps=steps, eval_every=1, lr=base, batch_size=8, schedule=ScheduleSpec(name="cosine", warmup_steps=warmup)
        ),
    )
    lrs = [p["lr"] for p in run.curve]
    assert len(lrs) == steps
    # warmup: linear ramp up to the base rate
    assert lrs[:warmup] == pytest.approx([base * (i + 1) / warmup for i in range(warmup)])
    assert max(lrs) == pytest.approx(base) and lrs[warmup] == pytest.approx(base)
    # then a cosine decay, monotone, towards zero
    decay = lrs[warmup:]
    assert all(b <= a + 1e-12 for a, b in zip(decay, decay[1:]))
    assert lrs[-1] < 0.02 * base
    mid = warmup + (steps - warmup) // 2
    assert lrs[mid] == pytest.approx(base * 0.5 * (1 + math.cos(math.pi * (mid - warmup) / (steps - warmup))))


def test_constant_schedule_and_lr_scale_does_not_change_reported_lr(make_tiny, digits16):
    run = _run(
        make_tiny(), digits16, _spec(steps=4, eval_every=1, lr=0.03, groups=[{"params": "stem.*", "lr_scale": 0.1}])
    )
    assert [p["lr"] for p in run.curve] == pytest.approx([0.03] * 4)


def test_gradient_clipping_bounds_the_update(make_tiny, digits16):
    model = make_tiny()
    start = _params(model)
    _run(model, digits16, _spec(steps=1, lr=1.0, clip_grad=1e-3))
    moved = torch.cat([(_params(model)[k] - start[k]).flatten() for k in start])
    assert 0 < moved.norm() <= 1e-3 * 1.0001


# --------------------------------------------------------------------------- non-finite training


@pytest.mark.parametrize("lr", [1e6, 1e12])
def test_huge_learning_rate_is_reported_not_raised(make_tiny, digits16, lr):
    """Without BatchNorm (which keeps a diverging net's loss finite) SGD at lr 1e6 blows up within a few steps."""
    model = make_tiny(bn=False)
    run = _run(model, digits16, _spec(steps=30, eval_every=5, lr=lr, momentum=0.9))
    assert run.finite is False
    assert isinstance(run.nonfinite_step, int) and 0 < run.nonfinite_step < 30
    assert run.steps_done == run.nonfinite_step  # stopped at the first non-finite loss, no update after it
    assert run.final_accuracy is None  # no evaluation at the last step: accuracy_after evaluates afresh
    assert run.to_dict()["finite"] is False and run.to_dict()["nonfinite_step"] == run.nonfinite_step


def test_huge_learning_rate_with_batchnorm_is_caught_by_the_weights(make_tiny, digits16):
    """With BatchNorm the loss may stay finite while the weights explode: ``all_finite`` is the second net."""
    from surgery.train.finetune import all_finite

    model = make_tiny()
    assert all_finite(model)
    run = _run(model, digits16, _spec(steps=30, eval_every=5, lr=1e30, momentum=0.9))
    assert run.finite is False or not all_finite(model)


def test_nonfinite_inputs_stop_at_step_zero(make_tiny, digits16):
    from dataclasses import replace

    bad = replace(digits16, train_x=torch.full_like(digits16.train_x, float("nan")))
    model = make_tiny()
    initial = _params(model)
    run = _run(model, bad, _spec(steps=5))
    assert run.finite is False and run.nonfinite_step == 0 and run.steps_done == 0
    assert _same(initial, _params(model))


# --------------------------------------------------------------------------- AdaBN


def test_recalibrate_bn_changes_only_running_stats(make_tiny, digits16):
    model = make_tiny()
    params = _params(model)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(torch.equal(m.running_mean, torch.zeros_like(m.running_mean)) for m in bns)
    momenta = [m.momentum for m in bns]
    count = recalibrate_bn(model, digits16.train_x, device=CPU, batches=10, batch_size=64, seed=0)
    assert count == len(bns) == 2
    assert _same(params, _params(model))
    assert all(p.grad is None for p in model.parameters())
    assert not model.training and [m.momentum for m in bns] == momenta
    for m in bns:
        assert not torch.equal(m.running_mean, torch.zeros_like(m.running_mean))
        assert not torch.equal(m.running_var, torch.ones_like(m.running_var))
    # the first BN's mean is the mean of the stem conv's output over the data (10 batches of 64 drawn)
    with torch.no_grad():
        conv_out = model.stem[0](digits16.train_x)
    torch.testing.assert_close(bns[0].running_mean, conv_out.mean((0, 2, 3)), atol=0.05, rtol=0.1)


def test_recalibrate_bn_is_deterministic(make_tiny, digits16):
    a, b = make_tiny(), make_tiny()
    recalibrate_bn(a, digits16.train_x, device=CPU, batches=5, seed=3)
    recalibrate_bn(b, digits16.train_x, device=CPU, batches=5, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_recalibrate_bn_recovers_accuracy_after_a_shift(make_tiny, digits16):
    """Train, then shift the inputs (contrast and offset): AdaBN on the shifted data, no gradient, recovers accuracy."""
    from dataclasses import replace

    model = make_tiny()
    _run(model, digits16, _spec(steps=40, eval_every=40, name="adamw", lr=1e-2, batch_size=64))
    shifted = replace(digits16, train_x=digits16.train_x * 0.5 + 0.5, test_x=digits16.test_x * 0.5 + 0.5)
    clean = evaluate(model, digits16.test_x, digits16.test_y, device=CPU)
    broken = evaluate(model, shifted.test_x, shifted.test_y, device=CPU)
    params = _params(model)
    recalibrate_bn(model, shifted.train_x, device=CPU, batches=20, seed=0)
    fixed = evaluate(model, shifted.test_x, shifted.test_y, device=CPU)
    assert clean > 0.85 and broken < clean - 0.3
    assert fixed > broken + 0.3 and fixed > clean - 0.1
    assert _same(params, _params(model))


def test_recalibrate_bn_without_bn_is_a_no_op(digits16):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(256, 10))
    before = _params(model)
    assert recalibrate_bn(model, digits16.train_x, device=CPU, batches=2) == 0
    assert _same(before, _params(model))


# --------------------------------------------------------------------------- devices


def test_resolve_device_cpu_and_auto():
    assert resolve_device("cpu") == CPU
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:3"])
def test_resolve_cuda_without_cuda_is_bad_input(name):
    with pytest.raises(SurgeryInputError) as info:
        resolve_device(name)
    assert f"{name!r}" in str(info.value) and "not available" in str(info.value) and "cpu" in str(info.value)
