"""Run cifar10_deepspeed.py as `python cifar10_deepspeed.py FLAGS` runs it, adding a line to the file $NVML_LOADS
each time anything in the process asks to load NVML, NVIDIA's library (tests/test_fixes.py).

    NVML_LOADS=loads.txt python tests/count_nvml_loads.py --deepspeed --dataset synthetic
"""

import ctypes
import os
import runpy
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NVML = "libnvidia-ml.so.1"


class CountingCDLL(ctypes.CDLL):
    """ctypes' library loader, torch.cuda's way to NVML, counting each request for NVML."""

    def __init__(self, name, *args, **kwargs):
        if name == NVML:
            with open(os.environ["NVML_LOADS"], "a") as loads:
                loads.write(f"{name}\n")
        super().__init__(name, *args, **kwargs)


if __name__ == "__main__":
    ctypes.CDLL = CountingCDLL
    sys.path.insert(0, ROOT)
    sys.argv[0] = os.path.join(ROOT, "cifar10_deepspeed.py")
    runpy.run_path(sys.argv[0], run_name="__main__")
