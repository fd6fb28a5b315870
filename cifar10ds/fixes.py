"""What DeepSpeed 0.19.8 gets wrong for this script, fixed at the narrowest point. Each fix says the upstream
issue, what breaks without it, and when to delete it, and checks that what it patches is still there in the
shape it expects (target): another DeepSpeed stops the run in one line naming the fix. The script calls each
by its name where it acts: allow_fp16() with the config, stop_probing_a_missing_nvml() with the machine's
settings, bound_every_wait() before deepspeed.init_distributed,
wrap_torch_adam_as_deepspeed_wraps_its_own() before deepspeed.initialize, scale_the_fp16_loss() and
clip_by_the_global_norm() after it; checkpoints.py calls read_experts_by_global_id() around a universal
load_checkpoint, and the script replay_host_adam_steps() after load_checkpoint."""

import contextlib
import ctypes
import importlib
import os

import deepspeed
import deepspeed.comm as dist
import torch
import torch.distributed.distributed_c10d
from deepspeed.accelerator import get_accelerator
from deepspeed.moe.utils import is_moe_param
from deepspeed.ops.adam import DeepSpeedCPUAdam, FusedAdam
from deepspeed.utils import groups

from cifar10ds import machine, model_files, options

TESTED_WITH = "0.19.8"  # the DeepSpeed whose internals the fixes patch (requirements.txt)
NVML = "libnvidia-ml.so.1"  # the library torch.cuda loads to count GPUs without initialising CUDA


def target(owner, name, fix, upstream):
    """What `fix` patches: `owner`'s attribute `name`, as DeepSpeed 0.19.8 has it. Where another DeepSpeed (or
    torch) lacks it, the fix would patch nothing and the run would train wrong in silence: every rank stops with
    one line naming the fix and its upstream issue."""
    if not hasattr(owner, name):
        what = getattr(owner, "__name__", type(owner).__name__)
        machine.stop(f"error: fix {fix} ({upstream}) finds no {what}.{name} in DeepSpeed {deepspeed.__version__} "
                     f"(torch {torch.__version__}): this project's fixes patch DeepSpeed {TESTED_WITH} (requirements.txt); "
                     f"install it, or check the fix against yours (docs/fixes.md)", every_rank=True)
    return getattr(owner, name)


def bound_every_wait(timeout):
    """The fixes that keep a rank from waiting for ever on a dead peer, which change nothing computed: every rank,
    before deepspeed.init_distributed."""
    skip_the_shared_memory_all_reduce()
    give_every_group_the_timeout(timeout)


def skip_the_shared_memory_all_reduce():
    """Keep DeepSpeed from building and starting its shared-memory all-reduce, which training never calls.

    Upstream: deepspeedai/DeepSpeed#4115 (its authors: the named buffers "would only be released when system
    rebooted"); still so in 0.19.8, whose shm.cpp also waits for every peer's buffer with no timeout. Without
    it: on one node (LOCAL_SIZE = WORLD_SIZE) every rank compiles the op on a first run, creates a 66 MB /dev/shm
    buffer named by MASTER_PORT that outlives the run, and spins for ever where a peer died before making its
    own, or where another process removed it. Only inference_all_reduce (DeepSpeed's inference engine) uses it,
    and falls back to the process group's all-reduce without it. Delete when DeepSpeed builds it on demand.
    """
    # deepspeed.comm re-exports torch itself under the name of this module: import the module by its full name
    module = importlib.import_module("deepspeed.comm.torch")
    target(module, "build_shm_op", "skip_the_shared_memory_all_reduce", "deepspeedai/DeepSpeed#4115")
    module.build_shm_op = lambda: None


def give_every_group_the_timeout(timeout):
    """Give the process groups DeepSpeed makes (data- and expert-parallel) the timeout of the world group.

    Upstream: none filed; DeepSpeed's utils/groups.py calls torch's new_group() without a timeout, which then
    takes torch's default, not the one given to deepspeed.init_distributed. Without it: a rank stuck in an
    expert-parallel all-to-all waits torch's default (30 minutes on gloo), whatever --dist-timeout says.
    Delete when DeepSpeed passes its timeout to new_group().
    """
    target(torch.distributed.distributed_c10d, "default_pg_timeout", "give_every_group_the_timeout", "none filed")
    torch.distributed.distributed_c10d.default_pg_timeout = timeout


def stop_probing_a_missing_nvml():
    """Let torch.cuda.is_available() ask CUDA alone where NVML cannot be loaded, as torch does without DeepSpeed.

    Upstream: none filed for the cost; `import deepspeed` sets PYTORCH_NVML_BASED_CUDA_CHECK=1 for fork safety
    (deepspeedai/DeepSpeed#7918). torch then asks NVML for the device count first, and where NVML cannot be
    loaded (no NVIDIA driver: a laptop, CI) it tries to load it again at every call, uncached, before asking
    CUDA as it would have anyway. Every step of torch's optimizers asks: 0.2 ms, a tenth of a CPU step of this
    Net (bench/throughput.py --costs). Without NVML the answer, and what asking initialises, are CUDA's either
    way. Delete when torch caches a failed NVML load, or DeepSpeed stops setting the variable.
    """
    if os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK") != "1":
        return
    try:
        ctypes.CDLL(NVML)
    except OSError:
        del os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"]


def wrap_torch_adam_as_deepspeed_wraps_its_own():
    """Give torch's Adam, in fp16 and bf16 without ZeRO, the flat FP16_Optimizer DeepSpeed gives its own FusedAdam.

    Upstream: deepspeedai/DeepSpeed#8613, #8588. Without it: DeepSpeed wraps any other optimizer in
    FP16_UnfusedOptimizer, which is never told about MoE layers, so its clipping norm leaves out the expert
    gradients (#8613) and the norm it reports still carries the loss scale (#8588); its loss scale also starts
    elsewhere than the config's initial_scale_power. torch's AdamW steps FP16_Optimizer's flat fp32 groups as
    FusedAdam does (machine.use_torch_fused_adamw picks it). Delete when DeepSpeed picks the wrapper by what the optimizer
    can step, not by its class.
    """
    engine = importlib.import_module("deepspeed.runtime.engine")
    fused = target(engine, "FusedAdam", "wrap_torch_adam_as_deepspeed_wraps_its_own", "deepspeedai/DeepSpeed#8613")
    if isinstance(fused, type):  # a second call finds the tuple of the first
        engine.FusedAdam = (fused, torch.optim.Adam, torch.optim.AdamW)


def allow_fp16(config):
    """Run fp16 where DeepSpeed's probe finds no fast fp16 kernels (most CPUs); return rank 0's note on its speed.

    Upstream: deepspeedai/DeepSpeed#7207 (the CPU accelerator's fp16 support follows the CPU's flags). Without
    it: DeepSpeed refuses fp16 ("Type fp16 is not supported on your device"), so the reference's default,
    --dtype fp16, crashes on a laptop CPU, where PyTorch computes fp16 all the same. Where the accelerator
    computes on the host's cores, fp16 trains slower than fp32, native kernels or not (1.5x and 11x measured,
    BENCHMARKS.md), and the note says so. Delete when DeepSpeed's CPU accelerator runs fp16 everywhere.
    """
    accelerator = get_accelerator()
    if options.config_dtype(config) != "fp16":
        return None
    target(accelerator, "is_fp16_supported", "allow_fp16", "deepspeedai/DeepSpeed#7207")
    speed = "slower than fp32 (1.5x to 11x measured); pass --dtype fp32 to train faster"
    if not accelerator.is_fp16_supported():
        accelerator.is_fp16_supported = lambda: True
        return (f"note: DeepSpeed finds no native fp16 support on this {accelerator.device_name()}, so fp16 runs "
                f"as PyTorch emulates it: {speed}")
    if accelerator.is_synchronized_device():
        return f"note: fp16 on this {accelerator.device_name()} trains {speed}"
    return None


def scale_the_fp16_loss(model_engine):
    """Make backward in fp16 without ZeRO scale the loss by the loss scale, which the optimizer's step divides out.

    Upstream: deepspeedai/DeepSpeed#8393. Without it: DeepSpeed's engine.backward scales the loss only for its
    ZeRO optimizers, and FP16_Optimizer.step divides the gradients by the loss scale all the same, so every
    update came from gradients 32768 times too small, clipping never acted, and small gradients underflowed.
    A hook on the loss multiplies the gradient flowing back from it by the loss scale, unless DeepSpeed has
    already scaled it, so the loss is scaled once. Delete when #8393 is fixed in the pinned DeepSpeed.
    """
    if not model_engine.fp16_enabled() or model_engine.zero_optimization():
        return
    fix, upstream = "scale_the_fp16_loss", "deepspeedai/DeepSpeed#8393"
    backward = target(model_engine, "backward", fix, upstream)
    scaler = target(model_engine.optimizer, "loss_scale_config", fix, upstream)
    target(scaler, "cur_scale", fix, upstream)

    def scaled_backward(loss, *args, **kwargs):
        loss = loss.float()  # as FP16_Optimizer.backward scales it: the scale may pass fp16's largest number
        scaled = scaler.cur_scale / model_engine.gradient_accumulation_steps()
        loss.register_hook(lambda grad: torch.where(grad < scaled / 2, grad * scaler.cur_scale, grad))
        return backward(loss, *args, **kwargs)

    model_engine.backward = scaled_backward


def clip_by_the_global_norm(model_engine):
    """Make gradient clipping in fp32 without ZeRO clip by the global norm, and keep that norm.

    Upstream: deepspeedai/DeepSpeed#8475. Without it: DeepSpeed clips that path (engine.clip_fp32_gradients)
    with runtime.utils.clip_grad_norm_, which averages each rank's norm over the data-parallel group: right
    only while every rank holds the same parameters. With expert parallelism each rank holds other experts, so
    the norm and every clipped step came out wrong; nor does that path keep a norm for get_global_grad_norm().
    Here the norm is the non-expert gradients' (equal on every rank after the all-reduce) with the expert
    gradients' squares summed over their expert-parallel group, each expert counted once: one process's.
    Delete when #8475 is fixed in the pinned DeepSpeed.
    """
    fix, upstream = "clip_by_the_global_norm", "deepspeedai/DeepSpeed#8475"
    target(model_engine, "clip_fp32_gradients", fix, upstream)
    expert_parallel_group = target(groups, "_get_expert_parallel_group", fix, upstream)

    parameters = list(model_engine.module.parameters())
    here, spread = [], {}  # the gradients whose norm this rank holds whole; experts spread over EP ranks, by group
    for p in parameters:
        group = p.group_name if is_moe_param(p) else None
        if group is not None and dist.get_world_size(expert_parallel_group(group)) > 1:
            spread.setdefault(group, []).append(p)
        else:
            here.append(p)
    riding, carried = carry_expert_squares_in_the_gradient_all_reduce(model_engine, spread, fix, upstream)

    def clip_fp32_gradients():
        norm = torch.nn.utils.get_total_norm([p.grad for p in here if p.grad is not None], foreach=True)
        if spread:
            squares = [norm.square()]
            rode = carried.pop() if carried else None  # reduced with the other gradients in this step's backward
            if rode is not None:
                squares.append(rode[0])
            for name, group in spread.items():
                if rode is None or name not in riding:
                    square = torch.nn.utils.get_total_norm([p.grad for p in group if p.grad is not None],
                                                           foreach=True).square()
                    dist.all_reduce(square, group=expert_parallel_group(name))  # each expert once
                    squares.append(square)
            norm = torch.stack(squares).sum().sqrt()
        model_engine._global_grad_norm = norm
        # torch's clipping: times a coefficient clamped at 1, no branch on the device's value (DeepSpeed's
        # clip_tensors_by_global_norm reads it), the foreach kernels of a plain loop
        torch.nn.utils.clip_grads_with_norm_([p for p in parameters if p.grad is not None],
                                             model_engine.gradient_clipping(), norm, foreach=True)

    model_engine.clip_fp32_gradients = clip_fp32_gradients


def carry_expert_squares_in_the_gradient_all_reduce(model_engine, spread, fix, upstream):
    """Have DeepSpeed's all-reduce of the gradients carry the squares of the experts that clip_by_the_global_norm
    would otherwise all-reduce on their own: those of expert groups spread over the whole data-parallel group
    (one rank per expert-data-parallel group, as run_ds_moe.sh trains). Returns (their group names, a list that
    holds their squares' sum over the ranks, as the gradients DeepSpeed then leaves, after each reduction).

    A collective of its own cost a tenth of a 2-rank MoE step on gloo (13.07 against 11.62 ms, A/B in one
    launch). DeepSpeed's reduction scales the other gradients and these experts' by the same factor c (1/W for
    the mean over W ranks): each rank puts in its squares times c, so what comes back, c times their sum, is
    the sum of the squares of the gradients DeepSpeed leaves. fp32 without ZeRO, clipping on: the path whose
    clipping the fix replaces; elsewhere nothing changes.
    """
    if (model_engine.fp16_enabled() or model_engine.bfloat16_enabled() or model_engine.zero_optimization()
            or model_engine.gradient_clipping() <= 0):
        return set(), []
    riding = {name for name in spread if dist.get_world_size(groups._get_expert_data_parallel_group(name)) == 1}
    if not riding:
        return riding, []
    gather = target(model_engine, "_get_gradients_for_reduction", fix, upstream)
    scale = 1 / dist.get_world_size(groups._get_data_parallel_group()) if model_engine.gradient_average else 1.0
    carried = []

    def gradients_for_reduction():
        non_expert, expert = gather()  # gives every parameter a gradient
        grads = [p.grad for name in riding for p in spread[name]]
        carried[:] = [torch.nn.utils.get_total_norm(grads, foreach=True).square().mul(scale).reshape(1)]
        return non_expert + carried, expert

    model_engine._get_gradients_for_reduction = gradients_for_reduction
    return riding, carried


def skip_the_gradient_all_reduce_on_one_rank(model_engine):
    """Leave out, on one rank without ZeRO, the gradient all-reduce that averages over that one rank.

    Upstream: none filed. Without ZeRO DeepSpeed all-reduces the gradients after every backward pass whatever the
    world size: on one rank it flattens them, reduces the copy with itself, divides by 1 and copies it back, a
    tenth of a CPU step of this Net (bench/throughput.py --costs). Nothing computed changes (x / 1 is x). ZeRO's
    optimizers also move gradients into their partitions there, so they keep it. Delete when DeepSpeed skips
    the reduction of a group of one.
    """
    if dist.get_world_size() > 1 or model_engine.zero_optimization():
        return
    target(model_engine, "enable_backward_allreduce", "skip_the_gradient_all_reduce_on_one_rank", "none filed")
    model_engine.enable_backward_allreduce = False


@contextlib.contextmanager
def read_experts_by_global_id(model_engine):
    """Have DeepSpeed's universal checkpoint loader read each expert's files by its global id.

    Upstream: deepspeedai/DeepSpeed#6589 (under expert parallelism every rank loads the first experts). The
    loader finds a parameter's files (zero/<name>/) by its name in the ZeRO optimizer's param_names, and an
    expert's name holds its index on its own rank, so every expert-parallel rank read the states of experts 0 to
    E/EP - 1. Without it: a MoE checkpoint moved to EP 2 or more trained the wrong experts on from the wrong
    moments. Delete when DeepSpeed's loader names experts by their global id.
    """
    names = target(model_engine.optimizer, "param_names", "read_experts_by_global_id", "deepspeedai/DeepSpeed#6589")
    original = dict(names)
    names.update({p: name for p, name in model_files.global_names(model_engine.module).items() if p in names})
    try:
        yield
    finally:
        names.clear()
        names.update(original)


def replay_host_adam_steps(model_engine):
    """Give DeepSpeed's Adam that steps on the host (CPU Adam for ZeRO-Offload, the CPU accelerator's fused Adam)
    the bias correction that the process which saved the checkpoint would use next.

    Upstream: none filed; csrc/includes/cpu_adam.h keeps beta^t as a float32 running product when it steps by
    one, and takes pow(beta, t) on a jump, as a new process's first step is (since deepspeedai/DeepSpeed#564).
    Without it: the two differ in the last bits, so a resumed run drifted from the uninterrupted one, and MoE's
    routing turned that drift into other experts. Stepping a one-element dummy through steps 1 to t repeats the
    products (2 s per 100,000 steps on 2 CPU cores). Delete when the C++ step computes beta^t one way.
    """
    optimizer = model_engine.basic_optimizer
    steps = max((int(state.get("step", 0)) for state in optimizer.state.values()), default=0)
    group = optimizer.param_groups[0]
    args = group["lr"], *group["betas"], group["eps"]
    dummy = [torch.zeros(1) for _ in range(4)]
    fix, upstream = "replay_host_adam_steps", "none filed"
    if isinstance(optimizer, DeepSpeedCPUAdam):
        adam_update = target(optimizer.ds_opt_adam, "adam_update", fix, upstream)
        for step in range(1, steps + 1):
            adam_update(optimizer.opt_id, step, *args, group["weight_decay"], group["bias_correction"], *dummy)
    elif isinstance(optimizer, FusedAdam) and group["params"][0].device.type == "cpu":
        target(optimizer, "multi_tensor_adam", fix, upstream)
        for step in range(1, steps + 1):
            optimizer.multi_tensor_adam(2048, optimizer._dummy_overflow_buf, [[tensor] for tensor in dummy], *args,
                                        step, optimizer.adam_w_mode, group["bias_correction"], group["weight_decay"])
