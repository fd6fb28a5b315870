"""Measure the MoE levers on the synthetic data: dense vs MoE with each lever, side by side.

    python bench/moe_levers.py [--epochs 3] [--seed 0]

Each row is one run of cifar10_deepspeed.py (one CPU rank, fp32, 2 experts, EP 1).
Prints a Markdown table: final test accuracy, and the busiest expert's share of
tokens and the share of token assignments dropped over the first and the last
log interval, and on the test set.
"""

import argparse
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MOE = ["--moe", "--num-experts", "2"]
RUNS = [
    ("dense", []),
    ("MoE, no gate noise (reference default)", MOE),
    ("MoE, RSample noise", MOE + ["--noisy-gate-policy", "RSample"]),
    ("MoE, aux loss 0.01", MOE + ["--moe-aux-loss-coef", "0.01"]),
    ("MoE, capacity factor 2", MOE + ["--capacity-factor", "2"]),
    ("MoE, --no-drop-tokens", MOE + ["--no-drop-tokens"]),
    ("MoE, capacity factor 2 + aux loss 0.01", MOE + ["--capacity-factor", "2", "--moe-aux-loss-coef", "0.01"]),
    ("MoE, RSample + aux loss 0.01", MOE + ["--noisy-gate-policy", "RSample", "--moe-aux-loss-coef", "0.01"]),
]


def run(flags, epochs, seed):
    cmd = [sys.executable, os.path.join(ROOT, "cifar10_deepspeed.py"), "--deepspeed", "--dataset", "synthetic",
           "--dtype", "fp32", "-e", str(epochs), "--log-interval", "100", "--seed", str(seed), *flags]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    accuracy = re.search(r"^Accuracy of the network on the \d+ test images:  (\d+) %$", out, re.M).group(1)
    loads = [(max(sent.split(), key=lambda share: int(share.rstrip("%"))), dropped) for sent, dropped in
             re.findall(r"\] expert load: layer 0: sent ([\d% ]+), fill .*, dropped ([\d.]+%), ", out)]
    tested = re.search(r"^Token assignments dropped on the test images .*: layer 0 ([\d.]+%)$", out, re.M)
    return accuracy, loads, tested.group(1) if tested else "-"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"| run ({args.epochs} epochs, seed {args.seed}) | test accuracy | busiest expert: first interval | last "
          "interval | dropped: first interval | last interval | test set |")
    print("| --- " * 7 + "|")
    for name, flags in RUNS:
        accuracy, loads, tested = run(flags, args.epochs, args.seed)
        first, last = (loads[0], loads[-1]) if loads else (("-", "-"), ("-", "-"))
        print(f"| {name} | {accuracy}% | {first[0]} | {last[0]} | {first[1]} | {last[1]} | {tested} |", flush=True)


if __name__ == "__main__":
    main()
