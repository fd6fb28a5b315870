"""Classify images with a model file from export_model.py, or evaluate it on CIFAR-10's test set: one process.

    python predict.py model.pt cat.png dog.jpg          # the class and its probability, one line per image
    python predict.py model.pt photo.jpg --top-k 3      # the 3 likeliest classes
    python predict.py model.pt --test-set               # the reference's accuracy lines
"""

import argparse
import contextlib
import os
import signal
import sys

with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed logs to the stdout it finds at import: stdout keeps the answers
    import deepspeed
import torch
from deepspeed.accelerator import get_accelerator
from PIL import Image, UnidentifiedImageError

from cifar10_deepspeed import Net, test
from cifar10ds import data, fixes, launch, machine, model_files


def load_model(path, device, keep_every_token=False):
    """The Net a model file holds, in evaluation mode on `device`: built from the flags saved with it. With
    keep_every_token its MoE layers route every token, past their capacity too, so each image's answer is its own:
    DeepSpeed's gate drops the tokens over an expert's capacity (chosen at random), whose output is then zero."""
    try:
        exported = model_files.read_model_file(path)
    except model_files.ModelFileError as e:
        machine.stop(f"predict.py: error: {e}")
    net = model_files.build_net(Net, {**exported["model"], "drop_tokens": False} if keep_every_token
                                else exported["model"])
    if net.moe:  # DeepSpeed's MoE layers route through an expert group, here of one process
        start_one_process()
        with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed prints the group it makes: stdout keeps the answers
            for layer in net.moe_layer_list:
                layer.set_deepspeed_parallelism()
    net.load_state_dict(exported["state_dict"], strict=True)
    return net.to(device).eval()


def start_one_process():
    """A process group of this one process, which DeepSpeed's MoE layers and test() talk to: without DeepSpeed's
    shared-memory all-reduce, which it would otherwise compile on a first run (fixes.py)."""
    if not deepspeed.comm.is_initialized():
        launch.use_single_process_defaults()
        fixes.skip_the_shared_memory_all_reduce()
        deepspeed.init_distributed()


def read_image(path):
    """An image file as the 32x32 RGB uint8 array the Net was trained on: any size, resized (antialiased)."""
    try:
        with Image.open(path) as image:
            if image.mode == "P":  # a palette, often with transparent entries, of which PIL warns straight to RGB
                image = image.convert("RGBA")
            image = image.convert("RGB").resize((32, 32), Image.BICUBIC)
    except (OSError, UnidentifiedImageError) as e:
        machine.stop(f"predict.py: error: cannot read {path} as an image: {e}")
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
    if not 1 <= args.top_k <= len(data.CLASSES):
        parser.error(f"--top-k must be between 1 and {len(data.CLASSES)}")
    if os.path.isdir(args.model):  # a checkpoint, most likely: the tool that makes a model file of it
        machine.stop(f"predict.py: error: {args.model} is a directory, not a model file: make one of a checkpoint "
                     f"with python export_model.py {args.model} -o model.pt")
    if not os.path.isfile(args.model):
        machine.stop(f"predict.py: error: no model file {args.model}")

    device = get_accelerator().device_name()
    net = load_model(args.model, device, keep_every_token=not args.test_set)
    if args.test_set:  # as the run's test() evaluated: the tokens its gate dropped dropped too, the same ones each time
        torch.manual_seed(0)
        start_one_process()
        try:
            testset = data.test_set(args)
        except (OSError, RuntimeError) as e:
            machine.stop(data.not_downloaded(args, e))
        test(net, testset, device, None)
        return
    images = torch.stack([read_image(path) for path in args.images])
    with torch.no_grad():
        probabilities = net(data.to_inputs(images, device)).softmax(dim=1).cpu()
    for path, p in zip(args.images, probabilities):
        best = p.topk(args.top_k)
        print(f"{path}: " + ", ".join(f"{data.CLASSES[i]} {100 * v:.1f} %" for v, i in zip(best.values, best.indices)))


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # a reader that stops early (| head) ends it quietly, as it ends cat
    with machine.exit_without_teardown(after_ctrl_c=None):
        main()
