"""`run(cfg)`: build everything from the config, train, write summary.json and a checkpoint."""

from __future__ import annotations

import json
import random
import signal
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf

from ssd_npu.checkpoint import (
    checkpoint_path,
    find_resume,
    list_checkpoints,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from ssd_npu.compiler import graphs_compiled
from ssd_npu.config import validate
from ssd_npu.data.buckets import BucketCounter, bucket_sizes
from ssd_npu.data.coco import check_num_classes
from ssd_npu.data.loader import build_loaders, resolve_data_root
from ssd_npu.device import Device, resolve_device
from ssd_npu.engine import NonFiniteLoss, Progress, make_dynamic_step, make_fixed_step, train_loop
from ssd_npu.errors import Interrupted
from ssd_npu.evaluate import evaluate_dynamic, evaluate_fixed
from ssd_npu.interrupt import StopOnSignal
from ssd_npu.model import FixedSSD, build_detector, load_weights
from ssd_npu.optim import build_optimizer, build_scheduler
from ssd_npu.telemetry import Telemetry


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class Training:
    """Everything a training run needs, built from the config (see `build_training`)."""

    device: Device
    model: FixedSSD
    optimizer: torch.optim.Optimizer
    scheduler: Any
    step_fn: Any
    train_loader: Any
    val_loader: Any
    train_set: Any
    val_set: Any
    data_root: Path
    total_steps: int


def build_training(cfg) -> Training:
    """Validate the config and build device, data, model, optimizer and step function.

    Shared by train.py, the shape audit and the benchmark, so they run exactly the same
    pipeline for the same overrides.
    """
    validate(cfg)
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device.name, cfg.device.index, cfg.device.jit_compile)
    data_root = resolve_data_root(cfg)
    train_loader, val_loader, train_set, val_set = build_loaders(cfg, data_root, cfg.shape)
    check_num_classes(train_set, cfg.data.num_classes)

    canvas = (int(cfg.canvas[0]), int(cfg.canvas[1]))
    detector = build_detector(cfg.data.num_classes, canvas)
    if cfg.weights:
        load_weights(detector, cfg.weights)
    model = FixedSSD(detector, canvas).to(device.torch)
    model.train()

    # The schedule spans the configured epochs; max_steps only stops early (a smoke run
    # sees the start of the real schedule, and a resumed run the same learning rates).
    schedule_steps = cfg.epochs * len(train_loader)
    total_steps = min(schedule_steps, cfg.max_steps or schedule_steps)
    optimizer = build_optimizer(model.parameters(), cfg.optim, cfg.batch_size)
    scheduler = build_scheduler(optimizer, cfg.optim, schedule_steps)
    make_step = make_fixed_step if cfg.shape == "fixed" else make_dynamic_step
    compiler = cfg.compiler
    options = {
        "fail_on_recompile": compiler.fail_on_recompile,
        "recompile_limit": compiler.recompile_limit,
    }
    backend = compiler.backend or device.compile_backend
    step_fn = make_step(model, device, cfg.amp, cfg.compile, backend, options)
    return Training(
        device,
        model,
        optimizer,
        scheduler,
        step_fn,
        train_loader,
        val_loader,
        train_set,
        val_set,
        data_root,
        total_steps,
    )


def evaluate(t: Training, cfg) -> dict[str, Any]:
    """COCO mAP on the val set: the fixed path, or torchvision's own for shape=dynamic."""
    if cfg.shape == "fixed":
        return evaluate_fixed(t.model, t.val_loader, t.val_set, t.device, amp=cfg.amp)
    return evaluate_dynamic(t.model.detector, t.val_loader, t.val_set, t.device)


def training_state(t: Training, cfg, progress: Progress) -> dict[str, Any]:
    """Everything `resume` needs to continue exactly: weights, optimizer, schedule, RNGs."""
    return {
        "model": t.model.state_dict(),
        "optimizer": t.optimizer.state_dict(),
        "scheduler": t.scheduler.state_dict(),
        "scaler": None,  # no gradient scaler in fp32 / bf16 training
        "progress": asdict(progress),
        "config": OmegaConf.to_container(cfg, resolve=True),
        "rng": rng_state(),
    }


def restore(t: Training, state: dict[str, Any]) -> Progress:
    """Load a `training_state` into built objects; return where to continue."""
    t.model.load_state_dict(state["model"])
    t.optimizer.load_state_dict(state["optimizer"])
    t.scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return Progress(**state["progress"])


def run(cfg) -> dict[str, Any]:
    """Train (or only evaluate) as configured; return the summary, also in summary.json."""
    t = build_training(cfg)
    out_dir = Path(cfg.out_dir)
    ckpt_dir = out_dir / "checkpoints"
    out_dir.mkdir(parents=True, exist_ok=True)
    progress = Progress()
    if cfg.resume:
        path = find_resume(cfg.resume, ckpt_dir)
        progress = restore(t, load_checkpoint(path))
        print(f"ssd-npu: resumed from {path} at step {progress.step} (epoch {progress.epoch})")
    print(
        f"ssd-npu: device={t.device.torch} shape={cfg.shape} canvas={list(cfg.canvas)} "
        f"max_boxes={cfg.max_boxes} fit={cfg.fit} batch={cfg.batch_size} steps={t.total_steps} "
        f"anchors={t.model.anchors.shape[0]} data={t.data_root} out={out_dir}"
    )
    telemetry = Telemetry(out_dir, 0 if cfg.eval_only else t.total_steps - progress.step)
    evals: list[dict[str, Any]] = []
    saved: list[Path] = []

    def save(p: Progress) -> None:
        saved.append(
            save_checkpoint(training_state(t, cfg, p), ckpt_dir, p.step, cfg.keep_checkpoints)
        )

    def log_eval(step: int) -> None:
        result = evaluate(t, cfg)
        evals.append({"step": step, "mAP": result["mAP"], "mAP50": result["mAP50"]})
        telemetry.log_scalars(step, {"eval/mAP": result["mAP"], "eval/mAP50": result["mAP50"]})

    def on_step_end(p: Progress) -> None:
        if cfg.checkpoint_every and p.step % cfg.checkpoint_every == 0:
            save(p)

    def on_epoch_end(p: Progress) -> None:
        if cfg.eval and cfg.eval_every and p.epoch % cfg.eval_every == 0 and p.epoch < cfg.epochs:
            log_eval(p.step)

    graphs_before = graphs_compiled()
    # batches and graphs per box-count bucket (boxes [B, M, 4]: M), for summary.json
    buckets = BucketCounter(t.step_fn, bucket_sizes(cfg.max_boxes), cfg.compile)
    step_fn = buckets if cfg.shape == "fixed" else t.step_fn
    stop = StopOnSignal()
    try:
        if not cfg.eval_only:
            with stop:
                progress = train_loop(
                    step_fn,
                    t.optimizer,
                    t.scheduler,
                    t.train_loader,
                    t.device,
                    telemetry,
                    cfg.epochs,
                    cfg.max_steps,
                    count_graphs=cfg.compile,
                    progress=progress,
                    on_step_end=on_step_end,
                    on_epoch_end=on_epoch_end,
                    stop_requested=stop.requested,
                )
            if not saved or saved[-1] != checkpoint_path(ckpt_dir, progress.step):
                save(progress)
        if (cfg.eval or cfg.eval_only) and not stop.requested():
            log_eval(progress.step)
    except NonFiniteLoss as err:
        last = list_checkpoints(ckpt_dir)
        raise NonFiniteLoss(
            f"{err} The last good checkpoint is {last[-1] if last else 'not written yet'}."
        ) from None
    finally:
        telemetry.close()

    graphs = graphs_compiled() - graphs_before if cfg.compile else None
    summary = telemetry.summary(
        graphs_compiled=graphs,
        # graphs compiled after the first step (the first step's graph breaks are not recompiles)
        recompiles=t.step_fn.compiled.recompiles if cfg.compile else 0,
        device=str(t.device.torch),
        shape=cfg.shape,
        canvas=list(cfg.canvas),
        max_boxes=cfg.max_boxes if isinstance(cfg.max_boxes, int) else list(cfg.max_boxes),
        fit=cfg.fit,
        batch_size=cfg.batch_size,
        global_step=progress.step,
        checkpoint=str(saved[-1]) if saved else None,
        interrupted=stop.requested(),
    )
    if cfg.shape == "fixed":
        summary["buckets"] = buckets.summary()
    if evals:
        summary["eval"] = {"mAP": evals[-1]["mAP"], "mAP50": evals[-1]["mAP50"], "history": evals}
    telemetry.write_summary(summary)
    if stop.requested():
        raise Interrupted(
            f"stopped by {signal.Signals(stop.signum).name} at step {progress.step}; checkpoint "
            f"{saved[-1]}. Resume with: python train.py <same overrides> "
            f"hydra.run.dir={out_dir} resume=auto",
            stop.signum,
        )
    print(
        json.dumps(
            {k: v for k, v in summary.items() if k != "eval"} | {"eval": evals[-1:]}, indent=2
        )
    )
    return summary
