import json

import pytest

from conftest import ROOT
from cifar10_deepspeed import check_args, config_dtype, get_ds_config, load_ds_config


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
