"""Why a finished 2-rank run could abort at exit, shown on purpose in plain PyTorch.

    python bench/exit_race.py [--delays 12]

DeepSpeed keeps references to its process groups, so after
destroy_process_group() PyTorch's gloo worker threads live on into the
interpreter's teardown. If one of them releases a collective's tensor made in
Python while Python finalizes, freeing it takes the GIL, the finalizing
interpreter ends the thread, and the process aborts with "terminate called
without an active exception". In a training run the window is a few
microseconds after the last collective, which a loaded CPU sometimes stretches.
Here rank 1 leaves an all-reduce in flight and rank 0 joins it a few
milliseconds late, so the worker releases it while rank 1 is exiting. Each
delay runs twice: rank 1 ending through the interpreter's teardown (as Python
does) and through os._exit (as cifar10ds.machine.exit_without_teardown does). Prints how
many runs of each aborted.
"""

import argparse
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cifar10ds.launch import free_port  # noqa: E402

RANK_CODE = """
import os, sys, time
import torch
import torch.distributed as dist
dist.init_process_group("gloo")
tensor = torch.ones(1_000_000)
if dist.get_rank() == 0:
    time.sleep(float(sys.argv[1]))
    dist.all_reduce(tensor)
else:
    work = dist.all_reduce(tensor, async_op=True)
    del work, tensor  # the gloo worker thread now holds the tensor's last reference
kept = dist.group.WORLD  # as DeepSpeed keeps its groups: destroy_process_group() does not join gloo's threads
dist.destroy_process_group()
if sys.argv[2] == "os._exit":
    os._exit(0)
"""


def run_pair(delay, ending):
    """Rank 1's exit status and whether it printed the abort."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2"}
    ranks = [subprocess.Popen([sys.executable, "-c", RANK_CODE, f"{delay}", ending], env={**env, "RANK": str(rank)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    rank_1_err = ranks[1].communicate(timeout=120)[1]
    ranks[0].communicate(timeout=120)
    return ranks[1].returncode, "terminate called without an active exception" in rank_1_err


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--delays", type=int, default=12, help="delays of rank 0, 0 to 2 ms apart each")
    options = parser.parse_args()
    delays = [0.002 * i for i in range(options.delays)]
    for ending in ("teardown", "os._exit"):
        aborted = 0
        for delay in delays:
            status, abort = run_pair(delay, ending)
            aborted += abort
            print(f"rank 1 ends by {ending:8s}  rank 0 late by {1000 * delay:4.0f} ms: exit {status}"
                  f"{'  (terminate called without an active exception)' if abort else ''}", flush=True)
        print(f"{ending}: {aborted} of {len(delays)} runs aborted\n", flush=True)


if __name__ == "__main__":
    main()
