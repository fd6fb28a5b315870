"""cifar10ds/checkpoints.py, cifar10ds/preemption.py and the script's save_checkpoint and resume: a checkpoint
every epoch, resumed after a rank is killed; a scheduler's SIGTERM or SIGUSR1 or a Ctrl-C saving a mid-epoch
checkpoint on every rank, which --resume continues as if nothing had happened; a kill during a save leaving a
'latest' that loads; a disk that really fills; one run per save dir; --keep-last and best; checkpoints that do
not fit refused in one line; run_slurm.sbatch on a real SLURM cluster."""

import json
import os
import pty
import re
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

import cifar10_deepspeed
from cifar10ds import checkpoints, folders, metrics, model_files, options, preemption
from cifar10ds.launch import free_port
from conftest import (LAUNCH_TIMEOUT, ROOT, children, is_running, kill_session, launch_env, live_processes, metric, paused,
                      rank_pid, run_command, signal_when)
from test_launch import Nodes, script
from train_cells import engine_of
SYNTHETIC = ["--dataset", "synthetic", "--log-interval", "100", "--seed", "0"]


# Resume after a rank is killed
STEPS_PER_EPOCH = 200  # of the killed run; 600 in all, past the loss scale's first rise at step 501


def kill_rank_0_at(cmd, cwd, marker):
    """Launch, wait for `marker` in the output, SIGKILL rank 0 (which holds the save dir's lock), and return the
    launcher's Run."""
    run, _ = signal_when(cmd, cwd, lambda line: marker in line,
                         lambda _, output: os.kill(rank_pid(output, 0), signal.SIGKILL))
    return run


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory):
    """MoE with EP 2 in fp16, 3 epochs: run through; run again, SIGKILL rank 0 in epoch 2, and resume: the
    killed run's lock on the save dir went with it."""
    tmp = tmp_path_factory.mktemp("killed")

    def cmd(name, *extra):
        return ["deepspeed", "--num_gpus", "2", ROOT / "cifar10_deepspeed.py", "--deepspeed", *SYNTHETIC, "-e", "3",
                "--synthetic-train-size", str(16 * STEPS_PER_EPOCH),
                "--moe", "--ep-world-size", "2", "--num-experts", "2", "--save-dir", tmp / name,
                "--metrics-dir", tmp / f"{name}-metrics", *extra]

    full = run_command(cmd("full"), tmp)
    killed = kill_rank_0_at(cmd("killed"), tmp, marker="[ 2,   100] loss:")
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
    also when the resumed run offloads where the saved one did not, or the reverse; resumed as saved (CPU Adam,
    whose bias correction replay_host_adam_steps restores), it ends with the same weights, bit for bit.

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
        if not extra:  # resumed as saved: its final weights are the uninterrupted run's, bit for bit
            expected, got = (final_parameters(folder / "epoch2") for folder in (tmp_path / "full", save_dir))
            for key in expected:
                torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=f"resumed {name}: {key}")


@pytest.mark.slow
def test_two_nodes_resume_from_a_shared_save_dir_and_refuse_one_of_their_own(tmp_path):
    """A relative --save-dir on nodes started in folders of their own is a node-local folder: each node's ranks would
    save apart, and --resume load on node 0 and start afresh on node 1 (a hang, until the collective timeout).
    Every rank stops at once with one line. A shared one trains and resumes."""
    nodes = Nodes(tmp_path)
    local = ["--dtype", "fp32", *SYNTHETIC, "--synthetic-train-size", "800", "--save-dir", "ckpt"]
    for run in nodes.run(script("run_ds.sh", *local), timeout=120):
        assert run.returncode != 0 and "Traceback" not in run.output and (
            f"cifar10_deepspeed.py: error: --save-dir ckpt is not one folder every node shares: on host "
            f"{socket.gethostname()} it does not hold what rank 0 wrote there; give a folder on a file system every "
            f"node mounts (docs/nodes.md)") in run.output.splitlines(), run.output[-3000:]
    shared = tmp_path / "ckpt"
    flags = ["--dtype", "fp32", *SYNTHETIC, "--log-interval", "50", "--synthetic-train-size", "800", "--save-dir", shared]
    for run in nodes.run(script("run_ds.sh", *flags, "-e", "1")):
        assert run.returncode == 0, run.output[-3000:]
    first, second = nodes.run(script("run_ds.sh", *flags, "-e", "2", "--resume"))
    assert first.returncode == 0 and second.returncode == 0, first.output[-3000:] + second.output[-3000:]
    assert f"Resuming from {shared / 'epoch1'} at epoch 2" in first.output
    assert "[ 1, " not in first.output and "[ 2,    50] loss:" in first.output
    assert (shared / "latest").read_text().strip() == "epoch2"


def hang_up_when(command, cwd, ready):
    """Run a shell `command` in a terminal of its own, as an ssh session does, and close the terminal once
    ready(what it printed there) holds: the kernel hangs up its session (SIGHUP). Returns the seconds until every
    process of the session was gone (None: one still ran a minute on) and what the command printed before."""
    pid, terminal = pty.fork()  # the child leads a new session, the terminal its controlling one
    if pid == 0:
        os.chdir(cwd)
        os.execvpe("bash", ["bash", "-c", command], launch_env())
    try:
        output, deadline = b"", time.monotonic() + LAUNCH_TIMEOUT
        while not ready(output.decode(errors="replace")) and live_processes(pid) and time.monotonic() < deadline:
            try:
                if select.select([terminal], [], [], 1)[0]:
                    output += os.read(terminal, 65536)
            except OSError:  # EIO: no process holds the terminal any more (nohup let go of it)
                time.sleep(0.2)
        os.close(terminal)
        hung_up = time.monotonic()
        while live_processes(pid) and time.monotonic() - hung_up < 60:
            time.sleep(0.05)
        return (None if live_processes(pid) else time.monotonic() - hung_up), output.decode(errors="replace")
    finally:
        kill_session(pid)
        os.waitpid(pid, 0)


@pytest.mark.slow
def test_a_closed_terminal_ends_every_rank_as_a_kill_and_nohup_keeps_the_run(tmp_path):
    """An ssh session that drops hangs up the run in its terminal: every rank and the launcher end at once (no rank
    left training), and the finished epoch stays, as after a kill (--resume continues it:
    test_a_killed_rank_resumes_where_the_last_epoch_ended). Under nohup the run ignores the hang-up and finishes
    (docs/checkpoints.md)."""
    settings = "NUM_GPUS=2 BIND_CORES=0"
    run = (f"{ROOT / 'run_ds.sh'} --dataset synthetic --dtype fp32 --seed 0 --synthetic-train-size 3200 "
           "--synthetic-test-size 50 --log-interval 50 -e 2 --save-dir ckpt")
    gone, output = hang_up_when(f"{settings} {run}", tmp_path, lambda printed: "[ 2,    50] loss:" in printed)
    assert gone is not None and gone < 10 and (tmp_path / "ckpt" / "latest").is_file(), output[-3000:]
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == "epoch1" and "Finished Training" not in output

    nohup_out = tmp_path / "nohup.out"  # where nohup sends the output: once it is there, nohup ignores SIGHUP
    gone, _ = hang_up_when(f"{settings} nohup {run.replace('ckpt', 'nohup-ckpt')}", tmp_path,
                           lambda _: nohup_out.exists() and "[ 1,    50] loss:" in nohup_out.read_text())
    assert gone is not None, "the run outlived the minute the test waited"  # it trained on, then finished
    finished = nohup_out.read_text()
    assert "Finished Training" in finished and "Accuracy of the network" in finished, finished[-3000:]
    assert (tmp_path / "nohup-ckpt" / "latest").read_text().strip() == "epoch2"


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


def resume_refused(parse, capsys, save_dir, *extra):
    """The script's resume() in this process, on a dense fp32 engine (and `extra` flags): its one line, exit 1."""
    args = parse("--deepspeed", *SYNTHETIC, "--dtype", "fp32", "--synthetic-train-size", "160", "--synthetic-test-size",
                 "40", "--save-dir", str(save_dir), "--resume", *extra)
    engine = engine_of(args)[0]
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        cifar10_deepspeed.resume(engine, args)
    assert stop.value.code == 1
    return capsys.readouterr().err.strip()


@pytest.mark.slow
def test_resume_from_an_empty_directory_or_into_another_model_shape_is_refused(
        single_rank_group, parse, capsys, saved_dense_run, tmp_path):
    _, save_dir = saved_dense_run
    assert resume_refused(parse, capsys, tmp_path / "empty") == (
        f"error: --resume: no checkpoint in {tmp_path / 'empty'} (it has no 'latest' file)")
    assert resume_refused(parse, capsys, save_dir, "--moe", "--num-experts", "2") == (
        f"error: --resume: checkpoint {save_dir / 'epoch1'} was saved by a different run "
        "(moe False -> True, num_experts None -> [2], mlp_type None -> standard); "
        "resume with its settings, or save to another --save-dir")


@pytest.mark.slow
def test_resume_from_a_partial_checkpoint_is_refused(single_rank_group, parse, capsys, saved_dense_run, tmp_path):
    _, save_dir = saved_dense_run
    partial = tmp_path / "partial"
    subprocess.run(["cp", "-r", str(save_dir), str(partial)], check=True)
    (partial / "epoch1" / "mp_rank_00_model_states.pt").unlink()
    assert resume_refused(parse, capsys, partial).startswith(
        f"error: --resume: cannot load checkpoint {partial / 'epoch1'}: ")

    (partial / "epoch1" / "run.json").unlink()
    assert resume_refused(parse, capsys, partial) == (
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


# 60 steps an epoch, a loss line every 25: the signal lands after [ 2,    25], and the ranks stop at the second
# check after it (preemption.CHECK_EVERY: no loss line falls on a check, where the signal could land before a
# slower rank posts): at step 40 where it lands before step 32's check posts, later where the machine is slow to
# pass it on; inside a log interval, so the resumed run must carry the interval's first steps to print the same
# lines.
SMALL = ["--dataset", "synthetic", "--synthetic-train-size", "960", "--synthetic-test-size", "200", "--seed", "1",
         "-e", "3", "--log-interval", "25", "--dtype", "fp32"]


def stopped_at(run, epoch, how, steps_per_epoch=60):
    """The step of `epoch` at which a run preempted after its [ epoch,    25] loss line saved, read from its one
    line: a check, the second after step 25 at the earliest, mid-epoch."""
    saved = re.search(rf"^{how}: saved checkpoint \S+/epoch{epoch}-step(\d+); run again with --resume to continue "
                      rf"from there \(exit \d+\)$", run.output, re.M)
    assert saved, run.output[-3000:]
    step = int(saved[1])
    assert step % preemption.CHECK_EVERY == 0 and 40 <= step < steps_per_epoch, step
    return step


def logged_before(epoch, step):
    """The start of the last log line a SMALL run printed by `step` of `epoch` (a line every 25 steps)."""
    return f"[ {epoch}, {step // 25 * 25:5d}]"


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
    """run_ds_moe.sh (MoE with EP 2 on 2 ranks, RSample gate noise) in fp32, evaluated every epoch: a run straight
    through; the same run stopped by Ctrl-C in epoch 2 (SIGINT to its process group, as a terminal sends it); that
    run continued with --resume auto; and the straight run's epoch-1 checkpoint continued with --resume."""
    tmp = tmp_path_factory.mktemp("preempted")

    def cmd(save_dir, *extra):
        return [ROOT / "run_ds_moe.sh", *SMALL, "--eval-every", "1", "--save-dir", tmp / save_dir, *extra]

    full = run_command(cmd("full"), tmp)
    stopped, gone = signal_when(cmd("stopped"), tmp, lambda line: line.startswith("[ 2,    25] loss:"),
                                lambda launcher, _: os.killpg(launcher.pid, signal.SIGINT))
    latest = (tmp / "stopped" / "latest").read_text()
    step = stopped_at(stopped, 2, r"Interrupted by Ctrl-C \(SIGINT\)")
    resumed = run_command(cmd("stopped", "--resume", "auto"), tmp)
    subprocess.run(["cp", "-r", str(tmp / "full"), str(tmp / "from-epoch1")], check=True)
    (tmp / "from-epoch1" / "latest").write_text("epoch1")
    from_epoch1 = run_command(cmd("from-epoch1", "--resume"), tmp)
    return SimpleNamespace(tmp=tmp, full=full, stopped=stopped, gone=gone, latest=latest, step=step,
                           resumed=resumed, from_epoch1=from_epoch1)


@pytest.mark.slow
def test_ctrl_c_saves_mid_epoch_in_one_line_with_no_traceback_and_nothing_left_running(preempted):
    run = preempted
    assert run.full.returncode == 0, run.full.output[-3000:]
    assert run.latest == f"epoch2-step{run.step}"
    saved = run.tmp / "stopped" / run.latest
    assert {"expp_rank_0_mp_rank_00_optim_states.pt", "expp_rank_1_mp_rank_00_optim_states.pt"} <= set(os.listdir(saved))
    assert run.gone < 30, f"the ranks took {run.gone:.1f} s to leave"  # signal_when waits until none is left
    lines = run.stopped.output.splitlines()
    assert lines.count(f"Interrupted by Ctrl-C (SIGINT): saved checkpoint {saved}; run again with --resume to "
                       f"continue from there (exit 130)") == 1
    assert "Traceback" not in run.stopped.output and run.stopped.returncode != 0
    assert [line for line in lines if re.match(r"\[ 2, +\d+\] loss:", line)][-1].startswith(
        f"{logged_before(2, run.step)} loss:") and "Finished Training" not in lines


@pytest.mark.slow
def test_a_run_resumed_mid_epoch_prints_the_uninterrupted_runs_lines(preempted):
    """From the step after the stop, with the interval's first steps carried over: every loss, expert-load and
    accuracy line after the last before the stop is the uninterrupted run's, digit for digit (fp32, RSample noise
    included)."""
    run = preempted
    assert run.resumed.returncode == 0, run.resumed.output[-3000:]
    assert f"Resuming from {run.tmp / 'stopped' / run.latest} at epoch 2, step {run.step + 1}" in run.resumed.output
    assert "--resume auto: no checkpoint" not in run.resumed.output
    expected = printed(run.full, f"{logged_before(2, run.step)} expert load:")
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
    complete, and a third run resumes from it to the end, printing the uninterrupted dense run's lines. Epochs of
    120 steps: the signal, however late this machine passes it on, lands mid-epoch."""
    cmd = ["deepspeed", "--num_gpus", "2", script, "--deepspeed", *SMALL, "-e", "2", "--synthetic-train-size", "1920",
           "--save-dir", tmp_path / "ckpt"]
    full = launch(*cmd[:-1], tmp_path / "full")
    stopped, _ = signal_when(cmd, tmp_path, lambda line: line.startswith("[ 1,    25] loss:"),
                             lambda _, output: os.kill(rank_pid(output, 1), signal.SIGTERM))
    assert stopped.returncode == 75, stopped.output[-3000:]
    step = stopped_at(stopped, 1, "Preempted by SIGTERM", steps_per_epoch=120)
    tag = f"epoch1-step{step}"
    assert (f"Preempted by SIGTERM: saved checkpoint {tmp_path / 'ckpt' / tag}; run again with --resume "
            f"to continue from there (exit 75)") in stopped.output

    def kill_rank_1_as_epoch1_is_saved(_, output):
        deadline = time.monotonic() + 120
        while not (tmp_path / "ckpt" / "epoch1").exists() and time.monotonic() < deadline:
            time.sleep(0.001)
        os.kill(rank_pid(output, 1), signal.SIGKILL)
    killed, _ = signal_when([*cmd, "--resume"], tmp_path, lambda line: line.startswith("Resuming from"),
                            kill_rank_1_as_epoch1_is_saved)
    assert killed.returncode != 0 and "Finished Training" not in killed.output
    assert (tmp_path / "ckpt" / "latest").read_text() == tag
    resumed = launch(*cmd, "--resume")
    assert resumed.returncode == 0, resumed.output[-3000:]
    assert f"Resuming from {tmp_path / 'ckpt' / tag} at epoch 1, step {step + 1}" in resumed.output
    assert printed(resumed, "Resuming from") == printed(full, f"{logged_before(1, step)} loss:")


@pytest.mark.slow
def test_ctrl_c_on_plain_python_without_a_save_dir_is_one_line(launch, script, tmp_path):
    run, gone = signal_when(["python", script, "--deepspeed", *SMALL], tmp_path,
                            lambda line: line.startswith("[ 1,    25] loss:"),
                            lambda launcher, _: launcher.send_signal(signal.SIGINT))
    assert run.returncode == 130 and gone < 30
    assert "Interrupted by Ctrl-C (SIGINT): nothing saved, as there is no --save-dir (exit 130)" in run.output
    assert "Traceback" not in run.output


@pytest.mark.slow
def test_slurms_signal_during_start_up_stops_the_run_at_its_first_agreement(launch, script, tmp_path):
    """SIGUSR1 as the run starts (SLURM's --signal lands wherever the job is): noted, not the default action that
    ends the process silently; the run stops at its first agreement, 16 steps in."""
    run, _ = signal_when(["python", script, "--deepspeed", *SMALL], tmp_path,
                         lambda line: line.startswith("accelerator:"),
                         lambda launcher, _: launcher.send_signal(signal.SIGUSR1))
    assert run.returncode == 128 + signal.SIGUSR1, run.output[-3000:]
    assert "Preempted by SIGUSR1: nothing saved, as there is no --save-dir (exit 138)" in run.output.splitlines()
    assert "[ 1,    25] loss:" not in run.output


@pytest.mark.slow
def test_slurms_signals_during_the_final_test_let_it_finish_and_the_run_ends_as_finished(script, tmp_path):
    """SIGUSR1 and SIGTERM once training has finished and was saved (a time limit that comes during Step 4): the
    final test runs to its end and prints its lines, and the run exits 0, as finished, saying why (not the signal's
    default action, which ended the process in silence: exit 138, neither requeued nor finished). The test's
    20,000 images take seconds, longer than the signals take to arrive."""
    def usr1_then_term(launcher, _):
        launcher.send_signal(signal.SIGUSR1)
        launcher.send_signal(signal.SIGTERM)
    run, _ = signal_when(["python", script, "--deepspeed", *SMALL, "-e", "1", "--synthetic-test-size", "20000",
                          "--save-dir", tmp_path / "ckpt"], tmp_path, lambda line: line == "Finished Training\n",
                         usr1_then_term)
    assert run.returncode == 0, run.output[-3000:]
    lines = run.output.splitlines()
    assert "Accuracy of the network on the 20000 test images:" in lines[-12] and lines[-11].startswith(
        "Accuracy of plane :") and lines[-1] == ("SIGTERM came after training had finished: the final test ran to "
                                                  "its end, and the run ends as finished (exit 0)"), run.output[-3000:]
    assert (tmp_path / "ckpt" / "latest").read_text() == "epoch1"


@pytest.mark.slow
def test_ctrl_c_on_torchrun_saves_and_its_ranks_print_no_traceback(script, tmp_path):
    """torchrun starts each rank in a session of its own: the terminal's Ctrl-C reaches torchrun, which passes it
    on. The ranks save and say where in one line; torchrun prints a traceback of its own (its SignalException,
    TESTING.md); no rank is left running."""
    ranks = []

    def ctrl_c(launcher, _):
        ranks.extend(children(launcher.pid))
        os.killpg(launcher.pid, signal.SIGINT)
    run, gone = signal_when(["torchrun", "--standalone", "--nproc_per_node", "2", script, "--deepspeed", *SMALL,
                             "--save-dir", tmp_path / "ckpt"], tmp_path,
                            lambda line: line.startswith("[ 1,    25] loss:"), ctrl_c)
    assert len(ranks) == 2 and not [pid for pid in ranks if is_running(pid)] and gone < 30
    saved = tmp_path / "ckpt" / (tmp_path / "ckpt" / "latest").read_text()
    assert (f"Interrupted by Ctrl-C (SIGINT): saved checkpoint {saved}; run again with --resume to continue from "
            f"there (exit 130)") in run.output.splitlines()
    assert str(script) not in run.output and "cifar10ds" not in run.output  # no traceback through this project


@pytest.mark.slow
def test_a_second_ctrl_c_stops_at_once(script, tmp_path):
    """Two Ctrl-Cs before training reaches its first agreement (10 optimizer steps of 40 micro-batches each):
    the second stops the run at once, in one line, with nothing saved."""
    def twice(launcher, _):
        launcher.send_signal(signal.SIGINT)
        time.sleep(preemption.Preemption.PASSED_ON + 0.2)
        launcher.send_signal(signal.SIGINT)
    run, gone = signal_when(["python", script, "--deepspeed", *SMALL, "--synthetic-train-size", "16000",
                             "--batch-size", "640", "--micro-batch", "16", "--save-dir", tmp_path / "ckpt"], tmp_path,
                            lambda line: line.startswith("accelerator:"), twice)
    assert run.returncode == 130 and gone < 5, run.output[-3000:]
    assert "Stopped at once by Ctrl-C (exit 130): nothing was saved since the last complete checkpoint" in run.output
    assert "Traceback" not in run.output and "Interrupted by" not in run.output
    assert not (tmp_path / "ckpt" / "latest").exists()


def test_resume_auto_starts_afresh_where_there_is_no_checkpoint(single_rank_group, parse, tmp_path, capsys):
    args = parse("--deepspeed", *SMALL, "--save-dir", str(tmp_path), "--resume", "auto")
    assert cifar10_deepspeed.resume(None, args) == checkpoints.Position()
    assert capsys.readouterr().out == f"--resume auto: no checkpoint in {tmp_path} yet, so training starts at epoch 1\n"


def test_a_latest_that_names_no_checkpoint_says_which_there_are(single_rank_group, parse, tmp_path, capsys):
    """'latest' edited by hand, or its checkpoint deleted: one line naming what is there, before DeepSpeed reads."""
    args = parse("--deepspeed", *SMALL, "--save-dir", str(tmp_path), "--resume")
    for tag in ("epoch1", "epoch2-step8"):
        (tmp_path / tag).mkdir()
    for latest, what in (("epoch9\n", "names epoch9, which is not there"), ("", "is empty")):
        (tmp_path / "latest").write_text(latest)
        with pytest.raises(SystemExit) as stop:
            cifar10_deepspeed.resume(None, args)
        assert stop.value.code == 1 and capsys.readouterr().err == (
            f"error: --resume: 'latest' in {tmp_path} {what}; write the name of one of its checkpoints into it "
            f"(epoch1, epoch2-step8) to resume from there\n")


def test_keep_last_2_over_5_epochs_leaves_2_checkpoints_and_best(single_rank_group, parse, tmp_path, monkeypatch,
                                                                 capsys):
    """Each save prunes all but the newest 2, never what 'latest' or 'best' names; best follows the highest
    accuracy of the epochs evaluated, here that of epoch 2. Resumed with --epochs 3 (one more epoch meant, say),
    the run says that --epochs counts the 5 saved epochs too, and trains none."""
    def flags(epochs, *extra):
        return parse("--deepspeed", "--dataset", "synthetic", "--synthetic-train-size", "32", "--synthetic-test-size",
                     "8", "--dtype", "fp32", "-e", epochs, "--eval-every", "1", "--save-dir", str(tmp_path),
                     "--keep-last", "2", "--log-interval", "100", *extra)
    args = flags("5")
    engine, trainloader, testset = engine_of(args)
    accuracies = iter([([3], [8]), ([7], [8]), ([5], [8]), ([6], [8])])  # of epochs 1-4; epoch 5's is the final test
    monkeypatch.setattr(cifar10_deepspeed, "count_correct", lambda *_, **__: next(accuracies))
    cifar10_deepspeed.train(engine, trainloader, testset, args)
    assert sorted(os.listdir(tmp_path)) == ["best", "epoch2", "epoch4", "epoch5", "latest"]
    assert os.readlink(tmp_path / "best") == "epoch2" and (tmp_path / "latest").read_text() == "epoch5"
    assert (tmp_path / "best" / "eval.json").read_text() == '{"accuracy": 87.5}'
    args = flags("3", "--resume")
    engine, trainloader, testset = engine_of(args)
    capsys.readouterr()
    cifar10_deepspeed.train(engine, trainloader, testset, args, cifar10_deepspeed.resume(engine, args))
    assert (f"Resuming from {tmp_path / 'epoch5'} at epoch 6 (--epochs 3 counts every epoch, these too: none is left "
            f"to train, only the test runs)\n") in capsys.readouterr().out
    assert engine.global_steps == 5 * 2 and (tmp_path / "latest").read_text() == "epoch5"


def test_a_mid_epoch_checkpoint_resumed_in_another_batch_trains_the_rest_of_its_epoch(
        single_rank_group, parse, tmp_path, capsys, monkeypatch):
    """SIGUSR1 at step 4 of an epoch of 24 batches of 4 saves epoch1-step16 (64 samples; a signal acts at the second
    agreement after it). Resumed in batches of 8, the epoch goes on from sample 65 (step 9): 96 samples in all, none
    skipped, none twice. Its first throughput line, whose interval began in the saved run, counts the 2 steps this
    run timed (on a clock that ticks a second a step). A batch that does not divide 64, or another data order, is
    refused in one line before anything loads."""
    def flags(*extra):
        return parse("--deepspeed", "--dataset", "synthetic", "--synthetic-train-size", "96", "--synthetic-test-size",
                     "8", "--dtype", "fp32", "-e", "1", "--log-interval", "10", "--seed", "0", "--save-dir",
                     str(tmp_path), *extra)

    args = flags("--batch-size", "4")
    engine, trainloader, testset = engine_of(args)
    def signal_in_step_4(*_):
        if engine.global_steps == 3:
            os.kill(os.getpid(), signal.SIGUSR1)

    signals = preemption.Preemption()
    try:
        engine.module.register_forward_pre_hook(signal_in_step_4)
        with pytest.raises(SystemExit) as stop:
            cifar10_deepspeed.train(engine, trainloader, testset, args, signals=signals)
    finally:
        signals.close()
    assert stop.value.code == preemption.PREEMPTED and (tmp_path / "latest").read_text() == "epoch1-step16"

    for batch, line in (("24", "stopped 64 samples into epoch 1 (16 batches of 4), not a whole number of batches of "
                               "24: resume it with a global batch that divides 64, such as 4"),
                        ("8 --seed 1", "stopped in epoch 1, in the data order of --seed 0: resume it with --seed 0, "
                                       "or from a checkpoint of an epoch's end")):
        assert resume_refused(parse, capsys, tmp_path, "--batch-size", *batch.split()) == (
            f"error: --resume: checkpoint {tmp_path / 'epoch1-step16'} {line}")

    args = flags("--resume", "--batch-size", "8")
    engine, trainloader, testset = engine_of(args)
    start = cifar10_deepspeed.resume(engine, args)
    assert (start.epoch, start.step) == (0, 8) and (
        f"Resuming from {tmp_path / 'epoch1-step16'} at epoch 1, step 9 (64 samples into it, in batches of 8, 4 "
        f"before)\n") in capsys.readouterr().out
    monkeypatch.setattr(metrics, "time", SimpleNamespace(perf_counter=lambda: float(engine.global_steps)))
    cifar10_deepspeed.train(engine, trainloader, testset, args, start)
    assert (engine.global_steps, engine.global_samples) == (16 + 4, 96)
    assert "[ 1,    10] 8 samples/s, 12.0 s/epoch," in capsys.readouterr().out  # steps 17 and 18, of 8 samples


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


# A full disk, for real: a tmpfs of the test's own that it shrinks to what it holds while the run trains epoch 2.
def could_not_save(run, folder, resumes):
    """The one line a failed save gives (once per node), exit SAVE_FAILED, no traceback."""
    assert run.returncode == checkpoints.SAVE_FAILED, run.output[-3000:]
    errors = [line for line in run.output.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: could not save checkpoint {folder} (No space left on device); removed it, and "
                      f"--resume continues from {resumes}"], run.output[-3000:]
    assert "Traceback" not in run.output


@pytest.mark.slow
def test_a_disk_full_at_a_signals_save_loses_nothing_and_export_onto_it_is_one_line(script, small_disk, tmp_path):
    """One rank: the disk is full when SIGTERM's mid-epoch save begins (its run.json cannot be written). The
    checkpoint is removed, 'latest' still names epoch 1; export_model.py onto the full disk says so and leaves no
    file; once there is room, --resume trains to the end."""
    ckpt = small_disk.path / "ckpt"
    steps = 300  # an epoch: the run stops well inside epoch 2, however late this machine acts on its line
    cmd = ["python", script, "--deepspeed", *SMALL, "--synthetic-train-size", str(16 * steps), "--log-interval", "10",
           "--save-dir", ckpt]

    def full_then_sigterm(launcher, _):
        with paused(launcher):
            small_disk.fill()
            launcher.send_signal(signal.SIGTERM)
    run, _ = signal_when(cmd, tmp_path, lambda line: line.startswith("[ 2,    10] loss:"), full_then_sigterm)
    # the run stops at the second agreement check after the signal
    stopped = re.search(rf"^error: could not save checkpoint {re.escape(str(ckpt))}/epoch2-step(\d+) ", run.output, re.M)
    assert stopped and int(stopped[1]) % preemption.CHECK_EVERY == 0 and int(stopped[1]) < steps, run.output[-3000:]
    could_not_save(run, ckpt / f"epoch2-step{stopped[1]}", ckpt / "epoch1")
    assert sorted(os.listdir(ckpt)) == [folders.RUN_LOCK, "epoch1", "latest"]
    assert (ckpt / "latest").read_text() == "epoch1"

    export = run_command(["python", ROOT / "export_model.py", ckpt, "-o", small_disk.path / "model.pt"], tmp_path)
    assert export.returncode == 1 and "Traceback" not in export.output, export.output[-3000:]
    assert export.output.splitlines()[-1] == (f"export_model.py: error: could not write {small_disk.path / 'model.pt'} "
                                              f"(No space left on device); nothing written")
    assert not any(name.startswith("model.pt") for name in os.listdir(small_disk.path))

    small_disk.grow()
    resumed = run_command([*cmd, "--resume"], tmp_path)
    assert resumed.returncode == 0, resumed.output[-3000:]
    assert f"Resuming from {ckpt / 'epoch1'} at epoch 2" in resumed.output
    assert (ckpt / "latest").read_text() == "epoch3"


@pytest.mark.slow
def test_a_disk_that_fills_inside_torch_save_on_two_ranks_loses_no_finished_epoch(script, small_disk, tmp_path):
    """Two ranks, ZeRO 1: 32 KiB are left when epoch 2's checkpoint is written, so run.json fits and torch.save
    fails partway (a RuntimeError from its zip writer, not an OSError). Every rank stops with SAVE_FAILED, the
    partial checkpoint is removed, and --resume continues from epoch 1 to the end."""
    ckpt = small_disk.path / "ckpt"
    cmd = ["deepspeed", "--num_gpus", "2", script, "--deepspeed", *SMALL, "-e", "2", "--stage", "1",
           "--synthetic-train-size", "3200", "--log-interval", "10", "--save-dir", ckpt]  # 100 steps an epoch

    def fill(launcher, _):
        with paused(launcher):  # the disk fills before epoch 2's save, however late this machine acts on the line
            small_disk.fill(leave=32 * 1024)
    run, _ = signal_when(cmd, tmp_path, lambda line: line.startswith("[ 2,    10] loss:"), fill)
    could_not_save(run, ckpt / "epoch2", ckpt / "epoch1")
    assert sorted(name for name in os.listdir(ckpt) if name.startswith("epoch")) == ["epoch1"]
    assert (ckpt / "latest").read_text() == "epoch1"
    small_disk.grow()
    resumed = run_command([*cmd, "--resume"], tmp_path)
    assert resumed.returncode == 0, resumed.output[-3000:]
    assert f"Resuming from {ckpt / 'epoch1'} at epoch 2" in resumed.output and "Finished Training" in resumed.output


@pytest.mark.slow
def test_a_save_that_fails_on_rank_1_alone_stops_every_rank_the_same_way(script, tmp_path):
    """Rank 1 cannot write its ZeRO partition of epoch 2 (a directory stands where its file goes), rank 0 writes
    all of its own: both stop with the one line naming torch's reason, and the checkpoint is removed."""
    ckpt = tmp_path / "ckpt"
    (ckpt / "epoch2" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").mkdir(parents=True)
    run = run_command(["deepspeed", "--num_gpus", "2", script, "--deepspeed", *SMALL, "-e", "2", "--stage", "1",
                       "--save-dir", ckpt], tmp_path)
    assert run.returncode == checkpoints.SAVE_FAILED, run.output[-3000:]
    errors = [line for line in run.output.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: could not save checkpoint {ckpt / 'epoch2'} (open file failed with strerror: Is a "
                      f"directory); removed it, and --resume continues from {ckpt / 'epoch1'}"], run.output[-3000:]
    assert "Traceback" not in run.output and not (ckpt / "epoch2").exists()
    assert (ckpt / "latest").read_text() == "epoch1"


def test_latest_on_a_full_disk_stays_as_it_was(small_disk):
    latest = small_disk.path / "latest"
    latest.write_text("epoch1")
    (small_disk.path / "filler").write_bytes(bytes(4096))
    small_disk.fill()
    with pytest.raises(OSError):
        checkpoints.replace_file(latest, "epoch2" * 2000)
    assert latest.read_text() == "epoch1" and sorted(os.listdir(small_disk.path)) == ["filler", "latest"]


# run_slurm.sbatch on a real SLURM cluster of this machine: slurmctld, slurmd and munge on 127.0.0.1, one node of
# its cores, no GPU. The time limit makes SLURM send its own SIGUSR1 (--signal=USR1@90): the ranks save mid-epoch,
# exit 75, the script requeues the job, the requeued job goes on by --resume auto; `scontrol requeue` (SIGTERM)
# mid-epoch does the same; the last job's final parameters are the uninterrupted run's.
DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol")
SLURM_CONF = """\
ClusterName=cifar10test
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# cred_expire is also how long a requeued job waits before it may start again (120 s by default)
AuthInfo=socket={dir}/munge.socket,cred_expire=5
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd.log
ReturnToService=2
NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=test Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""
# What a CPU node needs of run_slurm.sbatch (docs/nodes.md): no GPUs, and one task per rank on this node.
CPU_NODE = ["--gpus-per-node=0", "--ntasks-per-node=2"]
# 2 ranks, fp32, seeded: 2 epochs of 1,500 steps, 32 s in all on an idle Intel Xeon of 2 cores, 4 of them start-up.
# slurmctld checks time limits every 30 s, on its own clock, and sends --signal=USR1@90 at the first check where
# less than 90 + 30 s is left: on a 2-minute limit, at the first check after the job starts, anywhere in its first
# 30 s, so a job started at random may be signalled before its ranks note signals, or after they are done. The job
# is started so that it comes halfway through the time the same run took straight through just before (at most
# 28 s): its ranks, which start as slowly as the machine is busy (14 s or more beside the other test worker's
# launches), note signals by then, and train on past it.
SLURM_JOB_FLAGS = ["--dataset", "synthetic", "--synthetic-train-size", "24000", "--synthetic-test-size", "200", "--seed", "0",
         "--dtype", "fp32", "-e", "2", "--log-interval", "100"]


TICK = 30  # seconds between slurmctld's checks of time limits (PERIODIC_TIMEOUT in its source)


def wait_for(what, condition, timeout=300, every=0.2, shown=lambda: ""):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"waited {timeout} s for {what}\n{shown()}"
        time.sleep(every)
    return value


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A SLURM cluster of this machine, started for this module and stopped after it: the environment in which
    sbatch and scontrol reach it. Skipped, with the reason, where its daemons are missing or cannot start."""
    missing = [name for name in DAEMONS if not shutil.which(name)]
    if missing:
        pytest.skip(f"no SLURM here ({', '.join(missing)} not found; .ci/run installs slurm-wlm and munge)")
    folder = tmp_path_factory.mktemp("slurm")
    (folder / "state").mkdir()
    (folder / "spool").mkdir()
    key = folder / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    conf = folder / "slurm.conf"
    conf.write_text(SLURM_CONF.format(dir=folder, ctld_port=free_port(), slurmd_port=free_port(),
                                      cpus=os.cpu_count()))
    env = launch_env({"SLURM_CONF": str(conf)})  # not this worker's MASTER_PORT, which its own process group holds
    started = []
    for command in (["munged", "--force", f"--key-file={key}", f"--socket={folder}/munge.socket",
                     f"--pid-file={folder}/munged.pid", f"--log-file={folder}/munged.log",
                     f"--seed-file={folder}/munge.seed"],
                    ["slurmctld", "-f", str(conf)], ["slurmd", "-f", str(conf), "-N", "localhost"]):
        daemon = subprocess.run(command, env=env, capture_output=True, text=True)
        if daemon.returncode:
            stop_cluster(folder, env)
            pytest.skip(f"SLURM's {command[0]} cannot start here: {daemon.stderr.strip()[-500:]}")
        started.append(command[0])
    try:
        wait_for("the node to be idle", lambda: subprocess.run(
            ["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True).stdout.strip() == "idle",
            timeout=60)
    except AssertionError:
        stop_cluster(folder, env)
        pytest.skip(f"SLURM's node did not come up: {(folder / 'slurmd.log').read_text()[-500:]}")
    yield SimpleNamespace(env=env, folder=folder)
    stop_cluster(folder, env)


def stop_cluster(folder, env):
    """Cancel every job, wait until none runs, then stop the daemons."""
    subprocess.run(["scancel", "--full", "--user", "root"], env=env, capture_output=True)
    deadline = time.monotonic() + 60
    while subprocess.run(["squeue", "-h"], env=env, capture_output=True, text=True).stdout.strip() and \
            time.monotonic() < deadline:
        time.sleep(0.5)
    subprocess.run(["scontrol", "shutdown"], env=env, capture_output=True)
    for name in ("slurmd", "slurmctld", "munged"):
        pid_file = folder / f"{name}.pid"
        if pid_file.exists():
            try:
                os.kill(int(pid_file.read_text()), 15)
            except (ProcessLookupError, ValueError):
                pass


def probe_time_limit_checks(slurm, tmp):
    """A job of one task on a 2-minute limit that writes the time (time.time()) SLURM's --signal=USR1@90 reaches
    it, at slurmctld's first check of time limits after it starts: the log it writes to."""
    log = tmp / "probe.log"
    subprocess.run(["sbatch", "--gpus-per-node=0", "--ntasks=1", "--time=2", "--signal=USR1@90", f"--output={log}",
                    "--wrap", "srun --quiet bash -c 'trap \"echo check \\$(date +%s.%N); exit\" USR1; "
                    "while :; do sleep 0.1; done'"], env=slurm.env, check=True, capture_output=True)
    return log


def time_limit_check(probe_log):
    """When slurmctld checked time limits, as the probe saw it."""
    found = lambda: re.search(r"^check (\S+)$", probe_log.read_text() if probe_log.exists() else "", re.M)  # noqa: E731
    return float(wait_for("the probe job's SIGUSR1", found, timeout=2 * TICK + 30)[1])


def pinned_begin(check, signal_after):
    """sbatch --begin for a job that SLURM signals `signal_after` seconds after it starts: that many seconds before
    a time-limit check, the first such time at least 2 s from now."""
    begin = check + TICK - signal_after
    while begin < time.time() + 2:
        begin += TICK
    return "--begin=" + time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(round(begin)))


def job_state(slurm, job):
    shown = subprocess.run(["scontrol", "show", "job", job], env=slurm.env, capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S+)", shown))


def scontrol(slurm, *args):
    subprocess.run(["scontrol", *args], env=slurm.env, check=True, capture_output=True)


def final_parameters(save_dir):
    return model_files.export(str(save_dir), cifar10_deepspeed.Net)["state_dict"]


@pytest.fixture(scope="module")
def requeued(slurm, tmp_path_factory):
    """The same run launched straight through; then the job as a user submits it, on a time limit of 2 minutes,
    started so that slurmctld's check of time limits comes halfway through the time the straight run took
    (SLURM_JOB_FLAGS): SLURM's SIGUSR1 comes mid-epoch and the job requeues itself; the requeued job is given 10
    minutes (SLURM keeps a job's time limit over requeues: it would be signalled again), and `scontrol requeue`
    stops it mid-epoch; the third job trains to the end."""
    tmp = tmp_path_factory.mktemp("requeued")
    probe = probe_time_limit_checks(slurm, tmp)
    begun = time.monotonic()
    straight = run_command(["deepspeed", "--num_gpus", "2", ROOT / "cifar10_deepspeed.py", "--deepspeed", *SLURM_JOB_FLAGS,
                            "--save-dir", tmp / "straight"], tmp)
    signal_after = min(TICK - 2, (time.monotonic() - begun) / 2)
    log = tmp / "job.log"
    env = {**slurm.env, "SAVE_DIR": str(tmp / "ckpt"),
           "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}"}
    submitted = subprocess.run(["sbatch", "--parsable", *CPU_NODE, "--time=2", pinned_begin(time_limit_check(probe), signal_after),
                                f"--output={log}", "run_slurm.sbatch", *SLURM_JOB_FLAGS], cwd=ROOT, env=env,
                               capture_output=True, text=True)
    assert submitted.returncode == 0, submitted.stderr
    job = submitted.stdout.strip()
    text = lambda: log.read_text() if log.exists() else ""  # noqa: E731
    shown = lambda: f"{job_state(slurm, job)}\n{text()[-3000:]}"  # noqa: E731
    wait_for("SLURM's SIGUSR1 and the job's requeue", lambda: "Preempted by SIGUSR1" in text() and job_state(
        slurm, job).get("JobState") == "PENDING", shown=shown)
    scontrol(slurm, "update", f"JobId={job}", "TimeLimit=10")
    wait_for("the requeued job's first loss line", lambda: re.search(r"Resuming from .*\n(.*\n)*\[ *\d+, +\d+\] loss",
                                                                      text()), shown=shown)
    scontrol(slurm, "requeue", job)
    wait_for("the third job to finish", lambda: job_state(slurm, job).get("JobState") in ("COMPLETED", "FAILED"),
             timeout=600, shown=shown)
    return SimpleNamespace(tmp=tmp, straight=straight, log=text(), state=job_state(slurm, job))


@pytest.mark.slow
def test_slurms_time_limit_signal_and_requeue_save_and_the_job_goes_on_by_itself(requeued):
    assert requeued.straight.returncode == 0, requeued.straight.output[-3000:]
    assert requeued.state["JobState"] == "COMPLETED" and requeued.state["Restarts"] == "2", requeued.log[-3000:]
    lines = requeued.log.splitlines()
    stops = [line for line in lines if line.startswith(("Preempted by", "Interrupted by"))]
    saved = re.compile(rf"Preempted by (SIGUSR1|SIGTERM): saved checkpoint {requeued.tmp / 'ckpt'}/(epoch\d-step\d+); "
                       r"run again with --resume to continue from there \(exit 75\)")
    assert [saved.fullmatch(line).group(1) for line in stops] == ["SIGUSR1", "SIGTERM"], stops
    positions = [re.fullmatch(r"epoch(\d+)-step(\d+)", saved.fullmatch(line).group(2)).groups() for line in stops]
    assert [line for line in lines if line.startswith("Resuming from")] == [
        f"Resuming from {requeued.tmp / 'ckpt'}/epoch{epoch}-step{step} at epoch {epoch}, step {int(step) + 1}"
        for epoch, step in positions], requeued.log[-3000:]
    assert lines.count("Finished Training") == 1 and "Traceback" not in requeued.log


@pytest.mark.slow
def test_the_requeued_jobs_final_parameters_are_the_uninterrupted_runs(requeued):
    expected, got = final_parameters(requeued.tmp / "straight"), final_parameters(requeued.tmp / "ckpt")
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-5, msg=name)


@pytest.mark.slow
def test_an_arrays_jobs_on_one_node_train_side_by_side(slurm, tmp_path):
    """sbatch --array=0-1 of one-rank jobs (a sweep), MASTER_PORT unset: SLURM runs both on this one node at once,
    each on a port of its own (on a fixed one, the second could not bind it and stopped), each into its own
    ckpt-<job>, and both train. The jobs run in a folder of links to the script and its package, which sbatch
    runs from the folder it is submitted in."""
    for name in ("cifar10_deepspeed.py", "cifar10ds"):
        (tmp_path / name).symlink_to(ROOT / name)
    env = {**slurm.env, "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}"}
    submitted = subprocess.run(["sbatch", "--parsable", "--array=0-1", "--gpus-per-node=0", "--ntasks-per-node=1",
                                "--time=5", f"--output={tmp_path}/job-%a.log", ROOT / "run_slurm.sbatch", *SMALL,
                                "-e", "1", "--synthetic-train-size", "16000"], cwd=tmp_path, env=env,
                               capture_output=True, text=True)
    assert submitted.returncode == 0, submitted.stderr
    array = submitted.stdout.strip()
    jobs = lambda state: subprocess.run(["squeue", "-h", "-j", array, "-t", state, "-o", "%i"], env=slurm.env,  # noqa: E731
                                        capture_output=True, text=True).stdout.split()
    wait_for("both of the array's jobs running at once", lambda: len(jobs("R")) == 2, timeout=120)
    wait_for("the array's jobs to end", lambda: not jobs("PENDING,RUNNING,COMPLETING"), timeout=300)
    shown = subprocess.run(["scontrol", "show", "job", array], env=slurm.env, capture_output=True, text=True).stdout
    logs = [(tmp_path / f"job-{task}.log").read_text() for task in (0, 1)]
    assert re.findall(r"JobState=(\S+)", shown) == ["COMPLETED", "COMPLETED"], logs
    for log in logs:
        assert log.splitlines().count("Finished Training") == 1 and "error:" not in log, log[-3000:]
    assert len(list(tmp_path.glob("ckpt-*/latest"))) == 2


@pytest.mark.slow
def test_a_given_master_port_that_is_taken_stops_the_job_before_its_ranks_start(slurm, tmp_path):
    """MASTER_PORT given, and held by another run on rank 0's node: the batch script stops in one line, before
    srun starts a rank (rank 0 would stop on it, and the others, which srun leaves running, would wait on that run
    for --dist-timeout)."""
    log = tmp_path / "job.log"
    env = {**slurm.env, "SAVE_DIR": str(tmp_path / "ckpt"),
           "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}"}
    with socket.socket() as held:
        held.bind(("", 0))
        held.listen()
        port = held.getsockname()[1]
        submitted = subprocess.run(["sbatch", "--parsable", *CPU_NODE, "--time=5", f"--output={log}", "run_slurm.sbatch",
                                    *SMALL], cwd=ROOT, env={**env, "MASTER_PORT": str(port)}, capture_output=True,
                                   text=True)
        assert submitted.returncode == 0, submitted.stderr
        job = submitted.stdout.strip()
        state = wait_for("the job to end", lambda: job_state(slurm, job).get("JobState") in ("COMPLETED", "FAILED")
                         and job_state(slurm, job), timeout=120)
    text = log.read_text()
    assert state["JobState"] == "FAILED" and state["ExitCode"] == "1:0", text[-3000:]
    assert re.fullmatch(rf"error: port {port} of {re.escape(socket.gethostname())} is taken: in use by another run\? "
                        r"Give this run a free one \(MASTER_PORT=\d+\), or leave MASTER_PORT unset for one\n", text), text
