"""Mutation check: does the suite fail when cifar10_deepspeed.py is wrong?

    python bench/mutants.py            # every mutant
    python bench/mutants.py --list     # the mutants and their test selections
    python bench/mutants.py -k seed    # the mutants whose name contains "seed"

Each mutant is one exact text replacement in the script, a small deliberate mistake in one of its key
behaviours, with the tests expected to catch it. For each, the script is copied into a scratch
checkout (the tracked files), the replacement applied (it must match exactly once), and the selection
run with pytest. Caught: the selection fails. Survived: it passes. Run by hand, not in CI; TESTING.md
gives the last result.
"""

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = "cifar10_deepspeed.py"

T = "tests/"
CONFIG, CLI, MODEL, OUTPUT = T + "test_config.py", T + "test_cli.py", T + "test_model.py", T + "test_output.py"
EQUIVALENCE, LAUNCH, RESUME, WATCH = T + "test_equivalence.py", T + "test_launch.py", T + "test_resume.py", T + "test_watch.py"
LAYOUT_EP2 = [T + "test_layouts.py", "-k", "fp32-zero0-top2-w2-ep2-acting"]

# (what the mistake is, the text in the script, what it becomes, the tests that must catch it)
MUTANTS = [
    # the config
    ("train_batch_size is not the reference's 16", '"train_batch_size": 16,', '"train_batch_size": 32,', [CONFIG]),
    ("the learning rate is not the reference's", '"lr": 0.001, "betas"', '"lr": 0.002, "betas"', [CONFIG]),
    ("gradient clipping is off", '"gradient_clipping": 1.0,', '"gradient_clipping": 0.0,', [CONFIG]),
    ("--stage is ignored", '"stage": args.stage or 0,', '"stage": 0,', [CONFIG]),
    ("offload keeps no optimizer on the host", 'zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}',
     'zero["offload_optimizer"] = {"device": "none", "pin_memory": True}', [CONFIG]),
    # check_args
    ("--log-interval 0 is accepted", "if args.log_interval < 1:", "if args.log_interval < 0:", [CLI]),
    ("MoE with ZeRO 3 is accepted", "    if stage == 3:\n", "    if stage == 4:\n", [CLI]),
    ("an expert count the EP size does not divide is accepted", "if n < 1 or n % args.ep_world_size:",
     "if n < 1:", [CLI]),
    ("a world size the EP size does not divide is accepted", "if world_size % args.ep_world_size:",
     "if False:", [CLI]),
    ("RSample with top-2 is accepted", 'args.noisy_gate_policy == "RSample" and args.top_k != 1',
     'args.noisy_gate_policy == "RSample" and args.top_k != 2', [CLI]),
    # Net
    ("PR-MoE's residual flag inverted", 'use_residual=args.mlp_type == "residual",',
     'use_residual=args.mlp_type != "residual",', [MODEL]),
    ("--top-k is ignored", "k=args.top_k,", "k=1,", [MODEL]),
    ("the dense head is not the reference's", "self.fc3 = nn.Linear(84, 10)", "self.fc3 = nn.Linear(84, 10, bias=False)",
     [MODEL]),
    ("no ReLU after fc2", "x = F.relu(self.fc2(x))", "x = self.fc2(x)", [MODEL]),
    # the loss and accuracy lines
    ("the loss line loses its sign space", "loss: {mean_loss: .3f}", "loss: {mean_loss:.3f}", [OUTPUT]),
    ("the batch is not right-aligned in 5", "{batch: 5d}]", "{batch: 4d}]", [OUTPUT]),
    ("the overall accuracy floors", "{100 * sum(class_correct) / total: .0f} %",
     "{100 * sum(class_correct) // total: .0f} %", [OUTPUT]),
    ("class names are not right-aligned", 'f"Accuracy of {name:>5s} : {100 * correct', 'f"Accuracy of {name:<5s} : {100 * correct',
     [OUTPUT]),
    # ExpertLoad
    ("the aux loss is not averaged over the ranks", "(self.steps * dist.get_world_size())", "self.steps", [MODEL]),
    ("expert shares are not normalized", "shares = [(c / c.sum().clamp(min=1)).tolist()", "shares = [c.tolist()",
     [MODEL]),
    # data
    ("every rank downloads", "datasets = load_datasets(args, download=first_on_node)",
     "datasets = load_datasets(args, download=True)", [T + "test_nodes.py", "-k", "download"]),
    ("--seed does not seed the data order", "trainloader.data_sampler.seed = args.seed", "trainloader.data_sampler.seed = 0",
     [MODEL]),
    ("the sampler is not told the epoch", "trainloader.data_sampler.set_epoch(epoch)", "trainloader.data_sampler.set_epoch(0)",
     [MODEL]),
    ("--seed builds another model on every rank", "torch.manual_seed(args.seed)  # every rank",
     "torch.manual_seed(args.seed + dist.get_rank())  # every rank", LAYOUT_EP2),
    # evaluation
    ("sharded evaluation reads rank 0's slice on every rank", "range(dist.get_rank(), len(testset), dist.get_world_size())",
     "range(0, len(testset), dist.get_world_size())", [LAUNCH, "-k", "sharded"]),
    ("sharded evaluation is not summed over the ranks", "        dist.all_reduce(class_correct)\n", "\n",
     [LAUNCH, "-k", "sharded"]),
    ("can_shard_eval always says yes", "return not (args.moe and args.ep_world_size > 1) and model_engine.zero_optimization_stage() < 3",
     "return True", [MODEL]),
    # DeepSpeed's fixes
    ("fp16 without ZeRO backpropagates the unscaled loss", "grad < scaled / 2, grad * scaler.cur_scale, grad",
     "grad < scaled / 2, grad, grad", [EQUIVALENCE, "-k", "fp16"]),
    ("expert gradients counted on their own rank only", "moe_ep_group=name and groups._get_expert_parallel_group(name)",
     "moe_ep_group=None", LAYOUT_EP2),
    # the tensor data path, batch flags and gradient accumulation
    ("the tensor path divides by 256", "/ torch.tensor(255.0,", "/ torch.tensor(256.0,", [MODEL, "-k", "tensor_path"]),
    ("the tensor path's batch is a channels-last view", ".permute(0, 3, 1, 2).contiguous().float()",
     ".permute(0, 3, 1, 2).float()", [MODEL, "-k", "tensor_path"]),
    ("the tensor path is not normalized", "        images = transforms.functional.normalize(images, MEAN, STD)\n",
     "", [MODEL, "-k", "tensor_path"]),
    ("a batch that does not add up is accepted", "if not micro or not accum or batch != micro * accum * world_size:",
     "if not micro or not accum:", [CLI, "-k", "batch"]),
    ("--lr does not reach the warm-up's peak", 'scheduler["warmup_max_lr"] = args.lr', "pass", [CONFIG, "-k", "batch"]),
    ("the loss line counts micro-batches", "i = micro_step // accumulation", "i = micro_step",
     [MODEL, "-k", "accumulation"]),
    ("an optimizer step's loss is its last micro-batch's", "torch.stack(micro_losses).mean()", "micro_losses[-1]",
     [MODEL, "-k", "accumulation"]),
    # checkpoints and resume
    ("--init-from gives every rank the first experts", "f\"deepspeed_experts.{ep_rank * per_rank + int(match.group(2))}.\")",
     "f\"deepspeed_experts.{int(match.group(2))}.\")", [T + "test_export_model.py", "-k", "init_from"]),
    ("a checkpoint records the epoch it finished as the one to redo", '{"epoch": epoch + 1 if step is None else epoch,',
     '{"epoch": epoch,', [RESUME, "-k", "replays"]),
    ("resume does not restore the random-number state",  # both: on a CPU the accelerator's state is torch's
     "    set_rng_state(start.rank_state)\n",
     "    pass\n", [RESUME, "-k", "moe-ep2-zero2-offload"]),
    ("a run resumed mid-epoch draws the loader's seed again", "            set_rng_state(start.rank_state)  # saved mid",
     "            pass  # saved mid", [T + "test_preemption.py", "-k", "mid_epoch_prints"]),
    ("a resumed run starts the host Adam's beta^t from pow()", "    replay_host_adam_steps(model_engine)\n", "\n",
     [T + "test_preemption.py", "-k", "evaluated_epoch"]),
    ("a mid-epoch resume starts its epoch from the first sample",
     "trainloader.data_sampler.start = first * accumulation * trainloader.batch_size",
     "trainloader.data_sampler.start = 0", [T + "test_preemption.py", "-k", "mid_epoch_prints"]),
    ("a mid-epoch checkpoint drops the log interval in progress", "steps = restore_interval(", "steps = [] or (",
     [T + "test_preemption.py", "-k", "mid_epoch_prints"]),
    ("'latest' names a checkpoint before every rank has written it", "    dist.barrier()  # every rank's files are written\n",
     "\n", [T + "test_preemption.py", "-k", "one_rank"]),
    ("a preempted rank exits 0", "leave(PREEMPTED if tag else 128 + signum)", "leave(0)",
     [T + "test_preemption.py", "-k", "one_rank or without_a_save_dir"]),
    ("--keep-last deletes best", 'for name in ("latest", "best"):', 'for name in ("latest",):',
     [T + "test_preemption.py", "-k", "keep_last"]),
    ("resume accepts a checkpoint of another run", "if saved.get(key) != value]", "if False]",
     [RESUME, "-k", "refused"]),
    # monitors
    ("no gradient norm reaches the monitors", 'events += [("Train/Samples/grad_norm", norm, s)', 'events += [("Train/Samples/gradnorm", norm, s)',
     [WATCH, "-k", "tensorboard_holds"]),
    ("the printed gradient norm is the last, not the interval's mean", "grad norm {sum(finite) / len(finite):.3f}",
     "grad norm {finite[-1]:.3f}", [WATCH, "-k", "tensorboard_holds"]),
    ("--metrics-dir writes nothing", 'config[key] = {"enabled": True, "output_path": folder',
     'config[key] = {"enabled": False, "output_path": folder', [LAUNCH, "-k", "writes_metrics"]),
    # compile
    ("compile_model does not compile", "        model_engine.compile(backend=backend)\n", "\n",
     [T + "test_compile.py", "-k", "follows_the_eager and dense"]),
    # stop and leave
    ("an error every rank meets exits 0", "    leave(1)\n", "    leave(0)\n", [LAUNCH, "-k", "offline"]),
    ("DeepSpeed's /dev/shm buffers are left to fill the host's memory", "    release_shared_memory()\n", "\n",
     [LAUNCH, "-k", "offline"]),
    # a GPU box
    ("a GPU torch cannot use trains on the CPU in silence", "    if gpu_problem:\n        stop(gpu_problem)\n", "\n",
     [LAUNCH, "-k", "torch_cannot_use"]),
    ("a GPU nvidia-smi lists is not looked for", "if not names and not names_a_gpu:", "if not names_a_gpu:",
     [LAUNCH, "-k", "driver_older"]),
    ("the torch for a driver comes from an index one CUDA too new", "if major >= least), None)",
     "if major + 10 >= least), None)", [LAUNCH, "-k", "driver_older"]),
    ("a taken port is a traceback", 'if "EADDRINUSE" not in str(e):', "if True:", [LAUNCH, "-k", "taken_port"]),
    ("the first line does not name the accelerator", "        print(accelerator_line())\n", "        pass\n",
     [LAUNCH, "-k", "first_line_says"]),
    # the fp16 note and the cores
    ("fp16 is refused where DeepSpeed finds no native support", "accelerator.is_fp16_supported = lambda: True", "pass",
     [CONFIG, "-k", "fp16_runs_everywhere"]),
    ("every rank takes every core", "max(1, len(os.sched_getaffinity(0)) // local_size)", "len(os.sched_getaffinity(0))",
     [CONFIG, "-k", "share_of_the_cores"]),
]


def scratch_checkout(folder):
    """The files git tracks or would track (as they are in the working tree), copied into `folder`."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, folder / name)


def run_mutant(folder, original, old, new, selection, timeout):
    script = folder / SCRIPT
    assert original.count(old) == 1, f"the mutant's text is in the script {original.count(old)} times: {old!r}"
    script.write_text(original.replace(old, new))
    start = time.monotonic()
    try:
        result = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *selection],
                                cwd=folder, capture_output=True, text=True, timeout=timeout)
        outcome = "survived" if result.returncode == 0 else "caught"
        if result.returncode in (4, 5):  # usage error, no test collected: the selection is wrong, not the script
            outcome = f"no tests (exit {result.returncode})"
    except subprocess.TimeoutExpired:
        outcome = "caught (timed out)"
    finally:
        script.write_text(original)
    return outcome, time.monotonic() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", default="", help="only the mutants whose description contains this")
    parser.add_argument("--list", action="store_true", help="list the mutants and their selections")
    parser.add_argument("--timeout", type=int, default=900, help="seconds for one selection (default: 900)")
    options = parser.parse_args()
    mutants = [m for m in MUTANTS if options.k in m[0]]
    if options.list:
        for what, _, _, selection in mutants:
            print(f"{what}: {' '.join(selection)}")
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        scratch_checkout(folder)
        original = (folder / SCRIPT).read_text()
        results = []
        for what, old, new, selection in mutants:
            outcome, seconds = run_mutant(folder, original, old, new, selection, options.timeout)
            results.append(outcome)
            print(f"{outcome:>20s} {seconds:6.0f} s  {what}  [{' '.join(selection)}]", flush=True)
    caught = sum(outcome.startswith("caught") for outcome in results)
    print(f"{caught} caught, {len(results) - caught} survived, of {len(results)} mutants")


if __name__ == "__main__":
    main()
