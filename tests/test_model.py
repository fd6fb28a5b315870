import argparse

import numpy as np
import pytest
import torch
import torch.nn as nn

import cifar10_deepspeed
from cifar10_deepspeed import CLASSES, Net, SyntheticCIFAR10, create_moe_param_groups, load_datasets
from cifar10_deepspeed import test as evaluate

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
    assert len(net.moe_layers) == 1
    assert net(torch.randn(5, 3, 32, 32)).shape == (5, 10)
    assert count(net) == TRUNK + HEAD + moe_layer_params(2, residual=False)


def test_pr_moe_net_has_one_residual_layer_per_expert_count(parse):
    net = Net(parse("--moe", "--num-experts", "2", "4", "--mlp-type", "residual"))
    assert [layer.num_experts for layer in net.moe_layers] == [2, 4]
    assert all(layer.use_residual for layer in net.moe_layers)
    assert net(torch.randn(5, 3, 32, 32)).shape == (5, 10)
    assert count(net) == TRUNK + HEAD + moe_layer_params(2, True) + moe_layer_params(4, True)


def test_moe_layers_take_the_gate_flags(parse):
    net = Net(parse("--moe", "--num-experts", "4", "--top-k", "2", "--min-capacity", "3",
                    "--noisy-gate-policy", "Jitter"))
    gate = net.moe_layers[0].deepspeed_moe.gate
    assert (gate.k, gate.min_capacity, gate.noisy_gate_policy) == (2, 3, "Jitter")


def test_moe_param_groups_put_every_expert_parameter_in_a_moe_group(parse):
    net = Net(parse("--moe", "--num-experts", "2", "4", "--mlp-type", "residual"))
    groups = create_moe_param_groups(net)
    moe_params = {id(p) for g in groups if g.get("moe") for p in g["params"]}
    dense_params = {id(p) for g in groups if not g.get("moe") for p in g["params"]}
    expert_params = {id(p) for layer in net.moe_layers for p in layer.deepspeed_moe.experts.parameters()}
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
                                            "--synthetic-test-size", "7"), download=False)
    assert (len(trainset), len(testset)) == (20, 7)
    image, label = trainset[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert -1 <= image.min() and image.max() <= 1 and label in range(10)


class AlwaysCar(nn.Module):
    def forward(self, x):
        return torch.eye(10)[1].repeat(len(x), 1)


def test_test_handles_a_short_last_batch_and_an_absent_class(single_rank_group, capsys):
    labels = [0, 0, 1, 1, 1, 2, 2]  # 7 images: the last batch of 4 holds 3; classes 3 to 9 have none
    testset = [(torch.zeros(3, 32, 32), label) for label in labels]
    accuracy = evaluate(AlwaysCar(), testset, "cpu", None)
    lines = capsys.readouterr().out.splitlines()
    assert accuracy == pytest.approx(3 / 7)
    assert lines[0] == "Accuracy of the network on the 7 test images: 42 %"
    assert lines[1:4] == ["Accuracy of plane :  0 %", "Accuracy of car   : 100 %", "Accuracy of bird  :  0 %"]
    assert lines[4:] == [f"Accuracy of {name:5s} : n/a (no test images)" for name in CLASSES[3:]]


def test_train_tells_the_sampler_each_epoch(single_rank_group, parse, capsys):
    args = parse("--dataset", "synthetic", "--dtype", "fp32", "--synthetic-train-size", "64", "--log-interval", "2")
    trainset, testset = load_datasets(args, download=False)
    engine, _, trainloader, _ = cifar10_deepspeed.deepspeed.initialize(
        model=Net(args), model_parameters=Net(args).parameters(), training_data=trainset,
        config=cifar10_deepspeed.get_ds_config(args))
    orders = []
    for epoch in range(3):
        args.epochs = epoch + 1
        cifar10_deepspeed.train(engine, trainloader, testset, args, epoch, "cpu", None, shard_eval=True)
        orders.append(list(trainloader.data_sampler))
    assert trainloader.data_sampler.epoch == 2
    assert orders[0] != orders[1] != orders[2]
    assert "[3,     4] loss:" in capsys.readouterr().out


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


def test_moe_forward_exposes_aux_losses_and_expert_counts(parse):
    net = Net(parse("--moe", "--num-experts", "2", "4", "--capacity-factor", "2.0", "--no-drop-tokens"))
    net(torch.randn(6, 3, 32, 32))
    assert [c.shape for c in net.expert_counts] == [(2,), (4,)]
    assert [int(c.sum()) for c in net.expert_counts] == [6, 6]  # top-1: every token goes to one expert
    assert len(net.aux_losses) == 2 and all(a.requires_grad for a in net.aux_losses)
    gate = net.moe_layers[0].deepspeed_moe.gate
    assert (gate.capacity_factor, gate.drop_tokens) == (2.0, False)
