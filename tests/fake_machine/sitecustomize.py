"""Make a launched run see the machine a test asks for, whatever machine runs the test.

Loaded by Python at start-up when this folder is on PYTHONPATH (tests/conftest.py's
`machine` fixture), in the launcher and in every rank. Each setting patches a
module right after Python executes it:

    FAKE_NATIVE_FP16=1 or 0   DeepSpeed's CPU accelerator reports native fp16 kernels, or none
    FAKE_CIFAR10=<json>       torchvision's CIFAR10 downloads from the test's server: the json
                              holds url, tgz_md5 and each batch file's md5 (tests/cifar_files.py)
    FAKE_NO_CXX=1             torch.compile's inductor finds no C++ compiler (DeepSpeed's op builds
                              are given none by CXX=false)
    FAKE_CUDA_ERROR=<text>    torch cannot use CUDA, and says <text> when asked why (torch.cuda.init)
    FAKE_FULL_DISK=<text>     the disk fills while torch.save writes a file whose path holds <text>: part of
                              the file is written, then ENOSPC, as on a full disk
    FAKE_RANK_DIES=<rank>     that rank exits with status 1 as the script starts, as a rank killed early
"""

import errno
import importlib.abc
import importlib.util
import json
import os
import sys


def report_native_fp16(module):
    native = os.environ["FAKE_NATIVE_FP16"] == "1"
    module.CPU_Accelerator.is_fp16_supported = lambda self: native


def download_from_the_test_server(module):
    archive = json.loads(os.environ["FAKE_CIFAR10"])
    module.CIFAR10.url = archive["url"]
    module.CIFAR10.tgz_md5 = archive["tgz_md5"]
    module.CIFAR10.train_list = [[name, archive["md5"][name]] for name, _ in module.CIFAR10.train_list]
    module.CIFAR10.test_list = [[name, archive["md5"][name]] for name, _ in module.CIFAR10.test_list]
    module.CIFAR10.meta = {**module.CIFAR10.meta, "md5": archive["md5"]["batches.meta"]}


def no_cxx_for_inductor(module):
    module.cpp.cxx = (None, "no-such-c++")


def cuda_unusable(module):
    def init():
        raise RuntimeError(os.environ["FAKE_CUDA_ERROR"])

    module.is_available = lambda: False
    module.init = init


def disk_fills_while_saving(module):
    save, where = module.save, os.environ["FAKE_FULL_DISK"]

    def save_until_full(obj, f, *args, **kwargs):
        if where in str(f):
            with open(f, "wb") as partial:
                partial.write(b"PK\x03\x04" + bytes(4096))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return save(obj, f, *args, **kwargs)

    module.save = save_until_full


def rank_dies(module):
    if os.environ.get("RANK") == os.environ["FAKE_RANK_DIES"]:
        os._exit(1)


PATCHES = {  # module: (setting, patch)
    "deepspeed.accelerator.cpu_accelerator": ("FAKE_NATIVE_FP16", report_native_fp16),
    "torchvision.datasets.cifar": ("FAKE_CIFAR10", download_from_the_test_server),
    "torch._inductor.config": ("FAKE_NO_CXX", no_cxx_for_inductor),
    "torch.cuda": ("FAKE_CUDA_ERROR", cuda_unusable),
    "torch": ("FAKE_FULL_DISK", disk_fills_while_saving),
    "cifar10ds.launch": ("FAKE_RANK_DIES", rank_dies),
}


class PatchOnImport(importlib.abc.MetaPathFinder):
    """Run a module's patch right after Python executes the module."""

    def __init__(self, patches):
        self.patches = patches

    def find_spec(self, name, path, target=None):
        if name not in self.patches:
            return None
        patch = self.patches.pop(name)
        spec = importlib.util.find_spec(name)
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            patch(module)

        spec.loader.exec_module = exec_module
        return spec


wanted = {module: patch for module, (setting, patch) in PATCHES.items() if setting in os.environ}
if wanted:
    sys.meta_path.insert(0, PatchOnImport(wanted))
