"""cifar10ds/folders.py: the folders a run writes. One that cannot hold files, one that holds an earlier run's
checkpoints or series, and one that a live run writes into are each one line before any work; the first run's
files stay as they were."""

import json
import os

import pytest

from cifar10_deepspeed import main
from cifar10ds.folders import FOLDER_IN_USE, RUN_LOCK, another_runs_series, check_directories, check_earlier_run
from conftest import metric, run_command, signal_when
from test_checkpoints import SMALL
from test_options import SYNTHETIC, each_of_two_ranks_alone


def test_a_folder_that_cannot_hold_files_is_one_line_before_any_work(parse, tmp_path, capsys, monkeypatch):
    """Checked at the start, not when the first epoch ends (or, for the monitors, when DeepSpeed makes them, with a
    traceback): a path that is a file, or lies under one."""
    (tmp_path / "file").write_text("")
    file = tmp_path / "file"
    cases = [(["--save-dir", str(file)], f"--save-dir {file} cannot hold checkpoints: it is a file, not a directory"),
             (["--save-dir", str(file / "ckpt")], f"--save-dir {file / 'ckpt'} cannot hold checkpoints: Not a directory"),
             (["--metrics-dir", str(file)], f"--metrics-dir {file} cannot hold the metrics: it is a file, not a "
                                            f"directory"),
             (["--tensorboard-dir", str(file / "tb")], f"--tensorboard-dir {file / 'tb'} cannot hold TensorBoard's "
                                                       f"files: Not a directory"),
             (["--data-dir", str(file)], f"--data-dir {file} cannot hold the CIFAR-10 download: it is a file, not a "
                                         f"directory")]
    for flags, expected in cases:
        args = parse(*flags)
        assert check_directories(args) == expected
    assert check_directories(parse("--dataset", "synthetic", "--data-dir", str(file))) is None  # no download
    assert check_directories(parse("--save-dir", str(tmp_path / "new" / "ckpt"))) is None
    assert (tmp_path / "new" / "ckpt").is_dir()
    monkeypatch.setenv("RANK", "1")  # any rank, before any distributed work
    with pytest.raises(SystemExit) as exit_info:
        main(parse("--metrics-dir", str(file)))
    assert exit_info.value.code == 2 and capsys.readouterr().err == f"cifar10_deepspeed.py: error: {cases[2][1]}\n"


def test_a_new_run_on_an_earlier_runs_files_stops_every_rank_and_leaves_them_as_they_were(parse, script, tmp_path,
                                                                                        monkeypatch):
    """A command run twice, --resume forgotten: the second run would write its epoch1 over the first's and its series
    into the first's folders, where a plot or TensorBoard draws both as one run. Each of 2 ranks stops by itself
    (no launcher, no reachable peer) in one line, and every file of the first run is as it was. So does the next job
    of an array (--resume auto, another --save-dir, the same --metrics-dir), where --resume auto, finding no
    checkpoint, would have appended its series to the first's; it appends only to the series of a run that stopped
    before its first save in its own --save-dir. --resume continues the first run into the same folders."""
    folders = ["--save-dir", "ckpt", "--metrics-dir", "met", "--tensorboard-dir", "tb"]
    flags = [script, "--deepspeed", *SYNTHETIC, "--dtype", "fp32", "--synthetic-train-size", "160", "-e", "1", *folders]
    first = run_command(["python", *flags], tmp_path)
    assert first.returncode == 0, first.output[-3000:]
    files = lambda: {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()}
    before = files()
    assert any(path.parent.name == "cifar10" and path.parent.parent.name == "tb" for path in before)
    for status, out, err in each_of_two_ranks_alone(flags, tmp_path):
        assert status == 2 and "loss:" not in out, err[-3000:]
        assert err.splitlines()[-1] == (
            "cifar10_deepspeed.py: error: --save-dir ckpt holds an earlier run's checkpoints (its 'latest' names "
            "epoch1), which this run would write over: continue that run with --resume, or give this run another "
            "--save-dir")
    assert files() == before
    next_job = run_command(["python", *flags[:-len(folders)], "--save-dir", "next", "--metrics-dir", "met", "--resume",
                            "auto"], tmp_path)
    assert next_job.returncode == 2 and [line for line in next_job.output.splitlines() if "error:" in line] == [
        "cifar10_deepspeed.py: error: --metrics-dir met holds the series of another run than the one that last used "
        "--save-dir next (met/cifar10), which this run's would join as one run: give this run another --metrics-dir"
    ], next_job.output[-3000:]
    assert {path: data for path, data in files().items() if path.parent.name != "next"} == before
    monkeypatch.chdir(tmp_path)
    lock = lambda folder: (tmp_path / folder / RUN_LOCK).read_bytes()  # noqa: E731
    args = parse("--save-dir", "unsaved", "--metrics-dir", "met", "--resume", "auto")
    assert another_runs_series(args, {os.path.realpath(folder): lock(held) for folder, held in (
        ("unsaved", "ckpt"), ("met", "met"))}) is None  # the first run's own save dir, had it not saved yet
    assert another_runs_series(args, {os.path.realpath("unsaved"): lock("next"), os.path.realpath("met"): lock("met")})
    for flag, folder in (("--metrics-dir", "met"), ("--tensorboard-dir", "tb")):
        assert check_earlier_run(parse(flag, folder)) == (
            f"{flag} {folder} holds an earlier run's series ({folder}/cifar10), which this run's would join as one run: "
            f"give this run another {flag}, or continue that run with --resume")
    (tmp_path / "new" / "cifar10").mkdir(parents=True)  # made by a run that died before it wrote a step
    (tmp_path / "partial" / "epoch1").mkdir(parents=True)  # no 'latest': its first save never finished
    assert check_earlier_run(parse("--metrics-dir", "new", "--save-dir", "partial")) is None
    assert check_earlier_run(parse(*folders, "--resume", "auto")) is None
    resumed = run_command(["python", *flags, "-e", "2", "--resume"], tmp_path)
    assert resumed.returncode == 0 and "Resuming from ckpt/epoch1 at epoch 2" in resumed.output, resumed.output[-3000:]
    assert (tmp_path / "ckpt" / "latest").read_text() == "epoch2"
    assert max(metric(tmp_path / "met", "Train_Samples_lr")) == 2 * 160


@pytest.mark.slow
def test_a_second_run_on_a_live_runs_folders_stops_in_one_line_and_the_first_finishes(script, tmp_path):
    """A one-rank run trains into ckpt and met; a 2-rank run given the same --save-dir (a job submitted twice), then
    a run given another --save-dir but the same --metrics-dir (a job array; --resume auto, as run_slurm.sbatch
    gives, appends to series it finds), each stop on every rank before any
    work, naming the first, which finishes untouched: its checkpoints, and its series alone in met. The first
    prints a line every step and nobody reads them while the others run: once its output pipe is full it waits,
    so it is still live."""
    ckpt, met = tmp_path / "ckpt", tmp_path / "met"
    flags = [script, "--deepspeed", *SMALL, "-e", "2", "--synthetic-train-size", "8000", "--log-interval", "1",
             "--metrics-dir", met]
    refused, first_pid = [], []

    def start_others(launcher, _):
        first_pid.append(launcher.pid)
        refused.append(run_command(["deepspeed", "--num_gpus", "2", *flags, "--save-dir", ckpt, "--resume", "auto"],
                                   tmp_path))
        refused.append(run_command(["python", *flags, "--save-dir", tmp_path / "other", "--resume", "auto"], tmp_path))
    first, _ = signal_when(["python", *flags, "--save-dir", ckpt], tmp_path,
                           lambda line: line.startswith("[ 1,     1] loss:"), start_others)
    assert first.returncode == 0 and "Finished Training" in first.output, first.output[-3000:]
    assert (ckpt / "latest").read_text() == "epoch2" and "Resuming" not in first.output
    assert len(metric(met, "Train_Samples_train_loss")) == 2 * 8000 // 16  # one run's steps, each once
    assert (met / "cifar10" / "Train_Samples_train_loss.csv").read_text().count("step,") == 1
    holder = json.loads((ckpt / RUN_LOCK).read_text())
    assert holder == json.loads((met / RUN_LOCK).read_text()) and holder["pid"] == first_pid[0]
    for run, (flag, folder) in zip(refused, (("--save-dir", ckpt), ("--metrics-dir", met))):
        assert run.returncode == FOLDER_IN_USE, run.output[-3000:]
        errors = [line for line in run.output.splitlines() if line.startswith("error: ")]
        assert errors == [f"error: {flag} {folder} is in use by another run (host {holder['host']}, process "
                          f"{holder['pid']}, started {holder['started']}): wait for it to end, or give this run "
                          f"another {flag}"], run.output[-3000:]
        assert "[ 1, " not in run.output and "Traceback" not in run.output
    assert os.listdir(tmp_path / "other") == [RUN_LOCK]
