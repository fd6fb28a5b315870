"""What the collectives of a 2-rank training step cost, against DeepSpeed's shared-memory all-reduce.

    deepspeed --num_gpus 2 --bind_cores_to_rank bench/allreduce.py

Times, side by side in one run, the collectives one fp32 step of
cifar10_deepspeed.py makes, at the sizes it makes them: the gradient
all-reduce (every parameter of the dense Net, one bucket), the all-reduce of
the gradient norm (one number), and the MoE layer's all-to-all (2 experts x 4
slots x 84 features). Each all-reduce also runs through DeepSpeed's
shared-memory kernel (`inference_all_reduce`), which DeepSpeed builds on CPU
but calls only from its inference engine; training's all-reduce goes through
the process group's backend (gloo on CPU). Prints a Markdown table on rank 0.
"""

import os
import statistics
import sys
import time

import deepspeed
import deepspeed.comm as dist
import torch
from deepspeed.accelerator import get_accelerator

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cifar10_deepspeed import Net, add_argument  # noqa: E402

REPEATS = 300


def milliseconds(collective):
    """The median, mean and 90th percentile of REPEATS timed calls after a warm-up, in milliseconds: a blocking
    collective that waits a scheduler tick now and then shows it in the mean, which is what a step pays."""
    for _ in range(20):
        collective()
    times = []
    for _ in range(REPEATS):
        dist.barrier()
        start = time.perf_counter()
        collective()
        times.append(time.perf_counter() - start)
    times.sort()
    return 1e3 * statistics.median(times), 1e3 * statistics.mean(times), 1e3 * times[int(0.9 * len(times)) - 1]


def cell(milliseconds):
    return " / ".join(f"{t:.3f}" for t in milliseconds)


def main():
    deepspeed.init_distributed()  # with DeepSpeed's shared-memory all-reduce, which the script does not make
    dist.barrier()  # every rank has mapped every buffer: they stay mapped, only their names go
    os.unlink(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ['MASTER_ADDR']}_"
              f"{os.environ['MASTER_PORT']}_{dist.get_rank()}")
    torch.set_num_threads(1)
    gradients = sum(p.numel() for p in Net(add_argument(["--deepspeed"])).parameters())
    dispatch = torch.zeros(2 * 4 * 84)
    rows = []
    for name, numel in (("all_reduce, gradients", gradients), ("all_reduce, gradient norm", 1)):
        tensor = torch.ones(numel)
        backend = milliseconds(lambda: dist.all_reduce(tensor))
        shm = milliseconds(lambda: dist.inference_all_reduce(tensor))
        rows.append(f"| {name} | {numel} | {cell(backend)} | {cell(shm)} | {backend[1] / shm[1]:.0f} |")
    backend = milliseconds(lambda: dist.all_to_all_single(torch.empty_like(dispatch), dispatch))
    rows.append(f"| all_to_all, MoE dispatch | {dispatch.numel()} | {cell(backend)} | - | - |")
    if dist.get_rank() == 0:
        backend_name = get_accelerator().communication_backend_name()
        print(f"| collective ({dist.get_world_size()} ranks, fp32) | elements | {backend_name} ms, median / mean / "
              "90th percentile | DeepSpeed shm ms, the same | ratio of means |")
        print("| --- | --- | --- | --- | --- |")
        print("\n".join(rows))


if __name__ == "__main__":
    main()
