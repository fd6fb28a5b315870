"""Checkpoints around DeepSpeed's save_checkpoint and load_checkpoint: what each holds beyond the engine's state
(run.json, the position, every rank's random numbers), 'latest' and 'best', --keep-last, --resume's checks, and
preemption: a scheduler's signal saves where the run is and leaves (docs/checkpoints.md)."""

import contextlib
import dataclasses
import json
import os
import re
import shutil
import signal

import deepspeed.comm as dist
import torch
from deepspeed.accelerator import get_accelerator

from cifar10ds import machine, model_files, options

CHECKPOINT_TAG = re.compile(r"epoch(\d+)(?:-step(\d+))?$")  # epoch<N> at its end, epoch<N>-step<S> mid-epoch
CHECK_EVERY = 10  # optimizer steps between the ranks' agreement on a signal: one small all-reduce
PREEMPTED = 75  # the exit status of a rank that was preempted and saved a checkpoint (EX_TEMPFAIL)


@dataclasses.dataclass
class Position:
    """Where training goes on: the epoch (from 0), the optimizer steps already taken in it, and, from a
    mid-epoch checkpoint, this rank's random-number state and part of the log interval in progress."""
    epoch: int = 0
    step: int = 0
    rank_state: dict = None


def run_description(args, model_engine):
    """What a checkpoint must match to be resumed: the model's shape, world size, precision and ZeRO stage."""
    return {"moe": args.moe, "num_experts": args.num_experts if args.moe else None,
            "mlp_type": args.mlp_type if args.moe else None, "ep_world_size": args.ep_world_size if args.moe else None,
            "world_size": dist.get_world_size(), "dtype": options.config_dtype(model_engine.config),
            "zero_stage": model_engine.zero_optimization_stage()}


def begin_save(model_engine, args, epoch, step=None):
    """The tag of the checkpoint of `epoch` (from 0), finished or `step` steps in; rank 0 writes its run.json
    first, which says which run saved it and the flags that build its Net (for export_model.py)."""
    tag = f"epoch{epoch + 1}" if step is None else f"epoch{epoch + 1}-step{step}"
    if dist.get_rank() == 0:
        os.makedirs(os.path.join(args.save_dir, tag), exist_ok=True)
        with open(os.path.join(args.save_dir, tag, "run.json"), "w") as f:
            json.dump({**run_description(args, model_engine), "model": model_files.model_flags(args)}, f)
    return tag


def client_state(epoch, step=None, interval=None):
    """What DeepSpeed's checkpoint keeps for this script: the position to go on from, and every rank's
    random-number state with its unlogged log interval mid-epoch.

    The random numbers are the gate's noise and random token selection (in training and in evaluation), and
    the data loader's worker seed; DeepSpeed's checkpoints do not keep them. Every rank must call it.
    """
    state = {"torch": torch.get_rng_state(), "accelerator": get_accelerator().get_rng_state(), "interval": interval}
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return {"epoch": epoch + 1 if step is None else epoch, "step": step or 0, "rng_states": states}


def end_save(args, tag):
    """Once every rank's files are complete, rank 0 points 'latest' at `tag`, atomically (DeepSpeed would write it
    as soon as rank 0's own are, so a kill at the wrong moment left a 'latest' that does not load); then
    --keep-last prunes."""
    dist.barrier()
    if dist.get_rank() == 0:
        replace_file(os.path.join(args.save_dir, "latest"), tag)
        if args.keep_last:
            prune_checkpoints(args.save_dir, args.keep_last)


def replace_file(path, text):
    """Write `text` to `path` in one step: a reader finds the old text or the new, never a part."""
    with open(f"{path}.tmp", "w") as f:
        f.write(text)
    os.replace(f"{path}.tmp", path)


def checkpoint_order(tag):
    """The training position a checkpoint tag names, as (epochs finished, steps into the next)."""
    epoch, step = CHECKPOINT_TAG.match(tag).groups()
    return (int(epoch), 0) if step is None else (int(epoch) - 1, int(step))


def prune_checkpoints(save_dir, keep):
    """Delete all but the newest `keep` checkpoints in save_dir, never those 'latest' and 'best' name."""
    tags = sorted((t for t in os.listdir(save_dir) if CHECKPOINT_TAG.match(t)), key=checkpoint_order)
    kept = set(tags[-keep:])
    for name in ("latest", "best"):
        path = os.path.join(save_dir, name)
        if os.path.islink(path):
            kept.add(os.readlink(path))
        elif os.path.isfile(path):
            with open(path) as f:
                kept.add(f.read().strip())
    for tag in set(tags) - kept:
        shutil.rmtree(os.path.join(save_dir, tag), ignore_errors=True)


def mark_best(save_dir, tag, accuracy):
    """Point the link 'best' at `tag` if its test accuracy beats best's (kept in each tag's eval.json); rank 0."""
    if dist.get_rank():
        return
    with open(os.path.join(save_dir, tag, "eval.json"), "w") as f:
        json.dump({"accuracy": accuracy}, f)
    best = os.path.join(save_dir, "best")
    try:
        with open(os.path.join(best, "eval.json")) as f:
            if json.load(f)["accuracy"] >= accuracy:
                return
    except (OSError, ValueError, KeyError):
        pass  # no best yet, or one that cannot be read: this one is best
    os.symlink(tag, f"{best}.tmp")
    os.replace(f"{best}.tmp", best)


def latest(args, model_engine):
    """The checkpoint --resume continues from: the one 'latest' names in --save-dir, if it fits this run; None
    where --resume auto finds none. Anything else stops every rank with one line."""
    path = os.path.join(args.save_dir, "latest")
    if not os.path.isfile(path):
        if args.resume == "auto":
            if dist.get_rank() == 0:
                print(f"--resume auto: no checkpoint in {args.save_dir} yet, so training starts at epoch 1")
            return None
        machine.stop(f"error: --resume: no checkpoint in {args.save_dir} (it has no 'latest' file)")
    with open(path) as f:
        path = os.path.join(args.save_dir, f.read().strip())
    try:
        with open(os.path.join(path, "run.json")) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        machine.stop(f"error: --resume: checkpoint {path} is incomplete (no readable run.json)")
    described = run_description(args, model_engine)
    changed_keys = [key for key, value in described.items() if saved.get(key) != value]
    changed = [f"{key} {saved.get(key)} -> {described[key]}" for key in changed_keys]
    if changed:
        machine.stop(f"error: --resume: checkpoint {path} was saved by a different run ({', '.join(changed)}); "
                     f"resume with its settings, or save to another --save-dir"
                     + (f"; to train on from its weights in this layout, start a new run with --init-from {path}"
                        if set(changed_keys) <= {"world_size", "ep_world_size", "zero_stage", "dtype"} else ""))
    return path


@contextlib.contextmanager
def stop_if_it_cannot_load(path):
    """Around DeepSpeed's load_checkpoint: whatever it raises, this rank stops with one line (the others follow
    at the barrier in position())."""
    try:
        yield
    except Exception as e:  # DeepSpeed raises many kinds; any of them means this checkpoint cannot be used
        reason = machine.first_line(e) if str(e).strip() else "no reason given; is a file missing?"
        machine.stop(f"error: --resume: cannot load checkpoint {path}: {type(e).__name__} in DeepSpeed's "
                     f"load_checkpoint: {reason}", every_rank=True)


def position(load_path, client_state, path):
    """The Position a loaded checkpoint continues from, once every rank has loaded its part; its random numbers
    restored, and rank 0's line saying where the run goes on."""
    if load_path is None:
        machine.stop(f"error: --resume: cannot load checkpoint {path}: DeepSpeed found no model states there")
    try:
        dist.barrier()  # a rank that could not load its part has exited: do not go on without it
    except RuntimeError:
        machine.stop(f"error: --resume: another rank could not load its part of checkpoint {path}")
    start = Position(client_state["epoch"], client_state.get("step", 0), client_state["rng_states"][dist.get_rank()])
    set_rng_state(start.rank_state)
    if dist.get_rank() == 0:
        print(f"Resuming from {path} at epoch {start.epoch + 1}" + (f", step {start.step + 1}" if start.step else ""))
    return start


def set_rng_state(rank_state):
    torch.set_rng_state(rank_state["torch"])
    get_accelerator().set_rng_state(rank_state["accelerator"])


class Preemption:
    """A scheduler's SIGTERM or SIGUSR1 (SLURM, Kubernetes, DeepSpeed's launcher passing one on): the handler
    notes it and does nothing else, so a second signal, during the save too, changes nothing. The ranks agree on
    it at a step boundary, every CHECK_EVERY steps and at each epoch's end, then save where they are and leave
    together with exit status PREEMPTED (run again with --resume), or 128 + the signal's number where there is
    no --save-dir and nothing was saved."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, device):
        self.device = device
        self.signum = 0
        self.previous = {signum: signal.signal(signum, self.note) for signum in self.SIGNALS}

    def note(self, signum, frame):
        self.signum = self.signum or signum

    def agreed(self):
        """The signal that reached any rank (0 if none); every rank must ask at the same step."""
        if dist.get_world_size() == 1:
            return self.signum
        flag = torch.tensor([self.signum], dtype=torch.int32, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())

    def agreed_at(self, steps, steps_per_epoch):
        """agreed(), at every CHECK_EVERY-th of the epoch's `steps` but its last (its end asks anyway); else 0."""
        return self.agreed() if steps % CHECK_EVERY == 0 and steps < steps_per_epoch else 0

    def stop(self, signum, save_dir, tag):
        """Say what was saved (`tag`, or None: nothing) and end every rank together."""
        name = signal.Signals(signum).name
        if tag:
            machine.stop(f"Preempted by {name}: saved checkpoint {os.path.join(save_dir, tag)}; run again with "
                         f"--resume to continue from there (exit {PREEMPTED})", status=PREEMPTED)
        machine.stop(f"Preempted by {name}: nothing saved, as there is no --save-dir (exit {128 + signum})",
                     status=128 + signum)

    def close(self):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
