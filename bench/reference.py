"""The reference, re-created from ../shared/REFERENCE.md for timing it beside the script: not DeepSpeed's file.

    deepspeed --num_gpus 1 --bind_cores_to_rank bench/reference.py --deepspeed --dtype fp32 [-e 1]
    deepspeed --num_gpus 2 --bind_cores_to_rank bench/reference.py --deepspeed --dtype fp32 --moe --ep-world-size 2 \
        --num-experts 2 --top-k 1 --noisy-gate-policy RSample --moe-param-group --log-interval 100

What the reference's step costs, as REFERENCE.md describes it: its config (DeepSpeed's own Adam, built as an op on
a first run), torchvision's per-image ToTensor and Normalize, DeepSpeed's training loader with its default workers,
`loss.item()` every step, the same order every epoch, launcher only. Its Net is the reference's, with MoE keeping
only each layer's output. The images are the script's synthetic set (--train-size of them), items made as
torchvision's CIFAR10 makes them (a PIL image, then the transform), since CIFAR-10 cannot be downloaded here.
bench/throughput.py --whole-run times it beside the script.
"""

import argparse
import contextlib
import os
import sys

import deepspeed
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as transforms
from deepspeed.accelerator import get_accelerator
from deepspeed.moe.layer import MoE
from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cifar10ds.data import CLASSES, SyntheticCIFAR10  # noqa: E402


def add_argument():
    parser = argparse.ArgumentParser(description="CIFAR")
    parser.add_argument("-e", "--epochs", default=30, type=int)
    parser.add_argument("--local_rank", type=int, default=-1)
    parser.add_argument("--log-interval", type=int, default=2000)
    parser.add_argument("--dtype", default="fp16", type=str, choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--stage", default=0, type=int, choices=[0, 1, 2, 3])
    parser.add_argument("--moe", default=False, action="store_true")
    parser.add_argument("--ep-world-size", default=1, type=int)
    parser.add_argument("--num-experts", type=int, nargs="+", default=[1])
    parser.add_argument("--mlp-type", type=str, default="standard")
    parser.add_argument("--top-k", default=1, type=int)
    parser.add_argument("--min-capacity", default=0, type=int)
    parser.add_argument("--noisy-gate-policy", default=None, type=str)
    parser.add_argument("--moe-param-group", default=False, action="store_true")
    parser.add_argument("--train-size", default=50000, type=int, help="synthetic training images (not the reference's)")
    parser.add_argument("--test-size", default=10000, type=int, help="synthetic test images (not the reference's)")
    parser = deepspeed.add_config_arguments(parser)
    return parser.parse_args()


def create_moe_param_groups(model):
    parameters = {"params": [p for p in model.parameters()], "name": "parameters"}
    return split_params_into_different_moe_groups_for_optimizer(parameters)


def get_ds_config(args):
    return {
        "train_batch_size": 16,
        "steps_per_print": 2000,
        "optimizer": {"type": "Adam",
                      "params": {"lr": 0.001, "betas": [0.8, 0.999], "eps": 1e-8, "weight_decay": 3e-7}},
        "scheduler": {"type": "WarmupLR",
                      "params": {"warmup_min_lr": 0, "warmup_max_lr": 0.001, "warmup_num_steps": 1000}},
        "gradient_clipping": 1.0,
        "prescale_gradients": False,
        "bf16": {"enabled": args.dtype == "bf16"},
        "fp16": {"enabled": args.dtype == "fp16", "fp16_master_weights_and_grads": False, "loss_scale": 0,
                 "loss_scale_window": 500, "hysteresis": 2, "min_loss_scale": 1, "initial_scale_power": 15},
        "wall_clock_breakdown": False,
        "zero_optimization": {"stage": args.stage, "allgather_partitions": True, "reduce_scatter": True,
                              "allgather_bucket_size": 50000000, "reduce_bucket_size": 50000000,
                              "overlap_comm": True, "contiguous_gradients": True, "cpu_offload": False},
    }


class Net(nn.Module):
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
                MoE(hidden_size=84, expert=expert, num_experts=n, ep_size=args.ep_world_size,
                    use_residual=args.mlp_type == "residual", k=args.top_k, min_capacity=args.min_capacity,
                    noisy_gate_policy=args.noisy_gate_policy)
                for n in args.num_experts])
            self.fc4 = nn.Linear(84, 10)
        else:
            self.fc3 = nn.Linear(84, 10)

    def forward(self, x):
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        if self.moe:
            for layer in self.moe_layer_list:
                x, _, _ = layer(x)
            return self.fc4(x)
        return self.fc3(x)


def test(model_engine, testset, local_device, target_dtype, test_batch_size=4):
    testloader = torch.utils.data.DataLoader(testset, batch_size=test_batch_size, shuffle=False, num_workers=0)
    correct, total = 0, 0
    class_correct, class_total = [0.0] * 10, [0.0] * 10
    model_engine.eval()
    with torch.no_grad():
        for images, labels in testloader:
            if target_dtype is not None:
                images = images.to(target_dtype)
            outputs = model_engine(images.to(local_device))
            _, predicted = torch.max(outputs.data, 1)
            total += labels.size(0)
            correct += (predicted == labels.to(local_device)).sum().item()
            c = (predicted == labels.to(local_device)).squeeze()
            for i in range(len(labels)):
                class_correct[labels[i]] += c[i].item()
                class_total[labels[i]] += 1
    if model_engine.local_rank == 0:
        print(f"Accuracy of the network on the {total} test images: {100 * correct / total : .0f} %")
        for i in range(10):
            if class_total[i]:
                print(f"Accuracy of {CLASSES[i] : >5s} : {100 * class_correct[i] / class_total[i] : 2.0f} %")


def main(args):
    # Step1. Data Preparation.
    deepspeed.init_distributed()
    get_accelerator().set_device(int(os.environ["LOCAL_RANK"]))
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])
    if torch.distributed.get_rank() != 0:
        torch.distributed.barrier()
    trainset = SyntheticCIFAR10(args.train_size, train=True, transform=transform)
    testset = SyntheticCIFAR10(args.test_size, train=False, transform=transform)
    if torch.distributed.get_rank() == 0:
        torch.distributed.barrier()
    # Not the reference's: the name of DeepSpeed's shared-memory all-reduce buffer (CPU, one node), which every rank
    # has mapped by now, goes; the run would leave it in /dev/shm (66 MB a rank).
    with contextlib.suppress(FileNotFoundError):
        os.unlink(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ['MASTER_ADDR']}_"
                  f"{os.environ['MASTER_PORT']}_{torch.distributed.get_rank()}")

    # Step 2. Define the network with DeepSpeed.
    net = Net(args)
    parameters = filter(lambda p: p.requires_grad, net.parameters())
    if args.moe_param_group:
        parameters = create_moe_param_groups(net)
    model_engine, optimizer, trainloader, __ = deepspeed.initialize(
        args=args, model=net, model_parameters=parameters, training_data=trainset, config=get_ds_config(args))
    local_device = get_accelerator().device_name(model_engine.local_rank)
    local_rank = model_engine.local_rank
    target_dtype = {"bf16": torch.bfloat16, "fp16": torch.half}.get(args.dtype)

    # Step 3. Train the network.
    criterion = nn.CrossEntropyLoss()
    for epoch in range(args.epochs):
        running_loss = 0.0
        for i, data in enumerate(trainloader):
            inputs, labels = data[0].to(local_device), data[1].to(local_device)
            if target_dtype is not None:
                inputs = inputs.to(target_dtype)
            outputs = model_engine(inputs)
            loss = criterion(outputs, labels)
            model_engine.backward(loss)
            model_engine.step()
            running_loss += loss.item()
            if local_rank == 0 and i % args.log_interval == (args.log_interval - 1):
                print(f"[{epoch + 1 : d}, {i + 1 : 5d}] loss: {running_loss / args.log_interval : .3f}")
                running_loss = 0.0
    print("Finished Training")

    # Step 4. Test the network on the test data.
    test(model_engine, testset, local_device, target_dtype)


if __name__ == "__main__":
    main(add_argument())
