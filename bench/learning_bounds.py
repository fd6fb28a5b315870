"""The learning bounds of tests/test_matrix.py, measured over seeds.

    python bench/learning_bounds.py [--seeds 0 1 2 3 4 5] [cell ...]

Trains each cell (by default test_matrix.py's LEARNED cells) for LEARN_STEPS
steps once per seed, one launch per world size and seed, as the suite's
`learned` fixture does, and prints a Markdown table: the test accuracy and the
loss ratio (mean of the last 50 finite losses over the first 50) for every seed, and
the bounds to write into LEARNED: the mean accuracy less three standard
deviations over the seeds, and the mean ratio plus three. Another CPU rounds
in other orders, which moves a run as another seed does: a few hundred steps
apart, the seeds' spread is the rounding's.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
from test_matrix import LEARN_STEPS, LEARNED, WORLDS, first_and_last_losses  # noqa: E402
from train_cells import all_cells, parse_cell  # noqa: E402


def train(cells, world, seed, report):
    subprocess.run(["deepspeed", "--num_gpus", str(world), os.path.join(ROOT, "tests", "train_cells.py"),
                    "--report", report, "--steps", str(LEARN_STEPS), "--evaluate", "--seed", str(seed), *cells],
                   check=True, stdout=subprocess.DEVNULL, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    with open(report) as f:
        return json.load(f)


def outcome(record):
    first, last = first_and_last_losses(record)
    return record["accuracy"], last / first


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cells", nargs="*", default=list(LEARNED))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5])
    args = parser.parse_args()
    results = {cell: [] for cell in args.cells}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for world in WORLDS:
                # in the matrix's order, as the suite trains them: a launch trains its cells one after another
                cells = [cell for cell in all_cells() if cell in args.cells and parse_cell(cell)[3] == world]
                if not cells:
                    continue
                report = train(cells, world, seed, os.path.join(tmp, f"w{world}-s{seed}.json"))
                for cell in cells:
                    assert "error" not in report[cell], report[cell]["error"]
                    results[cell].append(outcome(report[cell]["ranks"][0]))
                print(f"seed {seed}, {world} rank(s): done", file=sys.stderr, flush=True)
    seeds = " | ".join(f"seed {seed}" for seed in args.seeds)
    print(f"| cell | {seeds} | LEARNED |\n|---|{'---|' * len(args.seeds)}---|")
    for cell, runs in results.items():
        measured = " | ".join(f"{accuracy:.1f} % ({ratio:.3f})" for accuracy, ratio in runs)
        accuracies, ratios = zip(*runs)
        least = statistics.mean(accuracies) - 3 * statistics.stdev(accuracies)
        largest = statistics.mean(ratios) + 3 * statistics.stdev(ratios)
        print(f"| {cell} | {measured} | ({least:.1f}, {largest:.3f}) |")


if __name__ == "__main__":
    main()
