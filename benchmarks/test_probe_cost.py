"""Probe cost and memory: streamed statistics on 16 ResNet-50 layers against a bare forward and a naive probe."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision

from benchmarks.timing import best_of
from surgery.checks.activations import probe_activations, resolve_layers

LAYERS = ["layer1.*.relu", "layer2.*.relu", "layer3.*.relu", "layer4.*.relu"]  # 16 bottleneck outputs


def _setup(n: int, device):
    torch.manual_seed(0)
    model = torchvision.models.resnet50(num_classes=10).to(device).eval()
    x = torch.randn(n, 3, 32, 32)
    return model, x


@torch.inference_mode()
def bare_forward(model, x, device, batch_size=256) -> None:
    for i in range(0, len(x), batch_size):
        model(x[i:i + batch_size].to(device))


def naive_probe(model, x, layers, device, batch_size=256) -> dict:
    """Hooks that keep every activation, statistics afterwards: what people write first."""
    stored: dict[str, list] = {name: [] for name in layers}
    hooks = [model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: stored[n].append(o.detach().cpu()))
             for n in layers]
    try:
        bare_forward(model, x, device, batch_size)
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for name, chunks in stored.items():
        v = torch.cat([c.flatten() for c in chunks])
        out[name] = (v.mean().item(), v.std().item(), v.min().item(), v.max().item(),
                     torch.quantile(v[torch.randperm(len(v))[:100_000]], 0.5).item())
    return out


def test_probe_vs_bare_forward(benchmark, record_ratio, device):
    model, x = _setup(512, device)
    layers = resolve_layers(model, LAYERS)
    assert len(layers) >= 16
    bare = best_of(lambda: bare_forward(model, x, device))
    benchmark.pedantic(probe_activations, args=(model, x, layers), kwargs={"device": device}, rounds=3,
                       warmup_rounds=1)
    probe = min(benchmark.stats.stats.data)
    naive = best_of(lambda: naive_probe(model, x, layers, device), rounds=1)
    record_ratio("probe_over_bare_forward", probe / bare, "<= 1.25")
    record_ratio("probe_over_naive_probe", probe / naive, "< 1.0")


_MEMORY_SCRIPT = r"""
import json, resource, sys, torch, torchvision
from surgery.checks.activations import probe_activations, resolve_layers
from benchmarks.test_probe_cost import naive_probe, LAYERS
n, how = int(sys.argv[1]), sys.argv[2]
torch.manual_seed(0)
model = torchvision.models.resnet50(num_classes=10).eval()
x = torch.randn(n, 3, 32, 32)
layers = resolve_layers(model, LAYERS)
with torch.inference_mode():
    model(x[:256])                      # warm the allocator with one batch
def rss_kb():
    return int(open("/proc/self/statm").read().split()[1]) * (resource.getpagesize() // 1024)
before = rss_kb()
if how == "streamed":
    probe_activations(model, x, layers)
else:
    naive_probe(model, x, layers, torch.device("cpu"))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"extra_mb": (peak - before) / 1024}))
"""


def _extra_memory_mb(n: int, how: str) -> float:
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, str(n), how], capture_output=True, text=True,
                         check=True, cwd=root)
    return json.loads(out.stdout.strip().splitlines()[-1])["extra_mb"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc for resident memory")
def test_probe_memory_does_not_grow(benchmark, record_ratio):
    small = benchmark.pedantic(_extra_memory_mb, args=(512, "streamed"), rounds=1)
    large = _extra_memory_mb(8192, "streamed")
    naive = _extra_memory_mb(2048, "naive")
    record_ratio("probe_peak_mb_512", small, "")
    record_ratio("probe_peak_mb_8192", large, "within 10% of 512")
    record_ratio("probe_peak_ratio_8192_over_512", large / small, "<= 1.10")
    record_ratio("naive_probe_peak_mb_2048", naive, "> streamed")
