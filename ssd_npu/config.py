"""Config schemas (Hydra structured configs) and the checks Hydra's types cannot express.

The schemas are registered in Hydra's ConfigStore so that an unknown key fails at start
(`Key 'foo' is not in struct`). `validate` adds the value checks (allowed names, positive
sizes) and raises `ConfigError` with one message that names the key; `train.py` prints
that message and exits with status 2 instead of a traceback.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import ListConfig

from ssd_npu.choices import (  # the allowed values, each listed once
    AMP_DTYPES,
    AUGMENT_ON,
    COCO_ENGINES,
    COMPILE_MODES,
    DATASETS,
    DECODES,
    DEVICES,
    FITS,
    NPU_COMPILE_BACKENDS,
    ON_BAD_IMAGE,
    POSTPROCESS,
    SHAPES,
    TARGET_METRICS,
)
from ssd_npu.errors import ConfigError
from ssd_npu.models.specs import DEFAULT_MODEL, MODELS

# The canvas rule is the model's own (ssd_npu/models/specs.py): ssdlite, RetinaNet and FCOS take
# sides >= 64 divisible by 32; ssd300_vgg16 takes exactly [300, 300].


@dataclass
class DeviceConfig:
    name: str = "auto"  # auto | cpu | cuda | npu
    index: int | None = None  # device index; None: LOCAL_RANK under torchrun, else 0
    jit_compile: bool = False  # npu only: torch.npu.set_compile_mode(jit_compile=...)
    # weights stored channels-last (faster convolutions); None: on for fp32 on cpu only; not on npu
    channels_last: bool | None = None
    # bit-identical runs and resumes on cuda (deterministic kernels, no cuDNN autotuning): slower
    deterministic: bool = False
    # cuDNN's algorithm search (torch.backends.cudnn.benchmark); None: on for shape=fixed on
    # cuda only. true also for shape=dynamic when its images share one size (ssdlite's 320x320)
    cudnn_benchmark: bool | None = None


@dataclass
class SyntheticConfig:
    num_train: int = 256
    num_val: int = 48
    seed: int = 0


@dataclass
class DataConfig:
    name: str = "synthetic"  # synthetic | coco
    root: str | None = None  # COCO root; for synthetic None means the cache folder
    num_classes: int = 6  # including background (label 0); COCO: 91
    train_split: str = "train2017"
    val_split: str = "val2017"
    on_bad_image: str = "fail"  # fail | skip
    # exact: full decode, torchvision's pixels; reduced: JPEG decoded at 1/2-1/8 scale when
    # the canvas is much smaller, uint8 resize and uint8 canvases (fixed shape only); device:
    # the workers read the JPEG bytes, the device decodes the batch (data.augment_on=device)
    decode: str = "exact"
    # where the augmentation and the fit to the canvas run (fixed shape only): host (workers);
    # device (workers only decode into `slot`, the step crops, flips and fits the batch);
    # auto: device on cuda/npu, host on cpu
    augment_on: str = "auto"
    # [Hs, Ws] px of the uint8 slot a worker places each image in with augment_on=device
    # (larger images are scaled down on the host); 640x640 fits COCO's 640 px long side in
    # either orientation
    slot: list[int] = field(default_factory=lambda: [640, 640])
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class OptimConfig:
    # SGD, momentum 0.9, cosine. `lr: null` scales the recipe's lr (base_lr at global batch
    # base_batch) linearly to the global batch. base_lr, base_batch, weight_decay null: the
    # model's torchvision recipe (ssd_npu/models/specs.py; ssdlite320: 0.15 at 192, 4e-5)
    lr: float | None = None
    base_lr: float | None = None
    base_batch: int | None = None
    momentum: float = 0.9
    weight_decay: float | None = None
    warmup_steps: int = 20
    warmup_factor: float = 0.001
    # decay in (0, 1) per optimizer step: evaluate an exponential moving average of the
    # weights and buffers (ssd_npu/engine/ema.py; saved in checkpoints); None: the trained weights
    ema: float | None = None
    # with optim.ema: average BatchNorm's running statistics too (timm, YOLO); false: they
    # follow the trained model (averaged ones fail on the demo: docs/demo.md)
    ema_buffers: bool = False


@dataclass
class AuditConfig:
    steps: int = 6  # training steps recorded by scripts/audit_shapes.py
    out: str | None = None  # report path; None: <out_dir>/dynamic_shapes.json
    fail_on_dynamic: bool = False  # exit 1 when a dynamic op or in-step host sync is found
    # train: the training step; eval: the evaluation forward as eval.postprocess places it
    target: str = "train"


@dataclass
class CompilerConfig:
    # `compile` stays a plain bool (a public contract); compile options live here.
    # None: inductor on every device (on npu with triton-ascend); npu: torch_npu's torchair GE
    backend: str | None = None
    fail_on_recompile: bool = False  # error (naming the changed tensor) on a recompile after step 1
    # dynamo's recompile limit per code object; None: torch's default (8)
    recompile_limit: int | None = None
    # torch.compile(mode=...), inductor only: default | reduce-overhead (CUDA graphs) |
    # max-autotune | max-autotune-no-cudagraphs; None: torch's default
    mode: str | None = None
    # compile the optimizer step too (torch's compiled optimizer, lr as a tensor); compile=true
    optimizer: bool = False


@dataclass
class BenchConfig:
    steps: int = 30  # training steps per variant in scripts/bench.py
    repeats: int = 3  # rounds of every variant in scripts/bench.py, in alternating order
    variants: list[str] | None = None  # scripts/bench.py's variants to run; None: all
    out: str | None = None  # bench.json path; None: <out_dir>/bench.json (bench_eval.json)
    eval_rounds: int = 5  # timed passes over the val set per variant in scripts/bench_eval.py
    # > 0: bench_eval.py times a generated COCO-val-sized result instead (this many images,
    # eval_per_image detections each): records, COCOeval per engine, synchronous vs background
    eval_images: int = 0
    eval_per_image: int = 100


@dataclass
class ReportConfig:
    out: str | None = None  # data_report.json path; None: <out_dir>/data_report.json
    png: bool = False  # also write histograms (needs matplotlib)


@dataclass
class ShowConfig:
    # eval/detections in TensorBoard and scripts/show_detections.py
    # (ssd_npu/evaluation/detections.py)
    out: str | None = None  # PNG path of show_detections.py; None: <out_dir>/detections.png
    images: int = 6  # the first N val images (by image id)
    score: float = 0.3  # predictions drawn: score >= this
    height: int = 256  # pixels per picture (aspect kept)


@dataclass
class EvalConfig:
    # `eval=true|false` on the command line is kept as a short form of eval.enabled
    enabled: bool = True  # COCO evaluation at the end of training (and every eval_every epochs)
    postprocess: str = "auto"  # auto | device | host (the fixed path; see POSTPROCESS)
    coco: str = "faster"  # COCOeval engine: faster (faster-coco-eval) | pycocotools
    # true: COCOeval in a side process while training goes on (ssd_npu/evaluation/background.py)
    background: bool = False
    # stop training at the first evaluation whose `target_metric` is >= this; null: never
    target_map: float | None = None
    target_metric: str = "mAP"  # mAP (AP@[.5:.95]) | mAP50 (AP@.5)
    # false: only record when the target is reached (summary.json eval.target), train on
    target_stop: bool = True


@dataclass
class ConvergeConfig:
    # scripts/converge.py: a whole run per path (fixed, dynamic) and seed
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    out: str | None = None  # converge.json path; None: <out_dir>/converge.json
    # what the paired runs differ in: shape (fixed vs dynamic) | augment_on (device vs host)
    compare: str = "shape"
    jobs: int = 1  # runs trained at once, each in its own process (1: in this process)
    threads: int | None = None  # torch threads per run; None: the cores // jobs
    # stop adding seeds once the paired mAP50 95% interval's half-width is at most this (after
    # min_seeds seeds; seeds past the listed ones continue the sequence), or at max_seeds;
    # None: run the listed seeds
    target_halfwidth: float | None = None
    min_seeds: int = 3
    max_seeds: int = 24


@dataclass
class ModelConfig:
    # configs/model/<name>.yaml; the names and canvas rules: ssd_npu/models/specs.py
    name: str = DEFAULT_MODEL
    canvas: list[int] = field(default_factory=lambda: [320, 320])  # the model's default [H, W]


@dataclass
class TrainConfig:
    device: DeviceConfig = field(default_factory=DeviceConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    # [H, W] pixels; not given: the model's own default canvas (model.canvas)
    canvas: list[int] = "${model.canvas}"  # type: ignore[assignment]
    # one int, or sorted distinct ints: box-count buckets (ssd_npu/data/buckets.py)
    max_boxes: Any = 32
    fit: str = "stretch"  # stretch | letterbox | pad
    pad_value: float = 0.0  # fill for letterbox/pad, in [0, 1] image units
    shape: str = "fixed"  # fixed | dynamic
    compile: bool = False
    batch_size: int = 8
    epochs: int = 4
    max_steps: int | None = None
    seed: int = 0
    num_workers: int = 2
    amp: bool = False
    # bf16 | fp16; None: bf16 on cpu, fp16 on cuda, bf16 on npu where it has it (910B on)
    amp_dtype: str | None = None
    sync_bn: bool = False  # under torchrun: BatchNorm statistics over the global batch
    # under torchrun: minutes a rank waits in a collective (e.g. while rank 0 runs COCOeval)
    dist_timeout_min: int = 30
    profile_steps: int = 0  # >0: profiler trace of that many steps into <run>/profile
    augment: bool = True
    weights: str | None = None
    eval: EvalConfig = field(default_factory=EvalConfig)
    eval_every: int = 0  # epochs between evaluations; 0: only at the end
    eval_only: bool = False  # evaluate `weights` without training
    checkpoint_every: int = 0  # optimizer steps between checkpoints; 0: at the end (and on stop)
    keep_checkpoints: int = 3  # newest checkpoints kept in <run>/checkpoints
    resume: str | None = None  # auto (newest in <run>/checkpoints) or a checkpoint path
    out_dir: str | None = None  # None: Hydra's run dir (train.py fills it in)
    compiler: CompilerConfig = field(default_factory=CompilerConfig)
    show: ShowConfig = field(default_factory=ShowConfig)


# The scripts' configs: train.py's, plus each script's own section (configs/<name>.yaml), so
# `python train.py audit.steps=3` is an unknown key and each script's keys live with it.
@dataclass
class AuditRunConfig(TrainConfig):
    audit: AuditConfig = field(default_factory=AuditConfig)  # scripts/audit_shapes.py


@dataclass
class BenchRunConfig(TrainConfig):
    bench: BenchConfig = field(default_factory=BenchConfig)  # scripts/bench.py, bench_eval.py


@dataclass
class ReportRunConfig(TrainConfig):
    report: ReportConfig = field(default_factory=ReportConfig)  # scripts/data_report.py


@dataclass
class ConvergeRunConfig(TrainConfig):
    converge: ConvergeConfig = field(default_factory=ConvergeConfig)  # scripts/converge.py


SCRIPT_SCHEMAS: dict[str, type[TrainConfig]] = {
    "audit": AuditRunConfig,
    "bench": BenchRunConfig,
    "report": ReportRunConfig,
    "converge": ConvergeRunConfig,
}


def config_dir() -> str:
    """The Hydra config folder: the checkout's `configs/`, or `ssd_npu/configs` once installed
    (pyproject ships configs/ inside the package)."""
    here = Path(__file__).resolve().parent
    for folder in (here / "configs", here.parent / "configs"):
        if (folder / "train.yaml").is_file():
            return str(folder)
    raise FileNotFoundError(f"ssd_npu: no Hydra configs (train.yaml) in {here} or beside it.")


def register_configs() -> None:
    """Register the schemas with Hydra; configs/*.yaml extend them via `defaults`."""
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    for name, schema in SCRIPT_SCHEMAS.items():
        cs.store(name=f"{name}_schema", node=schema)
    cs.store(group="device", name="device_schema", node=DeviceConfig)
    cs.store(group="data", name="data_schema", node=DataConfig)
    cs.store(group="model", name="model_schema", node=ModelConfig)


def expand_short_forms(overrides: list[str]) -> list[str]:
    """Command-line words with the short forms spelled out: `eval=true|false` (an older bool
    key, still the documented way to skip evaluation) is `eval.enabled=true|false`."""
    return [
        "eval.enabled=" + o.split("=", 1)[1] if o.split("=", 1)[0] in ("eval", "+eval") else o
        for o in overrides
    ]


def _one_of(key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not valid; choose one of: {', '.join(allowed)}.")


def check_compile_mode(mode: str | None, backend: str) -> None:
    """torch.compile passes `mode` on to inductor only; another backend would get it as an
    unknown argument at its first compile. None and "default" need no particular backend."""
    if mode not in (None, "default") and backend != "inductor":
        raise ConfigError(
            f"compiler.mode={mode} needs compiler.backend=inductor (torch.compile gives a mode "
            f"to inductor only), but the backend is {backend!r}; set compiler.backend=inductor "
            "or compiler.mode=null."
        )


def check_compile_backend(backend: str | None, device: str) -> None:
    """compiler.backend against the device (`device.name`, or the type `auto` became): npu
    takes inductor (with triton-ascend) or torch_npu's "npu"; "npu" exists only once torch_npu
    is imported, so it needs device=npu. None: the device's default, always allowed."""
    if backend is None:
        return
    if device == "npu" and backend not in NPU_COMPILE_BACKENDS:
        raise ConfigError(
            f"compiler.backend={backend} is not valid with device=npu; choose inductor "
            "(inductor with triton-ascend, the default) or npu (torchair's GE graph mode)."
        )
    if backend == "npu" and device in ("cpu", "cuda"):
        raise ConfigError(
            f"compiler.backend=npu is torch_npu's backend and needs device=npu; on device={device}"
            " use compiler.backend=null (inductor)."
        )


def check_channels_last(setting: bool | None, device: str) -> None:
    """device.channels_last=true on npu: torch_npu's copy kernel takes only contiguous and
    preserve memory formats, so the channels-last weights would fail at the first copy."""
    if setting and device == "npu":
        raise ConfigError(
            "device.channels_last=true is not supported on device=npu (torch_npu's copy kernel "
            "takes only the contiguous and preserve memory formats); set "
            "device.channels_last=null (or false)."
        )


def check_comparison(value: str, allowed: tuple[str, ...]) -> None:
    """converge.compare: one of the comparisons scripts/converge.py knows."""
    _one_of("converge.compare", value, allowed)


def check_seeds(seeds: list[int]) -> None:
    """converge.seeds: distinct integer seeds, at least one (scripts/converge.py)."""
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(
            f"converge.seeds={seeds} is not valid; give distinct integer seeds, e.g. "
            "converge.seeds=[0,1,2]."
        )


def check_converge_runs(c: ConvergeConfig) -> None:
    """converge.jobs / threads / target_halfwidth / min_seeds / max_seeds (scripts/converge.py)."""
    if c.jobs < 1 or (c.threads is not None and c.threads < 1):
        raise ConfigError(
            f"converge.jobs={c.jobs} / converge.threads={c.threads} are not valid; give "
            "jobs >= 1 and threads >= 1 (or threads=null: the cores split between the jobs)."
        )
    if c.target_halfwidth is not None and c.target_halfwidth <= 0:
        raise ConfigError(
            f"converge.target_halfwidth={c.target_halfwidth} is not valid; give a half-width "
            "> 0 (e.g. 0.05) or null (run the listed seeds)."
        )
    if not 2 <= c.min_seeds <= c.max_seeds:
        raise ConfigError(
            f"converge.min_seeds={c.min_seeds} / converge.max_seeds={c.max_seeds} are not "
            "valid; give 2 <= min_seeds <= max_seeds."
        )


def _check_max_boxes(cfg: TrainConfig) -> None:
    value = cfg.max_boxes
    items = list(value) if isinstance(value, (list, tuple, ListConfig)) else [value]
    if (
        not items
        or any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in items)
        or items != sorted(set(items))
    ):
        shown = (
            f"[{','.join(map(str, items))}]"
            if isinstance(value, (list, tuple, ListConfig))
            else value
        )
        raise ConfigError(
            f"max_boxes={shown} is not valid; give an integer >= 1 (max_boxes=32) or box-count "
            "buckets as a sorted list of distinct integers >= 1 (max_boxes=[16,32,64])."
        )
    if len(items) > 1 and cfg.compiler.fail_on_recompile:
        raise ConfigError(
            f"compiler.fail_on_recompile=true with max_boxes={items}: every bucket compiles its "
            "own graph on its first batch; use one max_boxes or compiler.fail_on_recompile=false."
        )


def _check_augment_on(cfg: TrainConfig) -> None:
    """data.augment_on and data.slot (ssd_npu/data/slots.py)."""
    _one_of("data.augment_on", cfg.data.augment_on, AUGMENT_ON)
    slot = list(cfg.data.slot)
    if len(slot) != 2 or any(not isinstance(v, int) or isinstance(v, bool) or v < 32 for v in slot):
        raise ConfigError(
            f"data.slot=[{','.join(map(str, slot))}] is not valid; give two integers >= 32, "
            "[Hs,Ws] pixels, e.g. data.slot=[640,640]."
        )
    if cfg.data.decode == "device" and (cfg.data.augment_on == "host" or cfg.shape != "fixed"):
        raise ConfigError(
            "data.decode=device decodes into the slots of data.augment_on=device (shape=fixed): "
            "set data.augment_on=device (or auto on cuda), or use data.decode=exact."
        )
    if cfg.data.augment_on != "device":
        return
    if cfg.shape != "fixed":
        raise ConfigError(
            "data.augment_on=device needs shape=fixed; the dynamic baseline keeps torchvision's "
            "host pipeline: use data.augment_on=auto (or host) with shape=dynamic."
        )
    if cfg.data.decode == "reduced":
        raise ConfigError(
            "data.augment_on=device does not work with data.decode=reduced: the reduced decode "
            "picks its JPEG scale from the host's fit to the canvas, which the device does now; "
            "use data.decode=exact (or data.augment_on=host)."
        )


def _check_eval(cfg: TrainConfig) -> None:
    """eval.coco, eval.target_map, eval.target_metric, eval.target_stop."""
    _one_of("eval.coco", cfg.eval.coco, COCO_ENGINES)
    _one_of("eval.target_metric", cfg.eval.target_metric, TARGET_METRICS)
    target = cfg.eval.target_map
    if target is not None and not 0.0 < target <= 1.0:
        raise ConfigError(
            f"eval.target_map={target} is not valid; give an mAP in (0, 1] (e.g. 0.23) or null."
        )
    if target is not None and cfg.eval.target_stop and cfg.eval_every < 1:
        raise ConfigError(
            f"eval.target_map={target} needs evaluations during training: set eval_every=N "
            "(epochs), or eval.target_stop=false to only record when the target is reached."
        )


def validate(cfg: TrainConfig) -> None:
    """Check values Hydra's types cannot; raise ConfigError naming the key."""
    _one_of("device", cfg.device.name, DEVICES)
    _one_of("fit", cfg.fit, FITS)
    _one_of("shape", cfg.shape, SHAPES)
    _one_of("data", cfg.data.name, DATASETS)
    _one_of("data.on_bad_image", cfg.data.on_bad_image, ON_BAD_IMAGE)
    _one_of("data.decode", cfg.data.decode, DECODES)
    _one_of("eval.postprocess", cfg.eval.postprocess, POSTPROCESS)
    _check_eval(cfg)
    if cfg.eval.postprocess == "device" and cfg.shape != "fixed":
        raise ConfigError(
            "eval.postprocess=device needs shape=fixed; the dynamic baseline evaluates with "
            "torchvision's own inference: use eval.postprocess=auto (or host) with shape=dynamic."
        )
    if cfg.data.decode == "reduced" and cfg.shape != "fixed":
        raise ConfigError(
            "data.decode=reduced needs shape=fixed (it sends uint8 canvases); the dynamic "
            "baseline decodes exactly: use data.decode=exact with shape=dynamic."
        )
    _check_augment_on(cfg)
    _one_of("model", cfg.model.name, tuple(MODELS))
    spec = MODELS[cfg.model.name]
    canvas = list(cfg.canvas)
    if not spec.canvas_ok(canvas):
        raise ConfigError(
            f"canvas={canvas} is not valid for model={spec.name}; give {spec.canvas_rule}, "
            f"e.g. canvas=[{spec.canvas[0]},{spec.canvas[1]}] (its default)."
        )
    _check_max_boxes(cfg)
    if cfg.compiler.mode is not None:
        _one_of("compiler.mode", cfg.compiler.mode, COMPILE_MODES)
    if cfg.compiler.optimizer and not cfg.compile:
        raise ConfigError(
            "compiler.optimizer=true compiles the optimizer step beside the compiled training "
            "step; it needs compile=true (or set compiler.optimizer=false)."
        )
    # the default backend (inductor) takes every mode; device=auto's is checked by step_options
    check_compile_backend(cfg.compiler.backend, cfg.device.name)
    if cfg.compiler.backend is not None:
        check_compile_mode(cfg.compiler.mode, cfg.compiler.backend)
    check_channels_last(cfg.device.channels_last, cfg.device.name)
    positive = {
        "batch_size": cfg.batch_size,
        "epochs": cfg.epochs,
        "data.num_classes": cfg.data.num_classes - 1,
    }
    for key, value in positive.items():
        if value < 1:
            shown = cfg.data.num_classes if key == "data.num_classes" else value
            minimum = 2 if key == "data.num_classes" else 1
            raise ConfigError(f"{key}={shown} is not valid; it must be an integer >= {minimum}.")
    if cfg.optim.ema is not None and not 0.0 < cfg.optim.ema < 1.0:
        raise ConfigError(
            f"optim.ema={cfg.optim.ema} is not valid; give a decay in (0, 1) per step, e.g. "
            "optim.ema=0.99, or optim.ema=null (no average)."
        )
    if cfg.max_steps is not None and cfg.max_steps < 1:
        raise ConfigError(f"max_steps={cfg.max_steps} is not valid; give an integer >= 1 or null.")
    if cfg.eval_every < 0:
        raise ConfigError(
            f"eval_every={cfg.eval_every} is not valid; give epochs >= 0 (0: at the end)."
        )
    if cfg.checkpoint_every < 0 or cfg.keep_checkpoints < 1:
        raise ConfigError(
            f"checkpoint_every={cfg.checkpoint_every} / keep_checkpoints={cfg.keep_checkpoints} "
            "are not valid; give checkpoint_every >= 0 steps and keep_checkpoints >= 1."
        )
    if cfg.eval_only and not cfg.weights:
        raise ConfigError("eval_only=true needs weights=PATH, the checkpoint to evaluate.")
    if cfg.amp_dtype is not None:
        _one_of("amp_dtype", cfg.amp_dtype, AMP_DTYPES)
    if cfg.dist_timeout_min < 1:
        raise ConfigError(
            f"dist_timeout_min={cfg.dist_timeout_min} is not valid; give minutes >= 1."
        )
    if cfg.profile_steps < 0:
        raise ConfigError(f"profile_steps={cfg.profile_steps} is not valid; it must be >= 0.")
    if cfg.num_workers < 0:
        raise ConfigError(f"num_workers={cfg.num_workers} is not valid; it must be >= 0.")
    if not 0.0 <= cfg.pad_value <= 1.0:
        raise ConfigError(f"pad_value={cfg.pad_value} is not valid; it must lie in [0, 1].")
    if cfg.show.images < 1 or cfg.show.height < 16 or not 0.0 <= cfg.show.score <= 1.0:
        raise ConfigError(
            f"show.images={cfg.show.images} / show.height={cfg.show.height} / show.score="
            f"{cfg.show.score} are not valid; give images >= 1, height >= 16, score in [0, 1]."
        )
    if cfg.data.name == "coco" and not cfg.data.root:
        raise ConfigError(
            "data.root is not set; data=coco needs data.root=/path/to/coco with "
            "annotations/instances_{train,val}2017.json and {train,val}2017/ inside."
        )
