"""Watching a run: DeepSpeed's TensorBoard monitor, and the live progress bar in a terminal."""

import fcntl
import os
import pty
import re
import struct
import subprocess
import termios

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import finish, metric, start

pytestmark = pytest.mark.slow

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


def test_tensorboard_holds_every_csv_series_and_the_printed_values(launch, script, tmp_path):
    run = launch("python", script, *SYNTHETIC, "--dtype", "fp16", "-e", "2", "--eval-every", "1", *MOE,
                 "--metrics-dir", tmp_path / "csv", "--tensorboard-dir", tmp_path / "tb")
    assert run.returncode == 0, run.output[-3000:]
    board = scalars(tmp_path / "tb" / "cifar10")
    table = {path.stem: list(metric(tmp_path / "csv", path.stem).items())
             for path in (tmp_path / "csv" / "cifar10").glob("*.csv")}
    assert {tag.replace("/", "_") for tag in board} == set(table)  # the same series as the CSV monitor writes
    assert {"Train/Samples/train_loss", "Train/Samples/lr", "Train/Samples/loss_scale", "Train/Samples/samples_per_sec",
            "MoE/layer0_expert0_share", "MoE/layer0_expert1_share", "MoE/layer0_aux_loss", "Train/Epoch/seconds",
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
    shares = zip(board["MoE/layer0_expert0_share"], board["MoE/layer0_expert1_share"], board["MoE/layer0_aux_loss"])
    assert [(f"{100 * a:.0f}", f"{100 * b:.0f}", f"{aux:.3f}") for (_, a), (_, b), (_, aux) in shares] == printed(
        r"^\[ \d,  +\d+\] expert load: layer 0: (\d+)% (\d+)%, aux loss ([\d.]+)$", run.output)
    accuracy = [value for _, value in board["Eval/accuracy"]]
    assert printed(r"^\[1\] accuracy of the network on the 200 test images: ([\d.]+) %$", run.output) == [
        (f"{accuracy[0]:.1f}",)]
    assert f"{accuracy[1]:.0f}" == str(run.accuracy())
    assert [step for step, _ in board["Train/Epoch/seconds"]] == [1, 2]


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


def test_the_bar_advances_in_a_terminal_and_the_printed_lines_stay_as_they_are(script, tmp_path, op_cache):
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


def test_no_progress_keeps_the_terminal_free_of_the_bar(script, tmp_path, op_cache):
    shown = run_in_terminal(["python", script, *SYNTHETIC, "--dtype", "fp32", "-e", "1", "--no-progress"], tmp_path)
    assert "epoch 1:" not in shown and "\r" not in shown.replace("\r\n", "\n")
    assert len(script_lines(screen_lines(shown))) == 2 * 5 + 1 + 11
