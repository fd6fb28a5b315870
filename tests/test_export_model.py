"""export_model.py and predict.py: one plain model file from a checkpoint, and what a user does with it.

Checkpoints of several ranks are exported where test_resume.py saves them (EP 2, fp16 and fp32)."""

import sys

import pytest
import torch
from PIL import Image

import cifar10_deepspeed
import export_model
import predict
from cifar10_deepspeed import CLASSES, Net
from test_model import ReferenceNet
from train_cells import parameter_snapshot

SYNTHETIC = ["--deepspeed", "--dataset", "synthetic", "--synthetic-train-size", "96", "--synthetic-test-size", "8",
             "--seed", "0", "--log-interval", "100", "-e", "1"]


def saved(parse, save_dir, *flags):
    """Train one epoch in this process and save its checkpoint as the script does; return the engine."""
    args = parse(*SYNTHETIC, "--save-dir", str(save_dir), *flags)
    config = cifar10_deepspeed.get_ds_config(args)
    cifar10_deepspeed.allow_fp16(config)  # fp16 on any CPU, as the script runs it
    engine, trainloader, testset = cifar10_deepspeed.initialize(args, config)
    cifar10_deepspeed.train(engine, trainloader, testset, args)
    return engine


def test_a_directory_that_is_no_checkpoint_is_refused_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        export_model.export(tmp_path)
    assert exit.value.code == 1
    assert capsys.readouterr().err == (f"export_model.py: error: {tmp_path} is not a checkpoint of "
                                       "cifar10_deepspeed.py: it has neither a 'latest' file nor a run.json\n")


def test_the_file_loads_without_deepspeed_into_the_references_names(single_rank_group, parse, tmp_path):
    """fp16 without ZeRO (the reference's layout), one rank: the file holds FP16_Optimizer's fp32 masters, exactly,
    and torch.load(weights_only=True) gives a state_dict that a Net built from the file's flags loads, strict."""
    engine = saved(parse, tmp_path / "ckpt", "--moe", "--num-experts", "2", "--noisy-gate-policy", "RSample",
                   "--top-k", "1", "--capacity-factor", "1.5")
    torch.save(export_model.export(tmp_path / "ckpt"), tmp_path / "model.pt")
    exported = torch.load(tmp_path / "model.pt", weights_only=True)
    names = {id(p): name for name, p in engine.module.named_parameters()}
    named = {names[id(p)]: master for flat, params in zip(engine.optimizer.fp32_groups_flat, engine.optimizer.fp16_groups)
             for p, master in zip(params, torch._utils._unflatten_dense_tensors(flat, params))}
    assert exported["state_dict"].keys() == engine.module.state_dict().keys()
    for name, value in exported["state_dict"].items():
        assert torch.equal(value, named[name]), name
    assert exported["model"]["noisy_gate_policy"] == "RSample" and exported["model"]["capacity_factor"] == 1.5
    assert exported["exported_from"]["dtype"] == "fp16" and exported["exported_from"]["checkpoint"].endswith("epoch1")
    args = cifar10_deepspeed.add_argument(cifar10_deepspeed.model_argv(exported["model"]))
    Net(args).load_state_dict(exported["state_dict"], strict=True)
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
    exported = export_model.export(tmp_path / "ckpt")
    assert source in exported["exported_from"]["weights"]
    masters = parameter_snapshot(engine)["master"]
    assert exported["state_dict"].keys() == masters.keys()
    for name, value in exported["state_dict"].items():
        assert torch.equal(value, masters[name]), name
    torch.save(exported, tmp_path / "model.pt")
    net = predict.load_model(tmp_path / "model.pt", "cpu")
    engine.eval()
    images = torch.from_numpy(cifar10_deepspeed.SyntheticCIFAR10(32, train=False).data)
    with torch.no_grad():
        expected = engine(cifar10_deepspeed.to_inputs(images, "cpu", cifar10_deepspeed.input_dtype(engine))).float()
        logits = net(cifar10_deepspeed.to_inputs(images, "cpu", None))
    dtype = flags[flags.index("--dtype") + 1]
    assert (logits - expected).abs().max() <= TOLERANCE[dtype] * expected.abs().max()


def test_predict_prints_each_images_class_and_probability(single_rank_group, parse, tmp_path, capsys, monkeypatch):
    """Image files of any size, resized to 32x32: one line each, the Net's likeliest classes and their
    probabilities, as the Net computes them from the same pixels."""
    saved(parse, tmp_path / "ckpt", "--dtype", "fp32")
    torch.save(export_model.export(tmp_path / "ckpt"), tmp_path / "model.pt")
    images = cifar10_deepspeed.SyntheticCIFAR10(2, train=False).data
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
        probabilities = net(cifar10_deepspeed.to_inputs(pixels, "cpu", None)).softmax(dim=1)
    for path, line, p in zip(paths, lines, probabilities, strict=True):
        best = p.topk(2)
        assert line == (f"{path}: {CLASSES[best.indices[0]]} {100 * best.values[0]:.1f} %, "
                        f"{CLASSES[best.indices[1]]} {100 * best.values[1]:.1f} %")


def test_predict_refuses_what_is_not_a_model_file_in_one_line(tmp_path, capsys):
    (tmp_path / "model.pt").write_text("not a model")
    with pytest.raises(SystemExit) as exit:
        predict.load_model(tmp_path / "model.pt", "cpu")
    assert exit.value.code == 1
    assert capsys.readouterr().err.startswith(f"predict.py: error: {tmp_path / 'model.pt'} is not a model file of "
                                              "export_model.py (")


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
    monkeypatch.setattr(cifar10_deepspeed.dist, "get_rank", lambda: 1)
    args = parse(*flags, "--ep-world-size", "2", "--init-from", str(tmp_path / "model.pt"))
    net = Net(args)
    cifar10_deepspeed.init_from(net, args)
    expected = source.state_dict()
    for name, value in net.state_dict().items():
        name = name.replace("deepspeed_experts.1.", "deepspeed_experts.3.").replace("deepspeed_experts.0.",
                                                                                     "deepspeed_experts.2.")
        assert torch.equal(value, expected[name]), name
    assert capsys.readouterr().out == ""  # rank 1 says nothing; rank 0 says what was carried


def test_init_from_refuses_weights_of_another_net_in_one_line(single_rank_group, parse, tmp_path, capsys,
                                                             monkeypatch):
    monkeypatch.setattr(cifar10_deepspeed, "leave", sys.exit)  # not os._exit: this is the test's own process
    torch.save({"state_dict": Net(parse()).state_dict()}, tmp_path / "dense.pt")
    args = parse("--moe", "--num-experts", "2", "--init-from", str(tmp_path / "dense.pt"))
    with pytest.raises(SystemExit) as exit:
        cifar10_deepspeed.init_from(Net(args), args)
    assert exit.value.code == 1
    assert capsys.readouterr().err == (
        f"error: --init-from: {tmp_path / 'dense.pt'} does not fit this Net: no weights of the right shape for "
        "fc4.bias, fc4.weight, moe_layer_list.0.deepspeed_moe.experts.deepspeed_experts.0.bias, "
        "moe_layer_list.0.deepspeed_moe.experts.deepspeed_experts.0.weight ...; give the model flags it was trained "
        "with\n")
