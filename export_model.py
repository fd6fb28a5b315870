"""One plain model file from a checkpoint of cifar10_deepspeed.py: no engine, no process group, no launcher.

    python export_model.py ckpt -o model.pt          # a --save-dir: the checkpoint its 'latest' names
    python export_model.py ckpt/epoch3 -o model.pt   # one checkpoint

The file holds the Net's state_dict at expert-parallel size 1 under the reference's module names (every
expert taken from its expert-parallel rank's file by its global id), in fp32; the flags that build the
Net; and what it was exported from. `torch.load(path, weights_only=True)` reads it; predict.py evaluates it.
"""

import argparse
import glob
import json
import os
import sys

import torch
from deepspeed.moe.utils import is_moe_param
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

from cifar10_deepspeed import EXPERT_PARAMETER, Net, add_argument, global_expert_name, model_argv

FORMAT = 1


def fail(message):
    print(f"export_model.py: error: {message}", file=sys.stderr)
    sys.exit(1)


def find_checkpoint(path):
    """(the --save-dir, the tag) of a save directory (its 'latest') or of one checkpoint directory."""
    path = os.path.normpath(path)
    if os.path.isfile(os.path.join(path, "latest")):
        with open(os.path.join(path, "latest")) as f:
            return path, f.read().strip()
    if os.path.isfile(os.path.join(path, "run.json")):
        return os.path.dirname(path), os.path.basename(path)
    fail(f"{path} is not a checkpoint of cifar10_deepspeed.py: it has neither a 'latest' file nor a run.json")


def read_run(folder):
    try:
        with open(os.path.join(folder, "run.json")) as f:
            run = json.load(f)
    except (OSError, ValueError):
        fail(f"{folder} has no readable run.json: not a complete checkpoint of cifar10_deepspeed.py")
    if "model" not in run:
        fail(f"{folder} was saved by an earlier version of cifar10_deepspeed.py, whose run.json does not say how "
             f"its Net was built")
    return run


def module_weights(folder):
    """The model's weights as the checkpoint's model files hold them: the non-expert module from
    mp_rank_00_model_states.pt, each expert from its layer_<L>_expert_<E> file, keyed by global expert id."""
    try:
        state = dict(torch.load(os.path.join(folder, "mp_rank_00_model_states.pt"), map_location="cpu",
                                weights_only=False)["module"])
        for path in sorted(glob.glob(os.path.join(folder, "layer_*_expert_*_mp_rank_00_model_states.pt"))):
            state.update(torch.load(path, map_location="cpu", weights_only=False))
    except (OSError, KeyError, RuntimeError) as e:
        fail(f"cannot read the model files of {folder}: {type(e).__name__}: {e}")
    return state


def weights(save_dir, tag, run, net):
    """fp32 weights, and which copy of the checkpoint they come from; `net` is the run's Net at EP 1."""
    folder = os.path.join(save_dir, tag)
    if run["dtype"] == "fp32" and run["zero_stage"] < 3:
        return module_weights(folder), "fp32 weights, the run's master weights"
    if run["zero_stage"] == 0:  # fp16 or bf16: DeepSpeed wraps the optimizer in FP16_Optimizer for both
        return fp16_masters(folder, run), "fp32 master weights (DeepSpeed's FP16_Optimizer's copy)"
    if run["moe"]:  # ZeRO 1 or 2 in fp16 or bf16: zero_to_fp32 does not read MoE (deepspeedai/DeepSpeed#1876)
        return partitioned_masters(folder, run, net), "fp32 master weights (each rank's partition, joined here)"
    # ZeRO-3's model files hold no weights, and ZeRO's fp32 masters are partitioned over the ranks:
    # DeepSpeed's zero_to_fp32 joins them.
    try:
        state = get_fp32_state_dict_from_zero_checkpoint(save_dir, tag=tag)
    except Exception as e:  # DeepSpeed raises many kinds; any of them means the files are not all there
        fail(f"cannot join the fp32 master weights of {folder} with DeepSpeed's zero_to_fp32: "
             f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else 'no reason given'}")
    return state, "fp32 master weights (ZeRO partitions joined by DeepSpeed's zero_to_fp32)"


def partitioned_masters(folder, run, net):
    """ZeRO 1 and 2 (and DeepSpeed's BF16_Optimizer, which it takes for bf16 ZeRO 1 with fp32 gradient
    accumulation, in bf16_-prefixed files): each rank's file holds its partition of every parameter group's flat
    fp32 copy and where each parameter's piece lies in it (param_slice_mappings). A parameter's pieces in partition
    order make it whole. The non-expert groups are partitioned over all ranks; an expert group over the ranks of
    one expert-parallel rank (rank % EP), in rank order, which is the order of the ranks' own files."""
    ep = run["ep_world_size"] or 1
    prefix = "bf16_" if os.path.isfile(os.path.join(folder, "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt")) else ""
    pieces = {}
    for rank in range(run["world_size"]):
        path = os.path.join(folder, f"{prefix}zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)["optimizer_state_dict"]
            groups = zip(state["single_partition_of_fp32_groups"], state["param_slice_mappings"], strict=True)
            for flat, mapping in groups:
                for name, address in mapping.items():
                    name = global_expert_name(name, rank % ep, ep, run["model"]["num_experts"])
                    pieces.setdefault(name, []).append(flat.narrow(0, address.start, address.numel))
        except (OSError, KeyError, RuntimeError, TypeError, ValueError) as e:
            fail(f"cannot read the fp32 master weights in {path}: {type(e).__name__}: {e}")
    shapes = {name: p.shape for name, p in net.named_parameters()}
    masters = {}
    for name, parts in pieces.items():
        whole = torch.cat(parts)
        if name not in shapes or whole.numel() != shapes[name].numel():
            fail(f"the fp32 master weights in {folder} do not match this Net's parameters ({name})")
        masters[name] = whole.view(shapes[name])
    return masters


def fp16_masters(folder, run):
    """fp16 without ZeRO: FP16_Optimizer keeps one flat fp32 copy per parameter group, in each expert-parallel
    rank's optimizer file; the groups hold the non-expert parameters, then the rank's experts, each in the
    Net's order. Rebuilt by the shapes of a Net of the run's expert-parallel size."""
    ep = run["ep_world_size"] or 1
    net = Net(add_argument([*model_argv(run["model"]), "--ep-world-size", str(ep)]))
    named = list(net.named_parameters())
    groups = [[(name, p) for name, p in named if not is_moe_param(p)], [(name, p) for name, p in named if is_moe_param(p)]]
    masters = {}
    files = ["mp_rank_00_model_states.pt"] if not run["moe"] else [f"expp_rank_{r}_mp_rank_00_optim_states.pt"
                                                                   for r in range(ep)]
    for rank, file in enumerate(files):
        try:
            state = torch.load(os.path.join(folder, file), map_location="cpu", weights_only=False)["optimizer"]
            flats = state["fp32_groups_flat"]
        except (OSError, KeyError, RuntimeError, TypeError) as e:
            fail(f"cannot read the fp32 master weights in {os.path.join(folder, file)}: {type(e).__name__}: {e}")
        flat = torch.cat([f.flatten() for f in flats[1:]]) if len(flats) > 1 else torch.empty(0)
        for (params, values) in ((groups[0], flats[0]), (groups[1], flat)):
            if sum(p.numel() for _, p in params) != values.numel():
                fail(f"the fp32 master weights in {os.path.join(folder, file)} do not match this Net's parameters")
            offset = 0
            for name, p in params:
                value = values[offset:offset + p.numel()].view(p.shape)
                offset += p.numel()
                masters[global_expert_name(name, rank, ep, run["model"]["num_experts"])] = value
    return masters


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


def export(path):
    save_dir, tag = find_checkpoint(path)
    folder = os.path.join(save_dir, tag)
    run = read_run(folder)
    net = Net(add_argument(model_argv(run["model"])))
    state, source = weights(save_dir, tag, run, net)
    state = with_shared_names(net, {name: value.float().clone() for name, value in state.items()})
    expected = net.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        fail(f"{folder} does not hold this Net's weights: missing {missing or 'none'}, unexpected {unexpected or 'none'}")
    net.load_state_dict(state, strict=True)  # the shapes too
    experts = len({match.groups() for match in map(EXPERT_PARAMETER.search, state) if match})
    return {"format": FORMAT, "state_dict": net.state_dict(), "model": run["model"],
            "exported_from": {"checkpoint": os.path.abspath(folder), "weights": source, "experts": experts,
                              **{key: run[key] for key in ("world_size", "ep_world_size", "dtype", "zero_stage")}}}


def main():
    parser = argparse.ArgumentParser(prog="export_model.py", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a --save-dir (its newest checkpoint) or one checkpoint directory")
    parser.add_argument("-o", "--output", required=True, help="the model file to write")
    args = parser.parse_args()
    exported = export(args.checkpoint)
    torch.save(exported, args.output)
    origin = exported["exported_from"]
    print(f"Exported {origin['checkpoint']} ({origin['dtype']}, ZeRO {origin['zero_stage']}, world "
          f"{origin['world_size']}, EP {origin['ep_world_size'] or 1}) to {args.output}: {origin['weights']}")


if __name__ == "__main__":
    main()
