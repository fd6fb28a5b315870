"""The GPU acceptance check's runs, on the first GPU: one table, printed and written to a file.

    bench/gpu_check.sh                     # installs what the box lacks, then runs this
    python bench/gpu_check.py [--out gpu_check.md] [--checks learn,compiler,matrix,throughput,data,memory]

learn: dense and MoE (EP 1) in fp16, bf16 and fp32, one rank through the run
scripts (DeepSpeed's launcher), 3 epochs of the synthetic set; each must learn
(the loss falls by a fifth, the accuracy reaches LEARNED %).
compiler: an epoch with the compiler hidden (on a GPU nvcc and CUDA_HOME, on a
CPU the C++ compiler) and an empty op cache trains, with nothing to compile.
matrix: tests/test_matrix.py's cells that fit the GPUs, every invariant.
throughput: bench/throughput.py's one-rank rows against the plain PyTorch loop.
data: the tensor data path against the PIL path, batch 16 and 128.
memory: the peak accelerator memory at ZeRO stages 0 to 3, and with --offload cpu.
Exits 1 when a check fails. --allow-cpu runs it where torch finds no GPU, on
DeepSpeed's CPU accelerator (the matrix: its cells of one rank): a check of this
script only.
"""

import argparse
import datetime
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time

import deepspeed
import torch
import torchvision
from deepspeed.accelerator import get_accelerator

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import throughput  # noqa: E402

ROOT = throughput.ROOT
LEARNED = 40  # % test accuracy after 3 epochs; every row of test_launch.py reaches 50 or more on CPU
SCRIPT = [sys.executable, os.path.join(ROOT, "cifar10_deepspeed.py"), "--deepspeed", "--dataset", "synthetic",
          "--seed", "0", "--log-interval", "100"]
LOSS = re.compile(r"^\[ *\d+, +\d+\] loss:  (\d+\.\d{3})$", re.M)
ACCURACY = re.compile(r"^Accuracy of the network on the \d+ test images:  (\d+) %$", re.M)
SPEED = re.compile(r"^\[ *\d+, +\d+\] (\d+) samples/s, .*peak \w+ memory (\d+) MiB", re.M)
CHECKS = ("learn", "compiler", "matrix", "throughput", "data", "memory")
RUN_DS, RUN_DS_MOE = os.path.join(ROOT, "run_ds.sh"), os.path.join(ROOT, "run_ds_moe.sh")
SYNTHETIC = ["--dataset", "synthetic", "--seed", "0", "--log-interval", "100"]


def launch(cmd, env=None):
    """Run a command from the checkout; return (exit status, everything it printed, seconds)."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env={**os.environ, **(env or {})})
    return proc.returncode, proc.stdout, time.perf_counter() - start


def speed_and_memory(output):
    """Mean samples/s over the throughput lines after the first, and the peak memory the last one reports."""
    lines = SPEED.findall(output)
    if len(lines) < 2:
        return "-", "-"
    return f"{statistics.mean(int(speed) for speed, _ in lines[1:]):.0f}", lines[-1][1]


def trained(status, output, fall, least=0):
    """Whether a run trained: exit 0, its last loss under `fall` times its first, the accuracy line printed and at
    least `least` %; and the row's words for it."""
    losses, accuracy = [float(x) for x in LOSS.findall(output)], ACCURACY.search(output)
    ok = bool(status == 0 and len(losses) >= 2 and losses[-1] < fall * losses[0] and accuracy
              and int(accuracy.group(1)) >= least)
    return ok, (f"loss {losses[0]:.3f} to {losses[-1]:.3f}, {accuracy.group(1)} %" if ok else
                f"FAILED (exit {status}): {' / '.join(output.strip().splitlines()[-2:])}")


def learn():
    """One row per model and dtype: did 3 epochs through the run scripts learn?"""
    for model, cmd, env in (("dense", [RUN_DS], {"NUM_GPUS": "1"}),
                            ("MoE 2 experts top-1 RSample, EP 1", [RUN_DS_MOE], {"NUM_GPUS": "1", "EP_SIZE": "1"})):
        for dtype in ("fp16", "bf16", "fp32"):
            status, output, seconds = launch([*cmd, *SYNTHETIC, "--dtype", dtype, "-e", "3"], env)
            ok, result = trained(status, output, 0.8, LEARNED)  # the loss falls by a fifth
            yield ("learn", f"{model}, {dtype}, 1 rank, 3 epochs, ./{os.path.basename(cmd[0])}",
                   f"learns: {result}" if ok else result,
                   *speed_and_memory(output), f"{seconds:.0f}"), ok


def hidden_compiler(cache):
    """Environment settings that leave DeepSpeed nothing to build an op with, and an empty op cache: on a GPU no
    nvcc (CUDA_HOME an empty folder, nvcc off PATH), on a CPU no C++ compiler."""
    env = {"TORCH_EXTENSIONS_DIR": os.path.join(cache, "ops")}
    if get_accelerator().device_name() != "cuda":
        return "no C++ compiler (CXX=false)", {**env, "CXX": "false", "CC": "false"}
    path = os.pathsep.join(d for d in os.environ["PATH"].split(os.pathsep)
                           if not os.path.exists(os.path.join(d, "nvcc")))
    return "no nvcc (CUDA_HOME empty, nvcc off PATH)", {**env, "CUDA_HOME": cache, "PATH": path}


def compiler():
    """The quick start's run where nothing can be compiled: it trains an epoch (its loss falls by a tenth), prints
    the accuracy, and its first line says that it needs no compiler."""
    with tempfile.TemporaryDirectory() as cache:
        what, env = hidden_compiler(cache)
        status, output, seconds = launch([RUN_DS, *SYNTHETIC, "--dtype", "bf16", "-e", "1"], {"NUM_GPUS": "1", **env})
    ok, result = trained(status, output, 0.9)
    if ok and "; optimizer: torch's fused AdamW (nothing to compile)" not in output:
        ok, result = False, "FAILED: the first line does not say that nothing is compiled"
    yield ("compiler", f"dense, bf16, 1 rank, 1 epoch, {what}, empty op cache",
           f"trains: {result}, nothing compiled" if ok else result, *speed_and_memory(output), f"{seconds:.0f}"), ok


def matrix():
    if get_accelerator().device_name() == "cuda":
        where, tests = f"{torch.cuda.device_count()} GPU(s)", ["tests/test_matrix.py::test_every_cell_on_cuda"]
    else:  # --allow-cpu: the CPU suite's cells of one rank
        where, tests = "the CPU, cells of 1 rank", ["tests/test_matrix.py", "-k", "w1"]
    status, output, seconds = launch([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "0",
                                      *tests])
    summary = output.strip().splitlines()[-1] if output.strip() else f"exit {status}"
    passed = status == 0 and " passed" in summary  # not only skipped
    yield ("matrix", f"tests/test_matrix.py on {where}",
           ("every invariant holds: " if passed else "FAILED: ") + summary, "-", "-", f"{seconds:.0f}"), passed


def throughput_rows():
    rows = [config for config in throughput.CONFIGS if re.search(r"1 (rank|process)", config[0])
            and "--compile" not in config[1]]
    measured = {}
    for name, cmd, env in rows:
        try:
            measured[name] = throughput.measure(cmd, env, 2)
        except SystemExit as e:  # the run failed: bench/throughput.py's message, its first line
            yield ("throughput", name, f"FAILED: {str(e.code).splitlines()[0]}", "-", "-", "-"), False
    plain = measured.get(throughput.CONFIGS[0][0], (float("nan"),))[0]
    for name, (speed, startup, _, output) in measured.items():
        yield ("throughput", name, f"{speed / plain:.2f}x the plain loop, start-up {startup:.1f} s", f"{speed:.0f}",
               speed_and_memory("".join(output))[1], "-"), True


def data_paths():
    for batch, interval in ((16, throughput.LOG_INTERVAL), (128, 10)):
        seconds = {}
        try:
            for path in ("tensor", "pil"):
                flags = ["--batch-size", str(batch), "--log-interval", str(interval), "--data-path", path]
                seconds[path] = throughput.epoch_seconds([*throughput.SCRIPT, *flags], {}, 2)
        except SystemExit as e:
            yield ("data", f"dense, 1 rank, batch {batch}", f"FAILED: {str(e.code).splitlines()[0]}", "-", "-", "-"), False
            continue
        yield ("data", f"dense, 1 rank, batch {batch}: tensor path against PIL path",
               f"{seconds['tensor']:.2f} s against {seconds['pil']:.2f} s an epoch "
               f"({seconds['tensor'] / seconds['pil']:.2f})", "-", "-", "-"), True


def memory():
    for stage, offload in ((0, None), (1, None), (2, None), (3, None), (2, "cpu"), (3, "cpu")):
        flags = ["--dtype", "fp32", "-e", "1", "--log-interval", "50", "--stage", str(stage)]
        flags += ["--offload", offload] if offload else []
        status, output, seconds = launch([*SCRIPT, *flags])
        what = f"dense, fp32, ZeRO {stage}" + (", --offload cpu" if offload else "") + ", 1 rank"
        result = "runs" if status == 0 else f"FAILED (exit {status}): {output.strip().splitlines()[-1]}"
        yield ("memory", what, result, *speed_and_memory(output), f"{seconds:.0f}"), status == 0


def describe():
    """The machine and the versions, one line each."""
    accelerator = get_accelerator()
    gpu = torch.cuda.get_device_name(0) if accelerator.device_name() == "cuda" else "no GPU (--allow-cpu)"
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True).stdout.split()[0]
    except (OSError, IndexError):
        driver = "-"
    return [f"- {datetime.date.today()}, {gpu}, driver {driver}, CUDA {torch.version.cuda}, {os.cpu_count()} cores",
            f"- Python {platform.python_version()}, torch {torch.__version__}, torchvision {torchvision.__version__}, "
            f"DeepSpeed {deepspeed.__version__}"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "gpu_check.md"))
    parser.add_argument("--installed", help="the file listing what the check installed from the carried wheels")
    parser.add_argument("--checks", default=",".join(CHECKS), help=f"a comma-separated subset of {','.join(CHECKS)}")
    parser.add_argument("--allow-cpu", action="store_true", help="run without a GPU: a check of this script only")
    args = parser.parse_args()
    checks = args.checks.split(",")
    if not set(checks) <= set(CHECKS):
        sys.exit(f"gpu_check.py: error: --checks takes {', '.join(CHECKS)}, got {args.checks}")
    if get_accelerator().device_name() != "cuda" and not args.allow_cpu:
        sys.exit("gpu_check.py: error: DeepSpeed found no GPU: this check is for a GPU box (docs/gpu.md)")

    start = time.perf_counter()
    header = ["| check | configuration | result | samples/s | peak memory MiB | s |", "| --- | --- | --- | --- | --- | --- |"]
    print("\n".join(header), flush=True)
    rows, failed = [], 0
    steps = {"learn": learn, "compiler": compiler, "matrix": matrix, "throughput": throughput_rows, "data": data_paths,
             "memory": memory}
    for check in checks:
        for row, ok in steps[check]():
            rows.append("| " + " | ".join(row) + " |")
            failed += not ok
            print(rows[-1], flush=True)
    lines = ["# bench/gpu_check.sh", "", *describe()]
    if args.installed:
        with open(args.installed) as f:
            lines.append(f"- installed from the carried wheels: {' '.join(f.read().split())}")
    lines += [f"- {time.perf_counter() - start:.0f} s in all, {failed} failed", "", *header, *rows]
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines[2:-len(rows) - 3]))
    print(f"gpu_check: the table is in {args.out}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
