"""ZeRO-Offload end to end: DeepSpeed's MoE tutorial's recipe as docs/offload.md ships it, and its old spelling.

The config, the checks and the offload line are tested in test_config.py; the
offload cells of the matrix (test_matrix.py) check every parameter moves, ranks
agree, fp16 overflow, the trace and learning; test_equivalence.py checks that
offloading changes no parameter; test_resume.py resumes with and across offload.
"""

import json
import re

import pytest

from conftest import MARGIN

pytestmark = pytest.mark.slow

SYNTHETIC = ["--dataset", "synthetic", "--seed", "0", "--synthetic-test-size", "400"]
OFFLOAD_LINE = re.compile(r"^ZeRO-Offload: .*$", re.M)


def test_the_tutorials_recipe_trains_moe_with_ep_2_as_its_page_runs_it(launch, root):
    """ZeRO 2 with "cpu_offload": true, fp16 with fp16 master weights, MoE with EP 2 on 2 ranks and
    --moe-param-group (run_ds_moe.sh). With fp32 masters (fp16_master_weights_and_grads off, the script's own
    config) the same layout is test_matrix.py's learning cell fp16-zero2-rsample-w2-ep2-offload."""
    run = launch(root / "run_ds_moe.sh", "--deepspeed_config", root / "ds_config_offload.json", *SYNTHETIC,
                 "--synthetic-train-size", "4800", "-e", "1", "--log-interval", "50", env={"BIND_CORES": "0"})
    run.assert_trained(min_accuracy=52 - MARGIN)
    assert OFFLOAD_LINE.findall(run.output) == [
        "ZeRO-Offload: the optimizer's state and step on the cpu (ZeRO stage 2, fp16 master weights and gradients); "
        "the config's \"cpu_offload\": true, as DeepSpeed's MoE tutorial writes it, is offload_optimizer device cpu"]
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
