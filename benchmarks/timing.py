"""Timing helpers shared by the benchmarks, and the machine's speed: ``python -m benchmarks.timing`` prints
the ResNet-18 training step every timing of this project is given beside."""

from __future__ import annotations

import statistics
import time
from typing import Callable


def best_of(fn: Callable[[], object], rounds: int = 3) -> float:
    """The fastest of ``rounds`` wall-clock timings of ``fn()``, in seconds."""
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def resnet18_step_seconds(steps: int = 12, warmup: int = 3) -> float:
    """The median ResNet-18 training step (batch 32, 32 px, AdamW, 2 threads, channels_last) on the CPU:
    the figure ``../shared/tools/step-time`` prints, which every timing of this project is given beside."""
    import torch
    import torchvision

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        model = torchvision.models.resnet18(num_classes=10).to(memory_format=torch.channels_last)
        optimizer = torch.optim.AdamW(model.parameters(), 1e-3)
        x = torch.randn(32, 3, 32, 32).to(memory_format=torch.channels_last)
        y = torch.randint(0, 10, (32,))
        times = []
        for _ in range(warmup + steps):
            start = time.perf_counter()
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            times.append(time.perf_counter() - start)
        return statistics.median(times[warmup:])
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    import torch

    print(
        f"ResNet-18 training step {resnet18_step_seconds(steps=20, warmup=5):.2f} s "
        f"(batch 32, 32 px, 2 threads; {torch.backends.cpu.get_cpu_capability()})"
    )
