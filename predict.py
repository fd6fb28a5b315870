"""Classify images with a model file from export_model.py, or evaluate it on CIFAR-10's test set: one process.

    python predict.py model.pt cat.png dog.jpg          # the class and its probability, one line per image
    python predict.py model.pt photo.jpg --top-k 3      # the 3 likeliest classes
    python predict.py model.pt --test-set               # the reference's accuracy lines
"""

import argparse
import os
import pickle
import sys

import torch
from deepspeed.accelerator import get_accelerator
from PIL import Image, UnidentifiedImageError

import cifar10_deepspeed
from cifar10_deepspeed import CLASSES, Net, add_argument, model_argv


def fail(message):
    print(f"predict.py: error: {message}", file=sys.stderr)
    sys.exit(1)


def load_model(path, device):
    """The Net a model file holds, in evaluation mode on `device`."""
    try:
        exported = torch.load(path, map_location="cpu", weights_only=True)
        flags, state = exported["model"], exported["state_dict"]
    except (OSError, RuntimeError, KeyError, TypeError, EOFError, pickle.UnpicklingError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else "no reason given"
        fail(f"{path} is not a model file of export_model.py ({type(e).__name__}: {reason})")
    net = Net(add_argument(model_argv(flags)))
    if flags["moe"]:
        cifar10_deepspeed.start_distributed()  # DeepSpeed's MoE layers route through an expert group, here of one
        for layer in net.moe_layer_list:
            layer.set_deepspeed_parallelism()
    net.load_state_dict(state, strict=True)
    return net.to(device).eval()


def read_image(path):
    """An image file as the 32x32 RGB uint8 array the Net was trained on: any size, resized (antialiased)."""
    try:
        with Image.open(path) as image:
            image = image.convert("RGB").resize((32, 32), Image.BICUBIC)
    except (OSError, UnidentifiedImageError) as e:
        fail(f"cannot read {path} as an image: {e}")
    return torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(32, 32, 3)


def main():
    parser = argparse.ArgumentParser(prog="predict.py", description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a model file written by export_model.py")
    parser.add_argument("images", nargs="*", help="PNG or JPEG files, any size")
    parser.add_argument("--top-k", type=int, default=1, help="print the K likeliest classes (default: 1)")
    parser.add_argument("--test-set", action="store_true", help="evaluate on the test set instead")
    parser.add_argument("--dataset", default="cifar10", choices=["cifar10", "synthetic"],
                        help="the test set: CIFAR-10 (default) or the training script's synthetic set")
    parser.add_argument("--data-dir", default="./data", help="where CIFAR-10 is, or is downloaded to")
    parser.add_argument("--synthetic-test-size", default=1000, type=int, help="synthetic test images (default: 1000)")
    args = parser.parse_args()
    if not args.test_set and not args.images:
        parser.error("give image files, or --test-set")
    if not 1 <= args.top_k <= len(CLASSES):
        parser.error(f"--top-k must be between 1 and {len(CLASSES)}")
    if not os.path.isfile(args.model):
        fail(f"no model file {args.model}")

    device = get_accelerator().device_name()
    net = load_model(args.model, device)
    if args.test_set:
        cifar10_deepspeed.start_distributed()  # test() sums its counts over the ranks: here one
        data = add_argument(["--dataset", args.dataset, "--data-dir", args.data_dir, "--synthetic-test-size",
                             str(args.synthetic_test_size), "--synthetic-train-size", "1"])
        _, testset = cifar10_deepspeed.load_data(data)  # downloads CIFAR-10 if missing, or says why not
        cifar10_deepspeed.test(net, testset, device, None)
        return
    images = torch.stack([read_image(path) for path in args.images])
    with torch.no_grad():
        probabilities = net(cifar10_deepspeed.to_inputs(images, device, None)).softmax(dim=1).cpu()
    for path, p in zip(args.images, probabilities):
        best = p.topk(args.top_k)
        print(f"{path}: " + ", ".join(f"{CLASSES[i]} {100 * v:.1f} %" for v, i in zip(best.values, best.indices)))


if __name__ == "__main__":
    main()
    cifar10_deepspeed.leave(0)  # gloo's threads can abort a finalizing interpreter (see the training script)
