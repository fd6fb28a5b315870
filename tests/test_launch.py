"""End-to-end runs, launched as a user launches them, on the offline synthetic data.

The training runs are in the slow tier; the fast tier (`-m "not slow"`) keeps two short
fp16 runs and the offline error as its real launches.
"""

import contextlib
import csv
import re
import socket
import subprocess
import sys

import psutil
import pytest
import torch
import torchvision

import cifar10_deepspeed
from conftest import (DRIVER_TOO_OLD, FAKE_MACHINE, MARGIN, finish, free_port, segments_left_since,
                      shared_memory_segments, start)

SYNTHETIC = ["--dataset", "synthetic", "--log-interval", "100", "--seed", "0"]
# One epoch of 313 steps shows that a launch path trains; test_matrix.py checks training in every configuration.
ONE_EPOCH = ["-e", "1", "--log-interval", "50"]
FASTER = "slower than fp32 (1.5x to 11x measured); pass --dtype fp32 to train faster"
FP16_NOTES = {False: f"note: DeepSpeed finds no native fp16 support on this cpu, so fp16 runs as PyTorch emulates "
                     f"it: {FASTER}",
              True: f"note: fp16 on this cpu trains {FASTER}"}
LOSS_LINE = re.compile(r"^\[ \d+,  +\d+\] loss:  \d\.\d{3}$")  # the reference's: sign spaces, batch in 5


@pytest.mark.parametrize("native_fp16", [False, True], ids=["emulated-fp16", "native-fp16"])
def test_default_fp16_on_cpu_runs_and_says_how_to_train_faster(launch, script, machine, native_fp16):
    """Whether or not the CPU reports native fp16, fp16 runs and rank 0 says once how to go faster."""
    run = launch("python", script, "--deepspeed", "--dataset", "synthetic", "--log-interval", "5", "-e", "1",
                 "--synthetic-train-size", "160", "--synthetic-test-size", "203", env=machine(native_fp16=native_fp16))
    assert run.returncode == 0, run.output[-3000:]
    lines = run.output.splitlines()
    assert lines.count(FP16_NOTES[native_fp16]) == 1 and FP16_NOTES[not native_fp16] not in lines
    assert [line for line in lines if " loss: " in line] == [line for line in lines if LOSS_LINE.match(line)]
    assert len([line for line in lines if LOSS_LINE.match(line)]) == 2  # [ 1,     5] and [ 1,    10]
    assert "Finished Training" in lines
    assert re.search(r"^Accuracy of the network on the 203 test images:  \d{1,3} %$", run.output, re.M)


@pytest.mark.slow
def test_dense_fp32_one_rank_reaches_50_percent_in_3_epochs_and_ignores_the_moe_aux_loss_coef(launch, root, machine):
    """A dense Net has no gate: the aux-loss coefficient must leave it alone (it once raised AttributeError)."""
    run = launch(root / "run_ds.sh", *SYNTHETIC, "--dtype", "fp32", "-e", "3", "--moe-aux-loss-coef", "0.01",
                 env={"NUM_GPUS": "1", **machine(numactl=False)})
    run.assert_trained(min_accuracy=81 - MARGIN)
    assert run.output.count("[ 3,   300] loss:") == 1  # rank 0 prints, once per interval
    assert ("run_ds.sh: numactl not found, so cores are not bound to ranks; each rank sizes its thread pool to its "
            "share of the cores") in run.output.splitlines()


@pytest.mark.slow
def test_moe_ep2_as_run_ds_moe_runs_it_with_cores_bound_by_numactl(launch, root, machine):
    run = launch(root / "run_ds_moe.sh", *SYNTHETIC, *ONE_EPOCH, env=machine(numactl=True))
    run.assert_trained(min_accuracy=53 - MARGIN)
    assert "--ep-world-size 2 --num-experts 2 --top-k 1 --noisy-gate-policy RSample --moe-param-group" in run.output
    cores = psutil.cpu_count(logical=False) // 2  # DeepSpeed's launcher splits the physical cores between ranks
    rank_1_cores = f"{cores}" if cores == 1 else f"{cores}-{2 * cores - 1}"
    assert f"['numactl', '-m', '0', '-C', '{rank_1_cores}', " in run.output  # each rank bound to its own cores


@pytest.mark.slow
def test_pr_moe_two_ranks_without_core_binding(launch, root):
    run = launch(root / "run_ds_prmoe.sh", *SYNTHETIC, "--dtype", "fp32", *ONE_EPOCH, env={"BIND_CORES": "0"})
    run.assert_trained(min_accuracy=69 - MARGIN)
    assert "--num-experts 2 4 --top-k 1 --noisy-gate-policy RSample --moe-param-group --mlp-type residual" in run.output
    assert ("run_ds.sh: core binding off (BIND_CORES=0); each rank sizes its thread pool to its share of the cores"
            in run.output.splitlines())
    assert "numactl" not in run.output


@pytest.mark.slow
def test_moe_ep2_with_zero_2_without_moe_param_groups(launch, script):
    """With --moe-param-group, EP 2 at ZeRO 2 is trained by test_matrix.py and test_layouts.py through the same code."""
    run = launch("deepspeed", "--num_gpus", "2", script, "--deepspeed", *SYNTHETIC, "--dtype", "fp32", *ONE_EPOCH,
                 "--moe", "--ep-world-size", "2", "--num-experts", "2", "--noisy-gate-policy", "RSample", "--stage", "2")
    run.assert_trained(min_accuracy=54 - MARGIN)


@pytest.mark.slow
def test_bf16_one_rank_from_the_config_file(launch, script, root):
    config = root / "ds_config.json"
    run = launch("deepspeed", "--num_gpus", "1", script, "--deepspeed", "--deepspeed_config", config, "--dtype",
                 "bf16", *SYNTHETIC, *ONE_EPOCH)
    run.assert_trained(min_accuracy=69 - MARGIN)
    assert f"Using {config}: dtype bf16, ZeRO stage 0 (--dtype bf16 overrides its fp16)" in run.output.splitlines()


@pytest.mark.slow
def test_plain_python_runs_one_rank_with_the_default_fp16(launch, script):
    run = launch("python", script, "--deepspeed", *SYNTHETIC, *ONE_EPOCH, "--synthetic-test-size", "203")
    run.assert_trained(min_accuracy=68 - MARGIN)
    assert re.search(r"^accelerator: \w+( \(.*\))?, 1 rank, detected; torch ", run.output, re.M)
    assert "Accuracy of the network on the 203 test images:" in run.output


def test_missing_cifar10_offline_stops_every_rank_with_one_message_and_leaves_no_shared_memory(launch, root, tmp_path):
    """Two ranks under DeepSpeed's launcher, which makes its CPU comm op create a /dev/shm buffer per rank: the
    script unlinks them (DeepSpeed never does), even on a run that stops at once."""
    segments, port = shared_memory_segments(), free_port()  # the port names this launch's buffers
    run = launch(root / "run_ds.sh", "--data-dir", tmp_path / "nowhere", env={"NUM_GPUS": "2", "BIND_CORES": "0",
                 "MASTER_PORT": port}, timeout=120)  # no rank waits for another: a hang fails the launch here
    assert run.returncode == 1
    assert "terminate called" not in run.output
    errors = [line for line in run.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1
    assert errors[0].startswith(f"error: CIFAR-10 is not in {tmp_path / 'nowhere'} and could not be downloaded (")
    assert errors[0].endswith(f"Place cifar-10-python.tar.gz (from https://www.cs.toronto.edu/~kriz/cifar.html) "
                              f"in {tmp_path / 'nowhere'}, or train offline on generated data with --dataset synthetic.")
    assert "Traceback" not in run.output
    assert [name for name in segments_left_since(segments) if f"_{port}_" in name] == []


@pytest.mark.slow
def test_moe_run_shows_expert_load_and_throughput_and_writes_metrics(launch, script, root, tmp_path):
    metrics = tmp_path / "metrics"
    run = launch("python", script, "--deepspeed", *SYNTHETIC, "--dtype", "fp32", "-e", "2", "--moe", "--num-experts",
                 "2", "--moe-aux-loss-coef", "0.01", "--eval-every", "1",
                 "--metrics-dir", metrics)
    run.assert_trained(min_accuracy=65 - MARGIN)
    lines = run.output.splitlines()
    loads = [re.match(r"^\[ \d,  +\d+\] expert load: layer 0: (\d+)% (\d+)%, aux loss [\d.]+$", line) for line in lines]
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

    folder = metrics / "cifar10"
    rows = lambda name: list(csv.reader(open(folder / f"{name}.csv")))[1:]
    assert len(rows("Train_Samples_train_loss")) == len(rows("Train_Samples_lr")) == 626  # every step
    norms = [float(norm) for _, norm in rows("Train_Samples_grad_norm")]  # every step, before clipping
    intervals = [norms[i:i + 100] for i in (0, 100, 200, 313, 413, 513)]  # the epoch's last 13 steps are in no line
    assert [(f"{sum(n) / 100:.3f}", str(sum(x > 1.0 for x in n))) for n in intervals] == [m.groups() for m in speeds]
    assert len(rows("Train_Samples_samples_per_sec")) == len(rows("MoE_layer0_expert1_share")) == 6
    assert len(rows("MoE_layer0_aux_loss")) == 6
    assert f"{float(rows('Eval_accuracy')[-1][1]):.0f}" == str(run.accuracy())  # the final test, as printed (rounded)
    assert len(rows("Eval_accuracy")) == 2 and len(rows("Train_Epoch_seconds")) == 2

    png = tmp_path / "metrics.png"
    plot = subprocess.run([sys.executable, root / "plot_metrics.py", metrics, "-o", png], capture_output=True, text=True,
                          timeout=120)
    assert plot.returncode == 0, plot.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20000


@pytest.mark.slow
def test_dense_two_ranks_zero_1_evaluates_sharded_every_epoch(launch, script):
    run = launch("deepspeed", "--num_gpus", "2", script, "--deepspeed", *SYNTHETIC, "--dtype", "fp32", "--stage", "1",
                 "-e", "3", "--log-interval", "50", "--synthetic-train-size", "1600", "--eval-every", "1",
                 "--synthetic-test-size", "203")
    run.assert_trained(min_accuracy=62 - MARGIN)
    for epoch in (1, 2):
        assert re.search(rf"^\[{epoch}\] accuracy of the network on the 203 test images: [\d.]+ %$", run.output, re.M)
    assert "Accuracy of the network on the 203 test images:" in run.output


def printed_results(run):
    """Every line the script prints about training and testing, less what depends on the machine's speed."""
    lines = [line for line in run.output.splitlines() if re.match(r"\[ *\d+, +\d+\] |Accuracy of|\[\d+\] accuracy", line)]
    return [re.sub(r"\d+ samples/s, [\d.]+ s/epoch, |, peak \w+ memory \d+ MiB", "", line) for line in lines]


@pytest.mark.slow
def test_same_seed_gives_the_same_lines_on_either_data_path(launch, script):
    """With one seed, the PIL path prints the tensor path's lines, digit for digit: losses, gradient norms, expert
    load and accuracy; another seed prints other losses."""
    cmd = ["python", script, "--deepspeed", "--dataset", "synthetic", "--log-interval", "5", "--dtype", "fp32",
           "-e", "2", "--synthetic-train-size", "160", "--synthetic-test-size", "40", "--moe", "--num-experts", "2",
           "--noisy-gate-policy", "RSample", "--eval-every", "1"]
    first, again, other = launch(*cmd, "--seed", "1"), launch(*cmd, "--seed", "1", "--data-path", "pil"), launch(
        *cmd, "--seed", "2")
    assert len(first.losses()) == 4 and len(printed_results(first)) == 4 * 3 + 1 + 11
    assert printed_results(first) == printed_results(again)
    assert first.losses() != other.losses()


# A GPU box whose torch cannot use CUDA: DeepSpeed would pick its CPU accelerator without a word.
DS_PICKS_THE_CPU = "DeepSpeed would train on the CPU instead."
ON_PURPOSE = "or set DS_ACCELERATOR=cpu to train on the CPU on purpose."
TORCH_FOR = f"pip install torch=={torch.__version__.split('+')[0]} torchvision=={torchvision.__version__.split('+')[0]}"
TINY = ["--dataset", "synthetic", "--dtype", "fp32", "-e", "1", "--synthetic-train-size", "64",
        "--synthetic-test-size", "16", "--log-interval", "4"]


@pytest.fixture
def gpu_box(monkeypatch):
    """This process on a GPU box: nvidia-smi lists a GPU with driver `driver` (or none for None), torch cannot use
    CUDA and gives `error` as its reason, CUDA_VISIBLE_DEVICES is `visible` (None: unset), DS_ACCELERATOR unset."""
    def settings(driver="535.104.05", error=DRIVER_TOO_OLD, visible=None):
        monkeypatch.delenv("DS_ACCELERATOR", raising=False)
        if visible is None:
            monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        else:
            monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
        # nvidia-smi is the stand-in, or none; bash, which runs the stand-in, is in /usr/bin or /bin.
        monkeypatch.setenv("PATH", f"{FAKE_MACHINE / 'gpu'}:/usr/bin:/bin" if driver else str(FAKE_MACHINE / "none"))
        monkeypatch.setenv("FAKE_NVIDIA_DRIVER", driver or "")

        def init():
            raise RuntimeError(error)

        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        monkeypatch.setattr(torch.cuda, "init", init)
        return cifar10_deepspeed.unusable_gpu()
    return settings


@pytest.mark.parametrize("driver, index", [("535.104.05", "cu121"), ("550.54.14", "cu124"), ("575.51.03", "cu128"),
                                           ("580.95.05", "cu130")])
def test_a_driver_older_than_torchs_cuda_is_one_line_with_the_torch_for_it(gpu_box, driver, index):
    assert gpu_box(driver) == (
        f"nvidia-smi lists 1 GPU(s) (NVIDIA H200, driver {driver}), but torch {torch.__version__} cannot use CUDA: "
        f"The NVIDIA driver on your system is too old (found version 12020). {DS_PICKS_THE_CPU} Either install torch "
        f"built for driver {driver}: {TORCH_FOR} --index-url https://download.pytorch.org/whl/{index} (or the "
        f"nearest version that index has: docs/gpu.md), {ON_PURPOSE}")


def test_a_driver_too_old_for_any_torch_asks_for_a_new_driver(gpu_box):
    assert "Either update the NVIDIA driver (PyTorch's CUDA builds need 520 or newer), or" in gpu_box("470.256.02")


@pytest.mark.parametrize("visible", ["", "-1"])
def test_a_cuda_visible_devices_that_hides_every_gpu_on_a_gpu_box_is_named(gpu_box, visible):
    line = gpu_box(error="No CUDA GPUs are available", visible=visible)
    assert line.endswith("cannot use CUDA: No CUDA GPUs are available DeepSpeed would train on the CPU instead. "
                         f"Either set CUDA_VISIBLE_DEVICES to the GPUs to use ({visible!r} hides them all), " + ON_PURPOSE)


def test_cuda_visible_devices_naming_a_gpu_without_nvidia_smi_is_a_gpu_box(gpu_box):
    line = gpu_box(driver=None, error="Found no NVIDIA driver on your system. Please check that you have an NVIDIA GPU "
                                      "and installed a driver from http://www.nvidia.com/Download/index.aspx", visible="0")
    assert line == (f"CUDA_VISIBLE_DEVICES=0 names a GPU, but torch {torch.__version__} cannot use CUDA: Found no NVIDIA "
                    f"driver on your system. {DS_PICKS_THE_CPU} Either install the torch built for this machine's CUDA "
                    f"driver (docs/gpu.md), {ON_PURPOSE}")


def test_a_machine_without_a_gpu_or_on_purpose_on_the_cpu_is_no_gpu_box(gpu_box, monkeypatch):
    assert gpu_box(driver=None) is None
    assert gpu_box(driver=None, visible="-1") is None
    assert gpu_box(driver=None, visible="") is None
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    assert cifar10_deepspeed.unusable_gpu() is None


def test_a_gpu_box_torch_cannot_use_stops_every_rank_with_one_line(launch, root, machine):
    """Two ranks under DeepSpeed's launcher on a (faked) GPU box whose driver is older than torch's CUDA: one line,
    before any work."""
    run = launch(root / "run_ds.sh", *TINY, env={**machine(gpu_driver="535.104.05"), "NUM_GPUS": "2",
                                                 "BIND_CORES": "0"}, timeout=120)
    assert run.returncode == 1
    errors = [line for line in run.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: nvidia-smi lists 1 GPU(s) (NVIDIA H200, driver 535.104.05)")
    assert errors[0].endswith(ON_PURPOSE)
    assert "Traceback" not in run.output and "accelerator:" not in run.output


@pytest.mark.slow
def test_that_gpu_box_trains_on_the_cpu_on_purpose_and_the_first_line_says_so(launch, root, machine):
    run = launch(root / "run_ds.sh", *TINY, env={**machine(gpu_driver="535.104.05"), "NUM_GPUS": "2",
                                                 "BIND_CORES": "0", "DS_ACCELERATOR": "cpu"}, timeout=300)
    assert run.returncode == 0, run.output[-3000:]
    lines = run.output.splitlines()
    first = (f"accelerator: cpu, 2 ranks, DS_ACCELERATOR=cpu; torch {torch.__version__}, "
             f"DeepSpeed {cifar10_deepspeed.deepspeed.__version__}")
    assert lines.count(first) == 1
    assert lines.index(first) < min(i for i, line in enumerate(lines) if line.startswith("[ 1,"))


@contextlib.contextmanager
def taken_port():
    """A port on this machine that another run holds (a socket listening on it): yields its number."""
    with socket.socket() as s:
        s.bind(("", 0))
        s.listen()
        yield str(s.getsockname()[1])


TAKEN = re.compile(r"error: port (\d+) of 127\.0\.0\.1 is taken: in use by another run\? Give this run a free one: "
                   r"MASTER_PORT=(\d+) \(run_ds\*\.sh, python\) or --master_port \2 \(deepspeed, torchrun\)")


@pytest.mark.parametrize("how", ["run_ds.sh", "python"])
def test_a_taken_port_stops_the_run_with_one_line(launch, root, script, how):
    """Under DeepSpeed's launcher (2 ranks) and plain python. torchrun binds the port itself, before the script
    starts: test_torchrun_standalone_is_not_stopped_by_a_taken_port."""
    with taken_port() as port:
        cmd = [root / "run_ds.sh"] if how == "run_ds.sh" else ["python", script, "--deepspeed"]
        run = launch(*cmd, *TINY, env={"MASTER_PORT": port, "NUM_GPUS": "2", "BIND_CORES": "0"}, timeout=120)
    assert run.returncode == 1
    errors = [line for line in run.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and TAKEN.fullmatch(errors[0]) and TAKEN.fullmatch(errors[0]).group(1) == port
    assert "Traceback" not in run.output and "loss:" not in run.output


@pytest.mark.slow
def test_torchrun_standalone_is_not_stopped_by_a_taken_port(launch, script):
    """torchrun's own rendezvous binds the port before the script starts (a taken --master_port is torchrun's
    error, EADDRINUSE); --standalone, as the docs launch it on one node, takes a free one."""
    with taken_port() as port:
        taken = launch("torchrun", "--nproc_per_node", "1", "--master_port", port, script, "--deepspeed", *TINY,
                       timeout=120)
        run = launch("torchrun", "--standalone", "--nproc_per_node", "1", script, "--deepspeed", *TINY, timeout=300)
    assert taken.returncode != 0 and "EADDRINUSE" in taken.output and "accelerator:" not in taken.output
    assert run.returncode == 0 and "Finished Training" in run.output


@pytest.mark.slow
def test_two_runs_side_by_side_on_one_machine_both_train(root, tmp_path, op_cache):
    """Started together, each through run_ds.sh with MASTER_PORT unset: each gets a port of its own."""
    runs = []
    for name in ("first", "second"):
        (tmp_path / name).mkdir()
        runs.append(start([root / "run_ds.sh", *TINY, "-e", "2"], tmp_path / name, {"NUM_GPUS": "1", "BIND_CORES": "0"},
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    outputs = [finish(run)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs[1][-3000:]
    ports = [re.search(r"--master_port=(\d+)", output).group(1) for output in outputs]
    assert ports[0] != ports[1] and "Finished Training" in outputs[0] and "Finished Training" in outputs[1]
