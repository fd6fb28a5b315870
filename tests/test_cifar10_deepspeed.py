"""cifar10_deepspeed.py, the lesson: the reference's flags, config and network, its training step and loop,
and its evaluation; DeepSpeed's training step is the update a plain PyTorch loop applies by hand.

The hand-written loop applies what the script's config asks for: Adam in AdamW mode (decoupled weight decay)
with the config's betas, eps and weight decay, gradient clipping to the config's norm, and WarmupLR's log
schedule (bench/plain_loop.py's warmup_lr, which the throughput baseline uses too). The MoE layer's forward
(DeepSpeed's gate math) is shared; only the training machinery differs. Both loops see the same batches and the
same random draws.
"""

import ast
import copy
import inspect
import json
import math
import re

import deepspeed
import pytest
import torch
import torch.nn as nn

import cifar10_deepspeed
from bench.plain_loop import warmup_lr
from bench.reference import Net as ReferenceNet  # the reference's Net as ../shared/REFERENCE.md describes it
from cifar10_deepspeed import Net, create_moe_param_groups, get_ds_config, train_step
from cifar10ds import checkpoints, data, machine, options
import count_host_reads
from conftest import ROOT
from train_cells import engine_of


REFERENCE = ROOT.parent / "shared" / "REFERENCE.md"  # what the port ports: the developers' copy


def test_the_scripts_top_level_names_and_steps_are_the_references_in_its_order():
    """add_argument, create_moe_param_groups, get_ds_config, Net, test, main, in that order (the script's own
    functions between them), and main's four Step banners as the tutorial walks through them."""
    if not REFERENCE.exists():
        pytest.skip(f"no {REFERENCE} beside this checkout")
    reference = REFERENCE.read_text()
    pieces = re.findall(r"^\d\. `(\w+)\(", reference, re.M)
    assert pieces == ["add_argument", "create_moe_param_groups", "get_ds_config", "Net", "test", "main"]
    script = ast.parse((ROOT / "cifar10_deepspeed.py").read_text())
    names = [node.name for node in script.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))]
    assert [name for name in names if name in pieces] == pieces, names
    assert not hasattr(cifar10_deepspeed, "parse_args")  # one name for the flags, the reference's
    banners = [" ".join(banner.split()) for banner in re.findall(r'"(Step ?\d\. [^"]+)"', reference)]
    assert len(banners) == 4
    main = inspect.getsource(cifar10_deepspeed.main)
    at = [main.index(f"# {banner}\n") for banner in banners]
    assert at == sorted(at), banners


def test_reference_defaults(parse):
    args = parse()
    assert (args.epochs, args.local_rank, args.log_interval) == (30, -1, 2000)
    assert (args.moe, args.ep_world_size, args.num_experts, args.mlp_type) == (False, 1, [1], "standard")
    assert (args.top_k, args.min_capacity, args.noisy_gate_policy, args.moe_param_group) == (1, 0, None, False)
    assert (args.dataset, args.data_dir, args.synthetic_train_size, args.synthetic_test_size) == (
        "cifar10", "./data", 5000, 1000)
    config = get_ds_config(args)
    assert config["fp16"]["enabled"] and config["zero_optimization"]["stage"] == 0


def test_reference_flags_parse(parse):
    args = parse("-e", "3", "--log-interval", "100", "--dtype", "bf16", "--stage", "2", "--moe",
                 "--ep-world-size", "2", "--num-experts", "2", "4", "--mlp-type", "residual", "--top-k", "2",
                 "--min-capacity", "4", "--noisy-gate-policy", "Jitter", "--moe-param-group", "--deepspeed")
    assert (args.epochs, args.log_interval, args.dtype, args.stage) == (3, 100, "bf16", 2)
    assert (args.ep_world_size, args.num_experts, args.mlp_type, args.top_k) == (2, [2, 4], "residual", 2)
    assert (args.min_capacity, args.noisy_gate_policy, args.moe_param_group, args.deepspeed) == (4, "Jitter", True, True)
    assert parse("--noisy-gate-policy", "None").noisy_gate_policy is None


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
    assert options.config_dtype(config) == dtype


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_stage_flag_picks_zero_stage(parse, stage):
    assert get_ds_config(parse("--stage", str(stage)))["zero_optimization"]["stage"] == stage


# The network
TRUNK = (3 * 6 * 25 + 6) + (6 * 16 * 25 + 16) + (400 * 120 + 120) + (120 * 84 + 84)  # conv1, conv2, fc1, fc2
HEAD = 84 * 10 + 10  # fc3 (dense) or fc4 (MoE)
EXPERT = 84 * 84 + 84  # one expert: Linear(84, 84)


def moe_layer_params(num_experts, residual):
    gate = 84 * num_experts  # TopKGate: Linear(84, num_experts, bias=False)
    extra = EXPERT + (84 * 2 + 2) if residual else 0  # residual MLP and its Linear(84, 2) coefficient
    return num_experts * EXPERT + gate + extra


def count(model):
    return sum(p.numel() for p in model.parameters())


def test_dense_net_shape_and_parameter_count(parse):
    net = Net(parse())
    assert net(torch.randn(5, 3, 32, 32)).shape == (5, 10)
    assert count(net) == TRUNK + HEAD == 62006


def test_moe_net_shape_and_parameter_count(parse):
    net = Net(parse("--moe", "--num-experts", "2"))
    assert len(net.moe_layer_list) == 1
    assert net(torch.randn(5, 3, 32, 32)).shape == (5, 10)
    assert count(net) == TRUNK + HEAD + moe_layer_params(2, residual=False)


def test_pr_moe_net_has_one_residual_layer_per_expert_count(parse):
    net = Net(parse("--moe", "--num-experts", "2", "4", "--mlp-type", "residual"))
    assert [layer.num_experts for layer in net.moe_layer_list] == [2, 4]
    assert all(layer.use_residual for layer in net.moe_layer_list)
    assert net(torch.randn(5, 3, 32, 32)).shape == (5, 10)
    shared_mlp = EXPERT  # both layers were given the one expert template as their residual MLP
    assert count(net) == TRUNK + HEAD + moe_layer_params(2, True) + moe_layer_params(4, True) - shared_mlp

DENSE_KEYS = ["conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias", "fc1.weight", "fc1.bias",
              "fc2.weight", "fc2.bias", "fc3.weight", "fc3.bias"]

TRUNK_KEYS = DENSE_KEYS[:-2]


def moe_keys(layer, num_experts, residual):
    """The reference's state_dict keys of its MoE layer `layer`."""
    prefix = f"moe_layer_list.{layer}."
    keys = [prefix + "deepspeed_moe.gate.wg.weight"]
    for e in range(num_experts):
        keys += [f"{prefix}deepspeed_moe.experts.deepspeed_experts.{e}.{p}" for p in ("weight", "bias")]
    if residual:
        keys += [prefix + "mlp.weight", prefix + "mlp.bias", prefix + "coefficient.weight", prefix + "coefficient.bias"]
    return keys

SHAPES = {
    "dense": ([], DENSE_KEYS),
    "moe": (["--moe", "--num-experts", "2"], TRUNK_KEYS + moe_keys(0, 2, False) + ["fc4.weight", "fc4.bias"]),
    "pr-moe": (["--moe", "--num-experts", "2", "4", "--mlp-type", "residual"],
               TRUNK_KEYS + moe_keys(0, 2, True) + moe_keys(1, 4, True) + ["fc4.weight", "fc4.bias"]),
}


def test_dense_forward_is_the_references(parse):
    args = parse()
    torch.manual_seed(3)
    ours = Net(args)
    torch.manual_seed(3)
    theirs = ReferenceNet(args)
    images = torch.randn(8, 3, 32, 32)
    assert torch.equal(ours(images), theirs(images))


@pytest.mark.parametrize("shape", SHAPES)
def test_state_dict_keys_are_the_references(parse, shape):
    flags, keys = SHAPES[shape]
    assert list(Net(parse(*flags)).state_dict()) == keys


@pytest.mark.parametrize("shape", SHAPES)
def test_same_seed_builds_the_references_weights_with_no_extra_random_draw(parse, shape):
    args = parse(*SHAPES[shape][0])
    torch.manual_seed(7)
    ours = Net(args)
    after_ours = torch.get_rng_state()
    torch.manual_seed(7)
    theirs = ReferenceNet(args)
    assert torch.equal(torch.get_rng_state(), after_ours)  # the port draws nothing more, nothing less
    ours_state, theirs_state = ours.state_dict(), theirs.state_dict()
    assert list(ours_state) == list(theirs_state)
    for key in ours_state:
        assert torch.equal(ours_state[key], theirs_state[key]), key
    assert [name for name, _ in ours.named_buffers()] == [name for name, _ in theirs.named_buffers()]


@pytest.mark.parametrize("shape", SHAPES)
def test_state_dicts_load_both_ways_strictly(parse, shape):
    args = parse(*SHAPES[shape][0])
    for source, target in ((ReferenceNet(args), Net(args)), (Net(args), ReferenceNet(args))):
        assert not all(map(torch.equal, source.state_dict().values(), target.state_dict().values()))
        target.load_state_dict(source.state_dict(), strict=True)
        assert all(map(torch.equal, source.state_dict().values(), target.state_dict().values()))


def test_moe_layers_share_the_one_expert_template(parse):
    net = Net(parse("--moe", "--num-experts", "2", "4", "--mlp-type", "residual"))
    first, second = net.moe_layer_list
    assert first.mlp is second.mlp  # the template, as the reference hands it to every layer
    for layer in net.moe_layer_list:
        for expert in layer.deepspeed_moe.experts.deepspeed_experts:
            assert torch.equal(expert.weight, first.mlp.weight) and expert.weight is not first.mlp.weight


def test_moe_layers_take_the_gate_flags(parse):
    net = Net(parse("--moe", "--num-experts", "4", "--top-k", "2", "--min-capacity", "3",
                    "--noisy-gate-policy", "Jitter"))
    gate = net.moe_layer_list[0].deepspeed_moe.gate
    assert (gate.k, gate.min_capacity, gate.noisy_gate_policy) == (2, 3, "Jitter")


def test_moe_param_groups_put_every_expert_parameter_in_a_moe_group(parse):
    net = Net(parse("--moe", "--num-experts", "2", "4", "--mlp-type", "residual"))
    groups = create_moe_param_groups(net)
    moe_params = {id(p) for g in groups if g.get("moe") for p in g["params"]}
    dense_params = {id(p) for g in groups if not g.get("moe") for p in g["params"]}
    expert_params = {id(p) for layer in net.moe_layer_list for p in layer.deepspeed_moe.experts.parameters()}
    assert moe_params == expert_params
    assert not moe_params & dense_params
    assert len(moe_params) + len(dense_params) == len(list(net.parameters()))


def test_moe_forward_exposes_aux_losses_and_the_routers_counts(parse):
    net = Net(parse("--moe", "--num-experts", "2", "4", "--capacity-factor", "2.0", "--no-drop-tokens"))
    net(torch.randn(6, 3, 32, 32))
    assert [c.shape for c in net.router.sent] == [(2,), (4,)]
    assert [int(c.sum()) for c in net.router.sent] == [6, 6]  # top-1: every token goes to one expert
    assert [c.tolist()[0] for c in net.router.routed] == [0, 0]  # none dropped
    assert [int(c[1:].sum()) for c in net.router.routed] == [6, 6]
    assert len(net.aux_losses) == 2 and all(a.requires_grad for a in net.aux_losses)
    gate = net.moe_layer_list[0].deepspeed_moe.gate
    assert (gate.capacity_factor, gate.drop_tokens) == (2.0, False)


# The training step and loop
STEPS = 25


def adamw_step(params, grads, moments, step, lr, betas, eps, weight_decay):
    """One Adam step with decoupled weight decay, as torch.optim.AdamW defines it (step counts from 1)."""
    beta1, beta2 = betas
    for p, g, (m, v) in zip(params, grads, moments):
        m.mul_(beta1).add_(g, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = (v.sqrt() / math.sqrt(1 - beta2 ** step)).add_(eps)
        p.mul_(1 - lr * weight_decay)
        p.addcdiv_(m, denom, value=-lr / (1 - beta1 ** step))


def train_by_hand(net, batches, config):
    optimizer, scheduler = config["optimizer"]["params"], config["scheduler"]["params"]
    params = list(net.parameters())
    moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in params]
    for step, (inputs, labels) in enumerate(batches):
        torch.manual_seed(step)  # the gate's random token selection draws the same numbers as in DeepSpeed's run
        loss = nn.functional.cross_entropy(net(inputs), labels)
        grads = torch.autograd.grad(loss, params)
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        clip = config["gradient_clipping"] / (norm + 1e-6)
        if clip < 1:
            grads = [g * clip for g in grads]
        with torch.no_grad():
            adamw_step(params, grads, moments, step + 1, warmup_lr(step, scheduler), optimizer["betas"],
                       optimizer["eps"], optimizer["weight_decay"])


def train_with_deepspeed(net, batches, args, config):
    """DeepSpeed's steps with the optimizer the script trains with (machine.use_torch_fused_adamw)."""
    machine.use_torch_fused_adamw(config)
    model_engine, *_ = deepspeed.initialize(args=args, model=net, model_parameters=net.parameters(), config=config)
    for step, (inputs, labels) in enumerate(batches):
        torch.manual_seed(step)
        train_step(model_engine, nn.CrossEntropyLoss(), inputs, labels)
        assert model_engine.was_step_applied()
    return model_engine


def batches(args):
    """The first STEPS batches of 16 of the synthetic training set, as the script's transforms make them."""
    trainset, _ = data.load_datasets(args, download=False)
    images, labels = zip(*(trainset[i] for i in range(16 * STEPS)))
    images = data.to_inputs(torch.stack(images), "cpu")
    return list(zip(images.split(16), torch.tensor(labels).split(16)))


@pytest.mark.parametrize("flags", [[], ["--moe", "--num-experts", "2", "--noisy-gate-policy", "RSample"],
                                   ["--moe", "--num-experts", "2", "4", "--mlp-type", "residual", "--top-k", "2"]],
                         ids=["dense", "moe-top1-rsample", "pr-moe-top2"])
def test_deepspeed_step_is_adamw_with_clipping_and_warmup(single_rank_group, parse, flags):
    args = parse("--deepspeed", "--dataset", "synthetic", "--synthetic-train-size", str(16 * STEPS),
                 "--synthetic-test-size", "1", "--dtype", "fp32", "--stage", "0", *flags)
    config = get_ds_config(args)
    torch.manual_seed(0)
    net = Net(args)
    by_hand, initial = copy.deepcopy(net), copy.deepcopy(net)
    data = batches(args)
    model_engine = train_with_deepspeed(net, data, args, config)
    for layer in getattr(by_hand, "moe_layer_list", []):
        layer.set_deepspeed_parallelism()  # the expert group DeepSpeed made for the engine's copy
    train_by_hand(by_hand, data, config)

    for (name, ours), theirs, start in zip(model_engine.module.named_parameters(), by_hand.parameters(),
                                           initial.parameters()):
        assert (ours - start).abs().max() > 1e-4, f"{name} barely moved: the comparison would prove nothing"
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
    assert model_engine.global_steps == STEPS


def final_parameters(model_engine):
    """The engine's parameters as full tensors (gathered from their partitions under ZeRO-3)."""
    params = list(model_engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters([p for _, p in params],
                                                             enabled=model_engine.zero_optimization_stage() == 3):
        return {name: p.detach().clone() for name, p in params}


@pytest.mark.parametrize("stage, flags", [(1, []), (2, []), (3, []),
                                          (2, ["--moe", "--num-experts", "2", "--noisy-gate-policy", "RSample"])],
                         ids=["dense-zero1", "dense-zero2", "dense-zero3", "moe-top1-rsample-zero2"])
def test_offload_trains_as_without_it(single_rank_group, parse, stage, flags):
    """ZeRO-Offload moves where the optimizer runs (and at stage 3 where the parameters live), not what it computes."""
    finals = {}
    for offload in ("none", "cpu"):
        args = parse("--deepspeed", "--dataset", "synthetic", "--synthetic-train-size", str(16 * STEPS),
                     "--synthetic-test-size", "1", "--dtype", "fp32", "--stage", str(stage), "--offload", offload,
                     *flags)
        torch.manual_seed(0)
        net = Net(args)
        initial = copy.deepcopy(net)
        model_engine = train_with_deepspeed(net, batches(args), args, get_ds_config(args))
        assert model_engine.zero_cpu_offload() == (offload == "cpu")
        assert (model_engine.zero_offload_param() is not None) == (offload == "cpu" and stage == 3)
        finals[offload] = final_parameters(model_engine)
    for (name, start), with_offload in zip(initial.named_parameters(), finals["cpu"].values()):
        assert (with_offload - start).abs().max() > 1e-4, f"{name} barely moved: the comparison would prove nothing"
        torch.testing.assert_close(with_offload, finals["none"][name], rtol=1e-4, atol=1e-5,
                                   msg=lambda m: f"{name}: {m}")


def test_train_tells_the_sampler_each_epoch(single_rank_group, parse, capsys):
    args = parse("--dataset", "synthetic", "--dtype", "fp32", "--synthetic-train-size", "64", "--log-interval", "2")
    trainset, testset = data.load_datasets(args, download=False)
    config = get_ds_config(args)
    machine.use_torch_fused_adamw(config)
    engine, _, trainloader, _ = deepspeed.initialize(
        model=Net(args), model_parameters=Net(args).parameters(), training_data=trainset,
        collate_fn=data.collate_fn(trainset), config=config)
    orders = []
    for epoch in range(3):
        args.epochs = epoch + 1
        cifar10_deepspeed.train(engine, trainloader, testset, args, checkpoints.Position(epoch))
        orders.append(list(trainloader.data_sampler))
    assert trainloader.data_sampler.epoch == 2
    assert orders[0] != orders[1] != orders[2]
    assert "[ 3,     4] loss:" in capsys.readouterr().out


def test_seed_sets_the_data_order(single_rank_group, parse):
    """--seed seeds the sampler: another seed, another order, and the order DistributedSampler gives that seed."""
    orders = {}
    for seed in (1, 2):
        args = parse("--deepspeed", "--dataset", "synthetic", "--dtype", "fp32", "--synthetic-train-size", "64",
                     "--synthetic-test-size", "1", "--seed", str(seed))
        model_engine, trainloader, _ = engine_of(args)
        orders[seed] = list(trainloader.data_sampler)
        expected = torch.utils.data.DistributedSampler(range(64), num_replicas=1, rank=0, seed=seed)
        assert orders[seed] == list(expected)
        model_engine.destroy()
    assert orders[1] != orders[2]


def test_gradient_accumulation_trains_and_logs_as_one_batch(single_rank_group, parse, capsys):
    """--micro-batch 8 --grad-accum 2 takes the optimizer steps that --batch-size 16 takes, on the same samples:
    the same weights within fp32 rounding, and loss lines at the same optimizer steps, each the mean of its
    interval's steps."""
    lines, finals = {}, {}
    for name, flags in {"one batch": [], "accumulated": ["--micro-batch", "8", "--grad-accum", "2"]}.items():
        args = parse("--deepspeed", "--dataset", "synthetic", "--dtype", "fp32", "--synthetic-train-size", "128",
                     "--synthetic-test-size", "8", "--log-interval", "2", "--seed", "0", "-e", "1", *flags)
        engine, trainloader, testset = engine_of(args)
        capsys.readouterr()
        cifar10_deepspeed.train(engine, trainloader, testset, args)
        lines[name] = [line for line in capsys.readouterr().out.splitlines() if "loss:" in line]
        finals[name] = [p.detach().clone() for p in engine.module.parameters()]
        assert engine.global_steps == 8 and engine.train_batch_size() == 16
    assert [line.split("loss:")[0] for line in lines["accumulated"]] == [f"[ 1,     {i}] " for i in (2, 4, 6, 8)]
    for one, accumulated in zip(lines["one batch"], lines["accumulated"], strict=True):
        assert float(one.split("loss:")[1]) == pytest.approx(float(accumulated.split("loss:")[1]), abs=1.5e-3)
    for one, accumulated in zip(finals["one batch"], finals["accumulated"]):
        torch.testing.assert_close(accumulated, one, rtol=1e-5, atol=1e-6)


# Evaluation
@pytest.mark.parametrize("flags, stage, shard", [
    ([], 0, True), ([], 2, True), ([], 3, False),
    (["--moe", "--num-experts", "2"], 2, True),
    (["--moe", "--num-experts", "2", "--ep-world-size", "2"], 0, False),
    (["--moe", "--num-experts", "4", "--ep-world-size", "4"], 1, False)],
    ids=["dense-zero0", "dense-zero2", "dense-zero3", "moe-ep1", "moe-ep2", "moe-ep4"])
def test_evaluation_is_sharded_only_where_every_rank_may_run_its_own_batches(parse, flags, stage, shard):
    """Expert parallelism and ZeRO-3 exchange data between ranks in every forward pass: each rank must run every
    test batch there. Sharded, ranks with unequal batch counts would wait on each other for ever."""
    engine = type("Engine", (), {"zero_optimization_stage": lambda self: stage})()
    assert cifar10_deepspeed.can_shard_eval(parse(*flags), engine) == shard


class AlwaysCar(nn.Module):
    """A dense model that says car for every image."""
    moe = False

    def forward(self, x):
        return torch.eye(10)[1].repeat(len(x), 1)


def test_test_prints_the_block_for_a_short_last_batch_and_an_absent_class(single_rank_group, capsys):
    labels = [0, 0, 1, 1, 1, 2, 2]  # 7 images: the last batch of 4 holds 3; classes 3 to 9 have none
    testset = [(torch.zeros(3, 32, 32), label) for label in labels]
    accuracy = cifar10_deepspeed.test(AlwaysCar(), testset, "cpu", None)
    assert accuracy == pytest.approx(3 / 7)
    assert capsys.readouterr().out.splitlines() == [
        "Accuracy of the network on the 7 test images:  43 %",
        "Accuracy of plane :  0 %",
        "Accuracy of   car :  100 %",
        "Accuracy of  bird :  0 %",
        *(f"Accuracy of {name:>5s} : n/a (no test images)" for name in data.CLASSES[3:]),
    ]


def only_deepspeed_reads(per_step):
    """The reads a step makes, {(who, place): reads}, hold only DeepSpeed's own, each listed in docs/fixes.md."""
    assert not [place for place in per_step if place[0] != "deepspeed"], per_step
    listed = (ROOT / "docs" / "fixes.md").read_text()
    unlisted = sorted(place for _, place in per_step if f"`{place}`" not in listed)
    assert not unlisted, "DeepSpeed's reads in a step that docs/fixes.md does not list: " + ", ".join(unlisted)


@pytest.mark.parametrize("run", ["dense-fp32", "dense-fp16", "moe-top2-bf16", "moe-rsample-fp16"])
def test_a_training_step_reads_nothing_back_from_the_device_but_what_deepspeed_reads(single_rank_group, run):
    """Between log lines, the steps this project adds to DeepSpeed's read nothing back to the host: the reads of
    an epoch of 40 steps and of one of 20 are the same but for DeepSpeed's own, each listed in docs/fixes.md."""
    only_deepspeed_reads(count_host_reads.reads_per_step(count_host_reads.RUNS[run]))


@pytest.mark.slow
def test_a_training_step_on_two_ranks_reads_nothing_back_but_what_deepspeed_reads(launch, tmp_path):
    """The same on 2 ranks, data-parallel (its gradient all-reduce and the preemption agreement in every step)
    and with experts in parallel (run_ds_moe.sh's run: fp16, ZeRO 2, EP 2, RSample), every rank."""
    run = launch("deepspeed", "--num_gpus", "2", ROOT / "tests" / "count_host_reads.py", "--report",
                 tmp_path / "reads.json", "dense-fp32", "moe-ep2-fp16")
    assert run.returncode == 0, run.output[-3000:]
    report = json.loads((tmp_path / "reads.json").read_text())
    assert len(report) == 2 and all(len(ranks) == 2 for ranks in report.values()), report
    for ranks in report.values():
        for reads in ranks:
            only_deepspeed_reads({(who, place): count for who, place, count in reads})
