"""--resume into another layout (cifar10ds/checkpoints.py, load_in_this_layout): a checkpoint of one world size,
EP size and ZeRO stage goes on in another, weights, Adam's moments and step, LR schedule and position, as if it
had never moved.

The truth is the saved layout's uninterrupted run. In fp32, with clipping acting at every step, where one
process is the truth (no token dropped, no random gate draws: top-1 without noise), a run cut at the end of
epoch 1 or mid-epoch and resumed in another layout must equal it within the layout tests' bound (FP32) at the
first epoch's end after the move (10 or 20 steps), and at the end of the run (40 or 50 steps after the move) be
no further from it than the bound or an uninterrupted run in the new layout is.
"""

import json
import os
import signal
import subprocess

import pytest

import cifar10_deepspeed
from cifar10ds import model_files
from conftest import ROOT, run_command, signal_when
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
CUTS = {"end of epoch 1": "epoch1", "mid-epoch": "epoch1-step10"}


def command(tmp, layout, save_dir, *extra, log_interval=STEPS):
    """A launch of the script in `layout`; torchrun, the launcher that starts quickest (4 s less than DeepSpeed's
    on 4 ranks), for several ranks."""
    world, flags = LAYOUTS[layout]
    launcher = ["python"] if world == 1 else ["torchrun", "--standalone", "--nproc_per_node", str(world)]
    return [*launcher, ROOT / "cifar10_deepspeed.py", "--deepspeed", "--deepspeed_config", tmp / "clipping.json",
            "--dataset", "synthetic", "--synthetic-train-size", str(16 * STEPS), "--synthetic-test-size", "16",
            "--seed", "0", "--dtype", "fp32", "-e", "3", "--log-interval", str(log_interval), *flags,
            "--save-dir", tmp / save_dir, *extra]


def weights(folder):
    """The fp32 masters of a checkpoint, experts by global id."""
    return model_files.export(folder, cifar10_deepspeed.Net)["state_dict"]


def distance(a, b):
    return max((a[name] - b[name]).abs().max().item() for name in a)


@pytest.fixture(scope="module")
def moved(tmp_path_factory):
    """Every layout's uninterrupted run; every move's source cut mid-epoch by SIGTERM (the ranks agree at step 10
    of epoch 1); and each cut resumed in the move's target layout."""
    tmp = tmp_path_factory.mktemp("moves")
    config = json.loads((ROOT / "ds_config.json").read_text())
    (tmp / "clipping.json").write_text(json.dumps({**config, "gradient_clipping": 0.05}))  # acts at every step
    runs = {}
    for layout in LAYOUTS:
        runs[layout] = run_command(command(tmp, layout, f"{layout}-full"), tmp)
        assert runs[layout].returncode == 0, runs[layout].output[-3000:]
    for source, target, _ in MOVES:
        stopped, _ = signal_when(command(tmp, source, f"{source}-mid", log_interval=1), tmp,
                                 lambda line: line.startswith("[ 1,     1] loss:"),
                                 lambda launcher, _: os.killpg(launcher.pid, signal.SIGTERM))
        assert (tmp / f"{source}-mid" / "latest").read_text() == "epoch1-step10", stopped.output[-3000:]
        for cut, tag in CUTS.items():
            save_dir = tmp / f"{source}-to-{target}-{tag}"
            copied = tmp / (f"{source}-full" if tag == "epoch1" else f"{source}-mid") / tag
            save_dir.mkdir()
            subprocess.run(["cp", "-r", str(copied), str(save_dir / tag)], check=True)
            (save_dir / "latest").write_text(tag)
            runs[source, target, cut] = run_command(command(tmp, target, save_dir.name, "--resume"), tmp)
    return tmp, runs


@pytest.mark.slow
@pytest.mark.parametrize("cut", CUTS)
@pytest.mark.parametrize("source, target, line", MOVES, ids=[f"{a}-to-{b}" for a, b, _ in MOVES])
def test_a_run_resumed_in_another_layout_goes_on_as_the_uninterrupted_run(moved, source, target, line, cut):
    tmp, runs = moved
    run = runs[source, target, cut]
    assert run.returncode == 0, run.output[-3000:]
    tag = CUTS[cut]
    resumed_at = "epoch 2" if tag == "epoch1" else "epoch 1, step 11"
    assert f"Resuming from {tmp / f'{source}-to-{target}-{tag}' / tag} at {resumed_at}: {line}" in run.output
    assert "Finished Training" in run.output

    full, uninterrupted = tmp / f"{source}-full", tmp / f"{target}-full"
    resumed = tmp / f"{source}-to-{target}-{tag}"
    first = "epoch2" if tag == "epoch1" else "epoch1"  # 20 or 10 steps after the move
    assert distance(weights(resumed / first), weights(full / first)) < FP32
    truth = weights(full / "epoch3")  # 40 or 50 steps after the move
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
