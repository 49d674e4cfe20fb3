"""The GPU check's numbers: figures from a run's summary.json, ratios, merging runs, and the
text the docs show (docs/bench.md's table, the README headline), rendered from gpu_check.json.

Standard library only: scripts/gpu_check.py writes gpu_check.json with these functions, and
`python scripts/gpu_check.py --render docs/gpu_check.json --write` rewrites the generated
blocks of README.md and docs/bench.md from it (tests/test_gpu_report.py checks the committed
docs equal the render of the committed JSON, so no number there is typed by hand).

gpu_check.json: {"machine": {...}, "checks": {NAME: {"status": "PASS|WARN|FAIL|SKIP",
"figure": {...}, "text": str}}, "ratios": {...}, "overrides": [...], "deadline_s": s,
"elapsed_s": s}; a merged or converted file adds "sources" (where each check came from).
"""

from __future__ import annotations

import math
import re
import textwrap
from typing import Any

PASS, WARN, FAIL, SKIP = "PASS", "WARN", "FAIL", "SKIP"
CONTRACT_KEYS = ("machine", "checks", "ratios", "overrides", "deadline_s", "elapsed_s")
# what a sustained check's figure always holds (None where the run could not measure it)
SUSTAINED_KEYS = ("train_images", "steady_steps", "wall_images_per_s", "device_images_per_s",
                  "data_wait_pct", "cores_needed")  # fmt: skip
DATA_WAIT_TARGET_PCT = 5.0
# The sustained checks: the headline pair first. tv: torchvision's own path (shape=dynamic);
# fixed: ours; graphs: compile=true compiler.mode=reduce-overhead (CUDA graphs); _device:
# data.augment_on=device (the workers only decode; crop, flip and fit run in the step).
SUSTAINED = ("sustained_tv_eager", "sustained_fixed_graphs_device", "sustained_fixed_graphs",
             "sustained_fixed_eager", "sustained_fixed_eager_device",
             "sustained_tv_eager_nobench")  # fmt: skip
# the checks added with the sustained ones, for what had never run on a GPU (scripts/gpu_check.py)
NEVER_RUN = ("resume_compiled", "model_ssd300", "model_retinanet", "model_fcos",
             "compiler_optimizer", "amp_compile", "amp_cudagraphs", "buckets_cudagraphs", "decode_reduced",
             "bench_cuda")  # fmt: skip
HEADLINE = "wall_fixed_graphs_vs_tv_eager"
# bench_data.py's variant whose per-core rate feeds each sustained check's data path
BENCH_VARIANT = {"tv": "torchvision_reference", "host": "fixed_{fit}", "device": "fixed_device"}


def sustained_figure(
    summary: dict[str, Any],
    *,
    train_images: int | None,
    wall_s: float,
    cpu_s: float | None,
    images_per_s_per_core: float | None,
) -> dict[str, Any]:
    """A sustained check's figure from the run's summary.json.

    wall_images_per_s: the steady mean by the host's clock (summary.json
    `steady_wall_images_per_s`: first steady step to last, data waits and epoch starts
    included); device_images_per_s: the steady median by device time (the ceiling the data
    path must feed); data_wait_pct: the mean share of the wall-clock step spent waiting for
    the next batch; host_cpu_pct: CPU seconds of the run and all its processes (DataLoader
    workers too) over its wall seconds, x100 (top's scale: 400 = four cores busy), start-up
    included; cores_needed: device img/s / the host pipeline's img/s per core (bench_data.py
    on the same images and host), the cores per GPU that would keep the device fed.
    """
    steps, warmup = summary.get("steps"), summary.get("warmup_steps")
    device = summary.get("steady_images_per_s")
    cores = round(device / images_per_s_per_core, 1) if device and images_per_s_per_core else None
    return {
        "train_images": train_images,
        "steady_steps": steps - warmup if steps is not None and warmup is not None else None,
        "wall_images_per_s": _round(summary.get("steady_wall_images_per_s")),
        "device_images_per_s": _round(device),
        "data_wait_pct": _round(summary.get("data_wait_pct"), 2),
        "cores_needed": cores,
        "host_cpu_pct": _round(100.0 * cpu_s / wall_s, 0) if cpu_s is not None and wall_s else None,
        "images_per_s_per_core": images_per_s_per_core,
        "batch_size": summary.get("batch_size"),
        "steady_step_ms": _round(summary.get("steady_step_ms"), 2),
        "steady_wall_step_ms": _round(summary.get("steady_wall_step_ms"), 2),
        "first_step_ms": _round(summary.get("first_step_ms"), 0),
        "warmup_steps": warmup,
        "graphs_compiled": summary.get("graphs_compiled"),
        "recompiles": summary.get("recompiles"),
        "final_loss": summary.get("final_loss"),
        "wall_s": _round(wall_s, 1),
    }


def sustained_verdict(figure: dict[str, Any], steady_wanted: int) -> tuple[str, str]:
    """(status, one-line text) of a sustained check: FAIL for a loss that is not finite, WARN
    for fewer steady steps than asked or a data wait above 5%, else PASS."""
    f = figure
    text = (
        f"{number(f['wall_images_per_s'])} img/s wall, {number(f['device_images_per_s'])} device, "
        f"data wait {number(f['data_wait_pct'])}%, {f['steady_steps']} steady steps over "
        f"{f['train_images']} images, host CPU {_pct(f['host_cpu_pct'])}, "
        f"cores needed {number(f['cores_needed'])}"
    )
    loss = f.get("final_loss")
    if loss is None or not math.isfinite(loss):
        return FAIL, f"loss not finite ({loss}); {text}"
    if (f["steady_steps"] or 0) < steady_wanted:
        return WARN, f"{text} (fewer than the {steady_wanted} steady steps asked)"
    wait = f["data_wait_pct"]
    if wait is not None and wait > DATA_WAIT_TARGET_PCT:
        return WARN, f"{text} (data wait above {DATA_WAIT_TARGET_PCT:.0f}%)"
    return PASS, text


def _fig(checks: dict[str, dict], name: str, key: str) -> float | None:
    check = checks.get(name)
    if not check or not isinstance(check.get("figure"), dict):
        return None
    return check["figure"].get(key)


def _over(x: float | None, y: float | None) -> float | None:
    return round(x / y, 3) if x and y else None


def ratios(checks: dict[str, dict], big: int = 64, small: int = 24) -> dict[str, float | None]:
    """The speed-ups. Sustained ones by the wall clock (`wall_...`: the headline,
    `wall_fixed_graphs_vs_tv_eager`, is fixed + CUDA graphs + device augmentation, the default
    on cuda, over torchvision's eager training) and by device time (`device_...`: the
    ceiling); the short functional runs' ones by device time, as before."""

    def w(a: str, b: str) -> float | None:
        return _over(_fig(checks, a, "wall_images_per_s"), _fig(checks, b, "wall_images_per_s"))

    def d(a: str, b: str, key: str = "device_images_per_s") -> float | None:
        return _over(_fig(checks, a, key), _fig(checks, b, key))

    tv, graphs_dev = "sustained_tv_eager", "sustained_fixed_graphs_device"
    return {
        HEADLINE: w(graphs_dev, tv),
        "device_fixed_graphs_vs_tv_eager": d(graphs_dev, tv),
        "wall_fixed_graphs_host_vs_tv_eager": w("sustained_fixed_graphs", tv),
        "wall_fixed_eager_vs_tv_eager": w("sustained_fixed_eager", tv),
        "wall_fixed_eager_device_vs_tv_eager": w("sustained_fixed_eager_device", tv),
        "wall_tv_eager_bench_on_vs_off": w(tv, "sustained_tv_eager_nobench"),
        f"fixed_vs_dynamic_b{big}": d(f"eager_fixed_b{big}", f"eager_dynamic_b{big}"),
        f"fixed_vs_dynamic_b{small}": d(f"eager_fixed_b{small}", f"eager_dynamic_b{small}"),
        f"compiled_vs_eager_b{big}": d(f"compile_b{big}", f"eager_fixed_b{big}"),
        f"graphs_vs_eager_b{big}": d(f"cudagraphs_b{big}", f"eager_fixed_b{big}"),
        f"amp_fp16_vs_fp32_b{big}": d(f"amp_fp16_b{big}", f"eager_fixed_b{big}"),
        f"amp_bf16_vs_fp32_b{big}": d(f"amp_bf16_b{big}", f"eager_fixed_b{big}"),
    }


def _round(value: float | None, digits: int = 1) -> float | None:
    return round(value, digits) if isinstance(value, (int, float)) else value


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}%"


def number(value: float | None) -> str:
    """A figure for a check's line or the docs: "-" when not measured, thousands separated
    from 100 on, two decimals below."""
    if value is None:
        return "-"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.2f}"


# --- merging runs ---------------------------------------------------------------------------


def merge(runs: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """One gpu_check.json from several runs [(label, result)], in order: a check in more
    than one run is taken from the last, and each check says where it came from (`source`:
    the label; `sources[label]`: that run's machine, overrides, deadline and elapsed time).
    Top level: the first run's machine, every run's overrides in order without repeats, the
    summed deadlines and elapsed times, and the ratios recomputed from the merged checks."""
    checks: dict[str, dict] = {}
    sources: dict[str, dict] = {}
    overrides: list[str] = []
    for label, result in runs:
        missing = [k for k in ("machine", "checks") if k not in result]
        if missing:
            raise ValueError(f"{label}: not a gpu_check.json (no {', '.join(missing)})")
        for name, check in result["checks"].items():
            checks.pop(name, None)  # re-inserted: the merged order follows the runs
            checks[name] = {**check, "source": check.get("source", label)}
        for inner, src in result.get("sources", {}).items():
            sources.setdefault(inner, src)  # a merged file merged again keeps its provenance
        sources[label] = {
            "machine": result["machine"],
            "overrides": result.get("overrides"),
            "deadline_s": result.get("deadline_s"),
            "elapsed_s": result.get("elapsed_s"),
            "checks": list(result["checks"]),
        }
        overrides += [o for o in result.get("overrides") or [] if o not in overrides]
    first = runs[0][1]
    return {
        "machine": first["machine"],
        "checks": checks,
        "ratios": ratios(checks),
        "overrides": overrides,
        "deadline_s": _sum(r.get("deadline_s") for _, r in runs),
        "elapsed_s": _sum(r.get("elapsed_s") for _, r in runs),
        "sources": sources,
    }


def _sum(values: Any) -> float | None:
    known = [v for v in values if v is not None]
    return round(sum(known), 1) if known else None


# --- the file written before this format ------------------------------------------------------

LEGACY_NOTE = (
    "converted from the hand-merged run of {date} (two gpu_check.py runs on an H200, 24 steps "
    "each on the 256-image synthetic set, merged by hand): not sustained; its wall figures "
    "were medians of the step intervals (kept as wall_images_per_s_median_interval, not a "
    "throughput); wall_images_per_s_estimated = device img/s x (1 - data wait)"
)


def upgrade_legacy(old: dict[str, Any], label: str) -> dict[str, Any]:
    """The contract's form of a gpu_check.json written before it (`figure` a string, the
    numbers beside it), numbers unchanged: each check's numbers move into `figure`, its
    string into `text`. Nothing is measured anew: the sustained checks stay absent (the
    docs say "not measured"), and the wall clock, whose old figure was a median of the step
    intervals (above the device rate, which a mean cannot be), is estimated from the run's
    own device rate and data wait share: device img/s x (1 - data wait / 100), the rate with
    the waits put back (an upper bound: host gaps besides the data wait are not in it)."""
    if isinstance(next(iter(old["checks"].values()), {}).get("figure"), dict):
        return old  # already in the contract's form
    date = old.get("date", "unknown date")
    checks = {}
    for name, check in old["checks"].items():
        figure = {k: v for k, v in check.items() if k not in ("status", "figure", "run", "note")}
        if "images_per_s" in figure:
            figure["device_images_per_s"] = figure.pop("images_per_s")
            figure["wall_images_per_s_median_interval"] = figure.pop("wall_images_per_s", None)
            device, wait = figure["device_images_per_s"], figure.get("data_wait_pct")
            figure["wall_images_per_s_estimated"] = (
                round(device * (1 - wait / 100), 1) if device and wait is not None else None
            )
            if figure.get("steps") is not None and figure.get("warmup_steps") is not None:
                figure["steady_steps"] = figure["steps"] - figure["warmup_steps"]
        out = {"status": check["status"], "figure": figure, "text": check["figure"]}
        run = check.get("run")
        out["source"] = f"{label}, run {run}" if isinstance(run, int) else f"{label}, {run}"
        if "note" in check:
            out["note"] = check["note"]
        checks[name] = out
    runs = old.get("runs", [])
    result = {
        "machine": old["machine"],
        "checks": checks,
        "ratios": ratios(checks),
        # not written by the script for the merged whole: the runs' own entries are in sources
        "overrides": [],
        "deadline_s": None,
        "elapsed_s": None,
        "sources": {
            label: {
                "note": LEGACY_NOTE.format(date=date),
                "date": date,
                "runs": runs,
                "data": old.get("data"),
            }
        },  # fmt: skip
    }
    # by the wall clock as estimated above: fixed + CUDA graphs over torchvision's eager
    est = "wall_images_per_s_estimated"
    result["ratios"]["wall_estimated_graphs_vs_tv_eager_b64"] = _over(
        _fig(checks, "cudagraphs_b64", est), _fig(checks, "eager_dynamic_b64", est)
    )
    result["ratios"]["device_graphs_vs_tv_eager_b64"] = _over(
        _fig(checks, "cudagraphs_b64", "device_images_per_s"),
        _fig(checks, "eager_dynamic_b64", "device_images_per_s"),
    )
    return result


# --- rendering ------------------------------------------------------------------------------

NOT_MEASURED = "not measured"
TABLE_COLUMNS = ("check", "status", "wall img/s", "device img/s", "data wait %", "steady steps",
                 "train images", "host CPU %", "cores needed", "source / what it says")  # fmt: skip


def _cell(value: Any, digits: int = 0) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not value.is_integer() or digits:
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else f"{value:,.0f}"


def render_table(result: dict[str, Any]) -> str:
    """docs/bench.md's table: one row per check. Throughput columns for the checks that time
    training; `~` marks a wall clock estimated from device time and data wait (a converted
    file); `not measured` a sustained check that has not run."""
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    checks = result["checks"]
    for name in [*[n for n in SUSTAINED if n not in checks], *checks]:
        check = checks.get(name)
        if check is None:
            cells = [f"`{name}`", NOT_MEASURED, *["-"] * 7, "no GPU run of the sustained check yet"]
            lines.append("| " + " | ".join(cells) + " |")
            continue
        f = check.get("figure") if isinstance(check.get("figure"), dict) else {}
        wall = f.get("wall_images_per_s")
        if wall is None and f.get("wall_images_per_s_estimated") is not None:
            wall = f"~{_cell(f['wall_images_per_s_estimated'])}"
        timed = "device_images_per_s" in f
        said = check.get("source") or ""
        if not timed:
            text = check.get("text") or ""
            said = f"{said}: {text}" if said else text
        cells = [
            f"`{name}`",
            check["status"],
            (wall if isinstance(wall, str) else _cell(wall)) if timed else "-",
            _cell(f.get("device_images_per_s")) if timed else "-",
            _cell(f.get("data_wait_pct"), 1) if timed else "-",
            _cell(f.get("steady_steps")),
            _cell(f.get("train_images")),
            _cell(f.get("host_cpu_pct")),
            _cell(f.get("cores_needed"), 1) if f.get("cores_needed") is not None else "-",
            said.replace("|", "/"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    absent = [f"`{n}`" for n in NEVER_RUN if n not in checks]
    if absent:
        lines += ["", "Not in this file (no GPU run of these checks yet): " + ", ".join(absent)]
    shown = {k: v for k, v in result.get("ratios", {}).items() if v is not None}
    lines += ["", "Ratios: " + (", ".join(f"`{k}` {v:.2f}" for k, v in shown.items()) or "none")]
    return "\n".join(lines)


def render_headline(result: dict[str, Any]) -> str:
    """The README's headline paragraph: the wall clock first, the device-time ceiling beside
    it, the cores per GPU from the GPU host (or that they are not measured yet)."""
    m, r, c = result["machine"], result.get("ratios", {}), result["checks"]
    gpu = m.get("gpu_name") or "no GPU"
    graphs, tv = "sustained_fixed_graphs_device", "sustained_tv_eager"
    if r.get(HEADLINE) is not None:
        wall_g, wall_t = _fig(c, graphs, "wall_images_per_s"), _fig(c, tv, "wall_images_per_s")
        dev_g, dev_t = _fig(c, graphs, "device_images_per_s"), _fig(c, tv, "device_images_per_s")
        cores = _fig(c, graphs, "cores_needed")
        cores_text = (
            f"{cores:.0f} host cores per GPU feed that device rate (bench_data.py on this host)"
            if cores is not None
            else "cores per GPU not measured (bench_data.py did not run)"
        )
        return (
            f"On one {gpu} (batch 64, {_cell(_fig(c, graphs, 'train_images'))} photo-sized "
            f"images, {_cell(_fig(c, graphs, 'steady_steps'))} steady steps, "
            "`scripts/gpu_check.py`), the fixed step with CUDA graphs and augmentation on the "
            f"device trains at **{_cell(wall_g)} img/s by the wall clock, "
            f"{r[HEADLINE]:.1f}x torchvision's own eager training** ({_cell(wall_t)} img/s); "
            f"by device time, the ceiling, {_cell(dev_g)} against {_cell(dev_t)} img/s "
            f"({r.get('device_fixed_graphs_vs_tv_eager') or 0:.1f}x). {cores_text}. "
            "Every figure: [docs/bench.md](docs/bench.md#on-a-gpu), generated from "
            "[docs/gpu_check.json](docs/gpu_check.json)."
        )
    est = r.get("wall_estimated_graphs_vs_tv_eager_b64")
    if est is None:
        return (
            f"The GPU check (`scripts/gpu_check.py`) has no wall-clock comparison on a GPU "
            f"yet ({gpu}): [docs/bench.md](docs/bench.md#on-a-gpu)."
        )
    key = "wall_images_per_s_estimated"
    date = next((s.get("date") for s in result.get("sources", {}).values() if "date" in s), "")
    return (
        f"On one {gpu} (batch 64, `scripts/gpu_check.py`, {date}), the fixed step replayed as "
        "CUDA graphs (`compile=true compiler.mode=reduce-overhead`) trained at **about "
        f"{_cell(_fig(c, 'cudagraphs_b64', key))} img/s by the wall clock against "
        f"{_cell(_fig(c, 'eager_dynamic_b64', key))} for torchvision's own eager training: "
        f"{est:.1f}x**. Beside it, the device-time ceiling: "
        f"{_cell(_fig(c, 'cudagraphs_b64', 'device_images_per_s'))} img/s against "
        f"{_cell(_fig(c, 'eager_dynamic_b64', 'device_images_per_s'))} "
        f"({r.get('device_graphs_vs_tv_eager_b64') or 0:.1f}x). The wall figures are estimated "
        "from that run's device rate and data wait (device img/s x (1 - data wait)): 24-step "
        "runs on the 256-image synthetic set, 4 batches per epoch, every epoch starting with "
        "the GPU idle. The sustained check (photo-sized images, 200+ steady steps, the cores "
        "per GPU measured on the GPU host) has not run on a GPU yet. Every figure: "
        "[docs/bench.md](docs/bench.md#on-a-gpu), generated from "
        "[docs/gpu_check.json](docs/gpu_check.json)."
    )


def _wrap(text: str, width: int = 95) -> str:
    """A paragraph wrapped like the docs' hand-written ones (links and code kept whole)."""
    return textwrap.fill(text, width, break_long_words=False, break_on_hyphens=False)


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- gpu_check:{name} -->", f"<!-- /gpu_check:{name} -->"


def replace_block(text: str, name: str, body: str) -> str:
    """`text` with what stands between the `gpu_check:NAME` marker comments replaced by
    `body` (the markers kept); ValueError when the markers are not there once each."""
    start, end = _markers(name)
    pattern = re.compile(re.escape(start) + r"\n.*?\n?" + re.escape(end), re.DOTALL)
    if len(pattern.findall(text)) != 1:
        raise ValueError(f"the document needs the markers {start} ... {end}, once each")
    return pattern.sub(lambda _: f"{start}\n{body}\n{end}", text)


def render_docs(result: dict[str, Any], readme: str, bench: str) -> tuple[str, str]:
    """(README.md, docs/bench.md) with their generated blocks rendered from `result`."""
    return (
        replace_block(readme, "headline", _wrap(render_headline(result))),
        replace_block(bench, "table", render_table(result)),
    )
