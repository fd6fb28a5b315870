"""Mutation check: does the suite fail when the script or its package is wrong?

    python bench/mutants.py            # every mutant
    python bench/mutants.py --list     # the mutants and their test selections
    python bench/mutants.py -k seed    # the mutants whose name contains "seed"

Each mutant is one exact text replacement in the file it names (the script, a module of cifar10ds/, a tool,
a run script), a small deliberate mistake in one of its key behaviours, with the tests expected to catch it.
For each, the tracked files are copied into a scratch checkout, the replacement applied (it must match
exactly once), and the selection run with pytest. Caught: the selection fails. Survived: it passes. Run by hand, not in CI; TESTING.md
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
T = "tests/"
LESSON, OPTIONS, DATA, LAUNCH = T + "test_cifar10_deepspeed.py", T + "test_options.py", T + "test_data.py", T + "test_launch.py"
MACHINE, FIXES, CHECKPOINTS, METRICS = T + "test_machine.py", T + "test_fixes.py", T + "test_checkpoints.py", T + "test_metrics.py"
FOLDER_TESTS = T + "test_folders.py"
MODEL_FILES, MOVES = T + "test_model_files.py", [T + "test_checkpoint_moves.py", "-k", "goes_on"]
LAYOUT_EP2 = [T + "test_layouts.py", "-k", "fp32-zero0-top2-w2-ep2-acting"]
ROUTES = [METRICS, "-k", "independent_count and 2"]
SCRIPT, PACKAGE = "cifar10_deepspeed.py", "cifar10ds/"
CONFIG, CHECKPOINT, DATASETS, FIX = PACKAGE + "options.py", PACKAGE + "checkpoints.py", PACKAGE + "data.py", PACKAGE + "fixes.py"
RANKS, ACCELERATOR, LINES, FILES = PACKAGE + "launch.py", PACKAGE + "machine.py", PACKAGE + "metrics.py", PACKAGE + "model_files.py"
FOLDERS = PACKAGE + "folders.py"

# (what the mistake is, the file it is in, the text there, what it becomes, the tests that must catch it)
MUTANTS = [
    # the config
    ("train_batch_size is not the reference's 16", SCRIPT, '"train_batch_size": 16,', '"train_batch_size": 32,', [LESSON]),
    ("the learning rate is not the reference's", SCRIPT, '"lr": 0.001, "betas"', '"lr": 0.002, "betas"', [LESSON]),
    ("gradient clipping is off", SCRIPT, '"gradient_clipping": 1.0,', '"gradient_clipping": 0.0,', [LESSON]),
    ("--stage is ignored", SCRIPT, '"stage": args.stage or 0,', '"stage": 0,', [LESSON]),
    ("offload keeps no optimizer on the host", CONFIG, 'zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}',
     'zero["offload_optimizer"] = {"device": "none", "pin_memory": True}', [OPTIONS]),
    # refusals
    ("--log-interval 0 is accepted", CONFIG, "if args.log_interval < 1:", "if args.log_interval < 0:", [OPTIONS]),
    ("MoE with ZeRO 3 is accepted", CONFIG, "    if stage == 3:\n", "    if stage == 4:\n", [OPTIONS]),
    ("an expert count the EP size does not divide is accepted", CONFIG, "if n < 1 or n % args.ep_world_size:",
     "if n < 1:", [OPTIONS]),
    ("a world size the EP size does not divide is accepted", CONFIG, "if world_size % args.ep_world_size:",
     "if False:", [OPTIONS]),
    ("a --seed torch's generators cannot take is accepted", CONFIG, "not -2**63 <= args.seed < 2**63",
     "not -2**63 <= args.seed < 2**64", [OPTIONS, "-k", "bad_mixes"]),
    ("RSample with top-2 is accepted", CONFIG, 'args.noisy_gate_policy == "RSample" and args.top_k != 1',
     'args.noisy_gate_policy == "RSample" and args.top_k != 2', [OPTIONS]),
    # Net
    ("PR-MoE's residual flag inverted", SCRIPT, 'use_residual=args.mlp_type == "residual",',
     'use_residual=args.mlp_type != "residual",', [LESSON]),
    ("--top-k is ignored", SCRIPT, "k=args.top_k,", "k=1,", [LESSON]),
    ("the dense head is not the reference's", SCRIPT, "self.fc3 = nn.Linear(84, 10)",
     "self.fc3 = nn.Linear(84, 10, bias=False)", [LESSON]),
    ("no ReLU after fc2", SCRIPT, "x = F.relu(self.fc2(x))", "x = self.fc2(x)", [LESSON]),
    # the loss and accuracy lines
    ("the loss line loses its sign space", LINES, "loss: {mean_loss: .3f}", "loss: {mean_loss:.3f}", [METRICS]),
    ("the batch is not right-aligned in 5", LINES, "{batch: 5d}]", "{batch: 4d}]", [METRICS]),
    ("the overall accuracy floors", LINES, "{100 * sum(class_correct) / total: .0f} %",
     "{100 * sum(class_correct) // total: .0f} %", [METRICS]),
    ("class names are not right-aligned", LINES, 'f"Accuracy of {name:>5s} : {100 * correct',
     'f"Accuracy of {name:<5s} : {100 * correct', [METRICS]),
    # the router's figures
    ("the aux loss is not averaged over every rank's passes", LINES, '"aux_loss": (aux_loss / passes.clamp(min=1))',
     '"aux_loss": (aux_loss / passes.clamp(min=1) * dist.get_world_size())', [METRICS, "-k", "router or aux_loss"]),
    ("expert shares are not normalized", LINES, '"shares": (s / s.sum().clamp(min=1)).tolist()', '"shares": s.tolist()',
     [METRICS, "-k", "router"]),
    ("dropped assignments count as kept", LINES, "routes.flatten() + 1", "routes.flatten().abs() + 1",
     ROUTES),
    ("the figures are one rank's, not all ranks'", LINES, "        dist.all_reduce(totals)\n", "\n", ROUTES),
    ("the host's token and pass counts outlive their interval", LINES,
     "                total.zero_()\n        self.tokens, self.passes = [0] * len(self.gates), [0] * len(self.gates)\n",
     "                total.zero_()\n", [METRICS, "-k", "router or interval"]),
    ("a resumed interval counts its tokens and passes from nothing", LINES,
     "            self.tokens[layer], self.passes[layer] = int(tokens), int(passes)\n", "\n", [METRICS, "-k", "interval"]),
    ("a dead expert is not named", LINES, "if share == 0]", "if share < 0]", ROUTES),
    ("a full disk under the monitors ends the run with a traceback", LINES,
     "        except OSError as e:\n            monitor.enabled = False",
     "        except ZeroDivisionError as e:\n            monitor.enabled = False", [METRICS, "-k", "full_disk"]),
    ("TensorBoard's writer thread prints its traceback of a full disk", LINES,
     "    if monitor.tb_monitor is not None:\n        quiet", "    if False:\n        quiet", [METRICS, "-k", "full_disk"]),
    # data
    ("the other ranks wait out a download in one collective, which times out", ACCELERATOR,
     "working = my_turn and not done.wait(beat)", "working = my_turn and not done.wait()", [DATA, "-k", "slower"]),
    ("a download that stalls hangs the run", DATASETS, "    with stalls_bounded(args) if download else contextlib",
     "    with contextlib", [DATA, "-k", "stalls"]),
    ("a CPU run's loader asks torch to pin its batches, and torch warns", DATASETS,
     "trainloader.pin_memory = trainloader.pin_memory and torch.accelerator.is_available()",
     "trainloader.pin_memory = trainloader.pin_memory", [DATA, "-k", "pins"]),
    ("--seed does not seed the data order", DATASETS, "return 0 if args.seed is None else args.seed",
     "return 0", [LESSON]),
    ("the sampler is not told the epoch", SCRIPT, "trainloader.data_sampler.set_epoch(epoch)",
     "trainloader.data_sampler.set_epoch(0)", [LESSON]),
    ("--seed builds another model on every rank", SCRIPT, "torch.manual_seed(args.seed)  # every rank",
     "torch.manual_seed(args.seed + dist.get_rank())  # every rank", LAYOUT_EP2),
    # evaluation
    ("sharded evaluation reads rank 0's slice on every rank", DATASETS,
     "range(dist.get_rank(), len(testset), dist.get_world_size())", "range(0, len(testset), dist.get_world_size())",
     [LAUNCH, "-k", "sharded"]),
    ("sharded evaluation is not summed over the ranks", SCRIPT, "        dist.all_reduce(class_correct)\n", "\n",
     [LAUNCH, "-k", "sharded"]),
    ("can_shard_eval always says yes", SCRIPT,
     "return not (args.moe and args.ep_world_size > 1) and model_engine.zero_optimization_stage() < 3", "return True",
     [LESSON]),
    # DeepSpeed's fixes
    ("fp16 without ZeRO backpropagates the unscaled loss", FIX, "grad < scaled / 2, grad * scaler.cur_scale, grad",
     "grad < scaled / 2, grad, grad", [FIXES, "-k", "scaled_loss"]),
    ("expert gradients counted on their own rank only", FIX,
     "        if group is not None and dist.get_world_size(expert_parallel_group(group)) > 1:",
     "        if False:", LAYOUT_EP2),
    ("the experts' squares ride the gradient all-reduce unscaled", FIX, ".square().mul(scale).reshape(1)",
     ".square().reshape(1)", LAYOUT_EP2),
    ("the experts' squares that rode the gradient all-reduce are left out", FIX,
     "                squares.append(rode[0])\n", "                pass\n", LAYOUT_EP2),
    ("fp16 is refused where DeepSpeed finds no native support", FIX, "accelerator.is_fp16_supported = lambda: True",
     "pass", [FIXES, "-k", "fp16_runs_everywhere"]),
    ("a resumed run starts the host Adam's beta^t from pow()", SCRIPT, "    fixes.replay_host_adam_steps(model_engine)  #",
     "    pass  #", [CHECKPOINTS, "-k", "replays_the_uninterrupted_run and offload"]),
    # the tensor data path, batch flags and gradient accumulation
    ("the tensor path divides by 256", DATASETS, "return (torch.tensor(255.0,", "return (torch.tensor(256.0,",
     [DATA, "-k", "tensor_path"]),
    ("the tensor path's batch is a channels-last view", DATASETS, ".permute(0, 3, 1, 2).contiguous().float()",
     ".permute(0, 3, 1, 2).float()", [DATA, "-k", "tensor_path"]),
    ("the tensor path is not normalized", DATASETS,
     "        images = images.sub_(mean).div_(std)  #", "        pass  #", [DATA, "-k", "tensor_path"]),
    ("a batch that does not add up is accepted", CONFIG,
     "if not micro or not accum or batch != micro * accum * world_size:", "if not micro or not accum:",
     [OPTIONS, "-k", "batch"]),
    ("--lr does not reach the warm-up's peak", CONFIG, 'scheduler["warmup_max_lr"] = args.lr', "pass",
     [OPTIONS, "-k", "batch"]),
    ("the loss line counts micro-batches", SCRIPT, "i = micro_step // accumulation", "i = micro_step",
     [LESSON, "-k", "accumulation"]),
    ("an optimizer step's loss is its last micro-batch's", SCRIPT, "torch.stack(micro_losses).mean()",
     "micro_losses[-1]", [LESSON, "-k", "accumulation"]),
    # checkpoints, resume and preemption
    ("--init-from gives every rank the first experts", FILES,
     "f\"deepspeed_experts.{ep_rank * per_rank + int(match.group(2))}.\")",
     "f\"deepspeed_experts.{int(match.group(2))}.\")", [MODEL_FILES, "-k", "init_from"]),
    ("a checkpoint records the epoch it finished as the one to redo", CHECKPOINT,
     '{"epoch": epoch + 1 if step is None else epoch,', '{"epoch": epoch,', [CHECKPOINTS, "-k", "replays"]),
    ("resume does not restore the random-number state",  # both: on a CPU the accelerator's state is torch's
     CHECKPOINT, "    set_rng_state(start.rank_state)\n", "    pass\n", [CHECKPOINTS, "-k", "moe-ep2-zero2-offload"]),
    ("a run resumed mid-epoch draws the loader's seed again", SCRIPT,
     "                checkpoints.set_rng_state(start.rank_state)  # saved mid",
     "                pass  # saved mid", [CHECKPOINTS, "-k", "mid_epoch_prints"]),
    ("a mid-epoch resume starts its epoch from the first sample", SCRIPT,
     "trainloader.data_sampler.start = first * accumulation * trainloader.batch_size",
     "trainloader.data_sampler.start = 0", [CHECKPOINTS, "-k", "mid_epoch_prints"]),
    ("a mid-epoch checkpoint drops the log interval in progress", LINES,
     "self.steps = self.restore(interval) if interval else []", "self.steps = []",
     [CHECKPOINTS, "-k", "mid_epoch_prints"]),
    ("'latest' names a checkpoint before every rank has written it", CHECKPOINT,
     "    stop_if_any_failed(failures, args.save_dir, tag)\n    if dist.get_rank() == 0:\n        recorded(replace_file)",
     "    if dist.get_rank() == 0:\n        recorded(replace_file)", [CHECKPOINTS, "-k", "one_rank"]),
    ("torch.save's RuntimeError on a full disk raises on its rank alone", CHECKPOINT,
     "                except Exception as e:  # OSError,", "                except OSError as e:  # OSError,",
     [CHECKPOINTS, "-k", "inside_torch_save or rank_1_alone"]),
    ("a failed save leaves its partial checkpoint", CHECKPOINT, "        shutil.rmtree(folder, ignore_errors=True)\n",
     "        pass\n", [CHECKPOINTS, "-k", "disk or rank_1_alone"]),
    ("a failed write of 'latest' leaves its partial file", FILES, "            os.remove(partial)\n",
     "            pass\n", [CHECKPOINTS, "-k", "latest_on_a_full_disk"]),
    ("Ctrl-C is not a stop signal", PACKAGE + "preemption.py", "SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)",
     "SIGNALS = (signal.SIGTERM, signal.SIGUSR1)", [CHECKPOINTS, "-k", "ctrl_c"]),
    ("a second Ctrl-C is ignored", PACKAGE + "preemption.py", "                raise KeyboardInterrupt\n", "                pass\n",
     [CHECKPOINTS, "-k", "second_ctrl_c"]),
    ("a signal during start-up is forgotten", SCRIPT,
     "        train(model_engine, trainloader, testset, args, start, signals)",
     "        train(model_engine, trainloader, testset, args, start)", [CHECKPOINTS, "-k", "start_up"]),
    ("a scheduler's signal during the final test ends the run in silence", SCRIPT, "signals.close(signal.SIGINT)",
     "signals.close()", [CHECKPOINTS, "-k", "final_test"]),
    ("a move to another layout starts the fp16 loss scale afresh", PACKAGE + "universal.py",
     'if key in ("loss_scaler", "dynamic_loss_scale")} if os.path.isfile(first)', "if key in ()} if os.path.isfile(first)",
     MOVES[:1] + ["-k", "fp16"]),
    ("a fix whose DeepSpeed target is gone patches nothing, in silence", FIX, "    if not hasattr(owner, name):",
     "    if False:", [FIXES, "-k", "target_changed"]),
    ("DeepSpeed warns of the reference's cpu_offload twice a run", CONFIG,
     '    zero.pop("cpu_offload", None)  # the reference', "    pass  # the reference", [LAUNCH, "-k", "plain_python"]),
    ("normalizing reads the device on every batch (torchvision's check of std)", DATASETS,
     "        images = images.sub_(mean).div_(std)  #", "        images = transforms.functional.normalize(images, MEAN, STD)  #",
     [LESSON, "-k", "reads_nothing"]),
    ("the clipping fix branches on the device's value", FIX, "        model_engine._global_grad_norm = norm\n",
     "        model_engine._global_grad_norm = norm\n        if norm < model_engine.gradient_clipping():\n"
     "            return\n", [LESSON, "-k", "reads_nothing"]),
    ("the router reads the capacity back every step", LINES, "        self.capacity[layer].add_(capacity)",
     "        self.capacity[layer].add_(float(capacity))", [LESSON, "-k", "reads_nothing"]),
    ("the preemption agreement reads its all-reduce at once, a blocking read", PACKAGE + "preemption.py",
     "        agreed = self.collected()\n        self.post()\n        return agreed\n",
     "        self.post()\n        return int(torch.from_numpy(self.posted[1]).item()) and self.collected()\n",
     [LESSON, "-k", "two_ranks_reads"]),
    ("one rank all-reduces its gradients with themselves", SCRIPT,
     "    fixes.skip_the_gradient_all_reduce_on_one_rank(model_engine)", "    pass  #", [FIXES, "-k", "reduces_no_gradient"]),
    ("every step looks for NVML where it cannot load", SCRIPT, "    fixes.stop_probing_a_missing_nvml()  #",
     "    pass  #", [FIXES, "-k", "nvidias_driver"]),
    ("the NVML check is dropped where NVML loads", FIX, "        ctypes.CDLL(NVML)\n    except OSError:",
     "        raise OSError\n    except OSError:", [FIXES, "-k", "nvml_check"]),
    ("DeepSpeed's throughput timer waits for the device twice a step", SCRIPT,
     "    machine.time_steps_without_synchronizing(config)  #", "    pass  #", [MACHINE, "-k", "40_steps"]),
    ("a config's synchronized throughput timer is overruled", ACCELERATOR, '.setdefault("synchronized", False)',
     '["synchronized"] = False', [MACHINE, "-k", "throughput_timer"]),
    ("two runs write into one save dir", SCRIPT, "        folders.claim(args)  #",
     "        pass  #", [FOLDER_TESTS, "-k", "live_runs_folders"]),
    ("an array's jobs on one node share the port 29500", "run_slurm.sbatch",
     "${MASTER_PORT:-$(python3 cifar10ds/launch.py free-port)}", "${MASTER_PORT:-29500}", [CHECKPOINTS, "-k", "arrays_jobs"]),
    ("a MASTER_PORT given that another run holds reaches the ranks", "run_slurm.sbatch",
     'free-port ${MASTER_PORT:+"$MASTER_PORT"})', 'free-port)', [CHECKPOINTS, "-k", "given_master_port"]),
    ("a launcher's SIGTERM goes unheard by a rank waiting for its peers", SCRIPT,
     "        with machine.stop_if_the_port_is_taken(), signals.sigterm_ends_the_wait_for_peers():",
     "        with machine.stop_if_the_port_is_taken():", [LAUNCH, "-k", "taken_port_stops"]),
    ("two runs write into one metrics dir", FOLDERS, '[("--save-dir", args.save_dir), *series_folders(args)]',
     '[("--save-dir", args.save_dir)]', [FOLDER_TESTS, "-k", "live_runs_folders"]),
    ("predict.py compiles DeepSpeed's shared-memory all-reduce on a first run", "predict.py",
     "        fixes.skip_the_shared_memory_all_reduce()\n", "", [MODEL_FILES, "-k", "predict_evaluates"]),
    ("a free port is the kernel's pick, which any connection may take before the run binds it", RANKS,
     "below = range(LOWEST_PORT, max(LOWEST_PORT, ephemeral_ports_start()))", "below = range(0)",
     [LAUNCH, "-k", "below_the_ephemeral"]),
    ("predict.py's answers share stdout with DeepSpeed's log lines", "predict.py",
     "with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed logs", "with contextlib.nullcontext():  #",
     [MODEL_FILES, "-k", "stdout_holds"]),
    ("predict.py under | head ends in a traceback", "predict.py", "    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  #",
     "    pass  #", [MODEL_FILES, "-k", "stdout_holds"]),
    ("nohup's ignored SIGHUP is taken for a preemption", PACKAGE + "preemption.py",
     "SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)",
     "SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP)", [CHECKPOINTS, "-k", "closed_terminal"]),
    # files from elsewhere and bad input
    ("checkpoint files are read with weights_only=False", FILES,
     'return torch.load(path, map_location="cpu", weights_only=True)',
     'return torch.load(path, map_location="cpu", weights_only=False)', [MODEL_FILES, "-k", "runs_code"]),
    ("a 'latest' naming no checkpoint is taken for a checkpoint without run.json", CHECKPOINT,
     "    if not tag or not os.path.isdir(path):", "    if False:", [CHECKPOINTS, "-k", "names_no_checkpoint"]),
    ("--resume hands DeepSpeed files it has not read safely", CHECKPOINT, "        model_files.check_files(path)  #",
     "        pass  #", [MODEL_FILES, "-k", "runs_code"]),
    ("--save-dir and --data-dir are not checked at the start", CONFIG,
     " or folders.check_directories(args)\n              or", " or", [FOLDER_TESTS, "-k", "cannot_hold_files"]),
    ("--metrics-dir is not checked at the start", FOLDERS,
     '        ("--metrics-dir", args.metrics_dir, "cannot hold the metrics"),\n', "", [FOLDER_TESTS, "-k", "cannot_hold_files"]),
    ("a new run writes over an earlier run's checkpoints", FOLDERS, "if latest and os.path.isfile(latest):", "if False:",
     [FOLDER_TESTS, "-k", "earlier_run"]),
    ("a new run's series join an earlier run's", FOLDERS, "        if holds_series(folder):\n", "        if False:\n",
     [FOLDER_TESTS, "-k", "earlier_run"]),
    ("--resume is refused on the run it continues", FOLDERS, "    if args.resume:\n        return None\n    latest", "    latest",
     [FOLDER_TESTS, "-k", "earlier_run"]),
    ("--resume auto appends to the series of the job before it in an array", FOLDERS,
     "        if holds_series(folder) and earlier.get(", "        if False and earlier.get(", [FOLDER_TESTS, "-k", "earlier_run"]),
    ("a run refused for another run's series writes its record over that run's", FOLDERS,
     "        if not any(found):\n            write_record()\n", "        write_record()\n", [FOLDER_TESTS, "-k", "earlier_run"]),
    ("predict.py drops the tokens over an expert's capacity from a batch of images", "predict.py",
     '{**exported["model"], "drop_tokens": False} if keep_every_token', '{**exported["model"]} if keep_every_token',
     [MODEL_FILES, "-k", "its_own_answer"]),
    ("predict.py --test-set drops other tokens on each call", "predict.py", "        torch.manual_seed(0)\n", "",
     [MODEL_FILES, "-k", "as_the_run_did"]),
    ("predict.py prints DeepSpeed's line on its expert group among the answers", "predict.py",
     "        with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed prints the group", "        with contextlib.nullcontext():  #",
     [MODEL_FILES, "-k", "its_own_answer"]),
    ("predict.py's Ctrl-C says a training run's checkpoints were not saved", "predict.py",
     "machine.exit_without_teardown(after_ctrl_c=None)", "machine.exit_without_teardown()", [MODEL_FILES, "-k", "ctrl_c"]),
    ("a full --data-dir is told to hold the archive", DATASETS, "    if getattr(error, \"errno\", None) == errno.ENOSPC:",
     "    if False:", [DATA, "-k", "fills"]),
    ("two runs on one --data-dir download and unpack CIFAR-10 together", DATASETS,
     "            wait_for_download_lock(fd, args.data_dir)", "            pass", [DATA, "-k", "beside"]),
    ("a read-only --data-dir stops the run: no lock file can be made there", DATASETS,
     "    except OSError:\n        return None\n", "    finally:\n        pass\n", [DATA, "-k", "read_only"]),
    ("a config DeepSpeed asserts on reaches deepspeed.initialize", CONFIG,
     "        DeepSpeedConfig(copy.deepcopy(config))\n", "        pass\n", [OPTIONS, "-k", "deepspeed_refuses"]),
    ("DeepSpeed's shared-memory all-reduce is built and left in /dev/shm", FIX,
     "    module.build_shm_op = lambda: None\n", "    pass\n", [DATA, "-k", "offline"]),
    ("a peer that never joins is a traceback", ACCELERATOR,
     "if not (isinstance(e, torch.distributed.DistError) or \"gloo\" in str(e)):", "if True:",
     [MACHINE, "-k", "never_comes"]),
    ("a preempted rank exits 0", PACKAGE + "preemption.py", "status = PREEMPTED if tag", "status = 0 if tag",
     [CHECKPOINTS, "-k", "one_rank or slurms_time_limit"]),
    ("--keep-last deletes best", CHECKPOINT, 'for name in ("latest", "best"):', 'for name in ("latest",):',
     [CHECKPOINTS, "-k", "keep_last"]),
    ("resume accepts a checkpoint of another run", CHECKPOINT, "if saved.get(key) != value and key not in LAYOUT + POSITION]",
     "if False]", [CHECKPOINTS, "-k", "refused"]),
    ("a mid-epoch resume in another batch starts at the saved step, not sample", CHECKPOINT,
     'Position(client_state["epoch"], samples // batch, rank_state)',
     'Position(client_state["epoch"], client_state.get("step", 0), rank_state)', [CHECKPOINTS, "-k", "another_batch"]),
    ("a resumed run's first throughput line counts the saved run's steps as its own", LINES,
     "(samples - self.interval_samples) / seconds", "self.args.log_interval * engine.train_batch_size() / seconds",
     [CHECKPOINTS, "-k", "another_batch"]),
    ("a --save-dir local to each node is accepted", FOLDERS, "    stop_unless_every_node_shares(args.save_dir, found[2])\n",
     "", [CHECKPOINTS, "-k", "two_nodes"]),
    ("rank 0 reopens the save dir's lock file to read it, which releases its lock", FOLDERS,
     "found[2] = written_in_lock(args.save_dir)", "found[2] = args.save_dir and read_lock(args.save_dir)",
     [FOLDER_TESTS, "-k", "live_runs"]),
    ("a mid-epoch resume goes on in another data order", CHECKPOINT, 'if seed != now["data_order_seed"]:', "if False:",
     [CHECKPOINTS, "-k", "another_batch"]),
    # monitors
    ("no gradient norm reaches the monitors", LINES, 'events += [("Train/Samples/grad_norm", norm, s)',
     'events += [("Train/Samples/gradnorm", norm, s)', [METRICS, "-k", "tensorboard_holds"]),
    ("the printed gradient norm is the last, not the interval's mean", LINES, "grad norm {sum(finite) / len(finite):.3f}",
     "grad norm {finite[-1]:.3f}", [METRICS, "-k", "tensorboard_holds"]),
    ("--metrics-dir writes nothing", LINES, 'config[key] = {"enabled": True, "output_path": folder',
     'config[key] = {"enabled": False, "output_path": folder', [METRICS, "-k", "writes_metrics"]),
    # the machine
    ("compile_model does not compile", ACCELERATOR, "        model_engine.compile(backend=backend)\n", "\n",
     [MACHINE, "-k", "follows_the_eager and dense"]),
    ("an error every rank meets exits 0", ACCELERATOR, "def stop(line, status=1, every_rank=False):",
     "def stop(line, status=0, every_rank=False):", [DATA, "-k", "offline"]),
    ("a GPU torch cannot use trains on the CPU in silence", ACCELERATOR,
     "    if problem:\n        stop(f\"error: {problem}\")\n", "\n", [MACHINE, "-k", "torch_cannot_use"]),
    ("a GPU nvidia-smi lists is not looked for", ACCELERATOR, "if not names and not names_a_gpu:",
     "if not names_a_gpu:", [MACHINE, "-k", "driver_older"]),
    ("the torch for a driver comes from an index one CUDA too new", ACCELERATOR, "if major >= least), None)",
     "if major + 10 >= least), None)", [MACHINE, "-k", "driver_older"]),
    ("a taken port is a traceback", ACCELERATOR, 'if "EADDRINUSE" not in str(e):', "if True:",
     [LAUNCH, "-k", "taken_port"]),
    ("the first line does not name the accelerator", ACCELERATOR,
     "        print(f\"{accelerator_line()}; optimizer: {optimizer}\", flush=True)\n", "        pass\n",
     [MACHINE, "-k", "first_line_says"]),
    ("fp16 master weights without a compiler crash in deepspeed.initialize", ACCELERATOR,
     "        load_cpu_adam()\n", "        pass\n", [MACHINE, "-k", "fp16_master_weights_stop"]),
    ("every rank takes every core", RANKS, "max(1, len(os.sched_getaffinity(0)) // local_size)",
     "len(os.sched_getaffinity(0))", [LAUNCH, "-k", "share_of_the_cores"]),
    # --resume into another layout
    ("a move restarts Adam's moments", PACKAGE + "universal.py", 'torch.save({"param": value.clone(), "cat_dim": 0}',
     'torch.save({"param": value.clone() if key == "fp32" else 0 * value, "cat_dim": 0}', MOVES),
    ("a move gives each expert-parallel rank the first experts' states (#6589)", FIX,
     "names.update({p: name for p, name in model_files.global_names(model_engine.module).items() if p in names})",
     "pass", MOVES),
    ("a move gives the experts of one expert-parallel rank another's masters and moments", FILES,
     "add_piece(pieces, global_expert_name(name, rank % ep, ep,", "add_piece(pieces, global_expert_name(name, (rank + 1) % ep, ep,",
     MOVES),
]


def scratch_checkout(folder):
    """The files git tracks or would track (as they are in the working tree), copied into `folder`."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, folder / name)


def run_mutant(folder, file, old, new, selection, timeout):
    path = folder / file
    original = path.read_text()
    assert original.count(old) == 1, f"the mutant's text is in {file} {original.count(old)} times: {old!r}"
    path.write_text(original.replace(old, new))
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
        path.write_text(original)
    return outcome, time.monotonic() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", default="", help="only the mutants whose description contains this")
    parser.add_argument("--list", action="store_true", help="list the mutants and their selections")
    parser.add_argument("--timeout", type=int, default=900, help="seconds for one selection (default: 900)")
    options = parser.parse_args()
    mutants = [m for m in MUTANTS if options.k in m[0]]
    if options.list:
        for what, file, _, _, selection in mutants:
            print(f"{what} ({file}): {' '.join(selection)}")
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        scratch_checkout(folder)
        results = []
        for what, file, old, new, selection in mutants:
            outcome, seconds = run_mutant(folder, file, old, new, selection, options.timeout)
            results.append(outcome)
            print(f"{outcome:>20s} {seconds:6.0f} s  {what} ({file})  [{' '.join(selection)}]", flush=True)
    caught = sum(outcome.startswith("caught") for outcome in results)
    print(f"{caught} caught, {len(results) - caught} survived, of {len(results)} mutants")


if __name__ == "__main__":
    main()
