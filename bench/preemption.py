"""What the ranks' agreement on a preemption signal costs a training step.

    deepspeed --num_gpus 2 bench/preemption.py

Times, side by side in one run, one fp32 step of the script's dense Net (its
train_step, batch 16 over the ranks) and one agreement check (Preemption.agreed:
an all-reduce of one number and its read on the host), which train() makes every
PREEMPTION_CHECK_EVERY steps. Prints a Markdown table on rank 0.
"""

import os
import sys

import deepspeed.comm as dist
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cifar10_deepspeed as script  # noqa: E402
from allreduce import milliseconds  # noqa: E402  (beside this file)

def main():
    args = script.add_argument(["--deepspeed", "--dataset", "synthetic", "--dtype", "fp32"])
    script.start_distributed()
    engine, trainloader, _ = script.initialize(args, script.get_ds_config(args))
    device = script.get_accelerator().device_name(engine.local_rank)
    inputs, labels = next(iter(trainloader))
    criterion = nn.CrossEntropyLoss()
    step = milliseconds(lambda: script.train_step(engine, criterion, inputs, labels, device, None))
    preemption = script.Preemption(device)
    check = milliseconds(preemption.agreed)
    every = script.PREEMPTION_CHECK_EVERY
    if dist.get_rank() == 0:
        print(f"| {dist.get_world_size()} ranks, fp32, dense | ms |\n| --- | --- |\n| training step | {step:.3f} |\n"
              f"| agreement check | {check:.3f} |\n| check per step, every {every} steps | {check / every:.4f} "
              f"({100 * check / every / step:.2f} % of a step) |")
    script.leave(0)


if __name__ == "__main__":
    main()
