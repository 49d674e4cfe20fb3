"""GPU check: every accelerator path of ssd-npu, run for real on this machine's GPU in minutes.

Usage:
    python scripts/gpu_check.py [--deadline-s 600] [--out DIR] [--steps 24] [--workers N]
        [--photos 4096] [--sustained-steps 200] [--checks sustained,eager,...]
        [any train.py override, passed on to every run]
    python scripts/gpu_check.py --merge A.json B.json [--merge-out gpu_check.json]
    python scripts/gpu_check.py --render docs/gpu_check.json [--write]
    python scripts/gpu_check.py --upgrade OLD.json --merge-out NEW.json

Each check is a real `train.py` run (a subprocess); the script reads what the run wrote
(summary.json, TensorBoard events, its log) and prints one row per check (PASS / WARN / FAIL /
SKIP and its figures), then writes gpu_check.json (the numbers: ssd_npu/tools/gpu_report.py):

    {"machine": {...}, "checks": {NAME: {"status": ..., "figure": {...}, "text": str}},
     "ratios": {...}, "overrides": [...], "deadline_s": s, "elapsed_s": s}

Checks (`--checks` takes the group names before the colon), the headline and the functional
ones first, so that a short deadline drops what matters least:
    preflight:   torch, torchvision, CUDA, the GPU, missing packages
    sustained:   (headline) torchvision eager and fixed + CUDA graphs + augmentation on the
                 device, on --photos N photo-sized JPEGs (written once, in parallel, kept in
                 outputs/photos_N; data.root=... uses yours instead), --sustained-steps steady
                 steps over several epochs, canvas = the model's (320x320 for ssdlite), cuDNN's
                 algorithm search on for both (device.cudnn_benchmark=true), the same workers
                 and amp: wall-clock and device img/s, data wait, host CPU, the cores per GPU
                 the device rate needs (bench_data.py on the same images and host)
    eager:       shape=fixed and shape=dynamic (torchvision's own path) at batch 64 (24 last)
    cudagraphs:  compile=true compiler.mode=reduce-overhead, batch 64: no "skipping cudagraphs"
    amp:         amp=true with fp16 and with bf16, batch 64
    resume:      a run checkpointed half-way and resumed (resume=...) from that checkpoint
                 in a new process, both with device.deterministic=true: the resumed losses
                 equal the uninterrupted run's; the same run also evaluates (COCO mAP + the
                 detection sheet) and writes a profiler trace
    cpu_resume:  the GPU checkpoint resumed with device=cpu, and resumed with compile=true
    compile:     compile=true, batch 64: 1 graph, 0 recompiles, graph breaks counted
    sustained (the rest): fixed + CUDA graphs with augmentation on the host, fixed eager
                 (host and device augmentation), torchvision eager with cuDNN's search off
    models:      ssd300_vgg16, retinanet_resnet50_fpn and fcos_resnet50_fpn (a few steps each)
    variants:    compiler.optimizer=true, amp with compile and with CUDA graphs, box-count
                 buckets under CUDA graphs, data.decode=reduced, scripts/bench.py device=cuda
    torchrun:    2 processes on nccl (SKIP with fewer than 2 GPUs)
Ratios (ssd_npu.tools.gpu_report.ratios): the headline `wall_fixed_graphs_vs_tv_eager`, the
sustained wall clock of fixed + CUDA graphs + device augmentation over torchvision eager's,
the same by device time (the ceiling), and the short runs' device-time ratios.

A check that has no time left before the deadline (--deadline-s from the start) is SKIP,
never a hang: each run is killed at the deadline. Without CUDA every check after preflight is
SKIP and the reason is said. Exit status: 1 if a check FAILed, else 0. `--device cpu` runs
the same checks on the CPU (the CUDA-only ones SKIP): that is how the tests exercise it.
`--merge` combines runs into one file, each check keeping where it came from; `--render`
prints (with `--write`: rewrites) the generated blocks of README.md and docs/bench.md.
"""

from __future__ import annotations

import os

os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")  # before torch (see ssd_npu)

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
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
sys.path.insert(0, str(REPO / "scripts"))

import torch  # noqa: E402

from ssd_npu.tools import gpu_report  # noqa: E402
from ssd_npu.tools.gpu_report import FAIL, PASS, SKIP, WARN, number  # noqa: E402

GROUPS = ("preflight", "sustained", "eager", "cudagraphs", "amp", "resume", "cpu_resume",
          "compile", "models", "variants", "torchrun")  # fmt: skip
PACKAGES = ("hydra", "omegaconf", "pycocotools", "tensorboard", "tqdm", "PIL", "numpy")
DATA_WAIT_TARGET_PCT = gpu_report.DATA_WAIT_TARGET_PCT
# Resumed losses must equal the uninterrupted run's: both runs use device.deterministic=true
# (deterministic kernels), so the same weights, batches and RNG states give the same bits.
# Without it, atomics in a few GPU backward kernels change the last bits from run to run and
# the SSD loss's hard-negative mining amplifies them to percent-level differences in 4 steps.
RESUME_RTOL = 1e-6
# Least seconds a check needs to be worth starting (a start of torch + CUDA + the data set is
# ~10 s; compiling the step ~1-2 minutes on a GPU host). Below that it is SKIP.
MIN_SECONDS = {"eager": 15, "compile": 60, "cudagraphs": 45, "amp": 15, "resume": 30,
               "cpu_resume": 20, "torchrun": 30, "sustained": 40, "models": 30,
               "variants": 45}  # fmt: skip
# The models' own canvas (320x320 for ssdlite), not the synthetic set's demo setting (224):
# what the docs' tables show. A canvas=... override of the user's still wins.
MODEL_CANVAS = "canvas=${model.canvas}"


@dataclass
class Run:
    """One train.py process: its folder, exit status (None: killed at the deadline), log."""

    name: str
    folder: Path
    returncode: int | None
    wall_s: float
    log: str
    cpu_s: float | None = None  # CPU seconds of the run and its workers (Runner.train)

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
    """One printed row: status, its one-line text, and the numbers behind it (`figure`, an
    object in gpu_check.json)."""

    status: str
    text: str
    figure: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"status": self.status, "figure": self.figure, "text": self.text}


class Runner:
    """Starts train.py runs with the shared overrides, each bounded by the deadline."""

    def __init__(self, out: Path, deadline: float, device: str, overrides: list[str], workers: int):
        self.out, self.deadline, self.device = out, deadline, device
        self.overrides, self.workers = overrides, workers

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def train(
        self,
        name: str,
        overrides: list[str],
        launcher: list[str] | None = None,
        script: str = "train.py",
        final: list[str] | None = None,
    ) -> Run:
        """Run `script` (train.py; or `launcher` + it) into <out>/<name>, killed at the deadline.
        The user's overrides win over `overrides`, `final` over both. The run's CPU seconds,
        its DataLoader workers' included, go to Run.cpu_s."""
        folder = self.out / name
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        words = merge_overrides(
            [
                f"device={self.device}",
                "eval=false",
                "eval_every=0",  # the synthetic schedule evaluates every 4 epochs: not timed
                f"num_workers={self.workers}",
                MODEL_CANVAS,
            ],
            overrides,
            self.overrides,  # the user's overrides win
            final or [],
        )
        args = [
            *(launcher or [sys.executable]), str(REPO / script), *words,
            f"hydra.run.dir={folder}",
        ]  # fmt: skip
        env = dict(os.environ, PYTHONUNBUFFERED="1", TORCH_LOGS="perf_hints")
        start, cpu = time.monotonic(), _children_cpu_s()
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
        run = Run(name, folder, returncode, time.monotonic() - start, text)
        run.cpu_s = _children_cpu_s() - cpu
        return run


def _children_cpu_s() -> float:
    """User + system CPU seconds of this process's finished children and of theirs (the
    DataLoader workers a run waits for), so far."""
    use = resource.getrusage(resource.RUSAGE_CHILDREN)
    return use.ru_utime + use.ru_stime


def merge_overrides(*layers: list[str]) -> list[str]:
    """key=value words, a later layer's value replacing an earlier one's for the same key
    (Hydra refuses a key given twice)."""
    merged: dict[str, str] = {}
    for layer in layers:
        for word in layer:
            merged[word.split("=", 1)[0]] = word
    return list(merged.values())


def override(overrides: list[str], key: str, default: str | None = None) -> str | None:
    """The value the user's overrides give `key`, else `default`."""
    found = [w.split("=", 1)[1] for w in overrides if w.split("=", 1)[0] == key]
    return found[-1] if found else default


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
    """Steady img/s by device time and by the wall clock, and the data wait share, of a
    short run (the functional checks: the sustained ones are `sustained`)."""
    if not run.ok:
        return _failed(run)
    s = run.summary
    figure = {
        "batch_size": batch,
        "device_images_per_s": s.get("steady_images_per_s"),
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
    f = figure
    text = (
        f"{number(f['device_images_per_s'])} img/s device, {number(f['wall_images_per_s'])} wall, "
        f"data wait {number(f['data_wait_pct'])}%, step {number(f['steady_step_ms'])} ms, "
        f"first {number(f['first_step_ms'])} ms"
    )
    if f["final_loss"] is None or not math.isfinite(f["final_loss"]):
        return Check(FAIL, f"loss not finite ({f['final_loss']}); {text}", figure)
    wait = f["data_wait_pct"]
    if wait is not None and wait > DATA_WAIT_TARGET_PCT:
        return Check(WARN, f"{text} (data wait above {DATA_WAIT_TARGET_PCT:.0f}%)", figure)
    return Check(PASS, text, figure)


def compiled(run: Run, batch: int, graphs: int = 1) -> Check:
    """compile=true: one graph and no recompile (graph breaks counted, not failed); with
    `graphs` box-count buckets, one graph per bucket the data reached (1 to `graphs`), each
    after the first a recompile."""
    check = throughput(run, batch)
    if check.status == FAIL or not run.ok:
        return check
    f = check.figure
    text = (
        f"{f['graphs_compiled']} graph(s), {f['recompiles']} recompiles, "
        f"{f['graph_breaks']} graph breaks; {check.text}"
    )
    if (f["recompiles"] or 0) > graphs - 1:  # a bucket after the first is a recompile
        return Check(FAIL, text, f)
    if not 1 <= (f["graphs_compiled"] or 0) <= graphs:
        return Check(WARN, text, f)
    return Check(check.status, text, f)


def cudagraphs(run: Run, batch: int, graphs: int = 1) -> Check:
    """reduce-overhead: the step replayed as CUDA graphs, none skipped (inductor's own log)."""
    check = compiled(run, batch, graphs)
    if check.status == FAIL or not run.ok:
        return check
    skips = run.summary.get("cudagraph_skips") or 0
    logged = [line.strip() for line in run.log.splitlines() if "skipping cudagraphs" in line]
    check.figure["cudagraph_skips"] = skips
    if skips or logged:
        reason = logged[0][:200] if logged else f"{skips} skips counted"
        return Check(WARN, f"CUDA graphs skipped: {reason}; {check.text}", check.figure)
    return check


def _failed(run: Run) -> Check:
    if run.returncode is None:
        return Check(SKIP, f"stopped at the deadline after {run.wall_s:.0f} s (no time left)")
    return Check(FAIL, f"exit {run.returncode}: {run.error()} (log: {run.folder / 'log.txt'})")


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
        [f"batch_size={batch}", f"max_steps={steps}", f"resume={ckpt}",
         "device.deterministic=true"],
    )  # fmt: skip
    if not resumed.ok:
        checks["resume"] = _failed(resumed)
        return checks
    whole, again = losses_by_step(base.folder), losses_by_step(resumed.folder)
    common = sorted(set(whole) & set(again))
    if not common or min(common) != half + 1:
        checks["resume"] = Check(FAIL, f"resumed steps {sorted(again)} do not follow step {half}")
        return checks
    diffs = [abs(again[s] - whole[s]) / max(abs(whole[s]), 1e-12) for s in common]
    figure = {"resumed_from": half, "steps_compared": common, "max_rel_diff": max(diffs),
              "first_step_rel_diff": diffs[0], "checkpoint": str(ckpt)}  # fmt: skip
    text = (
        f"steps {common[0]}-{common[-1]} after resume at {half}: loss rel. diff "
        f"max {max(diffs):.1e} (first step {diffs[0]:.1e})"
    )
    checks["resume"] = Check(PASS if max(diffs) <= RESUME_RTOL else WARN, text, figure)
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


def resume_from(
    runner: Runner, name: str, checkpoint: Path, batch: int, steps: int, words: list[str]
) -> tuple[Run, int] | Check:
    """A run of `name` resuming `checkpoint` for `steps` more steps (`words` on top): the run
    and the checkpoint's step, or a SKIP when the checkpoint was never written."""
    if not checkpoint.is_file():
        return Check(SKIP, "no checkpoint (the resume check did not run)")
    step = int(checkpoint.stem.split("_")[1])
    args = [f"batch_size={batch}", f"resume={checkpoint}", f"max_steps={step + steps}", *words]
    return runner.train(name, args), step


def cpu_resume(runner: Runner, gpu_checkpoint: Path, batch: int) -> Check:
    """The GPU run's checkpoint, resumed by a device=cpu process for 1 step."""
    found = resume_from(runner, "cpu_resume", gpu_checkpoint, batch, 1,
                        ["device=cpu", "num_workers=2"])  # fmt: skip
    if isinstance(found, Check):
        return found
    run, step = found
    if not run.ok:
        return _failed(run)
    s = run.summary
    if s.get("device") != "cpu" or s.get("global_step") != step + 1:
        return Check(FAIL, f"device {s.get('device')}, global step {s.get('global_step')}")
    return Check(PASS, f"resumed step {step} on cpu, loss {s.get('final_loss'):.3f}", s)


def resume_compiled(runner: Runner, checkpoint: Path, batch: int, steps: int) -> Check:
    """The resume check's eager checkpoint, resumed by a compile=true process: it goes on
    from the next step, in one graph, with a finite loss (compiled and eager kernels differ
    in float order, so the losses are not compared bit for bit)."""
    found = resume_from(runner, "resume_compiled", checkpoint, batch, steps, ["compile=true"])
    if isinstance(found, Check):
        return found
    run, step = found
    check = compiled(run, batch)
    if check.status in (FAIL, SKIP) or not run.ok:
        return check
    resumed = sorted(losses_by_step(run.folder))
    check.figure.update({"resumed_from": step, "steps": resumed})
    if not resumed or resumed[0] != step + 1:
        return Check(FAIL, f"resumed steps {resumed} do not follow step {step}", check.figure)
    return Check(check.status, f"resumed at {step}, steps {resumed[0]}-{resumed[-1]}; "
                 f"{check.text}", check.figure)  # fmt: skip


def bench_cuda(runner: Runner, batch: int, steps: int) -> Check:
    """scripts/bench.py on this device: the eager variants side by side in one process."""
    run = runner.train(
        "bench_cuda",
        [f"batch_size={batch}", f"bench.steps={steps}", "bench.repeats=1",
         "bench.variants=[tv_eager,fixed_eager]"],
        script="scripts/bench.py",
    )  # fmt: skip
    if not run.ok:
        return _failed(run)
    path = run.folder / "bench.json"
    found = json.loads(path.read_text()) if path.is_file() else {}
    rates = {name: r.get("images_per_s") for name, r in found.get("runs", {}).items()}
    if not rates or not all(rates.values()):
        return Check(FAIL, f"bench.json has no steady img/s for every variant: {rates}")
    text = ", ".join(f"{n} {number(v)} img/s" for n, v in rates.items())
    return Check(PASS, text, {"images_per_s": rates, "bench_json": str(path)})


class SustainedData:
    """The sustained checks' images and the host's rate per core on them, made on first use.

    Photo-sized JPEGs (scripts/make_photo_coco.py: COCO's sizes, about 640x480, 100-200 KB)
    so that decoding costs what COCO's does; --photos N of them, written in parallel once
    into outputs/photos_N and kept (a manifest written last marks a complete set). A
    data.root=... of the user's is used as it is instead. The per-core rates come from
    scripts/bench_data.py run once on the same images on this host (one thread, no loader).
    """

    def __init__(self, runner: Runner, photos: int, photos_dir: Path, bench_images: int,
                 bench_repeats: int) -> None:  # fmt: skip
        self.runner, self.photos, self.photos_dir = runner, photos, photos_dir
        self.bench_images, self.bench_repeats = bench_images, bench_repeats
        self.user_root = override(runner.overrides, "data.root")
        self._root: Path | None = None
        self._rates: dict | None = None
        self.written = False

    @property
    def root(self) -> Path:
        if self._root is None:
            if self.user_root:
                self._root = Path(self.user_root)
            else:
                from make_photo_coco import ensure_photo_coco

                start = time.monotonic()
                self._root, self.written = ensure_photo_coco(
                    self.photos_dir, self.photos, num_val=min(24, self.photos)
                )
                done = f"written in {time.monotonic() - start:.0f} s" if self.written else "kept"
                print(f"photo set: {self._root} ({self.photos} train images, {done})", flush=True)
        return self._root

    def overrides(self) -> list[str]:
        if self.user_root:
            return []  # the user's data=..., data.root=... and data.num_classes=... apply
        return ["data=coco", f"data.root={self.root}", "data.num_classes=91"]

    @property
    def train_images(self) -> int | None:
        split = override(self.runner.overrides, "data.train_split", "train2017")
        path = self.root / "annotations" / f"instances_{split}.json"
        return len(json.loads(path.read_text())["images"]) if path.is_file() else None

    def images_per_s_per_core(self, variant: str) -> float | None:
        """bench_data.py's img/s per core of `variant` on these images (None: not measured)."""
        if self._rates is None:
            self._rates = {}
            if self.bench_images > 0:
                run = self.runner.train(
                    "bench_data",
                    [*self.overrides(), f"--images={self.bench_images}",
                     f"--repeats={self.bench_repeats}", "--workers=0"],
                    script="scripts/bench_data.py",
                )  # fmt: skip
                path = run.folder / "bench_data.json"
                if run.ok and path.is_file():
                    self._rates = json.loads(path.read_text())["variants"]
        return (self._rates.get(variant) or {}).get("images_per_s_per_core")


def sustained(
    runner: Runner,
    data: SustainedData,
    name: str,
    overrides: list[str],
    steady: int,
    batch: int,
    benchmark: bool = True,
) -> Check:
    """A run of `steady` steady steps (warm-up on top) over as many epochs as they take on
    `data`'s images, cuDNN's algorithm search (`benchmark`: device.cudnn_benchmark) set alike for every path; its
    figure: ssd_npu.tools.gpu_report.sustained_figure."""
    train_images = data.train_images
    per_epoch = max(1, (train_images or batch) // batch)
    # warm-up: 1-2 steps eager, the compile and CUDA graph recording steps; 5 more is ample
    steps = steady + 5
    words = [*data.overrides(), f"batch_size={batch}", f"max_steps={steps}",
             f"epochs={math.ceil(steps / per_epoch) + 1}",
             f"device.cudnn_benchmark={str(benchmark).lower()}", *overrides]  # fmt: skip
    shape = override(words, "shape", "fixed")
    where = override(words, "data.augment_on", "auto")
    fit = override(runner.overrides, "fit", "stretch")
    kind = "tv" if shape == "dynamic" else "device" if where == "device" else "host"
    variant = gpu_report.BENCH_VARIANT[kind].format(fit=fit)
    per_core = data.images_per_s_per_core(variant)
    run = runner.train(name, words)
    if not run.ok:
        return _failed(run)
    figure = gpu_report.sustained_figure(
        run.summary, train_images=train_images, wall_s=run.wall_s, cpu_s=run.cpu_s,
        images_per_s_per_core=per_core,
    )  # fmt: skip
    figure.update({"bench_variant": variant, "cudnn_benchmark": benchmark,
                   "data_root": str(data.root), "overrides": words})  # fmt: skip
    status, text = gpu_report.sustained_verdict(figure, steady)
    return Check(status, text, figure)


@dataclass
class Plan:
    """Which groups run, with what steps and batches."""

    groups: tuple[str, ...]
    steps: int
    batches: tuple[int, int]  # (large, small): 64 and 24 by default
    sustained_steps: int = 200


def run_checks(runner: Runner, info: dict, plan: Plan, data: SustainedData) -> dict[str, Check]:
    checks: dict[str, Check] = {}
    big, small = plan.batches
    on_cuda = runner.device == "cuda"
    gate = preflight(info)
    checks["preflight"] = gate
    why = gate.text.split(" (")[0].split(":")[0]  # e.g. "no CUDA GPU visible"
    print(row("preflight", gate), flush=True)

    def timed(name: str, group: str, make: Callable[[], Check], cuda_only: str = "") -> None:
        if group not in plan.groups:
            return
        if gate.status != PASS:
            checks[name] = Check(SKIP, f"preflight is {gate.status}: {why}")
        elif cuda_only and not on_cuda:
            checks[name] = Check(SKIP, f"{cuda_only} needs device=cuda")
        elif runner.left() < MIN_SECONDS[group]:
            checks[name] = Check(SKIP, f"no time left ({runner.left():.0f} s before the deadline)")
        else:
            checks[name] = make()
        print(row(name, checks[name]), flush=True)

    def sustain(name: str, words: list[str], cuda_only: str = "", benchmark: bool = True):
        timed(name, "sustained", lambda: sustained(
            runner, data, name, words, plan.sustained_steps, big, benchmark), cuda_only)  # fmt: skip

    def train(name: str, group: str, words: list[str], judge=throughput, cuda_only: str = "",
              batch: int = big, final: list[str] | None = None, **kw) -> None:  # fmt: skip
        timed(name, group, lambda: judge(runner.train(
            name, [f"batch_size={batch}", *steps, *words], final=final), batch, **kw),
            cuda_only)  # fmt: skip

    graphs = ["compile=true", "compiler.mode=reduce-overhead"]
    cuda_graphs = "compiler.mode=reduce-overhead (CUDA graphs)"
    host, device = ["data.augment_on=host"], ["data.augment_on=device"]
    steps = [f"max_steps={plan.steps}"]
    # the headline pair first: torchvision eager and fixed + CUDA graphs + device augmentation
    sustain("sustained_tv_eager", ["shape=dynamic", *host])
    sustain("sustained_fixed_graphs_device", [*graphs, *device], cuda_graphs)
    for shape in ("fixed", "dynamic"):
        train(f"eager_{shape}_b{big}", "eager", [f"shape={shape}"])
    # the functional checks next; the long default-mode compile and the rest after them
    train(f"cudagraphs_b{big}", "cudagraphs", graphs, cudagraphs, cuda_graphs)
    for dtype in ("fp16", "bf16"):
        train(f"amp_{dtype}_b{big}", "amp", ["amp=true", f"amp_dtype={dtype}"])
    if "resume" in plan.groups:
        if gate.status != PASS or runner.left() < MIN_SECONDS["resume"]:
            reason = "no time left" if gate.status == PASS else f"preflight is {gate.status}: {why}"
            found = {k: Check(SKIP, reason) for k in ("resume", "eval_sheet", "profiler")}
        else:
            found = resume_checks(runner, max(4, min(plan.steps, 8)), small)
        for name, check in found.items():
            checks[name] = check
            print(row(name, check), flush=True)
    newest = sorted((runner.out / "resume_base" / "checkpoints").glob("step_*.pt"))
    ckpt = newest[-1] if newest else runner.out / "resume_base" / "none"
    timed("cpu_resume", "cpu_resume", lambda: cpu_resume(runner, ckpt, 4),
          cuda_only="resuming a GPU checkpoint on the cpu")  # fmt: skip
    timed("resume_compiled", "compile", lambda: resume_compiled(runner, ckpt, small, 4))
    train(f"compile_b{big}", "compile", ["compile=true"], compiled)
    # the sustained rest: CUDA graphs with host augmentation, fixed eager, cuDNN search off
    sustain("sustained_fixed_graphs", [*graphs, *host], cuda_graphs)
    sustain("sustained_fixed_eager", host)
    sustain("sustained_fixed_eager_device", device)
    sustain("sustained_tv_eager_nobench", ["shape=dynamic", *host], "cuDNN", benchmark=False)
    # what has never run on a GPU: the other models, then the other options
    # each model on its own canvas (ssd300's anchors allow only 300x300), whatever the user's
    train("model_ssd300", "models", ["model=ssd300_vgg16"], batch=small, final=[MODEL_CANVAS])
    train("model_retinanet", "models", ["model=retinanet_resnet50_fpn"], batch=8,
          final=[MODEL_CANVAS])  # fmt: skip
    train("model_fcos", "models", ["model=fcos_resnet50_fpn"], batch=8, final=[MODEL_CANVAS])
    # the optimizer step compiles as a second graph of the same training step
    train("compiler_optimizer", "variants", ["compile=true", "compiler.optimizer=true"], compiled,
          graphs=2)  # fmt: skip
    train("amp_compile", "variants", ["amp=true", "compile=true"], compiled)
    train("amp_cudagraphs", "variants", ["amp=true", *graphs], cudagraphs, cuda_graphs)
    train("buckets_cudagraphs", "variants", ["max_boxes=[16,32,64]", *graphs], cudagraphs,
          cuda_graphs, graphs=3)  # fmt: skip
    train("decode_reduced", "variants", ["data.decode=reduced", *host])
    timed("bench_cuda", "variants", lambda: bench_cuda(runner, big, plan.steps),
          cuda_only="scripts/bench.py device=cuda")  # fmt: skip
    for shape in ("fixed", "dynamic") if small != big else ():  # (--batches 2,2: ran above)
        train(f"eager_{shape}_b{small}", "eager", [f"shape={shape}"], batch=small)
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
    return f"| {name:<29} | {check.status:<4} | {check.text} |"


DOCS = (REPO / "README.md", REPO / "docs" / "bench.md")


def render(path: Path, write: bool) -> int:
    """Print the docs' generated blocks from gpu_check.json at `path`; `write`: rewrite them
    in README.md and docs/bench.md. Exit status 1 when the docs differ and were not written."""
    result = json.loads(path.read_text())
    readme, bench = (p.read_text() for p in DOCS)
    new = gpu_report.render_docs(result, readme, bench)
    print(gpu_report.render_headline(result) + "\n\n" + gpu_report.render_table(result))
    stale = [p for p, old, text in zip(DOCS, (readme, bench), new, strict=True) if old != text]
    if write:
        for p, text in zip(DOCS, new, strict=True):
            p.write_text(text)
        print("rewrote: " + (", ".join(str(p.relative_to(REPO)) for p in stale) or "nothing"))
        return 0
    if stale:
        print("differ from the render (--write rewrites them): " + ", ".join(map(str, stale)))
    return 1 if stale else 0


def combine(files: list[Path], out: Path, upgrade: bool = False) -> int:
    """--merge (several runs into one file, with their provenance) or --upgrade (a file from
    before the contract into its form, numbers unchanged); writes `out`."""
    loaded = [(str(f), json.loads(f.read_text())) for f in files]
    if upgrade:
        (label, old), = loaded  # fmt: skip
        result = gpu_report.upgrade_legacy(
            old, f"{Path(label).name}, hand-merged {old.get('date')}"
        )
    else:
        result = gpu_report.merge(loaded)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"gpu_check.json: {out} ({len(result['checks'])} checks from {len(files)} file(s))")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--deadline-s", type=float, default=600.0, help="whole check (s)")
    parser.add_argument("--out", type=Path, default=None, help="folder (default outputs/gpu_check)")
    parser.add_argument("--steps", type=int, default=24, help="steps per functional run")
    parser.add_argument("--batches", default="64,24", help="large,small batch sizes")
    parser.add_argument("--workers", type=int, default=None, help="num_workers (default cores-2)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--checks", default=",".join(GROUPS), help=f"of: {','.join(GROUPS)}")
    parser.add_argument("--photos", type=int, default=4096, help="train JPEGs (~640x480) written"
                        " for the sustained checks (kept in --photos-dir)")  # fmt: skip
    parser.add_argument("--photos-dir", type=Path, default=None,
                        help="default outputs/photos_<N>")  # fmt: skip
    parser.add_argument("--sustained-steps", type=int, default=200, help="steady steps per run")
    parser.add_argument("--bench-images", type=int, default=60,
                        help="images bench_data.py times for cores_needed (0: not measured)")  # fmt: skip
    parser.add_argument("--bench-repeats", type=int, default=2)
    parser.add_argument("--merge", type=Path, nargs="+", help="gpu_check.json files to combine")
    parser.add_argument("--upgrade", type=Path, help="a gpu_check.json from before the contract")
    parser.add_argument("--merge-out", type=Path, help="--merge/--upgrade's file")
    parser.add_argument("--render", type=Path, help="a gpu_check.json: the docs' blocks from it")
    parser.add_argument("--write", action="store_true", help="--render rewrites the docs")
    args, overrides = parser.parse_known_args(argv)
    unknown = [o for o in overrides if o.startswith("--") or "=" not in o]
    groups = tuple(g.strip() for g in args.checks.split(",") if g.strip())
    bad = [g for g in groups if g not in GROUPS]
    if unknown or bad:
        parser.error(f"not a train.py override or check group: {' '.join(unknown + bad)}")
    out = (args.out or REPO / "outputs" / "gpu_check").resolve()
    if args.render:
        return render(args.render, args.write)
    if args.merge or args.upgrade:
        files = args.merge or [args.upgrade]
        return combine(files, args.merge_out or out / "gpu_check.json", bool(args.upgrade))
    start = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    workers = args.workers if args.workers is not None else max(2, (os.cpu_count() or 4) - 2)
    big, small = (int(b) for b in args.batches.split(","))
    info = machine_info(args.device)
    info["num_workers"] = workers
    runner = Runner(out, start + args.deadline_s, args.device, overrides, workers)
    photos_dir = args.photos_dir or REPO / "outputs" / f"photos_{args.photos}"
    data = SustainedData(runner, args.photos, photos_dir.resolve(), args.bench_images,
                         args.bench_repeats)  # fmt: skip
    print(f"gpu_check: {args.device}, deadline {args.deadline_s:.0f} s, out {out}", flush=True)
    print(f"| {'check':<29} | stat | figures |\n|---|---|---|", flush=True)
    plan = Plan(groups, args.steps, (big, small), args.sustained_steps)
    checks = run_checks(runner, info, plan, data)
    if data._root is not None:
        info["sustained_data"] = {"root": str(data.root), "train_images": data.train_images,
                                  "written_now": data.written}  # fmt: skip
    jsoned = {name: check.to_json() for name, check in checks.items()}
    result = {
        "machine": info,
        "checks": jsoned,
        "ratios": gpu_report.ratios(jsoned, big, small),
        "overrides": overrides,
        "deadline_s": args.deadline_s,
        "elapsed_s": round(time.monotonic() - start, 1),
    }
    path = out / "gpu_check.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print("ratios: " + ", ".join(f"{k} {v}" for k, v in result["ratios"].items() if v))
    head = jsoned.get("sustained_fixed_graphs_device", {}).get("figure") or {}
    if head.get("wall_images_per_s"):
        # the targets for one H100 / H200 at batch 64 (other GPUs: for reference)
        print(f"headline: {head['wall_images_per_s']:.0f} img/s wall (target >= 3000), "
              f"{result['ratios'][gpu_report.HEADLINE] or '-'}x torchvision eager (target >= 7), "
              f"data wait {head['data_wait_pct']}% (target < 5)")  # fmt: skip
    print(f"gpu_check.json: {path} ({result['elapsed_s']:.0f} s)")
    return 1 if any(c.status == FAIL for c in checks.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
