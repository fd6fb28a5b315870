"""The folders a run writes: each can hold its files, none holds an earlier run's files that this run would write
over or join, and one run writes into each at a time, on one folder every node shares (docs/checkpoints.md)."""

import datetime
import glob
import json
import os
import socket
import tempfile

import deepspeed.comm as dist

from cifar10ds import data, launch, machine, metrics

RUN_LOCK = ".run.lock"  # in each folder a run writes: the run writing there holds a lock on it (claim)
FOLDER_IN_USE = 73  # the exit status of every rank when another run writes into one of them (EX_CANTCREAT)


def check_directories(args):
    """Why --save-dir cannot hold checkpoints, --metrics-dir or --tensorboard-dir the monitors' files, or --data-dir
    CIFAR-10, or None. Each must be a directory this rank can write to (it is made if missing), unless the data is
    there already: a read-only copy of CIFAR-10 is fine."""
    wanted = [(flag, folder, cannot) for flag, folder, cannot in (
        ("--save-dir", args.save_dir, "cannot hold checkpoints"),
        ("--metrics-dir", args.metrics_dir, "cannot hold the metrics"),
        ("--tensorboard-dir", args.tensorboard_dir, "cannot hold TensorBoard's files")) if folder]
    if args.dataset == "cifar10" and not os.path.isdir(data.unpacked(args)):
        wanted.append(("--data-dir", args.data_dir, "cannot hold the CIFAR-10 download"))
    for flag, folder, cannot in wanted:
        if os.path.exists(folder) and not os.path.isdir(folder):
            return f"{flag} {folder} {cannot}: it is a file, not a directory"
        try:
            os.makedirs(folder, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
                pass
        except OSError as e:
            return f"{flag} {folder} {cannot}: {e.strerror}"
    return None


def check_earlier_run(args):
    """Why a new run (no --resume) would write over an earlier run's files, or None: its checkpoints in --save-dir
    (the new run's epoch1, epoch2, ... replace them, and 'latest' names its own), its series in --metrics-dir or
    --tensorboard-dir (a plot or TensorBoard would draw the two runs as one). --resume continues that run and its
    series; so does --resume auto, and where it finds no checkpoint (a run that stopped before its first save) it
    appends to the series of that run alone (another_runs_series)."""
    if args.resume:
        return None
    latest = os.path.join(args.save_dir, "latest") if args.save_dir else None
    if latest and os.path.isfile(latest):
        with open(latest, errors="replace") as f:
            tag = f.read(200).strip() or "none"
        return (f"--save-dir {args.save_dir} holds an earlier run's checkpoints (its 'latest' names {tag}), which "
                f"this run would write over: continue that run with --resume, or give this run another --save-dir")
    for flag, folder in series_folders(args):
        if holds_series(folder):
            return (f"{flag} {folder} holds an earlier run's series ({series(folder)}), which this run's would join "
                    f"as one run: give this run another {flag}, or continue that run with --resume")
    return None


def series_folders(args):
    return [(flag, folder) for flag, folder in (("--metrics-dir", args.metrics_dir),
                                                ("--tensorboard-dir", args.tensorboard_dir)) if folder]


def series(folder):
    return os.path.join(folder, metrics.MONITOR_JOB)


def holds_series(folder):
    """Whether the monitors' folder in `folder` holds any file (unreadable: as empty, never an error)."""
    return bool(glob.glob(os.path.join(glob.escape(series(folder)), "*")))


_held_locks = {}  # real path: the open lock file of a folder this process writes (closing any fd of it unlocks)


def claim(args):
    """One run per folder it writes: rank 0 takes a lock on .run.lock in --save-dir, --metrics-dir and
    --tensorboard-dir for the whole run, and writes there which run holds it (host, process, start). Where another
    live run holds one, every rank stops with one line naming that run, before any work: two runs would write over
    each other's checkpoints, or into one series that a plot or TensorBoard draws as one run; so they do where
    --resume auto would append to another run's series (another_runs_series). Every rank calls it.

    The lock is a POSIX record lock (machine.lock_at_once). On a shared file system the server holds it for the
    client node: NFSv4, Lustre (mounted with flock), GPFS and BeeGFS lock across nodes, and release a node that
    went away once its lease ends (NFSv4: 90 s by default). Where the file system has no locks, rank 0 says so
    and the run goes on unguarded."""
    found = [None, None, None]  # another run's live folder, another run's series, what this run wrote
    if dist.get_rank() == 0:
        earlier = {}  # real path: what the folder's lock file held before this run (claimed, or found unlockable)
        found[0] = first_held([("--save-dir", args.save_dir), *series_folders(args)], earlier)
        found[1] = None if found[0] else another_runs_series(args, earlier)
        if not any(found):
            write_record()
        found[2] = written_in_lock(args.save_dir)
    dist.broadcast_object_list(found, src=0)
    if found[0]:
        flag, folder, run = found[0]
        machine.stop(f"error: {flag} {folder} is in use by another run ({run}): wait for it to end, or give this run "
                     f"another {flag}", status=FOLDER_IN_USE)
    if found[1]:
        machine.stop(f"cifar10_deepspeed.py: error: {found[1]}", status=2)
    stop_unless_every_node_shares(args.save_dir, found[2])


def another_runs_series(args, earlier):
    """Why --resume auto, finding no checkpoint in --save-dir, would append to another run's series, or None. It
    starts afresh, and appends to the series of the run that last used this --save-dir and stopped before its first
    save (the same job, requeued); those of any other run (the job before, in a job array) it would join as one
    run. Which run wrote them: what each folder's lock file held before this run claimed it (`earlier`)."""
    if args.resume != "auto" or os.path.isfile(os.path.join(args.save_dir, "latest")):
        return None
    for flag, folder in series_folders(args):
        if holds_series(folder) and earlier.get(os.path.realpath(folder)) != earlier.get(
                os.path.realpath(args.save_dir)):
            return (f"{flag} {folder} holds the series of another run than the one that last used --save-dir "
                    f"{args.save_dir} ({series(folder)}), which this run's would join as one run: give this run "
                    f"another {flag}")
    return None


def stop_unless_every_node_shares(save_dir, lock):
    """Each other node's first rank reads the run lock rank 0 wrote in --save-dir. A node that does not find it has
    a folder of its own (a local disk): its ranks would save their part of each checkpoint apart, and --resume
    load on some nodes and start afresh on others (a hang). Every rank stops with one line, before any work."""
    elsewhere = launch.local_rank() == 0 and dist.get_rank() != 0
    apart = [None] * dist.get_world_size()
    dist.all_gather_object(apart, socket.gethostname() if elsewhere and lock and read_lock(save_dir) != lock else None)
    if host := next((host for host in apart if host), None):
        machine.stop(f"cifar10_deepspeed.py: error: --save-dir {save_dir} is not one folder every node shares: on host "
                     f"{host} it does not hold what rank 0 wrote there; give a folder on a file system every node "
                     f"mounts (docs/nodes.md)", status=2)


def written_in_lock(folder):
    """What this process wrote in the run lock it holds on `folder`, or None: read through the descriptor it holds."""
    fd = _held_locks.get(os.path.realpath(folder)) if folder else None
    return None if fd is None else os.pread(fd, 4096, 0).decode()


def read_lock(folder):
    """What the run lock file in `folder` holds, or None (in a process holding no lock on it)."""
    try:
        with open(os.path.join(folder, RUN_LOCK)) as f:
            return f.read()
    except OSError:
        return None


def first_held(folders, earlier):
    """Lock each (flag, folder) given, a folder named twice once, keeping in `earlier` what its lock file held;
    (flag, folder, the run holding it) for the first that another run holds, or None."""
    for flag, folder in folders:
        if folder and os.path.realpath(folder) not in earlier:
            holder = lock_folder(folder, flag, earlier)
            if holder:
                return holder
    return None


def lock_folder(folder, flag, earlier):
    """Hold `folder`'s run lock for the rest of this process, or return (flag, folder, the run that holds it)."""
    fd = os.open(os.path.join(folder, RUN_LOCK), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        locked = machine.lock_at_once(fd)
    except OSError as e:
        print(f"warning: {flag} {folder} has no file locks ({e.strerror}): nothing stops another run "
              f"from writing into it at the same time", flush=True)
        os.close(fd)
        earlier[os.path.realpath(folder)] = None
        return None
    if not locked:
        holder = (flag, folder, run_holding(fd))
        os.close(fd)
        return holder
    earlier[os.path.realpath(folder)] = os.pread(fd, 4096, 0)
    _held_locks[os.path.realpath(folder)] = fd
    return None


def write_record():
    """Write which run this is (host, process, start, SLURM job), the same in each folder it holds the lock of."""
    record = json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                         "started": datetime.datetime.now().astimezone().isoformat(" ", "seconds"),
                         "slurm_job": os.environ.get("SLURM_JOB_ID")}).encode()
    for fd in _held_locks.values():
        os.ftruncate(fd, 0)
        os.write(fd, record)
        os.fsync(fd)  # on NFS, other nodes see what a file holds once it is flushed (or closed: this one stays open)


def run_holding(fd):
    """The run that holds a save dir's lock, in a few words, from what it wrote in the lock file."""
    try:
        run = json.loads(os.pread(fd, 4096, 0))
        slurm = f", SLURM job {run['slurm_job']}" if run.get("slurm_job") else ""
        return f"host {run['host']}, process {run['pid']}{slurm}, started {run['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a run that is starting"
