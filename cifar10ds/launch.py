"""The launch: what the launcher tells each rank, and what plain python lacks. Standard library only, so that
the run scripts can ask for a free port without importing torch (docs/launch.md, docs/nodes.md).

    MASTER_PORT=$(python3 cifar10ds/launch.py free-port)          # a free port of this machine
    MASTER_PORT=$(python3 cifar10ds/launch.py free-port 29500)    # 29500 if it is free here, else one line, exit 1
"""

import os
import random
import socket
import sys


LOWEST_PORT = 20000  # free_port() picks none below: the usual services' ports (databases, web servers, Jupyter)


def free_port():
    """A TCP port that nothing listens on now, and that nothing else takes in the seconds before the run binds it:
    below the kernel's ephemeral range, from which bind(0) and every outgoing connection (gloo opens dozens a
    run) take theirs, at random (the system's, whatever the seeds), so that runs started together get their own."""
    below = range(LOWEST_PORT, max(LOWEST_PORT, ephemeral_ports_start()))
    for port in random.SystemRandom().sample(below, min(100, len(below))):
        if is_free(port):
            return port
    with socket.socket() as s:  # no room below the ephemeral range, or none of it free: the kernel's pick
        s.bind(("", 0))
        return s.getsockname()[1]


def is_free(port):
    """Whether rank 0 could bind its rendezvous to `port` of this machine: nothing holds it, as torch's store binds
    (SO_REUSEADDR: the connections of a run that has ended, waiting out TIME_WAIT, do not hold it)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
            return True
        except OSError:
            return False


def ephemeral_ports_start():
    """The first port of the kernel's ephemeral range: Linux's setting, else its default (below macOS's 49152)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


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


def main(argv):
    """free-port: print a free port; free-port PORT: print PORT where it is free here, else stop in one line (a
    batch script that checks a given port on rank 0's node before it starts the ranks: the others would connect to
    the run that holds it, and wait there for --dist-timeout)."""
    if argv[:1] != ["free-port"] or len(argv) > 2 or not all(arg.isdigit() for arg in argv[1:]):
        sys.exit("usage: python3 cifar10ds/launch.py free-port [PORT]")
    if len(argv) == 2 and not is_free(int(argv[1])):
        sys.exit(f"error: port {argv[1]} of {socket.gethostname()} is taken: in use by another run? Give this run a "
                 f"free one (MASTER_PORT={free_port()}), or leave MASTER_PORT unset for one")
    print(argv[1] if len(argv) == 2 else free_port())


if __name__ == "__main__":
    main(sys.argv[1:])
