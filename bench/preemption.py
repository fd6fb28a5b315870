"""What the ranks' agreement on a preemption signal costs a training step.

    deepspeed --num_gpus 2 bench/preemption.py

Times, side by side in one run, one fp32 step of the script's dense Net (its
train_step, batch 16 over the ranks) and one agreement check (Preemption.agreed:
an all-reduce of one number and its read on the host), which train() makes every
preemption.CHECK_EVERY steps. Prints a Markdown table on rank 0.
"""

import os
import sys

import deepspeed
import deepspeed.comm as dist
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cifar10_deepspeed as script  # noqa: E402
from cifar10ds import fixes, launch, machine, preemption  # noqa: E402
from allreduce import milliseconds  # noqa: E402  (beside this file)

def main():
    args = script.add_argument(["--deepspeed", "--dataset", "synthetic", "--dtype", "fp32"])
    launch.use_single_process_defaults()
    machine.use_share_of_cores()
    fixes.bound_every_wait(deepspeed.constants.default_pg_timeout)
    deepspeed.init_distributed()
    trainset, _ = script.load_data(args)
    config = script.get_ds_config(args)
    machine.use_torch_fused_adamw(config)
    engine, trainloader = script.build_engine(args, config, trainset)
    inputs, labels = next(iter(trainloader))
    criterion = nn.CrossEntropyLoss()
    step = milliseconds(lambda: script.train_step(engine, criterion, inputs, labels))
    signals = preemption.Preemption()
    check = milliseconds(signals.agreed)
    every = preemption.CHECK_EVERY
    if dist.get_rank() == 0:
        print(f"| {dist.get_world_size()} ranks, fp32, dense | ms |\n| --- | --- |\n| training step | {step:.3f} |\n"
              f"| agreement check | {check:.3f} |\n| check per step, every {every} steps | {check / every:.4f} "
              f"({100 * check / every / step:.2f} % of a step) |")


if __name__ == "__main__":
    with machine.exit_without_teardown():
        main()
