"""cifar10ds/options.py: the flags beyond the reference, the config a --deepspeed_config file makes, and every
flag mix refused before any work, in one line, on every rank; ZeRO-Offload end to end, as DeepSpeed's MoE
tutorial ships it and as --offload spells it."""

import inspect
import json
import os
import re
import subprocess
import sys

import pytest
from deepspeed.moe.layer import MoE

from cifar10_deepspeed import get_ds_config, main
from cifar10ds.options import batch_sizes, check_args, config_dtype, load_ds_config, read_offload
from conftest import ROOT, finish, start
SYNTHETIC = ["--dataset", "synthetic", "--seed", "0", "--synthetic-test-size", "400"]


def reason(parse, *argv, world_size=1):
    args = parse(*argv)
    return check_args(args, get_ds_config(args), world_size)


def test_flags_beyond_the_reference_default_to_its_behaviour(parse):
    args = parse()
    assert (args.save_dir, args.resume, args.eval_every, args.metrics_dir, args.seed, args.data_workers) == (
        None, False, 0, None, None, None)
    assert args.moe_aux_loss_coef == 0 and args.dist_timeout is None and args.offload is None
    moe_defaults = inspect.signature(MoE).parameters  # what the reference's MoE layers get
    assert (args.capacity_factor, args.eval_capacity_factor, args.drop_tokens) == (
        moe_defaults["capacity_factor"].default, moe_defaults["eval_capacity_factor"].default,
        moe_defaults["drop_tokens"].default)


# The config file, and the flags over it
def test_config_file_is_used_as_given(parse, tmp_path):
    path = tmp_path / "bf16_stage2.json"
    config = get_ds_config(parse("--dtype", "bf16", "--stage", "2"))
    path.write_text(json.dumps(config))
    loaded, note = load_ds_config(parse("--deepspeed_config", str(path)))
    assert loaded == config
    assert note == f"Using {path}: dtype bf16, ZeRO stage 2 (--dtype/--stage not given)"


def test_explicit_flags_override_the_config_file_and_say_so(parse):
    path = str(ROOT / "ds_config.json")
    loaded, note = load_ds_config(parse("--deepspeed_config", path, "--dtype", "bf16", "--stage", "2"))
    assert config_dtype(loaded) == "bf16" and loaded["zero_optimization"]["stage"] == 2
    assert note == (f"Using {path}: dtype bf16, ZeRO stage 2 "
                    "(--dtype bf16 overrides its fp16; --stage 2 overrides its stage 0)")


def test_flags_equal_to_the_file_are_no_override(parse):
    path = str(ROOT / "ds_config.json")
    loaded, note = load_ds_config(parse("--deepspeed_config", path, "--dtype", "fp16", "--stage", "0"))
    assert loaded == get_ds_config(parse())
    assert note.endswith("(--dtype/--stage not given)")


def test_config_file_enabling_both_half_precisions_is_rejected(parse, tmp_path):
    path = tmp_path / "both.json"
    config = get_ds_config(parse())
    config["bf16"]["enabled"] = True
    path.write_text(json.dumps(config))
    args = parse("--deepspeed_config", str(path))
    loaded, _ = load_ds_config(args)
    assert check_args(args, loaded, world_size=1) == "the DeepSpeed config enables both fp16 and bf16; enable one"


def test_moe_with_stage_3_from_the_config_file_is_rejected(parse, tmp_path):
    path = tmp_path / "stage3.json"
    path.write_text(json.dumps(get_ds_config(parse("--stage", "3"))))
    args = parse("--deepspeed_config", str(path), "--moe")
    loaded, _ = load_ds_config(args)
    assert "ZeRO stage 3" in check_args(args, loaded, world_size=1)


@pytest.mark.slow
def test_bf16_one_rank_from_the_config_file(launch, script, root):
    config = root / "ds_config.json"
    run = launch("deepspeed", "--num_gpus", "1", script, "--deepspeed", "--deepspeed_config", config, "--dtype",
                 "bf16", *SYNTHETIC, "--synthetic-train-size", "3200", "-e", "1", "--log-interval", "25")
    run.assert_launched()
    assert f"Using {config}: dtype bf16, ZeRO stage 0 (--dtype bf16 overrides its fp16)" in run.output.splitlines()


# Batch and learning rate
def test_batch_and_lr_flags_write_the_config(parse):
    config = get_ds_config(parse("--batch-size", "64", "--micro-batch", "8", "--grad-accum", "2", "--lr", "0.004"))
    assert (config["train_batch_size"], config["train_micro_batch_size_per_gpu"],
            config["gradient_accumulation_steps"]) == (64, 8, 2)
    assert config["optimizer"]["params"]["lr"] == config["scheduler"]["params"]["warmup_max_lr"] == 0.004
    assert "train_micro_batch_size_per_gpu" not in get_ds_config(parse("--batch-size", "64"))


def test_batch_and_lr_flags_override_the_config_file_and_say_so(parse):
    path = str(ROOT / "ds_config.json")
    loaded, note = load_ds_config(parse("--deepspeed_config", path, "--batch-size", "128", "--micro-batch", "64",
                                        "--lr", "0.01"))
    assert (loaded["train_batch_size"], loaded["train_micro_batch_size_per_gpu"]) == (128, 64)
    assert loaded["optimizer"]["params"]["lr"] == loaded["scheduler"]["params"]["warmup_max_lr"] == 0.01
    assert note == (f"Using {path}: dtype fp16, ZeRO stage 0 "
                    "(--batch-size 128 overrides its 16; --lr 0.01 overrides its 0.001)")


@pytest.mark.parametrize("flags, world_size, sizes", [
    ([], 1, (16, 16, 1)), ([], 2, (16, 8, 1)), (["--batch-size", "64", "--grad-accum", "2"], 2, (64, 16, 2)),
    (["--micro-batch", "4"], 2, (16, 4, 2)), (["--batch-size", "32", "--micro-batch", "4"], 2, (32, 4, 4)),
    (["--micro-batch", "4", "--grad-accum", "3"], 2, (24, 4, 3))])
def test_batch_sizes_are_derived_as_deepspeed_derives_them(parse, flags, world_size, sizes):
    """Any one or two of the three set the rest; --micro-batch with --grad-accum sets the global batch too."""
    args = parse(*flags)
    config = get_ds_config(args)
    assert batch_sizes(config, world_size) == sizes
    assert check_args(args, config, world_size) is None


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


# ZeRO-Offload: --offload, and the MoE tutorial's config file
OFFLOAD = {"device": "cpu", "pin_memory": True}


def test_offload_none_is_the_reference_config(parse):
    assert get_ds_config(parse("--offload", "none")) == get_ds_config(parse())
    assert read_offload(get_ds_config(parse())) is None


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_offload_cpu_puts_the_optimizer_and_at_stage_3_the_parameters_on_the_host(parse, stage):
    config = get_ds_config(parse("--offload", "cpu", "--stage", str(stage)))
    zero = config["zero_optimization"]
    assert zero["offload_optimizer"] == OFFLOAD and "cpu_offload" not in zero  # DeepSpeed's spelling of today
    assert zero.get("offload_param") == (OFFLOAD if stage == 3 else None)
    reference = get_ds_config(parse("--stage", str(stage)))
    assert {key: value for key, value in config.items() if key != "zero_optimization"} == {
        key: value for key, value in reference.items() if key != "zero_optimization"}
    assert read_offload(config) == (
        "ZeRO-Offload: the optimizer's state and step and the parameters on the cpu (ZeRO stage 3)" if stage == 3 else
        f"ZeRO-Offload: the optimizer's state and step on the cpu (ZeRO stage {stage})")


def test_the_tutorials_cpu_offload_is_read_as_offload_cpu_at_stage_2(parse):
    """The shipped ds_config_offload.json: "cpu_offload": true becomes exactly what --offload cpu sets."""
    path = str(ROOT / "ds_config_offload.json")
    config, _ = load_ds_config(parse("--deepspeed_config", path))
    assert config["zero_optimization"]["cpu_offload"] is True and config["fp16"]["fp16_master_weights_and_grads"]
    assert check_args(parse("--deepspeed_config", path), config, world_size=1) is None
    assert read_offload(config) == (
        "ZeRO-Offload: the optimizer's state and step on the cpu (ZeRO stage 2, fp16 master weights and gradients); "
        "the config's \"cpu_offload\": true, as DeepSpeed's MoE tutorial writes it, is offload_optimizer device cpu")
    config["fp16"]["fp16_master_weights_and_grads"] = False
    assert config == get_ds_config(parse("--offload", "cpu", "--stage", "2"))


def test_offload_cpu_adds_offload_to_a_config_file_without_it(parse):
    path = str(ROOT / "ds_config.json")
    loaded, note = load_ds_config(parse("--deepspeed_config", path, "--stage", "3", "--offload", "cpu"))
    assert loaded == get_ds_config(parse("--stage", "3", "--offload", "cpu"))
    assert note == f"Using {path}: dtype fp16, ZeRO stage 3 (--stage 3 overrides its stage 0; --offload cpu adds ZeRO-Offload)"


@pytest.mark.parametrize("offload, zero, expected", [
    ("none", {"stage": 2, "cpu_offload": True}, "--offload none contradicts {path}, which offloads to cpu"),
    ("none", {"stage": 3, "offload_param": {"device": "cpu"}}, "--offload none contradicts {path}, which offloads to cpu"),
    ("cpu", {"stage": 3, "offload_optimizer": {"device": "nvme", "nvme_path": "/nvme"}},
     "--offload cpu contradicts {path}, which offloads to nvme"),
])
def test_offload_contradicting_the_config_file_is_rejected(parse, tmp_path, offload, zero, expected):
    path = tmp_path / "offload.json"
    path.write_text(json.dumps({**get_ds_config(parse()), "zero_optimization": zero}))
    args = parse("--deepspeed_config", str(path), "--offload", offload)
    loaded, _ = load_ds_config(args)
    assert check_args(args, loaded, world_size=1) == (
        expected.format(path=path) + ": drop --offload or change the file")


def test_a_config_file_offloading_at_stage_0_is_rejected(parse, tmp_path):
    path = tmp_path / "stage0.json"
    path.write_text(json.dumps({**get_ds_config(parse()), "zero_optimization": {"stage": 0, "cpu_offload": True}}))
    args = parse("--deepspeed_config", str(path))
    assert check_args(args, load_ds_config(args)[0], world_size=1) == (
        "offloading to the cpu needs ZeRO stage 1, 2 or 3 (--stage): stage 0 has no ZeRO optimizer to offload")

FP16_MASTER = ("fp16_master_weights_and_grads needs fp16 (--dtype fp16) and ZeRO stage 1, 2 or 3 with the optimizer "
               "offloaded to the cpu (--offload cpu) by DeepSpeed's CPU Adam (not \"torch_adam\")")


@pytest.mark.parametrize("flags, torch_adam, expected", [
    (["--offload", "cpu", "--stage", "2"], False, None),
    (["--offload", "cpu", "--stage", "3"], False, None),
    (["--stage", "2"], False, FP16_MASTER),
    (["--offload", "cpu", "--stage", "2", "--dtype", "bf16"], False, FP16_MASTER),
    (["--offload", "cpu", "--stage", "2"], True, FP16_MASTER),
], ids=["zero2-offload", "zero3-offload", "no-offload", "bf16", "torch-adam"])
def test_fp16_master_weights_need_fp16_and_offload_to_cpu_adam(parse, flags, torch_adam, expected):
    args = parse(*flags)
    config = get_ds_config(args)
    config["fp16"]["fp16_master_weights_and_grads"] = True
    config["optimizer"]["params"]["torch_adam"] = torch_adam
    assert check_args(args, config, world_size=1) == expected


OFFLOAD_LINE = re.compile(r"^ZeRO-Offload: .*$", re.M)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("BUILD_OPS") != "1", reason="builds DeepSpeed's CPU Adam with this machine's C++ "
                    "compiler, which not every machine has: BUILD_OPS=1 runs it (TESTING.md)")
def test_the_tutorials_recipe_trains_moe_with_ep_2_as_its_page_runs_it(launch, root, cpu_adam):
    """ZeRO 2 with "cpu_offload": true, fp16 with fp16 master weights, MoE with EP 2 on 2 ranks and
    --moe-param-group (run_ds_moe.sh). With fp32 masters (fp16_master_weights_and_grads off, the script's own
    config) the same layout is test_matrix.py's learning cell fp16-zero2-rsample-w2-ep2-offload; without a
    compiler, test_machine.py shows the recipe's one line."""
    run = launch(root / "run_ds_moe.sh", "--deepspeed_config", root / "ds_config_offload.json", *SYNTHETIC,
                 "--synthetic-train-size", "4800", "-e", "1", "--log-interval", "50", env={"BIND_CORES": "0"})
    run.assert_launched()
    assert OFFLOAD_LINE.findall(run.output) == [
        "ZeRO-Offload: the optimizer's state and step on the cpu (ZeRO stage 2, fp16 master weights and gradients); "
        "the config's \"cpu_offload\": true, as DeepSpeed's MoE tutorial writes it, is offload_optimizer device cpu"]
    assert "Config parameter cpu_offload is deprecated" not in run.output  # DeepSpeed gets today's spelling


@pytest.mark.slow
def test_cpu_offload_in_the_config_trains_exactly_as_offload_cpu(launch, script, root, tmp_path):
    """The same seed gives the same loss at every step: the old spelling and the flag are one configuration.

    In fp32 (--dtype overrides the file's fp16 in both runs): which dtype trains does not change what the
    spelling means, and fp16 trains several times slower on a CPU.
    """
    config = json.loads((root / "ds_config.json").read_text())
    config["zero_optimization"].update(stage=2, cpu_offload=True)
    path = tmp_path / "cpu_offload.json"
    path.write_text(json.dumps(config))
    cmd = ["python", script, "--deepspeed", *SYNTHETIC, "--synthetic-train-size", "800", "-e", "1",
           "--log-interval", "5", "--dtype", "fp32"]
    spelled = launch(*cmd, "--deepspeed_config", path)
    flag = launch(*cmd, "--offload", "cpu", "--stage", "2")
    for run in (spelled, flag):
        assert run.returncode == 0, run.output[-3000:]
    assert OFFLOAD_LINE.findall(flag.output) == ["ZeRO-Offload: the optimizer's state and step on the cpu (ZeRO stage 2)"]
    assert OFFLOAD_LINE.findall(spelled.output)[0].startswith(
        "ZeRO-Offload: the optimizer's state and step on the cpu (ZeRO stage 2); the config's \"cpu_offload\": true")
    assert len(spelled.losses()) == 10 and spelled.losses() == flag.losses()
    assert spelled.accuracy() == flag.accuracy()


# Refusals
@pytest.mark.parametrize("argv, world_size", [
    (["--moe", "--stage", "1"], 1),
    (["--moe", "--stage", "2", "--ep-world-size", "2", "--num-experts", "2", "4"], 2),
    (["--moe", "--ep-world-size", "2", "--num-experts", "2"], 4),
    (["--moe", "--top-k", "2", "--noisy-gate-policy", "Jitter"], 1),
    (["--moe", "--top-k", "1", "--noisy-gate-policy", "RSample"], 1),
    (["--stage", "3"], 2),
    (["--seed", str(2**63 - 1)], 4),
    (["--seed", str(-2**63)], 4),
    (["--stage", "1", "--offload", "cpu"], 1),
    (["--stage", "3", "--offload", "cpu"], 2),
    (["--moe", "--stage", "2", "--offload", "cpu", "--ep-world-size", "2", "--num-experts", "2"], 2),
])
def test_valid_mixes_pass(parse, argv, world_size):
    assert reason(parse, *argv, world_size=world_size) is None


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
    (["--moe", "--drop-warning", "120"], 1, "--drop-warning must be a percentage from 0 to 100, got 120"),
    (["--data-workers", "-1"], 1, "--data-workers must not be negative, got -1"),
    (["--seed", str(2**63)], 1, "--seed must fit in 64 bits, as torch's generators take it: from -2**63 to 2**63 - 1, "
                                f"got {2**63}"),
    (["--seed", str(-2**63 - 1)], 1, "--seed must fit in 64 bits, as torch's generators take it: from -2**63 to "
                                     f"2**63 - 1, got {-2**63 - 1}"),
    (["--dist-timeout", "0"], 1, "--dist-timeout must be positive, got 0.0"),
    (["--offload", "cpu"], 1,
     "offloading to the cpu needs ZeRO stage 1, 2 or 3 (--stage): stage 0 has no ZeRO optimizer to offload"),
])
def test_bad_mixes_are_rejected_with_the_reason(parse, argv, world_size, expected):
    assert reason(parse, *argv, world_size=world_size) == expected


def test_init_from_mixes_are_refused(parse, tmp_path):
    assert reason(parse, "--init-from", str(tmp_path / "none.pt")) == f"--init-from: no model file or checkpoint {tmp_path / 'none.pt'}"
    assert reason(parse, "--init-from", str(tmp_path), "--resume", "--save-dir", str(tmp_path)) == (
        "--resume continues a run and --init-from starts a new one: give one of them")


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


def each_of_two_ranks_alone(argv, cwd):
    """Both ranks of a 2-rank job, each started by itself (no launcher to kill them, no peer to reach, no PATH):
    (exit status, stdout, stderr) of each. A rank that waits for its peer fails here."""
    env_of = lambda rank: {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
                           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1", "PATH": ""}
    ranks = [start([sys.executable, *argv], cwd, env_of(rank), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for rank in (0, 1)]
    return [(rank.returncode, *output) for rank, output in zip(ranks, [finish(rank, timeout=120) for rank in ranks])]


def test_every_rank_exits_2_on_its_own(script, tmp_path):
    """Two ranks of a 2-rank job, no launcher to kill them: each stops by itself, none waits for its peer."""
    for status, _, err in each_of_two_ranks_alone([script, "--deepspeed", "--moe", "--stage", "3"], tmp_path):
        assert status == 2
        assert err.splitlines()[-1] == (
            "cifar10_deepspeed.py: error: --moe does not work with ZeRO stage 3: "
            "DeepSpeed's MoE supports stages 0, 1 and 2")


# Bad input: a config file, a --save-dir, a --data-dir


@pytest.mark.parametrize("content, reason", [
    (None, "cannot read --deepspeed_config {path}: No such file or directory"),
    ('{"train_batch_size": 16,', "--deepspeed_config {path} is not JSON: Expecting property name enclosed in double "
                                 "quotes: line 1 column 25 (char 24)"),
    ("[16]", "--deepspeed_config {path} is not a JSON object of DeepSpeed's settings"),
], ids=["missing", "not-json", "not-an-object"])
def test_a_config_file_that_cannot_be_read_is_one_line(parse, capsys, tmp_path, content, reason):
    path = tmp_path / "config.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SystemExit) as exit:
        load_ds_config(parse("--deepspeed_config", str(path)))
    assert exit.value.code == 2
    assert capsys.readouterr().err == f"cifar10_deepspeed.py: error: {reason.format(path=path)}\n"


def test_a_config_deepspeed_refuses_stops_every_rank_with_one_line_before_any_work(launch, script, parse, tmp_path):
    """A value DeepSpeed asserts on in deepspeed.initialize (a negative batch) is refused with DeepSpeed's reason
    right after the process group starts, on 2 ranks under DeepSpeed's launcher: one line, exit 2."""
    config = get_ds_config(parse())
    config["train_batch_size"] = -16
    path = tmp_path / "negative.json"
    path.write_text(json.dumps(config))
    run = launch("deepspeed", "--num_gpus", "2", script, "--deepspeed", "--deepspeed_config", path, "--dataset",
                 "synthetic", "--dtype", "fp32", "--micro-batch", "4", timeout=120)
    assert run.returncode == 2, run.output[-3000:]
    errors = [line for line in run.output.splitlines() if "error:" in line]
    assert errors == ["cifar10_deepspeed.py: error: DeepSpeed refuses the config: Train batch size: -16 has to be "
                      "greater than 0"], run.output[-3000:]
    assert "Traceback" not in run.output and "loss:" not in run.output
