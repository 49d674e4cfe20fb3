"""Plot step time against step for one or more runs, warm-up (compile) steps marked.

Usage:
    python scripts/plot_steptime.py RUN_DIR [RUN_DIR ...] --out steptime.png [--labels A B ...]

RUN_DIR is a train.py output folder (its `tensorboard/` is read), a scripts/bench.py variant
folder, or a TensorBoard folder itself. For each run, `time/step_ms` is drawn on a log y axis;
the warm-up steps (`ssd_npu.engine.telemetry.detect_warmup`, the rule summary.json uses) are drawn as
hollow circles, and the steady median (after warm-up) as a dashed line with its value.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import matplotlib  # noqa: E402

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402

from ssd_npu.engine.telemetry import detect_warmup, read_scalar_series, steady_median  # noqa: E402
from ssd_npu.errors import UserError  # noqa: E402

TAG = "time/step_ms"
GRAPHS = "compile/graphs"  # cumulative graphs compiled, where a compiler ran


def read_step_ms(run_dir: Path) -> tuple[list[int], list[float], int | None]:
    """(steps, step_ms, graphs compiled or None) from the run's TensorBoard events."""
    try:
        series = read_scalar_series(run_dir, TAG)
    except UserError as err:
        sys.exit(f"error: {err}")
    steps, step_ms = series[TAG]
    graphs = int(max(series[GRAPHS][1])) if GRAPHS in series else None
    return steps, step_ms, graphs


def plot(runs: list[tuple[str, list[int], list[float], int | None]], out: Path) -> None:
    fig, ax = plt.subplots(figsize=(9, 5), dpi=110)
    for k, (label, steps, ms, graphs) in enumerate(runs):
        warmup = detect_warmup(ms)
        steady = steady_median(ms, warmup)
        extra = f", {graphs} graphs" if graphs is not None else ""
        label = f"{label} (warm-up {warmup} steps{extra})"
        (line,) = ax.plot(steps, ms, marker=".", linewidth=1, label=label)
        color = line.get_color()
        if warmup:
            ax.scatter(steps[:warmup], ms[:warmup], s=90, facecolors="none", edgecolors=color)
        if steady:
            ax.axhline(steady, color=color, linestyle="--", linewidth=1)
            ax.annotate(
                f"steady median {steady:.0f} ms",
                (steps[-1], steady),
                textcoords="offset points",
                xytext=(-4, 4 + 11 * k),  # staggered: medians of runs can lie close
                ha="right",
                color=color,
                fontsize=8,
            )
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("step time (ms, log)")
    ax.set_title("Step time; hollow circles: warm-up (compile) steps")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders")
    parser.add_argument("--out", type=Path, required=True, help="PNG to write")
    parser.add_argument("--labels", nargs="*", help="one legend label per run (default: names)")
    args = parser.parse_args(argv)
    labels = args.labels or [p.resolve().name for p in args.runs]
    if len(labels) != len(args.runs):
        parser.error(f"{len(labels)} labels for {len(args.runs)} runs")
    plot([(lab, *read_step_ms(p)) for lab, p in zip(labels, args.runs, strict=True)], args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
