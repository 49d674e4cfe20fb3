"""Build a training run from the config: device, process group, data, model, optimizer, step.

The config object stops here: everything below takes explicit arguments. Shared by train.py,
the shape audit and the benchmark, so they all run exactly the same pipeline for the same
overrides.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from ssd_npu.choices import Canvas
from ssd_npu.config import (
    OptimConfig,
    TrainConfig,
    check_channels_last,
    check_compile_backend,
    check_compile_mode,
    validate,
)
from ssd_npu.data.buckets import bucket_sizes
from ssd_npu.data.decode import jpeg_decoder
from ssd_npu.data.device_augment import DeviceAugment
from ssd_npu.data.dynamic import collate_dynamic, to_dynamic_sample
from ssd_npu.data.fixed_shape import FixSample, collate_fixed
from ssd_npu.data.loader import BatchForm, Loaders, LoaderSpec, build_loaders
from ssd_npu.data.slots import SlotSample, collate_slots
from ssd_npu.data.synthetic import ensure_synthetic_coco
from ssd_npu.device import distributed
from ssd_npu.device.backend import CPU, Device, resolve_device, use_deterministic_kernels
from ssd_npu.device.compiler import CompileOptions
from ssd_npu.device.distributed import World
from ssd_npu.engine.optim import (
    OptimizerStep,
    build_optimizer,
    build_scheduler,
    scaled_lr,
    use_fused_sgd,
)
from ssd_npu.engine.train_step import (
    DynamicStep,
    FixedStep,
    StepOptions,
    TrainStep,
    Wrap,
)
from ssd_npu.errors import ConfigError, DataError
from ssd_npu.evaluation.detections import DetectionSheet
from ssd_npu.evaluation.evaluate import (
    DetectFn,
    DeviceDetect,
    Evaluator,
    dynamic_detections,
    fixed_detections,
)
from ssd_npu.families import sgd_recipe_of, train_recipe_of
from ssd_npu.models.detector import FixedDetector, build_detector, load_weights
from ssd_npu.models.specs import MODELS, ModelSpec


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class Training:
    """Everything a training run needs, built from the config (see `build_training`)."""

    device: Device
    world: World
    # the plain module (checkpoints, evaluation); the step may call a DDP wrapper
    model: FixedDetector
    path: ShapePath  # shape=fixed|dynamic: what differs between the two, built once
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None  # for fp16 autocast, else None
    step: TrainStep
    optimizer_step: OptimizerStep  # backward + optimizer update (compiled: compiler.optimizer)
    data: Loaders
    data_root: Path
    total_steps: int  # optimizer steps this run trains (epochs x batches, or max_steps)
    options: StepOptions  # amp, compile and DDP options of the step (evaluation's compile too)
    data_s: float = 0.0  # seconds building the data sets and loaders (JSON parse, arrays, checks)


_START = time.monotonic()  # fallback origin where the process's own start time is unknown


def process_age_s() -> float:
    """Seconds since this process started (Linux: /proc, so the interpreter's start and the
    imports count); elsewhere since this module was imported."""
    try:
        # field 22 of stat (after the parenthesised name: index 19), clock ticks after boot
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(uptime - ticks / os.sysconf("SC_CLK_TCK"), 0.0)
    except (OSError, ValueError, IndexError):
        return time.monotonic() - _START


def resolve_data_root(cfg: TrainConfig) -> Path:
    """The data set folder: the synthetic cache (generated on first use) or data.root for coco."""
    if cfg.data.name == "synthetic":
        root = Path(cfg.data.root) if cfg.data.root else None
        if root is not None and (root / "annotations").is_dir():
            return root  # a set made by scripts/make_synthetic_coco.py: use it as it is
        return ensure_synthetic_coco(root, cfg.data.synthetic)
    root = Path(str(cfg.data.root)).expanduser()
    if not root.is_dir():
        raise DataError(
            f"data.root={root} does not exist; give a COCO folder with annotations/ and "
            f"{cfg.data.train_split}/, {cfg.data.val_split}/ inside."
        )
    return root


@dataclass(frozen=True)
class ShapePath:
    """One of the two training paths (`shape=fixed|dynamic`), built once here; nothing below
    this module branches on `shape`, it is handed the pieces instead.

    fixed: every sample fitted to the canvas with M box rows (`FixSample`), `FixedBatch`es of
    exactly batch_size, the fixed-shape step and loss, evaluation through `FixedDetector` (+ the
    postprocess on the host or the device). dynamic: torchvision's own `model(images, targets)`
    on `DynamicBatch`es and its own inference.
    """

    batches: BatchForm
    # (model, device, options) -> the step; FixedStep with its DeviceAugment when augment_on
    # is "device"
    step_type: Callable[..., TrainStep]
    augment_on: str = "host"  # where the training augmentation and the fit run
    box_rows: tuple[int, ...] = ()  # fixed: M, or the box-count buckets' Ms; dynamic: none

    @property
    def static(self) -> bool:
        """Every device shape is static (the fixed path): cuDNN's algorithm search pays off
        once, box-count buckets are counted per graph, evaluation runs `FixedDetector`."""
        return self.batches.static

    def detections(
        self, model: FixedDetector, device: Device, amp: bool, detect: DeviceDetect | None
    ) -> DetectFn:
        """Evaluation's detections over a val loader: (COCO records, image ids) of this rank.
        dynamic: torchvision's postprocess where the device has its ops (`dynamic_postprocess`)."""
        if self.static:
            return partial(fixed_detections, model, device=device, amp=amp, detect=detect)
        where = device.dynamic_postprocess
        return partial(dynamic_detections, model.detector, device=device, postprocess=where)


def canvas_of(cfg: TrainConfig) -> Canvas:
    """The config's canvas as (H, W) pixels: the one conversion from the config's list."""
    return Canvas.of(cfg.canvas)


def resolve_augment_on(cfg: TrainConfig, device: Device) -> str:
    """`data.augment_on` -> "device" | "host". auto: `device.auto_place` (the device on an
    accelerator, where the workers' per-image work is the bottleneck; the host on the cpu,
    where the workers run beside the step on other cores). auto also stays on the host where
    the device path does not apply: the dynamic baseline, box-count buckets (one M per slot
    batch) and data.decode=reduced; asked for explicitly, those fail with a message."""
    choice = cfg.data.augment_on
    blockers = {
        "shape=dynamic keeps torchvision's own host pipeline": cfg.shape != "fixed",
        f"max_boxes={list(bucket_sizes(cfg.max_boxes))} buckets cut M per batch on the host": (
            len(bucket_sizes(cfg.max_boxes)) > 1
        ),
        "data.decode=reduced picks its JPEG scale from the host's fit": (
            cfg.data.decode == "reduced"
        ),
    }
    reasons = [why for why, blocked in blockers.items() if blocked]
    if choice == "device" and reasons:
        raise ConfigError(f"data.augment_on=device is not available here: {reasons[0]}; "
                          "use data.augment_on=host (or auto).")  # fmt: skip
    place = (device.auto_place if not reasons else "host") if choice == "auto" else choice
    if cfg.data.decode == "device":
        check_device_decode(device, place, reasons)
    return place


def check_device_decode(device: Device, augment_on: str, reasons: list[str]) -> None:
    """data.decode=device: the batch's JPEGs decoded on the device into the augmentation's
    slots: nvJPEG on cuda (torchcodec), libjpeg-turbo on the cpu (the same process as the
    step: a check of the path more than a speed-up). Not on npu yet: Ascend's DVPP decoder
    comes with torchvision_npu, which this project does not drive."""
    if augment_on != "device":
        why = reasons[0] if reasons else f"data.augment_on resolved to host on {device.type}"
        raise ConfigError(
            f"data.decode=device needs data.augment_on=device ({why}); set "
            "data.augment_on=device or use data.decode=exact."
        )
    if not device.decodes_jpeg:
        raise ConfigError(
            "data.decode=device is not available on npu (Ascend's DVPP JPEG decoder comes with "
            "torchvision_npu, not driven here yet); use data.decode=exact."
        )
    if jpeg_decoder() is None:
        raise ConfigError("data.decode=device needs torchcodec: pip install -r requirements.txt.")


def shape_path(cfg: TrainConfig, device: Device = CPU) -> ShapePath:
    """The path `cfg.shape` names, with its sample finishing, collate and step class; with
    data.augment_on=device (`resolve_augment_on` for `device`) the train batches are
    slots and the step augments and fits them."""
    if cfg.shape == "dynamic":
        return ShapePath(BatchForm(to_dynamic_sample, collate_dynamic, static=False), DynamicStep)
    sizes = bucket_sizes(cfg.max_boxes)  # one M, or box-count buckets
    # buckets: samples are padded to the largest, each batch cut to its bucket on collate
    finish = FixSample(canvas_of(cfg), sizes[-1], cfg.fit, float(cfg.pad_value), int(cfg.seed))
    buckets = sizes if len(sizes) > 1 else None
    collate = partial(collate_fixed, buckets=sizes) if buckets else collate_fixed
    if resolve_augment_on(cfg, device) == "device":
        augment = DeviceAugment(
            canvas_of(cfg),
            cfg.fit,
            float(cfg.pad_value),
            recipe=train_recipe_of(MODELS[cfg.model.name]) if cfg.augment else "none",
        )
        slots = SlotSample(
            cfg.data.slot,
            sizes[-1],
            augment.draws,
            int(cfg.seed),
            device_decode=cfg.data.decode == "device",
        )
        form = BatchForm(
            finish, collate, True, None, slots, partial(collate_slots, slot=slots.slot)
        )
        step = partial(FixedStep, augment=augment)
        return ShapePath(form, step, augment_on="device", box_rows=sizes)
    form = BatchForm(finish, collate, static=True, buckets=buckets)
    return ShapePath(form, FixedStep, box_rows=sizes)


def resolve_postprocess(choice: str, device: Device, path: ShapePath) -> str:
    """`eval.postprocess` -> "device" | "host". auto: `device.auto_place`, the device on an
    accelerator (the host path copies every head output and runs NMS in Python; torchvision's
    nms has no NPU kernel), the host on the cpu, where both are the same processor and the
    host path is faster (docs/bench.md). The dynamic baseline is torchvision's own
    inference: always "host"."""
    if not path.static:
        return "host"
    if choice == "auto":
        return device.auto_place
    return choice


def loader_spec(cfg: TrainConfig, world: World, device: Device) -> LoaderSpec:
    return LoaderSpec(
        batch_size=int(cfg.batch_size),
        num_classes=int(cfg.data.num_classes),
        train_split=cfg.data.train_split,
        val_split=cfg.data.val_split,
        on_bad_image=cfg.data.on_bad_image,
        augment=bool(cfg.augment),
        num_workers=int(cfg.num_workers),
        seed=int(cfg.seed),
        rank=world.rank,
        world_size=world.size,
        pin_memory=device.pin_memory,
        decode=cfg.data.decode,
        recipe=train_recipe_of(MODELS[cfg.model.name]),
    )


def step_options(cfg: TrainConfig, device: Device, world: World, ddp: Wrap | None) -> StepOptions:
    compile_options = None
    if cfg.compile:
        # device=auto: validate could not know the device, so its checks run again here
        check_compile_backend(cfg.compiler.backend, device.type)
        backend = cfg.compiler.backend or device.compile_backend
        check_compile_mode(cfg.compiler.mode, backend)
        device.require_compiler(backend)
        compile_options = CompileOptions(
            backend=backend,
            fail_on_recompile=cfg.compiler.fail_on_recompile,
            recompile_limit=cfg.compiler.recompile_limit,
            mode=cfg.compiler.mode,
        )
    return StepOptions(
        amp=cfg.amp, amp_dtype=cfg.amp_dtype, compile=compile_options, ddp=ddp, world=world
    )


def uses_channels_last(setting: bool | None, device: Device, amp: bool) -> bool:
    """`device.channels_last`: weights stored channels-last (NHWC), so the convolutions run
    their channels-last kernels. None: the device's default (`Device.channels_last_default`:
    fp32 on the cpu). npu refuses it (`check_channels_last`: also for device=auto)."""
    check_channels_last(setting, device.type)
    if setting is not None:
        return bool(setting)
    return device.channels_last_default(amp)


def sgd_settings(optim: OptimConfig, spec: ModelSpec, global_batch: int) -> tuple[float, float]:
    """(lr, weight decay) of a run: `optim.lr` if set, else the recipe's lr scaled linearly to
    `global_batch` (images per optimizer step over all ranks). The recipe is the model's
    torchvision one (`sgd_recipe_of`) where `optim.base_lr`, `base_batch`, `weight_decay` are
    null: ssd300 trains at 1/12.5 of ssdlite's lr per image, and diverges at ssdlite's."""
    recipe = sgd_recipe_of(spec)
    base_lr = recipe.lr if optim.base_lr is None else optim.base_lr
    base_batch = recipe.batch if optim.base_batch is None else optim.base_batch
    weight_decay = recipe.weight_decay if optim.weight_decay is None else optim.weight_decay
    return scaled_lr(optim.lr, base_lr, base_batch, global_batch), weight_decay


def build_training(cfg: TrainConfig) -> Training:
    """Validate the config and build everything; under torchrun, join the process group.

    Data parallel: each rank takes `batch_size` images of a DistributedSampler's share, so
    the global batch is batch_size x world size and the recipe lr is scaled to it.
    """
    validate(cfg)
    device = resolve_device(cfg.device.name, cfg.device.index, cfg.device.jit_compile)
    path = shape_path(cfg, device)
    deterministic = cfg.device.deterministic
    device.tune_convolutions(path.static, deterministic, cfg.device.cudnn_benchmark)
    if deterministic:
        use_deterministic_kernels()
    world = distributed.init(device, cfg.dist_timeout_min)
    # Rank 0's initial weights reach every rank through DDP; other randomness differs per rank.
    seed_everything(cfg.seed + world.rank)
    data_root = resolve_data_root(cfg)
    data_start = time.perf_counter()
    data = build_loaders(loader_spec(cfg, world, device), path.batches, data_root)
    data_s = time.perf_counter() - data_start

    canvas = canvas_of(cfg)
    detector = build_detector(cfg.data.num_classes, canvas, cfg.model.name)
    if cfg.weights:
        load_weights(detector, cfg.weights)
    if cfg.sync_bn and world.distributed:
        distributed.convert_sync_batchnorm(detector, device)
    model = FixedDetector(detector, canvas).to(device.torch)
    if uses_channels_last(cfg.device.channels_last, device, cfg.amp):
        model.to(memory_format=torch.channels_last)
    model.train()
    # Under torchrun the step wraps what it calls (the compiled call, if compiled) in DDP.
    ddp = None
    if world.distributed:
        ddp = partial(DistributedDataParallel, device_ids=device.ddp_device_ids)

    # The schedule spans the configured epochs; max_steps only stops early (a smoke run
    # sees the start of the real schedule, and a resumed run the same learning rates).
    schedule_steps = cfg.epochs * len(data.train)
    total_steps = min(schedule_steps, cfg.max_steps or schedule_steps)
    o = cfg.optim
    lr, weight_decay = sgd_settings(o, MODELS[cfg.model.name], cfg.batch_size * world.size)
    scaler = device.grad_scaler(cfg.amp, cfg.amp_dtype)
    fused = use_fused_sgd(device, scaler is not None)  # fp16 on cuda: no per-step sync
    optimizer = build_optimizer(model.parameters(), lr, o.momentum, weight_decay, fused=fused)
    scheduler = build_scheduler(optimizer, o.warmup_steps, o.warmup_factor, schedule_steps)
    options = step_options(cfg, device, world, ddp)
    step = path.step_type(model, device, options)
    # after the scheduler: the compiled optimizer's tensor lr must not exist when it is built
    compile_update = options.compile if cfg.compiler.optimizer else None
    optimizer_step = OptimizerStep(optimizer, scaler, compile_update, counted_in=step.compiled)
    return Training(
        device=device,
        world=world,
        model=model,
        path=path,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=scaler,
        step=step,
        optimizer_step=optimizer_step,
        data=data,
        data_root=data_root,
        total_steps=total_steps,
        options=options,
        data_s=data_s,
    )


def build_evaluator(cfg: TrainConfig, t: Training) -> Evaluator:
    """COCO evaluation on the val loader; `eval.postprocess` resolved for the device (auto:
    the device on cuda/npu, the host on cpu). The device postprocess is compiled once under
    compile=true, with the training step's compiler options."""
    detect = None
    if resolve_postprocess(cfg.eval.postprocess, t.device, t.path) == "device":
        detect = DeviceDetect(t.model, t.device, cfg.amp, t.options.compile)
    detections = t.path.detections(t.model, t.device, cfg.amp, detect)
    val_set = t.data.val_set
    return Evaluator(
        detections, t.data.val, val_set.coco, detect, cfg.eval.coco, Path(val_set.ann_file)
    )


def detection_sheet(cfg: TrainConfig, t: Training, evaluator: Evaluator) -> DetectionSheet:
    """The pictured val images (`show.*`): the first `show.images` of the val set, drawn with
    predictions above `show.score` (evaluation's own detections), tiles `show.height` px high."""
    show = cfg.show
    return DetectionSheet.from_loader(
        evaluator.detections,
        t.data.val,
        fill=t.path.batches.static,
        images=show.images,
        score=show.score,
        height=show.height,
    )
