"""DeepSpeed's universal checkpoint, through which --resume moves a checkpoint to another layout
(load_in_this_layout): any checkpoint of this script written in it, and loaded at ZeRO 0, which
DeepSpeed's load_universal path does not serve (docs/checkpoints.md)."""

import argparse
import contextlib
import os
import shutil

import deepspeed
import deepspeed.comm as dist
import torch
from deepspeed.checkpoint import ds_to_universal

from cifar10ds import fixes, machine, model_files

ENGINE_STATES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")  # ZeRO 0-2, ZeRO 3


def load_in_this_layout(model_engine, args, path, saved, Net):
    """Load checkpoint `path`, saved in another layout, into this engine through DeepSpeed's universal checkpoint:
    each parameter's fp32 master and Adam's moments and step whole, in `path`/universal (rank 0 writes it; every
    rank then reads only its own parameters), with the LR schedule, the position and the random numbers of the
    checkpoint. Returns what load_checkpoint returns.

    DeepSpeed's converter (ds_to_universal) reads dense ZeRO checkpoints; for MoE, and for ZeRO 0, which it does
    not read, model_files.adam_states joins the same states, experts by global id. DeepSpeed's load_universal
    path loads them at ZeRO 1 to 3; at ZeRO 0, which it does not serve, load_unpartitioned does."""
    folder = os.path.join(path, "universal")
    error = None
    if dist.get_rank() == 0:
        if saved["moe"]:
            print("--resume: DeepSpeed's universal checkpoint cannot convert deepspeed.moe experts "
                  "(deepspeedai/DeepSpeed#5716), so their masters and Adam states are joined here, by global id")
            draws = args.noisy_gate_policy or args.top_k == 2 or args.drop_tokens  # noise, 2nd expert, token selection
            if draws and saved["world_size"] != dist.get_world_size():
                print(f"note: the gate's random draws are each rank's own, so on {ranks(dist.get_world_size())} they "
                      f"differ from those of the saved run's {ranks(saved['world_size'])} from here")
        try:
            write(path, folder, saved, Net, model_engine)
        except (model_files.ModelFileError, OSError) as e:
            error = f"error: --resume: cannot move checkpoint {path} to this layout: {e}"
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    if any(errors):
        machine.stop(next(e for e in errors if e))
    if not model_engine.zero_optimization():
        loaded = load_unpartitioned(model_engine, folder)
    else:
        model_engine._config.load_universal_checkpoint = True  # read by load_checkpoint only
        try:
            with fixes.read_experts_by_global_id(model_engine):
                loaded = model_engine.load_checkpoint(path, "universal")
        finally:
            model_engine._config.load_universal_checkpoint = False
    if model_engine.lr_scheduler is not None:  # the universal files hold this run's fresh groups: lr of step 0
        for group, lr in zip(model_engine.basic_optimizer.param_groups, model_engine.lr_scheduler.get_lr()):
            group["lr"] = lr
    return loaded


def ranks(count):
    return f"{count} rank{'s' if count > 1 else ''}"


def write(path, folder, saved, Net, model_engine):
    """Write checkpoint `path` in DeepSpeed's universal format into `folder`, whole or not at all: zero/<name>/ holds
    each parameter's fp32.pt, exp_avg.pt, exp_avg_sq.pt and step.pt, zero/optimizer_state.pt the optimizer's state
    beyond them (as ZeRO 1 and 2 read it, and ZeRO 3), and the model states file (LR schedule, position, random
    numbers) is copied beside. One format whatever the saved stage: DeepSpeed's converter writes ZeRO 3's
    parameters flat, without step.pt, which its ZeRO 1 and 2 loader cannot read."""
    partial = f"{folder}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    if saved["moe"] or saved["zero_stage"] == 0:
        states, step = model_files.adam_states(path, saved, Net)
        first = os.path.join(path, "zero_pp_rank_0_mp_rank_00_optim_states.pt")  # ZeRO 1 and 2: the fp16 loss scale
        beyond = {key: value for key, value in model_files.load(first)["optimizer_state_dict"].items()
                  if key in ("loss_scaler", "dynamic_loss_scale")} if os.path.isfile(first) else {}
    else:
        states, step, beyond = converted_by_deepspeed(path, f"{folder}.converted", saved, Net)
    for name, state in states.items():
        os.makedirs(os.path.join(partial, "zero", name))
        for key, value in state.items():
            torch.save({"param": value.clone(), "cat_dim": 0}, os.path.join(partial, "zero", name, f"{key}.pt"))
        torch.save(torch.tensor(float(step)), os.path.join(partial, "zero", name, "step.pt"))
    groups = [{key: value for key, value in group.items() if key != "params"}
              for group in model_engine.basic_optimizer.param_groups]  # this run's; the schedule sets the lr
    torch.save({**beyond, "param_groups": groups, "ds_version": deepspeed.__version__,
                "clip_grad": model_engine.gradient_clipping(),
                "optimizer_state_dict": {"state": {0: {"step": torch.tensor(float(step))}}, "param_groups": groups}},
               os.path.join(partial, "zero", "optimizer_state.pt"))
    engine_state = next(name for name in ENGINE_STATES if os.path.isfile(os.path.join(path, name)))
    shutil.copy(os.path.join(path, engine_state), os.path.join(partial, "mp_rank_00_model_states.pt"))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(partial, folder)


def converted_by_deepspeed(path, converted, saved, Net):
    """What DeepSpeed's ds_to_universal makes of a dense ZeRO checkpoint: each parameter's STATES shaped as the
    Net's, Adam's step, and the optimizer's state beyond them (the fp16 loss scaler)."""
    shutil.rmtree(converted, ignore_errors=True)
    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
        ds_to_universal.main(argparse.Namespace(
            input_folder=path, output_folder=converted, num_extract_workers=1, num_merge_workers=1,
            keep_temp_folder=False, strict=True, inject_missing_state=True))
    zero = os.path.join(converted, "zero")
    beyond = model_files.load(os.path.join(zero, "optimizer_state.pt"))
    states, steps = {}, set()
    for name, p in model_files.build_net(Net, saved["model"]).named_parameters():
        files = {key: model_files.load(os.path.join(zero, name, f"{key}.pt")) for key in model_files.STATES}
        states[name] = {key: (value["param"] if isinstance(value, dict) else value).reshape(p.shape)
                        for key, value in files.items()}
        steps.add(float(model_files.load(os.path.join(zero, name, "step.pt"))) if os.path.isfile(
            os.path.join(zero, name, "step.pt")) else float(beyond["optimizer_state_dict"]["state"][0]["step"]))
    shutil.rmtree(converted)
    if len(steps) != 1:
        raise model_files.ModelFileError(f"the parameters of {path} hold different Adam steps ({sorted(steps)})")
    return states, steps.pop(), {key: beyond[key] for key in ("loss_scaler", "dynamic_loss_scale") if key in beyond}


def load_unpartitioned(model_engine, folder):
    """Load a universal checkpoint at ZeRO 0: each parameter's master (the parameter itself in fp32, a slice of
    FP16_Optimizer's flat fp32 group in fp16 and bf16) and Adam's state; then the engine's own state."""
    optimizer, adam = model_engine.optimizer, model_engine.basic_optimizer
    flats = getattr(optimizer, "fp32_groups_flat", None)  # FP16_Optimizer's, in fp16 and bf16
    names = model_files.global_names(model_engine.module)

    def read(p, key):
        return model_files.load(os.path.join(folder, "zero", names[p], f"{key}.pt"))

    for g, group in enumerate(adam.param_groups):
        params = optimizer.fp16_groups[g] if flats is not None else group["params"]
        values = {key: [read(p, key)["param"].view_as(p) for p in params] for key in model_files.STATES}
        step = read(params[0], "step").to(torch.float32)
        with torch.no_grad():
            for p, value in zip(params, values["fp32"]):
                p.copy_(value)
        if flats is None:
            for i, p in enumerate(params):
                adam.state[p] = {"step": step.to(p.device).clone(), **{m: values[m][i].to(p.device).clone()
                                                               for m in model_files.MOMENTS}}
        else:
            with torch.no_grad():
                flats[g].copy_(torch.cat([value.flatten() for value in values["fp32"]]))
            adam.state[flats[g]] = {"step": step.to(flats[g].device).clone(),
                                    **{m: torch.cat([value.flatten() for value in values[m]]).to(flats[g].device)
                                       for m in model_files.MOMENTS}}
    engine_state = model_files.load(os.path.join(folder, "mp_rank_00_model_states.pt"))
    if model_engine.lr_scheduler is not None:  # a config may have no scheduler
        model_engine.lr_scheduler.load_state_dict(engine_state["lr_scheduler"])
    for key in ("global_steps", "global_samples", "skipped_steps"):
        setattr(model_engine, key, engine_state[key])
    return folder, {key: engine_state[key] for key in ("epoch", "step", "rng_states")}
