"""The launch: what the launcher tells each rank, and what plain python lacks. Standard library only, so that
the run scripts can ask for a free port without importing torch (docs/launch.md, docs/nodes.md).

    MASTER_PORT=$(python3 cifar10ds/launch.py free-port)
"""

import os
import socket
import sys


def free_port():
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def use_single_process_defaults():
    """Let `python cifar10_deepspeed.py` run as one rank: fill in what a launcher would set."""
    if "RANK" in os.environ:
        return
    for name, value in dict(RANK=0, LOCAL_RANK=0, WORLD_SIZE=1, LOCAL_SIZE=1, MASTER_ADDR="127.0.0.1",
                            MASTER_PORT=free_port()).items():
        os.environ.setdefault(name, str(value))


def rank():
    return int(os.environ.get("RANK", 0))


def local_rank():
    return int(os.environ.get("LOCAL_RANK", 0))


def world_size():
    return int(os.environ.get("WORLD_SIZE", 1))


def cores_per_rank():
    """This rank's share of the cores it may run on, among the ranks on this node."""
    local_size = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)
    return max(1, len(os.sched_getaffinity(0)) // local_size)


if __name__ == "__main__":
    if sys.argv[1:] != ["free-port"]:
        sys.exit("usage: python3 cifar10ds/launch.py free-port")
    print(free_port())
