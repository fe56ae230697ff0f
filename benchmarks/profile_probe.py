"""Where a probe's time goes: ``python benchmarks/profile_probe.py [resnet50|resnet18]``.

Times a bare ``inference_mode`` forward and the probe (``surgery.probe.probe_activations``) the way
``test_probe_cost.py`` does (alternating, fastest of 5), then profiles 3 probes with cProfile and prints
the self time per probe of the calls that cost most: the model's own ops (conv2d, batch_norm, ...) are the
forward; the rest (sum, amin, amax, sub, le, indexing, NumPy) is the probe's statistics.
"""

from __future__ import annotations

import cProfile
import pstats
import sys
import time

import torch
import torchvision

from surgery.probe import probe_activations, resolve_layers

LAYERS = {"resnet50": ["layer?.?"], "resnet18": ["layer?"]}
SAMPLES, IMAGE_SIZE, BATCH, ROUNDS = 512, 32, 256, 3


def main(arch: str = "resnet50") -> None:
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(num_classes=10).eval()
    x = torch.randn(SAMPLES, 3, IMAGE_SIZE, IMAGE_SIZE)
    layers = resolve_layers(model, LAYERS[arch])

    @torch.inference_mode()
    def bare() -> None:
        for i in range(0, SAMPLES, BATCH):
            model(x[i:i + BATCH])

    def probe() -> None:
        probe_activations(model, x, layers, batch_size=BATCH)

    bare(), probe()  # warm-up
    best = {"bare": float("inf"), "probe": float("inf")}
    for _ in range(5):
        for name, fn in (("bare", bare), ("probe", probe)):
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    print(f"{arch}, {len(layers)} layers, {SAMPLES} samples, {IMAGE_SIZE} px, {torch.get_num_threads()} threads: "
          f"bare forward {best['bare']:.4f} s, probe {best['probe']:.4f} s, ratio {best['probe'] / best['bare']:.3f}")
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
