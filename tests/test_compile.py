"""--compile: the model compiled through DeepSpeed's engine.compile() trains as the eager model does."""

import pytest

from conftest import metric

pytestmark = pytest.mark.slow

STEPS = 25
FLAGS = ["--deepspeed", "--dataset", "synthetic", "--seed", "0", "--synthetic-train-size", str(16 * STEPS),
         "--synthetic-test-size", "100", "-e", "1", "--log-interval", "5"]
MOE = ["--moe", "--num-experts", "2", "--noisy-gate-policy", "RSample"]
COMPILED = "--compile: the model is compiled with torch.compile (inductor) as its first steps run"


def step_losses(metrics_dir):
    return list(metric(metrics_dir, "Train_Samples_train_loss").values())


@pytest.mark.parametrize("model, dtype", [([], "fp32"), (MOE, "bf16")], ids=["dense-fp32", "moe-top1-rsample-bf16"])
def test_compiled_training_follows_the_eager_loss_trace(launch, script, tmp_path, model, dtype):
    """One rank, the same seed, 25 steps: every step's loss within a relative 1e-4 of eager training's; fp32 for the
    dense Net, half precision for MoE (fp16, which a CPU emulates, compiles through the same path at several times
    the cost)."""
    cmd = ["python", script, *FLAGS, "--dtype", dtype, *model]
    eager = launch(*cmd, "--metrics-dir", tmp_path / "eager")
    compiled = launch(*cmd, "--compile", "--metrics-dir", tmp_path / "compiled",
                      env={"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor-cache")})
    for run in (eager, compiled):
        assert run.returncode == 0, run.output[-3000:]
    expected = COMPILED + ("; the MoE gate's capacity, read on the host, runs eagerly between compiled parts"
                           if model else "")
    assert [line for line in compiled.output.splitlines() if line.startswith("--compile")] == [expected]
    # The one-op probe compile_model tries first generates code too (one addition): only the Net's linear layers
    # (addmm; its convolutions too where they are in a compiled graph) show that the model was compiled.
    generated = [path.read_text() for path in (tmp_path / "inductor-cache").rglob("*.py")]
    assert any("addmm" in code for code in generated), "inductor generated no code of the Net: not compiled"
    assert "--compile" not in eager.output
    eager_losses, compiled_losses = step_losses(tmp_path / "eager"), step_losses(tmp_path / "compiled")
    assert len(eager_losses) == STEPS and len(set(eager_losses)) > 1
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-4)


def test_without_a_compiler_it_says_so_and_trains_eagerly(launch, script, machine):
    run = launch("python", script, *FLAGS, "--dtype", "fp32", "--compile", env=machine(cxx=False))
    assert run.returncode == 0, run.output[-3000:]
    lines = [line for line in run.output.splitlines() if line.startswith("--compile")]
    assert len(lines) == 1 and lines[0].startswith("--compile: cannot compile on this machine (inductor: ")
    assert lines[0].endswith("); training eagerly")
    assert len(run.losses()) == STEPS // 5 and "Finished Training" in run.output
