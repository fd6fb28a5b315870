"""Train a small CNN on CIFAR-10 with DeepSpeed, dense or Mixture of Experts.

A port of the CIFAR-10 example in DeepSpeed's examples collection. Launch it
with DeepSpeed's launcher, torchrun, or plain python (one process):

    deepspeed --num_gpus=2 cifar10_deepspeed.py --deepspeed --moe --ep-world-size 2 --num-experts 2
    torchrun --nproc_per_node 2 cifar10_deepspeed.py --deepspeed
    python cifar10_deepspeed.py --deepspeed --dataset synthetic --dtype fp32
"""

import argparse
import json
import os
import socket
import sys

import deepspeed
import deepspeed.comm as dist
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import torchvision.transforms as transforms
from deepspeed.accelerator import get_accelerator
from deepspeed.moe.layer import MoE
from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
from PIL import Image

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
    parser.add_argument("--seed", default=None, type=int,
                        help="seed for model init and gate noise; each rank adds its rank (default: unseeded)")

    return deepspeed.add_config_arguments(parser)


def noisy_gate_policy(value):
    if value == "None":
        return None
    if value not in ("RSample", "Jitter"):
        raise argparse.ArgumentTypeError(f"invalid choice: {value!r} (choose from 'None', 'RSample', 'Jitter')")
    return value


def add_argument(argv=None):
    return build_parser().parse_args(argv)


def get_ds_config(args):
    """The reference's DeepSpeed config; --dtype and --stage pick precision and ZeRO stage."""
    dtype = args.dtype or "fp16"
    return {
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


def config_dtype(config):
    if config.get("bf16", config.get("bfloat16", {})).get("enabled"):
        return "bf16"
    return "fp16" if config.get("fp16", {}).get("enabled") else "fp32"


def load_ds_config(args):
    """The config to train with, and a line saying where its dtype and stage came from.

    Without --deepspeed_config it is get_ds_config(args). With a file, the file is
    the config, and --dtype / --stage, when given, override its values.
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
    if config.get("fp16", {}).get("enabled") and config.get("bf16", config.get("bfloat16", {})).get("enabled"):
        return "the DeepSpeed config enables both fp16 and bf16; enable one"
    if not args.moe:
        return None
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
    """LeNet-style CNN; with --moe its last hidden layer feeds one DeepSpeed MoE layer per --num-experts entry."""

    def __init__(self, args):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.moe = args.moe
        if self.moe:
            self.moe_layers = nn.ModuleList([
                MoE(hidden_size=84,
                    expert=nn.Linear(84, 84),
                    num_experts=n,
                    ep_size=args.ep_world_size,
                    use_residual=args.mlp_type == "residual",
                    k=args.top_k,
                    min_capacity=args.min_capacity,
                    noisy_gate_policy=args.noisy_gate_policy) for n in args.num_experts
            ])
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
        for layer in self.moe_layers:
            x, _, _ = layer(x)  # output, gate aux loss, expert counts
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


def load_datasets(args, download):
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])
    if args.dataset == "synthetic":
        return (SyntheticCIFAR10(args.synthetic_train_size, train=True, transform=transform),
                SyntheticCIFAR10(args.synthetic_test_size, train=False, transform=transform))
    return (torchvision.datasets.CIFAR10(root=args.data_dir, train=True, download=download, transform=transform),
            torchvision.datasets.CIFAR10(root=args.data_dir, train=False, download=download, transform=transform))


def load_data_rank_zero_first(args):
    """Rank 0 loads (and downloads) first while the others wait; a failure stops every rank."""
    rank = dist.get_rank()
    if rank != 0:
        dist.barrier()
    error = [None]
    if rank == 0:
        try:
            datasets = load_datasets(args, download=True)
        except (OSError, RuntimeError) as e:
            error[0] = (f"error: CIFAR-10 is not in {args.data_dir} and could not be downloaded ({e}). "
                        f"Place {CIFAR10_ARCHIVE} (from {CIFAR10_URL}) in {args.data_dir}, "
                        f"or train offline on generated data with --dataset synthetic.")
        dist.barrier()
    dist.broadcast_object_list(error, src=0)
    if error[0]:
        if int(os.environ.get("LOCAL_RANK", 0)) == 0:
            print(error[0], file=sys.stderr, flush=True)
        sys.exit(1)
    if rank != 0:
        datasets = load_datasets(args, download=False)
    return datasets


def test(model_engine, testset, local_device, target_dtype, test_batch_size=4):
    """Overall and per-class accuracy on the test set, printed by rank 0.

    Every rank runs the whole test set: expert-parallel MoE layers exchange
    tokens between ranks, so all ranks must run every forward pass.
    """
    testloader = torch.utils.data.DataLoader(testset, batch_size=test_batch_size, shuffle=False)
    class_correct = torch.zeros(len(CLASSES), dtype=torch.long, device=local_device)
    class_total = torch.zeros(len(CLASSES), dtype=torch.long, device=local_device)
    model_engine.eval()
    with torch.no_grad():
        for images, labels in testloader:
            images, labels = images.to(local_device), labels.to(local_device)
            if target_dtype is not None:
                images = images.to(target_dtype)
            predicted = model_engine(images).argmax(dim=1)
            class_total += torch.bincount(labels, minlength=len(CLASSES))
            class_correct += torch.bincount(labels[predicted == labels], minlength=len(CLASSES))
    model_engine.train()
    class_correct, class_total = class_correct.tolist(), class_total.tolist()
    if dist.get_rank() == 0:
        total = sum(class_total)
        print(f"Accuracy of the network on the {total} test images: {100 * sum(class_correct) // total} %")
        for name, correct, count in zip(CLASSES, class_correct, class_total):
            if count:
                print(f"Accuracy of {name:5s} : {100 * correct / count:2.0f} %")
            else:
                print(f"Accuracy of {name:5s} : n/a (no test images)")
    return sum(class_correct) / sum(class_total)


def train(model_engine, trainloader, epochs, log_interval, local_device, target_dtype):
    """The reference's loop; rank 0 prints the mean loss of every log_interval mini-batches."""
    criterion = nn.CrossEntropyLoss()
    for epoch in range(epochs):
        trainloader.data_sampler.set_epoch(epoch)  # a new order every epoch
        running_loss = torch.zeros((), device=local_device)  # on the device: read only at log intervals
        for i, (inputs, labels) in enumerate(trainloader):
            inputs, labels = inputs.to(local_device), labels.to(local_device)
            if target_dtype is not None:
                inputs = inputs.to(target_dtype)
            outputs = model_engine(inputs)
            loss = criterion(outputs, labels)
            model_engine.backward(loss)
            model_engine.step()
            running_loss += loss.detach().float()
            if i % log_interval == log_interval - 1:
                if dist.get_rank() == 0:
                    print(f"[{epoch + 1}, {i + 1:5d}] loss: {running_loss.item() / log_interval:.3f}")
                running_loss.zero_()


def use_single_process_defaults():
    """Let `python cifar10_deepspeed.py` run as one rank: fill in what a launcher would set."""
    if "RANK" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for name, value in dict(RANK=0, LOCAL_RANK=0, WORLD_SIZE=1, LOCAL_SIZE=1, MASTER_ADDR="127.0.0.1",
                            MASTER_PORT=port).items():
        os.environ.setdefault(name, str(value))


def use_share_of_cores():
    """Size this rank's thread pool to its share of the cores, unless the launcher did (OMP_NUM_THREADS).

    Without it every rank starts one thread per core, and ranks on one machine
    oversubscribe the cores, which makes each step several times slower.
    """
    if "OMP_NUM_THREADS" in os.environ:
        return
    local_size = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // local_size))


def allow_emulated_fp16(config):
    """Run fp16 where DeepSpeed's probe finds no fast fp16 kernels (most CPUs) but PyTorch computes it.

    DeepSpeed refuses fp16 when the accelerator reports no native support; the
    reference's default --dtype fp16 would then crash on a laptop CPU. PyTorch
    still computes fp16 there (more slowly), so tell DeepSpeed to go ahead and
    say so. Returns that note, or None when nothing was changed.
    """
    accelerator = get_accelerator()
    if config_dtype(config) != "fp16" or accelerator.is_fp16_supported():
        return None
    accelerator.is_fp16_supported = lambda: True
    return (f"note: DeepSpeed finds no native fp16 support on this {accelerator.device_name()}; "
            "running fp16 as PyTorch emulates it (slower than --dtype bf16 or fp32)")


def main(args):
    config, config_note = load_ds_config(args)
    rank = int(os.environ.get("RANK", 0))
    reason = check_args(args, config, world_size=int(os.environ.get("WORLD_SIZE", 1)))
    if reason:
        print(f"cifar10_deepspeed.py: error: {reason}", file=sys.stderr)
        sys.exit(2)
    fp16_note = allow_emulated_fp16(config)
    for note in (config_note, fp16_note):
        if note and rank == 0:
            print(note)
    args.deepspeed_config = None  # the file is read into `config`; DeepSpeed refuses a config given twice

    use_single_process_defaults()
    use_share_of_cores()
    deepspeed.init_distributed()
    local_rank = int(os.environ["LOCAL_RANK"])
    get_accelerator().set_device(local_rank)
    if args.seed is not None:
        torch.manual_seed(args.seed + dist.get_rank())

    trainset, testset = load_data_rank_zero_first(args)

    net = Net(args)
    parameters = filter(lambda p: p.requires_grad, net.parameters())
    if args.moe_param_group:
        parameters = create_moe_param_groups(net)

    model_engine, optimizer, trainloader, __ = deepspeed.initialize(
        args=args, model=net, model_parameters=parameters, training_data=trainset, config=config)

    local_device = get_accelerator().device_name(model_engine.local_rank)
    target_dtype = None
    if model_engine.bfloat16_enabled():
        target_dtype = torch.bfloat16
    elif model_engine.fp16_enabled():
        target_dtype = torch.half

    train(model_engine, trainloader, args.epochs, args.log_interval, local_device, target_dtype)
    if dist.get_rank() == 0:
        print("Finished Training")

    test(model_engine, testset, local_device, target_dtype)


if __name__ == "__main__":
    main(add_argument())
