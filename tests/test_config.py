import json
import os

import pytest

import cifar10_deepspeed
from conftest import ROOT
from cifar10_deepspeed import allow_fp16, check_args, config_dtype, get_ds_config, load_ds_config, read_offload


def test_ds_config_json_equals_default_config(parse):
    with open(ROOT / "ds_config.json") as f:
        assert json.load(f) == get_ds_config(parse())


def test_default_config_has_the_reference_values(parse):
    config = get_ds_config(parse())
    assert config["train_batch_size"] == 16
    assert config["steps_per_print"] == 2000
    assert config["optimizer"] == {
        "type": "Adam",
        "params": {"lr": 0.001, "betas": [0.8, 0.999], "eps": 1e-8, "weight_decay": 3e-7},
    }
    assert config["scheduler"] == {
        "type": "WarmupLR",
        "params": {"warmup_min_lr": 0, "warmup_max_lr": 0.001, "warmup_num_steps": 1000},
    }
    assert config["gradient_clipping"] == 1.0 and config["prescale_gradients"] is False
    assert config["fp16"] == {"enabled": True, "fp16_master_weights_and_grads": False, "loss_scale": 0,
                              "loss_scale_window": 500, "hysteresis": 2, "min_loss_scale": 1,
                              "initial_scale_power": 15}
    assert config["bf16"] == {"enabled": False}
    assert config["zero_optimization"] == {
        "stage": 0, "allgather_partitions": True, "reduce_scatter": True, "allgather_bucket_size": 5e7,
        "reduce_bucket_size": 5e7, "overlap_comm": True, "contiguous_gradients": True, "cpu_offload": False,
    }


@pytest.mark.parametrize("dtype, bf16, fp16", [("fp16", False, True), ("bf16", True, False), ("fp32", False, False)])
def test_dtype_flag_picks_precision(parse, dtype, bf16, fp16):
    config = get_ds_config(parse("--dtype", dtype))
    assert (config["bf16"]["enabled"], config["fp16"]["enabled"]) == (bf16, fp16)
    assert config_dtype(config) == dtype


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_stage_flag_picks_zero_stage(parse, stage):
    assert get_ds_config(parse("--stage", str(stage)))["zero_optimization"]["stage"] == stage


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


# ZeRO-Offload: --offload, and the MoE tutorial's config file.

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


# The machine: each branch the script takes on a property of the machine, with the property set here.

class Accelerator:
    """DeepSpeed's accelerator as the script asks it, with the answers a test picks."""

    def __init__(self, native_fp16, on_host):
        self.native_fp16, self.on_host = native_fp16, on_host

    def is_fp16_supported(self):
        return self.native_fp16

    def is_synchronized_device(self):
        return self.on_host

    def device_name(self):
        return "cpu" if self.on_host else "cuda"


FASTER = "slower than fp32 (1.5x to 11x measured); pass --dtype fp32 to train faster"


@pytest.mark.parametrize("native_fp16, on_host, note", [
    (False, True, f"note: DeepSpeed finds no native fp16 support on this cpu, so fp16 runs as PyTorch emulates it: "
                  f"{FASTER}"),
    (True, True, f"note: fp16 on this cpu trains {FASTER}"),
    (True, False, None),
], ids=["cpu-without-native-fp16", "cpu-with-native-fp16", "gpu"])
def test_fp16_runs_everywhere_and_on_a_cpu_says_how_to_go_faster(parse, monkeypatch, native_fp16, on_host, note):
    accelerator = Accelerator(native_fp16, on_host)
    monkeypatch.setattr(cifar10_deepspeed, "get_accelerator", lambda: accelerator)
    assert allow_fp16(get_ds_config(parse())) == note
    assert accelerator.is_fp16_supported()  # DeepSpeed will not refuse fp16
    assert allow_fp16(get_ds_config(parse("--dtype", "bf16"))) is None


@pytest.mark.parametrize("cores, local_size, threads", [(2, 1, 2), (2, 2, 1), (16, 2, 8), (16, 1, 16), (1, 2, 1)])
def test_each_rank_takes_its_share_of_the_cores(monkeypatch, cores, local_size, threads):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_size))
    assert cifar10_deepspeed.cores_per_rank() == threads


@pytest.mark.parametrize("cores, on_host, workers", [(2, True, 0), (16, True, 0), (2, False, 1), (16, False, 4),
                                                      (1, False, 0)])
def test_data_loader_workers_from_the_cores(monkeypatch, cores, on_host, workers):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    monkeypatch.setattr(cifar10_deepspeed, "get_accelerator", lambda: Accelerator(True, on_host))
    assert cifar10_deepspeed.data_loader_workers() == workers


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
    assert cifar10_deepspeed.batch_sizes(config, world_size) == sizes
    assert check_args(args, config, world_size) is None
