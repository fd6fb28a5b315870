"""Train a small CNN on CIFAR-10 with DeepSpeed, dense or Mixture of Experts.

A port of the CIFAR-10 example in DeepSpeed's examples collection. Launch it
with DeepSpeed's launcher, torchrun, or plain python (one process):

    deepspeed --num_gpus=2 cifar10_deepspeed.py --deepspeed --moe --ep-world-size 2 --num-experts 2
    torchrun --standalone --nproc_per_node 2 cifar10_deepspeed.py --deepspeed
    python cifar10_deepspeed.py --deepspeed --dataset synthetic --dtype fp32
"""

import argparse
import contextlib
import dataclasses
import datetime
import json
import logging
import itertools
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import deepspeed
import deepspeed.comm as dist
import torch
import torch.nn as nn
import torch._inductor.config
import torch.nn.functional as F
import torchvision
import torchvision.transforms as transforms
from deepspeed.accelerator import get_accelerator
from deepspeed.moe.layer import MoE
from deepspeed.ops.adam import DeepSpeedCPUAdam, FusedAdam
from deepspeed.moe.utils import is_moe_param, split_params_into_different_moe_groups_for_optimizer
from deepspeed.runtime.utils import clip_tensors_by_global_norm, get_global_norm_of_tensors
from deepspeed.utils import groups, logger
from PIL import Image
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

CLASSES = ("plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
DTYPES = ("bf16", "fp16", "fp32")
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"


class ArgumentParser(argparse.ArgumentParser):
    """argparse that states a bad flag in one line, without the long usage text."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser():
    parser = ArgumentParser(prog="cifar10_deepspeed.py", description="CIFAR-10 with DeepSpeed, dense or MoE")

    # Training, as in the reference.
    parser.add_argument("-e", "--epochs", default=30, type=int, help="number of total epochs (default: 30)")
    parser.add_argument("--local_rank", type=int, default=-1, help="local rank passed from distributed launcher")
    parser.add_argument("--log-interval", type=int, default=2000,
                        help="print the running loss every N mini-batches (default: 2000)")
    parser.add_argument("--dtype", default=None, type=str, choices=DTYPES,
                        help="data type: bf16, fp16 or fp32 (default: fp16; with --deepspeed_config, the file's)")
    parser.add_argument("--stage", default=None, type=int, choices=[0, 1, 2, 3],
                        help="ZeRO stage: 0, 1, 2 or 3 (default: 0; with --deepspeed_config, the file's)")

    # Mixture of Experts, as in the reference.
    parser.add_argument("--moe", default=False, action="store_true", help="use DeepSpeed Mixture of Experts")
    parser.add_argument("--ep-world-size", default=1, type=int, help="expert-parallel world size (default: 1)")
    parser.add_argument("--num-experts", type=int, nargs="+", default=[1],
                        help="number of experts per MoE layer, one layer per value (default: 1)")
    parser.add_argument("--mlp-type", type=str, default="standard", choices=["standard", "residual"],
                        help="standard MoE, or residual MoE (PR-MoE with several --num-experts)")
    parser.add_argument("--top-k", default=1, type=int, choices=[1, 2], help="route each token to the top 1 or 2 experts")
    parser.add_argument("--min-capacity", default=0, type=int,
                        help="minimum capacity of each expert, whatever the capacity factor (default: 0)")
    parser.add_argument("--noisy-gate-policy", default=None, type=noisy_gate_policy, metavar="{None,RSample,Jitter}",
                        help="gate noise: RSample (top-1 only) or Jitter (default: None)")
    parser.add_argument("--moe-param-group", default=False, action="store_true",
                        help="put expert parameters in their own optimizer groups (needed by ZeRO with MoE)")

    # Data: beyond the reference.
    parser.add_argument("--dataset", default="cifar10", choices=["cifar10", "synthetic"],
                        help="cifar10 (downloaded by rank 0) or synthetic (generated, no network)")
    parser.add_argument("--data-dir", default="./data", help="where CIFAR-10 is, or is downloaded to (default: ./data)")
    parser.add_argument("--synthetic-train-size", default=5000, type=int, help="synthetic training images (default: 5000)")
    parser.add_argument("--synthetic-test-size", default=1000, type=int, help="synthetic test images (default: 1000)")
    parser.add_argument("--data-path", default="tensor", choices=["tensor", "pil"],
                        help="tensor: the set decoded once into one uint8 tensor, each batch gathered from it and "
                             "normalized on the accelerator; pil: torchvision's per-image transforms, for your own PIL "
                             "transforms (default: tensor; the same numbers either way)")
    parser.add_argument("--data-workers", default=None, type=int,
                        help="data-loader worker processes per rank (default: 0 on the tensor path and on DeepSpeed's "
                             "CPU accelerator, else chosen from the rank's cores)")
    parser.add_argument("--seed", default=None, type=int,
                        help="seed for model init, gate noise and data order; every rank builds the same initial model, "
                             "then each rank but 0 reseeds its gate noise with seed + rank (default: unseeded, "
                             "data order seed 0)")

    # Batch and learning rate: beyond the reference, whose values their defaults keep.
    parser.add_argument("--batch-size", default=None, type=int,
                        help="global batch: train_batch_size (default: 16; with --deepspeed_config, the file's)")
    parser.add_argument("--micro-batch", default=None, type=int,
                        help="batch per rank and step: train_micro_batch_size_per_gpu (default: the global batch over "
                             "the data-parallel ranks and accumulation steps)")
    parser.add_argument("--grad-accum", default=None, type=int,
                        help="micro-batches per optimizer step: gradient_accumulation_steps (default: 1)")
    parser.add_argument("--lr", default=None, type=float,
                        help="the optimizer's lr and WarmupLR's warmup_max_lr (default: 1e-3; with --deepspeed_config, "
                             "the file's)")

    # MoE levers: beyond the reference, whose behaviour their defaults keep.
    parser.add_argument("--moe-aux-loss-coef", default=0.0, type=float,
                        help="add C times the MoE layers' gate aux (load-balancing) loss to the loss (default: 0)")
    parser.add_argument("--capacity-factor", default=1.0, type=float,
                        help="expert capacity in training, as a multiple of tokens / experts (default: 1.0)")
    parser.add_argument("--eval-capacity-factor", default=1.0, type=float,
                        help="expert capacity in evaluation (default: 1.0)")
    parser.add_argument("--drop-tokens", default=True, action=argparse.BooleanOptionalAction,
                        help="drop the tokens past an expert's capacity (default: drop)")

    # Checkpoints, evaluation and metrics: beyond the reference.
    parser.add_argument("--save-dir", default=None,
                        help="save a DeepSpeed checkpoint here at the end of every epoch, and mid-epoch on SIGTERM or "
                             "SIGUSR1 (then exit 75)")
    parser.add_argument("--resume", default=False, nargs="?", const=True, type=resume_mode, metavar="auto",
                        help="continue from the newest checkpoint in --save-dir, mid-epoch or not; with auto, start "
                             "afresh where --save-dir holds none yet (for requeued jobs and torchrun --max-restarts)")
    parser.add_argument("--keep-last", default=None, type=int, metavar="N",
                        help="after each save, delete all but the newest N checkpoints, never the one 'latest' or "
                             "'best' names (default: keep all)")
    parser.add_argument("--init-from", default=None, metavar="MODEL_OR_CHECKPOINT",
                        help="start a new run from the weights of a model file of export_model.py, or of a checkpoint "
                             "of any world size, EP size, ZeRO stage or dtype; the optimizer starts fresh")
    parser.add_argument("--eval-every", default=0, type=int,
                        help="evaluate every N epochs (default: 0, only at the end)")
    parser.add_argument("--metrics-dir", default=None,
                        help="write metrics as CSV files here with DeepSpeed's CSV monitor (plot: plot_metrics.py)")
    parser.add_argument("--tensorboard-dir", default=None,
                        help="write the same metrics as TensorBoard event files here, with DeepSpeed's TensorBoard "
                             "monitor (view: tensorboard --logdir DIR)")
    parser.add_argument("--progress", default=True, action=argparse.BooleanOptionalAction,
                        help="a live bar of each epoch's steps on rank 0 when its output is a terminal "
                             "(default: on; never in logs or pipes)")

    # ZeRO-Offload: beyond the reference.
    parser.add_argument("--offload", default=None, choices=["none", "cpu"],
                        help="cpu: ZeRO-Offload, the optimizer's state and step on the host (ZeRO stages 1-3), and at "
                             "stage 3 the parameters too (default: none; with --deepspeed_config, the file's)")

    # Speed: beyond the reference.
    parser.add_argument("--compile", default=False, action="store_true",
                        help="compile the model with torch.compile through DeepSpeed's engine.compile() "
                             "(default: eager)")

    # Several processes and nodes: beyond the reference.
    parser.add_argument("--dist-timeout", default=None, type=float, metavar="MINUTES",
                        help="how long a rank waits for its peers in a collective before the run fails "
                             "(default: DeepSpeed's, 30)")

    return deepspeed.add_config_arguments(parser)


def noisy_gate_policy(value):
    if value == "None":
        return None
    if value not in ("RSample", "Jitter"):
        raise argparse.ArgumentTypeError(f"invalid choice: {value!r} (choose from 'None', 'RSample', 'Jitter')")
    return value


def resume_mode(value):
    if value != "auto":
        raise argparse.ArgumentTypeError(f"invalid choice: {value!r} (give --resume alone, or --resume auto)")
    return value


def add_argument(argv=None):
    return build_parser().parse_args(argv)


def get_ds_config(args):
    """The reference's DeepSpeed config; --dtype and --stage pick precision and ZeRO stage, --offload cpu adds
    ZeRO-Offload."""
    dtype = args.dtype or "fp16"
    config = {
        "train_batch_size": 16,
        "steps_per_print": 2000,
        "optimizer": {
            "type": "Adam",
            "params": {"lr": 0.001, "betas": [0.8, 0.999], "eps": 1e-8, "weight_decay": 3e-7},
        },
        "scheduler": {
            "type": "WarmupLR",
            "params": {"warmup_min_lr": 0, "warmup_max_lr": 0.001, "warmup_num_steps": 1000},
        },
        "gradient_clipping": 1.0,
        "prescale_gradients": False,
        "bf16": {"enabled": dtype == "bf16"},
        "fp16": {
            "enabled": dtype == "fp16",
            "fp16_master_weights_and_grads": False,
            "loss_scale": 0,
            "loss_scale_window": 500,
            "hysteresis": 2,
            "min_loss_scale": 1,
            "initial_scale_power": 15,
        },
        "wall_clock_breakdown": False,
        "zero_optimization": {
            "stage": args.stage or 0,
            "allgather_partitions": True,
            "reduce_scatter": True,
            "allgather_bucket_size": 50000000,
            "reduce_bucket_size": 50000000,
            "overlap_comm": True,
            "contiguous_gradients": True,
            "cpu_offload": False,
        },
    }
    if args.offload == "cpu":
        offload_to_cpu(config["zero_optimization"], parameters=config["zero_optimization"]["stage"] == 3)
    set_batch_and_lr(config, args)
    return config


BATCH_FLAGS = {"--batch-size": "train_batch_size", "--micro-batch": "train_micro_batch_size_per_gpu",
               "--grad-accum": "gradient_accumulation_steps"}


def set_batch_and_lr(config, args):
    """Write the batch flags and --lr that were given into a config; return a note of each value it overrode."""
    notes = []
    if args.micro_batch and args.grad_accum and args.batch_size is None and "train_batch_size" in config:
        notes.append(f"--micro-batch and --grad-accum set the global batch, its {config.pop('train_batch_size')}")
    for flag, key in BATCH_FLAGS.items():
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None:
            if key in config and config[key] != value:
                notes.append(f"{flag} {value} overrides its {config[key]}")
            config[key] = value
    if args.lr is not None:
        optimizer = config.setdefault("optimizer", {}).setdefault("params", {})
        if optimizer.get("lr", args.lr) != args.lr:
            notes.append(f"--lr {args.lr:g} overrides its {optimizer['lr']:g}")
        optimizer["lr"] = args.lr
        scheduler = config.get("scheduler", {}).get("params", {})
        if "warmup_max_lr" in scheduler:
            scheduler["warmup_max_lr"] = args.lr
    return notes


def batch_sizes(config, world_size):
    """The global batch, micro-batch and accumulation steps DeepSpeed derives from those the config sets (any one
    or two of them set the rest, as in DeepSpeed's config), over `world_size` data-parallel ranks."""
    batch, micro, accum = (config.get(key) for key in BATCH_FLAGS.values())
    if batch and micro and not accum:
        accum = batch // micro // world_size
    elif batch and accum and not micro:
        micro = batch // world_size // accum
    elif batch and not micro and not accum:
        micro, accum = batch // world_size, 1
    elif micro:
        accum = accum or 1
        batch = batch or micro * accum * world_size
    return batch, micro, accum


OFFLOADED = {"offload_optimizer": "the optimizer's state and step", "offload_param": "the parameters"}


def offload_to_cpu(zero, parameters):
    """Set ZeRO-Offload in a config's zero_optimization, as DeepSpeed spells it today: the optimizer's state
    and step on the host, and with `parameters` (ZeRO-3) the parameters too.

    Memory is pinned where the accelerator pins it (DeepSpeed's CPU accelerator
    leaves host memory as it is). The old switch, "cpu_offload", goes.
    """
    zero.pop("cpu_offload", None)
    zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if parameters:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}


def offload_device(zero):
    """Where a config's zero_optimization offloads to: "none", "cpu" or "nvme" (the old "cpu_offload": true is cpu)."""
    devices = {(zero.get(key) or {}).get("device", "none") for key in OFFLOADED}
    if zero.get("cpu_offload"):
        devices.add("cpu")
    return "+".join(sorted(devices - {"none"})) or "none"


def config_dtype(config):
    if config.get("bf16", config.get("bfloat16", {})).get("enabled"):
        return "bf16"
    return "fp16" if config.get("fp16", {}).get("enabled") else "fp32"


def load_ds_config(args):
    """The config to train with, and a line saying where its dtype and stage came from.

    Without --deepspeed_config it is get_ds_config(args). With a file, the file is
    the config, and --dtype / --stage, when given, override its values; --offload cpu
    adds ZeRO-Offload to a file that has none (check_args refuses one that contradicts it).
    """
    if not args.deepspeed_config:
        return get_ds_config(args), None
    with open(args.deepspeed_config) as f:
        config = json.load(f)
    notes = []
    if args.dtype is not None and args.dtype != config_dtype(config):
        notes.append(f"--dtype {args.dtype} overrides its {config_dtype(config)}")
        config.pop("bfloat16", None)
        config.setdefault("bf16", {})["enabled"] = args.dtype == "bf16"
        config.setdefault("fp16", {})["enabled"] = args.dtype == "fp16"
    zero = config.setdefault("zero_optimization", {})
    if args.stage is not None and args.stage != zero.get("stage", 0):
        notes.append(f"--stage {args.stage} overrides its stage {zero.get('stage', 0)}")
        zero["stage"] = args.stage
    if args.offload == "cpu" and offload_device(zero) == "none":  # one that offloads otherwise is refused
        notes.append("--offload cpu adds ZeRO-Offload")
        offload_to_cpu(zero, parameters=zero.get("stage", 0) == 3)
    notes += set_batch_and_lr(config, args)
    source = "; ".join(notes) or "--dtype/--stage not given"
    note = (f"Using {args.deepspeed_config}: dtype {config_dtype(config)}, ZeRO stage {zero.get('stage', 0)} "
            f"({source})")
    return config, note


def check_args(args, config, world_size):
    """Return why this flag mix cannot run, or None. Checked on every rank before any heavy work."""
    stage = config.get("zero_optimization", {}).get("stage", 0)
    if args.log_interval < 1:
        return f"--log-interval must be at least 1, got {args.log_interval}"
    if args.epochs < 0:
        return f"--epochs must not be negative, got {args.epochs}"
    if args.synthetic_train_size < 1 or args.synthetic_test_size < 1:
        return "--synthetic-train-size and --synthetic-test-size must be at least 1"
    if args.resume and not args.save_dir:
        return "--resume needs --save-dir, the directory to resume from"
    if args.keep_last is not None and (args.keep_last < 1 or not args.save_dir):
        return f"--keep-last needs --save-dir and at least 1 checkpoint to keep, got {args.keep_last}"
    if args.resume and args.init_from:
        return "--resume continues a run and --init-from starts a new one: give one of them"
    if args.init_from and not os.path.exists(args.init_from):
        return f"--init-from: no model file or checkpoint {args.init_from}"
    if args.data_workers is not None and args.data_workers < 0:
        return f"--data-workers must not be negative, got {args.data_workers}"
    if args.eval_every < 0:
        return f"--eval-every must not be negative, got {args.eval_every}"
    if args.dist_timeout is not None and args.dist_timeout <= 0:
        return f"--dist-timeout must be positive, got {args.dist_timeout}"
    if args.capacity_factor <= 0 or args.eval_capacity_factor <= 0:
        return "--capacity-factor and --eval-capacity-factor must be positive"
    if args.moe_aux_loss_coef < 0:
        return f"--moe-aux-loss-coef must not be negative, got {args.moe_aux_loss_coef}"
    for flag in (*BATCH_FLAGS, "--lr"):
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None and value <= 0:
            return f"{flag} must be positive, got {value:g}"
    if config.get("fp16", {}).get("enabled") and config.get("bf16", config.get("bfloat16", {})).get("enabled"):
        return "the DeepSpeed config enables both fp16 and bf16; enable one"
    offload = offload_device(config.get("zero_optimization", {}))
    if args.offload is not None and offload != args.offload:
        return (f"--offload {args.offload} contradicts {args.deepspeed_config}, which offloads to {offload}: "
                f"drop --offload or change the file")
    if offload != "none" and stage == 0:
        return f"offloading to the {offload} needs ZeRO stage 1, 2 or 3 (--stage): stage 0 has no ZeRO optimizer to offload"
    if config.get("fp16", {}).get("fp16_master_weights_and_grads") and (
            config_dtype(config) != "fp16" or offload != "cpu"
            or config.get("optimizer", {}).get("params", {}).get("torch_adam")):
        return ("fp16_master_weights_and_grads needs fp16 (--dtype fp16) and ZeRO stage 1, 2 or 3 with the optimizer "
                "offloaded to the cpu (--offload cpu) by DeepSpeed's CPU Adam (not \"torch_adam\")")
    return (check_moe(args, stage, world_size) if args.moe else None) or check_batch(config, world_size)


def check_batch(config, world_size):
    """Why the config's batch settings cannot hold on `world_size` ranks, or None."""
    batch, micro, accum = batch_sizes(config, world_size)
    if not batch and not micro:
        return "the DeepSpeed config sets no batch size: give --batch-size or --micro-batch"
    if not micro or not accum or batch != micro * accum * world_size:
        return (f"the batch does not add up: global batch {batch} != micro-batch {micro} x {accum} accumulation "
                f"steps x {world_size} data-parallel ranks = {(micro or 0) * (accum or 0) * world_size}; "
                f"set --batch-size, --micro-batch and --grad-accum so that it does")
    return None


def check_moe(args, stage, world_size):
    """Why this MoE mix cannot run, or None."""
    if stage == 3:
        return "--moe does not work with ZeRO stage 3: DeepSpeed's MoE supports stages 0, 1 and 2"
    if args.ep_world_size < 1:
        return f"--ep-world-size must be at least 1, got {args.ep_world_size}"
    for n in args.num_experts:
        if n < 1 or n % args.ep_world_size:
            return f"--num-experts {n} is not a positive multiple of --ep-world-size {args.ep_world_size}"
    if world_size % args.ep_world_size:
        return (f"the world size {world_size} is not divisible by --ep-world-size {args.ep_world_size}: "
                f"launch a multiple of {args.ep_world_size} ranks")
    if args.noisy_gate_policy == "RSample" and args.top_k != 1:
        return "--noisy-gate-policy RSample works with --top-k 1 only (DeepSpeed ignores it for top-2); use Jitter"
    return None


class Net(nn.Module):
    """LeNet-style CNN; with --moe its last hidden layer feeds one DeepSpeed MoE layer per --num-experts entry.

    Attribute names and construction order are the reference's, so its state_dict
    keys and, after the same seed, its initial weights are too. Every MoE layer is
    given the one expert template (its experts start as copies of it; with
    --mlp-type residual the layers share it as their dense MLP). After each forward
    pass, `aux_losses` and `expert_counts` hold every MoE layer's gate aux loss and
    the number of tokens routed to each expert: plain attributes, no parameters.
    """

    def __init__(self, args):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.moe = args.moe
        if self.moe:
            expert = nn.Linear(84, 84)
            self.moe_layer_list = nn.ModuleList([
                MoE(hidden_size=84,
                    expert=expert,
                    num_experts=n,
                    ep_size=args.ep_world_size,
                    use_residual=args.mlp_type == "residual",
                    k=args.top_k,
                    min_capacity=args.min_capacity,
                    noisy_gate_policy=args.noisy_gate_policy,
                    capacity_factor=args.capacity_factor,
                    eval_capacity_factor=args.eval_capacity_factor,
                    drop_tokens=args.drop_tokens) for n in args.num_experts
            ])
            self.aux_losses, self.expert_counts = [], []
            self.fc4 = nn.Linear(84, 10)
        else:
            self.fc3 = nn.Linear(84, 10)

    def forward(self, x):
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        if not self.moe:
            return self.fc3(x)
        self.aux_losses, self.expert_counts = [], []
        for layer in self.moe_layer_list:
            x, aux_loss, expert_counts = layer(x)
            self.aux_losses.append(aux_loss)
            self.expert_counts.append(expert_counts)
        return self.fc4(x)


def create_moe_param_groups(model):
    """Split expert parameters into their own optimizer groups (marked moe=True)."""
    parameters = {"params": [p for p in model.parameters()], "name": "parameters"}
    return split_params_into_different_moe_groups_for_optimizer(parameters)


class SyntheticCIFAR10(torch.utils.data.Dataset):
    """A deterministic, learnable CIFAR-10 stand-in that needs no network.

    Each class owns a smooth random colour pattern. An image is its class's
    pattern, shifted by up to 4 pixels, blended with another class's pattern and
    covered in pixel noise. Images are uint8 HWC arrays turned into PIL images,
    as torchvision's CIFAR10 does, so the same transforms apply. The patterns
    are the same for every split and rank; train and test draw different images.
    """

    classes = CLASSES

    def __init__(self, size, train, transform=None):
        self.transform = transform
        patterns = F.interpolate(torch.rand(10, 3, 8, 8, generator=torch.Generator().manual_seed(0)),
                                 size=32, mode="bicubic", align_corners=False)
        gen = torch.Generator().manual_seed(1 if train else 2)
        targets = torch.randint(10, (size,), generator=gen)
        distractors = (targets + torch.randint(1, 10, (size,), generator=gen)) % 10
        mix = 0.5 * torch.rand(size, 1, 1, 1, generator=gen)
        images = (1 - mix) * patterns[targets] + mix * patterns[distractors]
        shifts = torch.randint(-4, 5, (size, 2), generator=gen).tolist()
        images = torch.stack([img.roll(tuple(s), dims=(1, 2)) for img, s in zip(images, shifts)])
        images = images + 0.8 * torch.randn(images.shape, generator=gen)
        self.data = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        self.targets = targets.tolist()

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        image = Image.fromarray(self.data[index])
        return (self.transform(image) if self.transform else image), self.targets[index]


MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)  # the reference's Normalize


class ImageTensor(torch.utils.data.Dataset):
    """A decoded image set as one uint8 tensor of N x 32 x 32 x 3 (torchvision's array, shared, not copied) and
    its labels. The loader takes whole batches from it by index (__getitems__); `to_inputs` normalizes them."""

    def __init__(self, dataset):
        self.data, self.targets = torch.from_numpy(dataset.data), torch.tensor(dataset.targets)

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        return self.data[index], self.targets[index]

    def __getitems__(self, indices):
        indices = torch.tensor(indices)
        return self.data[indices], self.targets[indices]


def whole_batch(batch):
    """The collate function of the tensor path: ImageTensor already gathered the batch."""
    return batch


def collate_fn(dataset):
    base = dataset.dataset if isinstance(dataset, torch.utils.data.Subset) else dataset
    return whole_batch if isinstance(base, ImageTensor) else None


def load_datasets(args, download):
    """The training and test sets: on the tensor path uint8 ImageTensors, on the PIL path torchvision's per-image
    transforms, ToTensor and Normalize, as in the reference."""
    transform = None
    if args.data_path == "pil":
        transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
    if args.dataset == "synthetic":
        sets = (SyntheticCIFAR10(args.synthetic_train_size, train=True, transform=transform),
                SyntheticCIFAR10(args.synthetic_test_size, train=False, transform=transform))
    else:
        sets = (torchvision.datasets.CIFAR10(root=args.data_dir, train=True, download=download, transform=transform),
                torchvision.datasets.CIFAR10(root=args.data_dir, train=False, download=download, transform=transform))
    return sets if args.data_path == "pil" else tuple(map(ImageTensor, sets))


def to_inputs(images, device, dtype):
    """A batch as the model takes it, on `device` in `dtype` (None: float32).

    The tensor path's batch moves as uint8 and becomes what ToTensor and Normalize make of each image, bit for
    bit: the same float32 operations, on the whole batch. 255 is a device tensor because CUDA multiplies by the
    reciprocal of a host scalar, which rounds differently from ToTensor's division.
    """
    images = images.to(device, non_blocking=True)
    if images.dtype == torch.uint8:
        images = images.permute(0, 3, 1, 2).contiguous().float() / torch.tensor(255.0, device=images.device)
        images = transforms.functional.normalize(images, MEAN, STD)
    return images if dtype is None else images.to(dtype)


def stop(message, every_rank=False):
    """End this rank with a one-line error and exit status 1.

    The line is printed once per node, for errors every rank meets; with
    every_rank, by this rank, for errors that may be its own. For errors every
    rank meets, the ranks leave together: the launcher kills the other ranks as
    soon as one exits, which could otherwise come before the printing rank has
    printed. A dead peer ends that wait at once.
    """
    if every_rank or int(os.environ.get("LOCAL_RANK", 0)) == 0:
        print(f"error: {message}", file=sys.stderr, flush=True)
    if not every_rank and dist.is_initialized():
        try:
            dist.barrier()
        except RuntimeError:
            pass
    leave(1)


def leave(status):
    """End this rank at once with exit `status`, skipping the interpreter's teardown.

    DeepSpeed keeps references to its process groups, so PyTorch's gloo worker
    threads outlive destroy_process_group(). One of them can still be releasing
    the last collective's tensors when Python finalizes; freeing a tensor made in
    Python takes the GIL, a finalizing interpreter ends the thread instead, and
    the process aborts after its results ("terminate called without an active
    exception", exit -6; pytorch/pytorch#190489). Nothing is left to tear down:
    every file this script writes is closed by then.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def load_data(args):
    """Load the datasets. CIFAR-10 is downloaded once per data directory: global rank 0 first.

    Rank 0 loads (downloading if needed) while every other rank waits. Then the
    first rank of each other node loads, downloading into its own --data-dir if
    that node's lacks the data (a directory shared with rank 0 it finds complete
    and checked), while the rest of its node waits. Then the rest load. No rank
    reads an archive another is still writing, and a failure on any node stops
    every rank with one line. Generated data needs no download: every rank makes
    its own at once.
    """
    if args.dataset == "synthetic":
        return load_datasets(args, download=False)
    first_on_node = int(os.environ.get("LOCAL_RANK", 0)) == 0
    turns = (dist.get_rank() == 0, first_on_node and dist.get_rank() != 0, not first_on_node)
    datasets = None
    for my_turn in turns:
        error = None
        if my_turn:
            try:
                datasets = load_datasets(args, download=first_on_node)
            except (OSError, RuntimeError) as e:
                error = (f"CIFAR-10 is not in {args.data_dir} and could not be downloaded ({e}). "
                         f"Place {CIFAR10_ARCHIVE} (from {CIFAR10_URL}) in {args.data_dir}, "
                         f"or train offline on generated data with --dataset synthetic.")
        errors = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)  # also the barrier that ends this turn
        if any(errors):
            stop(next(e for e in errors if e))
    return datasets


def test_loader(testset, batch_size, shard):
    """The test set in order, in batches of `batch_size`; with shard, only this rank's every world_size-th image."""
    if shard:
        testset = torch.utils.data.Subset(testset, range(dist.get_rank(), len(testset), dist.get_world_size()))
    return torch.utils.data.DataLoader(testset, batch_size=batch_size, shuffle=False, collate_fn=collate_fn(testset))


def count_correct(model_engine, testset, local_device, target_dtype, test_batch_size=4, shard=False):
    """Correct predictions and test images per class, summed over ranks.

    With shard, each rank evaluates every world_size-th image. Without, every
    rank runs the whole test set, as expert-parallel MoE and ZeRO-3 need: their
    forward pass exchanges data between ranks, so all ranks must run every batch.
    """
    testloader = test_loader(testset, test_batch_size, shard)
    class_correct = torch.zeros(len(CLASSES), dtype=torch.long, device=local_device)
    class_total = torch.zeros(len(CLASSES), dtype=torch.long, device=local_device)
    model_engine.eval()
    with torch.no_grad():
        for images, labels in testloader:
            images, labels = to_inputs(images, local_device, target_dtype), labels.to(local_device)
            predicted = model_engine(images).argmax(dim=1)
            class_total += torch.bincount(labels, minlength=len(CLASSES))
            class_correct += torch.bincount(labels[predicted == labels], minlength=len(CLASSES))
    model_engine.train()
    if shard:
        dist.all_reduce(class_correct)
        dist.all_reduce(class_total)
    return class_correct.tolist(), class_total.tolist()


def test(model_engine, testset, local_device, target_dtype, test_batch_size=4, shard=False):
    """Overall and per-class accuracy on the test set, printed by rank 0 as the reference prints it."""
    class_correct, class_total = count_correct(model_engine, testset, local_device, target_dtype,
                                               test_batch_size, shard)
    if dist.get_rank() == 0:
        print("\n".join(accuracy_lines(class_correct, class_total)))
    return sum(class_correct) / sum(class_total)


def accuracy_lines(class_correct, class_total):
    """The reference's accuracy lines, to the character: overall, then one per class.

    Percentages are rounded (half to even, as Python's format rounds) and printed
    with a space for the sign. A class with no test image, where the reference
    divides by zero, gets an `n/a` line instead.
    """
    total = sum(class_total)
    lines = [f"Accuracy of the network on the {total} test images: {100 * sum(class_correct) / total: .0f} %"]
    for name, correct, count in zip(CLASSES, class_correct, class_total):
        if count:
            lines.append(f"Accuracy of {name:>5s} : {100 * correct / count: 2.0f} %")
        else:
            lines.append(f"Accuracy of {name:>5s} : n/a (no test images)")
    return lines


class ExpertLoad:
    """Tokens routed to each expert, and the gate aux loss, of every MoE layer over one log interval."""

    def __init__(self, net, device):
        self.counts = [torch.zeros(layer.num_experts, device=device) for layer in net.moe_layer_list]
        self.aux_losses = torch.zeros(len(net.moe_layer_list), device=device)
        self.steps = 0

    def add(self, net):
        for total, counts in zip(self.counts, net.expert_counts):
            total += counts
        self.aux_losses += torch.stack([aux.detach().float() for aux in net.aux_losses])
        self.steps += 1

    def summarize(self):
        """Each layer's share of tokens per expert and mean aux loss, over all ranks; every rank must call it."""
        totals = torch.cat(self.counts + [self.aux_losses])
        dist.all_reduce(totals)
        counts = totals[:-len(self.aux_losses)].split([len(c) for c in self.counts])
        shares = [(c / c.sum().clamp(min=1)).tolist() for c in counts]
        aux_losses = (totals[-len(self.aux_losses):] / (self.steps * dist.get_world_size())).tolist()
        self.reset()
        return shares, aux_losses

    def reset(self):
        for total in self.counts + [self.aux_losses]:
            total.zero_()
        self.steps = 0

    def state(self):
        return {"counts": [c.tolist() for c in self.counts], "aux_losses": self.aux_losses.tolist(), "steps": self.steps}

    def load_state(self, state):
        for total, counts in zip(self.counts + [self.aux_losses], state["counts"] + [state["aux_losses"]]):
            total.copy_(torch.tensor(counts))
        self.steps = state["steps"]


def write_step_metrics(model_engine, steps):
    """Write each step's loss and gradient norm to the monitor as Train/Samples/train_loss and grad_norm, empty
    the list, return the losses and the norms (None where DeepSpeed computes none).

    One host read per log interval instead of one per step.
    """
    samples = [s for s, _, _ in steps]
    losses = torch.stack([loss for _, loss, _ in steps]).tolist()
    events = [("Train/Samples/train_loss", loss, s) for s, loss in zip(samples, losses)]
    norms = [None] * len(steps)
    if all(norm is not None for _, _, norm in steps):
        norms = torch.stack([norm for _, _, norm in steps]).tolist()
        events += [("Train/Samples/grad_norm", norm, s) for s, norm in zip(samples, norms)]
    model_engine.monitor.write_events(events)
    steps.clear()
    return losses, norms


def grad_norm(model_engine, device):
    """The gradient norm of the step just taken, before clipping, as a float32 tensor on the device (no host read),
    or None where DeepSpeed computes none (no clipping and no ZeRO)."""
    norm = model_engine.get_global_grad_norm()
    return None if norm is None else torch.as_tensor(norm, dtype=torch.float32, device=device)


def clipping_summary(norms, clip):
    """`grad norm 0.452, clipped at 1.0 in 3 of 100 steps`: the mean norm before clipping over the interval's
    finite norms (a skipped fp16 step has none) and how often clipping acted."""
    finite = [norm for norm in norms if norm is not None and math.isfinite(norm)]
    if not finite:
        return None
    summary = f"grad norm {sum(finite) / len(finite):.3f}"
    if clip > 0:
        return f"{summary}, clipped at {clip} in {sum(norm > clip for norm in finite)} of {len(norms)} steps"
    return f"{summary}, no clipping"


def batch_label(epoch, batch):
    """`[ 1,  2000]`: epoch and batch (counted from 1) as the reference's loss line starts, sign spaces included."""
    return f"[{epoch: d}, {batch: 5d}]"


def loss_line(epoch, batch, mean_loss):
    """The reference's running-loss line, to the character: `[ 1,  2000] loss:  2.304`."""
    return f"{batch_label(epoch, batch)} loss: {mean_loss: .3f}"


def log_progress(model_engine, epoch, step, losses, norms, seconds, steps_per_epoch, log_interval, expert_load):
    """Rank 0 prints the reference's loss line, then throughput and expert load; metrics go to the monitor.

    The throughput line shows the interval's gradient norm and how often clipping acted, and ends with rank 0's
    peak accelerator memory so far (on DeepSpeed's CPU accelerator: the process's resident memory, sampled at
    each log interval), which ZeRO and ZeRO-Offload lower.
    """
    prefix = batch_label(epoch + 1, step + 1)
    samples_per_sec = log_interval * model_engine.train_batch_size() / seconds
    events = [("Train/Samples/samples_per_sec", samples_per_sec, model_engine.global_samples)]
    accelerator = get_accelerator()
    speed = [f"{samples_per_sec:.0f} samples/s", f"{seconds / log_interval * steps_per_epoch:.1f} s/epoch",
             clipping_summary(norms, model_engine.gradient_clipping()),
             f"peak {accelerator.device_name()} memory {accelerator.max_memory_allocated() / 2**20:.0f} MiB"]
    lines = [loss_line(epoch + 1, step + 1, sum(losses) / len(losses)),
             f"{prefix} {', '.join(part for part in speed if part)}"]
    if expert_load:
        shares, aux_losses = expert_load.summarize()
        layers = []
        for layer, (layer_shares, aux_loss) in enumerate(zip(shares, aux_losses)):
            layers.append(f"layer {layer}: {' '.join(f'{100 * x:.0f}%' for x in layer_shares)}, aux loss {aux_loss:.3f}")
            events += [(f"MoE/layer{layer}_expert{e}_share", x, model_engine.global_samples)
                       for e, x in enumerate(layer_shares)]
            events.append((f"MoE/layer{layer}_aux_loss", aux_loss, model_engine.global_samples))
        lines.append(f"{prefix} expert load: {' | '.join(layers)}")
    if dist.get_rank() == 0:
        print("\n".join(lines), flush=True)
    model_engine.monitor.write_events(events)


def run_description(args, model_engine):
    """What a checkpoint must match to be resumed: the model's shape, world size, precision and ZeRO stage."""
    dtype = "bf16" if model_engine.bfloat16_enabled() else "fp16" if model_engine.fp16_enabled() else "fp32"
    return {"moe": args.moe, "num_experts": args.num_experts if args.moe else None,
            "mlp_type": args.mlp_type if args.moe else None, "ep_world_size": args.ep_world_size if args.moe else None,
            "world_size": dist.get_world_size(), "dtype": dtype, "zero_stage": model_engine.zero_optimization_stage()}


MODEL_FLAGS = ("moe", "num_experts", "mlp_type", "top_k", "min_capacity", "noisy_gate_policy", "capacity_factor",
               "eval_capacity_factor", "drop_tokens")


def model_flags(args):
    """The flags that build the Net, as `add_argument` names them: what an exported model is rebuilt from."""
    return {name: getattr(args, name) for name in MODEL_FLAGS}


def model_argv(flags):
    """Command-line flags that rebuild a Net from model_flags(args), at expert-parallel size 1."""
    argv = ["--moe"] if flags["moe"] else []
    for name, value in flags.items():
        if name in ("moe", "drop_tokens"):
            continue
        option = "--" + name.replace("_", "-")
        argv += [option, *map(str, value)] if isinstance(value, list) else [option, str(value)]
    return argv + ([] if flags["drop_tokens"] else ["--no-drop-tokens"])


CHECKPOINT_TAG = re.compile(r"epoch(\d+)(?:-step(\d+))?$")  # epoch<N> at its end, epoch<N>-step<S> mid-epoch


@dataclasses.dataclass
class Position:
    """Where training goes on: the epoch (from 0), the optimizer steps already taken in it, and, from a
    mid-epoch checkpoint, this rank's random-number state and part of the log interval in progress."""
    epoch: int = 0
    step: int = 0
    rank_state: dict = None


def save_checkpoint(model_engine, args, epoch, step=None, interval=None):
    """Save with DeepSpeed's save_checkpoint: the finished epoch as epoch<N>, or, with `step`, the steps taken
    so far in epoch N as epoch<N>-step<S>, with this rank's unlogged interval. Returns the tag.

    run.json is written first and 'latest' last, by rank 0 once every rank's files are complete (DeepSpeed
    writes it when rank 0's own are), and atomically, so a kill at any moment leaves a 'latest' that loads.
    run.json says which run saved it; for MoE it also names the MoE layers' module, which earlier versions
    of this script called moe_layers, and the flags that build the Net (for export_model.py). The client
    state holds the position and every rank's random-number state. Then --keep-last prunes.
    """
    tag = f"epoch{epoch + 1}" if step is None else f"epoch{epoch + 1}-step{step}"
    if dist.get_rank() == 0:
        os.makedirs(os.path.join(args.save_dir, tag), exist_ok=True)
        with open(os.path.join(args.save_dir, tag, "run.json"), "w") as f:
            json.dump({**run_description(args, model_engine), "moe_module": "moe_layer_list" if args.moe else None,
                       "model": model_flags(args)}, f)
    client_state = {"epoch": epoch + 1 if step is None else epoch, "step": step or 0,
                    "rng_states": gather_rank_states(interval)}
    model_engine.save_checkpoint(args.save_dir, tag=tag, client_state=client_state, save_latest=False)
    dist.barrier()  # every rank's files are written
    if dist.get_rank() == 0:
        replace_file(os.path.join(args.save_dir, "latest"), tag)
        if args.keep_last:
            prune_checkpoints(args.save_dir, args.keep_last)
    return tag


def replace_file(path, text):
    """Write `text` to `path` in one step: a reader finds the old text or the new, never a part."""
    with open(f"{path}.tmp", "w") as f:
        f.write(text)
    os.replace(f"{path}.tmp", path)


def checkpoint_order(tag):
    """The training position a checkpoint tag names, as (epochs finished, steps into the next)."""
    epoch, step = CHECKPOINT_TAG.match(tag).groups()
    return (int(epoch), 0) if step is None else (int(epoch) - 1, int(step))


def prune_checkpoints(save_dir, keep):
    """Delete all but the newest `keep` checkpoints in save_dir, never those 'latest' and 'best' name."""
    tags = sorted((t for t in os.listdir(save_dir) if CHECKPOINT_TAG.match(t)), key=checkpoint_order)
    kept = set(tags[-keep:])
    for name in ("latest", "best"):
        path = os.path.join(save_dir, name)
        if os.path.islink(path):
            kept.add(os.readlink(path))
        elif os.path.isfile(path):
            with open(path) as f:
                kept.add(f.read().strip())
    for tag in set(tags) - kept:
        shutil.rmtree(os.path.join(save_dir, tag), ignore_errors=True)


def mark_best(save_dir, tag, accuracy):
    """Point the link 'best' at `tag` if its test accuracy beats best's (kept in each tag's eval.json)."""
    with open(os.path.join(save_dir, tag, "eval.json"), "w") as f:
        json.dump({"accuracy": accuracy}, f)
    best = os.path.join(save_dir, "best")
    try:
        with open(os.path.join(best, "eval.json")) as f:
            if json.load(f)["accuracy"] >= accuracy:
                return
    except (OSError, ValueError, KeyError):
        pass  # no best yet, or one that cannot be read: this one is best
    os.symlink(tag, f"{best}.tmp")
    os.replace(f"{best}.tmp", best)


def gather_rank_states(interval=None):
    """Every rank's random-number state, and its unlogged interval mid-epoch, for a resumed run to draw and
    print what the uninterrupted one would have.

    The draws are the gate's noise and random token selection (in training and
    in evaluation), and the data loader's worker seed; DeepSpeed's checkpoints do
    not keep them.
    """
    state = {"torch": torch.get_rng_state(), "accelerator": get_accelerator().get_rng_state(), "interval": interval}
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states


def resume(model_engine, args):
    """Load the newest checkpoint in --save-dir and return the Position to continue from.

    --resume never starts afresh; --resume auto starts at the beginning where --save-dir holds no checkpoint.
    """
    latest = os.path.join(args.save_dir, "latest")
    if not os.path.isfile(latest):
        if args.resume == "auto":
            if dist.get_rank() == 0:
                print(f"--resume auto: no checkpoint in {args.save_dir} yet, so training starts at epoch 1")
            return Position()
        stop(f"--resume: no checkpoint in {args.save_dir} (it has no 'latest' file)")
    with open(latest) as f:
        path = os.path.join(args.save_dir, f.read().strip())
    try:
        with open(os.path.join(path, "run.json")) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        stop(f"--resume: checkpoint {path} is incomplete (no readable run.json)")
    if saved.get("moe") and saved.get("moe_module") != "moe_layer_list":
        stop(f"--resume: checkpoint {path} was saved by an earlier version of this script, whose MoE layers were "
             f"named moe_layers (now moe_layer_list, as in the reference), so its weights do not load here; "
             f"start a new run with another --save-dir")
    described = run_description(args, model_engine)
    changed_keys = [key for key, value in described.items() if saved.get(key) != value]
    changed = [f"{key} {saved.get(key)} -> {described[key]}" for key in changed_keys]
    if changed:
        stop(f"--resume: checkpoint {path} was saved by a different run ({', '.join(changed)}); "
             f"resume with its settings, or save to another --save-dir"
             + (f"; to train on from its weights in this layout, start a new run with --init-from {path}"
                if set(changed_keys) <= {"world_size", "ep_world_size", "zero_stage", "dtype"} else ""))
    try:
        load_path, client_state = model_engine.load_checkpoint(args.save_dir, os.path.basename(path))
    except Exception as e:  # DeepSpeed raises many kinds; any of them means this checkpoint cannot be used
        reason = str(e).strip().splitlines()[0] if str(e).strip() else "no reason given; is a file missing?"
        stop(f"--resume: cannot load checkpoint {path}: {type(e).__name__} in DeepSpeed's load_checkpoint: {reason}",
             every_rank=True)
    if load_path is None:
        stop(f"--resume: cannot load checkpoint {path}: DeepSpeed found no model states there")
    try:
        dist.barrier()  # a rank that could not load its part has exited: do not go on without it
    except RuntimeError:
        stop(f"--resume: another rank could not load its part of checkpoint {path}")
    replay_host_adam_steps(model_engine)
    start = Position(client_state["epoch"], client_state.get("step", 0), client_state["rng_states"][dist.get_rank()])
    set_rng_state(start.rank_state)
    if dist.get_rank() == 0:
        print(f"Resuming from {path} at epoch {start.epoch + 1}" + (f", step {start.step + 1}" if start.step else ""))
    return start


def set_rng_state(rank_state):
    torch.set_rng_state(rank_state["torch"])
    get_accelerator().set_rng_state(rank_state["accelerator"])


def replay_host_adam_steps(model_engine):
    """Give DeepSpeed's Adam that steps on the host (CPU Adam for ZeRO-Offload, the CPU accelerator's fused Adam)
    the bias correction that the process which saved the checkpoint would use next.

    Its C++ step keeps beta^t and multiplies it by beta at each step, in float32; a new process starts from
    pow(beta, t), which differs in the last bits, so a resumed run drifted from the uninterrupted one, and
    MoE's routing turned that drift into other experts. Stepping a one-element dummy through steps 1 to t
    repeats the products (2 s per 100,000 steps on 2 CPU cores).
    """
    optimizer = model_engine.basic_optimizer
    steps = max((int(state.get("step", 0)) for state in optimizer.state.values()), default=0)
    group = optimizer.param_groups[0]
    args = group["lr"], *group["betas"], group["eps"]
    dummy = [torch.zeros(1) for _ in range(4)]
    if isinstance(optimizer, DeepSpeedCPUAdam):
        for step in range(1, steps + 1):
            optimizer.ds_opt_adam.adam_update(optimizer.opt_id, step, *args, group["weight_decay"],
                                              group["bias_correction"], *dummy)
    elif isinstance(optimizer, FusedAdam) and group["params"][0].device.type == "cpu":
        for step in range(1, steps + 1):
            optimizer.multi_tensor_adam(2048, optimizer._dummy_overflow_buf, [[tensor] for tensor in dummy], *args,
                                        step, optimizer.adam_w_mode, group["bias_correction"], group["weight_decay"])


class Preemption:
    """A scheduler's SIGTERM or SIGUSR1 (SLURM, Kubernetes, DeepSpeed's launcher passing one on): the handler
    notes it and does nothing else, so a second signal, during the save too, changes nothing. The ranks
    agree on it at a step boundary, every PREEMPTION_CHECK_EVERY steps, then save where they are and leave
    together with exit status PREEMPTED (75, EX_TEMPFAIL: run again with --resume), or 128 + the signal's
    number where there is no --save-dir and nothing was saved."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, device):
        self.device = device
        self.signum = 0
        self.previous = {signum: signal.signal(signum, self.note) for signum in self.SIGNALS}

    def note(self, signum, frame):
        self.signum = self.signum or signum

    def agreed(self):
        """The signal that reached any rank (0 if none); every rank must ask at the same step."""
        if dist.get_world_size() == 1:
            return self.signum
        flag = torch.tensor([self.signum], dtype=torch.int32, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())

    def leave(self, signum, args, tag):
        """Say what was saved (`tag`, or None: nothing) on rank 0, and end every rank together."""
        name = signal.Signals(signum).name
        if dist.get_rank() == 0:
            print(f"Preempted by {name}: " + (f"saved checkpoint {os.path.join(args.save_dir, tag)}; run again with "
                                              f"--resume to continue from there (exit {PREEMPTED})" if tag else
                                              f"nothing saved, as there is no --save-dir (exit {128 + signum})"),
                  flush=True)
        dist.barrier()  # no rank leaves, and so no launcher kills another, before every rank is done
        leave(PREEMPTED if tag else 128 + signum)

    def close(self):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


PREEMPTION_CHECK_EVERY = 10  # optimizer steps between the ranks' agreement on a signal: one small all-reduce
PREEMPTED = 75  # the exit status of a rank that was preempted and saved a checkpoint


class ResumableSampler(torch.utils.data.distributed.DistributedSampler):
    """DeepSpeed's DistributedSampler, which can begin an epoch at `start`: the number of this rank's samples
    that a mid-epoch checkpoint had already trained on. The order is the same."""

    start = 0

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.start, None)

    def __len__(self):
        return self.num_samples - self.start


def interval_state(steps, expert_load):
    """This rank's part of the log interval in progress, for a mid-epoch checkpoint: what the next loss,
    throughput and expert-load lines average."""
    return {"steps": [(samples, loss.item(), None if norm is None else norm.item()) for samples, loss, norm in steps],
            "expert_load": expert_load.state() if expert_load else None}


def restore_interval(interval, expert_load, device):
    """The steps list of interval_state, back on the device; the expert load restored in place."""
    if expert_load:
        expert_load.load_state(interval["expert_load"])
    return [(samples, torch.tensor(loss, device=device),
             None if norm is None else torch.tensor(norm, device=device)) for samples, loss, norm in interval["steps"]]


def train_step(model_engine, criterion, inputs, labels, local_device, target_dtype, aux_loss_coef=0.0):
    """One step of the reference's loop, plus the MoE aux loss when asked; returns the loss, still on the device."""
    inputs, labels = to_inputs(inputs, local_device, target_dtype), labels.to(local_device)
    outputs = model_engine(inputs)
    loss = criterion(outputs, labels)
    objective = loss
    if aux_loss_coef:
        objective = loss + aux_loss_coef * sum(model_engine.module.aux_losses)
    model_engine.backward(objective)
    model_engine.step()
    return loss.detach().float()


def train(model_engine, trainloader, testset, args, start=None):
    """The reference's loop from `start` (a Position); also logs throughput and expert load, checkpoints,
    evaluates every --eval-every, and on a scheduler's signal saves where it is and leaves (Preemption)."""
    start = start or Position()
    local_device = get_accelerator().device_name(model_engine.local_rank)
    target_dtype = input_dtype(model_engine)
    criterion = nn.CrossEntropyLoss()
    net = model_engine.module
    expert_load = ExpertLoad(net, local_device) if args.moe else None
    aux_loss_coef = args.moe_aux_loss_coef if args.moe else 0.0  # a dense Net has no gate, so no aux loss
    accumulation = model_engine.gradient_accumulation_steps()
    steps_per_epoch = len(trainloader) // accumulation  # optimizer steps; the loader yields micro-batches
    preemption = Preemption(local_device)
    for epoch in range(start.epoch, args.epochs):
        first = start.step if epoch == start.epoch else 0  # optimizer steps a mid-epoch checkpoint took
        trainloader.data_sampler.set_epoch(epoch)  # a new order every epoch, the same on resume
        trainloader.data_sampler.start = first * accumulation * trainloader.batch_size
        # (samples seen, loss, gradient norm) of each step, on the device: read only at log intervals
        steps = restore_interval(start.rank_state["interval"], expert_load, local_device) if first else []
        if expert_load and not first:
            expert_load.reset()  # an interval ends with its epoch, as the loss lines' do
        micro_losses = []
        epoch_start = interval_start = time.perf_counter()
        batches = enumerate(trainloader, start=first * accumulation)  # the loader draws its worker seed here
        if first:
            set_rng_state(start.rank_state)  # saved mid-epoch, after the uninterrupted run's draw
        with progress_bar(args, steps_per_epoch, epoch, first) as bar:
            for micro_step, (inputs, labels) in batches:
                micro_losses.append(
                    train_step(model_engine, criterion, inputs, labels, local_device, target_dtype, aux_loss_coef))
                if expert_load:
                    expert_load.add(net)
                if len(micro_losses) < accumulation:
                    continue
                i = micro_step // accumulation  # the optimizer step just taken; its loss is its micro-batches' mean
                loss = micro_losses[0] if accumulation == 1 else torch.stack(micro_losses).mean()
                micro_losses = []
                steps.append((model_engine.global_samples, loss, grad_norm(model_engine, local_device)))
                advance(bar, model_engine, steps, expert_load)
                if i % args.log_interval == args.log_interval - 1:
                    losses, norms = write_step_metrics(model_engine, steps)
                    with tqdm.external_write_mode(file=sys.stdout):
                        log_progress(model_engine, epoch, i, losses, norms, time.perf_counter() - interval_start,
                                     steps_per_epoch, args.log_interval, expert_load)
                    interval_start = time.perf_counter()
                if (i + 1) % PREEMPTION_CHECK_EVERY == 0 and i + 1 < steps_per_epoch and (signum := preemption.agreed()):
                    tag = args.save_dir and save_checkpoint(model_engine, args, epoch, i + 1,
                                                            interval_state(steps, expert_load))
                    preemption.leave(signum, args, tag)
        if steps:
            write_step_metrics(model_engine, steps)
        model_engine.monitor.write_events([("Train/Epoch/seconds", time.perf_counter() - epoch_start, epoch + 1)])
        accuracy = None
        if args.eval_every and (epoch + 1) % args.eval_every == 0 and epoch + 1 < args.epochs:
            class_correct, class_total = count_correct(model_engine, testset, local_device, target_dtype,
                                                       shard=can_shard_eval(args, model_engine))
            accuracy = 100 * sum(class_correct) / sum(class_total)
            if dist.get_rank() == 0:
                print(f"[{epoch + 1}] accuracy of the network on the {sum(class_total)} test images: {accuracy:.1f} %")
            model_engine.monitor.write_events([("Eval/accuracy", accuracy, model_engine.global_samples)])
        # Saved after the evaluation, whose gate draws random numbers: a resumed run draws on from there.
        tag = args.save_dir and save_checkpoint(model_engine, args, epoch)
        if tag and accuracy is not None and dist.get_rank() == 0:
            mark_best(args.save_dir, tag, accuracy)
        if signum := preemption.agreed():
            preemption.leave(signum, args, tag)
    preemption.close()


BAR_EVERY = 20  # steps between the bar's readings of the loss and expert load (each one a host read)


@contextlib.contextmanager
def progress_bar(args, steps, epoch, first=0):
    """Rank 0's live bar of the epoch's steps (from step `first`) when its standard output is a terminal, erased
    when the epoch ends; DeepSpeed's log lines are then written above it. Otherwise a disabled bar (tqdm's
    no-op), so that logs and pipes get exactly the printed lines."""
    show = args.progress and dist.get_rank() == 0 and sys.stdout.isatty()
    with (tqdm(total=steps, initial=first, desc=f"epoch {epoch + 1}", unit="step", file=sys.stdout, leave=False,
               disable=not show, dynamic_ncols=True) as bar,
          logging_redirect_tqdm([logger]) if show else contextlib.nullcontext()):
        yield bar


def advance(bar, model_engine, steps, expert_load):
    """One step on the bar; every BAR_EVERY steps also samples/s, the running loss and, with MoE, each layer's
    busiest expert's share of rank 0's tokens since the last log line."""
    bar.update()
    if bar.disable or bar.n % BAR_EVERY:
        return
    rate = bar.format_dict["rate"] or 0
    postfix = {"samples/s": f"{rate * model_engine.train_batch_size():.0f}",
               "loss": f"{torch.stack([loss for _, loss, _ in steps[-BAR_EVERY:]]).mean().item():.3f}"}
    if expert_load:
        postfix["busiest expert"] = " ".join(f"{100 * (c.max() / c.sum().clamp(min=1)).item():.0f}%"
                                             for c in expert_load.counts)
    bar.set_postfix(postfix)


# The newest CUDA each NVIDIA driver runs (the CUDA toolkits' least Linux drivers), newest first, as PyTorch's
# wheel index names it.
CUDA_FOR_DRIVER = ((580, "cu130"), (570, "cu128"), (560, "cu126"), (550, "cu124"), (530, "cu121"), (520, "cu118"))
TORCH_INDEX = "https://download.pytorch.org/whl/"


def listed_gpus():
    """The NVIDIA GPUs nvidia-smi lists, and their driver's version: ([], None) without nvidia-smi or a GPU."""
    try:
        listing = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return [], None
    rows = [line.rsplit(",", 1) for line in listing.splitlines() if "," in line]
    return [name.strip() for name, _ in rows], (rows[0][1].strip() if rows else None)


def unusable_gpu():
    """Why torch cannot use this machine's GPU, and the ways out, or None when it can or there is none.

    Where torch finds no CUDA, DeepSpeed picks its CPU accelerator without a word
    (its real_accelerator.py), and a run meant for the GPU trains for hours on the
    CPU. A GPU is there when nvidia-smi lists one or CUDA_VISIBLE_DEVICES names
    one. DS_ACCELERATOR set chooses the accelerator on purpose: no check.
    """
    if "DS_ACCELERATOR" in os.environ or torch.cuda.is_available():
        return None
    names, driver = listed_gpus()
    # DeepSpeed's launcher (it sets LOCAL_SIZE) sets CUDA_VISIBLE_DEVICES to its slots, on a CPU too.
    visible = None if "LOCAL_SIZE" in os.environ else os.environ.get("CUDA_VISIBLE_DEVICES")
    names_a_gpu = bool((visible or "").strip()) and not visible.strip().startswith("-")  # -1 hides them all
    if not names and not names_a_gpu:
        return None
    try:
        torch.cuda.init()
        reason = "it finds no GPU."
    except (RuntimeError, AssertionError) as e:  # AssertionError: a torch built without CUDA
        reason = re.split(r"(?<=\.)\s", str(e).strip())[0]  # torch's first sentence
    there = f"nvidia-smi lists {len(names)} GPU(s) ({names[0]}, driver {driver})" if names else (
        f"CUDA_VISIBLE_DEVICES={visible} names a GPU")
    if visible is not None and not names_a_gpu:
        way_out = f"set CUDA_VISIBLE_DEVICES to the GPUs to use ({visible!r} hides them all)"
    else:
        way_out = install_torch_for(driver)
    return (f"{there}, but torch {torch.__version__} cannot use CUDA: {reason} DeepSpeed would train on the CPU "
            f"instead. Either {way_out}, or set DS_ACCELERATOR=cpu to train on the CPU on purpose.")


def install_torch_for(driver):
    """The way out for a driver too old for this torch's CUDA: the command for torch built for the driver's CUDA."""
    major = int(driver.split(".")[0]) if driver and driver.split(".")[0].isdigit() else None
    if major is None:
        return "install the torch built for this machine's CUDA driver (docs/gpu.md)"
    cuda = next((cuda for least, cuda in CUDA_FOR_DRIVER if major >= least), None)
    if cuda is None:
        return f"update the NVIDIA driver (PyTorch's CUDA builds need {CUDA_FOR_DRIVER[-1][0]} or newer)"
    versions = (f"{name}=={version.__version__.split('+')[0]}" for name, version in
                (("torch", torch), ("torchvision", torchvision)))
    return (f"install torch built for driver {driver}: pip install {' '.join(versions)} --index-url "
            f"{TORCH_INDEX}{cuda} (or the nearest version that index has: docs/gpu.md)")


def accelerator_line():
    """Rank 0's first line: the accelerator this run trains on, and how it was chosen."""
    accelerator = get_accelerator()
    chosen = f"DS_ACCELERATOR={os.environ['DS_ACCELERATOR']}" if "DS_ACCELERATOR" in os.environ else "detected"
    ranks = int(os.environ.get("WORLD_SIZE", 1))
    what = accelerator.device_name()
    if what == "cuda":
        what += f" ({torch.cuda.get_device_name(int(os.environ.get('LOCAL_RANK', 0)))})"
    return (f"accelerator: {what}, {ranks} rank{'s' if ranks > 1 else ''}, {chosen}; "
            f"torch {torch.__version__}, DeepSpeed {deepspeed.__version__}")


def free_port():
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def use_single_process_defaults():
    """Let `python cifar10_deepspeed.py` run as one rank: fill in what a launcher would set."""
    if "RANK" in os.environ:
        return
    for name, value in dict(RANK=0, LOCAL_RANK=0, WORLD_SIZE=1, LOCAL_SIZE=1, MASTER_ADDR="127.0.0.1",
                            MASTER_PORT=free_port()).items():
        os.environ.setdefault(name, str(value))


def cores_per_rank():
    """This rank's share of the cores it may run on, among the ranks on this node."""
    local_size = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)
    return max(1, len(os.sched_getaffinity(0)) // local_size)


def use_share_of_cores():
    """Size this rank's thread pool to its share of the cores, unless the launcher did (OMP_NUM_THREADS).

    Without it every rank starts one thread per core, and ranks on one machine
    oversubscribe the cores, which makes each step several times slower.
    """
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(cores_per_rank())


def data_loader_workers():
    """Data-loader worker processes for this rank, chosen from the cores it has.

    Where the accelerator computes on the host's cores (DeepSpeed's CPU
    accelerator), workers only compete with training for them: load in the
    training process. Otherwise feed the accelerator from up to 4 workers,
    leaving one core to the training process.
    """
    if get_accelerator().is_synchronized_device():
        return 0
    return min(4, cores_per_rank() - 1)


def allow_fp16(config):
    """Run fp16 where DeepSpeed's probe finds no fast fp16 kernels (most CPUs), and say when fp16 will be slow.

    DeepSpeed refuses fp16 when the accelerator reports no native support; the
    reference's default --dtype fp16 would then crash on a laptop CPU. PyTorch
    still computes fp16 there, so tell DeepSpeed to go ahead. Where the
    accelerator computes on the host's cores (DeepSpeed's CPU accelerator), fp16
    trains slower than fp32, with native fp16 kernels or without (1.5x and 11x
    measured, BENCHMARKS.md). Returns the one-line note for rank 0, or None.
    """
    accelerator = get_accelerator()
    if config_dtype(config) != "fp16":
        return None
    speed = "slower than fp32 (1.5x to 11x measured); pass --dtype fp32 to train faster"
    if not accelerator.is_fp16_supported():
        accelerator.is_fp16_supported = lambda: True
        return (f"note: DeepSpeed finds no native fp16 support on this {accelerator.device_name()}, so fp16 runs "
                f"as PyTorch emulates it: {speed}")
    if accelerator.is_synchronized_device():
        return f"note: fp16 on this {accelerator.device_name()} trains {speed}"
    return None


def read_offload(config):
    """Rewrite the MoE tutorial's "cpu_offload": true as DeepSpeed reads it (offload_optimizer, device cpu) and
    return rank 0's line on what ZeRO-Offload keeps on the host, or None when nothing is offloaded."""
    zero = config.get("zero_optimization", {})
    old_spelling = bool(zero.get("cpu_offload"))
    if old_spelling:
        offload_to_cpu(zero, parameters=False)
    places = {}
    for key, what in OFFLOADED.items():
        device = (zero.get(key) or {}).get("device", "none")
        if device != "none":
            places.setdefault(device, []).append(what)
    if not places:
        return None
    offloaded = "; ".join(f"{' and '.join(what)} on the {device}" for device, what in places.items())
    line = f"ZeRO-Offload: {offloaded} (ZeRO stage {zero.get('stage', 0)}"
    if config.get("fp16", {}).get("fp16_master_weights_and_grads"):
        line += ", fp16 master weights and gradients"
    line += ")"
    if old_spelling:
        line += '; the config\'s "cpu_offload": true, as DeepSpeed\'s MoE tutorial writes it, is offload_optimizer device cpu'
    return line


def start_distributed(timeout_minutes=None):
    """Join the process group a launcher set up (or a one-rank group), on this rank's device and cores.

    A collective that waits longer than `timeout_minutes` for a peer fails the
    run (DeepSpeed's default: 30 minutes). The timeout must reach every group:
    torch's new_group() gives a group torch's default, not the world group's,
    and DeepSpeed makes its own data- and expert-parallel groups.
    """
    use_single_process_defaults()
    use_share_of_cores()
    try:
        if timeout_minutes is None:
            deepspeed.init_distributed()
        else:
            timeout = datetime.timedelta(minutes=timeout_minutes)
            torch.distributed.distributed_c10d.default_pg_timeout = timeout
            deepspeed.init_distributed(timeout=timeout)
    except torch.distributed.DistNetworkError as e:
        if "EADDRINUSE" not in str(e):
            raise
        stop(port_in_use(), every_rank=True)
    get_accelerator().set_device(int(os.environ["LOCAL_RANK"]))
    release_shared_memory()


def port_in_use():
    """Rank 0's line when the port of the process group's rendezvous is taken, another run's most likely."""
    port, free = os.environ["MASTER_PORT"], free_port()
    return (f"port {port} of {os.environ.get('MASTER_ADDR')} is taken: in use by another run? Give this run a free "
            f"one: MASTER_PORT={free} (run_ds*.sh, python) or --master_port {free} (deepspeed, torchrun)")


def release_shared_memory():
    """Unlink this rank's DeepSpeed shared-memory all-reduce buffer, once every rank has mapped every buffer.

    On one node under DeepSpeed's launcher (LOCAL_SIZE = WORLD_SIZE), DeepSpeed's CPU comm op creates a
    66 MB /dev/shm segment per rank, named by MASTER_PORT, and never unlinks it: every launch left them in
    the host's memory until reboot, and they filled it. The mappings stay valid until the rank exits.
    """
    dist.barrier()  # every rank's shm_initialize has opened the others' segments
    name = (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{dist.get_rank()}")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name)


def initialize(args, config):
    """Seed, load the data (CIFAR-10 rank 0 first), build the Net and hand it to deepspeed.initialize.

    Returns the engine, its training data loader and the test set.
    """
    trainset, testset = load_data(args)

    if args.seed is not None:
        torch.manual_seed(args.seed)  # every rank builds the same Net: its experts start as one process's would
    net = Net(args)
    if args.init_from:
        init_from(net, args)
    if args.seed is not None and dist.get_rank():
        torch.manual_seed(args.seed + dist.get_rank())  # every other rank draws gate noise of its own
    parameters = filter(lambda p: p.requires_grad, net.parameters())
    if args.moe_param_group:
        parameters = create_moe_param_groups(net)

    model_engine, optimizer, trainloader, __ = deepspeed.initialize(
        args=args, model=net, model_parameters=parameters, training_data=trainset, collate_fn=collate_fn(trainset),
        config=config)
    scale_the_fp16_loss(model_engine)
    clip_by_the_global_norm(model_engine)
    if args.init_from and args.moe:
        ep_rank = groups._get_expert_parallel_rank(f"ep_size_{args.ep_world_size}")
        if ep_rank != dist.get_rank() % args.ep_world_size:  # init_from chose this rank's experts by that layout
            stop(f"--init-from: DeepSpeed made this rank expert-parallel rank {ep_rank}, not "
                 f"{dist.get_rank() % args.ep_world_size}: its experts would be another rank's", every_rank=True)
    sampler = trainloader.data_sampler
    trainloader.data_sampler = ResumableSampler(sampler.dataset, num_replicas=sampler.num_replicas, rank=sampler.rank)
    if args.seed is not None:
        trainloader.data_sampler.seed = args.seed  # the data order; DistributedSampler's default seed is 0
    # DeepSpeed's loader starts 2 workers per rank, whatever the cores; it reads this when each epoch begins.
    workers = 0 if args.data_path == "tensor" else data_loader_workers()  # gathering a batch is one indexing op
    trainloader.num_local_io_workers = workers if args.data_workers is None else args.data_workers
    return model_engine, trainloader, testset


EXPERT_PARAMETER = re.compile(r"moe_layer_list\.(\d+)\..*deepspeed_experts\.(\d+)\.")  # its layer, its index


def global_expert_name(name, ep_rank, ep_size, num_experts):
    """A parameter's name with its expert's local index made global: expert-parallel rank r of ep_size holds
    the experts r * per_rank + j as its j-th, per_rank = the layer's experts / ep_size. Other names are kept."""
    match = EXPERT_PARAMETER.search(name)
    if not match:
        return name
    per_rank = num_experts[int(match.group(1))] // ep_size
    return name.replace(f"deepspeed_experts.{match.group(2)}.",
                        f"deepspeed_experts.{ep_rank * per_rank + int(match.group(2))}.")


def init_from(net, args):
    """Load the weights of a model file (export_model.py) or a checkpoint into `net`, this rank taking its experts
    by global id; rank 0 says in one line what was carried. Before deepspeed.initialize, which partitions them
    under ZeRO-3 and makes the optimizer's masters from them."""
    import export_model  # beside this script; it imports this module, so not at the top
    if os.path.isdir(args.init_from):  # a checkpoint, exported on the fly
        state, source = export_model.export(args.init_from)["state_dict"], "checkpoint"
    else:
        try:
            state = torch.load(args.init_from, map_location="cpu", weights_only=True)["state_dict"]
            source = "model file"
        except Exception as e:  # torch.load raises many kinds; any of them means this is no model file
            stop(f"--init-from: {args.init_from} is neither a model file of export_model.py nor a checkpoint "
                 f"({type(e).__name__})")
    ep_rank = dist.get_rank() % args.ep_world_size if args.moe else 0  # DeepSpeed's expert groups: consecutive ranks
    local = net.state_dict()
    carried = {}
    for name, value in local.items():
        wanted = global_expert_name(name, ep_rank, args.ep_world_size, args.num_experts)
        if wanted in state and state[wanted].shape == value.shape:
            carried[name] = state[wanted]
    experts = {match.groups() for match in map(EXPERT_PARAMETER.search, state) if match}
    missing = sorted(set(local) - set(carried))
    if missing:
        stop(f"--init-from: {args.init_from} does not fit this Net: no weights of the right shape for "
             f"{', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}; give the model flags it was trained with")
    net.load_state_dict(carried, strict=True)
    if dist.get_rank() == 0:
        print(f"--init-from {args.init_from}: the weights of every layer carried over from the {source} "
              f"({len(state)} tensors, {len(experts)} experts, each rank taking its own by global id); the "
              f"optimizer and the LR schedule start fresh")


def scale_the_fp16_loss(model_engine):
    """Make backward in fp16 without ZeRO scale the loss by the loss scale, which the optimizer's step divides out.

    DeepSpeed's engine.backward scales the loss only for its ZeRO optimizers; FP16_Optimizer.step divides the
    gradients by the loss scale all the same. Every update was then computed from gradients 32768 times too
    small, clipping never acted, and small gradients were not kept from underflowing
    (deepspeedai/DeepSpeed#8393). A hook on the loss multiplies the gradient flowing back from it by the loss
    scale, unless DeepSpeed has already scaled it (a DeepSpeed with the fix), so the loss is scaled once.
    """
    if not model_engine.fp16_enabled() or model_engine.zero_optimization():
        return
    backward, scaler = model_engine.backward, model_engine.optimizer.loss_scale_config

    def scaled_backward(loss, *args, **kwargs):
        loss = loss.float()  # as FP16_Optimizer.backward scales it: the scale may pass fp16's largest number
        scaled = scaler.cur_scale / model_engine.gradient_accumulation_steps()
        loss.register_hook(lambda grad: torch.where(grad < scaled / 2, grad * scaler.cur_scale, grad))
        return backward(loss, *args, **kwargs)

    model_engine.backward = scaled_backward


def clip_by_the_global_norm(model_engine):
    """Make DeepSpeed's gradient clipping in fp32 without ZeRO clip by the global norm, and keep that norm.

    DeepSpeed clips that path (engine.clip_fp32_gradients) with runtime.utils.clip_grad_norm_, which
    averages each rank's norm over the data-parallel group: right only while every rank holds the same
    parameters. With expert parallelism each rank holds other experts, so the norm, and every clipped step,
    come out wrong (deepspeedai/DeepSpeed#8475); that path also keeps no norm for get_global_grad_norm().
    Here the norm is the non-expert gradients' (equal on every rank after the all-reduce) with the expert
    gradients' squares summed over their expert-parallel group, each expert counted once: one process's.
    """
    def clip_fp32_gradients():
        grads = {}
        for p in model_engine.module.parameters():
            if p.grad is not None:
                grads.setdefault(p.group_name if is_moe_param(p) else None, []).append(p.grad)
        squares = [get_global_norm_of_tensors(tensors, mpu=model_engine.mpu,
                                              moe_ep_group=name and groups._get_expert_parallel_group(name)) ** 2
                   for name, tensors in grads.items()]
        norm = torch.stack(squares).sum().sqrt()
        model_engine._global_grad_norm = norm
        clip_tensors_by_global_norm([g for tensors in grads.values() for g in tensors],
                                    model_engine.gradient_clipping(), norm)

    model_engine.clip_fp32_gradients = clip_fp32_gradients


def input_dtype(model_engine):
    """The dtype to cast inputs to: the engine's bf16 or fp16, or None in fp32."""
    if model_engine.bfloat16_enabled():
        return torch.bfloat16
    if model_engine.fp16_enabled():
        return torch.half
    return None


def compile_model(model_engine, args):
    """Compile the model through DeepSpeed's engine.compile() with the accelerator's backend (inductor on CPU and
    CUDA), or say in one line why it cannot and train eagerly. Rank 0 says which, before training.

    A one-op function is compiled first: it fails at once where the machine
    cannot compile (inductor needs a C++ compiler on a CPU, Triton on a GPU).
    Random ops in the compiled model draw PyTorch's eager numbers (inductor's
    fallback_random), so a seeded run's gate noise and trace match eager training.
    DeepSpeed's MoE gate reads the expert capacity on the host, where the graph
    breaks and that part runs eagerly; the line says so, and dynamo's own
    multi-line note of it is kept quiet.
    """
    backend = get_accelerator().get_compile_backend()
    device = get_accelerator().device_name(model_engine.local_rank)
    try:
        torch.compile(lambda x: x + 1, backend=backend)(torch.zeros(2, device=device))
    except Exception as e:  # the backend's compiler is missing or broken: any error means eager training
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        line = f"--compile: cannot compile on this machine ({backend}: {reason}); training eagerly"
    else:
        torch._inductor.config.fallback_random = True
        logging.getLogger("torch._dynamo").setLevel(logging.ERROR)
        model_engine.compile(backend=backend)
        breaks = "; the MoE gate's capacity, read on the host, runs eagerly between compiled parts" if args.moe else ""
        line = f"--compile: the model is compiled with torch.compile ({backend}) as its first steps run{breaks}"
    if dist.get_rank() == 0:
        print(line, flush=True)


def can_shard_eval(args, model_engine):
    """Whether each rank may evaluate its own share of the test set (see count_correct)."""
    return not (args.moe and args.ep_world_size > 1) and model_engine.zero_optimization_stage() < 3


def add_monitors(config, args):
    """DeepSpeed's CSV and TensorBoard monitors, as asked: each gets every series the run writes (job cifar10)."""
    for key, folder in (("csv_monitor", args.metrics_dir), ("tensorboard", args.tensorboard_dir)):
        if folder:
            config[key] = {"enabled": True, "output_path": folder, "job_name": "cifar10"}


@contextlib.contextmanager
def stop_if_a_peer_is_lost():
    """End this rank with one line when a collective fails because another rank died or stopped answering.

    The backend raises from the next collective: gloo a RuntimeError from its
    transport (a peer's closed connection, or --dist-timeout passing), NCCL a
    DistBackendError. Each rank that sees it says so in one line and exits.
    """
    try:
        yield
    except RuntimeError as e:
        if not (isinstance(e, torch.distributed.DistError) or "gloo" in str(e)):
            raise
        reason = re.split(r"\.\s", re.sub(r"^\[[^]]*\]\s*", "", str(e).strip().splitlines()[0]))[0]
        stop(f"lost another rank ({reason}): it died or stopped answering, so this rank stops too; see that rank's "
             f"log for why. A run with --save-dir continues from its last finished epoch with --resume.",
             every_rank=True)


def main(args):
    config, config_note = load_ds_config(args)
    rank = int(os.environ.get("RANK", 0))
    reason = check_args(args, config, world_size=int(os.environ.get("WORLD_SIZE", 1)))
    if reason:
        print(f"cifar10_deepspeed.py: error: {reason}", file=sys.stderr)
        sys.exit(2)
    gpu_problem = unusable_gpu()
    if gpu_problem:
        stop(gpu_problem)
    if rank == 0:
        print(accelerator_line())
    fp16_note = allow_fp16(config)
    for note in (config_note, fp16_note, read_offload(config)):
        if note and rank == 0:
            print(note)
    args.deepspeed_config = None  # the file is read into `config`; DeepSpeed refuses a config given twice
    add_monitors(config, args)

    start_distributed(args.dist_timeout)
    model_engine, trainloader, testset = initialize(args, config)
    local_device = get_accelerator().device_name(model_engine.local_rank)
    target_dtype = input_dtype(model_engine)

    if args.compile:
        compile_model(model_engine, args)

    start = resume(model_engine, args) if args.resume else Position()
    with stop_if_a_peer_is_lost():
        train(model_engine, trainloader, testset, args, start)
        if dist.get_rank() == 0:
            print("Finished Training")

        accuracy = test(model_engine, testset, local_device, target_dtype, shard=can_shard_eval(args, model_engine))
    model_engine.monitor.write_events([("Eval/accuracy", 100 * accuracy, model_engine.global_samples)])
    dist.destroy_process_group()


if __name__ == "__main__":
    main(add_argument())
    leave(0)
