"""`run(cfg)`: build everything from the config, train, write summary.json and a checkpoint."""

from __future__ import annotations

import contextlib
import json
import signal
from dataclasses import asdict
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from ssd_npu import distributed
from ssd_npu.build import Training, build_training
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
from ssd_npu.data.buckets import BucketCounter, bucket_sizes
from ssd_npu.engine import NonFiniteLoss, Progress, train_loop
from ssd_npu.errors import Interrupted
from ssd_npu.evaluate import coco_map, dynamic_detections, fixed_detections
from ssd_npu.interrupt import StopOnSignal
from ssd_npu.telemetry import Telemetry


def evaluate(t: Training, cfg) -> dict[str, Any] | None:
    """COCO mAP on the val set: the fixed path, or torchvision's own for shape=dynamic.

    Each rank runs its share of the val set; rank 0 gathers every rank's detections and
    runs COCOeval (returns None on the other ranks).
    """
    if cfg.shape == "fixed":
        records, image_ids = fixed_detections(t.model, t.val_loader, t.device, amp=cfg.amp)
    else:
        records, image_ids = dynamic_detections(t.model.detector, t.val_loader, t.device)
    gathered = distributed.gather_to_main((records, image_ids))
    if gathered is None:
        return None
    all_records = [r for part, _ in gathered for r in part]
    all_ids = sorted({i for _, ids in gathered for i in ids})
    return coco_map(t.val_set.coco, all_records, all_ids)


def training_state(t: Training, cfg, progress: Progress) -> dict[str, Any]:
    """Everything `resume` needs to continue exactly: weights, optimizer, schedule, RNGs."""
    return {
        "model": t.model.state_dict(),
        "optimizer": t.optimizer.state_dict(),
        "scheduler": t.scheduler.state_dict(),
        "scaler": t.scaler.state_dict() if t.scaler is not None else None,
        "progress": asdict(progress),
        "config": OmegaConf.to_container(cfg, resolve=True),
        "rng": rng_state(),
    }


def restore(t: Training, state: dict[str, Any]) -> Progress:
    """Load a `training_state` into built objects; return where to continue."""
    t.model.load_state_dict(state["model"])
    t.optimizer.load_state_dict(state["optimizer"])
    t.scheduler.load_state_dict(state["scheduler"])
    if t.scaler is not None and state.get("scaler"):
        t.scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    return Progress(**state["progress"])


def run(cfg) -> dict[str, Any]:
    """Train (or only evaluate) as configured; return the summary, also in summary.json."""
    t = build_training(cfg)
    main = t.world.is_main  # only rank 0 writes logs, summaries and checkpoints
    out_dir = Path(cfg.out_dir)
    ckpt_dir = out_dir / "checkpoints"
    out_dir.mkdir(parents=True, exist_ok=True)
    say = print if main else (lambda *a, **k: None)
    progress = Progress()
    if cfg.resume:
        path = find_resume(cfg.resume, ckpt_dir)
        progress = restore(t, load_checkpoint(path))
        say(f"ssd-npu: resumed from {path} at step {progress.step} (epoch {progress.epoch})")
    say(
        f"ssd-npu: device={t.device.torch} ranks={t.world.size} shape={cfg.shape} "
        f"canvas={list(cfg.canvas)} max_boxes={cfg.max_boxes} fit={cfg.fit} "
        f"batch={cfg.batch_size}x{t.world.size} steps={t.total_steps} "
        f"anchors={t.model.anchors.shape[0]} data={t.data_root} out={out_dir}"
    )
    telemetry = Telemetry(
        out_dir, 0 if cfg.eval_only else t.total_steps - progress.step, enabled=main
    )
    evals: list[dict[str, Any]] = []
    saved: list[Path] = []

    def save(p: Progress) -> None:
        if main:
            state = training_state(t, cfg, p)
            saved.append(save_checkpoint(state, ckpt_dir, p.step, cfg.keep_checkpoints))
        else:
            saved.append(checkpoint_path(ckpt_dir, p.step))

    def log_eval(step: int) -> None:
        result = evaluate(t, cfg)
        if result is not None:
            keys = ("mAP", "mAP50", "num_images", "num_detections")
            evals.append({"step": step, **{k: result[k] for k in keys}})
            telemetry.log_scalars(step, {"eval/mAP": result["mAP"], "eval/mAP50": result["mAP50"]})

    profiler = None
    if cfg.profile_steps and main and not cfg.eval_only:
        profiler = t.device.profiler(str(out_dir / "profile"), cfg.profile_steps)

    def on_step_end(p: Progress) -> None:
        if profiler is not None:
            profiler.step()
        if cfg.checkpoint_every and p.step % cfg.checkpoint_every == 0:
            save(p)

    def stop_requested() -> bool:
        # Every rank must stop after the same step, or one would wait forever in a collective.
        return bool(distributed.any_rank(stop.requested(), t.device))

    def on_epoch_end(p: Progress) -> None:
        if cfg.eval and cfg.eval_every and p.epoch % cfg.eval_every == 0 and p.epoch < cfg.epochs:
            log_eval(p.step)

    graphs_before = graphs_compiled()
    # batches and graphs per box-count bucket (boxes [B, M, 4]: M), for summary.json
    buckets = BucketCounter(t.step_fn, bucket_sizes(cfg.max_boxes), cfg.compile)
    step_fn = buckets if cfg.shape == "fixed" else t.step_fn
    stop = StopOnSignal()
    failure: NonFiniteLoss | None = None
    try:
        if not cfg.eval_only:
            with stop, profiler or contextlib.nullcontext():
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
                    stop_requested=stop_requested,
                    world=t.world,
                    scaler=t.scaler,
                )
            if not saved or saved[-1] != checkpoint_path(ckpt_dir, progress.step):
                save(progress)
        if (cfg.eval or cfg.eval_only) and not stop.requested():
            log_eval(progress.step)
    except NonFiniteLoss as err:
        # Still write summary.json (timings so far, the error) before stopping.
        last = list_checkpoints(ckpt_dir)
        failure = NonFiniteLoss(
            f"{err} The last good checkpoint is {last[-1] if last else 'not written yet'}."
        )
    finally:
        telemetry.close()

    graphs = graphs_compiled() - graphs_before if cfg.compile else None
    summary = telemetry.summary(
        graphs_compiled=graphs,
        # dynamo's own recompiles: a function compiled again because a guard (a shape) failed
        recompiles=t.step_fn.compiled.recompiles if cfg.compile else 0,
        # dynamo's guard failures (which tensor changed), the first few, for the user to read
        recompile_reasons=t.step_fn.compiled.recompile_reasons[:5] if cfg.compile else [],
        device=str(t.device.torch),
        shape=cfg.shape,
        canvas=list(cfg.canvas),
        max_boxes=cfg.max_boxes if isinstance(cfg.max_boxes, int) else list(cfg.max_boxes),
        fit=cfg.fit,
        batch_size=cfg.batch_size,
        global_step=progress.step,
        checkpoint=str(saved[-1]) if saved else None,
        interrupted=stop.requested(),
        error=str(failure) if failure else None,
    )
    if cfg.shape == "fixed":
        summary["buckets"] = buckets.summary()
    if evals:
        summary["eval"] = {"mAP": evals[-1]["mAP"], "mAP50": evals[-1]["mAP50"], "history": evals}
    telemetry.write_summary(summary)
    if failure is not None:
        raise failure
    if stop.requested():
        raise Interrupted(
            f"stopped by {signal.Signals(stop.signum).name} at step {progress.step}; checkpoint "
            f"{saved[-1]}. Resume with: python train.py <same overrides> "
            f"hydra.run.dir={out_dir} resume=auto",
            stop.signum,
        )
    say(
        json.dumps(
            {k: v for k, v in summary.items() if k != "eval"} | {"eval": evals[-1:]}, indent=2
        )
    )
    return summary
