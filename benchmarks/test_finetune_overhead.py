"""Fine-tune overhead: the harness's fine-tune against a bare PyTorch loop, same model/data/steps."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision

from benchmarks.timing import best_of
from surgery.case import FinetuneSpec, OptimizerSpec
from surgery.train.finetune import finetune, to_device

STEPS, BATCH = 30, 64


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (2048,), generator=g)
    return x, y


def _model(device):
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).to(device)


def bare_loop(model, x, y, device) -> None:
    """What a user writes by hand: index tensors, forward, backward, step. No channels_last, no AMP."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    model.train()
    x, y = x.to(device), y.to(device)
    for _ in range(STEPS):
        idx = torch.randint(len(x), (BATCH,), generator=g).to(device)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()


def harness_loop(model, x, y, device) -> None:
    spec = FinetuneSpec(steps=STEPS, batch_size=BATCH, eval_every=10_000, optimizer=OptimizerSpec(lr=1e-3))
    finetune(to_device(model, device), x, y, x[:1], y[:1], spec, seed=0, device=device, progress=False)
    if device.type == "cuda":
        torch.cuda.synchronize()


def test_finetune_throughput_ratio(benchmark, record_ratio, device):
    x, y = _data()
    bare_model, harness_model = _model(device), _model(device)
    bare = best_of(lambda: bare_loop(bare_model, x, y, device))
    benchmark.pedantic(harness_loop, args=(harness_model, x, y, device), rounds=3, warmup_rounds=1)
    harness = min(benchmark.stats.stats.data)
    # throughput ratio: the harness's samples/s over the bare loop's, same steps and batch size
    record_ratio("finetune_throughput_ratio", bare / harness, ">= 0.97")
