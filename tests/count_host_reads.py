"""Count the reads of a tensor's value back to the host that a training step makes (tests/test_cifar10_deepspeed.py).

    deepspeed --num_gpus 2 tests/count_host_reads.py --report reads.json dense-fp32 moe-ep2-fp16

Each run trains the script's train() for an epoch of 20 steps and one of 40, with no log line in either, counting
every read (item, tolist, bool, int, float, index, cpu, numpy) and every wait for the device (the accelerator's
synchronize) by the place that asked; what the longer epoch
reads more, a place at a time, is what its steps read. Rank 0 writes every rank's per-step reads to the report.
"""

import argparse
import collections
import contextlib
import json
import os
import sys

import deepspeed
import deepspeed.comm as dist
import torch
import torchvision
from deepspeed.accelerator import get_accelerator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import cifar10_deepspeed  # noqa: E402
from cifar10ds import machine  # noqa: E402
from train_cells import engine_of, start, write_report  # noqa: E402

HOST_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy")
RUNS = {
    "dense-fp32": ["--dtype", "fp32"],
    "dense-fp16": ["--dtype", "fp16"],
    "moe-top2-bf16": ["--dtype", "bf16", "--moe", "--num-experts", "2", "--top-k", "2"],
    "moe-rsample-fp16": ["--moe", "--num-experts", "2", "--noisy-gate-policy", "RSample"],
    "moe-ep2-fp16": ["--moe", "--ep-world-size", "2", "--num-experts", "2", "--noisy-gate-policy", "RSample",
                     "--moe-param-group", "--stage", "2"],  # run_ds_moe.sh's run
}


@contextlib.contextmanager
def host_reads():
    """Every read of a tensor's value back to the host, and every synchronize of the accelerator, while the block
    runs, each by the place that asked: the nearest frame outside torch and torchvision, as (who, "file:function"),
    who being "project" or "deepspeed". On a GPU each one waits for the device's queue."""
    found = collections.Counter()
    torch_dirs = tuple(os.path.dirname(module.__file__) + os.sep for module in (torch, torchvision))
    deepspeed_dir = os.path.dirname(deepspeed.__file__) + os.sep

    def counting(original):
        def read(*args, **kwargs):
            frame = sys._getframe(1)
            while frame and frame.f_code.co_filename.startswith(torch_dirs):
                frame = frame.f_back
            path = frame.f_code.co_filename
            who = "deepspeed" if path.startswith(deepspeed_dir) else "project" if path.startswith(ROOT) else "other"
            found[who, f"{os.path.relpath(path, deepspeed_dir if who == 'deepspeed' else ROOT)}:{frame.f_code.co_name}"] += 1
            return original(*args, **kwargs)
        return read
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}
    for name, original in originals.items():
        setattr(torch.Tensor, name, counting(original))
    accelerator = get_accelerator()
    accelerator.synchronize = counting(accelerator.synchronize)
    try:
        yield found
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
        del accelerator.synchronize  # the class's again


def reads_of_an_epoch(steps, flags):
    """The host reads of train() over one epoch of `steps` steps with no log line in it."""
    args = cifar10_deepspeed.add_argument(
        ["--deepspeed", "--dataset", "synthetic", "--synthetic-train-size", str(16 * steps),
         "-e", "1", "--log-interval", "100000", "--seed", "0", *flags])
    engine, trainloader, testset = engine_of(args)
    with host_reads() as found:
        cifar10_deepspeed.train(engine, trainloader, testset, args)
    return found


def reads_per_step(flags):
    """What 20 more steps read, a place at a time: {(who, place): reads}."""
    short, long = (reads_of_an_epoch(steps, flags) for steps in (20, 40))
    return {place: count - short[place] for place, count in long.items() if count != short[place]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", required=True)
    parser.add_argument("runs", nargs="+", choices=RUNS)
    args, _ = parser.parse_known_args()  # DeepSpeed's launcher adds --local_rank
    start()
    report = {}
    for run in args.runs:
        ranks = [None] * dist.get_world_size()
        dist.all_gather_object(ranks, [[*place, count] for place, count in reads_per_step(RUNS[run]).items()])
        report[run] = ranks
    write_report(report, args.report)


if __name__ == "__main__":
    with machine.exit_without_teardown():
        main()
