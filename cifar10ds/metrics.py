"""What a run shows: the reference's loss and accuracy lines, and beyond them throughput, gradient norms and
expert load at each log interval, DeepSpeed's CSV and TensorBoard monitors, and a live bar in a terminal
(docs/monitoring.md, docs/moe.md)."""

import contextlib
import math
import sys
import time

import deepspeed.comm as dist
import torch
from deepspeed.accelerator import get_accelerator
from deepspeed.utils import logger
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from cifar10ds.data import CLASSES

BAR_EVERY = 20  # steps between the bar's readings of the loss and expert load (each one a host read)


def batch_label(epoch, batch):
    """`[ 1,  2000]`: epoch and batch (counted from 1) as the reference's loss line starts, sign spaces included."""
    return f"[{epoch: d}, {batch: 5d}]"


def loss_line(epoch, batch, mean_loss):
    """The reference's running-loss line, to the character: `[ 1,  2000] loss:  2.304`."""
    return f"{batch_label(epoch, batch)} loss: {mean_loss: .3f}"


def accuracy_lines(class_correct, class_total):
    """The reference's accuracy lines, to the character: overall, then one per class.

    Percentages are rounded (half to even, as Python's format rounds) and printed with a space for the sign.
    A class with no test image, where the reference divides by zero, gets an `n/a` line instead.
    """
    total = sum(class_total)
    lines = [f"Accuracy of the network on the {total} test images: {100 * sum(class_correct) / total: .0f} %"]
    for name, correct, count in zip(CLASSES, class_correct, class_total):
        if count:
            lines.append(f"Accuracy of {name:>5s} : {100 * correct / count: 2.0f} %")
        else:
            lines.append(f"Accuracy of {name:>5s} : n/a (no test images)")
    return lines


def add_monitors(config, args):
    """DeepSpeed's CSV and TensorBoard monitors, as asked: each gets every series the run writes (job cifar10)."""
    for key, folder in (("csv_monitor", args.metrics_dir), ("tensorboard", args.tensorboard_dir)):
        if folder:
            config[key] = {"enabled": True, "output_path": folder, "job_name": "cifar10"}


class ExpertLoad:
    """Tokens routed to each expert, and the gate aux loss, of every MoE layer over one log interval."""

    def __init__(self, net, device):
        self.counts = [torch.zeros(layer.num_experts, device=device) for layer in net.moe_layer_list]
        self.aux_losses = torch.zeros(len(net.moe_layer_list), device=device)
        self.steps = 0

    def add(self, net):
        for total, counts in zip(self.counts, net.expert_counts):
            total += counts
        self.aux_losses += torch.stack([aux.detach().float() for aux in net.aux_losses])
        self.steps += 1

    def summarize(self):
        """Each layer's share of tokens per expert and mean aux loss, over all ranks; every rank must call it."""
        totals = torch.cat(self.counts + [self.aux_losses])
        dist.all_reduce(totals)
        counts = totals[:-len(self.aux_losses)].split([len(c) for c in self.counts])
        shares = [(c / c.sum().clamp(min=1)).tolist() for c in counts]
        aux_losses = (totals[-len(self.aux_losses):] / (self.steps * dist.get_world_size())).tolist()
        self.reset()
        return shares, aux_losses

    def reset(self):
        for total in self.counts + [self.aux_losses]:
            total.zero_()
        self.steps = 0

    def state(self):
        return {"counts": [c.tolist() for c in self.counts], "aux_losses": self.aux_losses.tolist(), "steps": self.steps}

    def load_state(self, state):
        for total, counts in zip(self.counts + [self.aux_losses], state["counts"] + [state["aux_losses"]]):
            total.copy_(torch.tensor(counts))
        self.steps = state["steps"]


def clipping_summary(norms, clip):
    """`grad norm 0.452, clipped at 1.0 in 3 of 100 steps`: the mean norm before clipping over the interval's
    finite norms (a skipped fp16 step has none) and how often clipping acted."""
    finite = [norm for norm in norms if norm is not None and math.isfinite(norm)]
    if not finite:
        return None
    summary = f"grad norm {sum(finite) / len(finite):.3f}"
    if clip > 0:
        return f"{summary}, clipped at {clip} in {sum(norm > clip for norm in finite)} of {len(norms)} steps"
    return f"{summary}, no clipping"


class Log:
    """The log interval in progress: each optimizer step's samples seen, loss and gradient norm, kept on the
    device and read once per interval; the expert load; the bar. Rank 0 prints, every rank writes the monitors."""

    def __init__(self, model_engine, args, steps_per_epoch):
        self.engine, self.args, self.steps_per_epoch = model_engine, args, steps_per_epoch
        self.net = model_engine.module
        self.expert_load = ExpertLoad(self.net, model_engine.device) if args.moe else None
        self.steps, self.bar = [], None

    @contextlib.contextmanager
    def epoch(self, epoch, first=0, interval=None):
        """One epoch from optimizer step `first`, with `interval` (state()) of a mid-epoch checkpoint carried on;
        a bar on rank 0 when its output is a terminal (tqdm's no-op otherwise, so logs get the printed lines)."""
        self.steps = self.restore(interval) if interval else []
        if self.expert_load and not interval:
            self.expert_load.reset()  # an interval ends with its epoch, as the loss lines' do
        epoch_start = self.interval_start = time.perf_counter()
        show = self.args.progress and dist.get_rank() == 0 and sys.stdout.isatty()
        with (tqdm(total=self.steps_per_epoch, initial=first, desc=f"epoch {epoch + 1}", unit="step", file=sys.stdout,
                   leave=False, disable=not show, dynamic_ncols=True) as self.bar,
              logging_redirect_tqdm([logger]) if show else contextlib.nullcontext()):
            yield
        if self.steps:
            self.write_steps()
        self.engine.monitor.write_events([("Train/Epoch/seconds", time.perf_counter() - epoch_start, epoch + 1)])

    def step(self, loss):
        """Record the optimizer step just taken (its loss still on the device) and advance the bar."""
        norm = self.engine.get_global_grad_norm()  # before clipping; None where DeepSpeed computes none
        norm = None if norm is None else torch.as_tensor(norm, dtype=torch.float32, device=self.engine.device)
        self.steps.append((self.engine.global_samples, loss, norm))
        if self.expert_load:
            self.expert_load.add(self.net)
        self.bar.update()
        if not self.bar.disable and self.bar.n % BAR_EVERY == 0:
            self.show_on_bar()

    def show_on_bar(self):
        """samples/s, the running loss and, with MoE, each layer's busiest expert's share of rank 0's tokens."""
        rate = self.bar.format_dict["rate"] or 0
        postfix = {"samples/s": f"{rate * self.engine.train_batch_size():.0f}",
                   "loss": f"{torch.stack([loss for _, loss, _ in self.steps[-BAR_EVERY:]]).mean().item():.3f}"}
        if self.expert_load:
            postfix["busiest expert"] = " ".join(f"{100 * (c.max() / c.sum().clamp(min=1)).item():.0f}%"
                                                 for c in self.expert_load.counts)
        self.bar.set_postfix(postfix)

    def write_steps(self):
        """Write each step's loss and gradient norm to the monitors (Train/Samples/train_loss and grad_norm), empty
        the interval, return the losses and norms (None where DeepSpeed computes none): one host read."""
        samples = [s for s, _, _ in self.steps]
        losses = torch.stack([loss for _, loss, _ in self.steps]).tolist()
        events = [("Train/Samples/train_loss", loss, s) for s, loss in zip(samples, losses)]
        norms = [None] * len(self.steps)
        if all(norm is not None for _, _, norm in self.steps):
            norms = torch.stack([norm for _, _, norm in self.steps]).tolist()
            events += [("Train/Samples/grad_norm", norm, s) for s, norm in zip(samples, norms)]
        self.engine.monitor.write_events(events)
        self.steps = []
        return losses, norms

    def print_interval(self, epoch, step):
        """Rank 0 prints the reference's loss line, then throughput and expert load; the monitors get them too.

        The throughput line shows the interval's gradient norm and how often clipping acted, and ends with rank
        0's peak accelerator memory so far (on DeepSpeed's CPU accelerator: the process's resident memory), which
        ZeRO and ZeRO-Offload lower.
        """
        losses, norms = self.write_steps()
        seconds = time.perf_counter() - self.interval_start
        interval, engine, samples = self.args.log_interval, self.engine, self.engine.global_samples
        prefix = batch_label(epoch + 1, step + 1)
        samples_per_sec = interval * engine.train_batch_size() / seconds
        events = [("Train/Samples/samples_per_sec", samples_per_sec, samples)]
        accelerator = get_accelerator()
        speed = [f"{samples_per_sec:.0f} samples/s", f"{seconds / interval * self.steps_per_epoch:.1f} s/epoch",
                 clipping_summary(norms, engine.gradient_clipping()),
                 f"peak {accelerator.device_name()} memory {accelerator.max_memory_allocated() / 2**20:.0f} MiB"]
        lines = [loss_line(epoch + 1, step + 1, sum(losses) / len(losses)),
                 f"{prefix} {', '.join(part for part in speed if part)}"]
        if self.expert_load:
            shares, aux_losses = self.expert_load.summarize()
            layers = []
            for layer, (layer_shares, aux_loss) in enumerate(zip(shares, aux_losses)):
                layers.append(f"layer {layer}: {' '.join(f'{100 * x:.0f}%' for x in layer_shares)}, "
                              f"aux loss {aux_loss:.3f}")
                events += [(f"MoE/layer{layer}_expert{e}_share", x, samples) for e, x in enumerate(layer_shares)]
                events.append((f"MoE/layer{layer}_aux_loss", aux_loss, samples))
            lines.append(f"{prefix} expert load: {' | '.join(layers)}")
        if dist.get_rank() == 0:
            with tqdm.external_write_mode(file=sys.stdout):
                print("\n".join(lines), flush=True)
        engine.monitor.write_events(events)
        self.interval_start = time.perf_counter()

    def print_accuracy(self, epoch, class_correct, class_total):
        """`[3] accuracy of the network on the 10000 test images: 61.2 %` after an --eval-every epoch; returns it."""
        accuracy = 100 * sum(class_correct) / sum(class_total)
        if dist.get_rank() == 0:
            print(f"[{epoch + 1}] accuracy of the network on the {sum(class_total)} test images: {accuracy:.1f} %")
        self.engine.monitor.write_events([("Eval/accuracy", accuracy, self.engine.global_samples)])
        return accuracy

    def state(self):
        """This rank's part of the interval in progress, for a mid-epoch checkpoint: what the next loss,
        throughput and expert-load lines average."""
        return {"steps": [(samples, loss.item(), None if norm is None else norm.item())
                          for samples, loss, norm in self.steps],
                "expert_load": self.expert_load.state() if self.expert_load else None}

    def restore(self, interval):
        """The steps of a state(), back on the device; the expert load restored in place."""
        if self.expert_load:
            self.expert_load.load_state(interval["expert_load"])
        device = self.engine.device
        return [(samples, torch.tensor(loss, device=device), None if norm is None else torch.tensor(norm, device=device))
                for samples, loss, norm in interval["steps"]]
