"""Train a small CNN on CIFAR-10 with DeepSpeed, dense or Mixture of Experts (MoE): a port of the CIFAR-10
example in DeepSpeed's examples collection, with its flags, config, network and printed lines.

    deepspeed --num_gpus=2 cifar10_deepspeed.py --deepspeed --moe --ep-world-size 2 --num-experts 2
    torchrun --standalone --nproc_per_node 2 cifar10_deepspeed.py --deepspeed
    python cifar10_deepspeed.py --deepspeed --dataset synthetic --dtype fp32    # one process, no launcher

This file is the lesson, top to bottom, in the reference's order and its Steps 1 to 4. What a real run needs
beyond it is in the package cifar10ds, one module per subject (options, data, launch, machine, fixes,
checkpoints and universal, preemption, metrics, model_files), called by name. Every place where training
differs from what plain DeepSpeed 0.19.8 would compute is a call here whose name says so, with its upstream
issue: fixes.wrap_torch_adam_as_deepspeed_wraps_its_own, fixes.scale_the_fp16_loss,
fixes.clip_by_the_global_norm, fixes.replay_host_adam_steps, and machine.use_torch_fused_adamw.
"""

import os
import signal

import deepspeed
import deepspeed.comm as dist
import torch
import torch.nn as nn
import torch.nn.functional as F
from deepspeed.accelerator import get_accelerator
from deepspeed.moe.layer import MoE
from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

from cifar10ds import (checkpoints, data, fixes, folders, launch, machine, metrics, model_files, options, preemption,
                       universal)


def add_argument(argv=None):
    """The reference's flags with its defaults, the flags beyond it, and DeepSpeed's (--deepspeed, ...): the
    parsed arguments."""
    parser = options.ArgumentParser(prog="cifar10_deepspeed.py", description="CIFAR-10 with DeepSpeed, dense or MoE")

    # Training, as in the reference.
    parser.add_argument("-e", "--epochs", default=30, type=int, help="number of total epochs (default: 30)")
    parser.add_argument("--local_rank", type=int, default=-1, help="local rank passed from distributed launcher")
    parser.add_argument("--log-interval", type=int, default=2000, help="print the mean loss every N steps")
    parser.add_argument("--dtype", default=None, type=str, choices=options.DTYPES,
                        help="data type: bf16, fp16 or fp32 (default: fp16; with --deepspeed_config, the file's)")
    parser.add_argument("--stage", default=None, type=int, choices=[0, 1, 2, 3],
                        help="ZeRO stage: 0, 1, 2 or 3 (default: 0; with --deepspeed_config, the file's)")

    # Mixture of Experts, as in the reference.
    parser.add_argument("--moe", default=False, action="store_true", help="use DeepSpeed Mixture of Experts")
    parser.add_argument("--ep-world-size", default=1, type=int, help="expert-parallel world size (default: 1)")
    parser.add_argument("--num-experts", type=int, nargs="+", default=[1],
                        help="number of experts per MoE layer, one layer per value (default: 1)")
    parser.add_argument("--mlp-type", type=str, default="standard", choices=["standard", "residual"],
                        help="standard MoE, or residual MoE (PR-MoE with several --num-experts)")
    parser.add_argument("--top-k", default=1, type=int, choices=[1, 2], help="experts each token goes to")
    parser.add_argument("--min-capacity", default=0, type=int,
                        help="minimum capacity of each expert, whatever the capacity factor (default: 0)")
    parser.add_argument("--noisy-gate-policy", default=None, type=options.noisy_gate_policy,
                        metavar="{None,RSample,Jitter}", help="gate noise: RSample (top-1 only) or Jitter")
    parser.add_argument("--moe-param-group", default=False, action="store_true",
                        help="put expert parameters in their own optimizer groups (needed by ZeRO with MoE)")

    options.add_flags(parser)  # beyond the reference: data, batch, MoE levers, checkpoints, metrics, offload, ...
    parser = deepspeed.add_config_arguments(parser)
    return parser.parse_args(argv)


def create_moe_param_groups(model):
    """Split expert parameters into their own optimizer groups (marked moe=True)."""
    parameters = {"params": [p for p in model.parameters()], "name": "parameters"}
    return split_params_into_different_moe_groups_for_optimizer(parameters)


def get_ds_config(args):
    """The reference's DeepSpeed config; --dtype and --stage pick precision and ZeRO stage."""
    dtype = args.dtype or "fp16"
    config = {
        "train_batch_size": 16,
        "steps_per_print": 2000,
        "optimizer": {"type": "Adam",
                      "params": {"lr": 0.001, "betas": [0.8, 0.999], "eps": 1e-8, "weight_decay": 3e-7}},
        "scheduler": {"type": "WarmupLR",
                      "params": {"warmup_min_lr": 0, "warmup_max_lr": 0.001, "warmup_num_steps": 1000}},
        "gradient_clipping": 1.0,
        "prescale_gradients": False,
        "bf16": {"enabled": dtype == "bf16"},
        "fp16": {"enabled": dtype == "fp16", "fp16_master_weights_and_grads": False, "loss_scale": 0,
                 "loss_scale_window": 500, "hysteresis": 2, "min_loss_scale": 1, "initial_scale_power": 15},
        "wall_clock_breakdown": False,
        "zero_optimization": {"stage": args.stage or 0, "allgather_partitions": True, "reduce_scatter": True,
                              "allgather_bucket_size": 50000000, "reduce_bucket_size": 50000000,
                              "overlap_comm": True, "contiguous_gradients": True, "cpu_offload": False},
    }
    options.write_flags(config, args)  # beyond the reference: --offload, --batch-size, --grad-accum, --lr, ...
    return config


class Net(nn.Module):
    """LeNet-style CNN; with --moe its last hidden layer feeds one DeepSpeed MoE layer per --num-experts entry.

    Names and construction order are the reference's, so are its state_dict keys and, after one seed, its weights.
    Every MoE layer gets the one expert template (its experts start as copies of it; PR-MoE layers share it as
    their dense MLP). A forward pass leaves each layer's gate aux loss in `aux_losses`; `router` watches the gates:
    what each expert was sent and kept, what was dropped (cifar10ds/metrics.py, docs/moe.md)."""

    def __init__(self, args):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.moe = args.moe
        if self.moe:
            expert = nn.Linear(84, 84)
            self.moe_layer_list = nn.ModuleList([
                MoE(hidden_size=84, expert=expert, num_experts=n, ep_size=args.ep_world_size,
                    use_residual=args.mlp_type == "residual", k=args.top_k, min_capacity=args.min_capacity,
                    noisy_gate_policy=args.noisy_gate_policy, capacity_factor=args.capacity_factor,
                    eval_capacity_factor=args.eval_capacity_factor, drop_tokens=args.drop_tokens)
                for n in args.num_experts])
            self.aux_losses = []
            self.router = metrics.Router(self.moe_layer_list)
            self.fc4 = nn.Linear(84, 10)
        else:
            self.fc3 = nn.Linear(84, 10)

    def forward(self, x):
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        if not self.moe:
            return self.fc3(x)
        self.aux_losses = []
        for layer in self.moe_layer_list:
            x, aux_loss, _ = layer(x)  # and each expert's token count (self.router reads the gates by a hook)
            self.aux_losses.append(aux_loss)
        return self.fc4(x)


def load_data(args):
    """The training and test sets. CIFAR-10 is downloaded once per data directory, global rank 0 first, while
    every other rank waits, however long it takes; then the first rank of each other node (which finds a shared
    directory complete); then the rest. A failure on any node stops every rank with one line. Generated data
    needs no download."""
    if args.dataset == "synthetic":
        return data.load_datasets(args, download=False)
    first_on_node = launch.local_rank() == 0
    turns = (dist.get_rank() == 0, first_on_node and dist.get_rank() != 0, not first_on_node)

    def load():
        try:
            return data.load_datasets(args, download=first_on_node), None
        except (OSError, RuntimeError) as e:
            return None, data.not_downloaded(args, e)

    datasets = None
    for my_turn in turns:
        loaded, error = machine.take_turn(load, my_turn, machine.dist_timeout(args))  # the others wait
        if error:
            machine.stop(error)
        if my_turn:
            datasets = loaded
    return datasets


def build_engine(args, config, trainset):
    """The Net and the DeepSpeed engine that trains it: the optimizer, the LR schedule, the training loader."""
    if args.seed is not None:
        torch.manual_seed(args.seed)  # every rank builds the same Net: its experts start as one process's would
    net = Net(args)
    if args.init_from:
        model_files.init_from(net, args, Net)  # the weights of a model file or of a checkpoint of any layout
    if args.seed is not None and dist.get_rank():
        torch.manual_seed(args.seed + dist.get_rank())  # every other rank draws gate noise of its own
    parameters = [p for p in net.parameters() if p.requires_grad]
    if args.moe_param_group:
        parameters = create_moe_param_groups(net)  # expert parameters in optimizer groups of their own
    # DeepSpeed#8613, #8588: fp16/bf16 without ZeRO wrap torch's Adam as DeepSpeed wraps its own (FP16_Optimizer),
    # or the clipping norm leaves out the experts' gradients and keeps the loss scale.
    fixes.wrap_torch_adam_as_deepspeed_wraps_its_own()
    machine.time_steps_without_synchronizing(config)  # DeepSpeed's throughput timer waited for the device twice a step
    model_engine, optimizer, trainloader, __ = deepspeed.initialize(
        args=args, model=net, model_parameters=parameters, training_data=trainset,
        collate_fn=data.collate_fn(trainset), config=config)
    fixes.scale_the_fp16_loss(model_engine)  # DeepSpeed#8393: fp16 without ZeRO, or every update is 32768x too small
    fixes.clip_by_the_global_norm(model_engine)  # DeepSpeed#8475: fp32 without ZeRO, or EP clips by the wrong norm
    fixes.skip_the_gradient_all_reduce_on_one_rank(model_engine)  # the same sums, a tenth of a CPU step less
    metrics.train_on_when_the_monitors_cannot_write(model_engine, args)  # a full disk turns them off, in one line

    if args.init_from and args.moe and (problem := model_files.check_expert_ranks(args)):
        machine.stop(f"error: --init-from: {problem}", every_rank=True)
    data.prepare_loader(trainloader, args)  # a sampler that --resume can start mid-epoch; --seed; loader workers
    return model_engine, trainloader


def train_step(model_engine, criterion, inputs, labels, aux_loss_coef=0.0):
    """One step of the reference's loop, plus the MoE aux loss when asked; returns the loss, still on the device.

    The inputs move to the engine's device and, in fp16 or bf16, to its dtype."""
    inputs = data.to_inputs(inputs, model_engine.device, model_engine.get_data_types()[0])
    outputs = model_engine(inputs)
    loss = criterion(outputs, labels.to(model_engine.device))
    objective = loss
    if aux_loss_coef:
        objective = loss + aux_loss_coef * sum(model_engine.module.aux_losses)
    model_engine.backward(objective)
    model_engine.step()
    return loss.detach().float()


def train(model_engine, trainloader, testset, args, start=None, signals=None):
    """The reference's loop from `start`, a loss line every --log-interval steps; beyond it, every epoch in a new
    order (the reference keeps one), the same on resume.

    Beyond it: throughput, gradient norms and expert load on the log lines and the monitors, an evaluation every
    --eval-every epochs, a checkpoint every epoch with --save-dir, and a scheduler's signal or a Ctrl-C that saves
    where the run is and leaves (preemption.Preemption, noting signals since the run began).
    """
    start = start or checkpoints.Position()
    signals = signals or preemption.Preemption()
    criterion = nn.CrossEntropyLoss()
    aux_loss_coef = args.moe_aux_loss_coef if args.moe else 0.0  # a dense Net has no gate, so no aux loss
    accumulation = model_engine.gradient_accumulation_steps()
    steps_per_epoch = len(trainloader) // accumulation  # optimizer steps; the loader yields micro-batches
    log = metrics.Log(model_engine, args, steps_per_epoch)
    for epoch in range(start.epoch, args.epochs):
        first = start.step if epoch == start.epoch else 0  # optimizer steps a mid-epoch checkpoint took
        trainloader.data_sampler.set_epoch(epoch)  # a new order every epoch, the same on resume
        trainloader.data_sampler.start = first * accumulation * trainloader.batch_size
        with log.epoch(epoch, first, start.rank_state["interval"] if first else None):
            batches = enumerate(trainloader, start=first * accumulation)  # the loader draws its worker seed here
            if first:
                checkpoints.set_rng_state(start.rank_state)  # saved mid-epoch, after the uninterrupted run's draw
            micro_losses = []
            for micro_step, (inputs, labels) in batches:
                micro_losses.append(train_step(model_engine, criterion, inputs, labels, aux_loss_coef))
                if len(micro_losses) < accumulation:
                    continue
                i = micro_step // accumulation  # the optimizer step just taken; its loss is its micro-batches' mean
                log.step(torch.stack(micro_losses).mean())
                micro_losses = []
                if i % args.log_interval == args.log_interval - 1:
                    log.print_interval(epoch, i)  # the reference's loss line; then throughput and expert load
                if signum := signals.agreed_at(i + 1, steps_per_epoch):
                    tag = args.save_dir and save_checkpoint(model_engine, args, epoch, i + 1, log.state())
                    signals.stop(signum, args.save_dir, tag)
        accuracy = None
        if args.eval_every and (epoch + 1) % args.eval_every == 0 and epoch + 1 < args.epochs:
            counts = count_correct(model_engine, testset, model_engine.device, model_engine.get_data_types()[0],
                                   shard=can_shard_eval(args, model_engine))
            accuracy = log.print_accuracy(epoch, *counts)
        # Saved after the evaluation, whose gate draws random numbers: a resumed run draws on from there.
        tag = args.save_dir and save_checkpoint(model_engine, args, epoch)
        if tag and accuracy is not None:
            checkpoints.mark_best(args.save_dir, tag, accuracy)
        if signum := signals.agreed():
            signals.stop(signum, args.save_dir, tag)
    signals.close(signal.SIGINT)  # a Ctrl-C stops the final test at once; a scheduler's signal lets it end (main)


def save_checkpoint(model_engine, args, epoch, step=None, interval=None):
    """DeepSpeed's checkpoint of every rank in --save-dir: the finished epoch as epoch<N>, or, `step` steps into
    it, epoch<N>-step<S> with this rank's part of the log interval in progress. Returns the tag."""
    tag = checkpoints.tag_of(epoch, step)
    client_state = checkpoints.client_state(epoch, step, interval)  # the position; every rank's random numbers
    with checkpoints.saving(model_engine, args, tag):  # run.json, 'latest' when complete; a failed write: one line
        model_engine.save_checkpoint(args.save_dir, tag=tag, client_state=client_state, save_latest=False)
    return tag


def resume(model_engine, args):
    """Continue from the newest checkpoint in --save-dir: weights, optimizer, LR schedule, loss scale, and the
    position in the run with every rank's random numbers; saved in this layout or another (world size, EP size,
    ZeRO stage), in this global batch or another. Returns the Position to train on from."""
    path, saved = checkpoints.latest(args, model_engine)  # this Net, this dtype; None: auto found none
    if path is None:
        return checkpoints.Position()
    move = checkpoints.move_of(saved, args, model_engine)  # "4 ranks EP 4 ZeRO 1 -> 2 ranks EP 2 ZeRO 2", or None
    with checkpoints.stop_if_it_cannot_load(path):
        if move is None:
            load_path, client_state = model_engine.load_checkpoint(args.save_dir, os.path.basename(path))
        else:  # through DeepSpeed's universal checkpoint, experts by global id
            load_path, client_state = universal.load_in_this_layout(model_engine, args, path, saved, Net)
    fixes.replay_host_adam_steps(model_engine)  # CPU Adam after a restart: the bias correction the saving run had
    return checkpoints.position(load_path, client_state, path, saved, model_engine, move, args.epochs)


def can_shard_eval(args, model_engine):
    """Whether each rank may evaluate only its share of the test set. Expert parallelism and ZeRO-3 exchange
    data between ranks in every forward pass: there every rank must run every test batch, or ranks with unequal
    batch counts would wait on each other for ever."""
    return not (args.moe and args.ep_world_size > 1) and model_engine.zero_optimization_stage() < 3


def count_correct(model_engine, testset, local_device, target_dtype, test_batch_size=4, shard=False):
    """Correct predictions and test images per class, summed over ranks; with shard, each rank evaluates every
    world_size-th image."""
    testloader = data.test_loader(testset, test_batch_size, shard)
    class_correct = torch.zeros(len(data.CLASSES), dtype=torch.long, device=local_device)
    class_total = torch.zeros(len(data.CLASSES), dtype=torch.long, device=local_device)
    model_engine.eval()
    with torch.no_grad():
        for images, labels in testloader:
            images, labels = data.to_inputs(images, local_device, target_dtype), labels.to(local_device)
            predicted = model_engine(images).argmax(dim=1)
            class_total += torch.bincount(labels, minlength=len(data.CLASSES))
            class_correct += torch.bincount(labels[predicted == labels], minlength=len(data.CLASSES))
    model_engine.train()
    if shard:
        dist.all_reduce(class_correct)
        dist.all_reduce(class_total)
    return class_correct.tolist(), class_total.tolist()


def test(model_engine, testset, local_device, target_dtype, test_batch_size=4, shard=False):
    """Overall and per-class accuracy on the test set, in the reference's lines; printed once, by global rank 0
    (the reference prints them on every node's local rank 0)."""
    class_correct, class_total = count_correct(model_engine, testset, local_device, target_dtype, test_batch_size,
                                               shard)
    if dist.get_rank() == 0:
        print("\n".join(metrics.accuracy_lines(class_correct, class_total)))
    metrics.print_test_drops(model_engine)  # beyond the reference: with MoE, the tokens each layer dropped
    return sum(class_correct) / sum(class_total)


def main(args):
    signals = preemption.Preemption()  # SIGTERM, SIGUSR1, Ctrl-C: noted from now, acted on in train()
    config, note = options.load_ds_config(args) if args.deepspeed_config else (get_ds_config(args), None)
    options.refuse_bad_input(args, config)  # one line and exit 2 on every rank, before any work
    # Beyond the reference: the config's Adam trains as torch's fused AdamW, the same update, where DeepSpeed would
    # build its own op on a first run, or crash without a compiler (DeepSpeed#1897); "torch_adam": false keeps it.
    optimizer = machine.use_torch_fused_adamw(config)
    machine.check_the_accelerator(optimizer)  # a GPU torch cannot use stops the run; rank 0 names what trains
    for line in (note, fixes.allow_fp16(config), options.read_offload(config)):
        if line and launch.rank() == 0:
            print(line)
    args.deepspeed_config = None  # the file is read into `config`; DeepSpeed refuses a config given twice
    metrics.add_monitors(config, args)

    launch.use_single_process_defaults()  # python cifar10_deepspeed.py: one rank, no launcher
    machine.use_share_of_cores()
    fixes.stop_probing_a_missing_nvml()  # no NVIDIA driver: torch's optimizers looked for one at every step
    timeout = machine.dist_timeout(args)
    fixes.bound_every_wait(timeout)  # no rank waits for ever on a dead peer: DeepSpeed#4115, its groups' timeout
    with machine.stop_if_a_peer_is_lost():  # a rank that died or hangs ends every other with one line
        with machine.stop_if_the_port_is_taken(), signals.sigterm_ends_the_wait_for_peers():
            deepspeed.init_distributed(timeout=timeout)
        get_accelerator().set_device(launch.local_rank())
        folders.claim(args)  # one run per --save-dir, --metrics-dir: another live run's is one line
        options.refuse_what_deepspeed_refuses(config)  # its config checks, before any work

        ########################################################################
        # Step1. Data Preparation.
        ########################################################################
        trainset, testset = load_data(args)

        ########################################################################
        # Step 2. Define the network with DeepSpeed.
        ########################################################################
        model_engine, trainloader = build_engine(args, config, trainset)
        if args.compile:
            machine.compile_model(model_engine, args)
        start = resume(model_engine, args) if args.resume else checkpoints.Position()

        ########################################################################
        # Step 3. Train the network.
        ########################################################################
        train(model_engine, trainloader, testset, args, start, signals)
        if dist.get_rank() == 0:
            print("Finished Training")

        ########################################################################
        # Step 4. Test the network on the test data.
        ########################################################################
        accuracy = test(model_engine, testset, model_engine.device, model_engine.get_data_types()[0],
                        shard=can_shard_eval(args, model_engine))
    model_engine.monitor.write_events([("Eval/accuracy", 100 * accuracy, model_engine.global_samples)])
    dist.destroy_process_group()
    signals.finish()


if __name__ == "__main__":
    with machine.exit_without_teardown():
        main(add_argument())
