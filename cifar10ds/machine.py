"""The machine a run lands on: how a rank stops, the GPU torch may not be able to use, the cores, compiling,
and the lines that say what was chosen (docs/gpu.md, docs/compile.md, docs/nodes.md)."""

import contextlib
import datetime
import errno
import fcntl
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import traceback

import deepspeed
import deepspeed.comm as dist
import torch
import torchvision
from deepspeed.accelerator import get_accelerator

from cifar10ds import launch


STOP_GRACE = 5  # seconds a rank that does not print waits before it leaves, where there is no process group yet


def stop(line, status=1, every_rank=False):
    """End this rank with `line` on standard error and exit `status`: the one way a run stops early.

    A line that every rank meets (a failed download, a checkpoint that does not fit) is printed once per node,
    and the ranks leave together: a launcher kills the other ranks as soon as one exits, which could otherwise
    come before the printing rank has printed (a dead peer ends that wait at once; before the process group
    exists, the others wait STOP_GRACE seconds). A line that may be this rank's own (every_rank) is printed by
    this rank, which leaves at once. The process then ends in exit_without_teardown.
    """
    printing = every_rank or launch.local_rank() == 0
    if printing:
        print(line, file=sys.stderr, flush=True)
    if not every_rank and dist.is_initialized():
        with contextlib.suppress(RuntimeError):
            dist.barrier()
    elif not printing:
        time.sleep(STOP_GRACE)  # no process group to wait on yet: the printing rank prints meanwhile
    raise SystemExit(status)


@contextlib.contextmanager
def exit_without_teardown(after_ctrl_c="nothing was saved since the last complete checkpoint"):
    """Run the body, then end the process at once with its exit status (a traceback first, as Python prints it; a
    Ctrl-C's one line, with what it left undone: after_ctrl_c).

    DeepSpeed keeps references to its process groups, so PyTorch's gloo worker threads outlive
    destroy_process_group(). One of them can still be releasing the last collective's tensors when Python
    finalizes; freeing a tensor made in Python takes the GIL, a finalizing interpreter ends the thread instead,
    and the process aborts after its results ("terminate called without an active exception", exit -6;
    pytorch/pytorch#190489). Every file a run writes is closed by then.
    """
    status = 0
    try:
        yield
    except SystemExit as e:
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
        status = e.code if isinstance(e.code, int) else int(e.code is not None)
    except KeyboardInterrupt:  # a Ctrl-C before training's handler was set, or a second one (preemption.Preemption)
        status = 130
        if launch.local_rank() == 0:
            print(f"Stopped at once by Ctrl-C (exit {status})" + (f": {after_ctrl_c}" if after_ctrl_c else ""),
                  file=sys.stderr)
    except BaseException:  # the traceback Python would print, and its status
        traceback.print_exc()
        status = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def lock_at_once(fd):
    """Take an exclusive POSIX record lock on the open file `fd` without waiting: True, or False where another
    process holds it; a file system without locks raises its OSError. The kernel releases the lock when its
    process ends, however it ends (kill -9 too)."""
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EAGAIN):
            return False
        raise
    return True


def first_line(error):
    """An exception's first line, or its type's name where it says nothing."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def why_not_written(error, path):
    """Why a write under `path` failed, in a few words. torch.save reports a full disk as a RuntimeError from its
    zip writer ("unexpected pos 576 vs 534"): a file system with no space left is named as such, whatever was
    raised; torch's other reasons lose their C++ source position."""
    with contextlib.suppress(OSError):
        if shutil.disk_usage(path).free == 0:
            return os.strerror(errno.ENOSPC)
    return getattr(error, "strerror", None) or re.sub(r"^\[enforce fail at [^]]*\][\s.]*", "", first_line(error))


def dist_timeout(args):
    """How long a collective waits for a peer before the run fails: --dist-timeout minutes, or DeepSpeed's default
    (10 minutes, or DEEPSPEED_TIMEOUT)."""
    if args.dist_timeout is None:
        return deepspeed.constants.default_pg_timeout
    return datetime.timedelta(minutes=args.dist_timeout)


def take_turn(work, my_turn, timeout):
    """Run work() -> (result, a line or None) on the ranks whose turn it is, while every other rank waits; return
    this rank's result and the first rank's line, on every rank, so that all stop alike.

    The waiting ranks wait in collectives of at most a quarter of `timeout` (10 s at most), each answered by the
    working ranks as work() goes on in a thread of theirs: a turn that outlasts the timeout, such as a slow
    download, ends no rank, and a rank that stops answering ends the others after `timeout`, as anywhere."""
    beat = min(10.0, timeout.total_seconds() / 4)
    done, outcome = threading.Event(), {}

    def run():
        try:
            outcome["result"], outcome["line"] = work()
        except BaseException as e:  # raised again in the main thread
            outcome["raised"] = e
        finally:
            done.set()

    if my_turn:
        threading.Thread(target=run, daemon=True).start()
    while True:
        working = my_turn and not done.wait(beat)
        states = [None] * dist.get_world_size()
        dist.all_gather_object(states, (working, None if working else outcome.get("line")))
        if not any(still for still, _ in states):
            break
    if "raised" in outcome:
        raise outcome["raised"]
    return outcome.get("result"), next((line for _, line in states if line), None)


@contextlib.contextmanager
def stop_if_the_port_is_taken():
    """Around deepspeed.init_distributed: a rendezvous port another run holds is one line with a free one."""
    try:
        yield
    except torch.distributed.DistNetworkError as e:
        if "EADDRINUSE" not in str(e):
            raise
        port, free = os.environ["MASTER_PORT"], launch.free_port()
        stop(f"error: port {port} of {os.environ.get('MASTER_ADDR')} is taken: in use by another run? Give this run a "
             f"free one: MASTER_PORT={free} (run_ds*.sh, python) or --master_port {free} (deepspeed, torchrun)",
             every_rank=True)


@contextlib.contextmanager
def stop_if_a_peer_is_lost():
    """End this rank with one line when a collective fails because another rank died or stopped answering.

    The backend raises from the next collective: gloo a RuntimeError from its transport (a peer's closed
    connection, or --dist-timeout passing), NCCL a DistBackendError. Each rank that sees it says so and exits.
    """
    try:
        yield
    except RuntimeError as e:
        if not (isinstance(e, torch.distributed.DistError) or "gloo" in str(e)):
            raise
        reason = re.split(r"\.\s", re.sub(r"^\[[^]]*\]\s*", "", first_line(e)))[0]
        stop(f"error: lost another rank ({reason}): it died or stopped answering, so this rank stops too; see that "
             f"rank's log for why. A run with --save-dir continues from its last finished epoch with --resume.",
             every_rank=True)


def use_share_of_cores():
    """Size this rank's thread pool to its share of the cores, unless the launcher did (OMP_NUM_THREADS).

    Without it every rank starts one thread per core, and ranks on one machine oversubscribe the cores, which
    makes each step several times slower.
    """
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(launch.cores_per_rank())


def data_loader_workers():
    """Data-loader worker processes for this rank, chosen from the cores it has.

    Where the accelerator computes on the host's cores (DeepSpeed's CPU accelerator), workers only compete with
    training for them: load in the training process. Otherwise feed the accelerator from up to 4 workers,
    leaving one core to the training process.
    """
    if get_accelerator().is_synchronized_device():
        return 0
    return min(4, launch.cores_per_rank() - 1)


# The newest CUDA each NVIDIA driver runs (the CUDA toolkits' least Linux drivers), newest first, as PyTorch's
# wheel index names it.
CUDA_FOR_DRIVER = ((580, "cu130"), (570, "cu128"), (560, "cu126"), (550, "cu124"), (530, "cu121"), (520, "cu118"))
TORCH_INDEX = "https://download.pytorch.org/whl/"


def listed_gpus():
    """The NVIDIA GPUs nvidia-smi lists, and their driver's version: ([], None) without nvidia-smi or a GPU."""
    try:
        listing = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return [], None
    rows = [line.rsplit(",", 1) for line in listing.splitlines() if "," in line]
    return [name.strip() for name, _ in rows], (rows[0][1].strip() if rows else None)


def unusable_gpu():
    """Why torch cannot use this machine's GPU, and the ways out, or None when it can or there is none.

    Where torch finds no CUDA, DeepSpeed picks its CPU accelerator without a word (its real_accelerator.py),
    and a run meant for the GPU trains for hours on the CPU. A GPU is there when nvidia-smi lists one or
    CUDA_VISIBLE_DEVICES names one. DS_ACCELERATOR set chooses the accelerator on purpose: no check.
    """
    if "DS_ACCELERATOR" in os.environ or torch.cuda.is_available():
        return None
    names, driver = listed_gpus()
    # DeepSpeed's launcher (it sets LOCAL_SIZE) sets CUDA_VISIBLE_DEVICES to its slots, on a CPU too.
    visible = None if "LOCAL_SIZE" in os.environ else os.environ.get("CUDA_VISIBLE_DEVICES")
    names_a_gpu = bool((visible or "").strip()) and not visible.strip().startswith("-")  # -1 hides them all
    if not names and not names_a_gpu:
        return None
    try:
        torch.cuda.init()
        reason = "it finds no GPU."
    except (RuntimeError, AssertionError) as e:  # AssertionError: a torch built without CUDA
        reason = re.split(r"(?<=\.)\s", str(e).strip())[0]  # torch's first sentence
    there = f"nvidia-smi lists {len(names)} GPU(s) ({names[0]}, driver {driver})" if names else (
        f"CUDA_VISIBLE_DEVICES={visible} names a GPU")
    if visible is not None and not names_a_gpu:
        way_out = f"set CUDA_VISIBLE_DEVICES to the GPUs to use ({visible!r} hides them all)"
    else:
        way_out = install_torch_for(driver)
    return (f"{there}, but torch {torch.__version__} cannot use CUDA: {reason} DeepSpeed would train on the CPU "
            f"instead. Either {way_out}, or set DS_ACCELERATOR=cpu to train on the CPU on purpose.")


def install_torch_for(driver):
    """The way out for a driver too old for this torch's CUDA: the command for torch built for the driver's CUDA."""
    major = int(driver.split(".")[0]) if driver and driver.split(".")[0].isdigit() else None
    if major is None:
        return "install the torch built for this machine's CUDA driver (docs/gpu.md)"
    cuda = next((cuda for least, cuda in CUDA_FOR_DRIVER if major >= least), None)
    if cuda is None:
        return f"update the NVIDIA driver (PyTorch's CUDA builds need {CUDA_FOR_DRIVER[-1][0]} or newer)"
    versions = (f"{name}=={version.__version__.split('+')[0]}" for name, version in
                (("torch", torch), ("torchvision", torchvision)))
    return (f"install torch built for driver {driver}: pip install {' '.join(versions)} --index-url "
            f"{TORCH_INDEX}{cuda} (or the nearest version that index has: docs/gpu.md)")


def accelerator_line():
    """Rank 0's first line: the accelerator this run trains on, and how it was chosen."""
    accelerator = get_accelerator()
    chosen = f"DS_ACCELERATOR={os.environ['DS_ACCELERATOR']}" if "DS_ACCELERATOR" in os.environ else "detected"
    ranks = launch.world_size()
    what = accelerator.device_name()
    if what == "cuda":
        what += f" ({torch.cuda.get_device_name(launch.local_rank())})"
    return (f"accelerator: {what}, {ranks} rank{'s' if ranks > 1 else ''}, {chosen}; "
            f"torch {torch.__version__}, DeepSpeed {deepspeed.__version__}")


def check_the_accelerator(optimizer):
    """Stop every rank where torch cannot use the GPU this box has; otherwise rank 0's first line names the
    accelerator, and the `optimizer` (use_torch_fused_adamw's words) that trains."""
    problem = unusable_gpu()
    if problem:
        stop(f"error: {problem}")
    if launch.rank() == 0:
        print(f"{accelerator_line()}; optimizer: {optimizer}", flush=True)


def use_torch_fused_adamw(config):
    """Have the config's Adam trained by torch's fused AdamW where DeepSpeed would build its own; return the
    optimizer that trains and why, in a few words.

    DeepSpeed's Adam is a C++ (CPU) or CUDA op it compiles on a first run: a minute or more with a compiler, a
    crash without one (deepspeedai/DeepSpeed#1897, #2772), and every load asks py-cpuinfo twice (2.4 s a process).
    torch's fused AdamW needs nothing built: a step of this Net's optimizer takes 0.07 ms on a CPU core against
    the op's 0.05 ms, 1 % of a training step (bench/adam_step.py). A config that sets "torch_adam" keeps its choice;
    fp16 master weights work only with DeepSpeed's CPU Adam, built once, then cached.
    """
    optimizer = config.get("optimizer") or {}
    params = optimizer.setdefault("params", {})
    if optimizer.get("type", "").lower() not in ("adam", "adamw"):
        return f"{optimizer.get('type', 'none')}, as the config asks"
    if "torch_adam" in params:
        return f"{'torch' if params['torch_adam'] else 'DeepSpeed'}'s Adam, as the config asks"
    if config.get("fp16", {}).get("fp16_master_weights_and_grads"):
        load_cpu_adam()
        return "DeepSpeed's CPU Adam, which fp16 master weights need (its C++ op built once, then cached)"
    params.update(torch_adam=True, fused=True)
    return "torch's fused AdamW (nothing to compile)"


def time_steps_without_synchronizing(config):
    """Have DeepSpeed's throughput timer read the host's clock without waiting for the device.

    The timer is on by default and synchronizes the accelerator where every step starts and ends
    (deepspeedai/DeepSpeed#5363): two waits a step for the device's queue to drain, so a GPU idles while
    Python prepares the next step. Unsynchronized, its line every steps_per_print steps still prints,
    measured by the host's clock over the steps between (the queue stays bounded). A config that sets
    timers.throughput.synchronized keeps its choice.
    """
    config.setdefault("timers", {}).setdefault("throughput", {}).setdefault("synchronized", False)


def load_cpu_adam():
    """Build (on a first run, about a minute) or load DeepSpeed's CPU Adam op, or stop in one line where it cannot
    be built: deepspeed.initialize would otherwise fail with a traceback from inside its engine."""
    try:
        get_accelerator().create_op_builder("CPUAdamBuilder").load()
    except Exception as e:
        stop(f"error: fp16_master_weights_and_grads needs DeepSpeed's CPU Adam, whose C++ op could not be built here "
             f"({first_line(e)}): install a C++ compiler, or set fp16_master_weights_and_grads to false to train "
             f"with torch's fused AdamW")


def compile_model(model_engine, args):
    """Compile the model through DeepSpeed's engine.compile() with the accelerator's backend (inductor on CPU and
    CUDA), or say in one line why it cannot and train eagerly. Rank 0 says which, before training.

    A one-op function is compiled first: it fails at once where the machine cannot compile (inductor needs a
    C++ compiler on a CPU, Triton on a GPU). Random ops in the compiled model draw PyTorch's eager numbers
    (inductor's fallback_random), so a seeded run's gate noise and trace match eager training. DeepSpeed's MoE
    gate reads the expert capacity on the host, where the graph breaks and that part runs eagerly; the line
    says so, and dynamo's own multi-line note of it is kept quiet.
    """
    backend = get_accelerator().get_compile_backend()
    try:
        torch.compile(lambda x: x + 1, backend=backend)(torch.zeros(2, device=model_engine.device))
    except Exception as e:  # the backend's compiler is missing or broken: any error means eager training
        line = f"--compile: cannot compile on this machine ({backend}: {first_line(e)}); training eagerly"
    else:
        from torch._inductor import config  # here, not at the top: importing inductor adds 0.4 s to every start
        config.fallback_random = True
        logging.getLogger("torch._dynamo").setLevel(logging.ERROR)
        model_engine.compile(backend=backend)
        breaks = "; the MoE gate's capacity, read on the host, runs eagerly between compiled parts" if args.moe else ""
        line = f"--compile: the model is compiled with torch.compile ({backend}) as its first steps run{breaks}"
    if dist.get_rank() == 0:
        print(line, flush=True)
