"""ZeRO-Offload: throughput and peak memory with and without --offload cpu, side by side.

    python bench/offload.py [--rounds 2] [--epochs 1]

Runs every configuration once per round, rounds interleaved so that the
machine's drift hits them alike, on the synthetic data. For each it reports
the samples per second (bench/throughput.py's measure: median over rounds of
the mean over log intervals after the first), rank 0's peak accelerator memory
as the script prints it on its throughput lines (on a GPU: the GPU memory
PyTorch allocated; on DeepSpeed's CPU accelerator: the process's resident
memory), and the peak resident host memory of the largest process (a rank),
which offloading raises where it lowers the accelerator's. Prints a Markdown
table with the ratios of each offloaded row to the row before it.
"""

import argparse
import os
import re
import statistics
import sys

from throughput import LOG_INTERVAL, ROOT, measure

SYNTHETIC = ["--dataset", "synthetic", "--log-interval", str(LOG_INTERVAL), "--synthetic-train-size", "8000"]
SCRIPT = [sys.executable, os.path.join(ROOT, "cifar10_deepspeed.py"), "--deepspeed", *SYNTHETIC]
MOE_EP2 = [os.path.join(ROOT, "run_ds_moe.sh"), *SYNTHETIC, "--dtype", "fp16", "--stage", "2"]
OFFLOAD = ["--offload", "cpu"]
CONFIGS = [  # (name, command, offloaded): an offloaded row is compared with the last row that is not
    ("dense, fp32, ZeRO 2, 1 rank", SCRIPT + ["--dtype", "fp32", "--stage", "2"], False),
    ("dense, fp32, ZeRO 2, 1 rank, --offload cpu", SCRIPT + ["--dtype", "fp32", "--stage", "2", *OFFLOAD], True),
    ("dense, fp32, ZeRO 3, 1 rank", SCRIPT + ["--dtype", "fp32", "--stage", "3"], False),
    ("dense, fp32, ZeRO 3, 1 rank, --offload cpu (optimizer and parameters)",
     SCRIPT + ["--dtype", "fp32", "--stage", "3", *OFFLOAD], True),
    ("MoE EP 2, fp16, ZeRO 2, 2 ranks (run_ds_moe.sh)", MOE_EP2, False),
    ("MoE EP 2, fp16, ZeRO 2, 2 ranks, --offload cpu", MOE_EP2 + OFFLOAD, True),
    ("MoE EP 2, 2 ranks, the tutorial's ds_config_offload.json (fp16 master weights)",
     [os.path.join(ROOT, "run_ds_moe.sh"), *SYNTHETIC, "--deepspeed_config", os.path.join(ROOT, "ds_config_offload.json")],
     True),
]
# Runs the command and then prints the peak resident memory of the largest process it waited for (a rank).
MAX_RSS = ("import resource, subprocess, sys; status = subprocess.call(sys.argv[1:]); "
           "print(f'largest process peak RSS {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss} KiB'); "
           "sys.exit(status)")
ACCELERATOR_PEAK = re.compile(r"^\[ \d+, +\d+\] .* samples/s, .*, peak (\w+) memory (\d+) MiB$")
HOST_PEAK = re.compile(r"^largest process peak RSS (\d+) KiB$")


def memory(output):
    """(accelerator name, rank 0's last printed peak accelerator MiB, the largest process's peak RSS in MiB)."""
    device, accelerator = next((m.group(1), int(m.group(2))) for line in reversed(output)
                               if (m := ACCELERATOR_PEAK.match(line)))
    host = next(int(m.group(1)) / 1024 for line in output if (m := HOST_PEAK.match(line)))
    return device, accelerator, host


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args()
    env = {"NUM_GPUS": "2", "BIND_CORES": "0"}  # run_ds_moe.sh on 2 ranks, with or without numactl
    results = {name: [] for name, _, _ in CONFIGS}
    for _ in range(args.rounds):
        for name, cmd, _ in CONFIGS:
            speed, _, _, output = measure([sys.executable, "-c", MAX_RSS, *cmd], env, args.epochs)
            results[name].append((speed, *memory(output)))
    device = results[CONFIGS[0][0]][0][1]
    print(f"| configuration ({os.cpu_count()} cores, batch 16) | samples/s | vs without offload "
          f"| peak {device} memory, rank 0, MiB | vs without offload | largest process peak RSS MiB |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, _, offloaded in CONFIGS:
        speed, accelerator, host = (statistics.median(run[column] for run in results[name]) for column in (0, 2, 3))
        if offloaded:
            print(f"| {name} | {speed:.0f} | {speed / baseline[0]:.2f} | {accelerator:.0f} "
                  f"| {accelerator / baseline[1]:.2f} | {host:.0f} |")
        else:
            baseline = speed, accelerator
            print(f"| {name} | {speed:.0f} | - | {accelerator:.0f} | - | {host:.0f} |")

if __name__ == "__main__":
    main()
