"""--resume into another layout (cifar10ds/universal.py, load_in_this_layout): a checkpoint of one world size,
EP size and ZeRO stage goes on in another, weights, Adam's moments and step, LR schedule and position, as if it
had never moved.

The truth is the saved layout's uninterrupted run. In fp32, with clipping acting at every step, where one
process is the truth (no token dropped, no random gate draws: top-1 without noise), a run cut mid-epoch and
resumed in another layout must equal it within the layout tests' bound (FP32) at the first epoch's end after the
move (4 steps), and at the end of the run (44 steps after the move) be no further from it than the bound or an
uninterrupted run in the new layout is. In fp16, a move at an epoch's end carries the loss scale.
"""

import json
import os
import shutil
import signal
import subprocess

import pytest

import cifar10_deepspeed
from cifar10ds import model_files
from conftest import ROOT, metric, run_command, signal_when
from test_layouts import FP32

STEPS = 20  # optimizer steps an epoch, of 16 samples
MOE = ["--moe", "--num-experts", "4", "--no-drop-tokens", "--moe-param-group"]
LAYOUTS = {  # name: (world size, flags)
    "moe-w4-ep4-zero1": (4, [*MOE, "--ep-world-size", "4", "--stage", "1"]),
    "moe-w2-ep2-zero2-offload": (2, [*MOE, "--ep-world-size", "2", "--stage", "2", "--offload", "cpu"]),
    "moe-w2-ep2-zero0": (2, [*MOE, "--ep-world-size", "2", "--stage", "0"]),
    "moe-w1-zero0": (1, [*MOE, "--stage", "0"]),
    "moe-w4-ep2-zero2": (4, [*MOE, "--ep-world-size", "2", "--stage", "2"]),
    "dense-w2-zero3": (2, ["--stage", "3"]),
    "dense-w1-zero0": (1, ["--stage", "0"]),
}
MOVES = [  # (from, to, the line that names the move)
    ("moe-w4-ep4-zero1", "moe-w2-ep2-zero2-offload", "4 ranks EP 4 ZeRO 1 -> 2 ranks EP 2 ZeRO 2"),
    ("moe-w2-ep2-zero0", "moe-w1-zero0", "2 ranks EP 2 ZeRO 0 -> 1 rank EP 1 ZeRO 0"),
    ("moe-w1-zero0", "moe-w4-ep2-zero2", "1 rank EP 1 ZeRO 0 -> 4 ranks EP 2 ZeRO 2"),
    ("dense-w2-zero3", "dense-w1-zero0", "2 ranks ZeRO 3 -> 1 rank ZeRO 0"),
]
FP16_LAYOUTS = {"moe-w2-ep2-zero1": (2, [*MOE, "--ep-world-size", "2", "--stage", "1"]),
                "moe-w1-zero2": (1, [*MOE, "--stage", "2"])}
CUT = "epoch1-step16"  # mid-epoch, where SIGTERM after step 1 stops a run (preemption.CHECK_EVERY)


def command(tmp, layout, save_dir, *extra, log_interval=STEPS, dtype="fp32"):
    """A launch of the script in `layout` (of LAYOUTS or FP16_LAYOUTS); torchrun, the launcher that starts quickest
    (4 s less than DeepSpeed's on 4 ranks), for several ranks."""
    world, flags = {**LAYOUTS, **FP16_LAYOUTS}[layout]
    launcher = ["python"] if world == 1 else ["torchrun", "--standalone", "--nproc_per_node", str(world)]
    return [*launcher, ROOT / "cifar10_deepspeed.py", "--deepspeed", "--deepspeed_config", tmp / f"{dtype}.json",
            "--dataset", "synthetic", "--synthetic-train-size", str(16 * STEPS), "--synthetic-test-size", "16",
            "--seed", "0", "--dtype", dtype, "-e", "3", "--log-interval", str(log_interval), *flags,
            "--save-dir", tmp / save_dir, *extra]


def write_configs(tmp):
    """The reference's config with clipping acting at every step, as fp32.json; fp16.json also starts the loss scale
    at 2^8 and doubles it every 5 steps without overflow."""
    config = json.loads((ROOT / "ds_config.json").read_text())
    config["gradient_clipping"] = 0.05
    (tmp / "fp32.json").write_text(json.dumps(config))
    config["fp16"].update(initial_scale_power=8, loss_scale_window=5)
    (tmp / "fp16.json").write_text(json.dumps(config))


def weights(folder):
    """The fp32 masters of a checkpoint, experts by global id."""
    return model_files.export(folder, cifar10_deepspeed.Net)["state_dict"]


def distance(a, b):
    return max((a[name] - b[name]).abs().max().item() for name in a)


@pytest.fixture(scope="module")
def moved(tmp_path_factory):
    """Every layout's uninterrupted run; every move's source cut mid-epoch by SIGTERM (the ranks stop at step 16
    of epoch 1); and each cut resumed in the move's target layout."""
    tmp = tmp_path_factory.mktemp("moves")
    write_configs(tmp)
    runs = {}
    for layout in LAYOUTS:
        runs[layout] = run_command(command(tmp, layout, f"{layout}-full"), tmp)
        assert runs[layout].returncode == 0, runs[layout].output[-3000:]
    for source, target, _ in MOVES:
        latest = tmp / f"{source}-mid" / "latest"
        for _ in range(3):  # a signal this machine passed on after step 8's check stops at the epoch's end: cut again
            shutil.rmtree(latest.parent, ignore_errors=True)
            stopped, _ = signal_when(command(tmp, source, latest.parent.name, log_interval=1), tmp,
                                     lambda line: line.startswith("[ 1,     1] loss:"),
                                     lambda launcher, _: os.killpg(launcher.pid, signal.SIGTERM))
            if latest.exists() and latest.read_text() == CUT:
                break
        assert latest.read_text() == CUT, stopped.output[-3000:]
        save_dir = tmp / f"{source}-to-{target}"
        save_dir.mkdir()
        subprocess.run(["cp", "-r", str(latest.parent / CUT), str(save_dir / CUT)], check=True)
        (save_dir / "latest").write_text(CUT)
        runs[source, target] = run_command(command(tmp, target, save_dir.name, "--resume"), tmp)
    return tmp, runs


@pytest.mark.slow
@pytest.mark.parametrize("source, target, line", MOVES, ids=[f"{a}-to-{b}" for a, b, _ in MOVES])
def test_a_run_resumed_in_another_layout_goes_on_as_the_uninterrupted_run(moved, source, target, line):
    tmp, runs = moved
    run = runs[source, target]
    assert run.returncode == 0, run.output[-3000:]
    assert f"Resuming from {tmp / f'{source}-to-{target}' / CUT} at epoch 1, step 17: {line}" in run.output
    assert "Finished Training" in run.output

    full, uninterrupted = tmp / f"{source}-full", tmp / f"{target}-full"
    resumed = tmp / f"{source}-to-{target}"
    assert distance(weights(resumed / "epoch1"), weights(full / "epoch1")) < FP32  # 4 steps after the move
    truth = weights(full / "epoch3")  # 44 steps after the move
    assert distance(weights(resumed / "epoch3"), truth) <= max(FP32, distance(weights(uninterrupted / "epoch3"),
                                                                             truth))


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["a rank's file missing", "a file truncated"])
def test_a_damaged_checkpoint_is_not_moved_and_is_left_as_it_was(moved, damage):
    tmp, _ = moved
    save_dir = tmp / f"damaged-{damage.split()[1]}"
    subprocess.run(["cp", "-r", str(tmp / "moe-w2-ep2-zero0-full"), str(save_dir)], check=True)
    (save_dir / "latest").write_text("epoch1")
    damaged = save_dir / "epoch1" / "expp_rank_1_mp_rank_00_optim_states.pt"
    if damage == "a rank's file missing":
        damaged.unlink()
    else:
        damaged.write_bytes(damaged.read_bytes()[:1000])
    before = sorted(os.listdir(save_dir / "epoch1"))
    run = run_command(command(tmp, "moe-w1-zero0", save_dir.name, "--resume"), tmp)
    assert run.returncode == 1 and "Traceback" not in run.output, run.output[-3000:]
    errors = [line for line in run.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and str(damaged) in errors[0], run.output[-3000:]
    assert sorted(os.listdir(save_dir / "epoch1")) == before and (save_dir / "latest").read_text() == "epoch1"


@pytest.fixture(scope="module")
def fp16_moved(tmp_path_factory):
    """fp16 on 2 ranks EP 2 ZeRO 1, its loss scale starting at 2^8 and doubling every 5 steps without overflow, cut
    at the end of epoch 1 and resumed on 1 rank at ZeRO 2."""
    tmp = tmp_path_factory.mktemp("fp16-moves")
    write_configs(tmp)
    full = run_command(command(tmp, "moe-w2-ep2-zero1", "full", "--metrics-dir", tmp / "full-metrics",
                               dtype="fp16"), tmp)
    assert full.returncode == 0, full.output[-3000:]
    (tmp / "moved").mkdir()
    subprocess.run(["cp", "-r", str(tmp / "full" / "epoch1"), str(tmp / "moved" / "epoch1")], check=True)
    (tmp / "moved" / "latest").write_text("epoch1")
    resumed = run_command(command(tmp, "moe-w1-zero2", "moved", "--resume", "--metrics-dir", tmp / "moved-metrics",
                                  dtype="fp16"), tmp)
    return tmp, resumed


@pytest.mark.slow
def test_a_move_in_fp16_carries_the_loss_scale(fp16_moved):
    tmp, resumed = fp16_moved
    assert resumed.returncode == 0, resumed.output[-3000:]
    assert (f"Resuming from {tmp / 'moved' / 'epoch1'} at epoch 2: 2 ranks EP 2 ZeRO 1 -> 1 rank EP 1 ZeRO 2"
            in resumed.output)
    saved, moved_on = (metric(tmp / f"{run}-metrics", "Train_Samples_loss_scale") for run in ("full", "moved"))
    cut = 16 * STEPS
    assert saved[cut] >= 2 ** 10  # grown from the 2^8 a fresh start has
    after = [step for step in moved_on if step > cut][:5]
    assert len(after) == 5 and [moved_on[step] for step in after] == [saved[step] for step in after]
