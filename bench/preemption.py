"""What the ranks' agreement on a preemption signal costs a training step.

    deepspeed --num_gpus 2 bench/preemption.py [--rounds 5] [--steps 200]

Times, side by side in one run, blocks of fp32 steps of the script's dense Net
(its train_step, batch 16 over the ranks) with the agreement check that train()
makes after every step (Preemption.agreed_at: every preemption.CHECK_EVERY steps
it reads the last check's all-reduce and posts the next one, in host memory) and
without it, the blocks alternating (the ratio: the median of each round's pair),
and the time spent in the check itself, per
step (on 2 CPU cores the blocks differ by more than the check costs). Prints a
Markdown table on rank 0.
"""

import argparse
import os
import statistics
import sys
import time

import deepspeed
import deepspeed.comm as dist
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cifar10_deepspeed as script  # noqa: E402
from cifar10ds import fixes, launch, machine, preemption  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=200)
    bench, _ = parser.parse_known_args()  # the launcher adds --local_rank
    args = script.add_argument(["--deepspeed", "--dataset", "synthetic", "--dtype", "fp32"])
    launch.use_single_process_defaults()
    machine.use_share_of_cores()
    fixes.bound_every_wait(deepspeed.constants.default_pg_timeout)
    deepspeed.init_distributed()
    trainset, _ = script.load_data(args)
    config = script.get_ds_config(args)
    machine.use_torch_fused_adamw(config)
    engine, trainloader = script.build_engine(args, config, trainset)
    batches = [batch for _, batch in zip(range(bench.steps), trainloader)]
    criterion = nn.CrossEntropyLoss()
    signals = preemption.Preemption()
    seconds, in_checks = {"with the check": [], "without": []}, []
    for _ in range(bench.rounds):
        for name, times in seconds.items():
            dist.barrier()
            start = time.perf_counter()
            losses = []
            for step, (inputs, labels) in enumerate(batches, start=1):
                losses.append(script.train_step(engine, criterion, inputs, labels))
                if name == "with the check":
                    check = time.perf_counter()
                    signals.agreed_at(step, bench.steps + 1)
                    in_checks.append(time.perf_counter() - check)
            torch.stack(losses).sum().item()  # the device's queue done
            times.append((time.perf_counter() - start) / bench.steps)
    signals.agreed()
    checked, plain = (statistics.median(times) for times in seconds.values())
    ratio = statistics.median(a / b for a, b in zip(*seconds.values()))  # each round's pair, side by side
    if dist.get_rank() == 0:
        print(f"| {dist.get_world_size()} ranks, fp32, dense, median of {bench.rounds} blocks of {bench.steps} steps "
              f"| ms a step | ratio |\n| --- | --- | --- |\n"
              f"| with the agreement check (every {preemption.CHECK_EVERY} steps) | {1000 * checked:.3f} "
              f"| {ratio:.3f} |\n| without | {1000 * plain:.3f} | 1.000 |\n"
              f"| in the check, a step's share | {1000 * sum(in_checks) / len(in_checks):.4f} "
              f"| {sum(in_checks) / len(in_checks) / plain:.4f} |")


if __name__ == "__main__":
    with machine.exit_without_teardown():
        main()
