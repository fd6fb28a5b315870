"""Do finished 2-rank runs exit 0? Launch many short ones and count.

    python bench/exit_status.py [--runs 60] [--keep-cores DIR]

Cycles through three kinds of finished 2-rank launch on the synthetic data:
dense ZeRO 0 through run_ds.sh, MoE with EP 2 through run_ds_moe.sh, and the
matrix worker (tests/train_cells.py) through DeepSpeed's launcher. Each run
trains a few steps, tests, and exits; a run that printed its results and then
died at exit (an abort in interpreter teardown, say) counts as a failure. Prints
one line per run, the last lines of any failed run, and the count per kind.
With --keep-cores, each run works in its own folder under DIR with core dumps
allowed (the kernel's core_pattern decides where they go), to read a failure's
backtrace with gdb.
"""

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cifar10ds.launch import free_port  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHORT = ["--dataset", "synthetic", "--dtype", "fp32", "-e", "1", "--log-interval", "5",
         "--synthetic-train-size", "320", "--synthetic-test-size", "40", "--seed", "0"]
KINDS = {
    "dense ZeRO 0 (run_ds.sh)": ([os.path.join(ROOT, "run_ds.sh"), *SHORT], {"NUM_GPUS": "2"}),
    "MoE EP 2 (run_ds_moe.sh)": ([os.path.join(ROOT, "run_ds_moe.sh"), *SHORT], {}),
    "matrix worker (train_cells.py)": (["deepspeed", "--num_gpus", "2", os.path.join(ROOT, "tests", "train_cells.py"),
                                        "--report", "report.json", "--steps", "14", "--checks",
                                        "fp32-zero0-dense-w2", "fp16-zero2-rsample-w2-ep2"], {}),
}
FINISHED = {"dense ZeRO 0 (run_ds.sh)": "Accuracy of truck", "MoE EP 2 (run_ds_moe.sh)": "Accuracy of truck",
            "matrix worker (train_cells.py)": "cell fp16-zero2-rsample-w2-ep2: done"}


def allow_core_dumps():
    resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))


def launch(kind, cwd, keep_cores, timeout):
    cmd, env = KINDS[kind]
    port = str(free_port())  # a port of its own: another run on this machine cannot take it
    if cmd[0] == "deepspeed":
        cmd = [cmd[0], "--master_port", port, *cmd[1:]]
    env = {**env, "MASTER_PORT": port}
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=cwd, env={**os.environ, **env}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=timeout, start_new_session=True,
                              preexec_fn=allow_core_dumps if keep_cores else None)
        returncode, output = proc.returncode, proc.stdout
    except subprocess.TimeoutExpired as e:
        returncode, output = "timeout", e.stdout or ""
        if isinstance(output, bytes):
            output = output.decode(errors="replace")
    return returncode, output, time.monotonic() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=60, help="launches in all, cycling through the kinds")
    parser.add_argument("--keep-cores", metavar="DIR", help="run each launch in DIR/<n> with core dumps allowed")
    parser.add_argument("--timeout", type=int, default=300, help="seconds before a launch counts as hung")
    options = parser.parse_args()

    kinds = list(KINDS)
    results = {kind: [] for kind in kinds}
    with tempfile.TemporaryDirectory() as tmp:
        for n in range(options.runs):
            kind = kinds[n % len(kinds)]
            cwd = os.path.join(options.keep_cores or tmp, str(n))
            os.makedirs(cwd, exist_ok=True)
            returncode, output, seconds = launch(kind, cwd, options.keep_cores, options.timeout)
            finished = FINISHED[kind] in output
            ok = returncode == 0 and finished
            results[kind].append(ok)
            print(f"run {n + 1:3d}  {kind:32s} exit {returncode}  {'finished' if finished else 'NOT finished'}  "
                  f"{seconds:5.1f} s", flush=True)
            if not ok:
                print("".join(f"    | {line}\n" for line in output.splitlines()[-15:]), end="", flush=True)
    print()
    for kind in kinds:
        print(f"{kind:32s} {sum(results[kind]):3d} of {len(results[kind]):3d} exited 0")
    total = sum(map(sum, results.values()))
    print(f"{'all':32s} {total:3d} of {options.runs:3d} exited 0")
    sys.exit(0 if total == options.runs else 1)


if __name__ == "__main__":
    main()
