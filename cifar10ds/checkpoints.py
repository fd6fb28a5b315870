"""Checkpoints around DeepSpeed's save_checkpoint and load_checkpoint: what each holds beyond the engine's state
(run.json, the position, every rank's random numbers), 'latest' and 'best', --keep-last, --resume's checks, a
failed write in one line (docs/checkpoints.md). A signal's save: preemption.py; one run per folder: folders.py."""

import contextlib
import dataclasses
import json
import os
import re
import shutil

import deepspeed.comm as dist
import torch
from deepspeed.accelerator import get_accelerator

from cifar10ds import data, machine, model_files, options, universal

CHECKPOINT_TAG = re.compile(r"epoch(\d+)(?:-step(\d+))?$")  # epoch<N> at its end, epoch<N>-step<S> mid-epoch
LAYOUT = ("world_size", "ep_world_size", "zero_stage")  # what --resume may change: universal.load_in_this_layout
POSITION = ("batch_size", "data_order_seed")  # what else it may change, mid-epoch as check_position allows
SAVE_FAILED = 74  # the exit status of every rank when a checkpoint could not be written (EX_IOERR)


@dataclasses.dataclass
class Position:
    """Where training goes on: the epoch (from 0), the optimizer steps already taken in it, and, from a
    mid-epoch checkpoint, this rank's random-number state and part of the log interval in progress."""
    epoch: int = 0
    step: int = 0
    rank_state: dict = None


def run_description(args, model_engine):
    """What a checkpoint must match to be resumed: the model's shape, world size, precision and ZeRO stage; and
    what a mid-epoch checkpoint's position counts in: the global batch and the data order (check_position)."""
    return {"moe": args.moe, "num_experts": args.num_experts if args.moe else None,
            "mlp_type": args.mlp_type if args.moe else None, "ep_world_size": args.ep_world_size if args.moe else None,
            "world_size": dist.get_world_size(), "dtype": options.config_dtype(model_engine.config),
            "zero_stage": model_engine.zero_optimization_stage(), "batch_size": model_engine.train_batch_size(),
            "data_order_seed": data.order_seed(args)}


def tag_of(epoch, step=None):
    """The checkpoint of `epoch` (from 0) finished, epoch<N>, or `step` optimizer steps into it, epoch<N>-step<S>."""
    return f"epoch{epoch + 1}" if step is None else f"epoch{epoch + 1}-step{step}"


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


@contextlib.contextmanager
def saving(model_engine, args, tag):
    """Around DeepSpeed's save_checkpoint on every rank: rank 0 writes run.json first (the run that saved it, and
    the flags that build its Net), then 'latest' once every rank's files are complete, atomically (DeepSpeed
    writes it as soon as rank 0's own are: a kill at the wrong moment left a 'latest' that does not load); then
    --keep-last prunes.

    A write that fails on any rank (a full disk, an I/O error), whatever it raises (torch.save reports a full disk
    as a RuntimeError from its zip writer), removes the partial checkpoint and stops every rank together with one
    line: nothing finished is lost, and 'latest' still names the last complete checkpoint. DeepSpeed's save has
    collectives between its writes, so a rank whose write raised would leave the others waiting there: its writes
    (checkpoint_engine.save, and the recovery scripts it copies into ZeRO checkpoints) record the failure instead,
    every rank runs the save to its end, and then the ranks agree.
    """
    failures = []

    def recorded(write):
        def write_or_record(*write_args, **kwargs):
            if not failures:  # after one failure, nothing more is written
                try:
                    write(*write_args, **kwargs)
                except Exception as e:  # OSError, torch's RuntimeError, ...: the write failed
                    failures.append(machine.why_not_written(e, args.save_dir))
        return write_or_record

    folder = os.path.join(args.save_dir, tag)
    if dist.get_rank() == 0:
        recorded(write_run_json)(folder, {**run_description(args, model_engine), "model": model_files.model_flags(args)})
    writers = ((model_engine.checkpoint_engine, "save"), (model_engine, "_copy_recovery_script"))
    originals = [getattr(owner, name) for owner, name in writers]
    for (owner, name), write in zip(writers, originals):
        setattr(owner, name, recorded(write))
    try:
        yield
    finally:
        for (owner, name), write in zip(writers, originals):
            setattr(owner, name, write)
    stop_if_any_failed(failures, args.save_dir, tag)
    if dist.get_rank() == 0:
        recorded(replace_file)(os.path.join(args.save_dir, "latest"), tag)
    stop_if_any_failed(failures, args.save_dir, tag)
    if dist.get_rank() == 0 and args.keep_last:
        prune_checkpoints(args.save_dir, args.keep_last)


def write_run_json(folder, run):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "run.json"), "w") as f:
        json.dump(run, f)


def stop_if_any_failed(failures, save_dir, tag):
    """Every rank says whether a write of checkpoint `tag` failed; if one did, rank 0 removes the checkpoint and
    every rank stops with SAVE_FAILED and one line naming it, the reason and what --resume will continue from."""
    reasons = [None] * dist.get_world_size()
    dist.all_gather_object(reasons, failures[0] if failures else None)
    reason = next((reason for reason in reasons if reason), None)
    if reason is None:
        return
    folder = os.path.join(save_dir, tag)
    if dist.get_rank() == 0:
        shutil.rmtree(folder, ignore_errors=True)
    latest = os.path.join(save_dir, "latest")
    if os.path.isfile(latest):
        with open(latest) as f:
            resumes = f"--resume continues from {os.path.join(save_dir, f.read().strip())}"
    else:
        resumes = f"{save_dir} holds no complete checkpoint yet"
    machine.stop(f"error: could not save checkpoint {folder} ({reason}); removed it, and {resumes}",
                 status=SAVE_FAILED)


def replace_file(path, text):
    """Write `text` to `path` in one step (model_files.write_whole)."""
    def write(partial):
        with open(partial, "w") as f:
            f.write(text)
    model_files.write_whole(path, write)


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
    """Point the link 'best' at `tag` if its test accuracy beats best's (kept in each tag's eval.json); rank 0.
    Where the disk cannot take it, 'best' stays as it was, and rank 0 says so: training goes on."""
    if dist.get_rank():
        return
    best = os.path.join(save_dir, "best")
    try:
        with open(os.path.join(best, "eval.json")) as f:
            if json.load(f)["accuracy"] >= accuracy:
                best = None
    except (OSError, ValueError, KeyError):
        pass  # no best yet, or one that cannot be read: this one is best
    try:
        with open(os.path.join(save_dir, tag, "eval.json"), "w") as f:
            json.dump({"accuracy": accuracy}, f)
        if best:
            with contextlib.suppress(FileNotFoundError):
                os.remove(f"{best}.tmp")
            os.symlink(tag, f"{best}.tmp")
            os.replace(f"{best}.tmp", best)
    except OSError as e:
        print(f"warning: could not mark {os.path.join(save_dir, tag)} as the best checkpoint ({e.strerror}); 'best' "
              f"stays as it was", flush=True)


def latest(args, model_engine):
    """The checkpoint --resume continues from, and the run that saved it (run.json): the one 'latest' names in
    --save-dir, if it holds this Net in this dtype and every file of it reads as data alone (model_files.load);
    (None, None) where --resume auto finds none. Anything else stops every rank with one line. Its layout (world
    size, EP size, ZeRO stage) may differ from this run's: universal.load_in_this_layout moves it."""
    path = os.path.join(args.save_dir, "latest")
    if not os.path.isfile(path):
        if args.resume == "auto":
            if dist.get_rank() == 0:
                print(f"--resume auto: no checkpoint in {args.save_dir} yet, so training starts at epoch 1")
            return None, None
        machine.stop(f"error: --resume: no checkpoint in {args.save_dir} (it has no 'latest' file)")
    with open(path) as f:
        tag = f.read().strip()
    path = os.path.join(args.save_dir, tag)
    if not tag or not os.path.isdir(path):
        tags = sorted((t for t in os.listdir(args.save_dir) if CHECKPOINT_TAG.match(t)), key=checkpoint_order)
        what = f"names {tag}, which is not there" if tag else "is empty"
        machine.stop(f"error: --resume: 'latest' in {args.save_dir} {what}; " + (
            f"write the name of one of its checkpoints into it ({', '.join(tags)}) to resume from there" if tags else
            "it holds no checkpoint"))
    try:
        with open(os.path.join(path, "run.json")) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        machine.stop(f"error: --resume: checkpoint {path} is incomplete (no readable run.json)")
    described = run_description(args, model_engine)
    changed_keys = [key for key, value in described.items()
                    if saved.get(key) != value and key not in LAYOUT + POSITION]
    changed = [f"{key} {saved.get(key)} -> {described[key]}" for key in changed_keys]
    if changed:
        machine.stop(f"error: --resume: checkpoint {path} was saved by a different run ({', '.join(changed)}); "
                     f"resume with its settings, or save to another --save-dir"
                     + (f"; to train on from its weights in this dtype, start a new run with --init-from {path}"
                        if changed_keys == ["dtype"] else ""))
    check_position(path, tag, saved, described)
    try:
        model_files.check_files(path)  # the safe way first: DeepSpeed's load_checkpoint reads with weights_only=False
    except model_files.ModelFileError as e:
        machine.stop(f"error: --resume: {e}")
    return path, saved


def check_position(path, tag, saved, now):
    """A mid-epoch checkpoint goes on in its epoch's data order from the sample it stopped at: this run must draw
    the same order (--seed), and in a global batch that divides the samples trained; a new batch size is fine."""
    epoch, steps = checkpoint_order(tag)
    if not steps:
        return  # an epoch's end: the next epoch starts at its first sample, in any order and batch
    batch, seed = (saved.get(key, now[key]) for key in POSITION)  # a checkpoint of an earlier version: as now
    if seed != now["data_order_seed"]:
        machine.stop(f"error: --resume: checkpoint {path} stopped in epoch {epoch + 1}, in the data order of --seed "
                     f"{seed}: resume it with --seed {seed}, or from a checkpoint of an epoch's end")
    if steps * batch % now["batch_size"]:
        machine.stop(f"error: --resume: checkpoint {path} stopped {steps * batch} samples into epoch {epoch + 1} "
                     f"({steps} batches of {batch}), not a whole number of batches of {now['batch_size']}: resume it "
                     f"with a global batch that divides {steps * batch}, such as {batch}")


def layout_of(run):
    """A run's layout in a few words: 4 ranks EP 4 ZeRO 1."""
    expert_parallel = [f"EP {run['ep_world_size']}"] if run["moe"] else []
    return " ".join([universal.ranks(run["world_size"]), *expert_parallel, f"ZeRO {run['zero_stage']}"])


def move_of(saved, args, model_engine):
    """How this run's layout differs from the saved run's ("4 ranks EP 4 ZeRO 1 -> 2 ranks EP 2 ZeRO 2"), or None."""
    now = run_description(args, model_engine)
    return f"{layout_of(saved)} -> {layout_of(now)}" if any(saved[key] != now[key] for key in LAYOUT) else None


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


def position(load_path, client_state, path, saved, model_engine, move=None, epochs=None):
    """The Position a loaded checkpoint continues from, once every rank has loaded its part; its random numbers
    restored where the saving run had this rank, and rank 0's line saying where the run goes on and, after a
    `move` to another layout, from which layout to which, or that it is past --epochs (`epochs`), which counts the
    saved epochs too. Mid-epoch, in a global batch other than the saved run's, it goes on from the same sample
    (check_position)."""
    if load_path is None:
        machine.stop(f"error: --resume: cannot load checkpoint {path}: DeepSpeed found no model states there")
    try:
        dist.barrier()  # a rank that could not load its part has exited: do not go on without it
    except RuntimeError:
        machine.stop(f"error: --resume: another rank could not load its part of checkpoint {path}")
    states = client_state["rng_states"]
    rank_state = states[dist.get_rank()] if dist.get_rank() < len(states) else {
        "torch": torch.get_rng_state(), "accelerator": get_accelerator().get_rng_state(), "interval": None}
    batch, saved_batch = model_engine.train_batch_size(), saved.get("batch_size", model_engine.train_batch_size())
    samples = client_state.get("step", 0) * saved_batch
    start = Position(client_state["epoch"], samples // batch, rank_state)
    set_rng_state(start.rank_state)
    if dist.get_rank() == 0:
        rebatched = f" ({samples} samples into it, in batches of {batch}, {saved_batch} before)" \
            if samples and batch != saved_batch else ""
        past = f" (--epochs {epochs} counts every epoch, these too: none is left to train, only the test runs)" \
            if epochs is not None and start.epoch >= epochs else ""
        print(f"Resuming from {path} at epoch {start.epoch + 1}" + (f", step {start.step + 1}" if start.step else "")
              + rebatched + (f": {move}" if move else "") + past)
    return start


def set_rng_state(rank_state):
    torch.set_rng_state(rank_state["torch"])
    get_accelerator().set_rng_state(rank_state["accelerator"])
