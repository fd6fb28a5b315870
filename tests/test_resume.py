"""Checkpoints: save every epoch, resume after a rank is killed, refuse checkpoints that do not fit."""

import json
import os
import signal
import subprocess
from types import SimpleNamespace

import pytest
import torch

import cifar10_deepspeed
import export_model
import predict
from conftest import MARGIN, ROOT, metric, rank_pid, run_command, signal_when

pytestmark = pytest.mark.slow

SYNTHETIC = ["--dataset", "synthetic", "--log-interval", "100", "--seed", "0"]
STEPS_PER_EPOCH = 200  # of the killed run; 600 in all, past the loss scale's first rise at step 501


def kill_rank_1_at(cmd, cwd, marker):
    """Launch, wait for `marker` in the output, SIGKILL rank 1, and return the launcher's Run."""
    run, _ = signal_when(cmd, cwd, lambda line: marker in line,
                         lambda _, output: os.kill(rank_pid(output, 1), signal.SIGKILL))
    return run


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory, op_cache):
    """MoE with EP 2 in fp16, 3 epochs: run through; run again, SIGKILL rank 1 in epoch 2, and resume."""
    tmp = tmp_path_factory.mktemp("killed")

    def cmd(name, *extra):
        return ["deepspeed", "--num_gpus", "2", ROOT / "cifar10_deepspeed.py", "--deepspeed", *SYNTHETIC, "-e", "3",
                "--synthetic-train-size", str(16 * STEPS_PER_EPOCH),
                "--moe", "--ep-world-size", "2", "--num-experts", "2", "--save-dir", tmp / name,
                "--metrics-dir", tmp / f"{name}-metrics", *extra]

    full = run_command(cmd("full"), tmp)
    killed = kill_rank_1_at(cmd("killed"), tmp, marker="[ 2,   100] loss:")
    latest_after_kill = (tmp / "killed" / "latest").read_text().strip()
    resumed = run_command(cmd("killed", "--resume"), tmp)
    return SimpleNamespace(tmp=tmp, cmd=cmd, full=full, killed=killed, resumed=resumed,
                           latest_after_kill=latest_after_kill)


def test_a_killed_rank_resumes_where_the_last_epoch_ended(killed_and_resumed):
    """The resumed run restarts at epoch 2 with the uninterrupted run's weights, data order, LR schedule
    and loss-scale state, and ends with its accuracy within noise."""
    run = killed_and_resumed
    run.full.assert_trained(min_accuracy=43 - MARGIN)
    assert run.killed.returncode != 0 and "Finished Training" not in run.killed.output
    assert run.latest_after_kill == "epoch1"  # the unfinished epoch is lost

    resumed = run.resumed
    assert resumed.returncode == 0, resumed.output[-3000:]
    assert f"Resuming from {run.tmp / 'killed' / 'epoch1'} at epoch 2" in resumed.output
    assert resumed.output.count("[ 1,   100] loss:") == 0 and resumed.output.count("[ 2,   100] loss:") == 1
    assert abs(resumed.accuracy() - run.full.accuracy()) <= 5
    assert (run.tmp / "killed" / "latest").read_text().strip() == "epoch3"

    def after_resume(metrics, name):
        values = metric(run.tmp / metrics, name)
        return {step: value for step, value in values.items() if step > STEPS_PER_EPOCH * 16}

    for name in ("Train_Samples_lr", "Train_Samples_loss_scale"):  # the scale doubles at step 501, in epoch 3
        assert after_resume("killed-metrics", name) == after_resume("full-metrics", name), name
    # The same weights and data order: the first steps' losses agree. Later the two runs drift apart in the
    # last bits: DeepSpeed's CPU Adam computes beta^t by pow() after a restart but by repeated products in
    # a running process, and fp16 weights turn those differences into visible ones.
    resumed_losses = dict(sorted(after_resume("killed-metrics", "Train_Samples_train_loss").items())[:10])
    full_losses = after_resume("full-metrics", "Train_Samples_train_loss")
    assert resumed_losses == pytest.approx({step: full_losses[step] for step in resumed_losses}, rel=1e-3)


def test_a_rank_missing_its_part_of_the_checkpoint_stops_every_rank(killed_and_resumed):
    run = killed_and_resumed
    partial = run.tmp / "partial"
    subprocess.run(["cp", "-r", str(run.tmp / "killed"), str(partial)], check=True)
    (partial / "epoch3" / "expp_rank_1_mp_rank_00_optim_states.pt").unlink()  # rank 1's expert optimizer
    cmd = run.cmd("killed", "--resume")
    cmd[cmd.index(run.tmp / "killed")] = partial
    refusal = run_command(cmd, run.tmp)
    assert refusal.returncode == 1
    errors = [line for line in refusal.output.splitlines() if line.startswith("error: ")]
    assert errors[0] == (f"error: --resume: cannot load checkpoint {partial / 'epoch3'}: FileNotFoundError in "
                         f"DeepSpeed's load_checkpoint: [Errno 2] No such file or directory: "
                         f"'{partial / 'epoch3' / 'expp_rank_1_mp_rank_00_optim_states.pt'}'")
    assert "Resuming from" not in refusal.output and "Finished Training" not in refusal.output


MOE_EP2 = ["--moe", "--ep-world-size", "2", "--num-experts", "2", "--noisy-gate-policy", "RSample"]


@pytest.mark.parametrize("flags, resumes", [
    (["--dtype", "fp32", "--stage", "2"], {"with offload": (["--offload", "cpu"], True)}),
    (["--dtype", "fp32", "--stage", "2", *MOE_EP2, "--moe-param-group", "--offload", "cpu"],
     {"as saved": ([], True), "without offload": (["--offload", "none"], False)}),
], ids=["dense-zero2", "moe-ep2-zero2-offload"])
def test_resume_under_zero_replays_the_uninterrupted_run(launch, script, tmp_path, flags, resumes):
    """Resuming from the epoch-1 checkpoint of a 2-epoch run prints that run's epoch 2 and final test again,
    also when the resumed run offloads where the saved one did not, or the reverse.

    In fp32, where rounding differences stay in the last bits of the weights (see the fp16 test above).
    """
    cmd = ["deepspeed", "--num_gpus", "2", script, "--deepspeed", *SYNTHETIC, "-e", "2", "--log-interval", "10",
           "--synthetic-train-size", "800", "--synthetic-test-size", "200", *flags]
    full = launch(*cmd, "--save-dir", tmp_path / "full")
    assert full.returncode == 0, full.output[-3000:]

    def epoch_2_and_test(run):
        return [line for line in run.output.splitlines() if line.startswith(("[ 2, ", "Accuracy of"))
                and "samples/s" not in line]
    assert len(epoch_2_and_test(full)) > 11
    for name, (extra, offloaded) in resumes.items():
        save_dir = tmp_path / name.replace(" ", "-")
        subprocess.run(["cp", "-r", str(tmp_path / "full"), str(save_dir)], check=True)
        (save_dir / "latest").write_text("epoch1")
        resumed = launch(*cmd, *extra, "--save-dir", save_dir, "--resume")
        assert resumed.returncode == 0, f"resumed {name}:\n{resumed.output[-3000:]}"
        assert "at epoch 2" in resumed.output
        assert ("ZeRO-Offload: the optimizer's state and step on the cpu" in resumed.output) == offloaded
        assert epoch_2_and_test(resumed) == epoch_2_and_test(full), f"resumed {name}"


def test_a_fp16_checkpoint_exports_its_fp32_masters_with_every_expert_by_its_global_id(killed_and_resumed):
    """fp16 without ZeRO, EP 2 on 2 ranks: each weight of the file, rounded to fp16, is the checkpoint's fp16
    weight of the same name (the master copy the step rounds from), experts included."""
    run = killed_and_resumed
    exported = export_model.export(run.tmp / "full")
    assert exported["exported_from"]["weights"] == "fp32 master weights (DeepSpeed's FP16_Optimizer's copy)"
    model = export_model.module_weights(run.tmp / "full" / "epoch3")
    assert sorted(model) == sorted(exported["state_dict"])
    assert any("deepspeed_experts.1." in name for name in model)
    for name, master in exported["state_dict"].items():
        assert master.dtype == torch.float32
        assert torch.equal(master.half(), model[name]), name
    assert any(not torch.equal(master, model[name].float()) for name, master in exported["state_dict"].items())


def test_predict_evaluates_the_exported_model_in_one_process_as_the_run_did(killed_and_resumed):
    """The model trained on 2 ranks with EP 2 in fp16, exported, evaluates in one process at EP 1 in fp32 with
    the run's final accuracy, within what fp16's rounding moves."""
    run = killed_and_resumed
    torch.save(export_model.export(run.tmp / "full"), run.tmp / "model.pt")
    predicted = run_command(["python", ROOT / "predict.py", run.tmp / "model.pt", "--test-set", "--dataset",
                             "synthetic"], run.tmp)
    assert predicted.returncode == 0, predicted.output[-3000:]
    lines = [line for line in predicted.output.splitlines() if line.startswith("Accuracy of")]
    assert len(lines) == 11 and lines[0].startswith("Accuracy of the network on the 1000 test images: ")
    assert abs(predicted.accuracy() - run.full.accuracy()) <= 2, (predicted.accuracy(), run.full.accuracy())


def test_init_from_the_two_rank_ep2_checkpoint_trains_on_in_one_process(killed_and_resumed, single_rank_group, parse):
    """--init-from the killed run's checkpoint (2 ranks, EP 2, fp16) into one rank at EP 1 in fp32: the first step's
    loss is the exported model's loss on the same batch, every expert in place; then it trains."""
    run = killed_and_resumed
    args = parse("--deepspeed", *SYNTHETIC, "--synthetic-train-size", "64", "--dtype", "fp32", "--moe",
                 "--num-experts", "2", "--init-from", str(run.tmp / "full"))
    engine, trainloader, _ = cifar10_deepspeed.initialize(args, cifar10_deepspeed.get_ds_config(args))
    torch.save(export_model.export(run.tmp / "full"), run.tmp / "model.pt")
    exported = predict.load_model(run.tmp / "model.pt", "cpu").train()
    images, labels = next(iter(trainloader))
    inputs, criterion = cifar10_deepspeed.to_inputs(images, "cpu", None), torch.nn.CrossEntropyLoss()
    torch.manual_seed(1)  # the same random token selection in both: top-1 drops tokens past capacity at random
    expected = criterion(exported(inputs), labels)
    torch.manual_seed(1)
    loss = cifar10_deepspeed.train_step(engine, criterion, images, labels, "cpu", None)
    assert loss == expected
    assert engine.was_step_applied()


def test_init_from_a_one_process_model_trains_on_four_ranks_with_ep_4(launch, script, tmp_path, single_rank_group):
    """A model file of one process (4 experts, each its own) into 4 ranks at EP 4, each rank holding one expert:
    rank 0's first loss is the file's Net's loss on rank 0's first batch (no token dropped, no gate noise), whose
    tokens the file's gate sends to at least three of the experts, held on other ranks."""
    flags = ["--moe", "--num-experts", "4", "--no-drop-tokens"]
    torch.manual_seed(0)
    source = cifar10_deepspeed.Net(cifar10_deepspeed.add_argument(flags))
    for layer in source.moe_layer_list:
        layer.set_deepspeed_parallelism()
    trainset = cifar10_deepspeed.SyntheticCIFAR10(256, train=True)
    first = list(torch.utils.data.DistributedSampler(trainset, num_replicas=4, rank=0, seed=0))[:32]
    images, labels = torch.from_numpy(trainset.data[first]), torch.tensor([trainset.targets[i] for i in first])
    inputs = cifar10_deepspeed.to_inputs(images, "cpu", None)  # rank 0's first micro-batch of the global 128
    gate = source.moe_layer_list[0].deepspeed_moe.gate
    tokens = []
    hook = gate.register_forward_hook(lambda module, args, out: tokens.append(args[0].reshape(-1, 84)))
    with torch.no_grad():
        source(inputs)
        hook.remove()
        # The Net's features share one large component, so any gate sends every token to one expert: take it out
        # of the gate's weights, and each expert its own (they start as copies of one template).
        mean = tokens[0].mean(dim=0)
        weight = torch.randn(4, 84)
        gate.wg.weight.copy_(weight - torch.outer(weight @ mean, mean) / mean.dot(mean))
        for i, expert in enumerate(source.moe_layer_list[0].deepspeed_moe.experts.deepspeed_experts):
            expert.weight.mul_(1 + i)
        routed = (tokens[0] @ gate.wg.weight.T).argmax(dim=1)
        expected = torch.nn.CrossEntropyLoss()(source(inputs), labels)
    assert len(set(routed.tolist())) > 2, f"rank 0's tokens reach too few experts for a wrong one to show: {routed}"
    torch.save({"state_dict": source.state_dict()}, tmp_path / "model.pt")
    run = launch("deepspeed", "--num_gpus", "4", script, "--deepspeed", *SYNTHETIC, "--synthetic-train-size", "256",
                 "--batch-size", "128", "-e", "1", "--dtype", "fp32", *flags, "--ep-world-size", "4",
                 "--init-from", tmp_path / "model.pt", "--metrics-dir", tmp_path / "metrics")
    assert run.returncode == 0, run.output[-3000:]
    assert "4 experts, each rank taking its own by global id" in run.output
    assert list(metric(tmp_path / "metrics", "Train_Samples_train_loss").values())[0] == pytest.approx(
        expected.item(), rel=1e-6)


@pytest.fixture(scope="module")
def saved_dense_run(tmp_path_factory, op_cache):
    """A one-epoch dense run that saved its checkpoint, shared by the refusal tests."""
    cwd = tmp_path_factory.mktemp("saved")
    cmd = ["python", ROOT / "cifar10_deepspeed.py", "--deepspeed", *SYNTHETIC, "--dtype", "fp32", "-e", "1",
           "--synthetic-train-size", "160", "--synthetic-test-size", "40", "--save-dir", cwd / "ckpt"]
    run = run_command(cmd, cwd)
    assert run.returncode == 0, run.output[-3000:]
    assert json.loads((cwd / "ckpt" / "epoch1" / "run.json").read_text())["world_size"] == 1
    return cmd[:-2], cwd / "ckpt"


def refused(launch, cmd, save_dir, *extra):
    run = launch(*cmd, "--save-dir", save_dir, "--resume", *extra)
    assert run.returncode == 1
    assert "Finished Training" not in run.output and "Traceback" not in run.output
    errors = [line for line in run.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, run.output[-3000:]
    return errors[0]


def test_resume_from_an_empty_directory_is_refused(launch, saved_dense_run, tmp_path):
    cmd, _ = saved_dense_run
    assert refused(launch, cmd, tmp_path / "empty") == (
        f"error: --resume: no checkpoint in {tmp_path / 'empty'} (it has no 'latest' file)")


def test_resume_into_another_model_shape_is_refused(launch, saved_dense_run):
    cmd, save_dir = saved_dense_run
    assert refused(launch, cmd, save_dir, "--moe", "--num-experts", "2") == (
        f"error: --resume: checkpoint {save_dir / 'epoch1'} was saved by a different run "
        "(moe False -> True, num_experts None -> [2], mlp_type None -> standard, ep_world_size None -> 1); "
        "resume with its settings, or save to another --save-dir")


def test_resume_from_a_partial_checkpoint_is_refused(launch, saved_dense_run, tmp_path):
    cmd, save_dir = saved_dense_run
    partial = tmp_path / "partial"
    subprocess.run(["cp", "-r", str(save_dir), str(partial)], check=True)
    (partial / "epoch1" / "mp_rank_00_model_states.pt").unlink()
    error = refused(launch, cmd, partial)
    assert error.startswith(f"error: --resume: cannot load checkpoint {partial / 'epoch1'}: ")

    (partial / "epoch1" / "run.json").unlink()
    assert refused(launch, cmd, partial) == (
        f"error: --resume: checkpoint {partial / 'epoch1'} is incomplete (no readable run.json)")


def test_resume_on_another_world_size_is_refused_and_names_init_from_which_trains_on(launch, saved_dense_run):
    cmd, save_dir = saved_dense_run
    two_ranks = ["deepspeed", "--num_gpus", "2", *cmd[1:]]
    assert refused(launch, two_ranks, save_dir) == (
        f"error: --resume: checkpoint {save_dir / 'epoch1'} was saved by a different run (world_size 1 -> 2); "
        "resume with its settings, or save to another --save-dir; to train on from its weights in this layout, "
        f"start a new run with --init-from {save_dir / 'epoch1'}")
    run = launch(*cmd, "--init-from", save_dir / "epoch1", "--dtype", "bf16", "--stage", "2")  # another layout
    assert run.returncode == 0, run.output[-3000:]
    assert (f"--init-from {save_dir / 'epoch1'}: the weights of every layer carried over from the checkpoint "
            "(10 tensors, 0 experts, each rank taking its own by global id); the optimizer and the LR schedule "
            "start fresh") in run.output
    assert sum(line.startswith("--init-from ") for line in run.output.splitlines()) == 1  # rank 0's line only
    assert "Accuracy of the network on the 40 test images:" in run.output


def without_moe_module(save_dir, copy):
    """A copy of a checkpoint whose run.json is as earlier versions of the script wrote it: no moe_module."""
    subprocess.run(["cp", "-r", str(save_dir), str(copy)], check=True)
    run_json = copy / "epoch1" / "run.json"
    description = json.loads(run_json.read_text())
    del description["moe_module"]
    run_json.write_text(json.dumps(description))
    return copy


def test_a_dense_checkpoint_of_an_earlier_version_resumes(launch, saved_dense_run, tmp_path):
    cmd, save_dir = saved_dense_run
    old = without_moe_module(save_dir, tmp_path / "old")
    run = launch(*cmd, "--save-dir", old, "--resume")
    assert run.returncode == 0, run.output[-3000:]
    assert f"Resuming from {old / 'epoch1'} at epoch 2" in run.output
    assert "Accuracy of the network on the 40 test images: " in run.output


def test_a_moe_checkpoint_of_an_earlier_version_is_refused(launch, script, tmp_path):
    cmd = ["python", script, "--deepspeed", *SYNTHETIC, "--dtype", "fp32", "-e", "1", "--synthetic-train-size", "160",
           "--synthetic-test-size", "40", "--moe", "--num-experts", "2"]
    saved = launch(*cmd, "--save-dir", tmp_path / "ckpt")
    assert saved.returncode == 0, saved.output[-3000:]
    old = without_moe_module(tmp_path / "ckpt", tmp_path / "old")
    assert refused(launch, cmd, old) == (
        f"error: --resume: checkpoint {old / 'epoch1'} was saved by an earlier version of this script, whose MoE "
        "layers were named moe_layers (now moe_layer_list, as in the reference), so its weights do not load here; "
        "start a new run with another --save-dir")
