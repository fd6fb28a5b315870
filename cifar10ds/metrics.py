"""What a run shows: the reference's loss and accuracy lines, and beyond them throughput, gradient norms and
expert load at each log interval, DeepSpeed's CSV and TensorBoard monitors, and a live bar in a terminal
(docs/monitoring.md, docs/moe.md)."""

import contextlib
import functools
import math
import statistics
import sys
import threading
import time

import deepspeed.comm as dist
import torch
import torch.nn.functional as F
from deepspeed.accelerator import get_accelerator
from deepspeed.utils import logger
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from cifar10ds.data import CLASSES


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


MONITOR_JOB = "cifar10"  # the monitors' job name: they write into <--metrics-dir or --tensorboard-dir>/cifar10


def add_monitors(config, args):
    """DeepSpeed's CSV and TensorBoard monitors, as asked: each gets every series the run writes, in MONITOR_JOB."""
    for key, folder in (("csv_monitor", args.metrics_dir), ("tensorboard", args.tensorboard_dir)):
        if folder:
            config[key] = {"enabled": True, "output_path": folder, "job_name": MONITOR_JOB}


def train_on_when_the_monitors_cannot_write(model_engine, args):
    """A monitor's write that fails (a full disk, a quota) turns the monitors off with one line, and training goes
    on: without this, DeepSpeed's OSError ends the run, mid-epoch, with what it trained since the last checkpoint.
    Rank 0 alone writes them; every series ends at the step the line names."""
    monitor = model_engine.monitor
    write = monitor.write_events
    if monitor.tb_monitor is not None:
        quiet_tensorboards_writer_thread()
    folders = " and ".join(f"{flag} {folder}" for flag, folder in (("--metrics-dir", args.metrics_dir),
                                                                   ("--tensorboard-dir", args.tensorboard_dir)) if folder)

    def write_events(events):
        try:
            write(events)
        except OSError as e:
            monitor.enabled = False  # DeepSpeed's engine writes the learning rate every step while enabled
            monitor.write_events = lambda events: None
            print(f"warning: the monitors cannot write to {folders} ({e.strerror or e}): they are off from step "
                  f"{model_engine.global_steps} on, and training goes on", flush=True)

    monitor.write_events = write_events


def quiet_tensorboards_writer_thread():
    """Leave a write error of TensorBoard's writer thread to the monitors' own line: the thread prints a traceback
    of it, and the next flush in the main thread, at once in DeepSpeed's monitor, raises the same error."""
    from tensorboard.summary.writer import event_file_writer  # loaded by DeepSpeed's monitor, with --tensorboard-dir

    writer_thread = getattr(event_file_writer, "_AsyncWriterThread", ())  # another TensorBoard: its traceback shows
    excepthook = threading.excepthook

    def quiet(args):
        if not (isinstance(args.thread, writer_thread) and issubclass(args.exc_type, OSError)):
            excepthook(args)

    threading.excepthook = quiet


LEVERS = ("balance the router with --moe-aux-loss-coef 0.01 or --noisy-gate-policy RSample, or keep the tokens "
          "with --no-drop-tokens or a higher --capacity-factor and --eval-capacity-factor (docs/moe.md)")


class Router:
    """What each MoE layer's gate did: the tokens it sent each expert (DeepSpeed's exp_counts, before the capacity
    cut), those each expert kept, the capacity, the router's entropy and its aux loss over a log interval; at
    evaluation, the assignments sent and kept.

    DeepSpeed's gate computes these and logs none of them. A forward hook on each gate adds them up on the device,
    the capacity too (the host counts tokens and passes, which it knows), so a step reads nothing back to the host;
    summarize() reads them once per interval.
    """

    def __init__(self, moe_layers):
        self.gates = [layer.deepspeed_moe.gate for layer in moe_layers]
        self.experts = [layer.num_experts for layer in moe_layers]
        self.eval_capacity_factor = self.gates[0].eval_capacity_factor
        self.sent = [torch.zeros(n) for n in self.experts]  # assignments sent to each expert
        self.routed = [torch.zeros(n + 1) for n in self.experts]  # assignments dropped, then kept by each expert
        self.entropy = [torch.zeros(()) for _ in self.gates]  # the router's entropy summed over tokens
        self.aux_loss = [torch.zeros(()) for _ in self.gates]  # summed over passes
        self.capacity = [torch.zeros(()) for _ in self.gates]  # capacity per expert summed over passes
        self.tokens, self.passes = [0] * len(self.gates), [0] * len(self.gates)  # known on the host
        self.tested = torch.zeros(len(self.gates), 2)  # assignments sent and kept at evaluation
        self.ones = {}  # a vector of ones per route count, to count routes with
        for layer, gate in enumerate(self.gates):
            gate.register_forward_hook(functools.partial(self.record, layer))

    @torch.no_grad()
    def record(self, layer, gate, inputs, output):
        """Add one forward pass of a gate: its routes (expert index per choice and token, -1 where dropped).
        Each figure is added in place on the device, one op each: the hook runs at every MoE layer's pass."""
        aux_loss, capacity, _, routes, _, _, sent = output
        if self.tested.device != sent.device:
            self.to(sent.device)
        if not gate.training:
            self.tested[layer] += torch.stack([sent.sum(), (routes >= 0).sum()])
            return
        if routes.numel() not in self.ones:
            self.ones[routes.numel()] = torch.ones(routes.numel(), device=routes.device)
        self.sent[layer] += sent
        self.routed[layer].index_add_(0, routes.flatten() + 1, self.ones[routes.numel()])
        probabilities = F.linear(inputs[0].float(), gate.wg.weight.float()).softmax(dim=1)
        self.entropy[layer].add_(torch.special.entr(probabilities).sum())
        self.aux_loss[layer].add_(aux_loss)
        self.capacity[layer].add_(capacity)  # whole numbers, exact in float32; a device tensor, never read
        self.tokens[layer] += len(probabilities)
        self.passes[layer] += 1

    def to(self, device):
        self.sent, self.routed, self.entropy, self.aux_loss, self.capacity = ([t.to(device) for t in totals] for totals
                                                                              in self.on_the_device())
        self.tested, self.ones = self.tested.to(device), {}

    def on_the_device(self):
        return self.sent, self.routed, self.entropy, self.aux_loss, self.capacity

    def sums_and_counts(self):
        """Per layer: [entropy, aux loss] and [capacity, tokens, passes] summed over the interval, on the device."""
        device = self.capacity[0].device
        sums = [torch.stack([entropy, aux_loss]) for entropy, aux_loss in zip(self.entropy, self.aux_loss)]
        counts = [torch.cat([capacity.view(1), torch.tensor([tokens, passes], dtype=torch.float32, device=device)])
                  for capacity, tokens, passes in zip(self.capacity, self.tokens, self.passes)]
        return sums, counts

    def summarize(self):
        """Each layer's figures over the interval and all ranks: a dict of the share of tokens sent to each expert,
        each expert's fill of its capacity, the share of assignments dropped, the router's mean entropy (nats;
        log(experts) for an even split) and the mean aux loss. Every rank must call it."""
        sums, counts = self.sums_and_counts()
        totals = torch.cat([*self.sent, *self.routed, *sums, *counts])
        dist.all_reduce(totals)
        totals = totals.cpu().double()  # counts are whole numbers: their ratios as exact as the host can
        n, layers = sum(self.experts), len(self.gates)
        sent, routed, sums, counts = totals.split([n, n + layers, 2 * layers, 3 * layers])
        self.reset()
        return [{"shares": (s / s.sum().clamp(min=1)).tolist(), "fills": (r[1:] / capacity.clamp(min=1)).tolist(),
                 "dropped": (r[0] / s.sum().clamp(min=1)).item(), "entropy": (entropy / tokens.clamp(min=1)).item(),
                 "aux_loss": (aux_loss / passes.clamp(min=1)).item()}
                for s, r, (entropy, aux_loss), (capacity, tokens, passes)
                in zip(sent.split(self.experts), routed.split([e + 1 for e in self.experts]), sums.view(-1, 2),
                       counts.view(-1, 3))]

    def summarize_test(self):
        """Each layer's share of assignments dropped at evaluation since the last call, over all ranks."""
        tested = self.tested.clone()
        dist.all_reduce(tested)
        self.tested.zero_()
        return [((sent - kept) / sent.clamp(min=1)).item() for sent, kept in tested.cpu().double()]

    def reset(self):
        for totals in self.on_the_device():
            for total in totals:
                total.zero_()
        self.tokens, self.passes = [0] * len(self.gates), [0] * len(self.gates)

    def state(self):
        sums, counts = self.sums_and_counts()
        return {"sent": [t.tolist() for t in self.sent], "routed": [t.tolist() for t in self.routed],
                "sums": [t.tolist() for t in sums], "counts": [t.tolist() for t in counts]}

    def load_state(self, state):
        for total, saved in zip(self.sent + self.routed, state["sent"] + state["routed"]):
            total.copy_(torch.tensor(saved))
        for layer, ((entropy, aux_loss), (capacity, tokens, passes)) in enumerate(zip(state["sums"], state["counts"])):
            self.entropy[layer].fill_(entropy)
            self.aux_loss[layer].fill_(aux_loss)
            self.capacity[layer].fill_(capacity)
            self.tokens[layer], self.passes[layer] = int(tokens), int(passes)


def percentages(values):
    """`55% 45%`; past 8 values `min 2% median 6% max 14%`, so that 16 experts fit on a line."""
    if len(values) <= 8:
        return " ".join(f"{100 * x:.0f}%" for x in values)
    ordered = sorted(values)
    return f"min {100 * ordered[0]:.0f}% median {100 * statistics.median(ordered):.0f}% max {100 * ordered[-1]:.0f}%"


def router_line(layer, figures, experts):
    """`layer 0: sent 100% 0%, fill 100% 0%, dropped 50.0%, entropy 0.69 of 0.69, aux loss 1.040`."""
    return (f"layer {layer}: sent {percentages(figures['shares'])}, fill {percentages(figures['fills'])}, "
            f"dropped {100 * figures['dropped']:.1f}%, entropy {figures['entropy']:.2f} of {math.log(experts):.2f}, "
            f"aux loss {figures['aux_loss']:.3f}")


def router_warning(layers, drop_warning):
    """One line naming every dead expert (no token over the interval: no gradient) and every layer that dropped
    more than drop_warning % of its assignments, with the levers that help; None where there is none."""
    problems = []
    for layer, figures in enumerate(layers):
        dead = [str(e) for e, share in enumerate(figures["shares"]) if share == 0]
        clauses = []
        if len(dead) == 1:
            clauses.append(f"expert {dead[0]} received no token")
        elif dead:
            named = f" ({', '.join(dead)})" if len(dead) <= 8 else ""
            clauses.append(f"{len(dead)} of {len(figures['shares'])} experts{named} received no token")
        if 100 * figures["dropped"] > drop_warning:
            clauses.append(f"{100 * figures['dropped']:.1f}% of token assignments dropped (over {drop_warning:g}%)")
        if clauses:
            problems.append(f"layer {layer}: {' and '.join(clauses)}")
    return f"warning: {'; '.join(problems)}: {LEVERS}" if problems else None


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
        self.router = self.net.router if args.moe else None
        self.steps, self.bar = [], None

    @contextlib.contextmanager
    def epoch(self, epoch, first=0, interval=None):
        """One epoch from optimizer step `first`, with `interval` (state()) of a mid-epoch checkpoint carried on;
        a bar on rank 0 when its output is a terminal (tqdm's no-op otherwise, so logs get the printed lines)."""
        self.steps = self.restore(interval) if interval else []
        if self.router and not interval:
            self.router.reset()  # an interval ends with its epoch, as the loss lines' do
        epoch_start = self.start_interval()
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
        self.bar.update()

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
        engine, samples = self.engine, self.engine.global_samples
        prefix = batch_label(epoch + 1, step + 1)
        samples_per_sec = (samples - self.interval_samples) / seconds  # after a resume: what this run timed alone
        events = [("Train/Samples/samples_per_sec", samples_per_sec, samples)]
        accelerator = get_accelerator()
        epoch_seconds = self.steps_per_epoch * engine.train_batch_size() / samples_per_sec
        speed = [f"{samples_per_sec:.0f} samples/s", f"{epoch_seconds:.1f} s/epoch",
                 clipping_summary(norms, engine.gradient_clipping()),
                 f"peak {accelerator.device_name()} memory {accelerator.max_memory_allocated() / 2**20:.0f} MiB"]
        lines = [loss_line(epoch + 1, step + 1, sum(losses) / len(losses)),
                 f"{prefix} {', '.join(part for part in speed if part)}"]
        shown = {"samples/s": f"{samples_per_sec:.0f}", "loss": f"{sum(losses) / len(losses):.3f}"}
        if self.router:
            layers = self.router.summarize()
            shown["busiest expert"] = " ".join(f"{100 * max(figures['shares']):.0f}%" for figures in layers)
            for layer, (figures, experts) in enumerate(zip(layers, self.router.experts)):
                lines.append(f"{prefix} expert load: {router_line(layer, figures, experts)}")
                events += [(f"MoE/layer{layer}_expert{e}_{name}", x, samples) for name, values in
                           (("share", figures["shares"]), ("fill", figures["fills"])) for e, x in enumerate(values)]
                events += [(f"MoE/layer{layer}_{name}", figures[name], samples)
                           for name in ("dropped", "entropy", "aux_loss")]
            if warning := router_warning(layers, self.args.drop_warning):
                lines.append(f"{prefix} {warning}")
        if dist.get_rank() == 0:
            with tqdm.external_write_mode(file=sys.stdout):
                print("\n".join(lines), flush=True)
        self.bar.set_postfix(shown)  # the last log line's figures: the bar reads nothing from the device
        engine.monitor.write_events(events)
        self.start_interval()

    def start_interval(self):
        """Start the clock of the throughput line, and its count of samples; returns the time."""
        self.interval_start, self.interval_samples = time.perf_counter(), self.engine.global_samples
        return self.interval_start

    def print_accuracy(self, epoch, class_correct, class_total):
        """`[3] accuracy of the network on the 10000 test images: 61.2 %` after an --eval-every epoch; returns it."""
        accuracy = 100 * sum(class_correct) / sum(class_total)
        if dist.get_rank() == 0:
            print(f"[{epoch + 1}] accuracy of the network on the {sum(class_total)} test images: {accuracy:.1f} %")
        self.engine.monitor.write_events([("Eval/accuracy", accuracy, self.engine.global_samples)])
        if self.router:
            print_test_drops(self.engine, f"[{epoch + 1}] token")
        return accuracy

    def state(self):
        """This rank's part of the interval in progress, for a mid-epoch checkpoint: what the next loss,
        throughput and expert-load lines average."""
        return {"steps": [(samples, loss.item(), None if norm is None else norm.item())
                          for samples, loss, norm in self.steps],
                "router": self.router.state() if self.router else None}

    def restore(self, interval):
        """The steps of a state(), back on the device; the expert load restored in place."""
        if self.router and interval.get("router"):  # a checkpoint of an earlier version has none: the line counts less
            self.router.load_state(interval["router"])
        device = self.engine.device
        return [(samples, torch.tensor(loss, device=device), None if norm is None else torch.tensor(norm, device=device))
                for samples, loss, norm in interval["steps"]]


def print_test_drops(model, start="Token"):
    """After the accuracy lines of a MoE model (an engine's, or a Net as predict.py has it), rank 0 prints each
    layer's share of the test set's token assignments dropped for capacity (`--eval-capacity-factor`, its own
    lever); an engine's monitors get them as Eval/layer<N>_dropped."""
    net = getattr(model, "module", model)
    if not net.moe:
        return
    dropped = net.router.summarize_test()
    if dist.get_rank() == 0:
        print(f"{start} assignments dropped on the test images (eval capacity factor "
              f"{net.router.eval_capacity_factor:g}): " + ", ".join(f"layer {layer} {100 * x:.1f}%"
                                                                   for layer, x in enumerate(dropped)))
    if hasattr(model, "monitor"):
        model.monitor.write_events([(f"Eval/layer{layer}_dropped", x, model.global_samples)
                                    for layer, x in enumerate(dropped)])
