"""Train distributed layouts on fixed samples and report what each ends with, for comparison with one process.

tests/test_layouts.py launches it once per world size with DeepSpeed's launcher:

    deepspeed --num_gpus 2 tests/train_layouts.py --report report.json fp32-zero0-top2-w2-ep2/acting ...

A layout is a dtype, a ZeRO stage, a model, a world size, an expert-parallel size and offload or
not (the matrix's cell names, tests/train_cells.py). Each run names a layout and a clipping mode:
gradient clipping acting at every step, or idle. It trains for --steps steps through the
script's own get_ds_config, Net, deepspeed.initialize (as `build_engine` calls it) and train_step.

What makes the layouts comparable with one process (world 1, EP 1) training the same samples:
- the same initial weights: with --seed every rank builds the same Net (`build_engine`), so the
  expert template, which every expert starts as, is one process's;
- the same samples: each step is 16 samples of the synthetic set, rank r of W training the r-th
  sixteenth-times-W slice of them (16 / W each; DeepSpeed averages over the ranks);
- no dropped tokens (--no-drop-tokens): an expert's capacity is then every token routed to it,
  whatever the batch each rank sees, so per-rank capacity changes nothing;
- the same gate noise: RSample and top-2's second-expert sampling draw Gumbel noise per token.
  Here the noise of every sample is drawn once from one seeded generator, and each rank's gate is
  handed its own samples' rows (GateNoise), so one process and every layout add the same noise to
  the same token. The random token selection's draws (top-1) order tokens only when capacity drops
  some, which --no-drop-tokens rules out.

The one-process runs (world 1) are saved whole with --save DIR. A launch of layouts reads them
with --truth DIR and reports, per layout and clipping mode and for every rank, the gradient norm
before clipping at every step (engine.get_global_grad_norm()), whether each step was applied, and
each parameter's largest difference from one process's (experts by their global index; fp32 master
copies where the optimizer keeps them). The report of a --save launch holds the one-process norms
and how far each parameter moved from its initial value. With --checkpoints DIR, each --checkpointed run
is saved there as the script saves an epoch, with every rank's fp32 masters beside it, for
test_layouts.py to export.
"""

import argparse
import os
import sys
import traceback

import deepspeed.comm as dist
import deepspeed.moe.sharded_moe
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cifar10_deepspeed  # noqa: E402
from cifar10ds import machine  # noqa: E402
from train_cells import (MODELS, engine_of, expert_of, gathered, parameter_snapshot, parse_cell, start,  # noqa: E402
                         write_report)

GLOBAL_BATCH = 16
SEED = 0
# One expert count per model at every EP size (1, 2 and 4 divide it), so that one process is the truth for all.
EXPERTS = {"top1": [4], "top2": [4], "rsample": [4], "prmoe": [4, 8]}
CLIPPING = {"acting": 0.05, "idle": 1e6}  # the gradient norm here is 0.3 to 3: 0.05 clips at every step, 1e6 never


def layout_flags(layout, steps):
    dtype, stage, model, world, ep, offload = parse_cell(layout)
    flags = ["--deepspeed", "--dataset", "synthetic", "--synthetic-train-size", str(GLOBAL_BATCH * steps),
             "--synthetic-test-size", "1",
             "--dtype", dtype, "--stage", str(stage), "--seed", str(SEED), *MODELS[model]]
    if offload:
        flags += ["--offload", "cpu"]
    if model != "dense":
        flags += ["--num-experts", *map(str, EXPERTS[model]), "--ep-world-size", str(ep), "--moe-param-group",
                  "--no-drop-tokens"]
    return flags


class GateNoise:
    """Gumbel noise fixed per sample and MoE layer, handed to DeepSpeed's gates in place of fresh draws.

    `use(rows)` picks the samples this rank trains next; each gate call then takes the next layer's rows.
    """

    def __init__(self, samples, experts_per_layer):
        gen = torch.Generator().manual_seed(SEED + 1)
        uniform = [torch.rand(samples, n, generator=gen) for n in experts_per_layer]
        self.noise = [-torch.log(-torch.log(u.clamp(1e-9, 1 - 1e-9))) for u in uniform]  # Gumbel(0, 1)
        self.queue = []

    def use(self, rows):
        self.queue = [noise[rows] for noise in self.noise]

    def __call__(self, shape, device):
        noise = self.queue.pop(0)
        assert tuple(shape) == tuple(noise.shape), f"gate noise of shape {tuple(shape)} asked, {tuple(noise.shape)} held"
        return noise.to(device)


def samples(trainset):
    """Every training sample, as the data path holds it (train_step makes the model's inputs): the global batches,
    in order."""
    images, labels = zip(*(trainset[i] for i in range(len(trainset))))
    return torch.stack(images), torch.tensor(labels)


def truth_of(layout):
    """The one-process layout that `layout` must equal: world 1, EP 1, ZeRO 0, no offload, same model and dtype."""
    dtype, _, model, *_ = parse_cell(layout)
    return f"{dtype}-zero0-{model}-w1" + ("" if model == "dense" else "-ep1")


def master_parameters(model_engine):
    """Every parameter's fp32 master copy (the model's own in fp32), experts under their global index."""
    named = {}
    for name, value in parameter_snapshot(model_engine)["master"].items():
        expert = expert_of(name, model_engine.module)
        if expert:
            prefix, local = name.split(".deepspeed_experts.")
            name = f"{prefix}.deepspeed_experts.{expert[1]}.{local.split('.', 1)[1]}"
        named[name] = value
    return named


def train_layout(layout, clipping, steps, checkpoint=None):
    """Train one layout with one clipping mode; return this rank's gradient norms, applied steps, initial and
    final parameters. With `checkpoint`, a directory, save there as the script saves an epoch, and this rank's
    fp32 masters beside it (masters-rank<R>.pt), for export_model.py to be checked against."""
    dtype, stage, model, world, ep, offload = parse_cell(layout)
    args = cifar10_deepspeed.add_argument(layout_flags(layout, steps))
    model_engine, trainloader, _ = engine_of(args, gradient_clipping=CLIPPING[clipping])
    images, labels = samples(trainloader.dataset)
    noise = GateNoise(len(labels), EXPERTS.get(model, []))
    deepspeed.moe.sharded_moe.gumbel_rsample = noise
    initial = master_parameters(model_engine)
    per_rank = GLOBAL_BATCH // dist.get_world_size()
    norms, applied = [], []
    for step in range(steps):
        rows = torch.arange(step * GLOBAL_BATCH + dist.get_rank() * per_rank,
                            step * GLOBAL_BATCH + (dist.get_rank() + 1) * per_rank)
        noise.use(rows)
        cifar10_deepspeed.train_step(model_engine, nn.CrossEntropyLoss(), images[rows], labels[rows])
        norm = model_engine.get_global_grad_norm()
        norms.append(None if norm is None else float(norm))
        applied.append(model_engine.was_step_applied())
    record = {"norms": norms, "applied": applied, "initial": initial, "final": master_parameters(model_engine)}
    if checkpoint:
        args.save_dir = checkpoint
        cifar10_deepspeed.save_checkpoint(model_engine, args, epoch=0)
        torch.save(record["final"], os.path.join(checkpoint, f"masters-rank{dist.get_rank()}.pt"))
    model_engine.destroy()
    return record


def compared(record, truth):
    """What the report keeps of a rank's record: norms and applied steps; for the truth (the one-process record)
    how far each parameter moved, otherwise each parameter's largest difference from the truth's and the
    difference of the whole update from the truth's, relative to the truth's update (both as vectors)."""
    summary = {"norms": record["norms"], "applied": record["applied"]}
    if truth is None:
        summary["moved"] = {name: (value - record["initial"][name]).abs().max().item()
                            for name, value in record["final"].items()}
        return summary
    names = list(record["final"])
    summary["differences"] = {name: (record["final"][name] - truth["final"][name]).abs().max().item()
                              for name in names}
    difference = torch.cat([(record["final"][name] - truth["final"][name]).flatten() for name in names])
    update = torch.cat([(truth["final"][name] - truth["initial"][name]).flatten() for name in names])
    summary["update_error"] = (difference.norm() / update.norm()).item()
    return summary


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", metavar="LAYOUT/CLIPPING", help=f"a layout and a clipping mode ({', '.join(CLIPPING)})")
    parser.add_argument("--report", required=True)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--save", help="save every record here (the one-process truths)")
    parser.add_argument("--truth", help="compare every layout with the one-process record saved here")
    parser.add_argument("--checkpoints", help="save the --checkpointed runs here, one directory each")
    parser.add_argument("--checkpointed", action="append", default=[], metavar="LAYOUT/CLIPPING",
                        help="a run to save under --checkpoints (again for more)")
    parser.add_argument("--local_rank", type=int)
    options = parser.parse_args()

    start()
    report = {}
    for key in options.runs:
        layout, clipping = key.split("/")
        try:
            checkpoint = (os.path.join(options.checkpoints, f"{layout}-{clipping}") if key in options.checkpointed
                          else None)
            record = train_layout(layout, clipping, options.steps, checkpoint)
            if options.save and dist.get_rank() == 0:
                torch.save(record, os.path.join(options.save, f"{layout}-{clipping}.pt"))
            truth = (torch.load(os.path.join(options.truth, f"{truth_of(layout)}-{clipping}.pt"))
                     if options.truth else None)
            outcome = compared(record, truth), None
        except Exception:
            outcome = {}, traceback.format_exc(limit=-3)
        records, error = gathered(outcome)
        if dist.get_rank() == 0:
            report[key] = {"error": error} if error else {"ranks": records}
            print(f"layout {layout}, clipping {clipping}: {'error' if error else 'done'}", flush=True)
    write_report(report, options.report)


if __name__ == "__main__":
    with machine.exit_without_teardown():
        main()
