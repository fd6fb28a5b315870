"""bench/gpu_check.sh, the GPU acceptance check, on a machine where torch has no GPU: what can be checked here.

Its runs need a GPU, or --allow-cpu; its install from carried wheels and its CPU mode were run by hand (docs/gpu.md).
"""

import os
import subprocess
import sys

import pytest

from conftest import DRIVER_TOO_OLD, FAKE_MACHINE, QUIET_THREADS, ROOT

CHECK = ROOT / "bench" / "gpu_check.sh"
NO_GPU = {"PYTHONPATH": str(FAKE_MACHINE), "FAKE_CUDA_ERROR": DRIVER_TOO_OLD}  # whatever machine runs the test


def run(*args, **env):
    return subprocess.run(["bash", CHECK, *args], capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, **env})


def test_it_parses():
    assert subprocess.run(["bash", "-n", CHECK]).returncode == 0


def test_it_refuses_without_a_gpu_in_one_line_before_installing_anything(tmp_path):
    check = run(CHECK_ENV=str(tmp_path / "check"), WHEELS=str(tmp_path / "wheels"), **NO_GPU)
    assert (check.returncode, check.stdout) == (2, "")
    assert check.stderr == ("gpu_check.sh: error: no GPU that torch can use here (The NVIDIA driver on your system is "
                            "too old (found version 12020)): this check is for a GPU box (docs/gpu.md)\n")
    assert not (tmp_path / "check").exists()


def test_the_install_without_carried_wheels_says_how_to_make_them(tmp_path):
    check = run("--install-only", WHEELS=str(tmp_path / "wheels"))
    assert (check.returncode, check.stderr) == (2, (
        f"gpu_check.sh: error: no DeepSpeed wheel in {tmp_path / 'wheels'}: prepare the wheels on a machine with a "
        f"network: PYTHON_VERSION=<the box's> bench/gpu_check.sh --download\n"))


def test_an_unknown_argument_is_one_line():
    assert run("--gpu").stderr == "gpu_check.sh: error: unknown argument '--gpu': give --download, --install-only, --allow-cpu or nothing\n"


@pytest.mark.parametrize("cpu", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["refused", "allowed"])
def test_its_runs_refuse_the_cpu_unless_allowed(cpu, tmp_path):
    """The runs' script on DeepSpeed's CPU accelerator: refused, or with --allow-cpu it writes the table; its
    compiler check trains the quick start's run with no C++ compiler and an empty op cache."""
    args = ["--checks", "compiler", "--out", str(tmp_path / "table.md")] + (["--allow-cpu"] if cpu else [])
    check = subprocess.run([sys.executable, ROOT / "bench" / "gpu_check.py", *args], capture_output=True, text=True,
                           env={"PATH": f"{os.path.dirname(sys.executable)}:/usr/bin:/bin", **NO_GPU, **QUIET_THREADS},
                           timeout=600)
    if not cpu:
        assert check.returncode == 1
        assert check.stderr.strip().splitlines()[-1] == ("gpu_check.py: error: DeepSpeed found no GPU: this check is "
                                                         "for a GPU box (docs/gpu.md)")
        assert not (tmp_path / "table.md").exists()
        return
    assert check.returncode == 0, check.stdout[-3000:] + check.stderr[-3000:]
    table = (tmp_path / "table.md").read_text().splitlines()
    assert table[0] == "# bench/gpu_check.sh" and "- Python " in table[3] and table[4].endswith(" s in all, 0 failed")
    assert table[6:8] == ["| check | configuration | result | samples/s | peak memory MiB | s |",
                          "| --- | --- | --- | --- | --- | --- |"]
    assert len(table) == 9 and table[8].startswith(
        "| compiler | dense, bf16, 1 rank, 1 epoch, no C++ compiler (CXX=false), empty op cache | trains: loss 2.")
