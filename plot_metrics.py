"""Plot the CSV metrics of a `cifar10_deepspeed.py --metrics-dir DIR` run as one PNG.

    python plot_metrics.py DIR [-o metrics.png]

Panels: training loss (each step's, and its running mean) and learning rate,
test accuracy, and each MoE layer's share of tokens per expert, all against
training samples seen.
"""

import argparse
import csv
import glob
import os
import re

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_csv(path):
    """A DeepSpeed CSV monitor file as (steps, values), in step order.

    A resumed run appends to the same files under a new header and writes the
    steps of the epoch it repeats again: the later value of a step wins.
    """
    with open(path) as f:
        values = {float(step): float(value) for step, value in csv.reader(f) if step != "step"}
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


def plot(metrics_dir, output):
    folder = find_metrics(metrics_dir)
    shares = sorted(glob.glob(os.path.join(folder, "MoE_layer*_expert*_share.csv")))
    layers = sorted({re.search(r"layer(\d+)", p).group(1) for p in shares}, key=int)
    fig, axes = plt.subplots(2 + len(layers), 1, figsize=(8, 3 * (2 + len(layers))), sharex=True, squeeze=False)
    axes = axes[:, 0]

    lines = []
    loss = os.path.join(folder, "Train_Samples_train_loss.csv")
    if os.path.exists(loss):
        steps, losses = read_csv(loss)
        window = max(1, len(losses) // 50)  # 2% of the run: the trend, without each batch's noise
        lines += axes[0].plot(steps, losses, color="tab:blue", lw=0.5, alpha=0.3, label="train loss (step)")
        lines += axes[0].plot(steps, running_mean(losses, window), color="tab:blue", lw=1.5,
                              label=f"train loss (mean of {window} steps)")
    lr = os.path.join(folder, "Train_Samples_lr.csv")
    if os.path.exists(lr):
        twin = axes[0].twinx()
        lines += twin.plot(*read_csv(lr), color="tab:gray", lw=1, label="learning rate (right axis)")
        twin.set_ylabel("learning rate")
    axes[0].set_ylabel("loss")
    axes[0].legend(lines, [line.get_label() for line in lines], loc="upper right")

    accuracy = os.path.join(folder, "Eval_accuracy.csv")
    if os.path.exists(accuracy):
        axes[1].plot(*read_csv(accuracy), marker="o")
    axes[1].set_ylabel("test accuracy (%)")

    for ax, layer in zip(axes[2:], layers):
        paths = glob.glob(os.path.join(folder, f"MoE_layer{layer}_expert*_share.csv"))
        experts = {int(re.search(r"expert(\d+)", path).group(1)): path for path in paths}
        for expert in sorted(experts):
            ax.plot(*read_csv(experts[expert]), label=f"expert {expert}")
        ax.set_ylabel(f"layer {layer} token share")
        ax.set_ylim(-0.03, 1.03)
        ax.legend(loc="upper right")

    axes[-1].set_xlabel("training samples")
    fig.tight_layout()
    fig.savefig(output, dpi=100)
    print(f"wrote {output}")
    return fig


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("metrics_dir", help="the --metrics-dir of a run")
    parser.add_argument("-o", "--output", default="metrics.png", help="the PNG to write (default: metrics.png)")
    args = parser.parse_args()
    plot(args.metrics_dir, args.output)
