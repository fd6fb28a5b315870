"""Count every MoE gate's routes apart from the script's router, while the script trains (tests/test_metrics.py).

    deepspeed --num_gpus 2 tests/count_routes.py --report counts.json --metrics-dir DIR

Trains, in one launch with expert parallelism over every rank, top-1, top-2 and top-1 without dropping, through the
script's own get_ds_config, Net, build_engine, train() and test(), each with its CSV monitor in DIR/<run>. Each
call of DeepSpeed's gating function is done twice: as the MoE layer asks (sparse routes, which the router's hook
reads) and, with the same random numbers, in DeepSpeed's dense form, whose dispatch mask gives what each expert
kept and its capacity. Those counts are summed over the ranks at each of the router's readings and written, per
run, log interval and layer, to the report.
"""

import argparse
import inspect
import os
import sys

import deepspeed.comm as dist
import torch
from deepspeed.moe import sharded_moe

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cifar10_deepspeed  # noqa: E402
from cifar10ds import machine, metrics  # noqa: E402
from train_cells import engine_of, start, write_report  # noqa: E402

RUNS = {"top-1": [], "top-2": ["--top-k", "2"], "top-1 no drop": ["--no-drop-tokens"]}


class Counts:
    """Per layer, over the passes since the last reading: assignments sent to and kept by each expert, capacity
    per expert, entropy summed over tokens, tokens, aux loss summed over passes, passes; at evaluation, the
    assignments sent and kept."""

    def __init__(self, experts):
        self.experts, self.calls = experts, 0
        self.reset()

    def reset(self):
        self.train = [{"sent": torch.zeros(n), "kept": torch.zeros(n), "capacity": 0.0, "entropy": 0.0,
                       "tokens": 0.0, "aux_loss": 0.0, "passes": 0.0} for n in self.experts]
        self.test = [{"sent": 0.0, "kept": 0.0} for _ in self.experts]

    def add(self, logits, aux_loss, dispatch_mask, sent):
        layer = self.calls % len(self.experts)  # every forward pass calls the layers' gates in order
        self.calls += 1
        kept = dispatch_mask.sum(dim=(0, 2)).float()
        if not torch.is_grad_enabled():  # the script evaluates under no_grad
            self.test[layer]["sent"] += sent.sum().item()
            self.test[layer]["kept"] += kept.sum().item()
            return
        counts = self.train[layer]
        counts["sent"] += sent.float()
        counts["kept"] += kept
        counts["capacity"] += dispatch_mask.shape[2]
        counts["entropy"] += -(logits.softmax(dim=1) * logits.log_softmax(dim=1)).sum().item()
        counts["tokens"] += logits.shape[0]
        counts["aux_loss"] += aux_loss.item()
        counts["passes"] += 1

    def read(self, part):
        """One reading of the training or the test counts, summed over the ranks, as lists; then those are reset."""
        layers = self.train if part == "train" else self.test
        summed = []
        for counts in layers:
            values = torch.cat([torch.as_tensor(v, dtype=torch.float64).flatten() for v in counts.values()])
            dist.all_reduce(values)
            sizes = [torch.as_tensor(v).numel() for v in counts.values()]
            summed.append({name: v.tolist() if len(v) > 1 else v.item()
                           for name, v in zip(counts, values.split(sizes))})
        fresh = Counts(self.experts)
        setattr(self, part, getattr(fresh, part))
        return summed


def twin(gating, counts):
    """DeepSpeed's gating function, which first runs again in dense form on the same logits and random numbers."""
    signature = inspect.signature(gating)

    def gate(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        logits = bound.arguments["logits"]
        dense = {**bound.arguments, "logits": logits.clone(), "sparse_routes": False}
        random_state = torch.get_rng_state()
        with torch.no_grad():
            aux_loss, _, dispatch_mask, sent = gating(**dense)
        torch.set_rng_state(random_state)
        counts.add(logits.detach().float(), aux_loss.detach(), dispatch_mask, sent)
        return gating(*args, **kwargs)

    return gate


def train_and_count(name, flags, report, metrics_dir):
    world = dist.get_world_size()
    args = cifar10_deepspeed.add_argument([
        "--deepspeed", "--dataset", "synthetic", "--synthetic-train-size", "160", "--synthetic-test-size", "64",
        "--seed", "0", "--dtype", "fp32", "-e", "2", "--log-interval", "5", "--eval-every", "1", "--moe",
        "--num-experts", str(world), "16", "--ep-world-size", str(world), "--moe-param-group",
        "--metrics-dir", os.path.join(metrics_dir, name), *flags])
    counts = Counts([world, 16])
    readings = {"train": [], "test": []}
    originals = {name: getattr(metrics.Router, name) for name in ("summarize", "summarize_test")}

    def reading(method, part):
        def read(router):
            readings[part].append(counts.read(part))
            return originals[method](router)
        return read

    patches = [(sharded_moe, "top1gating", twin(sharded_moe.top1gating, counts)),
               (sharded_moe, "top2gating", twin(sharded_moe.top2gating, counts)),
               (metrics.Router, "summarize", reading("summarize", "train")),
               (metrics.Router, "summarize_test", reading("summarize_test", "test"))]
    saved = [(owner, attribute, getattr(owner, attribute)) for owner, attribute, _ in patches]
    for owner, attribute, value in patches:
        setattr(owner, attribute, value)
    try:
        if dist.get_rank() == 0:
            print(f"run {name}", flush=True)
        config = cifar10_deepspeed.get_ds_config(args)
        metrics.add_monitors(config, args)
        model_engine, trainloader, testset = engine_of(args, **config)
        cifar10_deepspeed.train(model_engine, trainloader, testset, args)
        cifar10_deepspeed.test(model_engine, testset, model_engine.device, model_engine.get_data_types()[0],
                               shard=cifar10_deepspeed.can_shard_eval(args, model_engine))
        model_engine.destroy()
    finally:
        for owner, attribute, value in saved:
            setattr(owner, attribute, value)
    report[name] = readings


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", required=True)
    parser.add_argument("--metrics-dir", required=True)
    parser.add_argument("--local_rank", type=int)
    options = parser.parse_args()
    start()
    report = {}
    for name, flags in RUNS.items():
        train_and_count(name, flags, report, options.metrics_dir)
    write_report(report, options.report)


if __name__ == "__main__":
    with machine.exit_without_teardown():
        main()
