"""Model files: the Net's weights in fp32 at expert-parallel size 1, read from a checkpoint of any layout (every
expert by its global id), with the flags that build the Net again; and --init-from, which starts a run from
them (docs/export.md). The Net class is handed in: this package never imports the training script."""

import argparse
import contextlib
import glob
import json
import os
import pickle
import re

import deepspeed.comm as dist
import torch
from deepspeed.moe.utils import is_moe_param
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils import groups
from deepspeed.utils.tensor_fragment import fragment_address
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

from cifar10ds import machine

FORMAT = 1
EXPERT_PARAMETER = re.compile(r"moe_layer_list\.(\d+)\..*deepspeed_experts\.(\d+)\.")  # its layer, its index
MOMENTS = ("exp_avg", "exp_avg_sq")  # Adam's, as torch names them
STATES = ("fp32", *MOMENTS)  # a parameter's state in DeepSpeed's universal checkpoint: its master and moments
MODEL_FLAGS = ("moe", "num_experts", "mlp_type", "top_k", "min_capacity", "noisy_gate_policy", "capacity_factor",
               "eval_capacity_factor", "drop_tokens")


class ModelFileError(Exception):
    """A checkpoint or model file that cannot be read as one of this project's, and why."""


# What DeepSpeed's checkpoints of this script hold beyond tensors and Python's plain types (the loss scaler of fp16
# and bf16 ZeRO, ZeRO's stage, where each parameter lies in a ZeRO partition), found by reading every checkpoint
# kind: allowed by name when a file is read, and nothing else.
ALLOWED = [DynamicLossScaler, LossScaler, ZeroStageEnum, fragment_address]


def write_whole(path, write):
    """Write the file `path` in one step through write(a temporary path beside it): a reader finds the old file or
    the new, never a part, and a write that fails (a full disk) leaves the old file and no part of the new one."""
    partial = f"{path}.tmp"
    try:
        write(partial)
        os.replace(partial, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(partial)
        raise


def load(path):
    """A checkpoint or model file's content, read with weights_only: no code in it runs, and a file that wants
    anything but tensors, Python's plain types and ALLOWED is refused, naming the type it wanted."""
    try:
        with torch.serialization.safe_globals(ALLOWED):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        wanted = re.search(r"GLOBAL (\S+)", str(e))
        if wanted:
            raise ModelFileError(f"{path} wants {wanted.group(1)} to be loaded, which no checkpoint of this script "
                                 f"holds: refused unread, as loading it could run its code")
        # torch's message opens with advice to load with weights_only=False: give only what its unpickler found
        found = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", str(e))
        raise ModelFileError(f"cannot read {path}: not a file torch.save wrote "
                             f"({found.group(1) if found else machine.first_line(e)})")
    except (OSError, RuntimeError, EOFError, ValueError) as e:  # missing, truncated, not torch.save's
        raise ModelFileError(f"cannot read {path}: {type(e).__name__}: {machine.first_line(e)}")


def check_files(folder):
    """Read every file of a checkpoint the safe way (load), before DeepSpeed's load_checkpoint or zero_to_fp32,
    which read them with weights_only=False, open any. Raises ModelFileError."""
    for path in sorted(glob.glob(os.path.join(folder, "*.pt"))):
        load(path)


def model_flags(args):
    """The flags that build the Net, as the training script names them: what a model file is rebuilt from."""
    return {name: getattr(args, name) for name in MODEL_FLAGS}


def build_net(Net, flags, ep_size=1):
    """The Net that model_flags() describe, at expert-parallel size `ep_size`."""
    return Net(argparse.Namespace(**flags, ep_world_size=ep_size))


def global_expert_name(name, ep_rank, ep_size, num_experts):
    """A parameter's name with its expert's local index made global: expert-parallel rank r of ep_size holds
    the experts r * per_rank + j as its j-th, per_rank = the layer's experts / ep_size. Other names are kept."""
    match = EXPERT_PARAMETER.search(name)
    if not match:
        return name
    per_rank = num_experts[int(match.group(1))] // ep_size
    return name.replace(f"deepspeed_experts.{match.group(2)}.",
                        f"deepspeed_experts.{ep_rank * per_rank + int(match.group(2))}.")


def global_names(module):
    """Each parameter of a Net on this rank and its name with its expert's index global (global_expert_name)."""
    layers = getattr(module, "moe_layer_list", [])
    ep_size = layers[0].ep_size if layers else 1
    ep_rank = groups._get_expert_parallel_rank(f"ep_size_{ep_size}") if ep_size > 1 else 0
    return {p: global_expert_name(name, ep_rank, ep_size, [layer.num_experts for layer in layers])
            for name, p in module.named_parameters()}


def find_checkpoint(path):
    """(the --save-dir, the tag) of a save directory (its 'latest') or of one checkpoint directory."""
    path = os.path.normpath(path)
    if os.path.isfile(os.path.join(path, "latest")):
        with open(os.path.join(path, "latest")) as f:
            return path, f.read().strip()
    if os.path.isfile(os.path.join(path, "run.json")):
        return os.path.dirname(path), os.path.basename(path)
    raise ModelFileError(f"{path} is not a checkpoint of cifar10_deepspeed.py: it has neither a 'latest' file nor a "
                         f"run.json")


def read_run(folder):
    try:
        with open(os.path.join(folder, "run.json")) as f:
            run = json.load(f)
    except (OSError, ValueError):
        run = None
    if not isinstance(run, dict) or "model" not in run:
        raise ModelFileError(f"{folder} has no readable run.json: not a complete checkpoint of cifar10_deepspeed.py")
    return run


def module_weights(folder):
    """The model's weights as the checkpoint's model files hold them: the non-expert module from
    mp_rank_00_model_states.pt, each expert from its layer_<L>_expert_<E> file, keyed by global expert id."""
    try:
        state = dict(load(os.path.join(folder, "mp_rank_00_model_states.pt"))["module"])
        for path in sorted(glob.glob(os.path.join(folder, "layer_*_expert_*_mp_rank_00_model_states.pt"))):
            state.update(load(path))
    except (KeyError, TypeError) as e:
        raise ModelFileError(f"cannot read the model files of {folder}: {type(e).__name__}: {e}")
    return state


def weights(save_dir, tag, run, net, Net):
    """fp32 weights, and which copy of the checkpoint they come from; `net` is the run's Net at EP 1."""
    folder = os.path.join(save_dir, tag)
    if run["dtype"] == "fp32" and run["zero_stage"] < 3:
        return module_weights(folder), "fp32 weights, the run's master weights"
    if run["zero_stage"] == 0:  # fp16 or bf16: DeepSpeed wraps the optimizer in FP16_Optimizer for both
        states, _ = adam_states(folder, run, Net)
        return {name: state["fp32"] for name, state in states.items()}, ("fp32 master weights (DeepSpeed's "
                                                                         "FP16_Optimizer's copy)")
    if run["moe"]:  # ZeRO 1 or 2 in fp16 or bf16: zero_to_fp32 does not read MoE (deepspeedai/DeepSpeed#1876)
        states, _ = adam_states(folder, run, Net)
        return ({name: state["fp32"] for name, state in states.items()},
                "fp32 master weights (each rank's partition, joined here)")
    # ZeRO-3's model files hold no weights, and ZeRO's fp32 masters are partitioned over the ranks:
    # DeepSpeed's zero_to_fp32 joins them.
    check_files(folder)  # zero_to_fp32 reads them with weights_only=False
    try:
        state = get_fp32_state_dict_from_zero_checkpoint(save_dir, tag=tag)
    except Exception as e:  # DeepSpeed raises many kinds; any of them means the files are not all there
        raise ModelFileError(f"cannot join the fp32 master weights of {folder} with DeepSpeed's zero_to_fp32: "
                             f"{type(e).__name__}: {machine.first_line(e)}")
    return state, "fp32 master weights (ZeRO partitions joined by DeepSpeed's zero_to_fp32)"


def adam_states(folder, run, Net):
    """Every parameter's fp32 master and Adam's moments (STATES), experts by global id, and Adam's step count, from
    a checkpoint at ZeRO stage 0, 1 or 2, dense or MoE: what a run needs to go on in another layout. Raises
    ModelFileError."""
    pieces, steps = (unpartitioned_pieces if run["zero_stage"] == 0 else partition_pieces)(folder, run, Net)
    shapes = {name: p.shape for name, p in build_net(Net, run["model"]).named_parameters()}
    if set(pieces) != set(shapes) or len(steps) != 1:
        raise ModelFileError(f"the optimizer files of {folder} do not hold one Adam state of every parameter of this "
                             f"Net (parameters {sorted(set(shapes) ^ set(pieces))[:2] or 'all there'}, steps "
                             f"{sorted(steps)})")
    states = {}
    for name, parts in pieces.items():
        whole = {key: torch.cat(parts[key]) for key in STATES}
        if any(value.numel() != shapes[name].numel() for value in whole.values()):
            raise ModelFileError(f"the optimizer files of {folder} do not match this Net's parameters ({name})")
        states[name] = {key: value.view(shapes[name]) for key, value in whole.items()}
    return states, steps.pop()


def add_piece(pieces, name, values):
    for key, value in values.items():
        pieces.setdefault(name, {}).setdefault(key, []).append(value)


def partition_pieces(folder, run, Net):
    """ZeRO 1 and 2 (and DeepSpeed's BF16_Optimizer, which it takes for bf16 ZeRO 1 with fp32 gradient
    accumulation, in bf16_-prefixed files): each rank's file holds its partition of every parameter group's flat
    fp32 copy and of Adam's moments, and where each parameter's piece lies in them (param_slice_mappings). A
    parameter's pieces in partition order make it whole. The non-expert groups are partitioned over all ranks; an
    expert group over the ranks of one expert-parallel rank (rank % EP), in rank order, which is the order of the
    ranks' own files."""
    ep = run["ep_world_size"] or 1
    prefix = "bf16_" if os.path.isfile(os.path.join(folder, "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt")) else ""
    pieces, steps = {}, set()
    for rank in range(run["world_size"]):
        path = os.path.join(folder, f"{prefix}zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
        try:
            state = load(path)["optimizer_state_dict"]
            adam = state["base_optimizer_state"]["state"]
            for group, (flat, mapping) in enumerate(zip(state["single_partition_of_fp32_groups"],
                                                         state["param_slice_mappings"], strict=True)):
                steps.add(int(adam[group]["step"]))
                for name, address in mapping.items():
                    add_piece(pieces, global_expert_name(name, rank % ep, ep, run["model"]["num_experts"]),
                              {key: tensor.narrow(0, address.start, address.numel)
                               for key, tensor in (("fp32", flat), *((m, adam[group][m]) for m in MOMENTS))})
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:
            raise ModelFileError(f"cannot read the optimizer state in {path}: {type(e).__name__}: {e}")
    return pieces, steps


def unpartitioned_pieces(folder, run, Net):
    """ZeRO 0: each expert-parallel rank's optimizer file (the model file without MoE) holds its Adam: torch's, one
    state per parameter, in fp32, where the masters are the module's weights; in fp16 and bf16 DeepSpeed's
    FP16_Optimizer, one flat fp32 copy and state per parameter group. A group holds the non-expert parameters or
    the rank's experts (all parameters where no group is an expert group), each in the Net's order, as built at
    the run's expert-parallel size."""
    ep = run["ep_world_size"] or 1
    named = list(build_net(Net, run["model"], ep).named_parameters())
    files = [f"expp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(ep)] if run["moe"] else [
        "mp_rank_00_model_states.pt"]
    module = module_weights(folder) if run["dtype"] == "fp32" else None
    pieces, steps = {}, set()
    for ep_rank, file in enumerate(files):
        path = os.path.join(folder, file)
        try:
            optimizer = load(path)["optimizer"]
            flats = optimizer.get("fp32_groups_flat")  # FP16_Optimizer's
            adam = optimizer["optimizer_state_dict"] if flats is not None else optimizer
            experts = any(group.get("moe") for group in adam["param_groups"])
            for g, group in enumerate(adam["param_groups"]):
                params = [(n, p) for n, p in named if not experts or is_moe_param(p) == bool(group.get("moe"))]
                offset = 0
                for i, (name, p) in enumerate(params):
                    name = global_expert_name(name, ep_rank, ep, run["model"]["num_experts"])
                    state = adam["state"][group["params"][0 if flats is not None else i]]
                    steps.add(int(state["step"]))
                    if flats is not None:
                        values = {key: tensor.narrow(0, offset, p.numel()) for key, tensor in
                                  (("fp32", flats[g]), *((m, state[m]) for m in MOMENTS))}
                        offset += p.numel()
                    else:
                        values = {"fp32": module[name], **{m: state[m] for m in MOMENTS}}
                    if ep_rank == 0 or EXPERT_PARAMETER.search(name):  # every rank holds the non-expert ones
                        add_piece(pieces, name, {key: value.flatten() for key, value in values.items()})
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:
            raise ModelFileError(f"cannot read the optimizer state in {path}: {type(e).__name__}: {e}")
    return pieces, steps


def with_shared_names(net, state):
    """`state` with every name of a shared parameter: PR-MoE's residual MLP is one module in every MoE layer (the
    expert template, as the reference hands it to each), listed once by the optimizer's copies."""
    names = {}
    for name, p in net.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    for shared in names.values():
        held = [name for name in shared if name in state]
        for name in shared:
            if held and name not in state:
                state[name] = state[held[0]]
    return state


def export(path, Net):
    """The model file of a checkpoint (a --save-dir, or one checkpoint directory): the Net's state_dict at EP 1 in
    fp32, the flags that build it, and what it was exported from. Raises ModelFileError."""
    save_dir, tag = find_checkpoint(path)
    folder = os.path.join(save_dir, tag)
    run = read_run(folder)
    net = build_net(Net, run["model"])
    state, source = weights(save_dir, tag, run, net, Net)
    state = with_shared_names(net, {name: value.float().clone() for name, value in state.items()})
    expected = net.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ModelFileError(f"{folder} does not hold this Net's weights: missing {missing or 'none'}, unexpected "
                             f"{unexpected or 'none'}")
    net.load_state_dict(state, strict=True)  # the shapes too
    experts = len({match.groups() for match in map(EXPERT_PARAMETER.search, state) if match})
    return {"format": FORMAT, "state_dict": net.state_dict(), "model": run["model"],
            "exported_from": {"checkpoint": os.path.abspath(folder), "weights": source, "experts": experts,
                              **{key: run[key] for key in ("world_size", "ep_world_size", "dtype", "zero_stage")}}}


def read_model_file(path, keys=("model", "state_dict")):
    """The dict export() made (or one with the `keys` asked for), from a file: no code in it is run (weights_only)."""
    exported = load(path)
    if not isinstance(exported, dict) or not set(keys) <= exported.keys():
        raise ModelFileError(f"{path} is not a model file of export_model.py: it holds no {' and '.join(keys)}")
    return exported


def init_from(net, args, Net):
    """Load the weights of a model file (export_model.py) or a checkpoint into `net`, this rank taking its experts
    by global id; rank 0 says in one line what was carried. Before deepspeed.initialize, which partitions them
    under ZeRO-3 and makes the optimizer's masters from them. One that cannot be read or does not fit stops
    every rank with one line."""
    try:
        if os.path.isdir(args.init_from):  # a checkpoint, exported on the fly
            state, source = export(args.init_from, Net)["state_dict"], "checkpoint"
        else:
            state, source = read_model_file(args.init_from, keys=("state_dict",))["state_dict"], "model file"
    except ModelFileError as e:
        machine.stop(f"error: --init-from: {e}")
    ep_rank = dist.get_rank() % args.ep_world_size if args.moe else 0  # DeepSpeed's expert groups: consecutive ranks
    carried = {}
    for name, value in net.state_dict().items():
        wanted = global_expert_name(name, ep_rank, args.ep_world_size, args.num_experts)
        if wanted in state and state[wanted].shape == value.shape:
            carried[name] = state[wanted]
    missing = sorted(set(net.state_dict()) - set(carried))
    if missing:
        machine.stop(f"error: --init-from: {args.init_from} does not fit this Net: no weights of the right shape "
                     f"for {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}; give the model flags it was "
                     f"trained with")
    net.load_state_dict(carried, strict=True)
    experts = {match.groups() for match in map(EXPERT_PARAMETER.search, state) if match}
    if dist.get_rank() == 0:
        print(f"--init-from {args.init_from}: the weights of every layer carried over from the {source} "
              f"({len(state)} tensors, {len(experts)} experts, each rank taking its own by global id); the "
              f"optimizer and the LR schedule start fresh")


def check_expert_ranks(args):
    """Where init_from chose this rank's experts by the layout DeepSpeed's expert groups have, why not (or None)."""
    ep_rank = groups._get_expert_parallel_rank(f"ep_size_{args.ep_world_size}")
    if ep_rank != dist.get_rank() % args.ep_world_size:
        return (f"DeepSpeed made this rank expert-parallel rank {ep_rank}, not {dist.get_rank() % args.ep_world_size}: "
                f"its experts would be another rank's")
    return None
