"""Data on every node and several nodes, simulated on this machine.

The real download path: torchvision downloads, checks and unpacks a CIFAR-10
archive the tests make (tests/cifar_files.py) from a server on 127.0.0.1.

A simulated node is one launch of run_ds.sh (DeepSpeed's launcher) with a
two-host hostfile, without ssh (NODE_RANK), master 127.0.0.1, from a working
directory of its own, so each node has its own ./data. Both nodes' launches run
at once, as two machines would run them.
"""

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from cifar_files import ARCHIVE, Server, make_archive
from conftest import (MARGIN, LAUNCH_TIMEOUT, ROOT, Run, finish, free_port, kill_session, live_processes, run_command,
                      start)
from test_matrix import assert_every_parameter_with_a_gradient_moves, assert_ranks_agree_and_hold_their_experts

pytestmark = pytest.mark.slow

SYNTHETIC = ["--dataset", "synthetic", "--log-interval", "50", "--seed", "0"]
ONE_EPOCH = ["-e", "1", "--log-interval", "50", "--seed", "0"]
DATA_ERROR = re.compile(r"^error: CIFAR-10 is not in \S+ and could not be downloaded \((.*)\)\. Place ")


@pytest.fixture(scope="module")
def cifar10_server(tmp_path_factory, op_cache):
    """The archive (5000 training and 1000 test images) at /cifar-10-python.tar.gz, a cut-off copy at /corrupt/."""
    folder = tmp_path_factory.mktemp("server")
    checksums = make_archive(folder)
    (folder / "corrupt").mkdir()
    archive = (folder / ARCHIVE).read_bytes()
    (folder / "corrupt" / ARCHIVE).write_bytes(archive[:len(archive) // 2])
    server = Server(folder, checksums)
    yield server
    server.close()


def holds_cifar10(folder):
    batches = folder / "data" / "cifar-10-batches-py"
    return all((batches / name).is_file() for name in ("data_batch_5", "test_batch", "batches.meta"))


def error_lines(run):
    return [line for line in run.output.splitlines() if line.startswith("error: ")]


def test_download_checks_and_unpacks_cifar10_and_trains(tmp_path, cifar10_server):
    before = cifar10_server.downloads()
    run = run_command([ROOT / "run_ds.sh", "--dtype", "fp32", *ONE_EPOCH], tmp_path,
                      env={"NUM_GPUS": "2", "BIND_CORES": "0", **cifar10_server.env()})
    run.assert_trained(min_accuracy=68 - MARGIN)
    assert cifar10_server.downloads() == before + 1  # by rank 0 alone
    assert holds_cifar10(tmp_path)
    assert "Accuracy of the network on the 1000 test images: " in run.output


def test_a_corrupt_download_stops_every_rank_and_is_not_trusted_next_time(tmp_path, cifar10_server):
    cmd = [ROOT / "run_ds.sh", "--dtype", "fp32", *ONE_EPOCH, "--synthetic-train-size", "1"]
    corrupt = run_command(cmd, tmp_path, env={"NUM_GPUS": "2", "BIND_CORES": "0",
                                              **cifar10_server.env(f"corrupt/{ARCHIVE}")}, timeout=120)
    assert corrupt.returncode == 1
    errors = error_lines(corrupt)
    assert len(errors) == 1 and DATA_ERROR.match(errors[0]).group(1) == "File not found or corrupted."
    assert "Traceback" not in corrupt.output and "terminate called" not in corrupt.output
    assert not (tmp_path / "data" / "cifar-10-batches-py").exists()  # checked before unpacking: nothing unpacked

    before = cifar10_server.downloads()
    again = run_command(cmd, tmp_path, env={"NUM_GPUS": "2", "BIND_CORES": "0", **cifar10_server.env()})
    again.assert_trained(min_accuracy=68 - MARGIN)
    assert cifar10_server.downloads() == before + 1  # the corrupt archive was not taken for the data
    assert holds_cifar10(tmp_path)


class Nodes:
    """Two simulated nodes of `ranks` ranks each, launched through a run script at once."""

    def __init__(self, tmp_path, ranks=1):
        self.folders = [tmp_path / "node0", tmp_path / "node1"]
        for folder in self.folders:
            folder.mkdir()
        self.hostfile = tmp_path / "hostfile"
        self.hostfile.write_text(f"node0 slots={ranks}\nnode1 slots={ranks}\n")
        self.ranks = ranks

    def env(self, node, port):
        return {"HOSTFILE": str(self.hostfile), "NUM_NODES": "2", "NUM_GPUS": str(self.ranks),
                "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "NODE_RANK": str(node), "BIND_CORES": "0",
                "OMP_NUM_THREADS": "1"}

    def start(self, command, env=(None, None)):
        """Start `command(node, port)` on both nodes at once; a run script reads the node from the env."""
        port = free_port()
        return [start(command(node, port), folder, {**self.env(node, port), **(env[node] or {})},
                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
                for node, folder in enumerate(self.folders)]

    def run(self, command, env=(None, None), timeout=LAUNCH_TIMEOUT):
        launches = self.start(command, env=env)
        return [Run(completed(launch, finish(launch, timeout)[0])) for launch in launches]

    def deepspeed(self, *args):
        """DeepSpeed's launcher on each node, without ssh."""
        return lambda node, port: ["deepspeed", "--hostfile", self.hostfile, "--no_ssh", "--node_rank", node,
                                   "--master_addr", "127.0.0.1", "--master_port", port, "--num_gpus", self.ranks,
                                   *args]


def script(name, *args):
    """A run script on each node (it reads the node's settings from the environment)."""
    return lambda node, port: [ROOT / name, *args]


def completed(launch, output):
    return subprocess.CompletedProcess(launch.args, launch.returncode, output)


def test_two_nodes_of_one_rank_train_moe_across_them_each_with_its_own_data(tmp_path, cifar10_server):
    nodes = Nodes(tmp_path)
    before = cifar10_server.downloads()
    first, second = nodes.run(script("run_ds_moe.sh", "--dtype", "fp32", *ONE_EPOCH),
                              env=(cifar10_server.env(), cifar10_server.env()))
    first.assert_trained(min_accuracy=46 - MARGIN)
    assert second.returncode == 0, second.output[-3000:]
    assert "--ep-world-size 2 --num-experts 2" in first.output
    assert all(holds_cifar10(folder) for folder in nodes.folders)
    assert cifar10_server.downloads() == before + 2  # each node onto its own disk
    for line in ("Finished Training", "Accuracy of truck"):
        assert first.output.count(line) == 1 and line not in second.output  # rank 0 prints, once
    assert not second.losses()


def test_a_node_that_cannot_get_its_data_stops_every_rank_on_both(tmp_path, cifar10_server):
    nodes = Nodes(tmp_path)
    runs = nodes.run(script("run_ds.sh", "--dtype", "fp32", *ONE_EPOCH),
                     env=(cifar10_server.env(), cifar10_server.env(f"corrupt/{ARCHIVE}")), timeout=180)
    for run in runs:
        assert run.returncode == 1, run.output[-3000:]
        errors = error_lines(run)
        assert len(errors) == 1 and DATA_ERROR.match(errors[0]).group(1) == "File not found or corrupted."
        assert "Traceback" not in run.output
    assert holds_cifar10(nodes.folders[0]) and not holds_cifar10(nodes.folders[1])


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


def test_a_rank_killed_on_node_1_ends_every_rank_on_both_nodes(tmp_path):
    (first, second), seconds = stop_node_1_mid_epoch(tmp_path, signal.SIGKILL)
    assert second.returncode != 0
    assert seconds < 60
    assert "Connection" in assert_says_it_lost_a_peer(first)  # gloo's reason: the peer's connection closed or reset


def test_a_stuck_peer_ends_the_run_after_the_dist_timeout(tmp_path):
    (first, _), seconds = stop_node_1_mid_epoch(tmp_path, signal.SIGSTOP, "--dist-timeout", "0.25")
    assert seconds < 60  # 15 s of timeout; DeepSpeed's default would wait 30 minutes
    assert_says_it_lost_a_peer(first)


def test_resume_on_two_nodes_from_a_shared_save_dir(tmp_path):
    nodes = Nodes(tmp_path)
    shared = tmp_path / "ckpt"
    flags = ["--dtype", "fp32", *SYNTHETIC, "--synthetic-train-size", "800", "--save-dir", shared]
    for run in nodes.run(script("run_ds.sh", *flags, "-e", "1")):
        assert run.returncode == 0, run.output[-3000:]
    first, second = nodes.run(script("run_ds.sh", *flags, "-e", "2", "--resume"))
    assert first.returncode == 0 and second.returncode == 0, first.output[-3000:] + second.output[-3000:]
    assert f"Resuming from {shared / 'epoch1'} at epoch 2" in first.output
    assert "[ 1, " not in first.output and "[ 2,    50] loss:" in first.output
    assert (shared / "latest").read_text().strip() == "epoch2"


TUTORIAL = "fp16-zero2-tutorial-w4-ep2"  # DeepSpeed's MoE tutorial: 8 experts, EP 2, top-1, RSample, ZeRO 2


def test_the_moe_tutorials_four_ranks_through_run_ds_moe(tmp_path):
    """2 nodes x 2 ranks, expert-parallel size 2, 8 experts: every expert group replicated twice (E + D)."""
    nodes = Nodes(tmp_path, ranks=2)
    first, second = nodes.run(script("run_ds_moe.sh", *SYNTHETIC, "--dtype", "fp32", "--stage", "2", "-e", "2",
                                     "--synthetic-train-size", "2560"),
                              env=({"EXPERTS": "8"}, {"EXPERTS": "8"}))
    # 320 steps: the launch path, not learning, is the point. The loss falls by a fifth, though its last
    # interval may rise again on another CPU's rounding (1.807 then 1.856 from 2.303 on one AMD EPYC).
    assert first.returncode == 0 and "Finished Training" in first.output, first.output[-3000:]
    assert min(first.losses()) < 0.8 * first.losses()[0] and first.accuracy() >= 27 - MARGIN, first.losses()
    assert second.returncode == 0, second.output[-3000:]
    assert "--ep-world-size 2 --num-experts 8 --top-k 1 --noisy-gate-policy RSample --moe-param-group" in first.output


def test_the_moe_tutorials_four_ranks_are_experts_plus_data_parallel(tmp_path):
    """What E + D means, read off every rank after 14 steps of the tutorial's configuration."""
    nodes = Nodes(tmp_path, ranks=2)
    report_path = tmp_path / "report.json"
    runs = nodes.run(nodes.deepspeed(ROOT / "tests" / "train_cells.py", "--report", report_path, "--steps", "14",
                                     "--checks", TUTORIAL))
    for run in runs:
        assert run.returncode == 0, run.output[-3000:]
    report = json.loads(report_path.read_text())[TUTORIAL]
    assert "error" not in report, report["error"]
    assert_ranks_agree_and_hold_their_experts(report, TUTORIAL)  # 4 ranks, each holding 4 of the 8 experts
    assert_every_parameter_with_a_gradient_moves(report, TUTORIAL)


def test_torchrun_on_two_nodes_with_zero_3(tmp_path):
    nodes = Nodes(tmp_path)
    command = lambda node, port: ["torchrun", "--nnodes", "2", "--node_rank", node, "--nproc_per_node", "1",
                                  "--master_addr", "127.0.0.1", "--master_port", port, ROOT / "cifar10_deepspeed.py",
                                  "--deepspeed", *SYNTHETIC, "--dtype", "fp32", "--stage", "3", "-e", "1"]
    first, second = nodes.run(command)
    first.assert_trained(min_accuracy=68 - MARGIN)
    assert second.returncode == 0, second.output[-3000:]
    assert not second.losses()
