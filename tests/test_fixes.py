"""cifar10ds/fixes.py: what DeepSpeed gets wrong, fixed. fp16 on any CPU (DeepSpeed's probe set by the tests),
with its note once; the fp16 loss scaled once without ZeRO. The clipping by the global norm is shown on every
layout by test_layouts.py, the shared-memory buffers by test_data.py's offline launch and the suite's end, the
host Adam's replay by test_checkpoints.py's resumed runs."""

import ctypes.util
import importlib
import os
import re
import types

import deepspeed
import pytest
import torch
import torch.nn as nn

import cifar10_deepspeed
from cifar10_deepspeed import Net, get_ds_config
from cifar10ds import fixes
from conftest import ROOT, Accelerator
from train_cells import engine_of
FASTER = "slower than fp32 (1.5x to 11x measured); pass --dtype fp32 to train faster"
FP16_NOTES = {False: f"note: DeepSpeed finds no native fp16 support on this cpu, so fp16 runs as PyTorch emulates "
                     f"it: {FASTER}",
              True: f"note: fp16 on this cpu trains {FASTER}"}
LOSS_LINE = re.compile(r"^\[ \d+,  +\d+\] loss:  \d\.\d{3}$")  # the reference's: sign spaces, batch in 5


@pytest.mark.parametrize("native_fp16, on_host, note", [
    (False, True, f"note: DeepSpeed finds no native fp16 support on this cpu, so fp16 runs as PyTorch emulates it: "
                  f"{FASTER}"),
    (True, True, f"note: fp16 on this cpu trains {FASTER}"),
    (True, False, None),
], ids=["cpu-without-native-fp16", "cpu-with-native-fp16", "gpu"])
def test_fp16_runs_everywhere_and_on_a_cpu_says_how_to_go_faster(parse, monkeypatch, native_fp16, on_host, note):
    accelerator = Accelerator(native_fp16, on_host)
    monkeypatch.setattr(fixes, "get_accelerator", lambda: accelerator)
    assert fixes.allow_fp16(get_ds_config(parse())) == note
    assert accelerator.is_fp16_supported()  # DeepSpeed will not refuse fp16
    assert fixes.allow_fp16(get_ds_config(parse("--dtype", "bf16"))) is None


@pytest.mark.parametrize("native_fp16", [False, True], ids=["emulated-fp16", "native-fp16"])
def test_default_fp16_on_cpu_runs_and_says_how_to_train_faster(launch, script, machine, native_fp16):
    """Whether or not the CPU reports native fp16, fp16 runs and rank 0 says once how to go faster."""
    run = launch("python", script, "--deepspeed", "--dataset", "synthetic", "--log-interval", "5", "-e", "1",
                 "--synthetic-train-size", "160", "--synthetic-test-size", "203", env=machine(native_fp16=native_fp16))
    assert run.returncode == 0, run.output[-3000:]
    lines = run.output.splitlines()
    assert lines.count(FP16_NOTES[native_fp16]) == 1 and FP16_NOTES[not native_fp16] not in lines
    assert [line for line in lines if " loss: " in line] == [line for line in lines if LOSS_LINE.match(line)]
    assert len([line for line in lines if LOSS_LINE.match(line)]) == 2  # [ 1,     5] and [ 1,    10]
    assert "Finished Training" in lines
    assert re.search(r"^Accuracy of the network on the 203 test images:  \d{1,3} %$", run.output, re.M)


@pytest.mark.parametrize("flags, scalings", [([], 1), (["--moe", "--num-experts", "2", "--noisy-gate-policy", "RSample"], 1),
                                             ([], 2)], ids=["dense", "moe", "dense-scaled-before"])
def test_fp16_without_zero_backpropagates_the_scaled_loss(single_rank_group, parse, flags, scalings):
    """fp16 at ZeRO 0: the gradients the optimizer receives are the loss scale times fp32's, as its step expects.

    DeepSpeed's engine.backward scales the loss only for ZeRO optimizers, while FP16_Optimizer.step divides the
    gradients by the scale regardless; `scale_the_fp16_loss` scales it, and never twice: wrapped a second time,
    as in a DeepSpeed whose backward scales the loss itself, the gradients are the same.
    """
    args = parse("--deepspeed", "--dataset", "synthetic", "--synthetic-train-size", "16", "--synthetic-test-size", "1",
                 "--dtype", "fp16", "--stage", "0", "--seed", "0", *flags)
    model_engine, _, _ = engine_of(args)
    for _ in range(scalings - 1):
        fixes.scale_the_fp16_loss(model_engine)
    torch.manual_seed(0)  # as initialize seeds before it builds the Net: the same weights, in fp32
    reference = Net(args)
    for layer in getattr(reference, "moe_layer_list", []):
        layer.set_deepspeed_parallelism()
    inputs, labels = torch.randn(16, 3, 32, 32), torch.randint(10, (16,))
    torch.manual_seed(1)
    model_engine.backward(nn.functional.cross_entropy(model_engine(inputs.half()), labels))
    torch.manual_seed(1)
    nn.functional.cross_entropy(reference(inputs), labels).backward()
    scale = model_engine.optimizer.loss_scale_config.cur_scale
    assert scale == 2 ** 15
    for (name, ours), theirs in zip(model_engine.module.named_parameters(), reference.parameters()):
        # fp16 rounding puts conv1 up to 0.07 off here; unscaled gradients would be off by all of them (1.0)
        if theirs.grad is not None and theirs.grad.norm() > 0:  # an expert that got no token has none
            error = ((ours.grad.float() / scale - theirs.grad).norm() / theirs.grad.norm()).item()
            assert error < 0.2, f"{name}: the fp16 gradient over the loss scale is {error:.2g} off fp32's, relative"
    model_engine.destroy()


class DeepSpeedEngineOfAnotherVersion:
    """An fp16 engine without ZeRO whose optimizer no longer keeps its loss scale where 0.19.8 does, without the
    fp32 clipping method 0.19.8 has, and without its switch of the gradient all-reduce."""

    def __init__(self):
        self.optimizer = types.SimpleNamespace()

    def fp16_enabled(self):
        return True

    def zero_optimization(self):
        return False

    def backward(self, loss):
        return loss


@pytest.mark.parametrize("flags, reductions", [(["--dtype", "fp32"], 0), (["--dtype", "fp16"], 0),
                                               (["--dtype", "bf16", "--moe", "--num-experts", "2"], 0),
                                               (["--dtype", "fp32", "--stage", "1"], 3)],
                         ids=["fp32", "fp16", "moe-bf16", "zero1-kept"])
def test_one_rank_without_zero_reduces_no_gradient(single_rank_group, parse, flags, reductions):
    """Counted over 3 steps: one rank without ZeRO enters no gradient reduction (skip_the_gradient_all_reduce_on_
    one_rank); with ZeRO, whose optimizer moves gradients into its partitions there, DeepSpeed's stays."""
    args = parse("--deepspeed", "--dataset", "synthetic", "--synthetic-train-size", "48", "--synthetic-test-size", "1",
                 "--seed", "0", *flags)
    model_engine, trainloader, _ = engine_of(args)
    calls, reduce = [], model_engine.allreduce_gradients
    model_engine.allreduce_gradients = lambda *a, **k: calls.append(1) or reduce(*a, **k)
    for inputs, labels in trainloader:
        cifar10_deepspeed.train_step(model_engine, nn.CrossEntropyLoss(), inputs, labels)
    assert len(calls) == reductions
    model_engine.destroy()


def test_without_nvidias_driver_no_step_looks_for_it(launch, tmp_path):
    """Where NVIDIA's NVML library cannot be loaded (no driver; here an empty file first on the library path,
    on any machine), a run of the script asks for it as often in 40 steps as in 10: importing DeepSpeed made
    torch's optimizer look for it again at every step (stop_probing_a_missing_nvml)."""
    folder = tmp_path / "without-nvml"
    folder.mkdir()
    (folder / fixes.NVML).touch()
    loads = {}
    for steps in (10, 40):
        count = tmp_path / f"loads-{steps}"
        run = launch("python", ROOT / "tests" / "count_in_a_run.py", "--deepspeed", "--dataset", "synthetic",
                     "--dtype", "fp32", "-e", "1", "--synthetic-train-size", str(16 * steps),
                     "--synthetic-test-size", "4", env={"LD_LIBRARY_PATH": str(folder), "NVML_LOADS": str(count)})
        assert run.returncode == 0, run.output[-3000:]
        loads[steps] = len(count.read_text().splitlines()) if count.exists() else 0
    assert loads[40] == loads[10], loads


@pytest.mark.parametrize("loadable", [False, True], ids=["without-nvml", "with-nvml"])
def test_the_nvml_check_is_left_only_where_nvml_cannot_load(monkeypatch, tmp_path, loadable):
    """DeepSpeed's NVML-first CUDA check is left out only where NVML cannot be loaded (an empty file), where
    torch asks CUDA alone anyway: CUDA is as available as before; where it loads (here the C library in its
    place), the check stays."""
    unloadable = tmp_path / fixes.NVML
    unloadable.touch()
    monkeypatch.setattr(fixes, "NVML", ctypes.util.find_library("c") if loadable else str(unloadable))
    monkeypatch.setenv("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    available = torch.cuda.is_available()
    fixes.stop_probing_a_missing_nvml()
    assert os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK") == ("1" if loadable else None)
    assert torch.cuda.is_available() == available


def without(module, name):
    return lambda monkeypatch: monkeypatch.delattr(importlib.import_module(module), name)


@pytest.mark.parametrize("fix, upstream, missing, another_deepspeed, call", [
    ("wrap_torch_adam_as_deepspeed_wraps_its_own", "deepspeedai/DeepSpeed#8613", "deepspeed.runtime.engine.FusedAdam",
     without("deepspeed.runtime.engine", "FusedAdam"), lambda: fixes.wrap_torch_adam_as_deepspeed_wraps_its_own()),
    ("skip_the_shared_memory_all_reduce", "deepspeedai/DeepSpeed#4115", "deepspeed.comm.torch.build_shm_op",
     without("deepspeed.comm.torch", "build_shm_op"), lambda: fixes.skip_the_shared_memory_all_reduce()),
    ("scale_the_fp16_loss", "deepspeedai/DeepSpeed#8393", "SimpleNamespace.loss_scale_config", lambda _: None,
     lambda: fixes.scale_the_fp16_loss(DeepSpeedEngineOfAnotherVersion())),
    ("clip_by_the_global_norm", "deepspeedai/DeepSpeed#8475",
     "DeepSpeedEngineOfAnotherVersion.clip_fp32_gradients", lambda _: None,
     lambda: fixes.clip_by_the_global_norm(DeepSpeedEngineOfAnotherVersion())),
    ("skip_the_gradient_all_reduce_on_one_rank", "none filed",
     "DeepSpeedEngineOfAnotherVersion.enable_backward_allreduce", lambda _: None,
     lambda: fixes.skip_the_gradient_all_reduce_on_one_rank(DeepSpeedEngineOfAnotherVersion())),
], ids=["fp16-wrapper", "shared-memory", "loss-scaling", "clipping", "one-rank-all-reduce"])
def test_a_fix_whose_deepspeed_target_changed_stops_in_one_line(single_rank_group, monkeypatch, capsys, fix, upstream,
                                                                   missing, another_deepspeed, call):
    """A DeepSpeed that renamed or removed what a fix patches: the run stops on every rank with one line naming the
    fix and its upstream issue, instead of training on unfixed."""
    another_deepspeed(monkeypatch)
    with pytest.raises(SystemExit) as stopped:
        call()
    assert stopped.value.code == 1
    assert capsys.readouterr().err.splitlines() == [
        f"error: fix {fix} ({upstream}) finds no {missing} in DeepSpeed {deepspeed.__version__} (torch "
        f"{torch.__version__}): this project's fixes patch DeepSpeed 0.19.8 (requirements.txt); install it, or "
        f"check the fix against yours (docs/fixes.md)"]


def test_every_fix_the_docs_name_exists_and_every_fix_is_in_the_docs():
    page = (ROOT / "docs" / "fixes.md").read_text()
    called = set(re.findall(r"\bfixes\.(\w+)\(", page))
    tabled = set(re.findall(r"^\| `(\w+)` \|", page, re.M))
    assert called and tabled
    missing = sorted(name for name in called | tabled if not callable(getattr(fixes, name, None)))
    assert not missing, f"docs/fixes.md names what cifar10ds/fixes.py does not have: {missing}"
    with_issue = {name for name, value in vars(fixes).items()
                  if callable(value) and getattr(value, "__module__", None) == fixes.__name__ and value.__doc__
                  and "Upstream:" in value.__doc__}
    assert with_issue <= tabled, f"fixes missing from docs/fixes.md's table: {sorted(with_issue - tabled)}"
