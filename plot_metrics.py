"""Plot the CSV metrics of a `cifar10_deepspeed.py --metrics-dir DIR` run as one PNG.

    python plot_metrics.py DIR [-o metrics.png]

Panels: training loss (each step's, and its running mean) and learning rate,
test accuracy, and for each MoE layer the tokens sent to each expert with the
share dropped, and each expert's fill of its capacity with the router's entropy
and aux loss, all against training samples seen.
"""

import argparse
import csv
import glob
import io
import os
import re
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_csv(path):
    """A DeepSpeed CSV monitor file as (steps, values), in step order.

    A resumed run appends to the same files under a new header and writes the
    steps of the epoch it repeats again: the later value of a step wins. A row
    that a full disk or a kill cut short (with the header appended to it on
    resume) is left out, and said so.
    """
    values, torn = {}, 0
    with open(path) as f:
        for row in csv.reader(f):
            try:
                step, value = map(float, row)
            except ValueError:  # a header, or a torn row
                torn += row[:1] != ["step"]
                continue
            values[step] = value
    if torn:
        print(f"plot_metrics.py: note: left out {torn} row(s) of {path} that are not step,value (a write cut "
              f"short)", file=sys.stderr)
    steps = sorted(values)
    return steps, [values[s] for s in steps]


def running_mean(values, window):
    """The mean of each value and the up to `window - 1` values before it."""
    sums = [0.0]
    for value in values:
        sums.append(sums[-1] + value)
    return [(sums[i + 1] - sums[max(0, i + 1 - window)]) / min(i + 1, window) for i in range(len(values))]


def find_metrics(metrics_dir):
    """The folder holding the CSV files: DIR itself, or the job folder DeepSpeed made inside it."""
    for folder in (metrics_dir, os.path.join(metrics_dir, "cifar10")):
        if glob.glob(os.path.join(folder, "*.csv")):
            return folder
    raise SystemExit(f"plot_metrics.py: error: no CSV metrics in {metrics_dir} or {metrics_dir}/cifar10")


def series(folder, name):
    """A series' (steps, values), or None where the run wrote none."""
    path = os.path.join(folder, f"{name}.csv")
    return read_csv(path) if os.path.exists(path) else None


def plot_router(folder, layer, sent, kept):
    """Two panels of one MoE layer: each expert's share of the tokens sent and the share of assignments dropped
    (in training, and at each evaluation); each expert's fill of its capacity, and the router's entropy and aux
    loss on the right axis."""
    for ax, figure, label in ((sent, "share", "token share"), (kept, "fill", "fill of capacity")):
        paths = glob.glob(os.path.join(folder, f"MoE_layer{layer}_expert*_{figure}.csv"))
        experts = {int(re.search(r"expert(\d+)", path).group(1)): path for path in paths}
        for expert in sorted(experts):
            ax.plot(*read_csv(experts[expert]), lw=1, label=f"expert {expert}")
        ax.set_ylabel(f"layer {layer} {label}")
        ax.set_ylim(-0.03, 1.03)
    for name, style, label in ((f"MoE_layer{layer}_dropped", dict(color="black", ls="--"), "dropped"),
                               (f"Eval_layer{layer}_dropped", dict(color="black", ls="", marker="x"),
                                "dropped at evaluation")):
        if points := series(folder, name):
            sent.plot(*points, label=label, **style)
    sent.legend(loc="upper right", fontsize="small", ncol=1 + len(sent.lines) // 9)
    twin = kept.twinx()
    for name, color in ((f"MoE_layer{layer}_entropy", "tab:gray"), (f"MoE_layer{layer}_aux_loss", "tab:brown")):
        if points := series(folder, name):
            twin.plot(*points, color=color, ls=":", label=name.split("_", 2)[2].replace("_", " "))
    twin.set_ylabel("entropy (nats), aux loss")
    lines = kept.lines + twin.lines
    kept.legend(lines, [line.get_label() for line in lines], loc="upper right", fontsize="small",
                ncol=1 + len(lines) // 9)


def plot(metrics_dir, output):
    folder = find_metrics(metrics_dir)
    shares = sorted(glob.glob(os.path.join(folder, "MoE_layer*_expert*_share.csv")))
    layers = sorted({re.search(r"layer(\d+)", p).group(1) for p in shares}, key=int)
    panels = 2 + 2 * len(layers)
    fig, axes = plt.subplots(panels, 1, figsize=(8, 3 * panels), sharex=True, squeeze=False)
    axes = axes[:, 0]

    lines = []
    if loss := series(folder, "Train_Samples_train_loss"):
        steps, losses = loss
        window = max(1, len(losses) // 50)  # 2% of the run: the trend, without each batch's noise
        lines += axes[0].plot(steps, losses, color="tab:blue", lw=0.5, alpha=0.3, label="train loss (step)")
        lines += axes[0].plot(steps, running_mean(losses, window), color="tab:blue", lw=1.5,
                              label=f"train loss (mean of {window} steps)")
    if lr := series(folder, "Train_Samples_lr"):
        twin = axes[0].twinx()
        lines += twin.plot(*lr, color="tab:gray", lw=1, label="learning rate (right axis)")
        twin.set_ylabel("learning rate")
    axes[0].set_ylabel("loss")
    axes[0].legend(lines, [line.get_label() for line in lines], loc="upper right")

    if accuracy := series(folder, "Eval_accuracy"):
        axes[1].plot(*accuracy, marker="o")
    axes[1].set_ylabel("test accuracy (%)")

    for layer, sent, kept in zip(layers, axes[2::2], axes[3::2]):
        plot_router(folder, layer, sent, kept)

    axes[-1].set_xlabel("training samples")
    fig.tight_layout()
    output = save(fig, str(output))
    print(f"wrote {output}")
    return fig


def save(fig, output):
    """Write the figure whole, in the format its name's suffix says (a name without one gets .png, as matplotlib
    gives it): a folder that is missing or full, or a format matplotlib cannot write, is one line, and leaves any
    older file as it was. Returns the name written."""
    suffix = os.path.splitext(output)[1][1:]
    output = output if suffix else f"{output}.png"
    image = io.BytesIO()
    partial = f"{output}.tmp"
    try:
        fig.savefig(image, format=suffix or "png", dpi=100)
        with open(partial, "wb") as f:
            f.write(image.getvalue())
        os.replace(partial, output)
    except (OSError, ValueError) as e:  # ValueError: a format matplotlib does not know
        if os.path.exists(partial):
            os.remove(partial)
        raise SystemExit(f"plot_metrics.py: error: could not write {output} ({getattr(e, 'strerror', None) or e})")
    return output


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("metrics_dir", help="the --metrics-dir of a run")
    parser.add_argument("-o", "--output", default="metrics.png", help="the PNG to write (default: metrics.png)")
    args = parser.parse_args()
    plot(args.metrics_dir, args.output)
