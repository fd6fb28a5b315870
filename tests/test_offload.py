"""ZeRO-Offload end to end: DeepSpeed's MoE tutorial's recipe as docs/offload.md ships it, and its old spelling.

The config, the checks and the offload line are tested in test_config.py; the
offload cells of the matrix (test_matrix.py) check every parameter moves, ranks
agree, fp16 overflow, the trace and learning; test_equivalence.py checks that
offloading changes no parameter; test_resume.py resumes with and across offload.
"""

import json
import re

import pytest

from conftest import MARGIN, ROOT

pytestmark = pytest.mark.slow

SYNTHETIC = ["--dataset", "synthetic", "--seed", "0", "--synthetic-test-size", "400"]
OFFLOAD_LINE = re.compile(r"^ZeRO-Offload: .*$", re.M)


def tutorial_config(tmp_path, fp16_master):
    """ds_config_offload.json as shipped (fp16 master weights on), or with fp16_master_weights_and_grads off."""
    if fp16_master:
        return ROOT / "ds_config_offload.json"
    config = json.loads((ROOT / "ds_config_offload.json").read_text())
    config["fp16"]["fp16_master_weights_and_grads"] = False
    path = tmp_path / "ds_config_offload_fp32_master.json"
    path.write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("fp16_master", [True, False], ids=["fp16-master", "fp32-master"])
def test_the_tutorials_recipe_trains_moe_with_ep_2_as_its_page_runs_it(launch, root, tmp_path, fp16_master):
    """ZeRO 2 with "cpu_offload": true, fp16, MoE with EP 2 on 2 ranks and --moe-param-group (run_ds_moe.sh)."""
    config = tutorial_config(tmp_path, fp16_master)
    run = launch(root / "run_ds_moe.sh", "--deepspeed_config", config, *SYNTHETIC, "--synthetic-train-size", "4800",
                 "-e", "1", "--log-interval", "50", env={"BIND_CORES": "0"})
    run.assert_trained(min_accuracy=52 - MARGIN)
    master = ", fp16 master weights and gradients" if fp16_master else ""
    assert OFFLOAD_LINE.findall(run.output) == [
        f"ZeRO-Offload: the optimizer's state and step on the cpu (ZeRO stage 2{master}); the config's "
        f"\"cpu_offload\": true, as DeepSpeed's MoE tutorial writes it, is offload_optimizer device cpu"]
    assert "Config parameter cpu_offload is deprecated" not in run.output  # DeepSpeed gets today's spelling


def test_cpu_offload_in_the_config_trains_exactly_as_offload_cpu(launch, script, root, tmp_path):
    """The same seed gives the same loss at every step: the old spelling and the flag are one configuration.

    In fp32 (--dtype overrides the file's fp16 in both runs): which dtype trains does not change what the
    spelling means, and fp16 trains several times slower on a CPU.
    """
    config = json.loads((root / "ds_config.json").read_text())
    config["zero_optimization"].update(stage=2, cpu_offload=True)
    path = tmp_path / "cpu_offload.json"
    path.write_text(json.dumps(config))
    cmd = ["python", script, "--deepspeed", *SYNTHETIC, "--synthetic-train-size", "1600", "-e", "1",
           "--log-interval", "5", "--dtype", "fp32"]
    spelled = launch(*cmd, "--deepspeed_config", path)
    flag = launch(*cmd, "--offload", "cpu", "--stage", "2")
    for run in (spelled, flag):
        assert run.returncode == 0, run.output[-3000:]
    assert OFFLOAD_LINE.findall(flag.output) == ["ZeRO-Offload: the optimizer's state and step on the cpu (ZeRO stage 2)"]
    assert OFFLOAD_LINE.findall(spelled.output)[0].startswith(
        "ZeRO-Offload: the optimizer's state and step on the cpu (ZeRO stage 2); the config's \"cpu_offload\": true")
    assert len(spelled.losses()) == 20 and spelled.losses() == flag.losses()
    assert spelled.accuracy() == flag.accuracy()
