"""cifar10ds/metrics.py: the reference's printed lines, to the character (../shared/REFERENCE.md gives each with
a worked example); the expert load; throughput and gradient norms on the log lines; DeepSpeed's CSV and
TensorBoard monitors holding every series and the printed values; the live bar in a terminal."""

import csv
import fcntl
import json
import math
import os
import pty
import re
import struct
import subprocess
import sys
import termios

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cifar10_deepspeed import Net
from cifar10ds import metrics
from cifar10ds.data import CLASSES
from cifar10ds.metrics import accuracy_lines, loss_line
import plot_metrics
from conftest import ROOT, finish, metric, start


@pytest.mark.parametrize("epoch, batch, loss, line", [
    (1, 2000, 2.3041, "[ 1,  2000] loss:  2.304"),
    (12, 100, 0.5, "[ 12,   100] loss:  0.500"),
    (1, 50, 2.3084, "[ 1,    50] loss:  2.308"),
    (30, 3125, 0.0004, "[ 30,  3125] loss:  0.000"),  # the last batch of an epoch of CIFAR-10 on one rank
])
def test_loss_line(epoch, batch, loss, line):
    assert loss_line(epoch, batch, loss) == line


def counts(**per_class):
    """(correct, total) per class, in CLASSES order, from name=(correct, total); other classes 0 of 0."""
    pairs = [per_class.get(name, (0, 0)) for name in CLASSES]
    return [c for c, _ in pairs], [t for _, t in pairs]


def test_accuracy_lines_of_the_worked_example():
    others = {name: (1227, 1400) for name in ("bird", "cat", "deer", "dog", "frog", "ship")}
    correct, total = counts(plane=(71, 100), car=(0, 100), horse=(50, 100), truck=(1228, 1300), **others)
    assert (sum(correct), sum(total)) == (8711, 10000)
    lines = accuracy_lines(correct, total)
    assert lines[0] == "Accuracy of the network on the 10000 test images:  87 %"
    assert lines[1] == "Accuracy of plane :  71 %"
    assert lines[2] == "Accuracy of   car :  0 %"
    assert lines[8] == "Accuracy of horse :  50 %"
    assert len(lines) == 11


@pytest.mark.parametrize("right, of, printed", [
    (7, 8, " 88"),  # 87.5 %: half to even rounds up to 88
    (23, 200, " 12"),  # 11.5 %: up to 12
    (1, 8, " 12"),  # 12.5 %: down to 12
    (0, 5, " 0"),
    (5, 5, " 100"),
    (2, 3, " 67"),  # 66.7 %: rounded, where flooring would give 66
])
def test_accuracy_is_rounded_half_to_even_with_a_sign_space(right, of, printed):
    lines = accuracy_lines(*counts(plane=(right, of)))
    assert lines[0] == f"Accuracy of the network on the {of} test images: {printed} %"
    assert lines[1] == f"Accuracy of plane : {printed} %"


def test_class_names_are_right_aligned_in_five_characters():
    lines = accuracy_lines(*counts(**{name: (1, 2) for name in CLASSES}))
    assert lines[1:] == ["Accuracy of plane :  50 %", "Accuracy of   car :  50 %", "Accuracy of  bird :  50 %",
                         "Accuracy of   cat :  50 %", "Accuracy of  deer :  50 %", "Accuracy of   dog :  50 %",
                         "Accuracy of  frog :  50 %", "Accuracy of horse :  50 %", "Accuracy of  ship :  50 %",
                         "Accuracy of truck :  50 %"]


# The router's figures
def gate_pass(router, layer, routes, sent, capacity, aux_loss, tokens=4):
    """One forward pass of a layer's gate as the router's hook sees it: routes per choice and token (-1 where
    dropped), the tokens sent to each expert before the capacity cut, the capacity per expert."""
    gate = router.gates[layer]
    output = (torch.tensor(aux_loss), torch.tensor(capacity), len(sent), torch.tensor(routes, dtype=torch.int32),
              None, None, torch.tensor(sent))
    router.record(layer, gate, (torch.ones(tokens, 84),), output)


@pytest.fixture
def router(parse):
    net = Net(parse("--moe", "--num-experts", "2", "16"))
    for layer in net.moe_layer_list:
        torch.nn.init.zeros_(layer.deepspeed_moe.gate.wg.weight)  # every expert equally likely: entropy log(n)
    return net.router


def test_the_router_sums_what_each_gate_sent_kept_and_dropped(single_rank_group, router):
    gate_pass(router, 0, [[0, 0, -1, 1]], sent=[3, 1], capacity=2, aux_loss=1.0)  # the third token dropped
    gate_pass(router, 0, [[1, 1, 0, -1]], sent=[1, 3], capacity=2, aux_loss=3.0)
    gate_pass(router, 1, [[0, 1, 2, 3], [4, 5, -1, -1]], sent=[1] * 6 + [2] + [0] * 9, capacity=1, aux_loss=2.0)
    layers = router.summarize()
    assert layers[0] == {"shares": [0.5, 0.5], "fills": [0.75, 0.75], "dropped": 0.25,
                         "entropy": pytest.approx(math.log(2)), "aux_loss": 2.0}
    assert layers[1]["shares"] == [0.125] * 6 + [0.25] + [0.0] * 9
    assert layers[1]["fills"] == [1.0] * 6 + [0.0] * 10 and layers[1]["dropped"] == 0.25  # 2 of 8 assignments
    assert layers[1]["entropy"] == pytest.approx(math.log(16))
    assert all(t.sum() == 0 for totals in router.on_the_device() for t in totals)
    assert router.tokens == router.passes == [0, 0]
    assert router.summarize_test() == [0.0, 0.0]  # nothing evaluated


def test_an_interval_saved_mid_way_sums_on_after_loading_to_the_same_figures(single_rank_group, router, parse):
    """A mid-epoch checkpoint carries the router's interval in progress, the counts the host keeps included."""
    gate_pass(router, 0, [[0, 0, -1, 1]], sent=[3, 1], capacity=2, aux_loss=1.0)
    gate_pass(router, 1, [[0, 1, 2, 3], [4, 5, -1, -1]], sent=[1] * 6 + [2] + [0] * 9, capacity=1, aux_loss=2.0)
    resumed = Net(parse("--moe", "--num-experts", "2", "16")).router
    for gate, saved in zip(resumed.gates, router.gates):
        gate.load_state_dict(saved.state_dict())  # the same weights: the same entropy
    resumed.load_state(json.loads(json.dumps(router.state())))  # as checkpoints.client_state stores it
    for each in (router, resumed):
        gate_pass(each, 0, [[1, 1, 0, -1]], sent=[1, 3], capacity=2, aux_loss=3.0, tokens=8)
    assert resumed.summarize() == router.summarize()
    assert [each.summarize()[0]["aux_loss"] for each in (router, resumed)] == [0.0, 0.0]  # both start anew


def test_evaluation_counts_apart_from_training(single_rank_group, router):
    router.gates[0].eval()
    gate_pass(router, 0, [[0, 0, -1, -1]], sent=[4, 0], capacity=2, aux_loss=1.0)
    assert router.sent[0].sum() == 0 and router.summarize_test() == [0.5, 0.0]
    assert router.summarize_test() == [0.0, 0.0]  # read once


def test_the_aux_loss_over_two_ranks_is_the_mean_of_every_ranks_passes(single_rank_group, router, monkeypatch):
    """Two ranks that saw the same passes: the figures are one rank's; the aux loss is summed over the ranks'
    passes, so it must be divided by all their passes, or 2 ranks would show twice the truth."""
    gate_pass(router, 0, [[0, 0, 1, -1]], sent=[3, 1], capacity=2, aux_loss=1.5)
    monkeypatch.setattr(metrics.dist, "all_reduce", lambda tensor: tensor.mul_(2))  # a twin rank's sum
    layer = router.summarize()[0]
    assert (layer["shares"], layer["fills"], layer["dropped"], layer["aux_loss"]) == ([0.75, 0.25], [1.0, 0.5],
                                                                                        0.25, 1.5)


def test_router_lines_stay_short_past_8_experts():
    two = {"shares": [1.0, 0.0], "fills": [1.0, 0.0], "dropped": 0.5, "entropy": 0.6912, "aux_loss": 1.04}
    assert metrics.router_line(0, two, 2) == ("layer 0: sent 100% 0%, fill 100% 0%, dropped 50.0%, entropy 0.69 of "
                                              "0.69, aux loss 1.040")
    sixteen = {"shares": [0.02] * 8 + [0.06] * 4 + [0.14] * 4, "fills": [0.5] * 16, "dropped": 0.073,
               "entropy": 2.7, "aux_loss": 1.013}
    assert metrics.router_line(1, sixteen, 16) == (
        "layer 1: sent min 2% median 4% max 14%, fill min 50% median 50% max 50%, dropped 7.3%, entropy 2.70 of "
        "2.77, aux loss 1.013")


def test_a_dead_or_drowning_expert_is_named_with_its_levers():
    def figures(shares, dropped):
        return {"shares": shares, "fills": shares, "dropped": dropped, "entropy": 0.5, "aux_loss": 1.0}

    assert metrics.router_warning([figures([0.5, 0.5], 0.25)], 25) is None  # at the threshold: no warning
    warning = metrics.router_warning([figures([1.0, 0.0], 0.5), figures([0.5, 0.5], 0.3)], 25)
    assert warning == ("warning: layer 0: expert 1 received no token and 50.0% of token assignments dropped (over "
                       "25%); layer 1: 30.0% of token assignments dropped (over 25%): " + metrics.LEVERS)
    many = metrics.router_warning([figures([0.5] * 2 + [0.0] * 14, 0.0), figures([0.5, 0, 0.5, 0], 0.0)], 25)
    assert many.startswith("warning: layer 0: 14 of 16 experts received no token; layer 1: 2 of 4 experts (1, 3) "
                           "received no token: ")


# A run's lines and monitors
@pytest.mark.slow
def test_moe_run_shows_expert_load_and_throughput_and_writes_metrics(launch, script, root, tmp_path):
    metrics_dir = tmp_path / "metrics"
    run = launch("python", script, "--deepspeed", "--dataset", "synthetic", "--log-interval", "100", "--seed", "0",
                 "--dtype", "fp32", "-e", "2", "--moe", "--num-experts",
                 "2", "--moe-aux-loss-coef", "0.01", "--eval-every", "1",
                 "--metrics-dir", metrics_dir)
    run.assert_launched()
    lines = run.output.splitlines()
    loads = [re.match(r"^\[ \d,  +\d+\] expert load: layer 0: sent (\d+)% (\d+)%, fill \d+% \d+%, dropped [\d.]+%, "
                      r"entropy [\d.]+ of 0\.69, aux loss [\d.]+$", line) for line in lines]
    loads = [m for m in loads if m]
    speeds = [re.match(r"^\[ \d,  +\d+\] \d+ samples/s, [\d.]+ s/epoch, grad norm (\d\.\d{3}), clipped at 1\.0 in "
                       r"(\d+) of 100 steps, peak cpu memory \d+ MiB$", line) for line in lines]
    speeds = [m for m in speeds if m]
    assert len(loads) == len(speeds) == len(run.losses()) == 6  # one of each per log interval
    assert all(99 <= int(m.group(1)) + int(m.group(2)) <= 101 for m in loads)
    # The aux loss balances the router over the run: one interval swings with the CPU's rounding (the last one
    # was 19% 81% on one AMD EPYC and within 70% on another), the mean of the busiest expert's shares does not.
    assert sum(max(int(m.group(1)), int(m.group(2))) for m in loads) / len(loads) <= 70
    assert re.search(r"^\[1\] accuracy of the network on the 1000 test images: [\d.]+ %$", run.output, re.M)
    assert "[2] accuracy" not in run.output  # the last epoch's evaluation is the reference's final test

    folder = metrics_dir / "cifar10"
    rows = lambda name: list(csv.reader(open(folder / f"{name}.csv")))[1:]
    assert len(rows("Train_Samples_train_loss")) == len(rows("Train_Samples_lr")) == 626  # every step
    norms = [float(norm) for _, norm in rows("Train_Samples_grad_norm")]  # every step, before clipping
    intervals = [norms[i:i + 100] for i in (0, 100, 200, 313, 413, 513)]  # the epoch's last 13 steps are in no line
    assert [(f"{sum(n) / 100:.3f}", str(sum(x > 1.0 for x in n))) for n in intervals] == [m.groups() for m in speeds]
    assert len(rows("Train_Samples_samples_per_sec")) == len(rows("MoE_layer0_expert1_share")) == 6
    assert len(rows("MoE_layer0_aux_loss")) == len(rows("MoE_layer0_dropped")) == len(rows("MoE_layer0_entropy")) == 6
    assert len(rows("MoE_layer0_expert1_fill")) == 6 and len(rows("Eval_layer0_dropped")) == 2
    assert f"{float(rows('Eval_accuracy')[-1][1]):.0f}" == str(run.accuracy())  # the final test, as printed (rounded)
    assert len(rows("Eval_accuracy")) == 2 and len(rows("Train_Epoch_seconds")) == 2

    png = tmp_path / "metrics.png"
    plot = subprocess.run([sys.executable, root / "plot_metrics.py", metrics_dir, "-o", png], capture_output=True, text=True,
                          timeout=120)
    assert plot.returncode == 0, plot.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20000


def independent_figures(counts):
    """A layer's figures over one log interval, from count_routes.py's counts."""
    sent, kept, capacity = counts["sent"], counts["kept"], counts["capacity"]
    return {"shares": [x / sum(sent) for x in sent], "fills": [x / capacity for x in kept],
            "dropped": (sum(sent) - sum(kept)) / sum(sent), "entropy": counts["entropy"] / counts["tokens"],
            "aux_loss": counts["aux_loss"] / counts["passes"]}


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_the_routers_figures_equal_an_independent_count_of_the_gates_routes(launch, root, tmp_path, world):
    """With EP over every rank, top-1 and top-2 (the reference's gate: no noise, capacity factor 1, where the
    router collapses and drops), and top-1 without dropping: each log interval's printed and monitored figures
    and the test set's drop share are those of DeepSpeed's own dense dispatch masks, summed over the ranks; every
    interval with a dead expert or a drop over 25% warns once, naming them."""
    run = launch("deepspeed", "--num_gpus", str(world), root / "tests" / "count_routes.py", "--report",
                 tmp_path / "counts.json", "--metrics-dir", tmp_path / "metrics")
    assert run.returncode == 0, run.output[-3000:]
    report = json.loads((tmp_path / "counts.json").read_text())
    outputs = dict(re.findall(r"^run (.+)\n((?:(?!run ).*\n)*)", run.output, re.M))
    for name, readings in report.items():
        intervals = [[independent_figures(layer) for layer in reading] for reading in readings["train"]]
        assert len(intervals) == 4, name  # 2 epochs of 2 intervals
        monitors = tmp_path / "metrics" / name
        for layer in range(2):
            series = lambda figure: list(metric(monitors, f"MoE_layer{layer}_{figure}").values())
            for figure in ("dropped", "entropy", "aux_loss"):
                assert series(figure) == pytest.approx([i[layer][figure] for i in intervals], rel=1e-5, abs=1e-7)
            for figure in ("share", "fill"):
                experts = len(intervals[0][layer][f"{figure}s"])
                assert [list(metric(monitors, f"MoE_layer{layer}_expert{e}_{figure}").values())
                        for e in range(experts)] == [pytest.approx([i[layer][f"{figure}s"][e] for i in intervals],
                                                                   abs=1e-7) for e in range(experts)]
        output = outputs[name]
        lines = [line.split("] expert load: ", 1)[1] for line in output.splitlines() if "] expert load: " in line]
        assert lines == [metrics.router_line(layer, figures, len(figures["shares"]))
                         for interval in intervals for layer, figures in enumerate(interval)]
        warnings = [line.split("] ", 1)[1] for line in output.splitlines() if "] warning: " in line]
        assert warnings == [w for i in intervals if (w := metrics.router_warning(i, 25))], name
        tested = [[(layer["sent"] - layer["kept"]) / layer["sent"] for layer in reading]
                  for reading in readings["test"]]
        assert [list(metric(monitors, f"Eval_layer{layer}_dropped").values()) for layer in range(2)] == [
            pytest.approx([t[layer] for t in tested], abs=1e-7) for layer in range(2)]
        assert printed(r"^(?:\[1\] token|Token) assignments dropped on the test images \(eval capacity factor 1\): "
                       r"layer 0 ([\d.]+)%, layer 1 ([\d.]+)%$", output) == [
            tuple(f"{100 * x:.1f}" for x in t) for t in tested]
        assert output.index("Accuracy of truck") < output.index("Token assignments dropped")  # after the reference's
    drops = {name: [independent_figures(layer)["dropped"] for reading in readings["train"] for layer in reading]
             for name, readings in report.items()}
    assert min(drops["top-1"]) > 0.25 and max(drops["top-2"]) > 0 and drops["top-1 no drop"] == [0.0] * 8
    assert "received no token" in outputs["top-1"]  # the reference's router collapses


SYNTHETIC = ["--deepspeed", "--dataset", "synthetic", "--seed", "0", "--synthetic-train-size", "800",
             "--synthetic-test-size", "200", "--log-interval", "10"]

MOE = ["--moe", "--num-experts", "2", "--noisy-gate-policy", "RSample", "--moe-aux-loss-coef", "0.01"]


def scalars(folder):
    """Every scalar series in a TensorBoard run folder, read with TensorBoard's own reader: {tag: [(step, value)]}.

    All event files are read in order, and nothing is dropped: a resumed run that wrote a step again would show.
    """
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0}, purge_orphaned_data=False)
    events.Reload()
    return {tag: [(event.step, event.value) for event in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def printed(pattern, output):
    return [match.groups() for match in re.finditer(pattern, output, re.M)]


@pytest.mark.slow
def test_tensorboard_holds_every_csv_series_and_the_printed_values(launch, script, tmp_path):
    run = launch("python", script, *SYNTHETIC, "--dtype", "fp16", "-e", "2", "--eval-every", "1", *MOE,
                 "--metrics-dir", tmp_path / "csv", "--tensorboard-dir", tmp_path / "tb")
    assert run.returncode == 0, run.output[-3000:]
    board = scalars(tmp_path / "tb" / "cifar10")
    table = {path.stem: list(metric(tmp_path / "csv", path.stem).items())
             for path in (tmp_path / "csv" / "cifar10").glob("*.csv")}
    assert {tag.replace("/", "_") for tag in board} == set(table)  # the same series as the CSV monitor writes
    assert {"Train/Samples/train_loss", "Train/Samples/lr", "Train/Samples/loss_scale", "Train/Samples/samples_per_sec",
            "MoE/layer0_expert0_share", "MoE/layer0_expert1_share", "MoE/layer0_aux_loss", "MoE/layer0_dropped",
            "MoE/layer0_expert1_fill", "MoE/layer0_entropy", "Eval/layer0_dropped", "Train/Epoch/seconds",
            "Eval/accuracy", "Train/Samples/grad_norm"} <= set(board)
    for tag, points in board.items():
        steps, values = zip(*points)
        csv_steps, csv_values = zip(*table[tag.replace("/", "_")])
        assert steps == csv_steps, tag
        assert values == pytest.approx(csv_values, rel=1e-6), tag  # TensorBoard keeps float32

    losses = [value for _, value in board["Train/Samples/train_loss"]]
    assert len(losses) == 100 and [step for step, _ in board["Train/Samples/train_loss"]] == list(range(16, 1601, 16))
    means = [(f"{sum(losses[i:i + 10]) / 10: .3f}",) for i in range(0, 100, 10)]  # a loss line per 10 steps
    assert printed(r"^\[ \d,  +\d+\] loss: ( \d\.\d{3})$", run.output) == means
    norms = [value for _, value in board["Train/Samples/grad_norm"]]  # every step's norm before clipping, as printed
    assert [(f"{sum(norms[i:i + 10]) / 10:.3f}",) for i in range(0, 100, 10)] == printed(
        r"^\[ \d,  +\d+\] \d+ samples/s, [\d.]+ s/epoch, grad norm (\d\.\d{3}), clipped at 1\.0 in \d+ of 10 steps, ", run.output)
    assert [f"{value:.0f}" for _, value in board["Train/Samples/samples_per_sec"]] == [
        speed for speed, in printed(r"^\[ \d,  +\d+\] (\d+) samples/s, ", run.output)]
    shares = zip(board["MoE/layer0_expert0_share"], board["MoE/layer0_expert1_share"], board["MoE/layer0_dropped"],
                 board["MoE/layer0_aux_loss"])
    lines = printed(r"^\[ \d,  +\d+\] expert load: layer 0: sent (\d+)% (\d+)%, .*, dropped ([\d.]+)%, .*, "
                    r"aux loss ([\d.]+)$", run.output)
    assert len(lines) == 10
    for ((_, a), (_, b), (_, dropped), (_, aux)), line in zip(shares, lines):  # each printed value is the board's,
        board_values = (100 * a, 100 * b, 100 * dropped, aux)  # rounded; float32 may sit either side of a tie
        for value, shown, half in zip(board_values, map(float, line), (0.5, 0.5, 0.05, 0.0005)):
            assert abs(value - shown) <= half * (1 + 1e-5), (board_values, line)
    accuracy = [value for _, value in board["Eval/accuracy"]]
    assert printed(r"^\[1\] accuracy of the network on the 200 test images: ([\d.]+) %$", run.output) == [
        (f"{accuracy[0]:.1f}",)]
    assert f"{accuracy[1]:.0f}" == str(run.accuracy())
    assert [step for step, _ in board["Train/Epoch/seconds"]] == [1, 2]


@pytest.mark.slow
def test_a_resumed_run_continues_the_tensorboard_series(launch, script, tmp_path):
    cmd = ["python", script, *SYNTHETIC, "--dtype", "fp32", "--save-dir", tmp_path / "ckpt",
           "--tensorboard-dir", tmp_path / "tb"]
    first = launch(*cmd, "-e", "1")
    resumed = launch(*cmd, "-e", "2", "--resume")
    assert first.returncode == 0 and resumed.returncode == 0, resumed.output[-3000:]
    board = scalars(tmp_path / "tb" / "cifar10")
    assert len(list((tmp_path / "tb" / "cifar10").glob("events.out.tfevents.*"))) == 2  # one file per run
    for tag in ("Train/Samples/train_loss", "Train/Samples/lr"):
        assert [step for step, _ in board[tag]] == list(range(16, 1601, 16)), tag  # no step lost, none twice
    assert [step for step, _ in board["Train/Epoch/seconds"]] == [1, 2]
    assert len(board["Train/Samples/samples_per_sec"]) == 10


@pytest.mark.slow
def test_a_full_disk_under_the_monitors_turns_them_off_in_one_line_and_training_goes_on(launch, script, small_disk,
                                                                                         tmp_path):
    """The monitors' disk holds 64 KiB, for real (a tmpfs), and fills in the run: one line says so and from which
    step, with no traceback (TensorBoard's writer thread's neither); training, its lines and its checkpoints (on
    another disk) go on to the end. The CSV series end at that step, and plot_metrics.py draws them."""
    small_disk.fill(leave=64 * 1024)
    csv_dir, tb_dir = small_disk.path / "csv", small_disk.path / "tb"
    run = launch("python", script, *SYNTHETIC, "--dtype", "fp32", "-e", "2", "--synthetic-train-size", "6400",
                 "--metrics-dir", csv_dir, "--tensorboard-dir", tb_dir, "--save-dir", tmp_path / "ckpt")
    assert run.returncode == 0 and "Traceback" not in run.output, run.output[-3000:]
    warnings = [line for line in run.output.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, run.output[-3000:]
    off = re.fullmatch(rf"warning: the monitors cannot write to --metrics-dir {csv_dir} and --tensorboard-dir "
                       rf"{tb_dir} \(No space left on device\): they are off from step (\d+) on, and training goes on",
                       warnings[0])
    assert off and int(off[1]) < 800, warnings  # 400 steps an epoch
    assert "[ 2,   400] loss:" in run.output and "Finished Training" in run.output
    assert (tmp_path / "ckpt" / "latest").read_text() == "epoch2"
    samples, _ = plot_metrics.read_csv(csv_dir / "cifar10" / "Train_Samples_lr.csv")
    assert 16 * (int(off[1]) - 1) <= samples[-1] <= 16 * int(off[1])
    plotted = subprocess.run([sys.executable, ROOT / "plot_metrics.py", csv_dir, "-o", tmp_path / "metrics.png"],
                             capture_output=True, text=True)
    assert plotted.returncode == 0 and (tmp_path / "metrics.png").exists(), plotted.stderr


def run_in_terminal(cmd, cwd):
    """Run `cmd` with its standard output on a pseudo-terminal of 40 x 120; return what it wrote there."""
    master, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = start(cmd, cwd, stdout=terminal, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    os.close(terminal)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # the terminal's last writer has gone
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    finish(proc, timeout=300)
    assert proc.returncode == 0, b"".join(chunks).decode()[-3000:]
    return b"".join(chunks).decode()


def screen_lines(output):
    """The lines a terminal shows for `output`: each carriage return goes back to the line's start, to be
    written over; trailing blanks dropped."""
    lines = []
    for raw in output.replace("\r\n", "\n").split("\n"):
        line = ""
        for part in raw.split("\r"):
            line = part + line[len(part):]
        lines.append(line.rstrip())
    return lines


def script_lines(lines):
    """The script's own lines, with the measured numbers (speed, time, memory) blanked."""
    own = [line for line in lines if line.startswith(("[ ", "Accuracy of", "Finished Training"))]
    return [re.sub(r"\] \d+ samples/s, [\d.]+ s/epoch, .* peak cpu memory \d+ MiB$", "] N samples/s", line)
            for line in own]


@pytest.mark.slow
def test_the_bar_advances_in_a_terminal_and_the_printed_lines_stay_as_they_are(script, tmp_path):
    cmd = ["python", script, *SYNTHETIC, "--dtype", "fp32", "-e", "2", *MOE]
    shown = run_in_terminal(cmd, tmp_path)
    bars = re.findall(r"\repoch (\d): +\d+%\|[^|]*\| +(\d+)/50 \[[^\]]*\]", shown)
    for epoch in ("1", "2"):
        counts = [int(n) for e, n in bars if e == epoch]
        assert len(set(counts)) >= 3 and counts == sorted(counts) and counts[-1] == 50, bars
    assert re.search(r"samples/s=\d+, loss=\d\.\d{3}, busiest expert=\d+%\]", shown)

    proc = start(cmd, tmp_path, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    piped = finish(proc, timeout=300)[0]
    assert proc.returncode == 0 and "\r" not in piped and "\x1b" not in piped
    assert "epoch 1:" not in piped
    assert script_lines(screen_lines(shown)) == script_lines(piped.splitlines())
    assert len(script_lines(piped.splitlines())) == 3 * 10 + 1 + 11  # loss, speed, load; finished; test


@pytest.mark.slow
def test_no_progress_keeps_the_terminal_free_of_the_bar(script, tmp_path):
    shown = run_in_terminal(["python", script, *SYNTHETIC, "--dtype", "fp32", "-e", "1", "--no-progress"], tmp_path)
    assert "epoch 1:" not in shown and "\r" not in shown.replace("\r\n", "\n")
    assert len(script_lines(screen_lines(shown))) == 2 * 5 + 1 + 11
