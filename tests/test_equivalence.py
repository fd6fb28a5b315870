"""One rank, fp32: DeepSpeed's training step is the update a plain PyTorch loop applies by hand.

The hand-written loop applies what the script's config asks for: Adam in
AdamW mode (decoupled weight decay) with the config's betas, eps and weight
decay, gradient clipping to the config's norm, and WarmupLR's log schedule
(bench/plain_loop.py's warmup_lr, which the throughput baseline uses too).
The MoE layer's forward (DeepSpeed's gate math) is shared; only the training
machinery differs. Both loops see the same batches and the same random draws.
"""

import copy
import math

import pytest
import torch
import torch.nn as nn

import cifar10_deepspeed
from bench.plain_loop import warmup_lr
from cifar10_deepspeed import Net, get_ds_config, train_step

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
    model_engine, *_ = cifar10_deepspeed.deepspeed.initialize(args=args, model=net, model_parameters=net.parameters(),
                                                              config=config)
    for step, (inputs, labels) in enumerate(batches):
        torch.manual_seed(step)
        train_step(model_engine, nn.CrossEntropyLoss(), inputs, labels, "cpu", None)
        assert model_engine.was_step_applied()
    return model_engine


def batches(args):
    """The first STEPS batches of 16 of the synthetic training set, as the script's transforms make them."""
    trainset, _ = cifar10_deepspeed.load_datasets(args, download=False)
    images, labels = zip(*(trainset[i] for i in range(16 * STEPS)))
    images = cifar10_deepspeed.to_inputs(torch.stack(images), "cpu", None)
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
    with cifar10_deepspeed.deepspeed.zero.GatheredParameters([p for _, p in params],
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
    config = get_ds_config(args)
    cifar10_deepspeed.allow_fp16(config)
    model_engine, _, _ = cifar10_deepspeed.initialize(args, config)
    for _ in range(scalings - 1):
        cifar10_deepspeed.scale_the_fp16_loss(model_engine)
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
