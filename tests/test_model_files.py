"""cifar10ds/model_files.py and its tools, export_model.py and predict.py: one plain model file from a checkpoint
of any kind, and what a user does with it: evaluate it, classify images, start a new run from it (--init-from)."""

import argparse
import os
import re
import signal
import sys
import warnings
from types import SimpleNamespace

import numpy
import pytest
import torch
from PIL import Image

from bench.reference import Net as ReferenceNet
import cifar10_deepspeed
import export_model
import predict
from cifar10_deepspeed import Net
from cifar10ds import data, model_files
from cifar10ds.data import CLASSES
from conftest import ROOT, metric, run_command, signal_when
from train_cells import engine_of, parameter_snapshot
SYNTHETIC = ["--deepspeed", "--dataset", "synthetic", "--synthetic-train-size", "96", "--synthetic-test-size", "8",
             "--seed", "0", "--log-interval", "100", "-e", "1"]


def saved(parse, save_dir, *flags):
    """Train one epoch in this process and save its checkpoint as the script does; return the engine."""
    args = parse(*SYNTHETIC, "--save-dir", str(save_dir), *flags)
    engine, trainloader, testset = engine_of(args)  # fp16 on any CPU, as the script runs it
    cifar10_deepspeed.train(engine, trainloader, testset, args)
    return engine


def test_a_directory_that_is_no_checkpoint_is_refused_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["export_model.py", str(tmp_path), "-o", str(tmp_path / "model.pt")])
    with pytest.raises(SystemExit) as exit:
        export_model.main()
    assert exit.value.code == 1
    assert capsys.readouterr().err == (f"export_model.py: error: {tmp_path} is not a checkpoint of "
                                       "cifar10_deepspeed.py: it has neither a 'latest' file nor a run.json\n")


def test_the_file_loads_without_deepspeed_into_the_references_names(single_rank_group, parse, tmp_path):
    """fp16 without ZeRO (the reference's layout), one rank: the file holds FP16_Optimizer's fp32 masters, exactly,
    and torch.load(weights_only=True) gives a state_dict that a Net built from the file's flags loads, strict."""
    engine = saved(parse, tmp_path / "ckpt", "--moe", "--num-experts", "2", "--noisy-gate-policy", "RSample",
                   "--top-k", "1", "--capacity-factor", "1.5")
    torch.save(model_files.export(tmp_path / "ckpt", Net), tmp_path / "model.pt")
    exported = torch.load(tmp_path / "model.pt", weights_only=True)
    names = {id(p): name for name, p in engine.module.named_parameters()}
    named = {names[id(p)]: master for flat, params in zip(engine.optimizer.fp32_groups_flat, engine.optimizer.fp16_groups)
             for p, master in zip(params, torch._utils._unflatten_dense_tensors(flat, params))}
    assert exported["state_dict"].keys() == engine.module.state_dict().keys()
    for name, value in exported["state_dict"].items():
        assert torch.equal(value, named[name]), name
    assert exported["model"]["noisy_gate_policy"] == "RSample" and exported["model"]["capacity_factor"] == 1.5
    assert exported["exported_from"]["dtype"] == "fp16" and exported["exported_from"]["checkpoint"].endswith("epoch1")
    model_files.build_net(Net, exported["model"]).load_state_dict(exported["state_dict"], strict=True)
    args = argparse.Namespace(**exported["model"], ep_world_size=1)
    ReferenceNet(args).load_state_dict(exported["state_dict"], strict=True)  # the reference's own Net, at EP 1

# No dropped tokens: where an expert's capacity drops some, DeepSpeed's gate picks them at random, in eval too.
MOE = ["--moe", "--num-experts", "2", "--noisy-gate-policy", "RSample", "--top-k", "1", "--no-drop-tokens"]
TOLERANCE = {"fp32": 1e-5, "bf16": 2 ** -7, "fp16": 2 ** -9}  # of the logits, relative to the largest


@pytest.mark.parametrize("flags, source", [
    (["--dtype", "bf16", "--stage", "0"], "FP16_Optimizer"),
    (["--dtype", "bf16", "--stage", "0", *MOE], "FP16_Optimizer"),
    (["--dtype", "fp16", "--stage", "1", *MOE], "each rank's partition"),
    (["--dtype", "bf16", "--stage", "2", *MOE, "--offload", "cpu"], "each rank's partition"),
    (["--dtype", "bf16", "--stage", "2"], "zero_to_fp32"),
    (["--dtype", "fp16", "--stage", "3", "--offload", "cpu"], "zero_to_fp32"),
    (["--dtype", "fp32", "--stage", "3"], "zero_to_fp32"),
    (["--dtype", "fp32", "--stage", "2", *MOE], "the run's master weights"),
], ids=["bf16-zero0", "bf16-zero0-moe", "fp16-zero1-moe", "bf16-zero2-moe-offload", "bf16-zero2", "fp16-zero3-offload",
        "fp32-zero3", "fp32-zero2-moe"])
def test_every_checkpoint_kind_exports_the_engines_fp32_masters(single_rank_group, parse, tmp_path, flags, source):
    """One rank: every weight of the file is the engine's fp32 master of it (train_cells.parameter_snapshot: the
    optimizer's copy where it keeps one), exactly; in eval mode the file's Net gives the engine's logits on the
    same images, within the run's dtype's rounding."""
    engine = saved(parse, tmp_path / "ckpt", *flags)
    exported = model_files.export(tmp_path / "ckpt", Net)
    model_files.check_files(tmp_path / "ckpt" / "epoch1")  # every file reads with weights_only, as --resume's check
    assert source in exported["exported_from"]["weights"]
    masters = parameter_snapshot(engine)["master"]
    assert exported["state_dict"].keys() == masters.keys()
    for name, value in exported["state_dict"].items():
        assert torch.equal(value, masters[name]), name
    torch.save(exported, tmp_path / "model.pt")
    net = predict.load_model(tmp_path / "model.pt", "cpu")
    engine.eval()
    images = torch.from_numpy(data.SyntheticCIFAR10(32, train=False).data)
    with torch.no_grad():
        expected = engine(data.to_inputs(images, "cpu", engine.get_data_types()[0])).float()
        logits = net(data.to_inputs(images, "cpu"))
    dtype = flags[flags.index("--dtype") + 1]
    assert (logits - expected).abs().max() <= TOLERANCE[dtype] * expected.abs().max()


def test_predict_prints_each_images_class_and_probability(single_rank_group, parse, tmp_path, capsys, monkeypatch):
    """Image files of any size, resized to 32x32: one line each, the Net's likeliest classes and their
    probabilities, as the Net computes them from the same pixels."""
    saved(parse, tmp_path / "ckpt", "--dtype", "fp32")
    torch.save(model_files.export(tmp_path / "ckpt", Net), tmp_path / "model.pt")
    images = data.SyntheticCIFAR10(2, train=False).data
    paths = [tmp_path / "a.png", tmp_path / "b.jpg"]
    Image.fromarray(images[0]).save(paths[0])
    Image.fromarray(images[1]).resize((96, 64)).save(paths[1], quality=95)
    monkeypatch.setattr(sys, "argv", ["predict.py", str(tmp_path / "model.pt"), *map(str, paths), "--top-k", "2"])
    capsys.readouterr()
    predict.main()
    lines = capsys.readouterr().out.splitlines()
    net = predict.load_model(tmp_path / "model.pt", "cpu")
    pixels = torch.stack([predict.read_image(path) for path in paths])
    assert torch.equal(pixels[0], torch.from_numpy(images[0]))  # a 32x32 image is read as it is
    with torch.no_grad():
        probabilities = net(data.to_inputs(pixels, "cpu")).softmax(dim=1)
    for path, line, p in zip(paths, lines, probabilities, strict=True):
        best = p.topk(2)
        assert line == (f"{path}: {CLASSES[best.indices[0]]} {100 * best.values[0]:.1f} %, "
                        f"{CLASSES[best.indices[1]]} {100 * best.values[1]:.1f} %")


def test_a_palette_png_with_transparent_entries_is_read_as_its_colours_without_a_warning(tmp_path):
    """Many PNGs are a palette with transparent entries (a tRNS chunk), which PIL warns about when converted
    straight to RGB: predict.py reads the palette's colours (the Net saw no alpha), and says nothing."""
    image = Image.fromarray(data.SyntheticCIFAR10(1, train=False).data[0]).quantize(16)
    image.save(tmp_path / "palette.png", transparency=bytes([0, 128]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pixels = predict.read_image(tmp_path / "palette.png")
    assert torch.equal(pixels, torch.from_numpy(numpy.array(image.convert("RGB"))))


def test_predicts_stdout_holds_its_answers_alone_and_a_reader_may_stop_early(single_rank_group, parse, tmp_path):
    """`predict.py model.pt *.png > answers.txt` writes one line an image and nothing else (DeepSpeed logs to
    stderr), and `| head -1` ends it as it ends cat (SIGPIPE: 141), with no traceback."""
    saved(parse, tmp_path / "ckpt", "--dtype", "fp32")
    torch.save(model_files.export(tmp_path / "ckpt", Net), tmp_path / "model.pt")
    Image.fromarray(data.SyntheticCIFAR10(1, train=False).data[0]).save(tmp_path / "a.png")
    predict_py = f"{sys.executable} {ROOT / 'predict.py'} model.pt"
    answers = run_command(["bash", "-c", f"{predict_py} a.png a.png 2>/dev/null"], tmp_path)
    assert answers.returncode == 0 and answers.output.splitlines() == [answers.output.splitlines()[0]] * 2
    assert answers.output.startswith("a.png: ") and answers.output.endswith(" %\n"), answers.output
    images = " a.png" * 4000  # more lines than a pipe holds: predict.py writes on after head has left
    stopped = run_command(["bash", "-c", f"{predict_py}{images} | head -1; echo status ${{PIPESTATUS[0]}}"], tmp_path)
    assert stopped.output.endswith(answers.output.splitlines()[0] + "\nstatus 141\n"), stopped.output[-3000:]
    assert "Traceback" not in stopped.output, stopped.output[-3000:]


def test_predict_refuses_what_is_not_a_model_file_in_one_line(tmp_path, capsys):
    (tmp_path / "model.pt").write_text("not a model")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    for name, reason in (("model.pt", "cannot read {path}: not a file torch.save wrote (Unsupported operand 110)"),
                         ("other.pt", "{path} is not a model file of export_model.py: it holds no model and state_dict")):
        with pytest.raises(SystemExit) as exit:
            predict.load_model(tmp_path / name, "cpu")
        assert exit.value.code == 1
        err = capsys.readouterr().err
        assert err.startswith(f"predict.py: error: {reason.format(path=tmp_path / name)}") and err.count("\n") == 1


def test_predict_given_a_checkpoint_names_the_tool_that_makes_a_model_file_of_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["predict.py", str(tmp_path), "cat.png"])
    with pytest.raises(SystemExit) as exit:
        predict.main()
    assert exit.value.code == 1
    assert capsys.readouterr().err == (f"predict.py: error: {tmp_path} is a directory, not a model file: make one of "
                                       f"a checkpoint with python export_model.py {tmp_path} -o model.pt\n")


class RunsACommand:
    """What a hostile pickle holds: unpickling it runs `touch <marker>` (os.system, through __reduce__)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def hostile_checkpoint(single_rank_group, parse, tmp_path):
    """A one-rank checkpoint of the script whose model states also carry a pickled command, and the file that
    command would create. Also a plain model file carrying one."""
    saved(parse, tmp_path / "ckpt", "--dtype", "fp32")
    marker, states = tmp_path / "ran", tmp_path / "ckpt" / "epoch1" / "mp_rank_00_model_states.pt"
    torch.save({**torch.load(states, weights_only=False), "note": RunsACommand(marker)}, states)
    torch.save({"state_dict": Net(parse()).state_dict(), "note": RunsACommand(marker)}, tmp_path / "model.pt")
    return SimpleNamespace(folder=tmp_path / "ckpt", states=states, model=tmp_path / "model.pt", marker=marker)


REFUSED = "{path} wants posix.system to be loaded, which no checkpoint of this script holds: refused unread, as " \
          "loading it could run its code"


def test_a_checkpoint_whose_pickle_runs_code_is_refused_by_export_init_from_and_resume(
        hostile_checkpoint, parse, capsys, monkeypatch):
    """export_model.py, --init-from (a checkpoint and a model file) and --resume each refuse it in one line, and
    the command never runs: every file is read with weights_only, DeepSpeed's own load only after that."""
    run = hostile_checkpoint
    refusals = []
    monkeypatch.setattr(sys, "argv", ["export_model.py", str(run.folder), "-o", str(run.folder / "model.pt")])
    with pytest.raises(SystemExit) as exit:
        export_model.main()
    refusals.append((exit.value.code, capsys.readouterr().err))
    for source in (run.folder, run.model):
        args = parse(*SYNTHETIC, "--dtype", "fp32", "--init-from", str(source))
        with pytest.raises(SystemExit) as exit:
            model_files.init_from(Net(args), args, Net)
        refusals.append((exit.value.code, capsys.readouterr().err))
    args = parse(*SYNTHETIC, "--dtype", "fp32", "--save-dir", str(run.folder), "--resume")
    engine, _, _ = engine_of(args)
    with pytest.raises(SystemExit) as exit:
        cifar10_deepspeed.resume(engine, args)
    refusals.append((exit.value.code, capsys.readouterr().err))
    assert not run.marker.exists(), "the pickled command ran"
    assert refusals == [
        (1, f"export_model.py: error: {REFUSED.format(path=run.states)}\n"),
        (1, f"error: --init-from: {REFUSED.format(path=run.states)}\n"),
        (1, f"error: --init-from: {REFUSED.format(path=run.model)}\n"),
        (1, f"error: --resume: {REFUSED.format(path=run.states)}\n")]
    torch.load(run.states, weights_only=False)  # the marker shows what weights_only=False would have done
    assert run.marker.exists()


def test_init_from_gives_each_expert_parallel_rank_its_experts_by_global_id(single_rank_group, parse, tmp_path,
                                                                            monkeypatch, capsys):
    """A model file of EP 1 (4 experts) into a Net of EP 2: rank 1 holds experts 2 and 3 as its local 0 and 1;
    everything else as the file has it."""
    flags = ["--moe", "--num-experts", "4", "--noisy-gate-policy", "RSample"]
    torch.manual_seed(0)
    source = Net(cifar10_deepspeed.add_argument(flags))
    with torch.no_grad():  # experts start as copies of one template: make each its own
        for i, expert in enumerate(source.moe_layer_list[0].deepspeed_moe.experts.deepspeed_experts):
            expert.weight.add_(i)
    torch.save({"state_dict": source.state_dict()}, tmp_path / "model.pt")
    monkeypatch.setattr(model_files.dist, "get_rank", lambda: 1)
    args = parse(*flags, "--ep-world-size", "2", "--init-from", str(tmp_path / "model.pt"))
    net = Net(args)
    model_files.init_from(net, args, Net)
    expected = source.state_dict()
    for name, value in net.state_dict().items():
        name = name.replace("deepspeed_experts.1.", "deepspeed_experts.3.").replace("deepspeed_experts.0.",
                                                                                     "deepspeed_experts.2.")
        assert torch.equal(value, expected[name]), name
    assert capsys.readouterr().out == ""  # rank 1 says nothing; rank 0 says what was carried


def test_init_from_refuses_weights_of_another_net_in_one_line(single_rank_group, parse, tmp_path, capsys):
    torch.save({"state_dict": Net(parse()).state_dict()}, tmp_path / "dense.pt")
    args = parse("--moe", "--num-experts", "2", "--init-from", str(tmp_path / "dense.pt"))
    with pytest.raises(SystemExit) as exit:
        model_files.init_from(Net(args), args, Net)
    assert exit.value.code == 1
    assert capsys.readouterr().err == (
        f"error: --init-from: {tmp_path / 'dense.pt'} does not fit this Net: no weights of the right shape for "
        "fc4.bias, fc4.weight, moe_layer_list.0.deepspeed_moe.experts.deepspeed_experts.0.bias, "
        "moe_layer_list.0.deepspeed_moe.experts.deepspeed_experts.0.weight ...; give the model flags it was trained "
        "with\n")


# A checkpoint of 2 ranks with EP 2 in fp16


@pytest.fixture(scope="module")
def ep2_fp16_run(tmp_path_factory):
    """MoE with EP 2 on 2 ranks in fp16 (the reference's dtype, without ZeRO), one epoch of 200 steps, saved. Its
    training drops tokens; its evaluation none (an eval capacity of 2 holds every token of a batch at one expert):
    which tokens the gate drops it picks at random. Exported to model.pt, and to dropping.pt with the default eval
    capacity, 1, under which a batch of 40 at one expert holds 20."""
    tmp = tmp_path_factory.mktemp("ep2-fp16")
    full = run_command(["deepspeed", "--num_gpus", "2", ROOT / "cifar10_deepspeed.py", "--deepspeed", "--dataset",
                        "synthetic", "--log-interval", "100", "--seed", "0", "-e", "1", "--synthetic-train-size", "3200",
                        "--moe", "--ep-world-size", "2", "--num-experts", "2", "--eval-capacity-factor", "2",
                        "--save-dir", tmp / "full"], tmp)
    assert full.returncode == 0, full.output[-3000:]
    exported = model_files.export(tmp / "full", Net)
    torch.save(exported, tmp / "model.pt")
    exported["model"]["eval_capacity_factor"] = 1.0
    torch.save(exported, tmp / "dropping.pt")
    return SimpleNamespace(tmp=tmp, full=full)


@pytest.mark.slow
def test_a_fp16_checkpoint_exports_its_fp32_masters_with_every_expert_by_its_global_id(ep2_fp16_run):
    """fp16 without ZeRO, EP 2 on 2 ranks: each weight of the file, rounded to fp16, is the checkpoint's fp16
    weight of the same name (the master copy the step rounds from), experts included."""
    run = ep2_fp16_run
    exported = model_files.export(run.tmp / "full", Net)
    assert exported["exported_from"]["weights"] == "fp32 master weights (DeepSpeed's FP16_Optimizer's copy)"
    model = model_files.module_weights(run.tmp / "full" / "epoch1")
    assert sorted(model) == sorted(exported["state_dict"])
    assert any("deepspeed_experts.1." in name for name in model)
    for name, master in exported["state_dict"].items():
        assert master.dtype == torch.float32
        assert torch.equal(master.half(), model[name]), name
    assert any(not torch.equal(master, model[name].float()) for name, master in exported["state_dict"].items())


@pytest.mark.slow
def test_predict_evaluates_the_exported_model_in_one_process_as_the_run_did(ep2_fp16_run, machine):
    """The model trained on 2 ranks with EP 2 in fp16, exported, evaluates in one process at EP 1 in fp32 with
    the run's final accuracy, within what fp16's rounding moves; with nothing to compile (no C++ compiler, an
    empty op cache). Where its evaluation drops tokens (the default eval capacity, 1), it drops the same ones on
    every call: the same lines each time."""
    run = ep2_fp16_run
    predict_py = ["python", ROOT / "predict.py", "--test-set", "--dataset", "synthetic"]
    predicted = run_command([*predict_py, run.tmp / "model.pt"], run.tmp, env=machine(cxx=False))
    assert predicted.returncode == 0, predicted.output[-3000:]
    lines = [line for line in predicted.output.splitlines() if line.startswith("Accuracy of")]
    assert len(lines) == 11 and lines[0].startswith("Accuracy of the network on the 1000 test images: ")
    assert "layer 0 0.0%" in predicted.output and "layer 0 0.0%" in run.full.output, predicted.output[-3000:]
    assert abs(predicted.accuracy() - run.full.accuracy()) <= 1, (predicted.accuracy(), run.full.accuracy())
    dropping = [run_command([*predict_py, run.tmp / "dropping.pt"], run.tmp) for _ in range(2)]
    lines = [[line for line in each.output.splitlines() if line.startswith(("Accuracy", "Token"))] for each in dropping]
    assert lines[0] == lines[1] and "(eval capacity factor 1): layer 0 0.0%" not in lines[0][-1], lines


@pytest.mark.slow
def test_predict_gives_each_image_its_own_answer_from_a_moe_model_whatever_else_it_is_given(ep2_fp16_run,
                                                                                            single_rank_group):
    """40 images in one call: each gets the class and probability the file's Net gives it alone (one token never
    passes an expert's capacity), every token routed (DeepSpeed's gate dropped those over capacity, which then got a
    constant answer), and stdout holds the answers alone (DeepSpeed prints the expert group it makes). The file's
    evaluation capacity is the default, 1."""
    run = ep2_fp16_run
    images = data.SyntheticCIFAR10(40, train=False).data
    for i, image in enumerate(images):
        Image.fromarray(image).save(run.tmp / f"{i:02}.png")
    names = [f"{i:02}.png" for i in range(len(images))]
    answers = run_command(["bash", "-c", f"{sys.executable} {ROOT / 'predict.py'} dropping.pt {' '.join(names)} "
                                         f"2>/dev/null"], run.tmp)
    assert answers.returncode == 0, answers.output[-3000:]
    answered = [re.fullmatch(r"(\d\d\.png): (\w+) ([\d.]+) %", line).groups() for line in answers.output.splitlines()]
    assert [name for name, _, _ in answered] == names, answers.output
    net = predict.load_model(run.tmp / "dropping.pt", "cpu")  # the file's own flags: its gate drops past capacity
    with torch.no_grad():
        alone = [net(data.to_inputs(torch.from_numpy(image)[None], "cpu")).softmax(dim=1)[0] for image in images]
    for (name, kind, probability), p in zip(answered, alone, strict=True):
        assert (kind, abs(float(probability) - 100 * p.max().item()) <= 0.1) == (CLASSES[p.argmax()], True), name


@pytest.mark.slow
def test_ctrl_c_stops_predict_in_one_line(ep2_fp16_run):
    """A Ctrl-C while predict.py evaluates (once it has built the Net, whose MoE layers print a line): exit 130,
    one line, no traceback."""
    run = ep2_fp16_run
    stopped, _ = signal_when(["python", ROOT / "predict.py", "model.pt", "--test-set", "--dataset", "synthetic",
                              "--synthetic-test-size", "100000"], run.tmp,
                             lambda line: line.startswith("No existing process group found"),
                             lambda launcher, _: launcher.send_signal(signal.SIGINT))
    assert stopped.returncode == 130 and stopped.output.splitlines()[-1] == "Stopped at once by Ctrl-C (exit 130)"
    assert "Traceback" not in stopped.output and "Accuracy" not in stopped.output, stopped.output[-3000:]


@pytest.mark.slow
def test_init_from_the_two_rank_ep2_checkpoint_trains_on_in_one_process(ep2_fp16_run, single_rank_group, parse):
    """--init-from the killed run's checkpoint (2 ranks, EP 2, fp16) into one rank at EP 1 in fp32: the first step's
    loss is the exported model's loss on the same batch, every expert in place; then it trains."""
    run = ep2_fp16_run
    args = parse("--deepspeed", *SYNTHETIC, "--synthetic-train-size", "64", "--dtype", "fp32", "--moe",
                 "--num-experts", "2", "--init-from", str(run.tmp / "full"))
    engine, trainloader, _ = engine_of(args)
    exported = predict.load_model(run.tmp / "model.pt", "cpu").train()
    images, labels = next(iter(trainloader))
    inputs, criterion = data.to_inputs(images, "cpu"), torch.nn.CrossEntropyLoss()
    torch.manual_seed(1)  # the same random token selection in both: top-1 drops tokens past capacity at random
    expected = criterion(exported(inputs), labels)
    torch.manual_seed(1)
    loss = cifar10_deepspeed.train_step(engine, criterion, images, labels)
    assert loss == expected
    assert engine.was_step_applied()


@pytest.mark.slow
def test_init_from_a_one_process_model_trains_on_four_ranks_with_ep_4(launch, script, tmp_path, single_rank_group):
    """A model file of one process (4 experts, each its own) into 4 ranks at EP 4, each rank holding one expert:
    rank 0's first loss is the file's Net's loss on rank 0's first batch (no token dropped, no gate noise), whose
    tokens the file's gate sends to at least three of the experts, held on other ranks."""
    flags = ["--moe", "--num-experts", "4", "--no-drop-tokens"]
    torch.manual_seed(0)
    source = Net(cifar10_deepspeed.add_argument(flags))
    for layer in source.moe_layer_list:
        layer.set_deepspeed_parallelism()
    trainset = data.SyntheticCIFAR10(256, train=True)
    first = list(torch.utils.data.DistributedSampler(trainset, num_replicas=4, rank=0, seed=0))[:32]
    images, labels = torch.from_numpy(trainset.data[first]), torch.tensor([trainset.targets[i] for i in first])
    inputs = data.to_inputs(images, "cpu")  # rank 0's first micro-batch of the global 128
    gate = source.moe_layer_list[0].deepspeed_moe.gate
    tokens = []
    hook = gate.register_forward_hook(lambda module, args, out: tokens.append(args[0].reshape(-1, 84)))
    with torch.no_grad():
        source(inputs)
        hook.remove()
        # The Net's features share one large component, so any gate sends every token to one expert: take it out
        # of the gate's weights, and each expert its own (they start as copies of one template).
        mean = tokens[0].mean(dim=0)
        weight = torch.randn(4, 84)
        gate.wg.weight.copy_(weight - torch.outer(weight @ mean, mean) / mean.dot(mean))
        for i, expert in enumerate(source.moe_layer_list[0].deepspeed_moe.experts.deepspeed_experts):
            expert.weight.mul_(1 + i)
        routed = (tokens[0] @ gate.wg.weight.T).argmax(dim=1)
        expected = torch.nn.CrossEntropyLoss()(source(inputs), labels)
    assert len(set(routed.tolist())) > 2, f"rank 0's tokens reach too few experts for a wrong one to show: {routed}"
    torch.save({"state_dict": source.state_dict()}, tmp_path / "model.pt")
    run = launch("deepspeed", "--num_gpus", "4", script, "--deepspeed", *SYNTHETIC, "--synthetic-train-size", "256",
                 "--batch-size", "128", "-e", "1", "--dtype", "fp32", *flags, "--ep-world-size", "4",
                 "--init-from", tmp_path / "model.pt", "--metrics-dir", tmp_path / "metrics")
    assert run.returncode == 0, run.output[-3000:]
    assert "4 experts, each rank taking its own by global id" in run.output
    assert list(metric(tmp_path / "metrics", "Train_Samples_train_loss").values())[0] == pytest.approx(
        expected.item(), rel=1e-6)
