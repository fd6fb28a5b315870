"""plot_metrics.py: the PNG of a --metrics-dir run (a real run's PNG is drawn in test_launch.py)."""

import math
import os
import random

import pytest

import plot_metrics


def write_metric(folder, name, values):
    """A CSV file as DeepSpeed's CSV monitor writes it: a header, then step,value rows."""
    rows = "".join(f"{step},{value}\n" for step, value in values)
    (folder / f"{name}.csv").write_text(f"step,{name}\n{rows}")


def test_running_mean_averages_each_value_with_those_before_it():
    assert plot_metrics.running_mean([4, 2, 6, 0, 10], 2) == [4, 3, 4, 3, 5]
    assert plot_metrics.running_mean([1, 2, 3], 5) == [1, 1.5, 2]


def test_the_loss_panel_draws_the_smoothed_loss_over_the_raw_one_and_names_the_learning_rate(tmp_path):
    folder = tmp_path / "metrics" / "cifar10"
    folder.mkdir(parents=True)
    noise = random.Random(0)
    steps = range(16, 16 * 1001, 16)
    write_metric(folder, "Train_Samples_train_loss", [(s, 2.3 * math.exp(-s / 8000) + noise.uniform(-0.5, 0.5))
                                                      for s in steps])
    write_metric(folder, "Train_Samples_lr", [(s, 0.001 * min(1, s / 8000)) for s in steps])

    fig = plot_metrics.plot(str(tmp_path / "metrics"), tmp_path / "metrics.png")
    loss_panel = fig.axes[0]
    assert [text.get_text() for text in loss_panel.get_legend().get_texts()] == [
        "train loss (step)", "train loss (mean of 20 steps)", "learning rate (right axis)"]
    raw, smoothed = (line.get_ydata() for line in loss_panel.get_lines())
    jumps = lambda ys: sum(abs(b - a) for a, b in zip(ys, ys[1:]))
    assert jumps(smoothed) < jumps(raw) / 10  # the noise is gone
    assert smoothed[-1] < smoothed[100] < smoothed[20]  # the trend stays
    assert (tmp_path / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_each_moe_layer_gets_its_tokens_drops_fill_entropy_and_aux_loss(tmp_path):
    folder = tmp_path / "metrics" / "cifar10"
    folder.mkdir(parents=True)
    steps = [1600, 3200, 4800]
    for layer, experts in ((0, 2), (1, 16)):
        for expert in range(experts):
            write_metric(folder, f"MoE_layer{layer}_expert{expert}_share", [(s, 1 / experts) for s in steps])
            write_metric(folder, f"MoE_layer{layer}_expert{expert}_fill", [(s, 0.9) for s in steps])
        for figure, value in (("dropped", 0.1), ("entropy", 0.6), ("aux_loss", 1.02)):
            write_metric(folder, f"MoE_layer{layer}_{figure}", [(s, value) for s in steps])
        write_metric(folder, f"Eval_layer{layer}_dropped", [(4800, 0.05)])

    fig = plot_metrics.plot(str(tmp_path / "metrics"), tmp_path / "metrics.png")
    labels = lambda ax: [text.get_text() for text in ax.get_legend().get_texts()]
    sent, kept = fig.axes[2], fig.axes[3]
    assert sent.get_ylabel() == "layer 0 token share" and kept.get_ylabel() == "layer 0 fill of capacity"
    assert labels(sent) == ["expert 0", "expert 1", "dropped", "dropped at evaluation"]
    assert labels(kept) == ["expert 0", "expert 1", "entropy", "aux loss"]
    assert list(sent.get_lines()[2].get_ydata()) == [0.1] * 3
    assert len(fig.axes[4].get_lines()) == 18 and fig.axes[5].get_ylabel() == "layer 1 fill of capacity"


def test_a_row_cut_short_is_left_out_and_said_so(tmp_path, capsys):
    """A full disk or a kill cut a row short; the resumed run's header was appended to it. The rest is read."""
    path = tmp_path / "Train_Samples_train_loss.csv"
    path.write_text("step,train_loss\r\n16,1.5\r\n32,1.25\r\n4\r\n48,9.0\r\n4step,train_loss\r\n48,1.0\r\n64,0.5\r\n")
    assert plot_metrics.read_csv(str(path)) == ([16, 32, 48, 64], [1.5, 1.25, 1.0, 0.5])
    assert capsys.readouterr().err == (f"plot_metrics.py: note: left out 2 row(s) of {path} that are not step,value "
                                       f"(a write cut short)\n")


def test_a_png_that_cannot_be_written_is_one_line_and_a_name_without_a_suffix_gets_png(tmp_path):
    folder = tmp_path / "metrics"
    folder.mkdir()
    write_metric(folder, "Train_Samples_lr", [(16, 0.001), (32, 0.001)])
    (tmp_path / "file").write_text("")
    for output, reason in ((tmp_path / "file" / "m.png", "Not a directory"),
                           (tmp_path / "m.foo", "Format 'foo' is not supported")):
        with pytest.raises(SystemExit) as stop:
            plot_metrics.plot(str(folder), output)
        assert str(stop.value).startswith(f"plot_metrics.py: error: could not write {output} ({reason}")
    assert sorted(os.listdir(tmp_path)) == ["file", "metrics"]  # no part of a file left
    plot_metrics.plot(str(folder), tmp_path / "m")
    assert (tmp_path / "m.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
