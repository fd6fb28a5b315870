"""Make a launched run see a machine this one cannot be: a CPU with or without native fp16 kernels, a GPU that
torch cannot use, CIFAR-10's download served from 127.0.0.1 (no network here). TESTING.md lists each stand-in.

Loaded by Python at start-up when this folder is on PYTHONPATH (tests/conftest.py's
`machine` fixture), in the launcher and in every rank. Each setting patches a
module right after Python executes it:

    FAKE_NATIVE_FP16=1 or 0   DeepSpeed's CPU accelerator reports native fp16 kernels, or none
    FAKE_CIFAR10=<json>       torchvision's CIFAR10 downloads from the test's server: the json
                              holds url, tgz_md5 and each batch file's md5 (tests/cifar_files.py)
    FAKE_CUDA_ERROR=<text>    torch cannot use CUDA, and says <text> when asked why (torch.cuda.init)
"""

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


def cuda_unusable(module):
    def init():
        raise RuntimeError(os.environ["FAKE_CUDA_ERROR"])

    module.is_available = lambda: False
    module.init = init


PATCHES = {  # module: (setting, patch)
    "deepspeed.accelerator.cpu_accelerator": ("FAKE_NATIVE_FP16", report_native_fp16),
    "torchvision.datasets.cifar": ("FAKE_CIFAR10", download_from_the_test_server),
    "torch.cuda": ("FAKE_CUDA_ERROR", cuda_unusable),
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
