"""Benchmark: torchvision's dynamic path vs the fixed-shape path, eager and compiled.

Usage:
    python scripts/bench.py [bench.steps=30] [bench.out=PATH] [any train.py override:
        device=cpu canvas=[H,W] batch_size=8 num_workers=2 seed=0 ...]

One invocation runs six variants (seven on cuda), each on the same data, batch size and seed
(each builds its pipeline afresh with `build_training`, so each sees the same batches in the
same order), each driven by `TrainLoop` for `bench.steps` steps:

    tv_eager        shape=dynamic compile=false: torchvision's model(images, targets)
    fixed_eager     shape=fixed   compile=false
    floor           the bare backbone + head forward, backward and optimizer step, fed by the
                    same live DataLoader as the others: no loss (a plain mean). The fair
                    floor: its workers compete for the cores as the other variants' do
    floor_no_loader the same on one batch kept on the device, no DataLoader: what the network
                    alone costs on a machine with cores to spare for the loader (on 2 cores the
                    live workers add 15-22% to the main process's step)
    fixed_compiled  shape=fixed   compile=true (one graph; the first step is the compile)
    fixed_compiled_reduce_overhead
                    shape=fixed   compile=true compiler.mode=reduce-overhead: the step replayed
                    as CUDA graphs (every shape is fixed). cuda only: on another device it is
                    not run and bench.json's "skipped" gives the reason; if it fails, the
                    error goes there too and the other variants still run
    tv_compiled     shape=dynamic compile=true, bounded: stops at dynamo's recompile limit
                    (compiler.recompile_limit, torch's default 8) or after bench.steps

`bench.variants=[tv_eager,fixed_eager,floor]` runs only those (default: all).

Rounds: the whole set runs `bench.repeats` times (default 3), in alternating order (forward,
then reversed, ...), because a shared machine's speed drifts within a minute: each ratio is
taken within a round, between variants run minutes apart at most, and bench.json gives its
median over the rounds with the min-max spread. A variant's steady_step_ms is the median of
its rounds' (each listed in steady_step_ms_rounds); its other figures (compile statistics,
first step, peak memory) are the first round's, which compiled cold.

Canvas: the model's own (320x320 for ssdlite) unless the command line gives canvas=[H,W], also
on the synthetic set, whose demo settings train at 224: bench.json "canvas" and
"canvas_from" ("model" or "command line") say which, and the table's title repeats it.

After the variants, `device_augment` times data.augment_on=device's share of the step alone:
`DeviceAugment` (the model's recipe: IoU crop, flip, fit) on a batch of photo-sized images
(640x480 and 480x640 in the data.slot slots, max_boxes boxes each), eager, synchronised, the
median of 10 after 2 warm-ups, at batch 64 and at the run's batch_size, beside the steady
step of fixed_eager at that batch: bench.json "device_augment" {"canvas", "fit", "slot",
"recipe", "batch_64_ms", "batch_ms", "batch_size", "vs_fixed_eager_step"}.

Dynamo is reset between variants. Each variant's TensorBoard events go to <out_dir>/<variant>/
(for scripts/plot_steptime.py) in the first round, <out_dir>/round<r>/<variant>/ in round r. Prints a markdown table and writes bench.json (bench.out, or
<out_dir>/bench.json): {"runs": {variant: {...}}, "ratios": {"<variant>_vs_<tv_eager|floor>":
{"median", "min", "max", "rounds"}}, "canvas", "canvas_from", "repeats", "machine": {...},
"skipped": {variant: reason}}; runs[variant]["vs_tv_eager"] and ["vs_floor"] are the medians
of those ratios; machine names the device ("device") and the GPU on cuda ("device_name"). Times in
ms; steady = median after warm-up (`detect_warmup`); data_wait_pct = steady data wait /
steady step time.
peak_rss_mb is the main process's peak resident memory during the variant (Linux VmHWM, reset
before each variant; DataLoader workers not included).
"""

import contextlib
import copy
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# ssd_npu first: it sets TORCH_DEVICE_BACKEND_AUTOLOAD=0, which only works before torch loads
import ssd_npu  # noqa: E402, F401

# isort: split
import hydra  # noqa: E402
import torch  # noqa: E402
from omegaconf import DictConfig, open_dict  # noqa: E402

from ssd_npu.cli import expand_argv, run_folder, user_errors  # noqa: E402
from ssd_npu.config import config_dir  # noqa: E402
from ssd_npu.errors import ConfigError  # noqa: E402

VARIANTS = {  # name: (shape, compile, compiler.mode; None: the command line's)
    "tv_eager": ("dynamic", False, None),
    "fixed_eager": ("fixed", False, None),
    "floor": ("fixed", False, None),
    "floor_no_loader": ("fixed", False, None),
    "fixed_compiled": ("fixed", True, None),
    "fixed_compiled_reduce_overhead": ("fixed", True, "reduce-overhead"),
    "tv_compiled": ("dynamic", True, None),
}
FLOORS = ("floor", "floor_no_loader")
# the step's compile statistics (TrainStep.compile_statistics) a bench.json run reports
BENCH_COMPILE_KEYS = (
    "graphs_compiled", "recompiles", "graphs_per_step", "recompiles_per_step", "recompile_reasons",
)  # fmt: skip
CUDA_ONLY = {"fixed_compiled_reduce_overhead": "compiler.mode=reduce-overhead (CUDA graphs)"}


def reset_peak_rss() -> None:
    """Linux: writing 5 to clear_refs resets VmHWM, so each variant gets its own peak."""
    with contextlib.suppress(OSError):  # not Linux: peak_rss_mb falls back to ru_maxrss
        Path("/proc/self/clear_refs").write_text("5")


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    import resource  # not Linux: the process-wide peak, never reset

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def floor_step(model):
    """Backbone + head only; the outputs' mean is the scalar to differentiate (no loss).

    A mean, not a sum: a sum's gradients are large enough that SGD drives the weights towards
    huge or denormal values within a few steps, and denormal arithmetic is slow on a CPU.
    """
    from ssd_npu.engine.train_step import TrainStep

    class FloorStep(TrainStep):
        def __call__(self, batch):
            return {"floor": sum(output.mean() for output in model(batch.images))}

    return FloorStep()


def run_variant(name: str, base: DictConfig, events_dir: Path) -> dict:
    from ssd_npu.build import build_training
    from ssd_npu.device.compiler import CompileOptions, reset
    from ssd_npu.engine.loop import TrainLoop
    from ssd_npu.engine.telemetry import Telemetry, detect_warmup, steady_median
    from ssd_npu.engine.train_step import DynamicStep, StepOptions

    shape, compile, mode = VARIANTS[name]
    steps = int(base.bench.steps)
    cfg = copy.deepcopy(base)
    with open_dict(cfg):
        cfg.shape, cfg.compile, cfg.max_steps, cfg.eval.enabled = shape, compile, steps, False
        # compiler.optimizer=true compiles the optimizer in the compiled variants only
        cfg.compiler.optimizer = bool(cfg.compiler.optimizer) and compile
        if mode is not None:
            cfg.compiler.mode = mode
    reset()
    t = build_training(cfg)
    if cfg.epochs * len(t.data.train) < steps:  # a small data set: enough epochs for the steps
        cfg.epochs = math.ceil(steps / len(t.data.train))
        t = build_training(cfg)
    step, loader, sampler = t.step, t.data.train, t.data.train_sampler
    if name in FLOORS:
        step = floor_step(t.model)
    if name == "floor_no_loader":
        loader, sampler = [next(iter(t.data.train)).to(t.device.torch)] * steps, None
    if name == "tv_compiled":
        # bounded: dynamo raises at its recompile limit instead of falling back to eager
        compile_options = CompileOptions(
            backend=cfg.compiler.backend or t.device.compile_backend,
            recompile_limit=cfg.compiler.recompile_limit,
            fail_on_limit=True,
            mode=cfg.compiler.mode,
        )
        options = StepOptions(amp=cfg.amp, amp_dtype=cfg.amp_dtype, compile=compile_options)
        step = DynamicStep(t.model, t.device, options)
        t.optimizer_step.counted_in = step.compiled  # a compiled optimizer's graphs: this step's
    telemetry = Telemetry(events_dir / name, steps)
    stopped = "steps"
    reset_peak_rss()
    loop = TrainLoop(
        step,
        t.optimizer,
        t.scheduler,
        loader,
        sampler,
        t.device,
        telemetry,
        scaler=t.scaler,
        optimizer_step=t.optimizer_step,
    )
    try:
        loop.run(cfg.epochs, steps)
    except torch._dynamo.exc.FailOnRecompileLimitHit:
        stopped = "recompile limit"
    finally:
        telemetry.close()
    step_ms, data_ms = telemetry.step_ms, telemetry.data_ms
    warmup = detect_warmup(step_ms)
    steady = steady_median(step_ms, warmup)
    steady_steps = step_ms[warmup:] or step_ms
    compiled = step.compile_statistics()
    return {
        "steps": len(step_ms),
        "stopped_by": stopped,
        **{key: compiled[key] for key in BENCH_COMPILE_KEYS},
        "warmup_steps": warmup,
        "first_step_ms": step_ms[0] if step_ms else None,
        "steady_step_ms": steady,
        "p90_over_median": _p90(steady_steps) / steady if steady else None,
        "images_per_s": cfg.batch_size * 1000.0 / steady if steady else None,
        "data_wait_pct": 100.0 * sum(data_ms[warmup:] or data_ms) / sum(steady_steps)
        if steady_steps
        else None,
        "peak_rss_mb": peak_rss_mb(),
    }


def ratio(run: dict, reference: dict | None) -> float | None:
    """run's steady step time / the reference's; None when either has none (a variant stopped
    by the recompile limit before a step finished, or a reference that did not run)."""
    mine = run.get("steady_step_ms")
    theirs = reference.get("steady_step_ms") if reference is not None else None
    if mine is None or not theirs:
        return None
    return mine / theirs


def round_order(round_index: int, names: list[str]) -> list[str]:
    """The variants' order in a round: as listed in even rounds, reversed in odd ones, so that
    no variant always runs on a machine warmed (or throttled) by the same neighbour."""
    return list(names) if round_index % 2 == 0 else list(reversed(names))


def spread(values: list[float | None]) -> dict | None:
    """{"median", "min", "max", "rounds"} of per-round values; None when a round has none."""
    if not values or any(v is None for v in values):
        return None
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "rounds": values,
    }


def combine_rounds(rounds: list[dict[str, dict]]) -> tuple[dict, dict]:
    """Per-round results -> (runs, ratios).

    runs[variant]: the first round's figures, with steady_step_ms (and images_per_s,
    data_wait_pct) the median over rounds, steady_step_ms_rounds, and vs_tv_eager / vs_floor
    the medians of the per-round ratios. ratios["<variant>_vs_<reference>"]: `spread` of the
    per-round ratios (each within one round).
    """
    names = [name for name in rounds[0] if all(name in r for r in rounds)]
    runs, ratios = {}, {}
    for name in names:
        run = dict(rounds[0][name])
        steady = [r[name]["steady_step_ms"] for r in rounds]
        run["steady_step_ms_rounds"] = steady
        if all(v is not None for v in steady):
            run["steady_step_ms"] = statistics.median(steady)
            run["images_per_s"] = statistics.median(r[name]["images_per_s"] for r in rounds)
            waits = [r[name]["data_wait_pct"] for r in rounds]
            run["data_wait_pct"] = statistics.median(waits) if None not in waits else None
        for reference in ("tv_eager", "floor"):
            per_round = [ratio(r[name], r.get(reference)) for r in rounds]
            ratios[f"{name}_vs_{reference}"] = spread(per_round)
            summary = ratios[f"{name}_vs_{reference}"]
            run[f"vs_{reference}"] = summary["median"] if summary else None
        runs[name] = run
    return runs, ratios


def canvas_from(cfg: DictConfig) -> str:
    """Set the bench's canvas: the command line's canvas=[H,W] if it gives one, else the
    model's own (a data set's demo settings may have changed it). Returns where it came from."""
    from hydra.core.hydra_config import HydraConfig

    given = any(
        o.lstrip("+").split("=", 1)[0] == "canvas" for o in HydraConfig.get().overrides.task
    )
    if not given:
        with open_dict(cfg):
            cfg.canvas = list(cfg.model.canvas)
    return "command line" if given else "model"


def _p90(values: list[float]) -> float:
    return (
        statistics.quantiles(values, n=10, method="inclusive")[-1] if len(values) > 1 else values[0]
    )


def device_name(device) -> str:
    """The accelerator's name (the GPU's on cuda); on cpu the processor's."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device.torch)
    if device.type == "npu" and hasattr(torch.npu, "get_device_name"):
        return torch.npu.get_device_name(device.torch)
    return platform.processor() or platform.machine()


def machine(device) -> dict:
    return {
        "device": str(device.torch),
        "device_name": device_name(device),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_avg_start": list(os.getloadavg()),
    }


def augment_ms(augment, device, batch: int, slot: tuple[int, int], max_boxes: int) -> float:
    """Median ms of `augment` (a DeviceAugment) on one batch of photo-sized slot images."""
    g = torch.Generator().manual_seed(0)
    hs, ws = slot
    sizes = torch.tensor([[min(480, hs), min(640, ws)], [min(640, hs), min(480, ws)]] * batch)
    sizes = sizes[:batch]
    slots = torch.randint(0, 256, (batch, 3, hs, ws), generator=g, dtype=torch.uint8)
    xy = torch.rand(batch, max_boxes, 2, generator=g) * sizes[:, None].flip(-1) * 0.6
    wh = 8 + torch.rand(batch, max_boxes, 2, generator=g) * sizes[:, None].flip(-1) * 0.3
    boxes = torch.cat([xy, xy + wh], -1)
    labels = torch.ones(batch, max_boxes, dtype=torch.int64)
    valid = torch.rand(batch, max_boxes, generator=g) < 0.5
    valid[:, 0] = True
    draws = torch.rand(batch, augment.draws, generator=g)
    args = [t.to(device.torch) for t in (slots, sizes, boxes, labels, valid, draws)]
    times = []
    with torch.no_grad():
        for i in range(12):
            device.synchronize()
            start = time.perf_counter()
            augment(*args)
            device.synchronize()
            if i >= 2:
                times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


def device_augment_cost(cfg: DictConfig, device, fixed_step_ms: float | None) -> dict:
    """The device augmentation's own time (see the module docstring), beside the fixed step."""
    from ssd_npu.build import canvas_of
    from ssd_npu.data.device_augment import DeviceAugment
    from ssd_npu.families import train_recipe_of
    from ssd_npu.models.specs import MODELS

    recipe = train_recipe_of(MODELS[cfg.model.name]) if cfg.augment else "none"
    augment = DeviceAugment(canvas_of(cfg), cfg.fit, float(cfg.pad_value), recipe=recipe)
    slot = tuple(int(v) for v in cfg.data.slot)
    m = cfg.max_boxes if isinstance(cfg.max_boxes, int) else max(cfg.max_boxes)
    at_batch = augment_ms(augment, device, int(cfg.batch_size), slot, m)
    return {
        "canvas": list(augment.canvas),
        "fit": cfg.fit,
        "slot": list(slot),
        "recipe": recipe,
        "batch_64_ms": augment_ms(augment, device, 64, slot, m),
        "batch_size": int(cfg.batch_size),
        "batch_ms": at_batch,
        "vs_fixed_eager_step": at_batch / fixed_step_ms if fixed_step_ms else None,
    }


def table(runs: dict) -> str:
    cols = [
        "graphs_compiled", "recompiles", "warmup_steps", "first_step_ms", "steady_step_ms",
        "p90_over_median", "images_per_s", "data_wait_pct", "peak_rss_mb", "vs_tv_eager",
        "vs_floor",
    ]  # fmt: skip

    def cell(v):
        if v is None:
            return "-"
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    lines = ["| run | steps | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 2)]
    for name, r in runs.items():
        lines.append(
            f"| {name} | {r['steps']} | " + " | ".join(cell(r.get(c)) for c in cols) + " |"
        )
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="bench")
def main(cfg: DictConfig) -> None:
    out_dir = run_folder(cfg)
    # inductor keeps compiled kernels on disk; a fresh cache makes first_step_ms a cold compile
    # (as on a new machine) unless the caller chose a cache with TORCHINDUCTOR_CACHE_DIR
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(out_dir / "inductor_cache"))
    from ssd_npu.device.backend import resolve_device

    source = canvas_from(cfg)
    repeats = int(cfg.bench.repeats)
    chosen = list(cfg.bench.variants) if cfg.bench.variants else list(VARIANTS)
    with user_errors():
        if repeats < 1:
            raise ConfigError(f"bench.repeats={repeats}: give 1 or more rounds (default 3)")
        unknown = [name for name in chosen if name not in VARIANTS]
        if unknown:
            raise ConfigError(f"bench.variants: unknown {unknown}; choose from {list(VARIANTS)}")
    rounds: list[dict[str, dict]] = []
    skipped: dict[str, str] = {}
    with user_errors():
        device = resolve_device(cfg.device.name, cfg.device.index, cfg.device.jit_compile)
        info = machine(device)
        info["inductor_cache"] = os.environ["TORCHINDUCTOR_CACHE_DIR"]
        for name in CUDA_ONLY:
            if name in chosen and device.type != "cuda":
                skipped[name] = f"{CUDA_ONLY[name]} needs device=cuda; this run's is {device.type}"
                print(f"bench: {name} skipped: {skipped[name]}", flush=True)
        for index in range(repeats):
            results: dict[str, dict] = {}
            events_dir = out_dir if index == 0 else out_dir / f"round{index}"
            for name in round_order(index, [n for n in chosen if n not in skipped]):
                print(f"bench: round {index + 1}/{repeats}: {name} ...", flush=True)
                try:
                    results[name] = run_variant(name, cfg, events_dir)
                except Exception as err:
                    if name not in CUDA_ONLY:
                        raise
                    # never run on a GPU by this project yet: a failure costs this variant only
                    traceback.print_exc()
                    skipped[name] = f"failed: {type(err).__name__}: {err}"[:1000]
                    continue
                print(json.dumps({name: results[name]}), flush=True)
            rounds.append({n: results[n] for n in VARIANTS if n in results})
        runs, ratios = combine_rounds(rounds)
        fixed_step = runs.get("fixed_eager", {}).get("steady_step_ms")
        augment_cost = device_augment_cost(cfg, device, fixed_step)
    info["load_avg_end"] = list(os.getloadavg())
    path = Path(cfg.bench.out or out_dir / "bench.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps(
            {
                "runs": runs,
                "ratios": ratios,
                "canvas": list(cfg.canvas),
                "canvas_from": source,
                "repeats": repeats,
                "machine": info,
                "skipped": skipped,
                "device_augment": augment_cost,
            },
            indent=2,
        )
    )
    height, width = cfg.canvas
    print(f"canvas {height}x{width} ({source}); medians over {repeats} round(s)")
    print(table(runs))
    a = augment_cost
    share = a["vs_fixed_eager_step"]
    print(
        f"\ndevice augmentation ({a['recipe']}, fit={a['fit']}, canvas {a['canvas']}, slot "
        f"{a['slot']}): {a['batch_64_ms']:.1f} ms per batch of 64; {a['batch_ms']:.1f} ms at "
        f"batch {a['batch_size']}"
        + (f", {100 * share:.1f}% of the fixed eager step" if share is not None else "")
    )
    for name, reason in skipped.items():
        print(f"skipped: {name} ({reason})")
    print(f"\nbench.json: {path}")


if __name__ == "__main__":
    expand_argv()
    main()
