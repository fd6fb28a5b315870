"""Run cifar10_deepspeed.py as `python cifar10_deepspeed.py FLAGS` runs it, adding a line to a file each time
anything in the process asks to load NVML, NVIDIA's library ($NVML_LOADS), or waits for the accelerator's queue
to drain ($SYNCS) (tests/test_fixes.py, tests/test_machine.py).

    NVML_LOADS=loads.txt SYNCS=syncs.txt python tests/count_in_a_run.py --deepspeed --dataset synthetic
"""

import ctypes
import os
import runpy
import sys

from deepspeed.accelerator import get_accelerator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NVML = "libnvidia-ml.so.1"


def note(variable, line):
    if variable in os.environ:
        with open(os.environ[variable], "a") as lines:
            lines.write(f"{line}\n")


class CountingCDLL(ctypes.CDLL):
    """ctypes' library loader, torch.cuda's way to NVML, counting each request for NVML."""

    def __init__(self, name, *args, **kwargs):
        if name == NVML:
            note("NVML_LOADS", name)
        super().__init__(name, *args, **kwargs)


def counting(synchronize):
    """The accelerator's synchronize, counting each call by the function that made it."""
    def counted(self, *args, **kwargs):
        note("SYNCS", sys._getframe(1).f_code.co_filename + ":" + sys._getframe(1).f_code.co_name)
        return synchronize(self, *args, **kwargs)
    return counted


if __name__ == "__main__":
    ctypes.CDLL = CountingCDLL
    accelerator = type(get_accelerator())
    accelerator.synchronize = counting(accelerator.synchronize)
    sys.path.insert(0, ROOT)
    sys.argv[0] = os.path.join(ROOT, "cifar10_deepspeed.py")
    runpy.run_path(sys.argv[0], run_name="__main__")
