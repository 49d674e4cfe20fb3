"""`run(cfg)`: build everything from the config, train, write summary.json and a checkpoint."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf

from ssd_npu.checkpoint import save_atomic
from ssd_npu.config import validate
from ssd_npu.data.coco import check_num_classes
from ssd_npu.data.loader import build_loaders, resolve_data_root
from ssd_npu.device import resolve_device
from ssd_npu.engine import graphs_compiled, make_dynamic_step, make_fixed_step, train_loop
from ssd_npu.model import FixedSSD, build_detector, load_weights
from ssd_npu.optim import build_optimizer, build_scheduler
from ssd_npu.telemetry import Telemetry


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run(cfg) -> dict[str, Any]:
    """Train as configured; return the summary (also written to `<out_dir>/summary.json`)."""
    validate(cfg)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device.name, cfg.device.index, cfg.device.jit_compile)
    data_root = resolve_data_root(cfg)
    train_loader, _val_loader, train_set, _val_set = build_loaders(cfg, data_root, cfg.shape)
    check_num_classes(train_set, cfg.data.num_classes)

    canvas = (int(cfg.canvas[0]), int(cfg.canvas[1]))
    detector = build_detector(cfg.data.num_classes, canvas)
    if cfg.weights:
        load_weights(detector, cfg.weights)
    model = FixedSSD(detector, canvas).to(device.torch)
    model.train()

    steps_per_epoch = len(train_loader)
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    optimizer = build_optimizer(model.parameters(), cfg.optim, cfg.batch_size)
    scheduler = build_scheduler(optimizer, cfg.optim, total_steps)
    make_step = make_fixed_step if cfg.shape == "fixed" else make_dynamic_step
    step_fn = make_step(model, device, cfg.amp, cfg.compile, device.compile_backend)

    print(
        f"ssd-npu: device={device.torch} shape={cfg.shape} canvas={list(canvas)} "
        f"max_boxes={cfg.max_boxes} fit={cfg.fit} batch={cfg.batch_size} steps={total_steps} "
        f"anchors={model.anchors.shape[0]} data={data_root} out={out_dir}"
    )
    telemetry = Telemetry(out_dir, total_steps)
    graphs_before = graphs_compiled()
    try:
        train_loop(
            step_fn,
            optimizer,
            scheduler,
            train_loader,
            device,
            telemetry,
            cfg.epochs,
            cfg.max_steps,
            count_graphs=cfg.compile,
        )
    finally:
        telemetry.close()

    graphs = graphs_compiled() - graphs_before if cfg.compile else None
    summary = telemetry.summary(
        graphs_compiled=graphs,
        recompiles=max(0, graphs - 1) if graphs is not None else 0,
        device=str(device.torch),
        shape=cfg.shape,
        canvas=list(canvas),
        max_boxes=cfg.max_boxes,
        fit=cfg.fit,
        batch_size=cfg.batch_size,
    )
    save_atomic(
        {"model": model.state_dict(), "config": OmegaConf.to_container(cfg, resolve=True)},
        out_dir / "checkpoint_final.pt",
    )
    telemetry.write_summary(summary)
    print(json.dumps(summary, indent=2))
    return summary
