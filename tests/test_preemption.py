"""Preemption: a scheduler's SIGTERM or SIGUSR1 saves a mid-epoch checkpoint on every rank, which --resume
continues as if nothing had happened; a kill during a save leaves a 'latest' that loads; --keep-last and best."""

import os
import re
import shlex
import signal
import subprocess
import time
from types import SimpleNamespace

import pytest

import cifar10_deepspeed
from conftest import ROOT, rank_pid, run_command, signal_when

# 60 steps an epoch, a loss line every 25: the signal lands after [ 2,    25] and the ranks agree at step 30,
# inside a log interval, so the resumed run must carry the interval's first 5 steps to print the same lines.
SMALL = ["--dataset", "synthetic", "--synthetic-train-size", "960", "--synthetic-test-size", "200", "--seed", "1",
         "-e", "3", "--log-interval", "25", "--dtype", "fp32"]
MOE_EP2 = ["--moe", "--ep-world-size", "2", "--num-experts", "2", "--noisy-gate-policy", "RSample"]
PRINTED = re.compile(r"^(\[ *\d+, +\d+\] (loss|expert load)|\[\d+\] accuracy of the network|Accuracy of |Finished Training)")


def printed(run, after):
    """The reference's lines and the per-epoch accuracy (not the throughput) that the run printed after the line
    that starts with `after`."""
    lines = run.output.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith(after)]
    assert starts, f"no {after!r} in:\n{run.output[-3000:]}"
    return [line for line in lines[starts[0] + 1:] if PRINTED.match(line)]


@pytest.fixture(scope="module")
def preempted(tmp_path_factory, op_cache):
    """MoE with EP 2 on 2 ranks, RSample gate noise, fp32, evaluated every epoch: a run straight through; the same
    run given SIGTERM in epoch 2, on its whole process group as SLURM and Kubernetes send it; that run continued
    with --resume auto; and the straight run's epoch-1 checkpoint continued with --resume."""
    tmp = tmp_path_factory.mktemp("preempted")

    def cmd(save_dir, *extra):
        return ["deepspeed", "--num_gpus", "2", ROOT / "cifar10_deepspeed.py", "--deepspeed", *SMALL, *MOE_EP2,
                "--eval-every", "1", "--save-dir", tmp / save_dir, *extra]

    full = run_command(cmd("full"), tmp)
    stopped, gone = signal_when(cmd("stopped"), tmp, lambda line: line.startswith("[ 2,    25] loss:"),
                                lambda launcher, _: os.killpg(launcher.pid, signal.SIGTERM))
    latest = (tmp / "stopped" / "latest").read_text()
    resumed = run_command(cmd("stopped", "--resume", "auto"), tmp)
    subprocess.run(["cp", "-r", str(tmp / "full"), str(tmp / "from-epoch1")], check=True)
    (tmp / "from-epoch1" / "latest").write_text("epoch1")
    from_epoch1 = run_command(cmd("from-epoch1", "--resume"), tmp)
    return SimpleNamespace(tmp=tmp, full=full, stopped=stopped, gone=gone, latest=latest, resumed=resumed,
                           from_epoch1=from_epoch1)


@pytest.mark.slow
def test_sigterm_to_the_process_group_saves_mid_epoch_and_every_rank_is_gone_within_30_s(preempted):
    run = preempted
    assert run.full.returncode == 0, run.full.output[-3000:]
    assert run.latest == "epoch2-step30"  # the first agreement check after the signal
    saved = run.tmp / "stopped" / "epoch2-step30"
    assert {"expp_rank_0_mp_rank_00_optim_states.pt", "expp_rank_1_mp_rank_00_optim_states.pt"} <= set(os.listdir(saved))
    assert run.gone < 30, f"the ranks took {run.gone:.1f} s to leave"
    lines = run.stopped.output.splitlines()
    assert lines.count(f"Preempted by SIGTERM: saved checkpoint {saved}; run again with --resume to continue from "
                       f"there (exit 75)") == 1
    assert not any(line.startswith("[ 2,    50] loss:") for line in lines) and "Finished Training" not in lines


@pytest.mark.slow
def test_a_run_resumed_mid_epoch_prints_the_uninterrupted_runs_lines(preempted):
    """From step 31 of epoch 2, with the interval's first 5 steps carried over: every loss, expert-load and
    accuracy line after [ 2,    25] is the uninterrupted run's, digit for digit (fp32, RSample noise included)."""
    run = preempted
    assert run.resumed.returncode == 0, run.resumed.output[-3000:]
    assert f"Resuming from {run.tmp / 'stopped' / 'epoch2-step30'} at epoch 2, step 31" in run.resumed.output
    assert "--resume auto: no checkpoint" not in run.resumed.output
    expected = printed(run.full, "[ 2,    25] expert load:")
    assert len(expected) > 15
    assert printed(run.resumed, "Resuming from") == expected


@pytest.mark.slow
def test_a_run_resumed_after_an_evaluated_epoch_prints_the_uninterrupted_runs_lines(preempted):
    """The epoch-1 checkpoint, saved before epoch 1's evaluation, resumes to the same lines: the evaluation
    (whose gate drops tokens at random) does not move the random numbers that training draws."""
    run = preempted
    assert run.from_epoch1.returncode == 0, run.from_epoch1.output[-3000:]
    assert printed(run.from_epoch1, "Resuming from") == printed(run.full, "[1] accuracy of the network")


@pytest.mark.slow
def test_sigterm_to_one_rank_saves_on_every_rank_and_a_kill_during_a_save_leaves_a_latest_that_loads(
        launch, script, tmp_path):
    """SIGTERM to rank 1 alone: both ranks save and exit 75, and so does the launcher. Then
    rank 1 is killed as the resumed run's next save begins: 'latest' still names the mid-epoch checkpoint,
    complete, and a third run resumes from it to the end, printing the uninterrupted dense run's lines."""
    cmd = ["deepspeed", "--num_gpus", "2", script, "--deepspeed", *SMALL, "-e", "2", "--save-dir", tmp_path / "ckpt"]
    full = launch(*cmd[:-1], tmp_path / "full")
    stopped, _ = signal_when(cmd, tmp_path, lambda line: line.startswith("[ 1,    25] loss:"),
                             lambda _, output: os.kill(rank_pid(output, 1), signal.SIGTERM))
    assert stopped.returncode == 75, stopped.output[-3000:]
    assert (f"Preempted by SIGTERM: saved checkpoint {tmp_path / 'ckpt' / 'epoch1-step30'}; run again with --resume "
            f"to continue from there (exit 75)") in stopped.output

    def kill_rank_1_as_epoch1_is_saved(_, output):
        deadline = time.monotonic() + 120
        while not (tmp_path / "ckpt" / "epoch1").exists() and time.monotonic() < deadline:
            time.sleep(0.001)
        os.kill(rank_pid(output, 1), signal.SIGKILL)
    killed, _ = signal_when([*cmd, "--resume"], tmp_path, lambda line: line.startswith("Resuming from"),
                            kill_rank_1_as_epoch1_is_saved)
    assert killed.returncode != 0 and "Finished Training" not in killed.output
    assert (tmp_path / "ckpt" / "latest").read_text() == "epoch1-step30"
    resumed = launch(*cmd, "--resume")
    assert resumed.returncode == 0, resumed.output[-3000:]
    assert f"Resuming from {tmp_path / 'ckpt' / 'epoch1-step30'} at epoch 1, step 31" in resumed.output
    assert printed(resumed, "Resuming from") == printed(full, "[ 1,    25] loss:")


@pytest.mark.slow
def test_sigusr1_without_a_save_dir_says_nothing_was_saved(launch, script, tmp_path):
    """SLURM's early signal (--signal=USR1@90) to a one-rank run without --save-dir: one line, exit 128 + 10."""
    cmd = ["python", script, "--deepspeed", *SMALL]
    run, gone = signal_when(cmd, tmp_path, lambda line: line.startswith("[ 1,    25] loss:"),
                            lambda launcher, _: launcher.send_signal(signal.SIGUSR1))
    assert run.returncode == 128 + signal.SIGUSR1
    assert "Preempted by SIGUSR1: nothing saved, as there is no --save-dir (exit 138)" in run.output.splitlines()
    assert gone < 30


def test_resume_auto_starts_afresh_where_there_is_no_checkpoint(single_rank_group, parse, tmp_path, capsys):
    args = parse("--deepspeed", *SMALL, "--save-dir", str(tmp_path), "--resume", "auto")
    assert cifar10_deepspeed.resume(None, args) == cifar10_deepspeed.Position()
    assert capsys.readouterr().out == f"--resume auto: no checkpoint in {tmp_path} yet, so training starts at epoch 1\n"


def test_keep_last_2_over_5_epochs_leaves_2_checkpoints_and_best(single_rank_group, parse, tmp_path, monkeypatch):
    """Each save prunes all but the newest 2, never what 'latest' or 'best' names; best follows the highest
    accuracy of the epochs evaluated, here that of epoch 2."""
    args = parse("--deepspeed", "--dataset", "synthetic", "--synthetic-train-size", "32", "--synthetic-test-size", "8",
                 "--dtype", "fp32", "-e", "5", "--eval-every", "1", "--save-dir", str(tmp_path), "--keep-last", "2",
                 "--log-interval", "100")
    engine, trainloader, testset = cifar10_deepspeed.initialize(args, cifar10_deepspeed.get_ds_config(args))
    accuracies = iter([([3], [8]), ([7], [8]), ([5], [8]), ([6], [8])])  # of epochs 1-4; epoch 5's is the final test
    monkeypatch.setattr(cifar10_deepspeed, "count_correct", lambda *_, **__: next(accuracies))
    cifar10_deepspeed.train(engine, trainloader, testset, args)
    assert sorted(os.listdir(tmp_path)) == ["best", "epoch2", "epoch4", "epoch5", "latest"]
    assert os.readlink(tmp_path / "best") == "epoch2" and (tmp_path / "latest").read_text() == "epoch5"
    assert (tmp_path / "best" / "eval.json").read_text() == '{"accuracy": 87.5}'


def test_checkpoints_are_ordered_by_the_training_they_hold():
    tags = ["epoch2", "epoch10", "epoch3-step40", "epoch3-step5", "epoch1"]
    assert sorted(tags, key=cifar10_deepspeed.checkpoint_order) == [
        "epoch1", "epoch2", "epoch3-step5", "epoch3-step40", "epoch10"]


def test_the_slurm_example_requeues_on_usr1_and_resumes_by_itself(parse):
    """run_slurm.sbatch: SLURM sends SIGUSR1 90 s before the time limit and may requeue the job; each task is one
    rank, the script saves and exits 75, and the batch script requeues on 75. Its flags parse and check."""
    text = (ROOT / "run_slurm.sbatch").read_text()
    directives = re.findall(r"^#SBATCH (\S+)", text, re.M)
    assert "--signal=USR1@90" in directives and "--requeue" in directives
    assert re.search(r'^if \[ "\$status" -eq 75 \]; then scontrol requeue "\$SLURM_JOB_ID"; fi$', text, re.M)
    command = re.search(r"python cifar10_deepspeed\.py (.*) \|\| status=\$\?$", text, re.M).group(1)
    args = parse(*[{"$SAVE_DIR": "ckpt"}.get(word, word) for word in shlex.split(command) if word != "$@"])
    assert args.resume == "auto" and args.deepspeed
    assert cifar10_deepspeed.check_args(args, cifar10_deepspeed.get_ds_config(args), world_size=8) is None
