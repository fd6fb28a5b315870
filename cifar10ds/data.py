"""The data: CIFAR-10 or a generated stand-in, held once as uint8 and normalized on the accelerator (the tensor
path) or through torchvision's per-image transforms (the PIL path), and the sampler a resumed epoch starts
mid-way (docs/data.md)."""

import contextlib
import errno
import fcntl
import functools
import itertools
import os
import socket

import deepspeed.comm as dist
import torch
import torch.nn.functional as F
import torchvision
import torchvision.transforms as transforms
from PIL import Image

from cifar10ds import machine

CLASSES = ("plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)  # the reference's Normalize
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
DOWNLOAD_LOCK = CIFAR10_ARCHIVE + ".lock"  # in --data-dir: the run checking, downloading or unpacking there holds it
DOWNLOAD_STALL = 60  # seconds a download may go without receiving anything


class SyntheticCIFAR10(torch.utils.data.Dataset):
    """A deterministic, learnable CIFAR-10 stand-in that needs no network.

    Each class owns a smooth random colour pattern. An image is its class's pattern, shifted by up to 4 pixels,
    blended with another class's pattern and covered in pixel noise. Images are uint8 HWC arrays turned into PIL
    images, as torchvision's CIFAR10 does, so the same transforms apply. The patterns are the same for every
    split and rank; train and test draw different images.
    """

    classes = CLASSES

    def __init__(self, size, train, transform=None):
        self.transform = transform
        patterns = F.interpolate(torch.rand(10, 3, 8, 8, generator=torch.Generator().manual_seed(0)),
                                 size=32, mode="bicubic", align_corners=False)
        gen = torch.Generator().manual_seed(1 if train else 2)
        targets = torch.randint(10, (size,), generator=gen)
        distractors = (targets + torch.randint(1, 10, (size,), generator=gen)) % 10
        mix = 0.5 * torch.rand(size, 1, 1, 1, generator=gen)
        images = (1 - mix) * patterns[targets] + mix * patterns[distractors]
        shifts = torch.randint(-4, 5, (size, 2), generator=gen).tolist()
        images = torch.stack([img.roll(tuple(s), dims=(1, 2)) for img, s in zip(images, shifts)])
        images = images + 0.8 * torch.randn(images.shape, generator=gen)
        self.data = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        self.targets = targets.tolist()

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        image = Image.fromarray(self.data[index])
        return (self.transform(image) if self.transform else image), self.targets[index]


class ImageTensor(torch.utils.data.Dataset):
    """A decoded image set as one uint8 tensor of N x 32 x 32 x 3 (torchvision's array, shared, not copied) and
    its labels. The loader takes whole batches from it by index (__getitems__); `to_inputs` normalizes them."""

    def __init__(self, dataset):
        self.data, self.targets = torch.from_numpy(dataset.data), torch.tensor(dataset.targets)

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        return self.data[index], self.targets[index]

    def __getitems__(self, indices):
        indices = torch.tensor(indices)
        return self.data[indices], self.targets[indices]


def whole_batch(batch):
    """The collate function of the tensor path: ImageTensor already gathered the batch."""
    return batch


def collate_fn(dataset):
    base = dataset.dataset if isinstance(dataset, torch.utils.data.Subset) else dataset
    return whole_batch if isinstance(base, ImageTensor) else None


def split(args, train, download, transform=None):
    """CIFAR-10's training or test split from --data-dir (downloaded there if `download` and missing), or the
    synthetic set's."""
    if args.dataset == "synthetic":
        size = args.synthetic_train_size if train else args.synthetic_test_size
        return SyntheticCIFAR10(size, train=train, transform=transform)
    with stalls_bounded(args) if download else contextlib.nullcontext():
        return torchvision.datasets.CIFAR10(root=args.data_dir, train=train, download=download, transform=transform)


def longest_stall(args):
    """DOWNLOAD_STALL seconds, or --dist-timeout where that is shorter (predict.py has no such flag, no peers)."""
    minutes = getattr(args, "dist_timeout", None)
    return DOWNLOAD_STALL if minutes is None else min(DOWNLOAD_STALL, 60 * minutes)


@contextlib.contextmanager
def stalls_bounded(args):
    """End a download that receives nothing for DOWNLOAD_STALL seconds (or --dist-timeout, if shorter) with an
    OSError. torchvision's waits on its socket with no timeout: a server that stops sending would hang the run
    for ever, and every rank waiting for it. A slow download that keeps receiving goes on."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(longest_stall(args))
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


@contextlib.contextmanager
def one_download_at_a_time(args, download):
    """Where CIFAR-10 may be downloaded, hold a lock on <data-dir>/cifar-10-python.tar.gz.lock while torchvision
    checks, downloads and unpacks it there. Runs started together on one fresh --data-dir (a job array, two run
    scripts) would otherwise each write the archive and unpack it over the other's, and one stop on data it found
    damaged half-way. A run that finds the lock held says so, waits for that run to finish, then finds the data
    whole (or, where that run failed, downloads them itself). A POSIX record lock (machine.lock_at_once), as
    --save-dir's. Where no lock file can be made (a read-only --data-dir, which a download could not write either)
    or the file system has no locks, the download goes on without."""
    fd = download_lock_file(args) if download and args.dataset == "cifar10" else None
    try:
        if fd is not None:
            wait_for_download_lock(fd, args.data_dir)
        yield
    finally:
        if fd is not None:
            os.close(fd)


def download_lock_file(args):
    """The lock file of --data-dir, open, or None where it cannot be made."""
    try:
        os.makedirs(args.data_dir, exist_ok=True)
        return os.open(os.path.join(args.data_dir, DOWNLOAD_LOCK), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        return None


def wait_for_download_lock(fd, data_dir):
    try:
        locked = machine.lock_at_once(fd)
    except OSError:
        return  # a file system without locks
    if not locked:
        print(f"Waiting for another run to finish getting CIFAR-10 into {data_dir}", flush=True)
        fcntl.lockf(fd, fcntl.LOCK_EX)


def unpacked(args):
    """The folder of --data-dir where torchvision unpacks CIFAR-10."""
    return os.path.join(args.data_dir, torchvision.datasets.CIFAR10.base_folder)


def load_datasets(args, download):
    """The training and test sets: on the tensor path uint8 ImageTensors, on the PIL path torchvision's per-image
    transforms, ToTensor and Normalize, as in the reference."""
    with one_download_at_a_time(args, download):
        if args.data_path == "tensor":
            return ImageTensor(split(args, True, download)), ImageTensor(split(args, False, download))
        transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
        return split(args, True, download, transform), split(args, False, download, transform)


def test_set(args):
    """The test split alone, on the tensor path (predict.py), downloaded if missing."""
    with one_download_at_a_time(args, download=True):
        return ImageTensor(split(args, False, download=True))


def not_downloaded(args, error):
    """The line of a CIFAR-10 that is neither in --data-dir, whole, nor downloadable, and the ways on."""
    if getattr(error, "errno", None) == errno.ENOSPC:  # while downloading or unpacking: torchvision redoes either
        return (f"error: --data-dir {args.data_dir} has no room for CIFAR-10 ({error.strerror}): free space there, "
                f"or give another --data-dir (a run with room fetches what is missing)")
    if isinstance(getattr(error, "reason", error), TimeoutError):  # urllib wraps one before the response
        error = f"nothing received for {longest_stall(args):g} s"
    damaged = os.path.isdir(unpacked(args))  # torchvision checked its files
    state = f"in {args.data_dir} is damaged or incomplete and" if damaged else f"is not in {args.data_dir} and"
    return (f"error: CIFAR-10 {state} could not be downloaded ({error}). Place "
            f"{CIFAR10_ARCHIVE} (from {CIFAR10_URL}) in {args.data_dir}, or train offline on generated data with "
            f"--dataset synthetic.")


def to_inputs(images, device, dtype=None):
    """A batch as the model takes it, on `device` in `dtype` (None: float32).

    The tensor path's batch moves as uint8 and becomes what ToTensor and Normalize make of each image, bit for
    bit: the same float32 operations, on the whole batch, with no read of the device. 255 is a device tensor
    because CUDA multiplies by the reciprocal of a host scalar, which rounds differently from ToTensor's division.
    """
    images = images.to(device, non_blocking=True)
    if images.dtype == torch.uint8:
        full, mean, std = normalization(images.device)
        images = images.permute(0, 3, 1, 2).contiguous().float() / full
        images = images.sub_(mean).div_(std)  # Normalize's arithmetic, without its host check of std on every batch
    return images if dtype is None else images.to(dtype)


@functools.cache
def normalization(device):
    """255, MEAN and STD as tensors on `device`, made once: a tensor made from a host number each step is a copy
    the device waits for, and torchvision's normalize reads (std == 0).any() back to the host on every batch."""
    return (torch.tensor(255.0, device=device), torch.tensor(MEAN, device=device).view(-1, 1, 1),
            torch.tensor(STD, device=device).view(-1, 1, 1))


def test_loader(testset, batch_size, shard):
    """The test set in order, in batches of `batch_size`; with shard, only this rank's every world_size-th image."""
    if shard:
        testset = torch.utils.data.Subset(testset, range(dist.get_rank(), len(testset), dist.get_world_size()))
    return torch.utils.data.DataLoader(testset, batch_size=batch_size, shuffle=False, collate_fn=collate_fn(testset))


class ResumableSampler(torch.utils.data.distributed.DistributedSampler):
    """DeepSpeed's DistributedSampler, which can begin an epoch at `start`: the number of this rank's samples
    that a mid-epoch checkpoint had already trained on. The order is the same."""

    start = 0

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.start, None)

    def __len__(self):
        return self.num_samples - self.start


def order_seed(args):
    """The seed of the training data's order: --seed, else DistributedSampler's default, 0."""
    return 0 if args.seed is None else args.seed


def prepare_loader(trainloader, args):
    """DeepSpeed's training loader with a sampler a resumed epoch can start mid-way, seeded by --seed, and its
    worker processes chosen from the cores (DeepSpeed starts 2 per rank, whatever the cores; it reads the count
    when each epoch begins). It pins batches only where there is an accelerator's memory to copy them to: DeepSpeed
    asks always, and torch, finding none (a CPU run), warns at every run and pins nothing."""
    sampler = trainloader.data_sampler
    trainloader.data_sampler = ResumableSampler(sampler.dataset, num_replicas=sampler.num_replicas, rank=sampler.rank)
    trainloader.data_sampler.seed = order_seed(args)
    workers = 0 if args.data_path == "tensor" else machine.data_loader_workers()  # gathering a batch is one op
    trainloader.num_local_io_workers = workers if args.data_workers is None else args.data_workers
    trainloader.pin_memory = trainloader.pin_memory and torch.accelerator.is_available()
