"""Where a probe's time goes: ``python -m benchmarks.profile_probe [resnet50|resnet18] [contiguous|channels_last]``.

Times a bare ``inference_mode`` forward and the probe (``surgery.stats.activation_probe.probe_activations``) as
``test_probe_cost.py`` does, with its helpers (alternating, fastest of 5), then profiles 3 probes with
cProfile and prints the self time per probe of the calls that cost most: the model's own ops (conv2d,
batch_norm, ...) are the forward; the rest (sum, amin, amax, sub, le, indexing, NumPy) is the probe's statistics.
"""

from __future__ import annotations

import cProfile
import pstats
import sys

import torch

from benchmarks.test_probe_cost import BATCH, MODELS, SAMPLES, alternate, bare_forward, seeded_model_and_inputs
from surgery.stats.activation_probe import probe_activations, resolve_layers

ROUNDS = 3


def main(arch: str = "resnet50", layout: str = "contiguous") -> None:
    """Print the bare forward, the probe and their ratio, then the probe's costliest calls."""
    cpu = torch.device("cpu")
    model, x = seeded_model_and_inputs(arch, SAMPLES, cpu, layout)
    layers = resolve_layers(model, MODELS[arch])

    def probe() -> None:
        probe_activations(model, x, layers, batch_size=BATCH)

    bare_forward(model, x, cpu), probe()  # warm-up
    bare, probed = alternate(lambda: bare_forward(model, x, cpu), probe, rounds=5)
    print(
        f"{arch} ({layout}), {len(layers)} layers, {SAMPLES} samples, {x.shape[-1]} px, "
        f"{torch.get_num_threads()} threads: "
        f"bare forward {bare:.4f} s, probe {probed:.4f} s, ratio {probed / bare:.3f}"
    )
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(ROUNDS):
        probe()
    profiler.disable()
    rows = sorted(
        (
            (tottime / ROUNDS, calls // ROUNDS, f"{file.rsplit('/', 1)[-1]}:{line}({name})")
            for (file, line, name), (_, calls, tottime, _, _) in pstats.Stats(profiler).stats.items()
        ),
        reverse=True,
    )
    print(f"self time per probe (cProfile adds its own overhead): {sum(r[0] for r in rows):.4f} s")
    for seconds, calls, where in rows[:20]:
        print(f"{seconds * 1000:8.1f} ms {calls:6d} calls  {where}")


if __name__ == "__main__":
    main(*sys.argv[1:])
