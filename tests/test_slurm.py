"""run_slurm.sbatch on a real SLURM cluster on this machine: slurmctld, slurmd and munge on 127.0.0.1, one node
of this machine's cores, no GPU. The job's time limit makes SLURM send its own SIGUSR1 (--signal=USR1@90): the
ranks save mid-epoch, exit 75, the script requeues the job, and the requeued job goes on by --resume auto.
`scontrol requeue` (SIGTERM) mid-epoch does the same. The last job's final parameters are the uninterrupted
run's."""

import os
import re
import shutil
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

import cifar10_deepspeed
from cifar10ds import model_files
from cifar10ds.launch import free_port
from conftest import ROOT, launch_env, run_command

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
# 2 ranks, fp32, seeded: 2 epochs of 1,500 steps, about 30 s of training here: SIGUSR1 comes in its first 30 s.
FLAGS = ["--dataset", "synthetic", "--synthetic-train-size", "24000", "--synthetic-test-size", "200", "--seed", "0",
         "--dtype", "fp32", "-e", "2", "--log-interval", "100"]


def wait_for(what, condition, timeout=300, every=0.2):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"waited {timeout} s for {what}"
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
    env = {**os.environ, "SLURM_CONF": str(conf)}
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


def job_state(slurm, job):
    shown = subprocess.run(["scontrol", "show", "job", job], env=slurm.env, capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S+)", shown))


def scontrol(slurm, *args):
    subprocess.run(["scontrol", *args], env=slurm.env, check=True, capture_output=True)


def final_parameters(save_dir):
    return model_files.export(str(save_dir), cifar10_deepspeed.Net)["state_dict"]


@pytest.fixture(scope="module")
def requeued(slurm, tmp_path_factory):
    """The job as a user submits it, on a time limit of 2 minutes: SLURM's SIGUSR1 comes in its first 30 s and the
    job requeues itself; the requeued job is given 10 minutes (it would be signalled again in its first 30 s:
    SLURM keeps a job's time limit over requeues), and `scontrol requeue` stops it mid-epoch; the third job
    trains to the end. Beside it, the same run launched straight through."""
    tmp = tmp_path_factory.mktemp("requeued")
    straight = run_command(["deepspeed", "--num_gpus", "2", ROOT / "cifar10_deepspeed.py", "--deepspeed", *FLAGS,
                            "--save-dir", tmp / "straight"], tmp)
    log = tmp / "job.log"
    env = {**launch_env(), **slurm.env, "SAVE_DIR": str(tmp / "ckpt"), "MASTER_PORT": str(free_port()),
           "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}"}
    submitted = subprocess.run(["sbatch", "--parsable", *CPU_NODE, "--time=2", f"--output={log}",
                                "run_slurm.sbatch", *FLAGS], cwd=ROOT, env=env, capture_output=True, text=True)
    assert submitted.returncode == 0, submitted.stderr
    job = submitted.stdout.strip()
    text = lambda: log.read_text() if log.exists() else ""  # noqa: E731
    wait_for("SLURM's SIGUSR1 and the job's requeue", lambda: "Preempted by SIGUSR1" in text() and job_state(
        slurm, job).get("JobState") == "PENDING")
    scontrol(slurm, "update", f"JobId={job}", "TimeLimit=10")
    wait_for("the requeued job's first loss line", lambda: re.search(r"Resuming from .*\n(.*\n)*\[ *\d+, +\d+\] loss",
                                                                      text()))
    scontrol(slurm, "requeue", job)
    wait_for("the third job to finish", lambda: job_state(slurm, job).get("JobState") in ("COMPLETED", "FAILED"),
             timeout=600)
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
