"""One optimizer step of the Net, by each Adam the script could train with, side by side.

    python bench/adam_step.py [--steps 2000]

The Net's parameters (dense, as the reference builds it) with gradients, stepped by torch's AdamW in
its three forms (fused, the script's choice: machine.use_torch_fused_adamw; foreach; a for-loop) and by
DeepSpeed's CPU Adam (its C++ op, built on a first run; left out where it cannot be built), with
the reference's hyperparameters, on one thread as a rank on 2 cores has it. Prints a Markdown table:
the median of 5 rounds of milliseconds per step, and the ratio to the fused AdamW.
"""

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cifar10_deepspeed import Net, add_argument  # noqa: E402
from cifar10ds import fixes  # noqa: E402

HYPER = dict(lr=1e-3, betas=(0.8, 0.999), eps=1e-8, weight_decay=3e-7)


def milliseconds(make, steps):
    params = [torch.nn.Parameter(p.detach().clone()) for p in Net(add_argument([])).parameters()]
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer = make(params)
    for _ in range(10):
        optimizer.step()
    rounds = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(steps):
            optimizer.step()
        rounds.append((time.perf_counter() - start) / steps * 1000)
    return statistics.median(rounds)


def deepspeed_cpu_adam(params):
    from deepspeed.ops.adam import DeepSpeedCPUAdam
    return DeepSpeedCPUAdam(params, adamw_mode=True, **HYPER)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    steps = parser.parse_args().steps
    torch.set_num_threads(1)
    fixes.stop_probing_a_missing_nvml()  # as the script trains
    ways = [("torch AdamW, fused (the script's)", lambda p: torch.optim.AdamW(p, fused=True, **HYPER)),
            ("torch AdamW, foreach", lambda p: torch.optim.AdamW(p, foreach=True, **HYPER)),
            ("torch AdamW, for-loop", lambda p: torch.optim.AdamW(p, foreach=False, **HYPER)),
            ("DeepSpeed's CPU Adam (C++ op)", deepspeed_cpu_adam)]
    measured = []
    for name, make in ways:
        try:
            measured.append((name, milliseconds(make, steps)))
        except Exception as e:  # DeepSpeed's op cannot be built here
            print(f"{name}: left out ({str(e).splitlines()[0]})", file=sys.stderr)
    print("| optimizer, 1 thread | ms a step | vs fused AdamW |\n| --- | --- | --- |")
    for name, ms in measured:
        print(f"| {name} | {ms:.3f} | {ms / measured[0][1]:.2f} |")


if __name__ == "__main__":
    main()
