"""Whole runs of the fixed and the dynamic path from the same seeds: the same accuracy?

Usage:
    python scripts/converge.py [converge.seeds=[0,1,2]] [converge.out=PATH]
        [converge.compare=shape|augment_on]
        [any train.py override: epochs=7 data=coco data.root=... batch_size=8 ...]

`converge.compare=augment_on` compares the augmentation on the device with the host's
instead (both `shape=fixed`: `data.augment_on=device` minus `data.augment_on=host`); the rows'
`path` is then "device" or "host" and the difference device - host.

For every seed, trains `shape=fixed` and then `shape=dynamic` (torchvision's own
`model(images, targets)`) exactly as `python train.py seed=<seed> shape=<path>` would with the
same overrides: the same data, augmentation, schedule and initial weights, then the same
COCOeval on the val split. Each run writes its usual folder, `<out_dir>/<path>_seed<seed>/`
(summary.json, TensorBoard events, the final checkpoint, and converge_wall.json with the
run's wall time in seconds). A run whose summary.json already
holds an evaluation is read back instead of trained again, so a stopped comparison resumes
when started again with the same `hydra.run.dir`.

Prints a markdown table and writes converge.json (converge.out, or <out_dir>/converge.json):

    {"runs": [{"path", "seed", "mAP", "mAP50", "wall_s"}, ...],
     "paths": {path: {"mAP": {"mean", "std"}, "mAP50": {"mean", "std"}}},
     "difference": {metric: {"mean", "std", "ci95", "seeds", "within_spread"}},
     "config": {...}}

`difference` is fixed minus dynamic, paired by seed: its mean, the standard deviation of the
paired differences, a 95% percentile-bootstrap confidence interval of the mean (10,000
resamples of the seeds, fixed generator: the same rows give the same interval), and whether
|mean| is within the seed-to-seed spread (the larger of the two paths' standard deviations
over seeds). Exit status 2 on a bad config value.
"""

import copy
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hydra  # noqa: E402
from omegaconf import DictConfig, OmegaConf, open_dict  # noqa: E402

from ssd_npu.cli import expand_argv, run_folder, user_errors  # noqa: E402
from ssd_npu.config import check_comparison, check_seeds, config_dir  # noqa: E402

PATHS = ("fixed", "dynamic")
METRICS = ("mAP", "mAP50")
# converge.compare -> the config key each run sets, and its two values (first minus second)
COMPARISONS = {"shape": ("shape", PATHS), "augment_on": ("data.augment_on", ("device", "host"))}


def train_one(base: DictConfig, path: str, seed: int, out_dir: Path) -> dict:
    """One whole run (or its saved result); returns {"path", "seed", "mAP", "mAP50", "wall_s"}."""
    from ssd_npu.train import run

    run_dir = out_dir / f"{path}_seed{seed}"
    saved, timing = run_dir / "summary.json", run_dir / "converge_wall.json"
    if saved.is_file():
        summary = json.loads(saved.read_text())
        if "eval" in summary and not summary.get("error"):
            wall_s = json.loads(timing.read_text())["wall_s"] if timing.is_file() else None
            return _row(path, seed, summary, wall_s)
    cfg = copy.deepcopy(base)
    key, _ = COMPARISONS[base.converge.compare]
    with open_dict(cfg):
        OmegaConf.update(cfg, key, path)
        cfg.seed, cfg.out_dir, cfg.eval.enabled = seed, str(run_dir), True
        cfg.resume = None
    start = time.perf_counter()
    summary = run(cfg)
    wall_s = time.perf_counter() - start
    # beside the run's own summary.json (whose keys are a contract), read back on resume
    timing.write_text(json.dumps({"wall_s": wall_s}))
    return _row(path, seed, summary, wall_s)


def _row(path: str, seed: int, summary: dict, wall_s: float | None) -> dict:
    return {
        "path": path,
        "seed": seed,
        "mAP": summary["eval"]["mAP"],
        "mAP50": summary["eval"]["mAP50"],
        "wall_s": wall_s,
    }


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def bootstrap_ci(values: list[float], level: float = 0.95, resamples: int = 10_000) -> list[float]:
    """Percentile-bootstrap interval of the mean of `values` (resampled with replacement)."""
    import numpy as np

    data = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(0)
    means = data[rng.integers(0, len(data), size=(resamples, len(data)))].mean(axis=1)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return [float(low), float(high)]


def compare(rows: list[dict], pair: tuple[str, str] = PATHS) -> dict:
    """Per-path mean and spread over seeds, and the paired pair[0] - pair[1] difference."""
    paths = {
        path: {
            m: {
                "mean": statistics.fmean(r[m] for r in rows if r["path"] == path),
                "std": _std([r[m] for r in rows if r["path"] == path]),
            }
            for m in METRICS
        }
        for path in pair
        if any(r["path"] == path for r in rows)
    }
    by_seed = {(r["path"], r["seed"]): r for r in rows}
    first, second = pair
    paired = sorted(
        {seed for path, seed in by_seed if path == first}
        & {seed for path, seed in by_seed if path == second}
    )
    difference = {}
    for m in METRICS:
        diffs = [by_seed[first, s][m] - by_seed[second, s][m] for s in paired]
        if not diffs:
            continue
        mean = statistics.fmean(diffs)
        spread = max(paths[p][m]["std"] for p in pair)
        difference[m] = {
            "mean": mean,
            "std": _std(diffs),
            "ci95": bootstrap_ci(diffs),
            "seeds": paired,
            "within_spread": abs(mean) <= spread,
        }
    return {"paths": paths, "difference": difference}


def table(rows: list[dict], result: dict, pair: tuple[str, str] = PATHS) -> str:
    lines = ["| path | seed | mAP | mAP50 | wall s |", "|---|---|---|---|---|"]
    for r in rows:
        wall = f"{r['wall_s']:.0f}" if r["wall_s"] is not None else "-"
        lines.append(f"| {r['path']} | {r['seed']} | {r['mAP']:.3f} | {r['mAP50']:.3f} | {wall} |")
    for path, stats in result["paths"].items():
        lines.append(
            f"| {path} | mean ± std | {stats['mAP']['mean']:.3f} ± {stats['mAP']['std']:.3f} "
            f"| {stats['mAP50']['mean']:.3f} ± {stats['mAP50']['std']:.3f} | |"
        )
    diff = result["difference"]
    name = f"{pair[0]} - {pair[1]}"
    if diff:
        lines.append(
            f"| {name} | paired mean ± std | {diff['mAP']['mean']:+.3f} ± "
            f"{diff['mAP']['std']:.3f} | {diff['mAP50']['mean']:+.3f} ± "
            f"{diff['mAP50']['std']:.3f} | |"
        )
        ci = {m: "[{:+.3f}, {:+.3f}]".format(*diff[m]["ci95"]) for m in METRICS}
        lines.append(f"| {name} | 95% CI (bootstrap) | {ci['mAP']} | {ci['mAP50']} | |")
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="converge")
def main(cfg: DictConfig) -> None:
    out_dir = run_folder(cfg)
    seeds = [int(s) for s in cfg.converge.seeds]
    out = Path(cfg.converge.out or out_dir / "converge.json")
    rows: list[dict] = []
    result: dict = {}
    with user_errors():
        check_seeds(seeds)
        check_comparison(cfg.converge.compare, tuple(COMPARISONS))
        _, pair = COMPARISONS[cfg.converge.compare]
        for seed in seeds:
            for path in pair:
                rows.append(train_one(cfg, path, seed, out_dir))
                result = compare(rows, pair)
                # written after every run: a stopped comparison keeps what it measured
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(
                    json.dumps(
                        {"runs": rows, **result, "config": OmegaConf.to_container(cfg)}, indent=2
                    )
                )
    print(table(rows, result, pair))
    print(f"wrote {out}")


if __name__ == "__main__":
    expand_argv()
    main()
