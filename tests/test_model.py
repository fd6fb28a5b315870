import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import cifar10_deepspeed
from deepspeed.moe.layer import MoE
from deepspeed.runtime.dataloader import DeepSpeedDataLoader

from cifar10_deepspeed import Net, SyntheticCIFAR10, create_moe_param_groups, load_datasets

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


class ReferenceNet(nn.Module):
    """The reference's Net, built as ../shared/REFERENCE.md describes it: a second path to the same model."""

    def __init__(self, args):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        if args.moe:
            template = nn.Linear(84, 84)
            layers = []
            for n in args.num_experts:
                layers.append(MoE(hidden_size=84, expert=template, num_experts=n, ep_size=args.ep_world_size,
                                  use_residual=args.mlp_type == "residual", k=args.top_k,
                                  min_capacity=args.min_capacity, noisy_gate_policy=args.noisy_gate_policy))
            self.moe_layer_list = nn.ModuleList(layers)
            self.fc4 = nn.Linear(84, 10)
        else:
            self.fc3 = nn.Linear(84, 10)

    def forward(self, x):
        """The reference's dense forward: conv, ReLU and pool twice, flatten, fc1 and fc2 with ReLU, fc3."""
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = F.relu(self.fc2(F.relu(self.fc1(torch.flatten(x, 1)))))
        return self.fc3(x)


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


def test_synthetic_data_is_deterministic_cifar_shaped_and_labelled():
    first, again = SyntheticCIFAR10(300, train=True), SyntheticCIFAR10(300, train=True)
    assert first.data.shape == (300, 32, 32, 3) and first.data.dtype == np.uint8
    assert np.array_equal(first.data, again.data) and first.targets == again.targets
    assert set(first.targets) == set(range(10))
    assert not np.array_equal(first.data[:50], SyntheticCIFAR10(50, train=False).data)


def test_synthetic_data_goes_through_the_cifar_transforms(parse):
    trainset, testset = load_datasets(parse("--dataset", "synthetic", "--synthetic-train-size", "20",
                                            "--synthetic-test-size", "7", "--data-path", "pil"), download=False)
    assert (len(trainset), len(testset)) == (20, 7)
    image, label = trainset[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert -1 <= image.min() and image.max() <= 1 and label in range(10)


def both_data_paths(parse, *flags):
    return {path: load_datasets(parse("--dataset", "synthetic", "--synthetic-train-size", "96", "--synthetic-test-size",
                                      "21", "--data-path", path, *flags), download=False) for path in ("tensor", "pil")}


def test_the_tensor_path_holds_the_set_once_as_uint8(parse):
    (trainset, testset), (pil_train, _) = both_data_paths(parse).values()
    assert trainset.data.dtype == torch.uint8 and trainset.data.shape == (96, 32, 32, 3)
    assert trainset.targets.tolist() == pil_train.targets and len(testset) == 21
    decoded = SyntheticCIFAR10(8, train=True)
    assert np.shares_memory(cifar10_deepspeed.ImageTensor(decoded).data.numpy(), decoded.data)  # no second copy


def test_the_tensor_path_makes_what_totensor_and_normalize_make_of_any_uint8_batch():
    """Also from an array laid out image by image (N, H, W, C in memory, unlike CIFAR-10's and the synthetic set's
    channel planes): a contiguous batch, as ToTensor's, so that the convolutions run as on the PIL path."""
    images = torch.randint(0, 256, (6, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    transform = cifar10_deepspeed.transforms.Compose([cifar10_deepspeed.transforms.ToTensor(),
                                                      cifar10_deepspeed.transforms.Normalize(cifar10_deepspeed.MEAN,
                                                                                             cifar10_deepspeed.STD)])
    expected = torch.stack([transform(cifar10_deepspeed.Image.fromarray(image.numpy())) for image in images])
    inputs = cifar10_deepspeed.to_inputs(images, "cpu", None)
    assert inputs.is_contiguous() and torch.equal(inputs, expected)


@pytest.mark.parametrize("world", [1, 2])
def test_the_tensor_path_feeds_the_pil_paths_batches_bit_for_bit(parse, monkeypatch, world):
    """DeepSpeed's loader, on every rank, for two epochs, and the evaluation's loader, sharded and not: the same
    samples in the same order, and to_inputs makes of each uint8 batch exactly the floats ToTensor and Normalize
    make (in bf16 and fp16 too, cast from them)."""
    sets = both_data_paths(parse)
    for rank in range(world):
        loaders = {path: DeepSpeedDataLoader(trainset, batch_size=16 // world, pin_memory=False, local_rank=0,
                                             tput_timer=None, collate_fn=cifar10_deepspeed.collate_fn(trainset),
                                             num_local_io_workers=0, data_parallel_world_size=world,
                                             data_parallel_rank=rank)
                   for path, (trainset, _) in sets.items()}
        for epoch in (0, 1):
            for loader in loaders.values():
                loader.data_sampler.set_epoch(epoch)
            batches = list(zip(*loaders.values()))
            assert len(batches) == 6
            for (images, labels), (expected, expected_labels) in batches:
                assert images.dtype == torch.uint8 and torch.equal(labels, expected_labels)
                for dtype in (None, torch.bfloat16, torch.float16):
                    inputs = cifar10_deepspeed.to_inputs(images, "cpu", dtype)
                    assert torch.equal(inputs, expected if dtype is None else expected.to(dtype))
        monkeypatch.setattr(cifar10_deepspeed.dist, "get_rank", lambda: rank)
        monkeypatch.setattr(cifar10_deepspeed.dist, "get_world_size", lambda: world)
        for shard in (False, True):
            tests = [cifar10_deepspeed.test_loader(testset, 4, shard) for _, testset in sets.values()]
            for (images, labels), (expected, expected_labels) in zip(*tests, strict=True):
                assert torch.equal(cifar10_deepspeed.to_inputs(images, "cpu", None), expected)
                assert torch.equal(labels, expected_labels)


def test_train_tells_the_sampler_each_epoch(single_rank_group, parse, capsys):
    args = parse("--dataset", "synthetic", "--dtype", "fp32", "--synthetic-train-size", "64", "--log-interval", "2")
    trainset, testset = load_datasets(args, download=False)
    engine, _, trainloader, _ = cifar10_deepspeed.deepspeed.initialize(
        model=Net(args), model_parameters=Net(args).parameters(), training_data=trainset,
        collate_fn=cifar10_deepspeed.collate_fn(trainset), config=cifar10_deepspeed.get_ds_config(args))
    orders = []
    for epoch in range(3):
        args.epochs = epoch + 1
        cifar10_deepspeed.train(engine, trainloader, testset, args, cifar10_deepspeed.Position(epoch))
        orders.append(list(trainloader.data_sampler))
    assert trainloader.data_sampler.epoch == 2
    assert orders[0] != orders[1] != orders[2]
    assert "[ 3,     4] loss:" in capsys.readouterr().out


def test_expert_load_sums_counts_and_averages_aux_loss(single_rank_group, parse):
    net = Net(parse("--moe", "--num-experts", "2", "4", "--mlp-type", "residual"))
    load = cifar10_deepspeed.ExpertLoad(net, "cpu")
    net.expert_counts, net.aux_losses = [torch.tensor([3, 1]), torch.tensor([0, 2, 2, 0])], [torch.tensor(1.0),
                                                                                             torch.tensor(2.0)]
    load.add(net)
    net.expert_counts, net.aux_losses = [torch.tensor([4, 0]), torch.tensor([0, 0, 4, 0])], [torch.tensor(3.0),
                                                                                             torch.tensor(4.0)]
    load.add(net)
    shares, aux_losses = load.summarize()
    assert shares == [[7 / 8, 1 / 8], [0.0, 0.25, 0.75, 0.0]]
    assert aux_losses == [2.0, 3.0]
    assert load.steps == 0 and all(c.sum() == 0 for c in load.counts)  # ready for the next interval


def test_expert_load_over_two_ranks_is_the_mean_of_every_ranks_aux_loss(single_rank_group, parse, monkeypatch):
    """Two ranks that saw the same counts and aux losses: the shares and the mean aux loss are one rank's.

    The all-reduce sums the ranks' aux losses, so summarize must divide by the world size as well as the steps;
    without it the aux loss printed and monitored on 2 ranks is twice the truth.
    """
    net = Net(parse("--moe", "--num-experts", "2"))
    load = cifar10_deepspeed.ExpertLoad(net, "cpu")
    net.expert_counts, net.aux_losses = [torch.tensor([3, 1])], [torch.tensor(1.5)]
    load.add(net)
    monkeypatch.setattr(cifar10_deepspeed.dist, "all_reduce", lambda tensor: tensor.mul_(2))  # a twin rank's sum
    monkeypatch.setattr(cifar10_deepspeed.dist, "get_world_size", lambda: 2)
    assert load.summarize() == ([[0.75, 0.25]], [1.5])


def test_seed_sets_the_data_order(single_rank_group, parse):
    """--seed seeds the sampler: another seed, another order, and the order DistributedSampler gives that seed."""
    orders = {}
    for seed in (1, 2):
        args = parse("--deepspeed", "--dataset", "synthetic", "--dtype", "fp32", "--synthetic-train-size", "64",
                     "--synthetic-test-size", "1", "--seed", str(seed))
        model_engine, trainloader, _ = cifar10_deepspeed.initialize(args, cifar10_deepspeed.get_ds_config(args))
        orders[seed] = list(trainloader.data_sampler)
        expected = torch.utils.data.DistributedSampler(range(64), num_replicas=1, rank=0, seed=seed)
        assert orders[seed] == list(expected)
        model_engine.destroy()
    assert orders[1] != orders[2]


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


def test_moe_forward_exposes_aux_losses_and_expert_counts(parse):
    net = Net(parse("--moe", "--num-experts", "2", "4", "--capacity-factor", "2.0", "--no-drop-tokens"))
    net(torch.randn(6, 3, 32, 32))
    assert [c.shape for c in net.expert_counts] == [(2,), (4,)]
    assert [int(c.sum()) for c in net.expert_counts] == [6, 6]  # top-1: every token goes to one expert
    assert len(net.aux_losses) == 2 and all(a.requires_grad for a in net.aux_losses)
    gate = net.moe_layer_list[0].deepspeed_moe.gate
    assert (gate.capacity_factor, gate.drop_tokens) == (2.0, False)


def test_gradient_accumulation_trains_and_logs_as_one_batch(single_rank_group, parse, capsys):
    """--micro-batch 8 --grad-accum 2 takes the optimizer steps that --batch-size 16 takes, on the same samples:
    the same weights within fp32 rounding, and loss lines at the same optimizer steps, each the mean of its
    interval's steps."""
    lines, finals = {}, {}
    for name, flags in {"one batch": [], "accumulated": ["--micro-batch", "8", "--grad-accum", "2"]}.items():
        args = parse("--deepspeed", "--dataset", "synthetic", "--dtype", "fp32", "--synthetic-train-size", "128",
                     "--synthetic-test-size", "8", "--log-interval", "2", "--seed", "0", "-e", "1", *flags)
        engine, trainloader, testset = cifar10_deepspeed.initialize(args, cifar10_deepspeed.get_ds_config(args))
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
