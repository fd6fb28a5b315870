"""Where the seconds before the first step go, and how long a first run waits for it, cold and warm.

    python bench/startup.py            # every row, about 3 minutes on 2 CPU cores
    python bench/startup.py --no-cold  # without the cold row that builds DeepSpeed's Adam (a minute more)

Prints two Markdown tables. The first splits one process's start (`python cifar10_deepspeed.py`, one rank,
synthetic data, fp32) into phases, from a wrapper that times the script's own calls: the imports,
deepspeed.init_distributed, the data, deepspeed.initialize, the first step. The second times the seconds
from the command to the first loss line (`--log-interval 1`) of `./run_ds.sh --dataset synthetic --dtype
fp32 -e 1`, as a user runs it: warm (caches as they are), with no C++ compiler and an empty op cache (what
a slim container or a fresh laptop has), and with DeepSpeed's own Adam from an empty op cache (what the
script did before it chose torch's fused AdamW). Each row is the median of --repeats runs.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = ["--deepspeed", "--dataset", "synthetic", "--dtype", "fp32", "-e", "1", "--log-interval", "1"]

# The child: run the script's main() with its calls timed, then print each phase's end in seconds since the start.
PHASES = """
import json, os, sys, time
start = time.perf_counter()
marks = []
def mark(name):
    marks.append((name, time.perf_counter() - start))
sys.path.insert(0, sys.argv[1])
sys.argv = [sys.argv[1] + "/cifar10_deepspeed.py", *sys.argv[2:]]
import deepspeed, torch
mark("import torch and DeepSpeed")
import cifar10_deepspeed
mark("import the script and its package")
def timed(owner, name, label):
    call = getattr(owner, name)
    def wrapper(*args, **kwargs):
        result = call(*args, **kwargs)
        if label not in dict(marks):
            mark(label)
        return result
    setattr(owner, name, wrapper)
timed(deepspeed, "init_distributed", "deepspeed.init_distributed")
timed(cifar10_deepspeed, "load_data", "the data")
timed(deepspeed, "initialize", "deepspeed.initialize")
timed(cifar10_deepspeed, "train_step", "the first step")
cifar10_deepspeed.main(cifar10_deepspeed.add_argument())
print("PHASES " + json.dumps(marks), flush=True)
os._exit(0)
"""


def phases(repeats):
    """Each phase's seconds, median over `repeats` one-process runs."""
    runs = []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as cwd:
            out = subprocess.run([sys.executable, "-c", PHASES, ROOT, *FLAGS], cwd=cwd, capture_output=True, text=True,
                                 timeout=600)
        line = next((line for line in out.stdout.splitlines() if line.startswith("PHASES ")), None)
        if line is None:
            sys.exit(f"bench/startup.py: error: the timed run failed:\n{(out.stdout + out.stderr)[-3000:]}")
        runs.append(dict(json.loads(line[len("PHASES "):])))
    names = list(runs[0])
    ends = [statistics.median(run[name] for run in runs) for name in names]
    return [(name, end - (ends[i - 1] if i else 0)) for i, (name, end) in enumerate(zip(names, ends))]


def first_loss_line(flags, env, cwd):
    """Seconds from starting ./run_ds.sh with `flags` to its first loss line."""
    start = time.perf_counter()
    proc = subprocess.Popen([os.path.join(ROOT, "run_ds.sh"), *flags], cwd=cwd, env={**os.environ, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seconds, output = None, []
    for line in proc.stdout:
        output.append(line)
        if seconds is None and " loss: " in line:
            seconds = time.perf_counter() - start
    proc.wait()
    if proc.returncode or seconds is None:
        sys.exit(f"bench/startup.py: error: ./run_ds.sh failed with {env}:\n{''.join(output[-30:])}")
    return seconds


def first_runs(repeats, cold):
    """(what, median seconds to the first loss line) for each way a first run can find the machine."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(ROOT, "ds_config.json")) as f:
            config = json.load(f)
        config["optimizer"]["params"]["torch_adam"] = False  # DeepSpeed's own Adam, as before use_torch_fused_adamw
        deepspeed_adam = os.path.join(tmp, "deepspeed_adam.json")
        with open(deepspeed_adam, "w") as f:
            json.dump(config, f)
        no_cxx = {"CXX": "/bin/false", "CC": "/bin/false"}
        ways = [("warm: caches as they are", [], {}, False),
                ("no C++ compiler (CXX=/bin/false), empty op cache", [], no_cxx, True)]
        if cold:
            ways.append(("DeepSpeed's own Adam, empty op cache (it builds its C++ op first)",
                         ["--deepspeed_config", deepspeed_adam], {}, True))
        for n, (what, extra, env, empty_cache) in enumerate(ways):
            seconds = []
            for repeat in range(repeats):
                cwd = os.path.join(tmp, f"run-{n}-{repeat}")
                os.makedirs(cwd)
                cache = {"TORCH_EXTENSIONS_DIR": os.path.join(cwd, "ops")} if empty_cache else {}
                seconds.append(first_loss_line([*FLAGS[1:], *extra], {**env, **cache, "BIND_CORES": "0",
                                                                      "NUM_GPUS": "1"}, cwd))
            rows.append((what, statistics.median(seconds)))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs per row, the median kept (default: 3)")
    parser.add_argument("--no-cold", action="store_true", help="leave out the row that builds DeepSpeed's Adam")
    options = parser.parse_args()
    print("| phase of one process's start | seconds |\n| --- | --- |")
    for name, seconds in phases(options.repeats):
        print(f"| {name} | {seconds:.2f} |")
    print("\n| ./run_ds.sh to its first loss line | seconds |\n| --- | --- |")
    for what, seconds in first_runs(options.repeats, not options.no_cold):
        print(f"| {what} | {seconds:.1f} |")


if __name__ == "__main__":
    main()
