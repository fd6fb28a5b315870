import contextlib
import csv
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parent.parent
FAKE_MACHINE = ROOT / "tests" / "fake_machine"
sys.path.insert(0, str(ROOT))
# DeepSpeed's CPU ops are built per environment: another checkout's venv, building into the shared default
# (~/.cache/torch_extensions), would rebuild them under this suite's launches.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
# Two workers run side by side on few cores: every process's OpenMP threads sleep while they wait instead of
# spinning (beside a 4-rank launch on 2 cores, a spinning one-rank run took 45 s where it takes 15 alone, 19 so).
QUIET_THREADS = {"OMP_WAIT_POLICY": "PASSIVE"}
os.environ.update(QUIET_THREADS)

import cifar10_deepspeed  # noqa: E402
import deepspeed  # noqa: E402
from cifar10ds import fixes  # noqa: E402
from cifar10ds.launch import free_port  # noqa: E402

# Any download the script tries goes to a closed local port: the tests never touch the network.
OFFLINE = {"https_proxy": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9", "no_proxy": ""}
LAUNCH_TIMEOUT = 600
# A launch's learning bound: what its seed reached less MARGIN points, below the spread of other seeds, which is
# how far another CPU's rounding (its kernels, gloo's sums) moves a seeded run. The suite prints every run's at its end.
MARGIN = 8
LAUNCHED = []  # (session, command) of every command the tests started
IDLE_EXPERTS = pytest.StashKey[list]()  # test_matrix.py's experts that got no token, listed after the run
REACHED = []  # (test, accuracy, least accuracy asked) of every launch that Run.assert_trained checked


# The test files whose launches take longest, longest first (a fresh clone's run on 2 cores: test_checkpoints.py
# about 11 minutes, test_matrix.py 9, test_launch.py 5, ...); the rest, each under half a minute, follow in their
# own order, so that neither worker is left alone with a long file at the end.
LONGEST_FIRST = ["test_checkpoints.py", "test_matrix.py", "test_launch.py", "test_layouts.py", "test_machine.py",
                 "test_checkpoint_moves.py", "test_metrics.py", "test_model_files.py", "test_data.py", "test_folders.py",
                 "test_options.py", "test_cifar10_deepspeed.py", "test_gpu_check.py"]


def pytest_collection_modifyitems(items):
    """Collect the longest test files first: the two workers take them in this order (pytest.ini)."""
    def rank(item):
        name = Path(str(item.fspath)).name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)
    items.sort(key=rank)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    """A test worker's idle experts and accuracies reach the controller, which prints them at the end."""
    output = getattr(node, "workeroutput", {})
    node.config.stash.setdefault(IDLE_EXPERTS, []).extend(output.get("idle_experts", []))
    REACHED.extend(tuple(row) for row in output.get("reached", []))


def pytest_terminal_summary(terminalreporter, config):
    idle = config.stash.get(IDLE_EXPERTS, [])
    if idle:
        terminalreporter.section("idle experts (no token at the checked step: no gradient, not checked)")
        for line in idle:
            terminalreporter.write_line(line)
    if REACHED:
        terminalreporter.section("test accuracy each launch reached, and its bound (TESTING.md)")
        for test, accuracy, least in REACHED:
            terminalreporter.write_line(f"{accuracy:5.1f} % (at least {least} %)  {test}")


@pytest.fixture(autouse=True)
def signal_handlers():
    """The test process's signal handlers, given back after each test: a run's train() leaves SIGTERM and SIGUSR1
    noted for the final test that follows it in main()."""
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    yield
    for signum, handler in handlers.items():
        signal.signal(signum, handler)


@pytest.fixture
def parse():
    """Parse command-line flags as the script does."""
    return lambda *argv: cifar10_deepspeed.add_argument(list(argv))


@pytest.fixture(scope="session")
def single_rank_group():
    """An in-process, one-rank gloo group, for code that talks to deepspeed.comm, with the script's fixes of
    DeepSpeed in place as its main() puts them."""
    for name, value in dict(RANK=0, LOCAL_RANK=0, WORLD_SIZE=1, MASTER_ADDR="127.0.0.1", MASTER_PORT=free_port()).items():
        os.environ.setdefault(name, str(value))
    fixes.stop_probing_a_missing_nvml()
    fixes.bound_every_wait(deepspeed.constants.default_pg_timeout)
    deepspeed.init_distributed()


class Run:
    """A finished launch: exit status and everything it printed."""

    def __init__(self, proc):
        self.returncode = proc.returncode
        self.output = proc.stdout

    def losses(self):
        return [float(x) for x in re.findall(r"^\[ \d+, +\d+\] loss:  (\d+\.\d{3})$", self.output, re.M)]

    def accuracy(self):
        match = re.search(r"^Accuracy of the network on the (\d+) test images:  (\d+) %$", self.output, re.M)
        assert match, f"no accuracy line in:\n{self.output[-3000:]}"
        return int(match.group(2))

    def assert_launched(self):
        """The launch ran to its end and trained: its loss fell by a tenth from chance's 2.30 (an untrained run
        stays within 0.02 of it), it finished and printed the accuracy. What a launch test asserts; how well a
        configuration learns is test_matrix.py's."""
        assert self.returncode == 0, self.output[-3000:]
        losses = self.losses()
        assert len(losses) >= 2 and losses[-1] < losses[0] * 0.9, f"loss did not fall: {losses}"
        assert "Finished Training" in self.output
        self.accuracy()

    def assert_trained(self, min_accuracy):
        """assert_launched, and the test accuracy at least `min_accuracy`: a bound that another CPU's rounding
        cannot cross (MARGIN)."""
        self.assert_launched()
        REACHED.append((os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" ", 1)[0], self.accuracy(), min_accuracy))
        assert self.accuracy() >= min_accuracy, self.output[-1500:]


def metric(metrics_dir, name):
    """One series of a --metrics-dir run, as DeepSpeed's CSV monitor wrote it: {step: value}, in step order.

    A resumed run appends a header and the steps it repeats: the later value of a step wins.
    """
    with open(metrics_dir / "cifar10" / f"{name}.csv") as f:
        return {int(step): float(value) for step, value in csv.reader(f) if step != "step"}


def launch_env(env=None):
    """The environment of a launch: offline, unbuffered, no process group of the test process's own."""
    full_env = {**os.environ, **OFFLINE, "PYTHONUNBUFFERED": "1", **(env or {})}
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_SIZE"):
        if name not in (env or {}):
            full_env.pop(name, None)  # set by the in-process group fixture; a launch makes its own
    return full_env


def start(cmd, cwd, env=None, **popen_args):
    """Start a command in a session of its own, so that it and every rank it spawns can be killed together.

    The suite checks at its end that none of them is left (no_rank_outlives_the_suite).
    """
    cmd = [str(c) for c in cmd]
    if Path(cmd[0]).name == "deepspeed" and not any(c.startswith("--master_port") for c in cmd):
        cmd[1:1] = ["--master_port", str(free_port())]  # not the launcher's 29500: the other test worker's launch may hold it
    proc = subprocess.Popen(cmd, cwd=cwd, env=launch_env(env), start_new_session=True, text=True, **popen_args)
    LAUNCHED.append((proc.pid, " ".join(map(str, cmd))))
    return proc


def running(field, value):
    """The processes still running (zombies, already dead, are left out) whose /proc stat `field` (1: parent,
    3: session) is `value`."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # ended while we looked
        if int(fields[field]) == value and fields[0] != "Z":
            alive.append(int(stat.parent.name))
    return alive


def live_processes(session):
    """The processes of a session that are still running.

    A session, not a process group: ninja starts each compiler in a group of its own.
    """
    return running(3, session)


def is_running(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def children(pid):
    """The running processes `pid` started: torchrun's ranks, which it starts each in a session of its own."""
    return running(1, pid)


def kill_session(session, wait=10):
    """SIGKILL every process of a session that start() began (its leader's pid is the session's id).

    Again until none is left (a dying ninja may still fork a compiler), for at most `wait` seconds.
    """
    deadline = time.monotonic() + wait
    while (alive := live_processes(session)) and time.monotonic() < deadline:
        for pid in alive:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass  # ended while we looked
        time.sleep(0.05)


def finish(proc, timeout=LAUNCH_TIMEOUT):
    """Wait for a started command and return what it printed (stdout, stderr).

    Past `timeout` seconds the command and every rank it spawned are killed, and the
    test fails naming the command and what it printed last.
    """
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_session(proc.pid)
        try:
            output = "".join(part or "" for part in proc.communicate(timeout=30))
        except subprocess.TimeoutExpired:  # a process outside its session holds the pipe: do not wait on it
            output = "(its output could not be read: a process outside its session holds the pipe)"
        pytest.fail(f"launch timed out after {timeout} s and was killed with its ranks: {' '.join(proc.args)}\n"
                    f"its last output:\n{output[-3000:]}", pytrace=False)


def run_command(cmd, cwd, env=None, timeout=LAUNCH_TIMEOUT):
    """Run a command offline in `cwd` and return its Run; `env` adds to or overrides the environment."""
    proc = start(cmd, cwd, env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output, _ = finish(proc, timeout)
    return Run(subprocess.CompletedProcess(cmd, proc.returncode, output))


def signal_when(cmd, cwd, seen, act, env=None):
    """Launch `cmd` in a session of its own; once a line of its output satisfies `seen`, call act(launcher,
    output so far) and read on until every process of the session has closed its output. Returns the Run and
    the seconds from act to the last process of the session gone."""
    launcher = start(cmd, cwd, env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    watchdog = threading.Timer(LAUNCH_TIMEOUT, kill_session, [launcher.pid])
    watchdog.start()
    output, acted = [], None
    for line in launcher.stdout:
        output.append(line)
        if acted is None and seen(line):
            act(launcher, "".join(output))
            acted = time.monotonic()
    while live_processes(launcher.pid) and time.monotonic() - acted < 60:
        time.sleep(0.05)
    gone = time.monotonic() - acted if acted else None
    watchdog.cancel()
    assert acted, f"never acted; the run printed:\n{''.join(output)[-3000:]}"
    output.append(finish(launcher)[0])
    return Run(subprocess.CompletedProcess(cmd, launcher.returncode, "".join(output))), gone


@contextlib.contextmanager
def paused(launcher):
    """Every process of the session start() began for `launcher` stopped (SIGSTOP) for the block, so that what
    the block does (fill a disk, send a signal) lands between two of the run's steps, however late this machine
    acts on the line it saw."""
    os.killpg(launcher.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.killpg(launcher.pid, signal.SIGCONT)


def rank_pid(output, rank):
    return int(re.search(rf"process (\d+) spawned with command: .*'--local_rank={rank}'", output).group(1))


@pytest.fixture(scope="session", autouse=True)
def no_rank_outlives_the_suite():
    """Fail the session if any process a test launched is still running at its end (and kill it)."""
    yield
    survivors = [f"{command} (processes {processes})" for session, command in LAUNCHED
                 if (processes := live_processes(session))]
    for session, _ in LAUNCHED:
        kill_session(session)
    assert not survivors, "launched processes outlived the suite:\n" + "\n".join(survivors)


def pytest_sessionfinish(session):
    """A test worker's idle experts and accuracies reach the controller, which prints them at the end."""
    if hasattr(session.config, "workerinput"):
        session.config.workeroutput.update(idle_experts=session.config.stash.get(IDLE_EXPERTS, []), reached=REACHED)


OP_BUILD_TIMEOUT = 900  # a cold build takes 1-2 minutes on 2 cores


@pytest.fixture(scope="session")
def cpu_adam():
    """DeepSpeed's CPU Adam op, which only fp16 master weights need (the MoE tutorial's recipe; everything else
    trains with torch's fused AdamW), compiled before the launch that needs it is timed.

    Built in a process of its own, then loaded here. A build that outlives OP_BUILD_TIMEOUT is stopped with
    SIGABRT, which makes Python's faulthandler print where it waited, and the test fails with that.
    """
    load = "from deepspeed.accelerator import get_accelerator; get_accelerator().create_op_builder('CPUAdamBuilder').load()"
    build = subprocess.Popen([sys.executable, "-X", "faulthandler", "-c", load], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
    LAUNCHED.append((build.pid, "build of DeepSpeed's CPUAdamBuilder"))
    try:
        _, errors = build.communicate(timeout=OP_BUILD_TIMEOUT)
    except subprocess.TimeoutExpired:
        build.send_signal(signal.SIGABRT)
        build.wait(timeout=30)
        kill_session(build.pid)  # and the compilers it started
        _, errors = build.communicate(timeout=30)
        pytest.fail(f"DeepSpeed's CPU Adam did not build within {OP_BUILD_TIMEOUT} s; where it waited:\n"
                    f"{errors[-3000:]}", pytrace=False)
    assert build.returncode == 0, f"DeepSpeed's CPU Adam did not build:\n{errors[-3000:]}"


@pytest.fixture
def launch(tmp_path):
    """Run a command from a fresh working directory (for data), offline."""
    return lambda *cmd, env=None, timeout=LAUNCH_TIMEOUT: run_command(cmd, tmp_path, env, timeout)


def path_without(programs, folder):
    """A PATH on which no program whose name `programs` (a regular expression) matches is found: `folder` holds
    links to everything else on PATH, after the folder of this Python (a venv's python must be run from its own
    folder to be that venv's)."""
    folder.mkdir()
    for directory in os.environ["PATH"].split(os.pathsep):
        for entry in Path(directory).glob("*") if Path(directory).is_dir() else []:
            link = folder / entry.name
            if not re.fullmatch(programs, entry.name) and not link.exists() and not link.is_symlink():
                link.symlink_to(entry)
    venv = Path(sys.executable).parent
    assert not any(re.fullmatch(programs, entry.name) for entry in venv.iterdir()), f"{venv} holds {programs}"
    return f"{venv}{os.pathsep}{folder}"


# Every C and C++ compiler torch.compile's inductor and DeepSpeed's op builds could find: gcc, g++, cc, c++, clang,
# with a version or a target in front (x86_64-linux-gnu-g++-12).
COMPILERS = r"(.*-)?(gcc|g\+\+|cc|c\+\+|clang|clang\+\+)(-[0-9.]+)?"


# torch's words where the NVIDIA driver is older than the CUDA torch was built for (c10/cuda/CUDAFunctions.cpp).
DRIVER_TOO_OLD = ("The NVIDIA driver on your system is too old (found version 12020). Please update your GPU driver by "
                  "downloading and installing a new version from the URL: http://www.nvidia.com/Download/index.aspx "
                  "Alternatively, go to: https://pytorch.org to install a PyTorch version that has been compiled with "
                  "your version of the CUDA driver.")


class Accelerator:
    """DeepSpeed's accelerator as the script asks it, with the answers a test picks."""

    def __init__(self, native_fp16, on_host):
        self.native_fp16, self.on_host = native_fp16, on_host

    def is_fp16_supported(self):
        return self.native_fp16

    def is_synchronized_device(self):
        return self.on_host

    def device_name(self):
        return "cpu" if self.on_host else "cuda"


@pytest.fixture
def machine(tmp_path):
    """Environment settings that make a launched run see the machine a test asks for.

    native_fp16: whether DeepSpeed's CPU accelerator reports native fp16 kernels (a stand-in, tests/fake_machine:
    a CPU has them or not);
    numactl: whether numactl is found: the real one where installed (.ci/run installs it), else a stand-in that
    runs the command on its cores; False: a PATH without it;
    cxx: False for a machine without a C or C++ compiler: a PATH without any (COMPILERS), and empty inductor and
    op caches, so that nothing compiled earlier is reused;
    gpu_driver: a GPU box whose torch cannot use CUDA: nvidia-smi lists a GPU with this driver, and torch
    gives `cuda_error` as its reason (its words for a driver older than its CUDA, by default): stand-ins, as no GPU
    can be had here.
    """
    def settings(native_fp16=None, numactl=None, cxx=None, gpu_driver=None, cuda_error=DRIVER_TOO_OLD):
        env = {}
        if native_fp16 is not None or gpu_driver:
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(FAKE_MACHINE), os.environ.get("PYTHONPATH")]))
        if gpu_driver:
            env.update(FAKE_NVIDIA_DRIVER=gpu_driver, FAKE_CUDA_ERROR=cuda_error,
                       PATH=f"{FAKE_MACHINE / 'gpu'}{os.pathsep}{os.environ['PATH']}")
        if native_fp16 is not None:
            env["FAKE_NATIVE_FP16"] = "1" if native_fp16 else "0"
        if cxx is False:
            env.update(PATH=path_without(COMPILERS, tmp_path / "bin-without-compilers"), CXX="g++", CC="gcc",
                       TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor-cache"),
                       TORCH_EXTENSIONS_DIR=str(tmp_path / "op-cache"))
        if numactl is False:
            env["PATH"] = path_without("numactl", tmp_path / "bin-without-numactl")
        elif numactl and not shutil.which("numactl"):
            env["PATH"] = f"{FAKE_MACHINE / 'bin'}{os.pathsep}{os.environ['PATH']}"
        return env
    return settings


@pytest.fixture
def small_disk(tmp_path):
    """A file system of its own (tmpfs, 64 MiB) at tmp_path/disk that a test fills while a run writes to it:
    fill(leave) shrinks it to what it holds plus `leave` bytes, grow() gives it its 64 MiB back, read_only() makes
    it read-only. Mounting needs root: elsewhere the test is skipped."""
    path = tmp_path / "disk"
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(path)], capture_output=True,
                             text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")

    def size(kib):
        subprocess.run(["mount", "-o", f"remount,size={kib}k", str(path)], check=True)

    def fill(leave=0):
        size((shutil.disk_usage(path).used + leave + 4095) // 4096 * 4)

    def read_only():
        subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)

    yield SimpleNamespace(path=path, fill=fill, grow=lambda: size(64 * 1024), read_only=read_only)
    subprocess.run(["umount", "--lazy", str(path)], check=True)


@pytest.fixture
def script():
    return ROOT / "cifar10_deepspeed.py"


@pytest.fixture
def root():
    return ROOT
