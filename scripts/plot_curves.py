"""Plot the learning curves of one or more runs: training loss and evaluation mAP against step.

Usage:
    python scripts/plot_curves.py RUN_DIR [RUN_DIR ...] --out curves.png [--labels A B ...]

RUN_DIR is a train.py output folder (its `tensorboard/` is read) or a TensorBoard folder.
Left: `loss/total` per step (faint) and its moving average over `--smooth` steps (solid).
Right: `eval/mAP50` (solid) and `eval/mAP` (dashed) at each evaluation. Several runs share
the axes, one colour each (e.g. the fixed and the dynamic path of scripts/converge.py).
"""

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ssd_npu.engine.telemetry import read_scalar_series  # noqa: E402
from ssd_npu.errors import UserError  # noqa: E402

LOSS, MAP50, MAP = "loss/total", "eval/mAP50", "eval/mAP"


def read_curves(run_dir: Path) -> dict[str, tuple[list[int], list[float]]]:
    """{tag: (steps, values)} for the loss and mAP tags the run wrote."""
    try:
        series = read_scalar_series(run_dir, LOSS)
    except UserError as err:
        sys.exit(f"error: {err}")
    return {tag: series[tag] for tag in (LOSS, MAP50, MAP) if tag in series}


def moving_average(values: list[float], window: int) -> np.ndarray:
    """Trailing mean over up to `window` values (shorter at the start), same length as values."""
    cumsum = np.cumsum(np.asarray(values, dtype=np.float64))
    out = np.empty_like(cumsum)
    for i in range(len(values)):
        lo = max(0, i - window + 1)
        out[i] = (cumsum[i] - (cumsum[lo - 1] if lo else 0.0)) / (i - lo + 1)
    return out


def plot(runs: list[tuple[str, dict]], out: Path, smooth: int) -> None:
    fig, (ax_loss, ax_map) = plt.subplots(1, 2, figsize=(11, 4))
    for k, (label, curves) in enumerate(runs):
        colour = f"C{k}"
        steps, loss = curves[LOSS]
        ax_loss.plot(steps, loss, color=colour, alpha=0.25, linewidth=0.8)
        ax_loss.plot(steps, moving_average(loss, smooth), color=colour, label=label)
        if MAP50 in curves:
            ax_map.plot(*curves[MAP50], "o-", color=colour, label=f"{label} mAP50")
            last_step, last = curves[MAP50][0][-1], curves[MAP50][1][-1]
            ax_map.annotate(f"{last:.2f}", (last_step, last), textcoords="offset points",
                            xytext=(4, 4), color=colour)  # fmt: skip
        if MAP in curves:
            ax_map.plot(*curves[MAP], "s--", color=colour, alpha=0.7, label=f"{label} mAP")
    last_step = max(curves[LOSS][0][-1] for _, curves in runs)
    for ax in (ax_loss, ax_map):  # the same step axis on both sides
        ax.set_xlim(0, last_step * 1.04)
    ax_loss.set(xlabel="step", ylabel=LOSS, title=f"training loss ({smooth}-step mean)")
    ax_map.set(xlabel="step", ylabel="COCO mAP", title="evaluation on the val split", ylim=(0, 1))
    for ax in (ax_loss, ax_map):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="train.py output folders")
    parser.add_argument("--out", type=Path, required=True, help="PNG to write")
    parser.add_argument("--labels", nargs="*", help="one label per run (default: folder names)")
    parser.add_argument("--smooth", type=int, default=16, help="moving-average window, steps")
    args = parser.parse_args(argv)
    labels = args.labels or [p.name for p in args.runs]
    if len(labels) != len(args.runs):
        sys.exit(f"error: {len(args.runs)} runs but {len(labels)} labels; give one per run.")
    plot([(label, read_curves(p)) for label, p in zip(labels, args.runs, strict=True)],
         args.out, max(1, args.smooth))  # fmt: skip
    print(args.out)


if __name__ == "__main__":
    main()
