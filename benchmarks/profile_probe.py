"""Where a probe's time goes: ``python -m benchmarks.profile_probe [resnet50|resnet18]``.

Times a bare ``inference_mode`` forward and the probe (``surgery.probe.probe_activations``) as
``test_probe_cost.py`` does, with its helpers (alternating, fastest of 5), then profiles 3 probes with
cProfile and prints the self time per probe of the calls that cost most: the model's own ops (conv2d,
batch_norm, ...) are the forward; the rest (sum, amin, amax, sub, le, indexing, NumPy) is the probe's statistics.
"""

from __future__ import annotations

import cProfile
import pstats
import sys

import torch
import torchvision

from benchmarks.test_probe_cost import BATCH, IMAGE_SIZE, MODELS, SAMPLES, alternate, bare_forward
from surgery.probe import probe_activations, resolve_layers

ROUNDS = 3


def main(arch: str = "resnet50") -> None:
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(num_classes=10).eval()
    x = torch.randn(SAMPLES, 3, IMAGE_SIZE, IMAGE_SIZE)
    layers = resolve_layers(model, MODELS[arch])
    cpu = torch.device("cpu")

    def probe() -> None:
        probe_activations(model, x, layers, batch_size=BATCH)

    bare_forward(model, x, cpu), probe()  # warm-up
    bare, probed = alternate(lambda: bare_forward(model, x, cpu), probe, rounds=5)
    print(f"{arch}, {len(layers)} layers, {SAMPLES} samples, {IMAGE_SIZE} px, {torch.get_num_threads()} threads: "
          f"bare forward {bare:.4f} s, probe {probed:.4f} s, ratio {probed / bare:.3f}")
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(ROUNDS):
        probe()
    profiler.disable()
    rows = sorted(((tottime / ROUNDS, calls // ROUNDS, f"{file.rsplit('/', 1)[-1]}:{line}({name})")
                   for (file, line, name), (_, calls, tottime, _, _) in pstats.Stats(profiler).stats.items()),
                  reverse=True)
    print(f"self time per probe (cProfile adds its own overhead): {sum(r[0] for r in rows):.4f} s")
    for seconds, calls, where in rows[:20]:
        print(f"{seconds * 1000:8.1f} ms {calls:6d} calls  {where}")


if __name__ == "__main__":
    main(*sys.argv[1:])
