"""Train cells of the configuration matrix in one launch and report what each showed.

tests/test_matrix.py launches it with DeepSpeed's launcher, once per world size:

    deepspeed --num_gpus 2 tests/train_cells.py --report report.json fp16-zero2-top1-w2-ep2 ...

A cell is a dtype, a ZeRO stage, a model, a world size and an expert-parallel
size. Each cell builds the script's config, Net and engine from its flags and
trains with the script's train() on the synthetic data, one epoch of --steps
steps, recording around each train_step every step's loss, loss scale and
whether the step was applied. With --checks it also records which parameters the optimizer
moved at the last step (their fp32 master copies), whether the model's copies
equal their masters, how many tokens each expert got there, and the parameters
every rank ends with; in fp16 cells two steps get infinite inputs, as in an
overflow. With --evaluate it records the test accuracy. Rank 0 writes the
report; the tests assert on it.
"""

import argparse
import functools
import json
import os
import re
import sys
import traceback

import cpuinfo
import deepspeed
import deepspeed.comm as dist
import torch
from deepspeed.moe.utils import is_moe_param
from deepspeed.utils import safe_get_full_fp32_param
from torch._utils import _unflatten_dense_tensors

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cifar10_deepspeed  # noqa: E402
from cifar10ds import data, fixes, launch, machine, options  # noqa: E402

MODELS = {
    "dense": [],
    "top1": ["--moe"],
    "top2": ["--moe", "--top-k", "2"],
    "rsample": ["--moe", "--noisy-gate-policy", "RSample"],
    "prmoe": ["--moe", "--mlp-type", "residual", "--noisy-gate-policy", "RSample"],
    "tutorial": ["--moe", "--noisy-gate-policy", "RSample"],  # DeepSpeed's MoE tutorial
}
EXPERTS = {"dense": [], "prmoe": [2, 4], "tutorial": [8]}  # experts per MoE layer; the others have one layer of 2
CELL = re.compile(r"^(?P<dtype>fp32|bf16|fp16)-zero(?P<stage>[0-3])-(?P<model>[a-z0-9]+)-w(?P<world>[124])"
                  r"(-ep(?P<ep>[124]))?(?P<offload>-offload)?$")
# DeepSpeed's CPU Adam (ZeRO-Offload's optimizer) asks py-cpuinfo about the CPU each time one is made, which takes
# a second; the answer does not change within a launch, and an offloaded cell makes one.
cpuinfo.get_cpu_info = functools.cache(cpuinfo.get_cpu_info)
OVERFLOW_STEPS = (4, 5)  # two in a row: with hysteresis 2 the scale drops at the second
SEED = 0


def all_cells():
    """Every cell of the matrix: models x dtypes x stages x (world, EP), without the mixes the script rejects.

    World size 4 trains the dense net and the two MoE models the run scripts use (RSample, PR-MoE) with
    EP 1, 2 and 4. The tutorial's model (8 experts) is trained on 4 ranks by test_launch.py, not here.
    """
    moe_worlds = {"top1": ((1, 1), (2, 1), (2, 2)), "top2": ((1, 1), (2, 1), (2, 2)),
                  "rsample": ((1, 1), (2, 1), (2, 2), (4, 1), (4, 2), (4, 4)),
                  "prmoe": ((1, 1), (2, 1), (2, 2), (4, 1), (4, 2), (4, 4))}
    cells = []
    for model in (model for model in MODELS if model != "tutorial"):
        for dtype in ("fp32", "bf16", "fp16"):
            for stage in (0, 1, 2, 3):
                if model == "dense":
                    cells += [f"{dtype}-zero{stage}-dense-w{world}" for world in (1, 2, 4)]
                elif stage < 3:  # MoE with ZeRO-3 is rejected
                    cells += [f"{dtype}-zero{stage}-{model}-w{world}-ep{ep}" for world, ep in moe_worlds[model]]
    return cells + offload_cells()


def offload_cells():
    """ZeRO-Offload (--offload cpu): ZeRO stages 1-3 for the dense net, 1-2 for RSample and PR-MoE, on 1 and 2 ranks."""
    cells = []
    for dtype in ("fp32", "bf16", "fp16"):
        cells += [f"{dtype}-zero{stage}-dense-w{world}-offload" for stage in (1, 2, 3) for world in (1, 2)]
        cells += [f"{dtype}-zero{stage}-{model}-w{world}-ep{ep}-offload" for model in ("rsample", "prmoe")
                  for stage in (1, 2) for world, ep in ((1, 1), (2, 1), (2, 2))]
    return cells


def expert_counts(model, ep):
    """The model's experts per MoE layer, scaled up where the EP size would not divide them (PR-MoE at EP 4: 4 8)."""
    counts = EXPERTS.get(model, [2])
    scale = max(1, ep // min(counts)) if counts else 1
    return [n * scale for n in counts]


def parse_cell(cell):
    match = CELL.match(cell)
    if not match or match["model"] not in MODELS:
        raise ValueError(f"not a cell: {cell}")
    return (match["dtype"], int(match["stage"]), match["model"], int(match["world"]), int(match["ep"] or 1),
            bool(match["offload"]))


def cell_flags(cell, steps, seed=SEED):
    dtype, stage, model, world, ep, offload = parse_cell(cell)
    flags = ["--deepspeed", "--dataset", "synthetic", "--synthetic-train-size", str(16 * steps),
             "--synthetic-test-size", "400", "--data-workers", "0", "--log-interval", str(steps), "--epochs", "1",
             "--dtype", dtype, "--stage", str(stage), "--seed", str(seed),
             *MODELS[model]]
    if offload:
        flags += ["--offload", "cpu"]
    if model != "dense":
        flags += ["--num-experts", *map(str, expert_counts(model, ep)), "--ep-world-size", str(ep), "--moe-param-group"]
    return flags


def parameter_snapshot(model_engine):
    """Every parameter as the model holds it (gathered under ZeRO-3) and as the optimizer's fp32 master copy."""
    named = list(model_engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters([p for _, p in named], enabled=model_engine.zero_optimization_stage() == 3):
        model = {name: p.detach().clone() for name, p in named}
    masters = fp16_master_weights(model_engine.optimizer)
    master = {}
    for name, p in named:
        value = safe_get_full_fp32_param(p)  # ZeRO 1-3 and bf16 keep linked fp32 copies
        if value is None:
            value = masters.get(id(p), p)  # fp16 without ZeRO: the optimizer's flat copy; fp32: the parameter
        master[name] = value.detach().float().clone()
    return {"model": model, "master": master}


def fp16_master_weights(optimizer):
    """fp16 without ZeRO: each parameter's fp32 copy in DeepSpeed's FP16_Optimizer, by parameter id."""
    if not hasattr(optimizer, "fp32_groups_flat"):
        return {}
    return {id(p): master for flat, params in zip(optimizer.fp32_groups_flat, optimizer.fp16_groups)
            for p, master in zip(params, _unflatten_dense_tensors(flat, params))}


def changed(before, after, kind):
    """Names of the parameters whose `kind` ("model" or "master") values differ between two snapshots."""
    return [name for name in before[kind] if not torch.equal(before[kind][name], after[kind][name])]


def expert_of(name, net):
    """(layer, global expert index) of an expert parameter, or None for any other parameter."""
    match = re.match(r"moe_layer_list\.(\d+)\.deepspeed_moe\.experts\.deepspeed_experts\.(\d+)\.", name)
    if not match:
        return None
    layer = net.moe_layer_list[int(match[1])]
    ep_rank = dist.get_rank(group=layer.deepspeed_moe.ep_group)
    return int(match[1]), ep_rank * layer.num_local_experts + int(match[2])


def train_cell(cell, steps, checks, evaluate, data_path, seed):
    """Train one cell; return this rank's record: losses always, `checks` and test accuracy when asked."""
    dtype = parse_cell(cell)[0]
    args = cifar10_deepspeed.add_argument([*cell_flags(cell, steps, seed), "--data-path", data_path])
    model_engine, trainloader, testset = engine_of(args)
    net = model_engine.module
    record = {"losses": [], "loss_scales": [], "applied": []}

    def recorded_step(model_engine, criterion, inputs, labels, *step_args, **step_kwargs):
        """The script's train_step, as train() calls it, with what the cell records around it."""
        i = len(record["losses"])
        if dtype == "fp16" and i in OVERFLOW_STEPS:
            inputs = torch.full_like(data.to_inputs(inputs, "cpu"), float("inf"))  # non-finite
            # activations and gradients
        watched = checks and i in (OVERFLOW_STEPS[0], steps - 1)
        if watched:
            before = parameter_snapshot(model_engine)
            sent = [c.clone() for c in net.router.sent] if net.moe else None
        loss = train_step(model_engine, criterion, inputs, labels, *step_args, **step_kwargs)
        record["losses"].append(loss.item())
        record["loss_scales"].append(model_engine._get_optimizer_loss_scale() if dtype == "fp16" else None)
        record["applied"].append(model_engine.was_step_applied())
        if watched and i == OVERFLOW_STEPS[0]:
            after = parameter_snapshot(model_engine)
            record["changed_by_overflow_step"] = changed(before, after, "master") + changed(before, after, "model")
        elif watched:
            record.update(last_step(net, before, parameter_snapshot(model_engine), sent))
        return loss

    train_step, cifar10_deepspeed.train_step = cifar10_deepspeed.train_step, recorded_step
    try:  # one epoch of the script's own loop: its logging, expert load and monitors run too
        cifar10_deepspeed.train(model_engine, trainloader, testset, args)
    finally:
        cifar10_deepspeed.train_step = train_step
    if checks:
        record.update(final_state(net, parameter_snapshot(model_engine)["model"]))
    if evaluate:
        class_correct, class_total = cifar10_deepspeed.count_correct(
            model_engine, testset, model_engine.device, model_engine.get_data_types()[0], test_batch_size=50,
            shard=cifar10_deepspeed.can_shard_eval(args, model_engine))
        record["accuracy"] = 100 * sum(class_correct) / sum(class_total)
    model_engine.destroy()
    return record


def start():
    """The process group of this launch, as the script's main() starts it: each rank on its share of the cores
    (ranks on one machine would oversubscribe them), DeepSpeed's fixes in place."""
    launch.use_single_process_defaults()
    machine.use_share_of_cores()
    fixes.stop_probing_a_missing_nvml()
    fixes.bound_every_wait(deepspeed.constants.default_pg_timeout)
    deepspeed.init_distributed()


def engine_of(args, **settings):
    """The script's engine for these flags (and config `settings`), as its main() builds it: (engine, training
    loader, test set)."""
    config = {**cifar10_deepspeed.get_ds_config(args), **settings}
    reason = options.check_args(args, config, world_size=dist.get_world_size())
    if reason:
        raise ValueError(reason)
    machine.use_torch_fused_adamw(config)
    fixes.allow_fp16(config)
    trainset, testset = cifar10_deepspeed.load_data(args)
    return (*cifar10_deepspeed.build_engine(args, config, trainset), testset)


def last_step(net, before, after, sent_before):
    """What the last step did: each parameter's master moved? model equal to its master, rounded to its dtype?

    Also the tokens each expert got there, summed over ranks.
    """
    moved = set(changed(before, after, "master"))
    params = [{"name": name, "expert": expert_of(name, net), "moved": name in moved,
               "matches_master": torch.equal(model, after["master"][name].to(model.dtype))}
              for name, model in after["model"].items()]
    if not net.moe:
        return {"params": params}
    counts = torch.cat([now - then for now, then in zip(net.router.sent, sent_before)])
    dist.all_reduce(counts)
    return {"params": params,
            "tokens": [c.tolist() for c in counts.split([layer.num_experts for layer in net.moe_layer_list])]}


def final_state(net, final):
    """The parameters this rank ends with, which are not finite, which are experts; its experts per layer
    and its rank in the expert-parallel group (which experts it holds)."""
    return {"final": {name: p.float() for name, p in final.items()},
            "nonfinite": [name for name, p in final.items() if not torch.isfinite(p).all()],
            "expert_params": [name for name, p in net.named_parameters() if is_moe_param(p)],
            "local_experts": [len(layer.deepspeed_moe.experts.deepspeed_experts) for layer in net.moe_layer_list]
            if net.moe else [],
            "ep_rank": dist.get_rank(group=net.moe_layer_list[0].deepspeed_moe.ep_group) if net.moe else None}


def compare_ranks(records):
    """Largest difference from rank 0's shared parameters over all ranks, and for every pair of
    ranks the smallest and largest difference between their experts of the same local index.

    For two ranks, also rank 0 against rank 1 as expert_min_diff and expert_max_diff.
    """
    finals = [record.pop("final", None) for record in records]
    if len(finals) == 1 or finals[0] is None:
        return {}
    experts = set(records[0]["expert_params"])
    diff = lambda a, b, n: (finals[a][n] - finals[b][n]).abs().max().item()
    shared = [diff(0, r, n) for r in range(1, len(finals)) for n in finals[0] if n not in experts]
    pairs = {f"{a}-{b}": [min(d), max(d)] for a in range(len(finals)) for b in range(a + 1, len(finals))
             if (d := [diff(a, b, n) for n in finals[0] if n in experts])}
    expert_01 = pairs.get("0-1", [None, None])
    return {"shared_max_diff": max(shared), "expert_diffs": pairs, "expert_min_diff": expert_01[0],
            "expert_max_diff": expert_01[1]}


def gathered(outcome):
    """Every rank's (record, error) gathered in one collective: the records, rank by rank, and the first error."""
    outcomes = [None] * dist.get_world_size()
    dist.all_gather_object(outcomes, outcome)
    errors = [error for _, error in outcomes if error]
    return [record for record, _ in outcomes], errors[0] if errors else None


def write_report(report, path):
    """Rank 0 writes the launch's report; every rank leaves the process group."""
    if dist.get_rank() == 0:
        with open(path, "w") as f:
            json.dump(report, f)
    dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cells", nargs="+")
    parser.add_argument("--report", required=True)
    parser.add_argument("--steps", type=int, default=14, help="training steps per cell (one epoch)")
    parser.add_argument("--checks", action="store_true", help="record what moved, what each rank holds, overflows")
    parser.add_argument("--evaluate", action="store_true", help="record the test accuracy")
    parser.add_argument("--data-path", default="tensor", choices=["tensor", "pil"], help="the script's --data-path")
    parser.add_argument("--seed", type=int, default=SEED, help="the script's --seed in every cell")
    parser.add_argument("--local_rank", type=int)
    options = parser.parse_args()

    start()
    report = {}
    for cell in options.cells:
        try:
            outcome = train_cell(cell, options.steps, options.checks, options.evaluate, options.data_path,
                                 options.seed), None
        except Exception:
            outcome = {}, traceback.format_exc(limit=-3)
        records, error = gathered(outcome)
        if dist.get_rank() == 0:
            report[cell] = {"error": error} if error else {**compare_ranks(records), "ranks": records}
            print(f"cell {cell}: {'error' if error else 'done'}", flush=True)
    write_report(report, options.report)


if __name__ == "__main__":
    with machine.exit_without_teardown():
        main()
