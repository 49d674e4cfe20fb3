"""`run(cfg)`: build everything from the config, train with hooks, write summary.json.

Reads top to bottom: build -> resume -> hooks (`build_hooks`) -> loop -> summary
(`summarise`). The loop (ssd_npu.engine.loop)
knows nothing of the config; the hooks (ssd_npu.engine.hooks) do the checkpointing, evaluation,
profiling, bucket counting and stop signals around it.
"""

from __future__ import annotations

import json
import signal
from dataclasses import dataclass
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
from ssd_npu.config import TrainConfig
from ssd_npu.device.prefetch import DevicePrefetcher
from ssd_npu.engine.checkpoint import (
    Stateful,
    TrainState,
    find_resume,
    list_checkpoints,
    load_checkpoint,
)
from ssd_npu.engine.ema import WeightAverage, WeightAverageHook, on_averaged_weights
from ssd_npu.engine.hooks import (
    BucketCountHook,
    CheckpointHook,
    ProfilerHook,
    StopSignalHook,
)
from ssd_npu.engine.loop import Hook, NonFiniteLoss, Progress, TrainLoop
from ssd_npu.engine.telemetry import Telemetry
from ssd_npu.errors import Interrupted
from ssd_npu.evaluation.background import BackgroundCoco
from ssd_npu.evaluation.hook import EvalHook, Target


def _say(main: bool, text: str) -> None:
    if main:  # only rank 0 prints, logs, summarises and checkpoints
        print(text, flush=True)


@dataclass
class RunHooks:
    """The hooks `run` trains with, and the ones it reads when training ends."""

    stop: StopSignalHook
    checkpoints: CheckpointHook
    evals: EvalHook
    buckets: BucketCountHook | None  # the fixed path only: dynamic batches have no bucket
    profiler: ProfilerHook | None
    background: BackgroundCoco | None  # eval.background's side process (rank 0)
    average: WeightAverageHook | None = None  # optim.ema: updates the weight average

    def ordered(self) -> list[Hook]:
        """The loop's hook list. Order matters: the weight average, the bucket counts and the
        evaluations come before the checkpoints, so a checkpoint keeps what they did up to its
        step (an epoch's evaluation too: `CheckpointHook` writes an epoch's last step again at
        `after_epoch`). Every checkpoint, the last step's included, is written when its step
        is read, before a later evaluation (or the final one) can fail."""
        ordered = [self.average, self.stop, self.buckets, self.evals, self.checkpoints]
        return [hook for hook in (*ordered, self.profiler) if hook is not None]

    def stateful(self) -> dict[str, Stateful]:
        """The hooks whose state checkpoints keep (see TrainState.attach)."""
        kept: dict[str, Stateful] = {"eval": self.evals}
        if self.buckets is not None:
            kept["buckets"] = self.buckets
        return kept


def run(cfg: TrainConfig) -> dict[str, Any]:
    """Train (or only evaluate) as configured; return the summary, also in summary.json.

    build -> resume -> hooks (their state from the checkpoint) -> loop -> summary."""
    t = build_training(cfg)
    main = t.world.is_main
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = OmegaConf.to_container(cfg, resolve=True)
    # optim.ema: the average of the plain module (not the step's compiled/DDP wrapper)
    ema = None
    if cfg.optim.ema is not None:
        ema = WeightAverage(t.model, cfg.optim.ema, buffers=cfg.optim.ema_buffers)
    state = TrainState(t.model, t.optimizer, t.scheduler, t.scaler, config, t.device, ema)
    progress = Progress()
    if cfg.resume:
        path = find_resume(cfg.resume, out_dir / "checkpoints")
        progress = state.load(load_checkpoint(path))
        _say(main, f"ssd-npu: resumed from {path} at step {progress.step} (epoch {progress.epoch})")
        if progress.step >= t.total_steps and not cfg.eval_only:
            return _already_complete(out_dir, progress, main)
    _say(main, _banner(cfg, t, out_dir))

    steps_left = 0 if cfg.eval_only else t.total_steps - progress.step
    telemetry = Telemetry(out_dir, steps_left, enabled=main)
    hooks = build_hooks(cfg, t, state, telemetry, out_dir)
    state.attach(hooks.stateful())  # a resumed run's evaluations and counts continue

    # launch to the loop: imports, config, data sets (JSON parse, arrays, checks, the bucket
    # sampler's counts), model, resume; the first batch's wait is the first step's data time
    startup_s = round(process_age_s(), 3)
    failure: NonFiniteLoss | None = None
    try:
        if cfg.eval_only:
            hooks.evals.evaluate(progress.step)
            hooks.evals.finish()
        else:
            loop = TrainLoop(
                t.step,
                t.optimizer,
                t.scheduler,
                DevicePrefetcher(t.data.train, t.device),  # the next batch copied during a step
                t.data.train_sampler,
                t.device,
                telemetry,
                hooks.ordered(),
                scaler=t.scaler,
                world=t.world,
                optimizer_step=t.optimizer_step,
            )
            progress = loop.run(cfg.epochs, cfg.max_steps, progress)
    except NonFiniteLoss as err:
        # Still write summary.json (timings so far, the error) before stopping.
        last = list_checkpoints(out_dir / "checkpoints")
        failure = NonFiniteLoss(
            f"{err} The last good checkpoint is {last[-1] if last else 'not written yet'}."
        )
    finally:
        if hooks.background is not None:  # any exit: the side process never outlives the run
            hooks.background.close()
        telemetry.close()

    summary = summarise(cfg, t, telemetry, hooks, progress, startup_s, failure)
    telemetry.write_summary(summary)
    if failure is not None:
        raise failure
    stop = hooks.stop
    if stop.requested:
        raise Interrupted(
            f"stopped by {signal.Signals(stop.signal.signum).name} at step {progress.step}; "
            f"checkpoint {hooks.checkpoints.last}. Resume with: python train.py <same overrides> "
            f"hydra.run.dir={out_dir} resume=auto",
            stop.signal.signum,
        )
    history = hooks.evals.history
    shown = {k: v for k, v in summary.items() if k != "eval"} | {"eval": history[-1:]}
    if hooks.evals.target is not None:  # the time to the target beside the final mAP
        shown["eval_target"] = summary.get("eval", {}).get("target")
    _say(main, json.dumps(shown, indent=2))
    return summary


def build_hooks(
    cfg: TrainConfig, t: Training, state: TrainState, telemetry: Telemetry, out_dir: Path
) -> RunHooks:
    """The run's hooks from its config and built objects: stop signals, checkpoints,
    evaluation (with its picture, side process and target), bucket counts, the profiler."""
    main = t.world.is_main
    evaluator = build_evaluator(cfg, t)
    if state.ema is not None:  # evaluation (and its pictures) on the averaged weights
        evaluator.detections = on_averaged_weights(evaluator.detections, state.ema)
    # rank 0 (the TensorBoard writer) pictures the first show.images val images at each eval
    sheet = detection_sheet(cfg, t, evaluator) if main else None
    evaluates = cfg.eval.enabled or cfg.eval_every > 0 or cfg.eval_only
    # eval.background: rank 0 scores in a side process; the other ranks only gather
    background = None
    if cfg.eval.background and main and evaluates:
        background = BackgroundCoco(evaluator.ann_file, cfg.eval.coco)
    target = cfg.eval.target_map
    evals = EvalHook(
        evaluator,
        telemetry,
        cfg.eval_every,
        cfg.epochs,
        final=cfg.eval.enabled,
        sheet=sheet,
        background=background,
        target=None
        if target is None
        else Target(target, cfg.eval.target_metric, cfg.eval.target_stop),
    )
    checkpoints = CheckpointHook(
        state,
        out_dir / "checkpoints",
        cfg.checkpoint_every,
        cfg.keep_checkpoints,
        main,
        last_step=t.total_steps,
    )
    buckets = None
    if t.path.static:
        buckets = BucketCountHook(t.path.box_rows, count_graphs=cfg.compile)
    profiler = None
    if cfg.profile_steps and main and not cfg.eval_only:
        profiler = ProfilerHook(t.device, out_dir / "profile", cfg.profile_steps)
    average = WeightAverageHook(state.ema) if state.ema is not None else None
    return RunHooks(StopSignalHook(), checkpoints, evals, buckets, profiler, background, average)


def summarise(
    cfg: TrainConfig,
    t: Training,
    telemetry: Telemetry,
    hooks: RunHooks,
    progress: Progress,
    startup_s: float,
    failure: NonFiniteLoss | None,
) -> dict[str, Any]:
    """summary.json: the telemetry's timings, the compile statistics, what ran, and the
    evaluations (every one of the run, a resumed run's too)."""
    compiled = t.step.compile_statistics()
    evals, evaluator = hooks.evals, hooks.evals.evaluator
    summary = telemetry.summary(
        graphs_compiled=t.step.graphs,
        # dynamo's own recompiles: the step compiled again because a guard (a shape) failed
        recompiles=compiled["recompiles"],
        # dynamo's guard failures (which tensor changed), the first few, for the user to read
        recompile_reasons=compiled["recompile_reasons"],
        graph_breaks=compiled["graph_breaks"],
        cudagraph_skips=compiled["cudagraph_skips"],
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
        checkpoint=str(hooks.checkpoints.last) if hooks.checkpoints.last else None,
        interrupted=hooks.stop.requested,
        error=str(failure) if failure else None,
    )
    if hooks.buckets is not None:
        summary["buckets"] = hooks.buckets.summary()
    if evals.history:
        last_eval = evals.history[-1]
        summary["eval"] = {"mAP": last_eval["mAP"], "mAP50": last_eval["mAP50"]}
        summary["eval"]["history"] = evals.history
        summary["eval"]["postprocess"] = evaluator.postprocess
        # the device postprocess under compile=true: graphs compiled for evaluation (1 expected)
        summary["eval"]["graphs_compiled"] = evaluator.detect.graphs if evaluator.detect else None
        summary["eval"]["coco"] = evaluator.engine
        summary["eval"]["background"] = evals.background is not None
        if evals.target is not None:
            summary["eval"]["target"] = evals.target_summary(progress.step)
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
