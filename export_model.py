"""One plain model file from a checkpoint of cifar10_deepspeed.py: no engine, no process group, no launcher.

    python export_model.py ckpt -o model.pt          # a --save-dir: the checkpoint its 'latest' names
    python export_model.py ckpt/epoch3 -o model.pt   # one checkpoint

The file holds the Net's state_dict at expert-parallel size 1 under the reference's module names (every
expert taken from its expert-parallel rank's file by its global id), in fp32; the flags that build the
Net; and what it was exported from. `torch.load(path, weights_only=True)` reads it; predict.py evaluates it.
"""

import argparse
import os

import torch

from cifar10_deepspeed import Net
from cifar10ds import machine, model_files


def main():
    parser = argparse.ArgumentParser(prog="export_model.py", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a --save-dir (its newest checkpoint) or one checkpoint directory")
    parser.add_argument("-o", "--output", required=True, help="the model file to write")
    args = parser.parse_args()
    try:
        exported = model_files.export(args.checkpoint, Net)
    except model_files.ModelFileError as e:
        machine.stop(f"export_model.py: error: {e}")
    try:
        model_files.write_whole(args.output, lambda partial: torch.save(exported, partial))
    except Exception as e:  # OSError, or torch's RuntimeError on a full disk
        machine.stop(f"export_model.py: error: could not write {args.output} "
                     f"({machine.why_not_written(e, os.path.dirname(os.path.abspath(args.output)))}); nothing written")
    origin = exported["exported_from"]
    print(f"Exported {origin['checkpoint']} ({origin['dtype']}, ZeRO {origin['zero_stage']}, world "
          f"{origin['world_size']}, EP {origin['ep_world_size'] or 1}) to {args.output}: {origin['weights']}")


if __name__ == "__main__":
    main()
