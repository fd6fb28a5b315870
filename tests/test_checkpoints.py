"""cifar10ds/checkpoints.py and the script's save_checkpoint and resume: a checkpoint every epoch, resumed after
a rank is killed; a scheduler's SIGTERM or SIGUSR1 saving a mid-epoch checkpoint on every rank, which --resume
continues as if nothing had happened; a kill during a save leaving a 'latest' that loads; --keep-last and best;
checkpoints that do not fit refused in one line."""

import json
import os
import re
import shlex
import signal
import subprocess
import time
from types import SimpleNamespace

import pytest

import cifar10_deepspeed
from cifar10ds import checkpoints, options
from conftest import ROOT, metric, rank_pid, run_command, signal_when
from test_launch import Nodes, script
from train_cells import engine_of
SYNTHETIC = ["--dataset", "synthetic", "--log-interval", "100", "--seed", "0"]


# Resume after a rank is killed
STEPS_PER_EPOCH = 200  # of the killed run; 600 in all, past the loss scale's first rise at step 501


def kill_rank_1_at(cmd, cwd, marker):
    """Launch, wait for `marker` in the output, SIGKILL rank 1, and return the launcher's Run."""
    run, _ = signal_when(cmd, cwd, lambda line: marker in line,
                         lambda _, output: os.kill(rank_pid(output, 1), signal.SIGKILL))
    return run


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory):
    """MoE with EP 2 in fp16, 3 epochs: run through; run again, SIGKILL rank 1 in epoch 2, and resume."""
    tmp = tmp_path_factory.mktemp("killed")

    def cmd(name, *extra):
        return ["deepspeed", "--num_gpus", "2", ROOT / "cifar10_deepspeed.py", "--deepspeed", *SYNTHETIC, "-e", "3",
                "--synthetic-train-size", str(16 * STEPS_PER_EPOCH),
                "--moe", "--ep-world-size", "2", "--num-experts", "2", "--save-dir", tmp / name,
                "--metrics-dir", tmp / f"{name}-metrics", *extra]

    full = run_command(cmd("full"), tmp)
    killed = kill_rank_1_at(cmd("killed"), tmp, marker="[ 2,   100] loss:")
    latest_after_kill = (tmp / "killed" / "latest").read_text().strip()
    resumed = run_command(cmd("killed", "--resume"), tmp)
    return SimpleNamespace(tmp=tmp, cmd=cmd, full=full, killed=killed, resumed=resumed,
                           latest_after_kill=latest_after_kill)


@pytest.mark.slow
def test_a_killed_rank_resumes_where_the_last_epoch_ended(killed_and_resumed):
    """The resumed run restarts at epoch 2 with the uninterrupted run's weights, data order, LR schedule
    and loss-scale state, and ends with its accuracy within noise."""
    run = killed_and_resumed
    run.full.assert_launched()
    assert run.killed.returncode != 0 and "Finished Training" not in run.killed.output
    assert run.latest_after_kill == "epoch1"  # the unfinished epoch is lost

    resumed = run.resumed
    assert resumed.returncode == 0, resumed.output[-3000:]
    assert f"Resuming from {run.tmp / 'killed' / 'epoch1'} at epoch 2" in resumed.output
    assert resumed.output.count("[ 1,   100] loss:") == 0 and resumed.output.count("[ 2,   100] loss:") == 1
    assert abs(resumed.accuracy() - run.full.accuracy()) <= 5
    assert (run.tmp / "killed" / "latest").read_text().strip() == "epoch3"

    def after_resume(metrics, name):
        values = metric(run.tmp / metrics, name)
        return {step: value for step, value in values.items() if step > STEPS_PER_EPOCH * 16}

    for name in ("Train_Samples_lr", "Train_Samples_loss_scale"):  # the scale doubles at step 501, in epoch 3
        assert after_resume("killed-metrics", name) == after_resume("full-metrics", name), name
    # The same weights and data order: the first steps' losses agree. Later the two runs drift apart in the
    # last bits: DeepSpeed's CPU Adam computes beta^t by pow() after a restart but by repeated products in
    # a running process, and fp16 weights turn those differences into visible ones.
    resumed_losses = dict(sorted(after_resume("killed-metrics", "Train_Samples_train_loss").items())[:10])
    full_losses = after_resume("full-metrics", "Train_Samples_train_loss")
    assert resumed_losses == pytest.approx({step: full_losses[step] for step in resumed_losses}, rel=1e-3)


@pytest.mark.slow
def test_a_rank_missing_its_part_of_the_checkpoint_stops_every_rank(killed_and_resumed):
    run = killed_and_resumed
    partial = run.tmp / "partial"
    subprocess.run(["cp", "-r", str(run.tmp / "killed"), str(partial)], check=True)
    (partial / "epoch3" / "expp_rank_1_mp_rank_00_optim_states.pt").unlink()  # rank 1's expert optimizer
    cmd = run.cmd("killed", "--resume")
    cmd[cmd.index(run.tmp / "killed")] = partial
    refusal = run_command(cmd, run.tmp)
    assert refusal.returncode == 1
    errors = [line for line in refusal.output.splitlines() if line.startswith("error: ")]
    assert errors[0] == (f"error: --resume: cannot load checkpoint {partial / 'epoch3'}: FileNotFoundError in "
                         f"DeepSpeed's load_checkpoint: [Errno 2] No such file or directory: "
                         f"'{partial / 'epoch3' / 'expp_rank_1_mp_rank_00_optim_states.pt'}'")
    assert "Resuming from" not in refusal.output and "Finished Training" not in refusal.output

MOE_EP2 = ["--moe", "--ep-world-size", "2", "--num-experts", "2", "--noisy-gate-policy", "RSample"]


@pytest.mark.slow
@pytest.mark.parametrize("flags, resumes", [
    (["--dtype", "fp32", "--stage", "2"], {"with offload": (["--offload", "cpu"], True)}),
    (["--dtype", "fp32", "--stage", "2", *MOE_EP2, "--moe-param-group", "--offload", "cpu"],
     {"as saved": ([], True), "without offload": (["--offload", "none"], False)}),
], ids=["dense-zero2", "moe-ep2-zero2-offload"])
def test_resume_under_zero_replays_the_uninterrupted_run(launch, script, tmp_path, flags, resumes):
    """Resuming from the epoch-1 checkpoint of a 2-epoch run prints that run's epoch 2 and final test again,
    also when the resumed run offloads where the saved one did not, or the reverse.

    In fp32, where rounding differences stay in the last bits of the weights (see the fp16 test above).
    """
    cmd = ["deepspeed", "--num_gpus", "2", script, "--deepspeed", *SYNTHETIC, "-e", "2", "--log-interval", "10",
           "--synthetic-train-size", "800", "--synthetic-test-size", "200", *flags]
    full = launch(*cmd, "--save-dir", tmp_path / "full")
    assert full.returncode == 0, full.output[-3000:]

    def epoch_2_and_test(run):
        return [line for line in run.output.splitlines() if line.startswith(("[ 2, ", "Accuracy of"))
                and "samples/s" not in line]
    assert len(epoch_2_and_test(full)) > 11
    for name, (extra, offloaded) in resumes.items():
        save_dir = tmp_path / name.replace(" ", "-")
        subprocess.run(["cp", "-r", str(tmp_path / "full"), str(save_dir)], check=True)
        (save_dir / "latest").write_text("epoch1")
        resumed = launch(*cmd, *extra, "--save-dir", save_dir, "--resume")
        assert resumed.returncode == 0, f"resumed {name}:\n{resumed.output[-3000:]}"
        assert "at epoch 2" in resumed.output
        assert ("ZeRO-Offload: the optimizer's state and step on the cpu" in resumed.output) == offloaded
        assert epoch_2_and_test(resumed) == epoch_2_and_test(full), f"resumed {name}"


@pytest.mark.slow
def test_resume_on_two_nodes_from_a_shared_save_dir(tmp_path):
    nodes = Nodes(tmp_path)
    shared = tmp_path / "ckpt"
    flags = ["--dtype", "fp32", *SYNTHETIC, "--log-interval", "50", "--synthetic-train-size", "800", "--save-dir", shared]
    for run in nodes.run(script("run_ds.sh", *flags, "-e", "1")):
        assert run.returncode == 0, run.output[-3000:]
    first, second = nodes.run(script("run_ds.sh", *flags, "-e", "2", "--resume"))
    assert first.returncode == 0 and second.returncode == 0, first.output[-3000:] + second.output[-3000:]
    assert f"Resuming from {shared / 'epoch1'} at epoch 2" in first.output
    assert "[ 1, " not in first.output and "[ 2,    50] loss:" in first.output
    assert (shared / "latest").read_text().strip() == "epoch2"


# Checkpoints that do not fit
@pytest.fixture(scope="module")
def saved_dense_run(tmp_path_factory):
    """A one-epoch dense run that saved its checkpoint, shared by the refusal tests."""
    cwd = tmp_path_factory.mktemp("saved")
    cmd = ["python", ROOT / "cifar10_deepspeed.py", "--deepspeed", *SYNTHETIC, "--dtype", "fp32", "-e", "1",
           "--synthetic-train-size", "160", "--synthetic-test-size", "40", "--save-dir", cwd / "ckpt"]
    run = run_command(cmd, cwd)
    assert run.returncode == 0, run.output[-3000:]
    assert json.loads((cwd / "ckpt" / "epoch1" / "run.json").read_text())["world_size"] == 1
    return cmd[:-2], cwd / "ckpt"


def refused(launch, cmd, save_dir, *extra):
    run = launch(*cmd, "--save-dir", save_dir, "--resume", *extra)
    assert run.returncode == 1
    assert "Finished Training" not in run.output and "Traceback" not in run.output
    errors = [line for line in run.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, run.output[-3000:]
    return errors[0]


@pytest.mark.slow
def test_resume_from_an_empty_directory_is_refused(launch, saved_dense_run, tmp_path):
    cmd, _ = saved_dense_run
    assert refused(launch, cmd, tmp_path / "empty") == (
        f"error: --resume: no checkpoint in {tmp_path / 'empty'} (it has no 'latest' file)")


@pytest.mark.slow
def test_resume_into_another_model_shape_is_refused(launch, saved_dense_run):
    cmd, save_dir = saved_dense_run
    assert refused(launch, cmd, save_dir, "--moe", "--num-experts", "2") == (
        f"error: --resume: checkpoint {save_dir / 'epoch1'} was saved by a different run "
        "(moe False -> True, num_experts None -> [2], mlp_type None -> standard); "
        "resume with its settings, or save to another --save-dir")


@pytest.mark.slow
def test_resume_from_a_partial_checkpoint_is_refused(launch, saved_dense_run, tmp_path):
    cmd, save_dir = saved_dense_run
    partial = tmp_path / "partial"
    subprocess.run(["cp", "-r", str(save_dir), str(partial)], check=True)
    (partial / "epoch1" / "mp_rank_00_model_states.pt").unlink()
    error = refused(launch, cmd, partial)
    assert error.startswith(f"error: --resume: cannot load checkpoint {partial / 'epoch1'}: ")

    (partial / "epoch1" / "run.json").unlink()
    assert refused(launch, cmd, partial) == (
        f"error: --resume: checkpoint {partial / 'epoch1'} is incomplete (no readable run.json)")


@pytest.mark.slow
def test_resume_in_another_dtype_is_refused_and_names_init_from_which_trains_on(launch, saved_dense_run):
    cmd, save_dir = saved_dense_run
    assert refused(launch, cmd, save_dir, "--dtype", "bf16") == (
        f"error: --resume: checkpoint {save_dir / 'epoch1'} was saved by a different run (dtype fp32 -> bf16); "
        "resume with its settings, or save to another --save-dir; to train on from its weights in this dtype, "
        f"start a new run with --init-from {save_dir / 'epoch1'}")
    run = launch(*cmd, "--init-from", save_dir / "epoch1", "--dtype", "bf16", "--stage", "2")  # another layout
    assert run.returncode == 0, run.output[-3000:]
    assert (f"--init-from {save_dir / 'epoch1'}: the weights of every layer carried over from the checkpoint "
            "(10 tensors, 0 experts, each rank taking its own by global id); the optimizer and the LR schedule "
            "start fresh") in run.output
    assert sum(line.startswith("--init-from ") for line in run.output.splitlines()) == 1  # rank 0's line only
    assert "Accuracy of the network on the 40 test images:" in run.output


# Preemption


# 60 steps an epoch, a loss line every 25: the signal lands after [ 2,    25] and the ranks agree at step 30,
# inside a log interval, so the resumed run must carry the interval's first 5 steps to print the same lines.
SMALL = ["--dataset", "synthetic", "--synthetic-train-size", "960", "--synthetic-test-size", "200", "--seed", "1",
         "-e", "3", "--log-interval", "25", "--dtype", "fp32"]

PRINTED = re.compile(r"^(\[ *\d+, +\d+\] (loss|expert load)|\[\d+\] accuracy of the network|Accuracy of |Finished Training)")


def printed(run, after):
    """The reference's lines and the per-epoch accuracy (not the throughput) that the run printed after the line
    that starts with `after`."""
    lines = run.output.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith(after)]
    assert starts, f"no {after!r} in:\n{run.output[-3000:]}"
    return [line for line in lines[starts[0] + 1:] if PRINTED.match(line)]


@pytest.fixture(scope="module")
def preempted(tmp_path_factory):
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
    assert cifar10_deepspeed.resume(None, args) == checkpoints.Position()
    assert capsys.readouterr().out == f"--resume auto: no checkpoint in {tmp_path} yet, so training starts at epoch 1\n"


def test_keep_last_2_over_5_epochs_leaves_2_checkpoints_and_best(single_rank_group, parse, tmp_path, monkeypatch):
    """Each save prunes all but the newest 2, never what 'latest' or 'best' names; best follows the highest
    accuracy of the epochs evaluated, here that of epoch 2."""
    args = parse("--deepspeed", "--dataset", "synthetic", "--synthetic-train-size", "32", "--synthetic-test-size", "8",
                 "--dtype", "fp32", "-e", "5", "--eval-every", "1", "--save-dir", str(tmp_path), "--keep-last", "2",
                 "--log-interval", "100")
    engine, trainloader, testset = engine_of(args)
    accuracies = iter([([3], [8]), ([7], [8]), ([5], [8]), ([6], [8])])  # of epochs 1-4; epoch 5's is the final test
    monkeypatch.setattr(cifar10_deepspeed, "count_correct", lambda *_, **__: next(accuracies))
    cifar10_deepspeed.train(engine, trainloader, testset, args)
    assert sorted(os.listdir(tmp_path)) == ["best", "epoch2", "epoch4", "epoch5", "latest"]
    assert os.readlink(tmp_path / "best") == "epoch2" and (tmp_path / "latest").read_text() == "epoch5"
    assert (tmp_path / "best" / "eval.json").read_text() == '{"accuracy": 87.5}'


def test_checkpoints_are_ordered_by_the_training_they_hold():
    tags = ["epoch2", "epoch10", "epoch3-step40", "epoch3-step5", "epoch1"]
    assert sorted(tags, key=checkpoints.checkpoint_order) == [
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
    assert options.check_args(args, cifar10_deepspeed.get_ds_config(args), world_size=8) is None


@pytest.mark.slow
def test_a_disk_that_fills_during_a_save_loses_no_finished_epoch(launch, script, machine, tmp_path):
    """The disk fills while epoch 2's checkpoint is written (a stand-in for torch.save that writes part of the
    file, then fails with ENOSPC): every rank stops with SAVE_FAILED and one line, the partial checkpoint is
    removed, 'latest' still names epoch 1, and --resume continues from it to the end."""
    cmd = ["deepspeed", "--num_gpus", "2", script, "--deepspeed", *SMALL, "--stage", "1", "--save-dir", tmp_path / "ckpt"]
    full = launch(*cmd, env=machine(full_disk=f"{tmp_path / 'ckpt' / 'epoch2'}"))
    assert full.returncode == checkpoints.SAVE_FAILED, full.output[-3000:]
    errors = [line for line in full.output.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: could not save checkpoint {tmp_path / 'ckpt' / 'epoch2'} (No space left on device); "
                      f"removed it, and --resume continues from {tmp_path / 'ckpt' / 'epoch1'}"]
    assert "Traceback" not in full.output and "[ 3, " not in full.output
    assert sorted(name for name in os.listdir(tmp_path / "ckpt") if name.startswith("epoch")) == ["epoch1"]
    assert (tmp_path / "ckpt" / "latest").read_text() == "epoch1"
    resumed = launch(*cmd, "--resume")
    assert resumed.returncode == 0, resumed.output[-3000:]
    assert f"Resuming from {tmp_path / 'ckpt' / 'epoch1'} at epoch 2" in resumed.output
    assert "Finished Training" in resumed.output and (tmp_path / "ckpt" / "latest").read_text() == "epoch3"
