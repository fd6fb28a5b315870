"""The plain-PyTorch baseline: the script's dense Net, optimizer maths, clipping and data, without DeepSpeed.

    python bench/plain_loop.py [-e 2] [--log-interval 50] [--workers N]

One process, fp32, on DeepSpeed's accelerator (a GPU, or the CPU). AdamW (DeepSpeed's Adam in its default AdamW mode) with
the lr, betas, eps and weight decay of the script's config, in torch's fused kernel as the script trains it; its gradient
clipping (1.0); DeepSpeed's WarmupLR log warm-up as a LambdaLR; the synthetic data on the script's default (tensor)
data path, batch 16, reshuffled each epoch. Prints the reference's loss
lines and the same throughput lines as cifar10_deepspeed.py, so
bench/throughput.py reads both alike.
"""

import argparse
import math
import os
import sys
import time

import torch
import torch.nn as nn
from deepspeed.accelerator import get_accelerator

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cifar10_deepspeed  # noqa: E402
from cifar10ds import data, fixes, machine  # noqa: E402


def warmup_lr(step, scheduler):
    """DeepSpeed's WarmupLR (log type): the learning rate of optimizer step `step` (0, 1, ...).

    The scheduler starts before the first step, at the minimum, and steps after
    each: step s runs at iteration s - 1, so the first two steps run at the minimum.
    """
    low, high, warmup = scheduler["warmup_min_lr"], scheduler["warmup_max_lr"], scheduler["warmup_num_steps"]
    iteration = step - 1
    if iteration < 0:
        return low
    gamma = math.log(iteration + 1) / math.log(warmup) if iteration < warmup else 1.0
    return low + (high - low) * gamma


def plain_step(net_args, device):
    """The plain loop's Net on `device`, with its AdamW, clipping and warm-up: a step(inputs, labels) that trains
    one batch of uint8 images and returns its loss, still on the device."""
    net = cifar10_deepspeed.Net(net_args).to(device)
    config = cifar10_deepspeed.get_ds_config(net_args)
    adam, warmup = config["optimizer"]["params"], config["scheduler"]["params"]
    optimizer = torch.optim.AdamW(net.parameters(), lr=adam["lr"], betas=adam["betas"], eps=adam["eps"],
                                  weight_decay=adam["weight_decay"], fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_lr(step, warmup) / adam["lr"])
    criterion = nn.CrossEntropyLoss()

    def step(inputs, labels):
        optimizer.zero_grad()
        loss = criterion(net(data.to_inputs(inputs, device)), labels.to(device))
        loss.backward()
        nn.utils.clip_grad_norm_(net.parameters(), config["gradient_clipping"])
        optimizer.step()
        scheduler.step()
        return loss.detach()

    return step


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-e", "--epochs", type=int, default=2)
    parser.add_argument("--log-interval", type=int, default=50)
    parser.add_argument("--workers", type=int, default=None,
                        help="data-loader workers (default: the script's choice for one rank)")
    parser.add_argument("--synthetic-train-size", type=int, default=5000)
    args = parser.parse_args()
    fixes.stop_probing_a_missing_nvml()  # as plain PyTorch, which never imports DeepSpeed, checks for CUDA

    net_args = cifar10_deepspeed.add_argument(["--dataset", "synthetic", "--synthetic-train-size",
                                             str(args.synthetic_train_size)])
    trainset, _ = data.load_datasets(net_args, download=False)
    workers = machine.data_loader_workers() if args.workers is None else args.workers
    trainloader = torch.utils.data.DataLoader(trainset, batch_size=16, shuffle=True, num_workers=workers,
                                              persistent_workers=workers > 0,
                                              collate_fn=data.collate_fn(trainset))
    device = get_accelerator().device_name(0)
    step = plain_step(net_args, device)

    for epoch in range(args.epochs):
        running_loss = torch.zeros((), device=device)
        interval_start = time.perf_counter()
        for i, (inputs, labels) in enumerate(trainloader):
            running_loss += step(inputs, labels)
            if i % args.log_interval == args.log_interval - 1:
                seconds = time.perf_counter() - interval_start
                prefix = f"[{epoch + 1: d}, {i + 1: 5d}]"  # the reference's loss line, as the script prints it
                print(f"{prefix} loss: {running_loss.item() / args.log_interval: .3f}")
                print(f"{prefix} {args.log_interval * 16 / seconds:.0f} samples/s, "
                      f"{seconds / args.log_interval * len(trainloader):.1f} s/epoch", flush=True)
                running_loss.zero_()
                interval_start = time.perf_counter()


if __name__ == "__main__":
    main()
