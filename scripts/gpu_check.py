"""GPU check: every accelerator path of ssd-npu, run for real on this machine's GPU in minutes.

Usage:
    python scripts/gpu_check.py [--deadline-s 360] [--out DIR] [--steps 24] [--workers N]
        [--checks eager,compile,...] [any train.py override, passed on to every run]

Each check is a real `train.py` run (a subprocess) on the embedded synthetic set; the script
reads what the run wrote (summary.json, TensorBoard events, its log) and prints one row per
check (PASS / WARN / FAIL / SKIP and its figures), then writes gpu_check.json:

    {"machine": {...}, "checks": {NAME: {"status": ..., "figure": str, ...}},
     "ratios": {...}, "data": {...}, "elapsed_s": ..., "deadline_s": ...}

Checks (`--checks` takes the group names before the colon), run in this order: eager at
batch 64, cudagraphs, amp, resume, cpu_resume, compile, eager at batch 24, torchrun.
    preflight:   torch, torchvision, CUDA, the GPU, missing packages
    eager:       shape=fixed and shape=dynamic (torchvision's own path), batch 64 and 24:
                 steady img/s by device time and by the wall clock, data wait %
    compile:     compile=true, batch 64: 1 graph, 0 recompiles, graph breaks counted
    cudagraphs:  compile=true compiler.mode=reduce-overhead, batch 64: no "skipping cudagraphs"
    amp:         amp=true with fp16 and with bf16, batch 64
    resume:      a run checkpointed half-way and resumed (resume=...) from that checkpoint
                 in a new process, both with device.deterministic=true: the resumed losses
                 equal the uninterrupted run's; the same run also evaluates (COCO mAP + the
                 detection sheet) and writes a profiler trace
    cpu_resume:  the GPU checkpoint resumed with device=cpu
    torchrun:    2 processes on nccl (SKIP with fewer than 2 GPUs)
On one H200 (16 cores) the compiles take 1.5-2 minutes each: everything needs about 8
minutes (--deadline-s 480); the default 6 minutes SKIPs what comes last.
Ratios: fixed/dynamic, compiled/eager, CUDA graphs/eager, amp/fp32 (steady device-time img/s)
and the headline: fixed + CUDA graphs vs torchvision eager at batch 64 (wall-clock img/s).

A check that has no time left before the deadline (--deadline-s from the start) is SKIP,
never a hang: each run is killed at the deadline. Without CUDA every check after preflight is
SKIP and the reason is said. Exit status: 1 if a check FAILed, else 0. `--device cpu` runs
the same checks on the CPU (the CUDA-only ones SKIP): that is how the tests exercise it.
"""

from __future__ import annotations

import os

os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")  # before torch (see ssd_npu)

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

PASS, WARN, FAIL, SKIP = "PASS", "WARN", "FAIL", "SKIP"
GROUPS = ("preflight", "eager", "compile", "cudagraphs", "amp", "resume", "cpu_resume", "torchrun")
PACKAGES = ("hydra", "omegaconf", "pycocotools", "tensorboard", "tqdm", "PIL", "numpy")
DATA_WAIT_TARGET_PCT = 5.0
# Resumed losses must equal the uninterrupted run's: both runs use device.deterministic=true
# (deterministic kernels), so the same weights, batches and RNG states give the same bits.
# Without it, atomics in a few GPU backward kernels change the last bits from run to run and
# the SSD loss's hard-negative mining amplifies them to percent-level differences in 4 steps.
RESUME_RTOL = 1e-6
# Least seconds a check needs to be worth starting (a start of torch + CUDA + the data set is
# ~10 s; compiling the step ~1-2 minutes on a GPU host). Below that it is SKIP.
MIN_SECONDS = {"eager": 15, "compile": 60, "cudagraphs": 45, "amp": 15, "resume": 30,
               "cpu_resume": 20, "torchrun": 30}  # fmt: skip


@dataclass
class Run:
    """One train.py process: its folder, exit status (None: killed at the deadline), log."""

    name: str
    folder: Path
    returncode: int | None
    wall_s: float
    log: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    @property
    def summary(self) -> dict:
        path = self.folder / "summary.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def error(self) -> str:
        """The run's last error line (the `error: ...` a user error prints, else the last line)."""
        lines = [line for line in self.log.splitlines() if line.strip()]
        for line in reversed(lines):
            if line.startswith("error:") or "Error" in line:
                return line.strip()[:300]
        return lines[-1].strip()[:300] if lines else "no output"


@dataclass
class Check:
    """One printed row: status, a short figure, and the numbers behind it (for the JSON)."""

    status: str
    figure: str
    details: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"status": self.status, "figure": self.figure, **self.details}


class Runner:
    """Starts train.py runs with the shared overrides, each bounded by the deadline."""

    def __init__(self, out: Path, deadline: float, device: str, overrides: list[str], workers: int):
        self.out, self.deadline, self.device = out, deadline, device
        self.overrides, self.workers = overrides, workers

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def train(self, name: str, overrides: list[str], launcher: list[str] | None = None) -> Run:
        """Run train.py (or `launcher` + train.py) into <out>/<name>; killed at the deadline."""
        folder = self.out / name
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        words = merge_overrides(
            [
                f"device={self.device}",
                "eval=false",
                "eval_every=0",  # the synthetic schedule evaluates every 4 epochs: not timed
                f"num_workers={self.workers}",
            ],
            overrides,
            self.overrides,  # the user's overrides win
        )
        args = [
            *(launcher or [sys.executable]), str(REPO / "train.py"), *words,
            f"hydra.run.dir={folder}",
        ]  # fmt: skip
        env = dict(os.environ, PYTHONUNBUFFERED="1", TORCH_LOGS="perf_hints")
        start = time.monotonic()
        with open(folder / "log.txt", "w") as log:
            log.write(" ".join(args) + "\n")
            log.flush()
            # own session: a kill at the deadline also ends the DataLoader workers
            proc = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
            try:
                returncode: int | None = proc.wait(timeout=max(1.0, self.left()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                returncode = None
        text = (folder / "log.txt").read_text(errors="replace")
        return Run(name, folder, returncode, time.monotonic() - start, text)


def merge_overrides(*layers: list[str]) -> list[str]:
    """key=value words, a later layer's value replacing an earlier one's for the same key
    (Hydra refuses a key given twice)."""
    merged: dict[str, str] = {}
    for layer in layers:
        for word in layer:
            merged[word.split("=", 1)[0]] = word
    return list(merged.values())


def machine_info(device: str) -> dict:
    info = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torchvision": _version("torchvision"),
        "cuda": torch.version.cuda,
        "device": device,
        "gpus": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "gpu_name": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "missing_packages": [p for p in PACKAGES if importlib.util.find_spec(p) is None],
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["gpu_capability"] = f"{props.major}.{props.minor}"
    return info


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def preflight(info: dict) -> Check:
    """Packages present and, for device=cuda, a GPU torch can use."""
    if info["missing_packages"]:
        missing = ", ".join(info["missing_packages"])
        return Check(FAIL, f"missing packages: {missing} (pip install -r requirements.txt)")
    versions = f"torch {info['torch']}, torchvision {info['torchvision']}"
    if info["device"] == "cuda":
        if not info["gpus"]:
            return Check(
                SKIP,
                f"no CUDA GPU visible ({versions}, CUDA build {info['cuda']}): nothing to check "
                "here; run it on a GPU machine (nvidia-smi must list one)",
            )
        return Check(PASS, f"{versions}, CUDA {info['cuda']}, {info['gpus']} x {info['gpu_name']}")
    return Check(PASS, f"{versions}, device={info['device']} (CUDA-only checks skip)")


def throughput(run: Run, batch: int) -> Check:
    """Steady img/s by device time and by the wall clock, and the data wait share."""
    if not run.ok:
        return _failed(run)
    s = run.summary
    details = {
        "batch_size": batch,
        "images_per_s": s.get("steady_images_per_s"),
        "wall_images_per_s": s.get("steady_wall_images_per_s"),
        "data_wait_pct": s.get("data_wait_pct"),
        "steady_step_ms": s.get("steady_step_ms"),
        "first_step_ms": s.get("first_step_ms"),
        "steps": s.get("steps"),
        "warmup_steps": s.get("warmup_steps"),
        "graphs_compiled": s.get("graphs_compiled"),
        "recompiles": s.get("recompiles"),
        "graph_breaks": s.get("graph_breaks"),
        "final_loss": s.get("final_loss"),
        "wall_s": round(run.wall_s, 1),
    }
    figure = (
        f"{_num(details['images_per_s'])} img/s device, {_num(details['wall_images_per_s'])} "
        f"wall, data wait {_num(details['data_wait_pct'])}%, step {_num(details['steady_step_ms'])}"
        f" ms, first {_num(details['first_step_ms'])} ms"
    )
    if details["final_loss"] is None or not math.isfinite(details["final_loss"]):
        return Check(FAIL, f"loss not finite ({details['final_loss']}); {figure}", details)
    wait = details["data_wait_pct"]
    if wait is not None and wait > DATA_WAIT_TARGET_PCT:
        return Check(WARN, f"{figure} (data wait above {DATA_WAIT_TARGET_PCT:.0f}%)", details)
    return Check(PASS, figure, details)


def compiled(run: Run, batch: int) -> Check:
    """compile=true: exactly one graph and no recompile (graph breaks counted, not failed)."""
    check = throughput(run, batch)
    if check.status == FAIL:
        return check
    d = check.details
    figure = (
        f"{d['graphs_compiled']} graph(s), {d['recompiles']} recompiles, "
        f"{d['graph_breaks']} graph breaks; {check.figure}"
    )
    if d["recompiles"]:
        return Check(FAIL, figure, d)
    if d["graphs_compiled"] != 1:
        return Check(WARN, figure, d)
    return Check(check.status, figure, d)


def cudagraphs(run: Run, batch: int) -> Check:
    """reduce-overhead: the step replayed as CUDA graphs, none skipped (inductor's own log)."""
    check = compiled(run, batch)
    if check.status == FAIL:
        return check
    skips = run.summary.get("cudagraph_skips") or 0
    logged = [line.strip() for line in run.log.splitlines() if "skipping cudagraphs" in line]
    check.details["cudagraph_skips"] = skips
    if skips or logged:
        reason = logged[0][:200] if logged else f"{skips} skips counted"
        return Check(WARN, f"CUDA graphs skipped: {reason}; {check.figure}", check.details)
    return check


def _failed(run: Run) -> Check:
    if run.returncode is None:
        return Check(SKIP, f"stopped at the deadline after {run.wall_s:.0f} s (no time left)")
    return Check(FAIL, f"exit {run.returncode}: {run.error()} (log: {run.folder / 'log.txt'})")


def _num(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.2f}"


def losses_by_step(folder: Path) -> dict[int, float]:
    """loss/total per step from a run's TensorBoard events."""
    from ssd_npu.engine.telemetry import read_scalar_series

    steps, values = read_scalar_series(folder, "loss/total")["loss/total"]
    return dict(zip(steps, values, strict=True))


def resume_checks(runner: Runner, steps: int, batch: int) -> dict[str, Check]:
    """An uninterrupted run (checkpoints every half, evaluation, profiler trace), then a new
    process resumed from its half-way checkpoint: the resumed losses must match."""
    half = max(1, steps // 2)
    base = runner.train(
        "resume_base",
        [f"batch_size={batch}", f"max_steps={steps}", f"checkpoint_every={half}",
         "keep_checkpoints=4", "eval=true", "profile_steps=2", "device.deterministic=true"],
    )  # fmt: skip
    if not base.ok:
        failed = _failed(base)
        return {"resume": failed, "eval_sheet": failed, "profiler": failed}
    checks = {"eval_sheet": eval_sheet(base), "profiler": profiler(base)}
    ckpt = base.folder / "checkpoints" / f"step_{half:07d}.pt"
    resumed = runner.train(
        "resume_resumed",
        [
            f"batch_size={batch}",
            f"max_steps={steps}",
            f"resume={ckpt}",
            "device.deterministic=true",
        ],
    )
    if not resumed.ok:
        checks["resume"] = _failed(resumed)
        return checks
    whole, again = losses_by_step(base.folder), losses_by_step(resumed.folder)
    common = sorted(set(whole) & set(again))
    if not common or min(common) != half + 1:
        checks["resume"] = Check(FAIL, f"resumed steps {sorted(again)} do not follow step {half}")
        return checks
    diffs = [abs(again[s] - whole[s]) / max(abs(whole[s]), 1e-12) for s in common]
    details = {"resumed_from": half, "steps_compared": common, "max_rel_diff": max(diffs),
               "first_step_rel_diff": diffs[0], "checkpoint": str(ckpt)}  # fmt: skip
    figure = (
        f"steps {common[0]}-{common[-1]} after resume at {half}: loss rel. diff "
        f"max {max(diffs):.1e} (first step {diffs[0]:.1e})"
    )
    checks["resume"] = Check(PASS if max(diffs) <= RESUME_RTOL else WARN, figure, details)
    return checks


def eval_sheet(run: Run) -> Check:
    """COCO evaluation ran (mAP in summary.json) and the detection sheet is in TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ev = run.summary.get("eval")
    acc = EventAccumulator(str(run.folder / "tensorboard"), size_guidance={"images": 0})
    acc.Reload()
    images = [t for t in acc.Tags().get("images", []) if "detections" in t]
    if not ev or not images:
        return Check(FAIL, f"eval={ev}, detection images {images}")
    return Check(PASS, f"mAP {ev['mAP']:.3f}, mAP50 {ev['mAP50']:.3f}, sheet {images[0]}", ev)


def profiler(run: Run) -> Check:
    traces = sorted(p.name for p in (run.folder / "profile").glob("*.json*"))
    if not traces:
        return Check(FAIL, f"no trace in {run.folder / 'profile'}")
    return Check(PASS, f"trace {traces[0]}", {"traces": traces})


def cpu_resume(runner: Runner, gpu_checkpoint: Path, batch: int) -> Check:
    """The GPU run's checkpoint, resumed by a device=cpu process for 1 step."""
    if not gpu_checkpoint.is_file():
        return Check(SKIP, "no GPU checkpoint (the resume check did not run)")
    step = int(gpu_checkpoint.stem.split("_")[1])
    run = runner.train(
        "cpu_resume",
        [f"batch_size={batch}", f"resume={gpu_checkpoint}", f"max_steps={step + 1}",
         "device=cpu", "num_workers=2"],
    )  # fmt: skip
    if not run.ok:
        return _failed(run)
    s = run.summary
    if s.get("device") != "cpu" or s.get("global_step") != step + 1:
        return Check(FAIL, f"device {s.get('device')}, global step {s.get('global_step')}")
    return Check(PASS, f"resumed step {step} on cpu, loss {s.get('final_loss'):.3f}", s)


def ratio(a: Check | None, b: Check | None, key: str = "images_per_s") -> float | None:
    """a's img/s over b's, when both ran."""
    x = a.details.get(key) if a is not None else None
    y = b.details.get(key) if b is not None else None
    return x / y if x and y else None


def ratios(checks: dict[str, Check], big: int = 64, small: int = 24) -> dict[str, float | None]:
    """The speed-ups, from steady device-time img/s (the headline also by the wall clock)."""
    c = checks.get
    fixed, dynamic = c(f"eager_fixed_b{big}"), c(f"eager_dynamic_b{big}")
    graphs = c(f"cudagraphs_b{big}")
    out = {
        f"fixed_vs_dynamic_b{big}": ratio(fixed, dynamic),
        f"fixed_vs_dynamic_b{small}": ratio(
            c(f"eager_fixed_b{small}"), c(f"eager_dynamic_b{small}")
        ),
        f"compiled_vs_eager_b{big}": ratio(c(f"compile_b{big}"), fixed),
        f"graphs_vs_eager_b{big}": ratio(graphs, fixed),
        f"amp_fp16_vs_fp32_b{big}": ratio(c(f"amp_fp16_b{big}"), fixed),
        f"amp_bf16_vs_fp32_b{big}": ratio(c(f"amp_bf16_b{big}"), fixed),
        # the headline: what a user gets over torchvision's own eager training
        f"graphs_vs_tv_eager_b{big}": ratio(graphs, dynamic),
        f"graphs_vs_tv_eager_b{big}_wall": ratio(graphs, dynamic, "wall_images_per_s"),
    }
    return {k: round(v, 3) if v is not None else None for k, v in out.items()}


def data_pressure(checks: dict[str, Check], workers: int) -> dict:
    """Where the fastest run waits for data: the host pipeline's rate per worker and the
    workers (cores) per GPU it would need to keep the device fed at that run's device rate."""
    timed = [c for c in checks.values() if c.details.get("wall_images_per_s")]
    if not timed:
        return {}
    fastest = max(timed, key=lambda c: c.details["images_per_s"] or 0.0)
    d = fastest.details
    out = {"num_workers": workers, "fastest_images_per_s": d["images_per_s"],
           "data_wait_pct": d["data_wait_pct"]}  # fmt: skip
    wait = d["data_wait_pct"]
    if workers > 0 and wait is not None and wait > DATA_WAIT_TARGET_PCT:
        # data-bound: the wall rate is what `workers` workers deliver
        per_worker = d["wall_images_per_s"] / max(workers, 1)
        out["images_per_s_per_worker"] = per_worker
        out["workers_needed"] = math.ceil(d["images_per_s"] / per_worker)
    return out


@dataclass
class Plan:
    """Which groups run, with what steps and batches."""

    groups: tuple[str, ...]
    steps: int
    batches: tuple[int, int]  # (large, small): 64 and 24 by default


def run_checks(runner: Runner, info: dict, plan: Plan) -> dict[str, Check]:
    checks: dict[str, Check] = {}
    big, small = plan.batches
    on_cuda = runner.device == "cuda"
    gate = preflight(info)
    checks["preflight"] = gate
    print(row("preflight", gate), flush=True)

    def timed(name: str, group: str, make: Callable[[], Check], cuda_only: str = "") -> None:
        if group not in plan.groups:
            return
        if gate.status != PASS:
            checks[name] = Check(SKIP, f"preflight is {gate.status} (see its row)")
        elif cuda_only and not on_cuda:
            checks[name] = Check(SKIP, f"{cuda_only} needs device=cuda")
        elif runner.left() < MIN_SECONDS[group]:
            checks[name] = Check(SKIP, f"no time left ({runner.left():.0f} s before the deadline)")
        else:
            checks[name] = make()
        print(row(name, checks[name]), flush=True)

    steps = [f"max_steps={plan.steps}"]
    for shape in ("fixed", "dynamic"):
        name = f"eager_{shape}_b{big}"
        timed(name, "eager", lambda s=shape, n=name: throughput(
            runner.train(n, [f"shape={s}", f"batch_size={big}", *steps]), big))  # fmt: skip
    # the headline and the functional checks first; the long default-mode compile and the
    # small batch last, so a short deadline drops those (an H200 host needs ~8 min for all)
    timed(
        f"cudagraphs_b{big}",
        "cudagraphs",
        lambda: cudagraphs(
            runner.train(
                f"cudagraphs_b{big}",
                ["compile=true", "compiler.mode=reduce-overhead", f"batch_size={big}", *steps],
            ),
            big,
        ),
        cuda_only="compiler.mode=reduce-overhead (CUDA graphs)",
    )
    for dtype in ("fp16", "bf16"):
        name = f"amp_{dtype}_b{big}"
        timed(name, "amp", lambda d=dtype, n=name: throughput(
            runner.train(n, ["amp=true", f"amp_dtype={d}", f"batch_size={big}", *steps]), big))  # fmt: skip
    if "resume" in plan.groups:
        if gate.status != PASS or runner.left() < MIN_SECONDS["resume"]:
            reason = (
                "no time left"
                if gate.status == PASS
                else f"preflight is {gate.status} (see its row)"
            )
            found = {k: Check(SKIP, reason) for k in ("resume", "eval_sheet", "profiler")}
        else:
            found = resume_checks(runner, max(4, min(plan.steps, 8)), small)
        for name, check in found.items():
            checks[name] = check
            print(row(name, check), flush=True)
    gpu_ckpt = runner.out / "resume_base" / "checkpoints"
    newest = sorted(gpu_ckpt.glob("step_*.pt"))
    timed("cpu_resume", "cpu_resume", lambda: cpu_resume(
        runner, newest[-1] if newest else gpu_ckpt / "none", 4),
        cuda_only="resuming a GPU checkpoint on the cpu")  # fmt: skip
    timed(f"compile_b{big}", "compile", lambda: compiled(
        runner.train(f"compile_b{big}", ["compile=true", f"batch_size={big}", *steps]), big))  # fmt: skip
    for shape in ("fixed", "dynamic"):
        name = f"eager_{shape}_b{small}"
        timed(name, "eager", lambda s=shape, n=name: throughput(
            runner.train(n, [f"shape={s}", f"batch_size={small}", *steps]), small))  # fmt: skip
    two_gpus = info["gpus"] >= 2
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    timed(
        "torchrun_nccl",
        "torchrun",
        (lambda: throughput(runner.train(
            "torchrun_nccl", [f"batch_size={small}", *steps], launcher), small * 2))
        if two_gpus
        else (lambda: Check(SKIP, f"needs 2+ GPUs; {info['gpus']} visible")),
        cuda_only="nccl",
    )  # fmt: skip
    return checks


def row(name: str, check: Check) -> str:
    return f"| {name:<20} | {check.status:<4} | {check.figure} |"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--deadline-s", type=float, default=360.0, help="whole check (s)")
    parser.add_argument("--out", type=Path, default=None, help="folder (default outputs/gpu_check)")
    parser.add_argument("--steps", type=int, default=24, help="steps per timed run")
    parser.add_argument("--batches", default="64,24", help="large,small batch sizes")
    parser.add_argument("--workers", type=int, default=None, help="num_workers (default cores-2)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--checks", default=",".join(GROUPS), help=f"of: {','.join(GROUPS)}")
    args, overrides = parser.parse_known_args(argv)
    unknown = [o for o in overrides if o.startswith("--") or "=" not in o]
    groups = tuple(g.strip() for g in args.checks.split(",") if g.strip())
    bad = [g for g in groups if g not in GROUPS]
    if unknown or bad:
        parser.error(f"not a train.py override or check group: {' '.join(unknown + bad)}")
    start = time.monotonic()
    out = (args.out or REPO / "outputs" / "gpu_check").resolve()
    out.mkdir(parents=True, exist_ok=True)
    workers = args.workers if args.workers is not None else max(2, (os.cpu_count() or 4) - 2)
    big, small = (int(b) for b in args.batches.split(","))
    info = machine_info(args.device)
    info["num_workers"] = workers
    runner = Runner(out, start + args.deadline_s, args.device, overrides, workers)
    print(f"gpu_check: {args.device}, deadline {args.deadline_s:.0f} s, out {out}", flush=True)
    print("| check                | stat | figures |\n|---|---|---|", flush=True)
    checks = run_checks(runner, info, Plan(groups, args.steps, (big, small)))
    result = {
        "machine": info,
        "checks": {name: check.to_json() for name, check in checks.items()},
        "ratios": ratios(checks, big, small),
        "data": data_pressure(checks, workers),
        "overrides": overrides,
        "deadline_s": args.deadline_s,
        "elapsed_s": round(time.monotonic() - start, 1),
    }
    path = out / "gpu_check.json"
    path.write_text(json.dumps(result, indent=2))
    print("ratios: " + ", ".join(f"{k} {v}" for k, v in result["ratios"].items() if v))
    if result["data"].get("workers_needed"):
        d = result["data"]
        print(f"data: {d['data_wait_pct']:.1f}% wait with {workers} workers; "
              f"{d['workers_needed']} workers (cores) per GPU would feed it")  # fmt: skip
    print(f"gpu_check.json: {path} ({result['elapsed_s']:.0f} s)")
    return 1 if any(c.status == FAIL for c in checks.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
