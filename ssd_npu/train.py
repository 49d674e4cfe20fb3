"""`run(cfg)`: build everything from the config, train with hooks, write summary.json.

Reads top to bottom: build -> resume -> hooks -> loop -> summary. The loop (ssd_npu.engine)
knows nothing of the config; the hooks (ssd_npu.hooks) do the checkpointing, evaluation,
profiling, bucket counting and stop signals around it.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from ssd_npu.build import (
    Training,
    build_evaluator,
    build_training,
    detection_sheet,
    process_age_s,
)
from ssd_npu.checkpoint import TrainState, find_resume, list_checkpoints, load_checkpoint
from ssd_npu.config import TrainConfig
from ssd_npu.data.buckets import bucket_sizes
from ssd_npu.ema import WeightAverage, WeightAverageHook, on_averaged_weights
from ssd_npu.engine import Hook, NonFiniteLoss, Progress, TrainLoop
from ssd_npu.errors import Interrupted
from ssd_npu.hooks import BucketCountHook, CheckpointHook, EvalHook, ProfilerHook, StopSignalHook
from ssd_npu.prefetch import DevicePrefetcher
from ssd_npu.telemetry import Telemetry


def _say(main: bool, text: str) -> None:
    if main:  # only rank 0 prints, logs, summarises and checkpoints
        print(text, flush=True)


def run(cfg: TrainConfig) -> dict[str, Any]:
    """Train (or only evaluate) as configured; return the summary, also in summary.json."""
    t = build_training(cfg)
    main = t.world.is_main
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_dir = out_dir / "checkpoints"
    config = OmegaConf.to_container(cfg, resolve=True)
    # optim.ema: the average of the plain module (not the step's compiled/DDP wrapper)
    ema = None
    if cfg.optim.ema is not None:
        ema = WeightAverage(t.model, cfg.optim.ema, buffers=cfg.optim.ema_buffers)
    state = TrainState(t.model, t.optimizer, t.scheduler, t.scaler, config, t.device, ema)
    progress = Progress()
    if cfg.resume:
        path = find_resume(cfg.resume, ckpt_dir)
        progress = state.load(load_checkpoint(path))
        _say(main, f"ssd-npu: resumed from {path} at step {progress.step} (epoch {progress.epoch})")
        if progress.step >= t.total_steps and not cfg.eval_only:
            return _already_complete(out_dir, progress, main)
    _say(main, _banner(cfg, t, out_dir))

    steps_left = 0 if cfg.eval_only else t.total_steps - progress.step
    telemetry = Telemetry(out_dir, steps_left, enabled=main)
    evaluator = build_evaluator(cfg, t)
    if ema is not None:  # evaluation (and its pictures) on the averaged weights
        evaluator.detections = on_averaged_weights(evaluator.detections, ema)
    # rank 0 (the TensorBoard writer) pictures the first show.images val images at each eval
    sheet = detection_sheet(cfg, t, evaluator) if main else None
    stop = StopSignalHook()
    checkpoints = CheckpointHook(state, ckpt_dir, cfg.checkpoint_every, cfg.keep_checkpoints, main)
    evals = EvalHook(
        evaluator,
        telemetry,
        cfg.eval_every,
        cfg.epochs,
        final=cfg.eval.enabled,
        sheet=sheet,
    )
    # torchvision's dynamic batches have no box-count bucket: counted on the fixed path only
    buckets = None
    if t.path.static:
        buckets = BucketCountHook(bucket_sizes(cfg.max_boxes), count_graphs=cfg.compile)
    # Hooks run in list order; the one place order matters: `after_train` writes the last
    # step's checkpoint before the final evaluation, so a failed or killed evaluation loses no
    # training.
    hooks: list[Hook] = [stop, checkpoints, evals]
    if ema is not None:  # first: the average after step s is in step s's checkpoint
        hooks.insert(0, WeightAverageHook(ema))
    if buckets is not None:
        hooks.append(buckets)
    if cfg.profile_steps and main and not cfg.eval_only:
        hooks.append(ProfilerHook(t.device, out_dir / "profile", cfg.profile_steps))

    # launch to the loop: imports, config, data sets (JSON parse, arrays, checks, the bucket
    # sampler's counts), model, resume; the first batch's wait is the first step's data time
    startup_s = round(process_age_s(), 3)
    failure: NonFiniteLoss | None = None
    try:
        if cfg.eval_only:
            evals.evaluate(progress.step)
        else:
            loop = TrainLoop(
                t.step,
                t.optimizer,
                t.scheduler,
                DevicePrefetcher(t.data.train, t.device),  # the next batch copied during a step
                t.data.train_sampler,
                t.device,
                telemetry,
                hooks,
                scaler=t.scaler,
                world=t.world,
                optimizer_step=t.optimizer_step,
            )
            progress = loop.run(cfg.epochs, cfg.max_steps, progress)
    except NonFiniteLoss as err:
        # Still write summary.json (timings so far, the error) before stopping.
        last = list_checkpoints(ckpt_dir)
        failure = NonFiniteLoss(
            f"{err} The last good checkpoint is {last[-1] if last else 'not written yet'}."
        )
    finally:
        telemetry.close()

    summary = telemetry.summary(
        graphs_compiled=t.step.graphs,
        # dynamo's own recompiles: the step compiled again because a guard (a shape) failed
        recompiles=t.step.recompiles,
        # dynamo's guard failures (which tensor changed), the first few, for the user to read
        recompile_reasons=t.step.recompile_reasons[:5],
        graph_breaks=t.step.compiled.graph_breaks if t.step.compiled else None,
        cudagraph_skips=t.step.compiled.cudagraph_skips if t.step.compiled else None,
        device=str(t.device.torch),
        amp=t.device.amp_name(cfg.amp_dtype) if cfg.amp else None,  # bf16 | fp16; None: fp32
        amp_note=t.device.amp_note(cfg.amp, cfg.amp_dtype),  # fp16 on npu: a host sync per step
        shape=cfg.shape,
        model=cfg.model.name,
        canvas=list(cfg.canvas),
        max_boxes=cfg.max_boxes if isinstance(cfg.max_boxes, int) else list(cfg.max_boxes),
        fit=cfg.fit,
        augment_on=t.path.augment_on,  # host | device: where the augmentation and fit ran
        batch_size=cfg.batch_size,
        ema=cfg.optim.ema,  # decay of the evaluated weight average; None: the trained weights
        startup_s=startup_s,
        data_s=round(t.data_s, 3),
        global_step=progress.step,
        checkpoint=str(checkpoints.last) if checkpoints.last else None,
        interrupted=stop.requested,
        error=str(failure) if failure else None,
    )
    if buckets is not None:
        summary["buckets"] = buckets.summary()
    if evals.history:
        last_eval = evals.history[-1]
        summary["eval"] = {"mAP": last_eval["mAP"], "mAP50": last_eval["mAP50"]}
        summary["eval"]["history"] = evals.history
        summary["eval"]["postprocess"] = evaluator.postprocess
        # the device postprocess under compile=true: graphs compiled for evaluation (1 expected)
        summary["eval"]["graphs_compiled"] = evaluator.detect.graphs if evaluator.detect else None
    telemetry.write_summary(summary)
    if failure is not None:
        raise failure
    if stop.requested:
        raise Interrupted(
            f"stopped by {signal.Signals(stop.signal.signum).name} at step {progress.step}; "
            f"checkpoint {checkpoints.last}. Resume with: python train.py <same overrides> "
            f"hydra.run.dir={out_dir} resume=auto",
            stop.signal.signum,
        )
    shown = {k: v for k, v in summary.items() if k != "eval"} | {"eval": evals.history[-1:]}
    _say(main, json.dumps(shown, indent=2))
    return summary


def _banner(cfg: TrainConfig, t: Training, out_dir: Path) -> str:
    """The run's first line (and a second where the amp setting costs a host sync per step)."""
    amp = t.device.amp_name(cfg.amp_dtype) if cfg.amp else "off"
    note = t.device.amp_note(cfg.amp, cfg.amp_dtype)
    return (
        f"ssd-npu: device={t.device.torch} ranks={t.world.size} shape={cfg.shape} "
        f"model={cfg.model.name} canvas={list(cfg.canvas)} max_boxes={cfg.max_boxes} fit={cfg.fit} "
        f"augment_on={t.path.augment_on} batch={cfg.batch_size}x{t.world.size} steps={t.total_steps} amp={amp} "
        f"anchors={t.model.anchors.shape[0]} data={t.data_root} out={out_dir} "
        f"data_s={t.data_s:.1f} startup_s={process_age_s():.1f}"
    ) + (f"\nssd-npu: note: {note}" if note else "")


def _already_complete(out_dir: Path, progress: Progress, main: bool) -> dict[str, Any]:
    """resume on a finished run: nothing to train; the run's summary as it stands."""
    _say(
        main,
        f"ssd-npu: the run in {out_dir} is complete (step {progress.step}); nothing to train. "
        "Raise epochs or max_steps to train further.",
    )
    path = out_dir / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else {"global_step": progress.step}
