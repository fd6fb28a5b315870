"""The flags beyond the reference, the DeepSpeed config they and a --deepspeed_config file make, and the mixes
refused before any work (docs/config.md, docs/offload.md)."""

import argparse
import copy
import json
import logging
import os

from deepspeed.runtime.config import DeepSpeedConfig
from deepspeed.utils import logger

from cifar10ds import folders, launch, machine

DTYPES = ("bf16", "fp16", "fp32")


class ArgumentParser(argparse.ArgumentParser):
    """argparse that states a bad flag in one line, without the long usage text."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def noisy_gate_policy(value):
    if value == "None":
        return None
    if value not in ("RSample", "Jitter"):
        raise argparse.ArgumentTypeError(f"invalid choice: {value!r} (choose from 'None', 'RSample', 'Jitter')")
    return value


def resume_mode(value):
    if value != "auto":
        raise argparse.ArgumentTypeError(f"invalid choice: {value!r} (give --resume alone, or --resume auto)")
    return value


def add_flags(parser):
    """The flags beyond the reference; their defaults keep the reference's behaviour."""
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", default="cifar10", choices=["cifar10", "synthetic"],
                      help="cifar10 (downloaded by rank 0) or synthetic (generated, no network)")
    data.add_argument("--data-dir", default="./data", help="where CIFAR-10 is, or is downloaded to (default: ./data)")
    data.add_argument("--synthetic-train-size", default=5000, type=int, help="synthetic training images (default: 5000)")
    data.add_argument("--synthetic-test-size", default=1000, type=int, help="synthetic test images (default: 1000)")
    data.add_argument("--data-path", default="tensor", choices=["tensor", "pil"],
                      help="tensor: the set decoded once into one uint8 tensor, each batch gathered from it and "
                           "normalized on the accelerator; pil: torchvision's per-image transforms, for your own PIL "
                           "transforms (default: tensor; the same numbers either way)")
    data.add_argument("--data-workers", default=None, type=int,
                      help="data-loader worker processes per rank (default: 0 on the tensor path and on DeepSpeed's "
                           "CPU accelerator, else chosen from the rank's cores)")
    data.add_argument("--seed", default=None, type=int,
                      help="seed for model init, gate noise and data order; every rank builds the same initial model, "
                           "then each rank but 0 reseeds its gate noise with seed + rank (default: unseeded, "
                           "data order seed 0)")

    batch = parser.add_argument_group("batch and learning rate")
    batch.add_argument("--batch-size", default=None, type=int,
                       help="global batch: train_batch_size (default: 16; with --deepspeed_config, the file's)")
    batch.add_argument("--micro-batch", default=None, type=int,
                       help="batch per rank and step: train_micro_batch_size_per_gpu (default: the global batch over "
                            "the data-parallel ranks and accumulation steps)")
    batch.add_argument("--grad-accum", default=None, type=int,
                       help="micro-batches per optimizer step: gradient_accumulation_steps (default: 1)")
    batch.add_argument("--lr", default=None, type=float,
                       help="the optimizer's lr and WarmupLR's warmup_max_lr (default: 1e-3; with --deepspeed_config, "
                            "the file's)")

    moe = parser.add_argument_group("MoE levers")
    moe.add_argument("--moe-aux-loss-coef", default=0.0, type=float,
                     help="add C times the MoE layers' gate aux (load-balancing) loss to the loss (default: 0)")
    moe.add_argument("--capacity-factor", default=1.0, type=float,
                     help="expert capacity in training, as a multiple of tokens / experts (default: 1.0)")
    moe.add_argument("--eval-capacity-factor", default=1.0, type=float,
                     help="expert capacity in evaluation (default: 1.0)")
    moe.add_argument("--drop-tokens", default=True, action=argparse.BooleanOptionalAction,
                     help="drop the tokens past an expert's capacity (default: drop)")
    moe.add_argument("--drop-warning", default=25.0, type=float, metavar="PCT",
                     help="warn when an MoE layer drops more than PCT %% of its token assignments over a log "
                          "interval (default: 25)")

    runs = parser.add_argument_group("checkpoints, evaluation and metrics")
    runs.add_argument("--save-dir", default=None,
                      help="save a DeepSpeed checkpoint here at the end of every epoch, and mid-epoch on SIGTERM or "
                           "SIGUSR1 (then exit 75)")
    runs.add_argument("--resume", default=False, nargs="?", const=True, type=resume_mode, metavar="auto",
                      help="continue from the newest checkpoint in --save-dir, mid-epoch or not; with auto, start "
                           "afresh where --save-dir holds none yet (for requeued jobs and torchrun --max-restarts)")
    runs.add_argument("--keep-last", default=None, type=int, metavar="N",
                      help="after each save, delete all but the newest N checkpoints, never the one 'latest' or "
                           "'best' names (default: keep all)")
    runs.add_argument("--init-from", default=None, metavar="MODEL_OR_CHECKPOINT",
                      help="start a new run from the weights of a model file of export_model.py, or of a checkpoint "
                           "of any world size, EP size, ZeRO stage or dtype; the optimizer starts fresh")
    runs.add_argument("--eval-every", default=0, type=int, help="evaluate every N epochs (default: 0, only at the end)")
    runs.add_argument("--metrics-dir", default=None,
                      help="write metrics as CSV files here with DeepSpeed's CSV monitor (plot: plot_metrics.py)")
    runs.add_argument("--tensorboard-dir", default=None,
                      help="write the same metrics as TensorBoard event files here, with DeepSpeed's TensorBoard "
                           "monitor (view: tensorboard --logdir DIR)")
    runs.add_argument("--progress", default=True, action=argparse.BooleanOptionalAction,
                      help="a live bar of each epoch's steps on rank 0 when its output is a terminal "
                           "(default: on; never in logs or pipes)")

    machines = parser.add_argument_group("ZeRO-Offload, speed and several processes")
    machines.add_argument("--offload", default=None, choices=["none", "cpu"],
                          help="cpu: ZeRO-Offload, the optimizer's state and step on the host (ZeRO stages 1-3), and "
                               "at stage 3 the parameters too (default: none; with --deepspeed_config, the file's)")
    machines.add_argument("--compile", default=False, action="store_true",
                          help="compile the model with torch.compile through DeepSpeed's engine.compile() "
                               "(default: eager)")
    machines.add_argument("--dist-timeout", default=None, type=float, metavar="MINUTES",
                          help="how long a rank waits for its peers in a collective before the run fails "
                               "(default: DeepSpeed's, 10)")


BATCH_FLAGS = {"--batch-size": "train_batch_size", "--micro-batch": "train_micro_batch_size_per_gpu",
               "--grad-accum": "gradient_accumulation_steps"}
OFFLOADED = {"offload_optimizer": "the optimizer's state and step", "offload_param": "the parameters"}


def write_flags(config, args):
    """Write --offload, the batch flags and --lr, where given, into a config; return a note of each value they
    overrode."""
    notes = []
    if args.offload == "cpu" and offload_device(config.get("zero_optimization", {})) == "none":
        zero = config.setdefault("zero_optimization", {})
        offload_to_cpu(zero, parameters=zero.get("stage", 0) == 3)
        notes.append("--offload cpu adds ZeRO-Offload")
    if args.micro_batch and args.grad_accum and args.batch_size is None and "train_batch_size" in config:
        notes.append(f"--micro-batch and --grad-accum set the global batch, its {config.pop('train_batch_size')}")
    for flag, key in BATCH_FLAGS.items():
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None:
            if key in config and config[key] != value:
                notes.append(f"{flag} {value} overrides its {config[key]}")
            config[key] = value
    if args.lr is not None:
        optimizer = config.setdefault("optimizer", {}).setdefault("params", {})
        if optimizer.get("lr", args.lr) != args.lr:
            notes.append(f"--lr {args.lr:g} overrides its {optimizer['lr']:g}")
        optimizer["lr"] = args.lr
        scheduler = config.get("scheduler", {}).get("params", {})
        if "warmup_max_lr" in scheduler:
            scheduler["warmup_max_lr"] = args.lr
    return notes


def batch_sizes(config, world_size):
    """The global batch, micro-batch and accumulation steps DeepSpeed derives from those the config sets (any one
    or two of them set the rest, as in DeepSpeed's config), over `world_size` data-parallel ranks."""
    batch, micro, accum = (config.get(key) for key in BATCH_FLAGS.values())
    if batch and micro and not accum:
        accum = batch // micro // world_size
    elif batch and accum and not micro:
        micro = batch // world_size // accum
    elif batch and not micro and not accum:
        micro, accum = batch // world_size, 1
    elif micro:
        accum = accum or 1
        batch = batch or micro * accum * world_size
    return batch, micro, accum


def offload_to_cpu(zero, parameters):
    """Set ZeRO-Offload in a config's zero_optimization, as DeepSpeed spells it today: the optimizer's state
    and step on the host, and with `parameters` (ZeRO-3) the parameters too. Memory is pinned where the
    accelerator pins it (DeepSpeed's CPU accelerator leaves host memory as it is). The old switch, "cpu_offload",
    goes."""
    zero.pop("cpu_offload", None)
    zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if parameters:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}


def offload_device(zero):
    """Where a config's zero_optimization offloads to: "none", "cpu" or "nvme" (the old "cpu_offload": true is cpu)."""
    devices = {(zero.get(key) or {}).get("device", "none") for key in OFFLOADED}
    if zero.get("cpu_offload"):
        devices.add("cpu")
    return "+".join(sorted(devices - {"none"})) or "none"


def config_dtype(config):
    """The run's dtype, as the config it trains with says: the one place that decides it."""
    if config.get("bf16", config.get("bfloat16", {})).get("enabled"):
        return "bf16"
    return "fp16" if config.get("fp16", {}).get("enabled") else "fp32"


def load_ds_config(args):
    """The config of a --deepspeed_config file, with --dtype and --stage, where given, over its values, and the
    other flags written in; and a line saying where its dtype and stage came from. --offload cpu adds
    ZeRO-Offload to a file that has none (check_args refuses one that contradicts it)."""
    try:
        with open(args.deepspeed_config) as f:
            config = json.load(f)
    except OSError as e:
        refuse(f"cannot read --deepspeed_config {args.deepspeed_config}: {e.strerror}")
    except ValueError as e:  # json.JSONDecodeError, UnicodeDecodeError
        refuse(f"--deepspeed_config {args.deepspeed_config} is not JSON: {e}")
    if not isinstance(config, dict):
        refuse(f"--deepspeed_config {args.deepspeed_config} is not a JSON object of DeepSpeed's settings")
    notes = []
    if args.dtype is not None and args.dtype != config_dtype(config):
        notes.append(f"--dtype {args.dtype} overrides its {config_dtype(config)}")
        config.pop("bfloat16", None)
        config.setdefault("bf16", {})["enabled"] = args.dtype == "bf16"
        config.setdefault("fp16", {})["enabled"] = args.dtype == "fp16"
    zero = config.setdefault("zero_optimization", {})
    if args.stage is not None and args.stage != zero.get("stage", 0):
        notes.append(f"--stage {args.stage} overrides its stage {zero.get('stage', 0)}")
        zero["stage"] = args.stage
    notes += write_flags(config, args)
    source = "; ".join(notes) or "--dtype/--stage not given"
    note = (f"Using {args.deepspeed_config}: dtype {config_dtype(config)}, ZeRO stage {zero.get('stage', 0)} "
            f"({source})")
    return config, note


def check_args(args, config, world_size):
    """Return why this flag mix cannot run, or None."""
    stage = config.get("zero_optimization", {}).get("stage", 0)
    if args.log_interval < 1:
        return f"--log-interval must be at least 1, got {args.log_interval}"
    if args.epochs < 0:
        return f"--epochs must not be negative, got {args.epochs}"
    if args.synthetic_train_size < 1 or args.synthetic_test_size < 1:
        return "--synthetic-train-size and --synthetic-test-size must be at least 1"
    if args.resume and not args.save_dir:
        return "--resume needs --save-dir, the directory to resume from"
    if args.keep_last is not None and (args.keep_last < 1 or not args.save_dir):
        return f"--keep-last needs --save-dir and at least 1 checkpoint to keep, got {args.keep_last}"
    if args.resume and args.init_from:
        return "--resume continues a run and --init-from starts a new one: give one of them"
    if args.init_from and not os.path.exists(args.init_from):
        return f"--init-from: no model file or checkpoint {args.init_from}"
    if args.seed is not None and not -2**63 <= args.seed < 2**63:
        return f"--seed must fit in 64 bits, as torch's generators take it: from -2**63 to 2**63 - 1, got {args.seed}"
    if args.data_workers is not None and args.data_workers < 0:
        return f"--data-workers must not be negative, got {args.data_workers}"
    if args.eval_every < 0:
        return f"--eval-every must not be negative, got {args.eval_every}"
    if args.dist_timeout is not None and args.dist_timeout <= 0:
        return f"--dist-timeout must be positive, got {args.dist_timeout}"
    if args.capacity_factor <= 0 or args.eval_capacity_factor <= 0:
        return "--capacity-factor and --eval-capacity-factor must be positive"
    if not 0 <= args.drop_warning <= 100:
        return f"--drop-warning must be a percentage from 0 to 100, got {args.drop_warning:g}"
    if args.moe_aux_loss_coef < 0:
        return f"--moe-aux-loss-coef must not be negative, got {args.moe_aux_loss_coef}"
    for flag in (*BATCH_FLAGS, "--lr"):
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None and value <= 0:
            return f"{flag} must be positive, got {value:g}"
    if config.get("fp16", {}).get("enabled") and config.get("bf16", config.get("bfloat16", {})).get("enabled"):
        return "the DeepSpeed config enables both fp16 and bf16; enable one"
    offload = offload_device(config.get("zero_optimization", {}))
    if args.offload is not None and offload != args.offload:
        return (f"--offload {args.offload} contradicts {args.deepspeed_config}, which offloads to {offload}: "
                f"drop --offload or change the file")
    if offload != "none" and stage == 0:
        return f"offloading to the {offload} needs ZeRO stage 1, 2 or 3 (--stage): stage 0 has no ZeRO optimizer to offload"
    if config.get("fp16", {}).get("fp16_master_weights_and_grads") and (
            config_dtype(config) != "fp16" or offload != "cpu"
            or config.get("optimizer", {}).get("params", {}).get("torch_adam")):
        return ("fp16_master_weights_and_grads needs fp16 (--dtype fp16) and ZeRO stage 1, 2 or 3 with the optimizer "
                "offloaded to the cpu (--offload cpu) by DeepSpeed's CPU Adam (not \"torch_adam\")")
    return (check_moe(args, stage, world_size) if args.moe else None) or check_batch(config, world_size)


def check_batch(config, world_size):
    """Why the config's batch settings cannot hold on `world_size` ranks, or None."""
    batch, micro, accum = batch_sizes(config, world_size)
    if not batch and not micro:
        return "the DeepSpeed config sets no batch size: give --batch-size or --micro-batch"
    if not micro or not accum or batch != micro * accum * world_size:
        return (f"the batch does not add up: global batch {batch} != micro-batch {micro} x {accum} accumulation "
                f"steps x {world_size} data-parallel ranks = {(micro or 0) * (accum or 0) * world_size}; "
                f"set --batch-size, --micro-batch and --grad-accum so that it does")
    return None


def check_moe(args, stage, world_size):
    """Why this MoE mix cannot run, or None."""
    if stage == 3:
        return "--moe does not work with ZeRO stage 3: DeepSpeed's MoE supports stages 0, 1 and 2"
    if args.ep_world_size < 1:
        return f"--ep-world-size must be at least 1, got {args.ep_world_size}"
    for n in args.num_experts:
        if n < 1 or n % args.ep_world_size:
            return f"--num-experts {n} is not a positive multiple of --ep-world-size {args.ep_world_size}"
    if world_size % args.ep_world_size:
        return (f"the world size {world_size} is not divisible by --ep-world-size {args.ep_world_size}: "
                f"launch a multiple of {args.ep_world_size} ranks")
    if args.noisy_gate_policy == "RSample" and args.top_k != 1:
        return "--noisy-gate-policy RSample works with --top-k 1 only (DeepSpeed ignores it for top-2); use Jitter"
    return None


def refuse(reason):
    """Stop this rank with the refusal's one line and exit 2: each rank finds it by itself, before any work (no
    rank waits for a peer that has stopped)."""
    machine.stop(f"cifar10_deepspeed.py: error: {reason}", status=2, every_rank=True)


def refuse_bad_input(args, config):
    """Refuse flags, a config or a folder that cannot run, in one line on every rank."""
    reason = (check_args(args, config, launch.world_size()) or folders.check_directories(args)
              or folders.check_earlier_run(args))
    if reason:
        refuse(reason)


def refuse_what_deepspeed_refuses(config):
    """Refuse a config DeepSpeed's own checks reject (a negative batch size, a setting of the wrong type), in one
    line, before any work: DeepSpeed would raise its assertion from deepspeed.initialize on every rank. After
    deepspeed.init_distributed, which gives DeepSpeed the world size the batch is checked against."""
    level = logger.level
    logger.setLevel(logging.WARNING)  # its line on the world size; deepspeed.initialize logs the config
    try:
        DeepSpeedConfig(copy.deepcopy(config))
    except Exception as e:  # AssertionError, pydantic's ValidationError, ...: DeepSpeed refuses this config
        machine.stop(f"cifar10_deepspeed.py: error: DeepSpeed refuses the config: {machine.first_line(e)}", status=2)
    finally:
        logger.setLevel(level)


def read_offload(config):
    """Rewrite the MoE tutorial's "cpu_offload": true as DeepSpeed reads it (offload_optimizer, device cpu), leave
    out the reference's "cpu_offload": false (DeepSpeed's deprecation warning, twice a run, says nothing), and
    return rank 0's line on what ZeRO-Offload keeps on the host, or None when nothing is offloaded."""
    zero = config.get("zero_optimization", {})
    old_spelling = bool(zero.get("cpu_offload"))
    if old_spelling:
        offload_to_cpu(zero, parameters=False)
    zero.pop("cpu_offload", None)  # the reference's "cpu_offload": false, which DeepSpeed warns of twice a run
    places = {}
    for key, what in OFFLOADED.items():
        device = (zero.get(key) or {}).get("device", "none")
        if device != "none":
            places.setdefault(device, []).append(what)
    if not places:
        return None
    offloaded = "; ".join(f"{' and '.join(what)} on the {device}" for device, what in places.items())
    line = f"ZeRO-Offload: {offloaded} (ZeRO stage {zero.get('stage', 0)}"
    if config.get("fp16", {}).get("fp16_master_weights_and_grads"):
        line += ", fp16 master weights and gradients"
    line += ")"
    if old_spelling:
        line += '; the config\'s "cpu_offload": true, as DeepSpeed\'s MoE tutorial writes it, is offload_optimizer device cpu'
    return line
