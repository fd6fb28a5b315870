"""Every distributed layout trains what one process trains on the same samples.

A layout is a world size (2 or 4), an expert-parallel size (1, 2 or 4 where it divides the
experts and the world), a ZeRO stage (0-3 dense, 0-2 MoE), ZeRO-Offload or not, a model (dense,
top-1 with RSample, top-2, PR-MoE) and a dtype. tests/train_layouts.py trains each for STEPS
steps from the same initial weights on the same samples, with gradient clipping acting at every
step, and on 2 ranks once more with it idle (RUNS), and one process (world 1, EP 1, ZeRO 0) trains the same global
batches as one batch. Every parameter on every rank (experts by their global index) and the
gradient norm before clipping at every step (engine.get_global_grad_norm()) must equal that
process's, within the dtype's precision (TOLERANCE). Tokens are never dropped and the gate noise
is the same per sample on every layout (train_layouts.py says how).

fp32 runs every layout. bf16 and fp16 run the layouts where DeepSpeed's norm code differs
(HALF_LAYOUTS): each ZeRO stage with the largest EP size, dense and PR-MoE, and offload.
"""

import json

import pytest
import torch

from cifar10_deepspeed import Net
from cifar10ds import model_files

from cifar10ds.launch import free_port
from conftest import ROOT, run_command
from train_cells import parse_cell
from train_layouts import CLIPPING, truth_of

pytestmark = pytest.mark.slow

STEPS = 12
MOE_MODELS = ("rsample", "top2", "prmoe")


def fp32_layouts():
    layouts = []
    for world in (2, 4):
        eps = [ep for ep in (1, 2, 4) if ep <= world]
        layouts += [f"fp32-zero{stage}-dense-w{world}" for stage in (0, 1, 2, 3)]
        layouts += [f"fp32-zero{stage}-dense-w{world}-offload" for stage in (1, 2, 3)]
        for model in MOE_MODELS:
            layouts += [f"fp32-zero{stage}-{model}-w{world}-ep{ep}" for stage in (0, 1, 2) for ep in eps]
            layouts += [f"fp32-zero{stage}-{model}-w{world}-ep{ep}-offload" for stage in (1, 2) for ep in eps]
    return layouts


HALF_LAYOUTS = [f"{dtype}-{rest}" for dtype in ("bf16", "fp16") for rest in (
    "zero0-dense-w2", "zero3-dense-w2", "zero0-top2-w2-ep2", "zero0-rsample-w4-ep4", "zero1-prmoe-w2-ep2",
    "zero2-rsample-w4-ep2", "zero2-prmoe-w2-ep2-offload", "zero2-dense-w4-offload")]
LAYOUTS = fp32_layouts() + HALF_LAYOUTS
# Clipping acting on every layout; idle on the ZeRO-0 layouts of 2 ranks, where the script's own clipping and fp16
# loss scaling (clip_by_the_global_norm, scale_the_fp16_loss) stand in for DeepSpeed's.
RUNS = [(layout, "acting") for layout in LAYOUTS] + [(layout, "idle") for layout in LAYOUTS
                                                    if parse_cell(layout)[3] == 2 and parse_cell(layout)[1] == 0]
MOVED = 1e-4  # every parameter of one process moves at least this far, or the comparison would prove little
FP32 = 1e-5  # fp32: every parameter (absolute) and every step's norm (relative); summation order alone gives 3e-7
# bf16 and fp16 round every gradient and model weight to 8 and 11 significant bits, and a reduction over 2 or 4
# ranks rounds in another order than one process's sum. Adam steps each weight by about the learning rate
# whatever its gradient's size, so a near-zero gradient whose sign the rounding flips moves its weight the other
# way: single weights may differ by their whole update, and from the third step, once the weights differ, so do
# the gradients. What must hold is the update as a whole and the norms: UPDATE_ERROR bounds the difference of
# the final weights from one process's relative to one process's whole update (measured here: up to 0.15 in both),
# EARLY_NORM the norm's relative error over the first 3 steps, while the weights are still equal (the learning
# rate is 0 at the first two), about one rounding (bf16 2**-8, fp16 2**-10; measured 3e-4 and 1e-4), NORM over
# all steps (measured 2.5e-2). Wrong training misses these by far: the fp16 norm without loss scaling was
# 32768 times too small.
UPDATE_ERROR = 0.25
EARLY_NORM = {"bf16": 2 ** -8, "fp16": 2 ** -10}
NORM = 5e-2


# Saved after training and exported by export_model.py: every way it reads fp32 masters, on 2 and 4 ranks.
EXPORTED = [(layout, "acting") for layout in HALF_LAYOUTS + ["fp32-zero2-prmoe-w4-ep2", "fp32-zero3-dense-w4"]]


def train(tmp, runs, world, *flags):
    """Train `runs` ((layout, clipping) pairs) in one launch of `world` ranks; return the report."""
    report = tmp / f"layouts-w{world}.json"
    run = run_command(["deepspeed", "--master_port", free_port(), "--num_gpus", world, ROOT / "tests" / "train_layouts.py", "--report", report,
                       "--steps", STEPS, *flags, *(f"{layout}/{clipping}" for layout, clipping in runs)], tmp,
                      env={"DS_ACCELERATOR": "cpu"})
    assert run.returncode == 0, run.output[-3000:]
    return json.loads(report.read_text())


@pytest.fixture(scope="module")
def layouts_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("layouts")


@pytest.fixture(scope="module")
def trained(request, layouts_dir):
    """The selected layouts and their one-process truths, trained in one launch per world size; the selected
    EXPORTED runs saved under layouts_dir/checkpoints."""
    selected = {(item.callspec.params["layout"], item.callspec.params["clipping"]) for item in request.session.items
                if item.module.__name__ == __name__ and "layout" in getattr(item, "callspec", {}).params}
    selected = [run for run in RUNS if run in selected]
    truths = layouts_dir / "truths"
    truths.mkdir()
    report = train(layouts_dir, sorted({(truth_of(layout), clipping) for layout, clipping in selected}), 1,
                   "--save", truths)
    for world in (2, 4):
        runs = [run for run in selected if parse_cell(run[0])[3] == world]
        saved = [arg for run in runs if run in EXPORTED for arg in ("--checkpointed", "/".join(run))]
        if runs:
            report.update(train(layouts_dir, runs, world, "--truth", truths,
                                "--checkpoints", layouts_dir / "checkpoints", *saved))
    return report


def ranks_of(report, key):
    assert "error" not in report[key], f"{key} did not train:\n{report[key]['error']}"
    return report[key]["ranks"]


def norm_errors(norms, truth):
    return [abs(norm - true) / true for norm, true in zip(norms, truth)]


@pytest.mark.parametrize("layout, clipping", RUNS, ids=[f"{layout}-{clipping}" for layout, clipping in RUNS])
def test_layout_trains_what_one_process_trains(trained, layout, clipping):
    """Parameters after STEPS steps and the gradient norm at every step equal one process's.

    With clipping acting the norm scales every step: DeepSpeed's fp32 ZeRO-0 path averaged per-rank norms, wrong
    under expert parallelism, until `clip_by_the_global_norm`; its fp16 ZeRO-0 path did not scale the loss,
    until `scale_the_fp16_loss`.
    """
    dtype = parse_cell(layout)[0]
    truth = ranks_of(trained, f"{truth_of(layout)}/{clipping}")[0]
    limit = CLIPPING[clipping]
    assert all(truth["applied"]), "the one-process run skipped a step"
    assert all((n > limit) == (clipping == "acting") for n in truth["norms"]), f"norms {truth['norms']}, clip {limit}"
    barely = [name for name, moved in truth["moved"].items() if moved < MOVED]
    assert not barely, f"one process barely moved {barely}: the comparison would prove little"
    for number, rank in enumerate(ranks_of(trained, f"{layout}/{clipping}")):
        assert rank["applied"] == truth["applied"], f"rank {number} skipped other steps"
        assert None not in rank["norms"], f"rank {number}: get_global_grad_norm() gives no norm"
        assert set(rank["differences"]) <= set(truth["moved"]), f"rank {number} holds parameters one process lacks"
        errors = norm_errors(rank["norms"], truth["norms"])
        why = f"rank {number}: gradient norms {rank['norms']} against one process's {truth['norms']}"
        if dtype == "fp32":
            assert max(errors) <= FP32, why
            worst = max(rank["differences"], key=rank["differences"].get)
            assert rank["differences"][worst] <= FP32, (
                f"rank {number}: {worst} differs from one process's by {rank['differences'][worst]:.2e}")
        else:
            assert max(errors[:3]) <= EARLY_NORM[dtype] and max(errors) <= NORM, why
            assert rank["update_error"] <= UPDATE_ERROR, (
                f"rank {number}: the update differs from one process's by {rank['update_error']:.2f} of it")


@pytest.mark.parametrize("layout, clipping", EXPORTED, ids=[layout for layout, _ in EXPORTED])
def test_the_checkpoint_exports_every_ranks_fp32_masters(trained, layouts_dir, layout, clipping):
    """export_model.py on the layout's checkpoint: every weight equals the fp32 master of the rank that holds it
    (experts by global id), exactly, and every weight of the Net is there."""
    ranks_of(trained, f"{layout}/{clipping}")  # it trained
    checkpoint = layouts_dir / "checkpoints" / f"{layout}-{clipping}"
    exported = model_files.export(checkpoint, Net)["state_dict"]
    model_files.check_files(checkpoint / "epoch1")  # every file reads with weights_only, as --resume's check
    held = set()
    for rank in range(parse_cell(layout)[3]):
        masters = torch.load(checkpoint / f"masters-rank{rank}.pt")
        held |= masters.keys()
        for name, master in masters.items():
            assert torch.equal(exported[name], master), f"{name} of rank {rank}"
    model = json.loads((checkpoint / "epoch1" / "run.json").read_text())["model"]
    net = model_files.build_net(Net, model)
    assert held == {name for name, _ in net.named_parameters()}  # PR-MoE's shared residual MLP once, as the optimizer has it
