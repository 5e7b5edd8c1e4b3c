"""Plot the training losses of one or more runs from their ``metrics.jsonl`` logs, one panel per run.

    python benchmarks/plot_losses.py runs/autoencoder-real runs/teacher-real runs/distill-real \
        --out registry/vpdsr-small/3/losses.png

Each panel shows every ``loss/*`` series of its run against the optimiser step, smoothed with a
running mean (``--smooth`` logged points) because single batches of random crops are noisy; the
raw points are drawn faintly behind. Needs the ``plots`` extra (matplotlib).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def read_log(run: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{loss name: (steps, values)}`` of a run folder's ``metrics.jsonl`` (skipping non-finite values)."""
    series: dict[str, list[tuple[int, float]]] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        for key, value in record.items():
            if key.startswith("loss/") and value is not None and np.isfinite(value):
                series.setdefault(key.removeprefix("loss/"), []).append((record["step"], value))
    return {name: (np.array([s for s, _ in points]), np.array([v for _, v in points])) for name, points in series.items()}


def running_mean(values: np.ndarray, width: int) -> np.ndarray:
    """Mean of the last ``width`` values at each point (fewer at the start)."""
    sums = np.cumsum(np.insert(values, 0, 0.0))
    end = np.arange(1, len(values) + 1)
    start = np.maximum(end - width, 0)
    return (sums[end] - sums[start]) / (end - start)


def plot(runs: list[Path], out: Path, smooth: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(5.5 * len(runs), 4), squeeze=False)
    for ax, run in zip(axes[0], runs):
        for name, (steps, values) in sorted(read_log(run).items()):
            line, = ax.plot(steps, running_mean(values, smooth), label=name)
            ax.plot(steps, values, color=line.get_color(), alpha=0.15, linewidth=0.8)
        ax.set_title(run.name)
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", type=Path, nargs="+", help="run folders holding metrics.jsonl")
    parser.add_argument("--out", type=Path, required=True, help="PNG file to write")
    parser.add_argument("--smooth", type=int, default=8, help="running-mean width, in logged points")
    args = parser.parse_args()
    plot(args.runs, args.out, args.smooth)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
