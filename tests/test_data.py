"""cifar10ds/data.py and the script's load_data: the synthetic set, the tensor path's numbers (the PIL path's,
bit for bit), and CIFAR-10 downloaded once per data directory by rank 0 first: torchvision downloads, checks and
unpacks a CIFAR-format archive the tests make (tests/cifar_files.py) from a server on 127.0.0.1; offline, or a
corrupt download, every rank stops with one line."""

import os
import re
import shutil
import subprocess
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms as transforms
from deepspeed.runtime.dataloader import DeepSpeedDataLoader
from PIL import Image
from torchvision.datasets import CIFAR10

from cifar10ds import data
from cifar10ds.data import SyntheticCIFAR10, load_datasets
from cifar_files import ARCHIVE, Server, make_archive
from cifar10ds.launch import free_port
from conftest import ROOT, Run, finish, run_command, start
from test_launch import Nodes, script
SYNTHETIC = ["--dataset", "synthetic", "--log-interval", "50", "--seed", "0"]
ONE_EPOCH = ["-e", "1", "--log-interval", "50", "--seed", "0"]


def test_synthetic_data_is_deterministic_cifar_shaped_and_labelled():
    first, again = SyntheticCIFAR10(300, train=True), SyntheticCIFAR10(300, train=True)
    assert first.data.shape == (300, 32, 32, 3) and first.data.dtype == np.uint8
    assert np.array_equal(first.data, again.data) and first.targets == again.targets
    assert set(first.targets) == set(range(10))
    assert not np.array_equal(first.data[:50], SyntheticCIFAR10(50, train=False).data)


def test_synthetic_data_goes_through_the_cifar_transforms(parse):
    trainset, testset = load_datasets(parse("--dataset", "synthetic", "--synthetic-train-size", "20",
                                            "--synthetic-test-size", "7", "--data-path", "pil"), download=False)
    assert (len(trainset), len(testset)) == (20, 7)
    image, label = trainset[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert -1 <= image.min() and image.max() <= 1 and label in range(10)


def both_data_paths(parse, *flags):
    return {path: load_datasets(parse("--dataset", "synthetic", "--synthetic-train-size", "96", "--synthetic-test-size",
                                      "21", "--data-path", path, *flags), download=False) for path in ("tensor", "pil")}


def test_the_tensor_path_holds_the_set_once_as_uint8(parse):
    (trainset, testset), (pil_train, _) = both_data_paths(parse).values()
    assert trainset.data.dtype == torch.uint8 and trainset.data.shape == (96, 32, 32, 3)
    assert trainset.targets.tolist() == pil_train.targets and len(testset) == 21
    decoded = SyntheticCIFAR10(8, train=True)
    assert np.shares_memory(data.ImageTensor(decoded).data.numpy(), decoded.data)  # no second copy


def test_the_tensor_path_makes_what_totensor_and_normalize_make_of_any_uint8_batch():
    """Also from an array laid out image by image (N, H, W, C in memory, unlike CIFAR-10's and the synthetic set's
    channel planes): a contiguous batch, as ToTensor's, so that the convolutions run as on the PIL path."""
    images = torch.randint(0, 256, (6, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(data.MEAN, data.STD)])
    expected = torch.stack([transform(Image.fromarray(image.numpy())) for image in images])
    inputs = data.to_inputs(images, "cpu")
    assert inputs.is_contiguous() and torch.equal(inputs, expected)


@pytest.mark.parametrize("world", [1, 2])
def test_the_tensor_path_feeds_the_pil_paths_batches_bit_for_bit(parse, monkeypatch, world):
    """DeepSpeed's loader, on every rank, for two epochs, and the evaluation's loader, sharded and not: the same
    samples in the same order, and to_inputs makes of each uint8 batch exactly the floats ToTensor and Normalize
    make (in bf16 and fp16 too, cast from them)."""
    sets = both_data_paths(parse)
    for rank in range(world):
        loaders = {path: DeepSpeedDataLoader(trainset, batch_size=16 // world, pin_memory=False, local_rank=0,
                                             tput_timer=None, collate_fn=data.collate_fn(trainset),
                                             num_local_io_workers=0, data_parallel_world_size=world,
                                             data_parallel_rank=rank)
                   for path, (trainset, _) in sets.items()}
        for epoch in (0, 1):
            for loader in loaders.values():
                loader.data_sampler.set_epoch(epoch)
            batches = list(zip(*loaders.values()))
            assert len(batches) == 6
            for (images, labels), (expected, expected_labels) in batches:
                assert images.dtype == torch.uint8 and torch.equal(labels, expected_labels)
                for dtype in (None, torch.bfloat16, torch.float16):
                    inputs = data.to_inputs(images, "cpu", dtype)
                    assert torch.equal(inputs, expected if dtype is None else expected.to(dtype))
        monkeypatch.setattr(data.dist, "get_rank", lambda: rank)
        monkeypatch.setattr(data.dist, "get_world_size", lambda: world)
        for shard in (False, True):
            tests = [data.test_loader(testset, 4, shard) for _, testset in sets.values()]
            for (images, labels), (expected, expected_labels) in zip(*tests, strict=True):
                assert torch.equal(data.to_inputs(images, "cpu"), expected)
                assert torch.equal(labels, expected_labels)


@pytest.mark.parametrize("accelerator", [False, True])
def test_the_loader_pins_batches_only_for_an_accelerators_memory(parse, monkeypatch, recwarn, accelerator):
    """DeepSpeed asks its loader to pin always; on a CPU run torch warned about it at every run and pinned nothing.
    Where torch finds an accelerator (stood in for here: no GPU), the batches are pinned as DeepSpeed asks."""
    trainset, _ = load_datasets(parse("--dataset", "synthetic", "--synthetic-train-size", "32"), download=False)
    loader = DeepSpeedDataLoader(trainset, batch_size=16, pin_memory=True, local_rank=0, tput_timer=None,
                                 collate_fn=data.collate_fn(trainset), num_local_io_workers=0,
                                 data_parallel_world_size=1, data_parallel_rank=0)
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: accelerator)
    data.prepare_loader(loader, parse("--dataset", "synthetic"))
    assert loader.pin_memory is accelerator
    if not accelerator:
        assert len(list(loader)) == 2 and not [w for w in recwarn if "pin_memory" in str(w.message)]


def printed_results(run):
    """Every line the script prints about training and testing, less what depends on the machine's speed."""
    lines = [line for line in run.output.splitlines() if re.match(r"\[ *\d+, +\d+\] |Accuracy of|\[\d+\] accuracy", line)]
    return [re.sub(r"\d+ samples/s, [\d.]+ s/epoch, |, peak \w+ memory \d+ MiB", "", line) for line in lines]


@pytest.mark.slow
def test_same_seed_gives_the_same_lines_on_either_data_path(launch, script):
    """With one seed, the PIL path prints the tensor path's lines, digit for digit: losses, gradient norms, expert
    load and accuracy; another seed prints other losses."""
    cmd = ["python", script, "--deepspeed", "--dataset", "synthetic", "--log-interval", "5", "--dtype", "fp32",
           "-e", "2", "--synthetic-train-size", "160", "--synthetic-test-size", "40", "--moe", "--num-experts", "2",
           "--noisy-gate-policy", "RSample", "--eval-every", "1"]
    first, again, other = launch(*cmd, "--seed", "1"), launch(*cmd, "--seed", "1", "--data-path", "pil"), launch(
        *cmd, "--seed", "2")
    assert len(first.losses()) == 4 and len(printed_results(first)) == 4 * 3 + 1 + 11
    assert printed_results(first) == printed_results(again)
    assert first.losses() != other.losses()


# CIFAR-10: downloaded by rank 0 first, or one line
def test_missing_cifar10_offline_stops_every_rank_with_one_message_and_leaves_no_shared_memory(launch, root, tmp_path):
    """Two ranks under DeepSpeed's launcher, where DeepSpeed's CPU comm op would create a /dev/shm buffer per rank
    and never remove it (fixes.skip_the_shared_memory_all_reduce): none is left, even by a run that stops at once."""
    port = str(free_port())  # the port names this launch's buffers
    run = launch(root / "run_ds.sh", "--data-dir", tmp_path / "nowhere", env={"NUM_GPUS": "2", "BIND_CORES": "0",
                 "MASTER_PORT": port}, timeout=120)  # no rank waits for another: a hang fails the launch here
    assert run.returncode == 1
    assert "terminate called" not in run.output
    errors = [line for line in run.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1
    assert errors[0].startswith(f"error: CIFAR-10 is not in {tmp_path / 'nowhere'} and could not be downloaded (")
    assert errors[0].endswith(f"Place cifar-10-python.tar.gz (from https://www.cs.toronto.edu/~kriz/cifar.html) "
                              f"in {tmp_path / 'nowhere'}, or train offline on generated data with --dataset synthetic.")
    assert "Traceback" not in run.output
    assert list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*")) == []


def test_a_damaged_copy_is_named_as_such_not_as_missing(parse, tmp_path):
    """torchvision finds a file of the unpacked set missing or wrong (its md5), and the download fails."""
    args = parse("--data-dir", str(tmp_path))
    assert data.not_downloaded(args, "offline").startswith(f"error: CIFAR-10 is not in {tmp_path} and could not ")
    (tmp_path / "cifar-10-batches-py").mkdir()
    assert data.not_downloaded(args, "offline") == (
        f"error: CIFAR-10 in {tmp_path} is damaged or incomplete and could not be downloaded (offline). Place "
        f"cifar-10-python.tar.gz (from https://www.cs.toronto.edu/~kriz/cifar.html) in {tmp_path}, or train offline "
        f"on generated data with --dataset synthetic.")


DATA_ERROR = re.compile(r"^error: CIFAR-10 is not in \S+ and could not be downloaded \((.*)\)\. Place ")


@pytest.fixture(scope="module")
def cifar10_server(tmp_path_factory):
    """The archive (5000 training and 1000 test images) at /cifar-10-python.tar.gz, a cut-off copy at /corrupt/."""
    folder = tmp_path_factory.mktemp("server")
    checksums = make_archive(folder)
    (folder / "corrupt").mkdir()
    archive = (folder / ARCHIVE).read_bytes()
    (folder / "corrupt" / ARCHIVE).write_bytes(archive[:len(archive) // 2])
    server = Server(folder, checksums)
    yield server
    server.close()


def holds_cifar10(folder):
    batches = folder / "data" / "cifar-10-batches-py"
    return all((batches / name).is_file() for name in ("data_batch_5", "test_batch", "batches.meta"))


def error_lines(run):
    return [line for line in run.output.splitlines() if line.startswith("error: ")]


@pytest.mark.slow
def test_download_checks_and_unpacks_cifar10_and_trains(tmp_path, cifar10_server):
    before = cifar10_server.downloads()
    run = run_command([ROOT / "run_ds.sh", "--dtype", "fp32", *ONE_EPOCH], tmp_path,
                      env={"NUM_GPUS": "2", "BIND_CORES": "0", **cifar10_server.env()})
    run.assert_launched()
    assert cifar10_server.downloads() == before + 1  # by rank 0 alone
    assert holds_cifar10(tmp_path)
    assert "Accuracy of the network on the 1000 test images: " in run.output


@pytest.mark.slow
def test_a_download_slower_than_the_timeout_ends_no_rank_and_a_run_beside_it_waits_for_it(tmp_path, cifar10_server):
    """Two ranks; the server sends the archive over 12 s, steadily, and --dist-timeout is 6 s (room for a busy
    machine's collectives in training): rank 1 waits for rank 0's download in collectives shorter than that,
    and both train. A second run started on the same --data-dir while the archive arrives (a job array) says it
    waits for that download, and trains on it: without the lock it wrote the archive again beside it, and one of
    the two stopped on data it found damaged."""
    slow, beside = f"slow/{ARCHIVE}", tmp_path / "beside"
    before = cifar10_server.downloads(slow)
    first = start([ROOT / "run_ds.sh", "--dtype", "fp32", *ONE_EPOCH, "--dist-timeout", "0.1"], tmp_path,
                  env={"NUM_GPUS": "2", "BIND_CORES": "0", **cifar10_server.env(slow)},
                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output = []
    for line in first.stdout:  # until torchvision's progress bar shows the download started
        output.append(line)
        if "%|" in line:
            break
    beside.mkdir()
    second = start(["python", ROOT / "cifar10_deepspeed.py", "--deepspeed", "--dtype", "fp32", *ONE_EPOCH,
                    "--data-dir", tmp_path / "data"], beside, env=cifar10_server.env(slow),
                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    runs = [Run(subprocess.CompletedProcess(run.args, run.returncode, "".join(out)))
            for run, out in ((first, [*output, finish(first)[0]]), (second, [finish(second)[0]]))]
    for run in runs:
        run.assert_launched()
    assert cifar10_server.downloads(slow) == before + 1 and holds_cifar10(tmp_path)
    waits = f"Waiting for another run to finish getting CIFAR-10 into {tmp_path / 'data'}\n"
    assert waits not in runs[0].output and runs[1].output.count(waits) == 1, runs[1].output[-3000:]


def test_cifar10_on_a_read_only_disk_loads_without_a_lock(parse, tmp_path, cifar10_server, small_disk, monkeypatch):
    """A shared, read-only copy of the data (a cluster's dataset mount): the download lock cannot be made there,
    and needs not be; the data load."""
    checksums = cifar10_server.checksums
    monkeypatch.setattr(CIFAR10, "train_list", [[name, checksums["md5"][name]] for name, _ in CIFAR10.train_list])
    monkeypatch.setattr(CIFAR10, "test_list", [[name, checksums["md5"][name]] for name, _ in CIFAR10.test_list])
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": checksums["md5"]["batches.meta"]})
    with tarfile.open(cifar10_server.httpd.folder / ARCHIVE) as archive:
        archive.extractall(small_disk.path, filter="data")
    small_disk.read_only()
    trainset, testset = load_datasets(parse("--data-dir", str(small_disk.path)), download=True)
    assert (len(trainset), len(testset)) == (5000, 1000)
    assert not (small_disk.path / data.DOWNLOAD_LOCK).exists()


@pytest.mark.slow
def test_a_download_that_stalls_ends_in_one_line(tmp_path, cifar10_server):
    """The server sends the archive's first 4 KiB, then nothing, and holds the connection open: the run ends
    once nothing came for --dist-timeout (3 s here; 60 s at most), in one line, with nothing unpacked."""
    started = time.monotonic()
    run = run_command(["python", ROOT / "cifar10_deepspeed.py", "--deepspeed", "--dtype", "fp32", *ONE_EPOCH,
                       "--dist-timeout", "0.05"], tmp_path, env=cifar10_server.env(f"stall/{ARCHIVE}"), timeout=120)
    assert run.returncode == 1 and time.monotonic() - started < 30, run.output[-3000:]
    errors = error_lines(run)
    assert len(errors) == 1 and DATA_ERROR.match(errors[0]).group(1) == "nothing received for 3 s", errors
    assert "Traceback" not in run.output and not (tmp_path / "data" / "cifar-10-batches-py").exists()


@pytest.mark.slow
def test_a_corrupt_download_stops_every_rank_and_is_not_trusted_next_time(tmp_path, cifar10_server):
    cmd = [ROOT / "run_ds.sh", "--dtype", "fp32", *ONE_EPOCH, "--synthetic-train-size", "1"]
    corrupt = run_command(cmd, tmp_path, env={"NUM_GPUS": "2", "BIND_CORES": "0",
                                              **cifar10_server.env(f"corrupt/{ARCHIVE}")}, timeout=120)
    assert corrupt.returncode == 1
    errors = error_lines(corrupt)
    assert len(errors) == 1 and DATA_ERROR.match(errors[0]).group(1) == "File not found or corrupted."
    assert "Traceback" not in corrupt.output and "terminate called" not in corrupt.output
    assert not (tmp_path / "data" / "cifar-10-batches-py").exists()  # checked before unpacking: nothing unpacked

    before = cifar10_server.downloads()
    again = run_command(cmd, tmp_path, env={"NUM_GPUS": "2", "BIND_CORES": "0", **cifar10_server.env()})
    again.assert_launched()
    assert cifar10_server.downloads() == before + 1  # the corrupt archive was not taken for the data
    assert holds_cifar10(tmp_path)


@pytest.mark.slow
def test_a_data_dir_that_fills_stops_in_one_line_and_a_run_with_room_trains(tmp_path, cifar10_server, small_disk):
    """--data-dir on a disk with room for half the archive, then for the archive but not all it unpacks to: each
    run stops in one line, exit 1, no traceback, naming the full disk; once there is room, the next run fetches
    what is missing and trains."""
    archive, data_dir = (cifar10_server.httpd.folder / ARCHIVE).stat().st_size, small_disk.path / "data"
    cmd = ["python", ROOT / "cifar10_deepspeed.py", "--deepspeed", "--dtype", "fp32", *ONE_EPOCH, "--data-dir", data_dir]
    for room, left in ((archive // 2, []), (archive + archive // 4, [ARCHIVE, "cifar-10-batches-py"])):
        shutil.rmtree(data_dir, ignore_errors=True)
        small_disk.grow()
        small_disk.fill(room)
        run = run_command(cmd, tmp_path, env=cifar10_server.env())
        assert run.returncode == 1 and "Traceback" not in run.output, run.output[-3000:]
        assert error_lines(run) == [f"error: --data-dir {data_dir} has no room for CIFAR-10 (No space left on device): "
                                    f"free space there, or give another --data-dir (a run with room fetches what is "
                                    f"missing)"], run.output[-3000:]
        assert set(left) <= set(os.listdir(data_dir)) and not holds_cifar10(small_disk.path)
    small_disk.grow()
    again = run_command(cmd, tmp_path, env=cifar10_server.env())
    again.assert_launched()
    assert holds_cifar10(small_disk.path) and "Finished Training" in again.output


@pytest.mark.slow
def test_two_nodes_of_one_rank_train_moe_across_them_each_with_its_own_data(tmp_path, cifar10_server):
    nodes = Nodes(tmp_path)
    before = cifar10_server.downloads()
    first, second = nodes.run(script("run_ds_moe.sh", "--dtype", "fp32", *ONE_EPOCH),
                              env=(cifar10_server.env(), cifar10_server.env()))
    first.assert_launched()
    assert second.returncode == 0, second.output[-3000:]
    assert "--ep-world-size 2 --num-experts 2" in first.output
    assert all(holds_cifar10(folder) for folder in nodes.folders)
    assert cifar10_server.downloads() == before + 2  # each node onto its own disk
    for line in ("Finished Training", "Accuracy of truck"):
        assert first.output.count(line) == 1 and line not in second.output  # rank 0 prints, once
    assert not second.losses()


@pytest.mark.slow
def test_a_node_that_cannot_get_its_data_stops_every_rank_on_both(tmp_path, cifar10_server):
    nodes = Nodes(tmp_path)
    runs = nodes.run(script("run_ds.sh", "--dtype", "fp32", *ONE_EPOCH),
                     env=(cifar10_server.env(), cifar10_server.env(f"corrupt/{ARCHIVE}")), timeout=180)
    for run in runs:
        assert run.returncode == 1, run.output[-3000:]
        errors = error_lines(run)
        assert len(errors) == 1 and DATA_ERROR.match(errors[0]).group(1) == "File not found or corrupted."
        assert "Traceback" not in run.output
    assert holds_cifar10(nodes.folders[0]) and not holds_cifar10(nodes.folders[1])
