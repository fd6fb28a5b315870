import inspect
import os
import socket
import subprocess
import sys

import pytest
from deepspeed.moe.layer import MoE

from cifar10_deepspeed import check_args, get_ds_config, main
from conftest import finish, start


def reason(parse, *argv, world_size=1):
    args = parse(*argv)
    return check_args(args, get_ds_config(args), world_size)


def test_reference_defaults(parse):
    args = parse()
    assert (args.epochs, args.local_rank, args.log_interval) == (30, -1, 2000)
    assert (args.moe, args.ep_world_size, args.num_experts, args.mlp_type) == (False, 1, [1], "standard")
    assert (args.top_k, args.min_capacity, args.noisy_gate_policy, args.moe_param_group) == (1, 0, None, False)
    assert (args.dataset, args.data_dir, args.synthetic_train_size, args.synthetic_test_size) == (
        "cifar10", "./data", 5000, 1000)
    config = get_ds_config(args)
    assert config["fp16"]["enabled"] and config["zero_optimization"]["stage"] == 0


def test_flags_beyond_the_reference_default_to_its_behaviour(parse):
    args = parse()
    assert (args.save_dir, args.resume, args.eval_every, args.metrics_dir, args.seed, args.data_workers) == (
        None, False, 0, None, None, None)
    assert args.moe_aux_loss_coef == 0 and args.dist_timeout is None and args.offload is None
    moe_defaults = inspect.signature(MoE).parameters  # what the reference's MoE layers get
    assert (args.capacity_factor, args.eval_capacity_factor, args.drop_tokens) == (
        moe_defaults["capacity_factor"].default, moe_defaults["eval_capacity_factor"].default,
        moe_defaults["drop_tokens"].default)


def test_reference_flags_parse(parse):
    args = parse("-e", "3", "--log-interval", "100", "--dtype", "bf16", "--stage", "2", "--moe",
                 "--ep-world-size", "2", "--num-experts", "2", "4", "--mlp-type", "residual", "--top-k", "2",
                 "--min-capacity", "4", "--noisy-gate-policy", "Jitter", "--moe-param-group", "--deepspeed")
    assert (args.epochs, args.log_interval, args.dtype, args.stage) == (3, 100, "bf16", 2)
    assert (args.ep_world_size, args.num_experts, args.mlp_type, args.top_k) == (2, [2, 4], "residual", 2)
    assert (args.min_capacity, args.noisy_gate_policy, args.moe_param_group, args.deepspeed) == (4, "Jitter", True, True)
    assert parse("--noisy-gate-policy", "None").noisy_gate_policy is None


@pytest.mark.parametrize("argv, world_size", [
    (["--moe", "--stage", "1"], 1),
    (["--moe", "--stage", "2", "--ep-world-size", "2", "--num-experts", "2", "4"], 2),
    (["--moe", "--ep-world-size", "2", "--num-experts", "2"], 4),
    (["--moe", "--top-k", "2", "--noisy-gate-policy", "Jitter"], 1),
    (["--moe", "--top-k", "1", "--noisy-gate-policy", "RSample"], 1),
    (["--stage", "3"], 2),
    (["--stage", "1", "--offload", "cpu"], 1),
    (["--stage", "3", "--offload", "cpu"], 2),
    (["--moe", "--stage", "2", "--offload", "cpu", "--ep-world-size", "2", "--num-experts", "2"], 2),
])
def test_valid_mixes_pass(parse, argv, world_size):
    assert reason(parse, *argv, world_size=world_size) is None


def launcher_arguments(root, tmp_path, script="run_ds.sh", **env):
    """What a run script hands DeepSpeed's launcher, from a stand-in that prints its arguments: (arguments, the
    CUDA_VISIBLE_DEVICES it sees)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "deepspeed").write_text('#!/bin/sh\necho "${CUDA_VISIBLE_DEVICES-unset}"\nprintf "%s\\n" "$@"\n')
    (bin_dir / "deepspeed").chmod(0o755)
    proc = start([root / script, "--dataset", "synthetic"], tmp_path,
                 {"PATH": f"{bin_dir}:{os.environ['PATH']}", "BIND_CORES": "0", **env}, stdout=subprocess.PIPE,
                 stderr=subprocess.PIPE)
    out, err = finish(proc, timeout=60)
    assert proc.returncode == 0, err
    visible, *argv = out.splitlines()
    return argv, visible


def option(argv, name):
    return argv[argv.index(name) + 1] if name in argv else None


@pytest.mark.skipif(os.path.exists("/job/hostfile"), reason="this machine has DeepSpeed's default hostfile")
def test_one_node_gets_a_free_port_unless_master_port_is_set(root, tmp_path):
    """The launcher's own default, 29500, would collide with a run already on the machine."""
    ports = [option(launcher_arguments(root, tmp_path, script)[0], "--master_port")
             for script in ("run_ds.sh", "run_ds_moe.sh", "run_ds_prmoe.sh")]
    assert None not in ports and "29500" not in ports
    for port in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", int(port)))  # free: nothing holds it
    assert option(launcher_arguments(root, tmp_path, MASTER_PORT="29613")[0], "--master_port") == "29613"


def test_several_nodes_keep_the_launchers_port(root, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=2\nnode-b slots=2\n")
    argv, _ = launcher_arguments(root, tmp_path, NUM_NODES="2", HOSTFILE=str(hostfile))
    assert option(argv, "--master_port") is None and option(argv, "--num_nodes") == "2"


@pytest.mark.skipif(os.path.exists("/job/hostfile"), reason="this machine has DeepSpeed's default hostfile")
def test_cuda_visible_devices_picks_the_gpus_of_a_run(root, tmp_path):
    """DeepSpeed's launcher trains on the GPUs CUDA_VISIBLE_DEVICES names only without --num_gpus: the scripts
    leave it out then, and NUM_GPUS takes the first of those GPUs."""
    argv, visible = launcher_arguments(root, tmp_path, CUDA_VISIBLE_DEVICES="2,3")
    assert visible == "2,3" and "--num_gpus" not in argv and "--num_nodes" not in argv
    argv, visible = launcher_arguments(root, tmp_path, "run_ds_moe.sh", CUDA_VISIBLE_DEVICES="4,5,6,7")
    assert visible == "4,5" and "--num_gpus" not in argv and "--num_nodes" not in argv  # its NUM_GPUS, 2
    argv, visible = launcher_arguments(root, tmp_path, NUM_GPUS="2")
    assert visible == "unset" and option(argv, "--num_gpus") == "2"
    assert run_script(root, tmp_path, "run_ds.sh", CUDA_VISIBLE_DEVICES="2,3", NUM_GPUS="3") == (2, (
        "run_ds.sh: error: NUM_GPUS=3 but CUDA_VISIBLE_DEVICES=2,3 names 2 GPU(s)\n"))


@pytest.mark.parametrize("argv, world_size, expected", [
    (["--moe", "--stage", "3"], 1,
     "--moe does not work with ZeRO stage 3: DeepSpeed's MoE supports stages 0, 1 and 2"),
    (["--moe", "--ep-world-size", "2", "--num-experts", "3"], 2,
     "--num-experts 3 is not a positive multiple of --ep-world-size 2"),
    (["--moe", "--ep-world-size", "2", "--num-experts", "2", "3"], 2,
     "--num-experts 3 is not a positive multiple of --ep-world-size 2"),
    (["--moe", "--ep-world-size", "2", "--num-experts", "2"], 3,
     "the world size 3 is not divisible by --ep-world-size 2: launch a multiple of 2 ranks"),
    (["--moe", "--ep-world-size", "2", "--num-experts", "2"], 1,
     "the world size 1 is not divisible by --ep-world-size 2: launch a multiple of 2 ranks"),
    (["--moe", "--ep-world-size", "0"], 1, "--ep-world-size must be at least 1, got 0"),
    (["--moe", "--num-experts", "0"], 1, "--num-experts 0 is not a positive multiple of --ep-world-size 1"),
    (["--moe", "--top-k", "2", "--noisy-gate-policy", "RSample"], 1,
     "--noisy-gate-policy RSample works with --top-k 1 only (DeepSpeed ignores it for top-2); use Jitter"),
    (["--log-interval", "0"], 1, "--log-interval must be at least 1, got 0"),
    (["--synthetic-test-size", "0"], 1, "--synthetic-train-size and --synthetic-test-size must be at least 1"),
    (["--resume"], 1, "--resume needs --save-dir, the directory to resume from"),
    (["--eval-every", "-1"], 1, "--eval-every must not be negative, got -1"),
    (["--moe", "--capacity-factor", "0"], 1, "--capacity-factor and --eval-capacity-factor must be positive"),
    (["--moe", "--eval-capacity-factor", "-1"], 1, "--capacity-factor and --eval-capacity-factor must be positive"),
    (["--moe", "--moe-aux-loss-coef", "-0.1"], 1, "--moe-aux-loss-coef must not be negative, got -0.1"),
    (["--data-workers", "-1"], 1, "--data-workers must not be negative, got -1"),
    (["--dist-timeout", "0"], 1, "--dist-timeout must be positive, got 0.0"),
    (["--offload", "cpu"], 1,
     "offloading to the cpu needs ZeRO stage 1, 2 or 3 (--stage): stage 0 has no ZeRO optimizer to offload"),
])
def test_bad_mixes_are_rejected_with_the_reason(parse, argv, world_size, expected):
    assert reason(parse, *argv, world_size=world_size) == expected


@pytest.mark.parametrize("argv, expected", [
    (["--top-k", "3"], "argument --top-k: invalid choice: 3 (choose from 1, 2)"),
    (["--mlp-type", "dense"], "argument --mlp-type: invalid choice: 'dense' (choose from 'standard', 'residual')"),
    (["--noisy-gate-policy", "Gumbel"],
     "argument --noisy-gate-policy: invalid choice: 'Gumbel' (choose from 'None', 'RSample', 'Jitter')"),
    (["--dtype", "fp8"], "argument --dtype: invalid choice: 'fp8' (choose from 'bf16', 'fp16', 'fp32')"),
    (["--stage", "4"], "argument --stage: invalid choice: 4 (choose from 0, 1, 2, 3)"),
    (["--offload", "nvme"], "argument --offload: invalid choice: 'nvme' (choose from 'none', 'cpu')"),
])
def test_unknown_choices_exit_2_with_one_line(parse, capsys, argv, expected):
    with pytest.raises(SystemExit) as exit_info:
        parse(*argv)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"cifar10_deepspeed.py: error: {expected}\n"


def test_main_rejects_before_any_distributed_work(parse, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit) as exit_info:
        main(parse("--moe", "--stage", "2", "--ep-world-size", "2", "--num-experts", "3"))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (
        "cifar10_deepspeed.py: error: --num-experts 3 is not a positive multiple of --ep-world-size 2\n")


def test_every_rank_exits_2_on_its_own(script, tmp_path):
    """Two ranks of a 2-rank job, no launcher to kill them: each stops by itself, none waits for its peer."""
    env_of = lambda rank: {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
                           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1", "PATH": ""}
    ranks = [start([sys.executable, script, "--deepspeed", "--moe", "--stage", "3"], tmp_path, env_of(rank),
                   stdout=subprocess.PIPE, stderr=subprocess.PIPE) for rank in (0, 1)]
    outputs = [finish(rank, timeout=120) for rank in ranks]  # a rank that waits for its peer fails here
    for rank, (_, err) in zip(ranks, outputs):
        assert rank.returncode == 2
        assert err.splitlines()[-1] == (
            "cifar10_deepspeed.py: error: --moe does not work with ZeRO stage 3: "
            "DeepSpeed's MoE supports stages 0, 1 and 2")


def run_script(root, tmp_path, script, **env):
    """Run a launch script that must stop before it launches anything; return (exit status, stderr)."""
    proc = start([root / script, "--dataset", "synthetic"], tmp_path, env, stdout=subprocess.PIPE,
                 stderr=subprocess.PIPE)
    out, err = finish(proc, timeout=60)
    assert "spawned" not in out + err, "it launched"
    return proc.returncode, err


@pytest.mark.skipif(os.path.exists("/job/hostfile"), reason="this machine has DeepSpeed's default hostfile")
def test_num_nodes_without_a_hostfile_stops_with_one_line(root, tmp_path):
    assert run_script(root, tmp_path, "run_ds_moe.sh", NUM_NODES="2") == (2, (
        "run_ds.sh: error: NUM_NODES=2 needs a hostfile listing the nodes: set HOSTFILE (there is no /job/hostfile)\n"))


def test_num_nodes_beyond_the_hostfile_stops_with_one_line(root, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two nodes\nnode-a slots=2\n\nnode-b slots=2\n")
    assert run_script(root, tmp_path, "run_ds.sh", NUM_NODES="3", HOSTFILE=str(hostfile)) == (2, (
        f"run_ds.sh: error: NUM_NODES=3 but {hostfile} lists 2 node(s)\n"))
    assert run_script(root, tmp_path, "run_ds.sh", HOSTFILE=str(tmp_path / "missing")) == (2, (
        f"run_ds.sh: error: HOSTFILE={tmp_path / 'missing'} does not exist\n"))


def test_node_rank_needs_the_hostfile_and_the_master_address(root, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    assert run_script(root, tmp_path, "run_ds.sh", NODE_RANK="1", HOSTFILE=str(hostfile)) == (2, (
        "run_ds.sh: error: NODE_RANK needs MASTER_ADDR: the address of the node of rank 0\n"))


@pytest.mark.parametrize("argv, world_size, expected", [
    ([], 3, "the batch does not add up: global batch 16 != micro-batch 5 x 1 accumulation steps x 3 data-parallel "
            "ranks = 15; set --batch-size, --micro-batch and --grad-accum so that it does"),
    (["--batch-size", "16", "--micro-batch", "4", "--grad-accum", "2"], 1,
     "the batch does not add up: global batch 16 != micro-batch 4 x 2 accumulation steps x 1 data-parallel ranks = 8; "
     "set --batch-size, --micro-batch and --grad-accum so that it does"),
    (["--batch-size", "8"], 16, "the batch does not add up: global batch 8 != micro-batch 0 x 1 accumulation steps "
                                "x 16 data-parallel ranks = 0; set --batch-size, --micro-batch and --grad-accum so "
                                "that it does"),
    (["--batch-size", "0"], 1, "--batch-size must be positive, got 0"),
    (["--grad-accum", "-1"], 1, "--grad-accum must be positive, got -1"),
    (["--lr", "0"], 1, "--lr must be positive, got 0"),
])
def test_a_batch_that_cannot_hold_is_refused_with_its_arithmetic(parse, argv, world_size, expected):
    assert reason(parse, *argv, world_size=world_size) == expected


def test_init_from_mixes_are_refused(parse, tmp_path):
    assert reason(parse, "--init-from", str(tmp_path / "none.pt")) == f"--init-from: no model file or checkpoint {tmp_path / 'none.pt'}"
    assert reason(parse, "--init-from", str(tmp_path), "--resume", "--save-dir", str(tmp_path)) == (
        "--resume continues a run and --init-from starts a new one: give one of them")
