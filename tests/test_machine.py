"""cifar10ds/machine.py: a GPU box whose torch cannot use its GPU (set by the tests: a stand-in nvidia-smi, torch's
own error), the cores, torch.compile where the machine can and cannot compile, and a rank whose peer is lost
(killed, or stuck past --dist-timeout) stopping with one line."""

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import deepspeed
import pytest
import torch
import torchvision

import cifar10ds.launch
import cifar10ds.machine
from conftest import (DRIVER_TOO_OLD, FAKE_MACHINE, ROOT, Accelerator, Run, children, finish, kill_session, live_processes,
                      metric, run_command, start)
from test_launch import Nodes, completed, script
from train_cells import engine_of
TINY = ["--dataset", "synthetic", "--dtype", "fp32", "-e", "1", "--synthetic-train-size", "64",
        "--synthetic-test-size", "16", "--log-interval", "4"]
SYNTHETIC = ["--dataset", "synthetic", "--log-interval", "50", "--seed", "0"]


# A GPU box whose torch cannot use CUDA: DeepSpeed would pick its CPU accelerator without a word.
DS_PICKS_THE_CPU = "DeepSpeed would train on the CPU instead."
ON_PURPOSE = "or set DS_ACCELERATOR=cpu to train on the CPU on purpose."
TORCH_FOR = f"pip install torch=={torch.__version__.split('+')[0]} torchvision=={torchvision.__version__.split('+')[0]}"


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
        return cifar10ds.machine.unusable_gpu()
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
    assert cifar10ds.machine.unusable_gpu() is None


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
             f"DeepSpeed {deepspeed.__version__}; optimizer: torch's fused AdamW (nothing to compile)")
    assert lines.count(first) == 1
    assert lines.index(first) < min(i for i, line in enumerate(lines) if line.startswith("[ 1,"))


# The cores
@pytest.mark.parametrize("cores, on_host, workers", [(2, True, 0), (16, True, 0), (2, False, 1), (16, False, 4),
                                                      (1, False, 0)])
def test_data_loader_workers_from_the_cores(monkeypatch, cores, on_host, workers):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    monkeypatch.setattr(cifar10ds.machine, "get_accelerator", lambda: Accelerator(True, on_host))
    assert cifar10ds.machine.data_loader_workers() == workers


# The device's queue
@pytest.mark.parametrize("asked, synchronized", [(None, False), (True, True)])
def test_deepspeeds_throughput_timer_waits_for_the_device_only_where_the_config_asks(single_rank_group, parse, asked,
                                                                                       synchronized):
    """Its line every steps_per_print steps stays on; the two waits a step (tests/count_host_reads.py counts
    them in a run) are gone unless the config asks for them."""
    settings = {} if asked is None else {"timers": {"throughput": {"synchronized": asked}}}
    engine, _, _ = engine_of(parse("--deepspeed", "--dataset", "synthetic", "--dtype", "fp32"), **settings)
    assert engine.tput_timer.config.enabled
    assert engine.tput_timer.config.synchronized is synchronized


def test_a_run_waits_for_the_device_as_often_in_40_steps_as_in_10(launch, tmp_path):
    """A run of the script (tests/count_in_a_run.py counts every synchronize of the accelerator) waits for the
    device's queue at its start and its end, never in a step: DeepSpeed's throughput timer did twice a step."""
    waits = {}
    for steps in (10, 40):
        syncs = tmp_path / f"syncs-{steps}"
        run = launch("python", ROOT / "tests" / "count_in_a_run.py", "--deepspeed", "--dataset", "synthetic",
                     "--dtype", "fp32", "-e", "1", "--synthetic-train-size", str(16 * steps),
                     "--synthetic-test-size", "4", env={"SYNCS": str(syncs)})
        assert run.returncode == 0, run.output[-3000:]
        waits[steps] = syncs.read_text().splitlines() if syncs.exists() else []
    assert waits[40] == waits[10], waits


# torch.compile
STEPS = 25
FLAGS = ["--deepspeed", "--dataset", "synthetic", "--seed", "0", "--synthetic-train-size", str(16 * STEPS),
         "--synthetic-test-size", "100", "-e", "1", "--log-interval", "5"]

MOE = ["--moe", "--num-experts", "2", "--noisy-gate-policy", "RSample"]
COMPILED = "--compile: the model is compiled with torch.compile (inductor) as its first steps run"


def step_losses(metrics_dir):
    return list(metric(metrics_dir, "Train_Samples_train_loss").values())


@pytest.mark.slow
@pytest.mark.parametrize("model, dtype", [([], "fp32"), (MOE, "bf16")], ids=["dense-fp32", "moe-top1-rsample-bf16"])
def test_compiled_training_follows_the_eager_loss_trace(launch, script, tmp_path, model, dtype):
    """One rank, the same seed, 25 steps: every step's loss within a relative 1e-4 of eager training's; fp32 for the
    dense Net, half precision for MoE (fp16, which a CPU emulates, compiles through the same path at several times
    the cost)."""
    cmd = ["python", script, *FLAGS, "--dtype", dtype, *model]
    eager = launch(*cmd, "--metrics-dir", tmp_path / "eager")
    compiled = launch(*cmd, "--compile", "--metrics-dir", tmp_path / "compiled",
                      env={"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor-cache")})
    for run in (eager, compiled):
        assert run.returncode == 0, run.output[-3000:]
    expected = COMPILED + ("; the MoE gate's capacity, read on the host, runs eagerly between compiled parts"
                           if model else "")
    assert [line for line in compiled.output.splitlines() if line.startswith("--compile")] == [expected]
    # The one-op probe compile_model tries first generates code too (one addition): only the Net's linear layers
    # (addmm; its convolutions too where they are in a compiled graph) show that the model was compiled.
    generated = [path.read_text() for path in (tmp_path / "inductor-cache").rglob("*.py")]
    assert any("addmm" in code for code in generated), "inductor generated no code of the Net: not compiled"
    assert "--compile" not in eager.output
    eager_losses, compiled_losses = step_losses(tmp_path / "eager"), step_losses(tmp_path / "compiled")
    assert len(eager_losses) == STEPS and len(set(eager_losses)) > 1
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-4)


@pytest.mark.slow
def test_without_a_compiler_it_says_so_and_trains_eagerly(launch, script, machine):
    run = launch("python", script, *FLAGS, "--dtype", "fp32", "--compile", env=machine(cxx=False))
    assert run.returncode == 0, run.output[-3000:]
    lines = [line for line in run.output.splitlines() if line.startswith("--compile")]
    assert len(lines) == 1 and lines[0].startswith("--compile: cannot compile on this machine (inductor: ")
    assert lines[0].endswith("); training eagerly")
    assert len(run.losses()) == STEPS // 5 and "Finished Training" in run.output


@pytest.mark.slow
def test_without_a_compiler_the_tutorials_fp16_master_weights_stop_every_rank_in_one_line(launch, root, machine):
    """Only DeepSpeed's CPU Adam keeps fp16 master weights, and its op is built on a first run."""
    run = launch(root / "run_ds_moe.sh", "--deepspeed_config", root / "ds_config_offload.json", *SYNTHETIC,
                 env={**machine(cxx=False), "BIND_CORES": "0"})
    assert run.returncode == 1, run.output[-3000:]
    errors = [line for line in run.output.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and re.fullmatch(
        r"error: fp16_master_weights_and_grads needs DeepSpeed's CPU Adam, whose C\+\+ op could not be built here "
        r"\(.+\): install a C\+\+ compiler, or set fp16_master_weights_and_grads to false to train with torch's "
        r"fused AdamW", errors[0]), errors
    assert "Traceback" not in run.output and "accelerator:" not in run.output


# A lost peer
def rank_pids(launch):
    """The ranks a launch spawned: the processes of its session that run the script with a --local_rank."""
    pids = []
    for pid in live_processes(launch.pid):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(arg.endswith(b"cifar10_deepspeed.py") for arg in argv) and any(
                arg.startswith(b"--local_rank=") for arg in argv):
            pids.append(pid)
    return pids


def stop_node_1_mid_epoch(tmp_path, how, *args):
    """Two nodes train; when node 0 has printed its first loss line, `how` is sent to node 1's rank.

    Returns each node's Run and the seconds from the signal until both launchers had exited (a
    stopped rank is killed once node 0's launcher has exited).
    """
    launches = Nodes(tmp_path).start(script("run_ds.sh", "--dtype", "fp32", *SYNTHETIC, "-e", "3", *args))
    first_lines = []
    for line in launches[0].stdout:
        first_lines.append(line)
        if "loss:" in line:
            break
    assert any("loss:" in line for line in first_lines), "".join(first_lines)[-3000:]
    ranks = rank_pids(launches[1])
    assert len(ranks) == 1, ranks
    signalled = time.monotonic()
    os.kill(ranks[0], how)
    outputs = ["".join(first_lines) + finish(launches[0], timeout=120)[0]]
    if how == signal.SIGSTOP:
        kill_session(launches[1].pid)  # the stuck rank never ends by itself
    outputs.append(finish(launches[1], timeout=120)[0])
    seconds = time.monotonic() - signalled
    return [Run(completed(launch, output)) for launch, output in zip(launches, outputs)], seconds

LOST_PEER = re.compile(r"^error: lost another rank \((.+)\): it died or stopped answering, so this rank stops too")


def assert_says_it_lost_a_peer(run):
    """Node 0's rank ends with the one line and exit 1, not the backend's traceback, and without the abort at exit
    that leave() exists for ("terminate called without an active exception", -6)."""
    errors = error_lines(run)
    assert len(errors) == 1 and LOST_PEER.match(errors[0]), run.output[-3000:]
    assert "Traceback" not in run.output and "Finished Training" not in run.output
    assert run.returncode == 1 and "terminate called" not in run.output, run.output[-3000:]
    return LOST_PEER.match(errors[0]).group(1)


def error_lines(run):
    return [line for line in run.output.splitlines() if line.startswith("error: ")]


@pytest.mark.slow
def test_a_rank_killed_on_node_1_ends_every_rank_on_both_nodes(tmp_path):
    (first, second), seconds = stop_node_1_mid_epoch(tmp_path, signal.SIGKILL)
    assert second.returncode != 0
    assert seconds < 60
    assert "Connection" in assert_says_it_lost_a_peer(first)  # gloo's reason: the peer's connection closed or reset


@pytest.mark.slow
def test_a_stuck_peer_ends_the_run_after_the_dist_timeout(tmp_path):
    (first, _), seconds = stop_node_1_mid_epoch(tmp_path, signal.SIGSTOP, "--dist-timeout", "0.25")
    assert seconds < 60  # 15 s of timeout; DeepSpeed's default would wait 10 minutes
    assert_says_it_lost_a_peer(first)


@pytest.mark.slow
def test_a_rank_whose_peer_never_comes_ends_with_one_line_within_the_dist_timeout(script, tmp_path):
    """Rank 0 of 2 started by hand, as srun --kill-on-bad-exit=0 starts ranks, and rank 1 gone before it joined
    (no launcher to end rank 0): rank 0 stops with the lost-peer line once --dist-timeout passes, not a hang."""
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "LOCAL_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(cifar10ds.launch.free_port())}
    started = time.monotonic()
    run = run_command([sys.executable, script, "--deepspeed", *TINY, "--dist-timeout", "0.2"], tmp_path, env,
                      timeout=120)
    assert time.monotonic() - started < 60  # 12 s of timeout, and the start
    assert_says_it_lost_a_peer(run)


@pytest.mark.slow
def test_a_torchrun_rank_that_dies_at_the_start_ends_the_run_at_once(script, tmp_path):
    """torchrun, rank 1 killed (kill -9) as soon as torchrun has started it: torchrun ends rank 0 at once, with its
    own report; rank 0 does not spin waiting for rank 1 (DeepSpeed's shared-memory set-up would, with no timeout)."""
    started = time.monotonic()
    launcher = start(["torchrun", "--standalone", "--nproc_per_node", "2", script, "--deepspeed", *TINY], tmp_path,
                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    rank_1 = None
    while rank_1 is None and launcher.poll() is None and time.monotonic() - started < 60:
        for pid in children(launcher.pid):
            with contextlib.suppress(OSError):
                if b"\0LOCAL_RANK=1\0" in b"\0" + Path(f"/proc/{pid}/environ").read_bytes():
                    rank_1 = pid
        time.sleep(0.01)
    assert rank_1, "torchrun started no rank 1"
    os.kill(rank_1, signal.SIGKILL)
    run = Run(completed(launcher, finish(launcher, timeout=120)[0]))
    assert time.monotonic() - started < 60
    assert run.returncode != 0 and "Finished Training" not in run.output
    assert "exitcode  : -9" in run.output and 'File "' + str(script) not in run.output  # rank 1's end, no traceback
