"""Build a training run from the config: device, process group, data, model, optimizer, step.

Shared by train.py, the shape audit and the benchmark, so they all run exactly the same
pipeline for the same overrides.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from ssd_npu import distributed
from ssd_npu.config import validate
from ssd_npu.data.loader import build_loaders, resolve_data_root
from ssd_npu.device import Device, resolve_device
from ssd_npu.distributed import World
from ssd_npu.engine import StepOptions, make_dynamic_step, make_fixed_step
from ssd_npu.model import FixedSSD, build_detector, load_weights
from ssd_npu.optim import build_optimizer, build_scheduler


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class Training:
    """Everything a training run needs, built from the config (see `build_training`)."""

    device: Device
    world: World
    model: FixedSSD  # the plain module (checkpoints, evaluation); `network` may wrap it
    network: Any  # what the step calls: the model, or its DistributedDataParallel wrapper
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any  # GradScaler for fp16 autocast, else None
    step_fn: Any
    train_loader: Any
    val_loader: Any
    train_set: Any
    val_set: Any
    data_root: Path
    total_steps: int


def build_training(cfg) -> Training:
    """Validate the config and build everything; under torchrun, join the process group.

    Data parallel: each rank takes `batch_size` images of a DistributedSampler's share, so
    the global batch is batch_size x world size and the recipe lr is scaled to it.
    """
    validate(cfg)
    device = resolve_device(cfg.device.name, cfg.device.index, cfg.device.jit_compile)
    world = distributed.init(device)
    # Rank 0's initial weights reach every rank through DDP; other randomness differs per rank.
    seed_everything(cfg.seed + world.rank)
    data_root = resolve_data_root(cfg)
    train_loader, val_loader, train_set, val_set = build_loaders(
        cfg, data_root, cfg.shape, distributed=world.distributed
    )

    canvas = (int(cfg.canvas[0]), int(cfg.canvas[1]))
    detector = build_detector(cfg.data.num_classes, canvas)
    if cfg.weights:
        load_weights(detector, cfg.weights)
    if cfg.sync_bn and world.distributed:
        distributed.convert_sync_batchnorm(detector, device)
    model = FixedSSD(detector, canvas).to(device.torch)
    model.train()
    network: Any = None
    if world.distributed:
        wrapped = model if cfg.shape == "fixed" else model.detector
        network = DistributedDataParallel(
            wrapped, device_ids=None if device.type == "cpu" else [device.index]
        )

    # The schedule spans the configured epochs; max_steps only stops early (a smoke run
    # sees the start of the real schedule, and a resumed run the same learning rates).
    schedule_steps = cfg.epochs * len(train_loader)
    total_steps = min(schedule_steps, cfg.max_steps or schedule_steps)
    optimizer = build_optimizer(model.parameters(), cfg.optim, cfg.batch_size * world.size)
    scheduler = build_scheduler(optimizer, cfg.optim, schedule_steps)
    scaler = device.grad_scaler(cfg.amp, cfg.amp_dtype)
    make_step = make_fixed_step if cfg.shape == "fixed" else make_dynamic_step
    options = StepOptions(
        amp=cfg.amp,
        amp_dtype=cfg.amp_dtype,
        compile=cfg.compile,
        backend=cfg.compiler.backend or device.compile_backend,
        compile_options={
            "fail_on_recompile": cfg.compiler.fail_on_recompile,
            "recompile_limit": cfg.compiler.recompile_limit,
        },
        network=network,
        world=world,
    )
    step_fn = make_step(model, device, options)
    return Training(
        device=device,
        world=world,
        model=model,
        network=network or model,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=scaler,
        step_fn=step_fn,
        train_loader=train_loader,
        val_loader=val_loader,
        train_set=train_set,
        val_set=val_set,
        data_root=data_root,
        total_steps=total_steps,
    )
