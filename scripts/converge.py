"""Whole runs of the fixed and the dynamic path from the same seeds: the same accuracy?

Usage:
    python scripts/converge.py [converge.seeds=[0,1,2]] [converge.out=PATH]
        [converge.compare=shape|augment_on] [converge.jobs=N] [converge.threads=T]
        [converge.target_halfwidth=0.05 converge.min_seeds=3 converge.max_seeds=24]
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

`converge.jobs=N` trains N runs at once, each in its own (spawned) process with
`converge.threads` torch threads (default: the cores // N) and `num_workers // N` loader
workers (ssd_npu/tools/seed_runs.py). A run's numbers depend on its config and its thread
count only, so for the same `converge.threads` the rows are the same whatever N (the runs
are queued and reported seed by seed, path by path, whatever order they finish in).

Stop rule: with `converge.target_halfwidth=H` the seeds continue past the listed ones (the
largest + 1, + 2, ...) and after each completed pair the paired mAP50 95% interval is
computed; the comparison stops when its half-width is <= H after at least
`converge.min_seeds` seeds ("target"), or after `converge.max_seeds` seeds ("max_seeds").
Without a target it runs the listed seeds ("seeds"). Runs still training when it stops
finish (their folders serve a later, larger comparison) but are left out of the result.

Prints a markdown table and writes converge.json (converge.out, or <out_dir>/converge.json)
after every completed seed pair:

    {"runs": [{"path", "seed", "mAP", "mAP50", "wall_s"}, ...],
     "paths": {path: {"mAP": {"mean", "std"}, "mAP50": {"mean", "std"}}},
     "difference": {metric: {"mean", "std", "ci95", "seeds", "within_spread"}},
     "halfwidth": half-width of difference.mAP50.ci95,
     "stopped_by": "target" | "max_seeds" | "seeds" | null (not finished),
     "jobs": N, "threads": torch threads per run,
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
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, wait
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hydra  # noqa: E402
from omegaconf import DictConfig, OmegaConf, open_dict  # noqa: E402

from ssd_npu.cli import expand_argv, run_folder, user_errors  # noqa: E402
from ssd_npu.config import (  # noqa: E402
    check_comparison,
    check_converge_runs,
    check_seeds,
    config_dir,
)
from ssd_npu.tools.seed_runs import (  # noqa: E402
    halfwidth,
    per_run_threads,
    per_run_workers,
    run_pool,
    seed_sequence,
    stop_reason,
    timed_run,
)

PATHS = ("fixed", "dynamic")
METRICS = ("mAP", "mAP50")
STOP_METRIC = "mAP50"  # the metric whose paired interval converge.target_halfwidth bounds
# converge.compare -> the config key each run sets, and its two values (first minus second)
COMPARISONS = {"shape": ("shape", PATHS), "augment_on": ("data.augment_on", ("device", "host"))}


def saved_row(out_dir: Path, path: str, seed: int) -> dict | None:
    """The row of a finished run in `<out_dir>/<path>_seed<seed>/` (its summary.json holds an
    evaluation), or None: the run is (re)trained."""
    run_dir = out_dir / f"{path}_seed{seed}"
    saved, timing = run_dir / "summary.json", run_dir / "converge_wall.json"
    if not saved.is_file():
        return None
    summary = json.loads(saved.read_text())
    if "eval" not in summary or summary.get("error"):
        return None
    wall_s = json.loads(timing.read_text())["wall_s"] if timing.is_file() else None
    return _row(path, seed, summary, wall_s)


def run_config(base: DictConfig, path: str, seed: int, out_dir: Path, workers: int) -> DictConfig:
    """train.py's config of one run: `python train.py seed=<seed> <key>=<path>` with the same
    overrides, writing `<out_dir>/<path>_seed<seed>/`, with `workers` loader workers."""
    cfg = copy.deepcopy(base)
    key, _ = COMPARISONS[base.converge.compare]
    with open_dict(cfg):
        OmegaConf.update(cfg, key, path)
        cfg.seed, cfg.out_dir, cfg.eval.enabled = seed, str(out_dir / f"{path}_seed{seed}"), True
        cfg.resume, cfg.num_workers = None, workers
    return cfg


def finished_row(out_dir: Path, path: str, seed: int, summary: dict, wall_s: float) -> dict:
    """A trained run's row; its wall time saved beside its summary.json (whose keys are a
    contract), read back on resume."""
    timing = out_dir / f"{path}_seed{seed}" / "converge_wall.json"
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


def run_seeds(cfg: DictConfig, out_dir: Path, write: Callable[[dict], None]) -> dict:
    """Train (or read back) the runs of `cfg.converge`, `converge.jobs` at a time, in the order
    seed by seed, path by path; after each completed seed pair (in that order, whatever order
    the runs finish in), `write` gets the result so far, and the stop rule decides whether to
    go on. Returns the last result: {"runs", "paths", "difference", "stopped_by", "halfwidth",
    "jobs", "threads"}."""
    c = cfg.converge
    listed = [int(s) for s in c.seeds]
    _, pair = COMPARISONS[c.compare]
    target = c.target_halfwidth
    seeds = seed_sequence(listed, target, c.max_seeds)
    order = [(seed, path) for seed in seeds for path in pair]
    threads = per_run_threads(c.jobs, c.threads)
    workers = per_run_workers(cfg.num_workers, c.jobs)
    done: dict[tuple[int, str], dict] = {}
    running: dict[Future, tuple[int, str]] = {}
    queued = paired = 0
    result: dict = {}
    with run_pool(c.jobs) as pool:
        while True:
            while not result.get("stopped_by") and queued < len(order) and len(running) < c.jobs:
                seed, path = order[queued]
                queued += 1
                row = saved_row(out_dir, path, seed)
                if row is not None:
                    done[seed, path] = row
                    continue
                run_cfg = run_config(cfg, path, seed, out_dir, workers)
                running[pool.submit(timed_run, run_cfg, threads)] = (seed, path)
            while not result.get("stopped_by") and paired < len(seeds):
                if any((seeds[paired], path) not in done for path in pair):
                    break
                paired += 1
                rows = [done[s, path] for s in seeds[:paired] for path in pair]
                result = {"runs": rows, **compare(rows, pair), "jobs": c.jobs, "threads": threads}
                diff = result["difference"][STOP_METRIC]
                result["halfwidth"] = halfwidth(diff["ci95"])
                result["stopped_by"] = stop_reason(
                    _diffs(rows, pair),
                    bootstrap_ci,
                    target,
                    c.min_seeds,
                    c.max_seeds,
                    len(listed),
                )
                # written after every pair: a stopped comparison keeps what it measured
                write(result)
            if result.get("stopped_by") or not running:
                return result
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                seed, path = running.pop(future)
                summary, wall_s = future.result()
                done[seed, path] = finished_row(out_dir, path, seed, summary, wall_s)


def _diffs(rows: list[dict], pair: tuple[str, str]) -> list[float]:
    """The paired pair[0] - pair[1] differences of STOP_METRIC, in the rows' seed order."""
    by_seed = {(r["path"], r["seed"]): r[STOP_METRIC] for r in rows}
    seeds = list(dict.fromkeys(r["seed"] for r in rows))
    return [by_seed[pair[0], s] - by_seed[pair[1], s] for s in seeds]


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="converge")
def main(cfg: DictConfig) -> None:
    out_dir = run_folder(cfg)
    out = Path(cfg.converge.out or out_dir / "converge.json")
    config = OmegaConf.to_container(cfg)

    def write(result: dict) -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({**result, "config": config}, indent=2))

    with user_errors():
        check_seeds([int(s) for s in cfg.converge.seeds])
        check_comparison(cfg.converge.compare, tuple(COMPARISONS))
        check_converge_runs(cfg.converge)
        result = run_seeds(cfg, out_dir, write)
    _, pair = COMPARISONS[cfg.converge.compare]
    print(table(result["runs"], result, pair))
    print(
        f"stopped by {result['stopped_by']}: {len(result['difference'][STOP_METRIC]['seeds'])} "
        f"seeds, {STOP_METRIC} half-width {result['halfwidth']:.3f}"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    expand_argv()
    main()
