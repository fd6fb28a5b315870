import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import cifar10_deepspeed  # noqa: E402

# Any download the script tries goes to a closed local port: the tests never touch the network.
OFFLINE = {"https_proxy": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9", "no_proxy": ""}
LAUNCH_TIMEOUT = 600
IDLE_EXPERTS = pytest.StashKey[list]()  # test_matrix.py's experts that got no token, listed after the run


def pytest_terminal_summary(terminalreporter, config):
    idle = config.stash.get(IDLE_EXPERTS, [])
    if idle:
        terminalreporter.section("idle experts (no token at the checked step: no gradient, not checked)")
        for line in idle:
            terminalreporter.write_line(line)


@pytest.fixture
def parse():
    """Parse command-line flags as the script does."""
    return lambda *argv: cifar10_deepspeed.add_argument(list(argv))


@pytest.fixture(scope="session")
def single_rank_group():
    """An in-process, one-rank gloo group, for code that talks to deepspeed.comm."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for name, value in dict(RANK=0, LOCAL_RANK=0, WORLD_SIZE=1, MASTER_ADDR="127.0.0.1", MASTER_PORT=port).items():
        os.environ.setdefault(name, str(value))
    cifar10_deepspeed.deepspeed.init_distributed()


class Run:
    """A finished launch: exit status and everything it printed."""

    def __init__(self, proc):
        self.returncode = proc.returncode
        self.output = proc.stdout

    def losses(self):
        return [float(x) for x in re.findall(r"^\[\d+, +\d+\] loss: ([\d.]+)$", self.output, re.M)]

    def accuracy(self):
        match = re.search(r"^Accuracy of the network on the (\d+) test images: (\d+) %$", self.output, re.M)
        assert match, f"no accuracy line in:\n{self.output[-3000:]}"
        return int(match.group(2))

    def assert_trained(self, min_accuracy):
        assert self.returncode == 0, self.output[-3000:]
        losses = self.losses()
        assert len(losses) >= 2 and losses[-1] < losses[0] * 0.8, f"loss did not fall: {losses}"
        assert "Finished Training" in self.output
        assert self.accuracy() >= min_accuracy, self.output[-1500:]


def run_command(cmd, cwd, env=None, timeout=LAUNCH_TIMEOUT):
    """Run a command offline in `cwd` and return its Run; `env` adds to or overrides the environment."""
    full_env = {**os.environ, **OFFLINE, "PYTHONUNBUFFERED": "1", **(env or {})}
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_SIZE"):
        if name not in (env or {}):
            full_env.pop(name, None)  # set by the in-process group fixture; a launch makes its own
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=full_env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)
    return Run(proc)


@pytest.fixture
def launch(tmp_path):
    """Run a command from a fresh working directory (for data), offline."""
    return lambda *cmd, env=None, timeout=LAUNCH_TIMEOUT: run_command(cmd, tmp_path, env, timeout)


@pytest.fixture
def script():
    return ROOT / "cifar10_deepspeed.py"


@pytest.fixture
def root():
    return ROOT
