"""Throughput and start-up of cifar10_deepspeed.py against a plain-PyTorch loop, side by side.

    python bench/throughput.py [--rounds 2] [--epochs 2]
    python bench/throughput.py --data-paths    # the tensor data path against the PIL path
    python bench/throughput.py --only "1 (rank|process)" --no-compile   # the rows one GPU runs, without compile
    python bench/throughput.py --only MoE --no-compile --baseline HEAD~1  # each row against another commit's
    python bench/throughput.py --router    # in one process: a MoE step with the router's hooks and without
    python bench/throughput.py --costs     # in one process: a step's cost, one piece of the script at a time
    python bench/throughput.py --costs --toy-net   # the same with a net whose maths costs nothing: the Python
    deepspeed --num_gpus 2 --bind_cores_to_rank bench/throughput.py --costs   # the same, MoE EP 2 on 2 ranks
    python bench/throughput.py --whole-run # seconds an epoch of whole launches, beside the plain loop and the reference
    python bench/throughput.py --whole-run --only "script, dense" --epochs 4 --rounds 10   # runs of 1 and 5 epochs

Runs every configuration once per round, rounds interleaved so that the
machine's drift hits them alike, on the synthetic data in fp32. For each it
reads the throughput lines both programs print and reports the samples per
second (median over rounds of the mean over log intervals after the first),
the ratio to the plain loop, and the start-up: the seconds from launch until
training runs at that speed (the time of the first throughput line less the
time its interval would take at the later intervals' speed, so a first
interval slowed by compiling counts in the start-up), and for launcher runs
the part of it before DeepSpeed's launcher spawned the ranks (when it logs
"spawned with command"). The --compile rows run with inductor's cache cold
(a new, empty one each run: what a first run pays) or warm (one filled by a
run before the rounds: what a re-run pays). With --baseline REF, each chosen
row also runs from a git worktree of commit REF, in the same rounds, and the
table gets its ratio to that row. With --router, one process times the
script's MoE training step with the router's hooks and without them, in
alternating blocks: the cost of the figures without the noise of separate
runs. Prints a Markdown table.
"""

import argparse
import atexit
import contextlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from deepspeed.accelerator import get_accelerator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOG_INTERVAL = 50
DATA = ["--dataset", "synthetic", "--dtype", "fp32", "--log-interval", str(LOG_INTERVAL)]
SCRIPT = [sys.executable, os.path.join(ROOT, "cifar10_deepspeed.py"), "--deepspeed", *DATA]
MOE = ["--moe", "--num-experts", "2", "--top-k", "1"]
COLD, WARM = {"TORCHINDUCTOR_CACHE_DIR": None}, {"TORCHINDUCTOR_CACHE_DIR": tempfile.mkdtemp(prefix="inductor-warm-")}
atexit.register(shutil.rmtree, WARM["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)
CONFIGS = [
    ("plain PyTorch, dense, 1 process", [sys.executable, os.path.join(ROOT, "bench", "plain_loop.py"),
                                         "--log-interval", str(LOG_INTERVAL)], {}),
    ("DeepSpeed, dense, 1 rank (python)", SCRIPT, {}),
    ("DeepSpeed, dense, 1 rank, DeepSpeed's 2 loader workers", SCRIPT + ["--data-workers", "2"], {}),
    ("DeepSpeed, MoE 2 experts top-1, 1 rank (python)", SCRIPT + MOE, {}),
    ("DeepSpeed, dense, 2 ranks (NUM_GPUS=2 run_ds.sh)", [os.path.join(ROOT, "run_ds.sh"), *DATA], {"NUM_GPUS": "2"}),
    ("DeepSpeed, MoE EP 2, 2 ranks (run_ds_moe.sh)", [os.path.join(ROOT, "run_ds_moe.sh"), *DATA], {}),
    ("DeepSpeed, dense, 1 rank, --compile, inductor's cache cold", SCRIPT + ["--compile"], COLD),
    ("DeepSpeed, dense, 1 rank, --compile, cache warm", SCRIPT + ["--compile"], WARM),
    ("DeepSpeed, MoE 2 experts top-1, 1 rank, --compile, cache cold", SCRIPT + MOE + ["--compile"], COLD),
    ("DeepSpeed, MoE 2 experts top-1, 1 rank, --compile, cache warm", SCRIPT + MOE + ["--compile"], WARM),
]
DEVICE = get_accelerator().device_name()  # what the runs train on: cuda, or cpu
THROUGHPUT = re.compile(r"^\[ \d+, +\d+\] (\d+) samples/s, ")


def measure(cmd, env, epochs):
    """Run once; return (mean samples/s over the intervals after the first, seconds until training ran at that
    speed, seconds until the launcher spawned the ranks or None, the lines it printed). An environment value
    None is a new, empty folder (a cold cache)."""
    with tempfile.TemporaryDirectory(prefix="inductor-cold-") as cold:
        start = time.perf_counter()
        proc = subprocess.Popen([*cmd, "-e", str(epochs)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                env={**os.environ, **{name: value or cold for name, value in env.items()}}, text=True)
        speeds, first_line, launcher, output = [], None, None, []
        for line in proc.stdout:
            output.append(line)
            if launcher is None and "spawned with command" in line:
                launcher = time.perf_counter() - start
            match = THROUGHPUT.match(line)
            if match:
                speeds.append(int(match.group(1)))
                if first_line is None:
                    first_line = time.perf_counter() - start
        if proc.wait() != 0 or len(speeds) < 2:
            sys.exit(f"bench/throughput.py: error: {' '.join(cmd)} failed:\n{''.join(output[-30:])}")
    speed = statistics.mean(speeds[1:])
    return speed, first_line - LOG_INTERVAL * 16 / speed, launcher, output


DATA_PATH_RUNS = [  # (what, command, environment): each runs with --data-path tensor and pil, batch 16 and 128
    ("dense, 1 rank", SCRIPT, {}),
    ("MoE 2 experts top-1, 1 rank", SCRIPT + MOE, {}),
    ("dense, 2 ranks", [os.path.join(ROOT, "run_ds.sh"), *DATA], {"NUM_GPUS": "2"}),
    ("MoE EP 2, 2 ranks (run_ds_moe.sh)", [os.path.join(ROOT, "run_ds_moe.sh"), *DATA], {}),
]
EPOCH = re.compile(r"^\[ \d+, +\d+\] \d+ samples/s, ([\d.]+) s/epoch")


def epoch_seconds(cmd, env, epochs):
    """Run once; return the mean epoch time the throughput lines after the first report."""
    proc = subprocess.run([*cmd, "-e", str(epochs)], capture_output=True, text=True, env={**os.environ, **env})
    seconds = [float(m.group(1)) for m in map(EPOCH.match, proc.stdout.splitlines()) if m]
    if proc.returncode != 0 or len(seconds) < 2:
        sys.exit(f"bench/throughput.py: error: {' '.join(cmd)} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return statistics.mean(seconds[1:])


def compare_data_paths(rounds, epochs, runs):
    """The epoch time on the tensor path and on the PIL path, side by side, rounds interleaved: a Markdown table."""
    results = {}
    for _ in range(rounds):
        for what, cmd, env in runs:
            for batch, interval in ((16, LOG_INTERVAL), (128, 10)):  # 128: 39 steps an epoch
                for path in ("tensor", "pil"):
                    flags = ["--batch-size", str(batch), "--log-interval", str(interval), "--data-path", path]
                    results.setdefault((what, batch, path), []).append(epoch_seconds([*cmd, *flags], env, epochs))
    print(f"| run ({os.cpu_count()} cores, {DEVICE}, fp32, 5000 images) | batch | tensor path s/epoch | PIL path s/epoch "
          "| tensor / PIL |")
    print("| --- | --- | --- | --- | --- |")
    for what, _, _ in runs:
        for batch in (16, 128):
            tensor, pil = (statistics.median(results[what, batch, path]) for path in ("tensor", "pil"))
            print(f"| {what} | {batch} | {tensor:.2f} | {pil:.2f} | {tensor / pil:.2f} |")


def at_commit(runs, ref):
    """The rows run from a worktree of commit `ref` (removed at exit): each command's files there, named `(at REF)`."""
    worktree = tempfile.mkdtemp(prefix="baseline-")
    subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", worktree, ref], check=True, capture_output=True)
    atexit.register(subprocess.run, ["git", "-C", ROOT, "worktree", "remove", "--force", worktree])
    moved = lambda part: part.replace(ROOT, worktree, 1) if part.startswith(ROOT) and part != sys.executable else part
    return [(f"{name} (at {ref})", [moved(part) for part in cmd], env) for name, cmd, env in runs]


def router_cost(rounds, steps=200):
    """Seconds per MoE training step (2 layers of 2 and 16 experts, top-1) with the router's hooks on the gates and
    without them, in alternating blocks of `steps` steps: a Markdown table."""
    sys.path.insert(0, ROOT)
    import deepspeed
    import torch
    import cifar10_deepspeed
    from cifar10ds import fixes, launch, machine

    launch.use_single_process_defaults()
    machine.use_share_of_cores()
    fixes.bound_every_wait(deepspeed.constants.default_pg_timeout)  # as the script: no /dev/shm buffer left
    deepspeed.init_distributed()
    args = cifar10_deepspeed.add_argument(["--deepspeed", *DATA, "--moe", "--num-experts", "2", "16"])
    config = cifar10_deepspeed.get_ds_config(args)
    machine.use_torch_fused_adamw(config)
    trainset, _ = cifar10_deepspeed.load_data(args)
    model_engine, trainloader = cifar10_deepspeed.build_engine(args, config, trainset)
    batches = list(zip(range(steps), trainloader))
    gates = model_engine.module.router.gates
    hooks = [dict(gate._forward_hooks) for gate in gates]  # the router's, taken off and put back
    criterion, seconds = torch.nn.CrossEntropyLoss(), {"recorded": [], "not recorded": []}
    for _ in range(rounds):
        for name in seconds:
            for gate, hook in zip(gates, hooks):
                gate._forward_hooks.clear()
                gate._forward_hooks.update(hook if name == "recorded" else {})
            start = time.perf_counter()
            losses = [cifar10_deepspeed.train_step(model_engine, criterion, *batch) for _, batch in batches]
            torch.stack(losses).sum().item()  # the device's queue done
            seconds[name].append((time.perf_counter() - start) / steps)
    with_figures, without = (statistics.median(seconds[name]) for name in seconds)
    print(f"| MoE step ({os.cpu_count()} cores, {DEVICE}, fp32, batch 16, median of {rounds}) | ms | ratio |")
    print("| --- | --- | --- |")
    print(f"| the router's hooks recording | {1000 * with_figures:.3f} | {with_figures / without:.3f} |")
    print(f"| without the hooks | {1000 * without:.3f} | 1.000 |")


SIZES = ["--log-interval", "100000", "--synthetic-train-size", "20000", "--synthetic-test-size", "100"]


def reference(ranks, *flags):
    """bench/reference.py as the reference is launched (DeepSpeed's launcher, cores bound), at the whole-run sizes."""
    return ["deepspeed", "--num_gpus", str(ranks), "--bind_cores_to_rank", os.path.join(ROOT, "bench", "reference.py"),
            "--deepspeed", "--dtype", "fp32", "--log-interval", "100000", "--train-size", "20000", "--test-size",
            "100", *flags]


WHOLE_RUNS = [  # (what, command, the row it is set against): launched as a user launches them, 20,000 images, fp32
    ("plain PyTorch, dense, 1 process", [sys.executable, os.path.join(ROOT, "bench", "plain_loop.py"),
                                         "--log-interval", "100000", "--synthetic-train-size", "20000"], None),
    ("the reference, dense, 1 rank (bench/reference.py)", reference(1), None),
    ("the script, dense, 1 rank (python)", [*SCRIPT, *SIZES], "the reference, dense, 1 rank (bench/reference.py)"),
    ("the reference, MoE EP 2, 2 ranks (bench/reference.py)",
     reference(2, "--moe", "--ep-world-size", "2", "--num-experts", "2", "--top-k", "1", "--noisy-gate-policy",
               "RSample", "--moe-param-group"), None),
    ("the script, MoE EP 2, 2 ranks (run_ds_moe.sh)", [os.path.join(ROOT, "run_ds_moe.sh"), *DATA, *SIZES],
     "the reference, MoE EP 2, 2 ranks (bench/reference.py)"),
]


def whole_run_epochs(rounds, only="", few=1, many=3):
    """Seconds per epoch of each WHOLE_RUNS launch whose name matches `only` (and the plain loop), as the
    difference of a run of `many` epochs and one of `few` (start-up, data and evaluation cancel), rounds
    interleaved, medians; ratios of the same round's epochs: a Markdown table. A first round's reference builds
    DeepSpeed's Adam op, outside the difference."""
    runs = [run for run in WHOLE_RUNS if run is WHOLE_RUNS[0] or re.search(only, run[0])]
    seconds = {what: {few: [], many: []} for what, _, _ in runs}
    for _ in range(rounds):
        for what, cmd, _ in runs:
            for epochs in (few, many):
                start = time.perf_counter()
                run = subprocess.run([*cmd, "-e", str(epochs)], capture_output=True, text=True)
                if run.returncode:
                    sys.exit(f"bench/throughput.py: error: {' '.join(cmd)} failed:\n{(run.stdout + run.stderr)[-3000:]}")
                seconds[what][epochs].append(time.perf_counter() - start)
    epochs = {what: [(long - short) / (many - few) for short, long in zip(runs[few], runs[many])]
              for what, runs in seconds.items()}

    def ratio(what, against):  # the median of each round's: the machine's drift between rounds cancels
        if against not in epochs:
            return "-"
        return f"{statistics.median(mine / theirs for mine, theirs in zip(epochs[what], epochs[against])):.2f}"
    print(f"| whole run ({os.cpu_count()} cores, {DEVICE}, fp32, batch 16, 20,000 images, median of {rounds}) "
          f"| s an epoch | vs plain PyTorch | vs the reference |")
    print("| --- | --- | --- | --- |")
    for what, _, reference in runs:
        print(f"| {what} | {statistics.median(epochs[what]):.2f} | {ratio(what, WHOLE_RUNS[0][0])} | "
              f"{ratio(what, reference) if reference else '-'} |")


def toy_net(args):
    """Five linear layers, four of them 2x2, in place of the Net (ten parameter tensors too): a step whose maths
    costs next to nothing, so that what a step costs is the Python around it (the engine's calls, the hooks)."""
    import torch

    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 2),
                               *(torch.nn.Linear(2, 2) for _ in range(3)), torch.nn.Linear(2, 10))


def step_costs(rounds, steps=100, toy=False):
    """Milliseconds per training step, fp32, a piece of the script's step added per row, in blocks of `steps`
    steps over the same uint8 batches, every row once a round; each row's cost is the median over rounds of its
    time over the row before's in that round. One rank: dense and MoE (2 experts, top-1); under a launcher with
    N ranks: MoE with N experts at EP N, as run_ds_moe.sh trains, rank 0's times. With `toy`, the dense rows of a
    toy_net: each row's Python. A Markdown table."""
    sys.path.insert(0, ROOT)
    import io
    import deepspeed
    import torch
    import cifar10_deepspeed as script
    from cifar10ds import data, fixes, launch, machine, metrics, options, preemption
    from plain_loop import plain_step

    class Terminal(io.StringIO):  # where tqdm draws the bar, as on a person's terminal
        def isatty(self):
            return True

    launch.use_single_process_defaults()
    machine.use_share_of_cores()
    fixes.bound_every_wait(deepspeed.constants.default_pg_timeout)  # as the script: no /dev/shm buffer left
    deepspeed.init_distributed()
    world, nvml_check = deepspeed.comm.get_world_size(), os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"]
    criterion, metrics_dir = torch.nn.CrossEntropyLoss(), tempfile.mkdtemp(prefix="costs-")
    atexit.register(shutil.rmtree, metrics_dir, ignore_errors=True)
    if toy and world > 1:
        sys.exit("bench/throughput.py: error: --toy-net is dense, so one rank: run it without a launcher")
    if toy:
        script.Net = toy_net
    shapes = {"dense (toy net)" if toy else "dense": [], **({} if toy else {"MoE": MOE})} if world == 1 else {
        f"MoE EP {world}": ["--moe", "--num-experts", str(world), "--ep-world-size", str(world), "--top-k", "1"]}
    table = [f"| a step ({os.cpu_count()} cores, {DEVICE}, fp32, batch 16, {world} rank(s), median of {rounds} "
             f"blocks of {steps} steps) | " + " | ".join(f"{shape} ms | vs the row before" for shape in shapes) + " |",
             "| --- " * (1 + 2 * len(shapes)) + "|"]
    columns = []
    for flags in shapes.values():
        args = script.add_argument(["--deepspeed", *DATA, *flags, "--synthetic-train-size", str(16 * steps),
                                    "--metrics-dir", metrics_dir, "--seed", "0"])
        config = script.get_ds_config(args)
        machine.use_torch_fused_adamw(config)
        options.read_offload(config)
        metrics.add_monitors(config, args)
        trainset, _ = script.load_data(args)
        bare_net = script.Net(args)
        for gate in bare_net.router.gates if args.moe else []:
            gate._forward_hooks.clear()
        bare = deepspeed.initialize(args=args, model=bare_net, model_parameters=bare_net.parameters(), config=config)[0]
        engine, trainloader = script.build_engine(args, config, trainset)  # the fixes, the router, the sampler
        batches = list(trainloader)
        plain_loader = torch.utils.data.DataLoader(trainset, batch_size=16, shuffle=True,
                                                   collate_fn=data.collate_fn(trainset))  # as bench/plain_loop.py's
        plain = plain_step(args, engine.device)  # bench/plain_loop.py's: the Net (or toy net) and its AdamW
        hooks = [dict(gate._forward_hooks) for gate in engine.module.router.gates] if args.moe else []
        signals, csv = preemption.Preemption(), engine.monitor.csv_monitor

        def block(rows):
            """Time the step of the script with the pieces of `rows` (the names of ROWS[:rows])."""
            on = {name for name, _ in ROWS[:rows]}
            model = engine if "the fixes" in on else bare
            os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = nvml_check  # as importing DeepSpeed set it
            if rows == 0 or "the fixes" in on:  # plain PyTorch does not import DeepSpeed
                fixes.stop_probing_a_missing_nvml()
            for gate, hook in zip(engine.module.router.gates if args.moe else [], hooks):
                gate._forward_hooks.clear()
                gate._forward_hooks.update(hook if "the router's hooks" in on else {})
            engine.monitor.csv_monitor = csv if "the monitors" in on else None
            args.progress = "the progress bar" in on
            log = metrics.Log(engine, args, steps)
            stdout, sys.stdout = sys.stdout, Terminal()
            deepspeed.comm.barrier()  # every rank starts the block together
            start = time.perf_counter()
            with log.epoch(0) if "loss and throughput bookkeeping" in on else contextlib.nullcontext():
                source = trainloader if "the sampler and loader" in on else \
                    plain_loader if "torch's DataLoader" in on else batches
                for i, (inputs, labels) in enumerate(source):
                    loss = plain(inputs, labels) if rows == 0 else script.train_step(model, criterion, inputs, labels)
                    if "loss and throughput bookkeeping" in on:
                        log.step(loss)
                    if "the preemption agreement" in on:
                        signals.agreed_at(i + 1, steps + 1)
            loss.item()  # the device's queue done
            seconds = time.perf_counter() - start
            sys.stdout = stdout
            return seconds / steps

        # the plain loop: dense only (a MoE layer needs DeepSpeed's groups); the router: MoE only
        times = {rows: [] for rows in range(len(ROWS) + 1) if (rows or not args.moe) and (rows != 3 or args.moe)}
        for _ in range(rounds):
            for rows in times:
                times[rows].append(block(rows))
        signals.close()
        measured, column = list(times), {}
        for before, rows in zip(measured, measured[1:]):  # a row's ratio: the median of each round's, paired
            column[rows] = statistics.median(times[rows]), statistics.median(
                after / first for after, first in zip(times[rows], times[before]))
        column[measured[0]] = statistics.median(times[measured[0]]), None
        columns.append(column)
    names = ["plain PyTorch (fused AdamW, clip_grad_norm_, the warm-up)", "DeepSpeed's engine, bare"] + [
        f"+ {name}" + (f" ({note})" if note else "") for name, note in ROWS[1:]]
    for row, name in enumerate(names):
        cells = []
        for column in columns:
            ms, ratio = column.get(row, (None, None))
            cells.append("- | -" if ms is None else f"{1000 * ms:.3f} | " + ("-" if ratio is None else f"{ratio:.3f}"))
        table.append(f"| {name} | {' | '.join(cells)} |")
    if deepspeed.comm.get_rank() == 0:
        print("\n".join(table))


ROWS = [  # (piece, note): each row adds one to the rows before it; the first is DeepSpeed's engine itself
    ("DeepSpeed's engine", ""),
    ("the fixes", "fp32: the global-norm clipping, no all-reduce on one rank, no NVML probe without a driver"),
    ("the router's hooks", "MoE only"),
    ("loss and throughput bookkeeping", "metrics.Log.step"),
    ("the preemption agreement", "a post and a read every preemption.CHECK_EVERY steps"),
    ("the progress bar", "a terminal's only"),
    ("the monitors", "CSV; they write at log lines and epoch ends"),
    ("torch's DataLoader", "the plain loop's, shuffled, against a list of the same batches"),
    ("the sampler and loader", "the script's in its place: DeepSpeed's loader, a sampler --resume can start mid-epoch"),
]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--data-paths", action="store_true",
                        help="instead: the epoch time on the tensor and the PIL data path, batch 16 and 128")
    parser.add_argument("--only", default="", help="only the rows whose name matches this regular expression "
                        "(the plain loop and DeepSpeed's dense 1-rank row, the ratios' bases, always run)")
    parser.add_argument("--no-compile", action="store_true", help="leave out the --compile rows")
    parser.add_argument("--baseline", metavar="REF", help="also run each chosen row from git commit REF, side by side")
    parser.add_argument("--router", action="store_true", help="instead: a MoE step with and without the router's "
                        "hooks, in one process")
    parser.add_argument("--costs", action="store_true", help="instead: a step's cost, a piece of the script at a "
                        "time, in one process")
    parser.add_argument("--toy-net", action="store_true", help="with --costs: the dense rows with a net of five 2x2 "
                        "linear layers, whose maths costs next to nothing: each piece's Python")
    parser.add_argument("--whole-run", action="store_true", help="instead: seconds an epoch of whole launches, by "
                        "the difference of a run of 1 + --epochs epochs and a 1-epoch run")
    args, _ = parser.parse_known_args()  # a launcher adds --local_rank
    if args.whole_run:
        return whole_run_epochs(args.rounds, args.only, many=1 + args.epochs)
    if args.router:
        return router_cost(args.rounds)
    if args.costs:
        return step_costs(args.rounds, toy=args.toy_net)
    runs = [config for config in CONFIGS if re.search(args.only, config[0]) or config in CONFIGS[:2]]
    runs = [config for config in runs if not (args.no_compile and "--compile" in config[1])]
    if args.data_paths:
        return compare_data_paths(args.rounds, args.epochs, [run for run in DATA_PATH_RUNS if re.search(args.only, run[0])])
    baselines = dict(zip((name for name, _, _ in runs[2:]), at_commit(runs[2:], args.baseline))) if args.baseline else {}
    runs += list(baselines.values())
    results = {name: [] for name, _, _ in runs}
    for _, cmd, env in (config for config in runs if config[2] is WARM):
        measure(cmd, env, 1)  # fills the warm cache
    for _ in range(args.rounds):
        for name, cmd, env in runs:
            results[name].append(measure(cmd, env, args.epochs)[:3])
    plain = statistics.median(run[0] for run in results[CONFIGS[0][0]])
    one_rank = statistics.median(run[0] for run in results[CONFIGS[1][0]])
    against = f" | vs {args.baseline}" if args.baseline else ""
    print(f"| configuration ({os.cpu_count()} cores, {DEVICE}, fp32, batch 16) | samples/s | vs plain PyTorch "
          f"| vs DeepSpeed 1 rank | start-up s | of which launcher s{against} |")
    print("| --- " * (6 + bool(args.baseline)) + "|")
    medians = {name: [statistics.median(column) if None not in column else None for column in zip(*runs)]
               for name, runs in results.items()}
    for name, (speed, startup, launcher) in medians.items():
        launcher = "-" if launcher is None else f"{launcher:.1f}"
        ratio = f" | {speed / medians[baselines[name][0]][0]:.3f}" if name in baselines else " | -" * bool(against)
        print(f"| {name} | {speed:.0f} | {speed / plain:.2f} | {speed / one_rank:.2f} | {startup:.1f} | {launcher}"
              f"{ratio} |")


if __name__ == "__main__":
    main()
