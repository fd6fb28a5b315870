"""What DeepSpeed's engine costs a step over a plain loop, and how much of it four of its parts are.

    python bench/engine_parts.py [--rounds 20] [--steps 100]

One process, fp32, the dense Net, batch 16, the same uint8 batches every row. The plain loop's step
(bench/plain_loop.py: torch's fused AdamW, clip_grad_norm_, the warm-up as a LambdaLR). Then the script's train_step on the engine build_engine
makes (the fixes on), and the same with one more of DeepSpeed's parts patched out of this process a row:
- engine.zero_grad walking module.named_parameters() every step: a list of the parameters, built once;
- nn.Module.__setattr__ for the engine's own counters and flags (13 writes a step): object.__setattr__;
- the backward hooks engine.forward puts on the outputs, for a loss.backward() called without
  engine.backward: none (on fp32 without ZeRO their prologue starts only timers, which are off);
- what engine.backward does around loss.backward() beside its epilogue: the loss divided by its gradient
  accumulation steps (1 here: x / 1 is x), a hook on the loss for its graph tracker, locks and counters.
Before the rounds, 10 steps of the engine with every part patched out must leave the parameters bit for bit
where 10 unpatched steps from the same state do. A Markdown table: ms a step (the median over rounds), each
row's ratio to the plain loop and to the row above (the median of each round's). The script patches none of
these (BENCHMARKS.md says why).
"""

import argparse
import copy
import os
import statistics
import sys
import time
import types

import deepspeed
import deepspeed.runtime.engine
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cifar10_deepspeed as script  # noqa: E402
from cifar10ds import fixes, launch, machine, options  # noqa: E402
from plain_loop import plain_step  # noqa: E402

ROWS = ["the plain loop", "DeepSpeed's engine and the script's fixes", "- zero_grad's walk of named_parameters()",
        "- nn.Module.__setattr__ on the engine's counters", "- the output backward hooks",
        "- engine.backward's own steps around loss.backward()"]
HOOKS = deepspeed.runtime.engine.register_output_backward_hooks


class Parts:
    """Patch DeepSpeed's parts out of `engine`, the first `out` of them, in this process."""

    def __init__(self, engine):
        self.engine, self.engine_class, self.zero_grad = engine, type(engine), engine.zero_grad
        self.backward = engine.backward
        parameters = list(engine.module.parameters())

        def backward(loss):
            loss.backward()
            engine._backward_epilogue()  # the gradient all-reduce where there is one
            return loss

        def zero_grad():
            for p in parameters:
                p.grad = None

        class PlainCounters(self.engine_class):
            def __setattr__(self, name, value):
                if name in self.__dict__ and type(value) in (int, float, bool, type(None), torch.Tensor):
                    object.__setattr__(self, name, value)  # a plain attribute stays one: no module bookkeeping
                else:
                    super().__setattr__(name, value)

        self.list_zero_grad, self.plain_counters, self.loss_backward = zero_grad, PlainCounters, backward

    def out(self, parts):
        self.engine.zero_grad = self.list_zero_grad if parts >= 1 else self.zero_grad
        self.engine.__class__ = self.plain_counters if parts >= 2 else self.engine_class
        deepspeed.runtime.engine.register_output_backward_hooks = (
            (lambda *_, **__: types.SimpleNamespace(hook_handles=[])) if parts >= 3 else HOOKS)
        object.__setattr__(self.engine, "backward", self.loss_backward if parts >= 4 else self.backward)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--local_rank", help=argparse.SUPPRESS)  # a launcher's, refused below
    args = parser.parse_args()
    if launch.world_size() > 1:
        sys.exit("bench/engine_parts.py: error: one rank, as the plain loop: run it without a launcher")
    launch.use_single_process_defaults()
    machine.use_share_of_cores()
    fixes.stop_probing_a_missing_nvml()  # as the script trains, and plain PyTorch, which never imports DeepSpeed
    fixes.bound_every_wait(deepspeed.constants.default_pg_timeout)  # as the script: no /dev/shm buffer left
    deepspeed.init_distributed()
    run_args = script.add_argument(["--deepspeed", "--dataset", "synthetic", "--dtype", "fp32", "--seed", "0",
                                    "--synthetic-train-size", str(16 * args.steps)])
    config = script.get_ds_config(run_args)
    machine.use_torch_fused_adamw(config)
    options.read_offload(config)
    trainset, _ = script.load_data(run_args)
    engine, trainloader = script.build_engine(run_args, config, trainset)
    batches, criterion, parts = list(trainloader), torch.nn.CrossEntropyLoss(), Parts(engine)

    plain = plain_step(run_args, engine.device)

    def block(row, steps=None):
        parts.out(max(row - 1, 0))
        start = time.perf_counter()
        for inputs, labels in batches[:steps]:
            loss = plain(inputs, labels) if row == 0 else script.train_step(engine, criterion, inputs, labels)
        loss.item()  # the device's queue done
        return (time.perf_counter() - start) / len(batches[:steps])

    check_the_same_numbers(engine, lambda parts_out: block(parts_out + 1, steps=10))
    times = {row: [] for row in range(len(ROWS))}
    for _ in range(args.rounds):
        for row in times:
            times[row].append(block(row))
    print(f"| a step ({os.cpu_count()} cores, {engine.device.type}, fp32, batch 16, 1 rank, median of "
          f"{args.rounds} blocks of {args.steps} steps) | ms | vs the plain loop | vs the row above |")
    print("| --- " * 4 + "|")
    for row, name in enumerate(ROWS):
        def ratio(base):
            return "-" if row == base else f"{statistics.median(a / b for a, b in zip(times[row], times[base])):.3f}"
        print(f"| {name} | {1000 * statistics.median(times[row]):.3f} | {ratio(0)} | {ratio(max(row - 1, 0))} |")


def check_the_same_numbers(engine, train):
    """Train 10 steps as DeepSpeed has it and 10 from the same state with every part out: the same parameters."""
    parameters = list(engine.module.parameters())
    saved = ([p.detach().clone() for p in parameters], copy.deepcopy(engine.optimizer.state_dict()),
             engine.lr_scheduler.state_dict())
    after = []
    for parts_out in (0, len(ROWS) - 2):
        with torch.no_grad():
            for p, value in zip(parameters, saved[0]):
                p.copy_(value)
        engine.optimizer.load_state_dict(copy.deepcopy(saved[1]))
        engine.lr_scheduler.load_state_dict(saved[2])
        train(parts_out)
        after.append([p.detach().clone() for p in parameters])
    if not all(torch.equal(a, b) for a, b in zip(*after)):
        sys.exit("bench/engine_parts.py: error: the engine with its parts patched out trains other numbers")


if __name__ == "__main__":
    main()
