"""Find the dynamic shapes: record real training steps, report the ops whose shapes change.

`run_audit(cfg)` builds the pipeline exactly as train.py does (`build_training`, same
overrides) and runs `audit.steps` steps of the real `engine.train_loop` under an
`OpRecorder` (ssd_npu/op_recorder.py). The loop's own clock switches the recorder: the
device sync before the step starts "step" (forward, loss, backward, optimizer step), the
sync after it starts "logging" (the loss `.item()` reads the loop makes on purpose, outside
the timed step), and `telemetry.log_step` ends it. Data loading runs unrecorded (host side).

Dynamic: an op at a site (same kind, fwd/bwd) is dynamic when the set of (input, output)
shapes it ran with differs between any two recorded steps that ran it, the first step
included: a new shape is a new kernel compile on a shape-compiling device. An op that runs
only in some steps with shapes seen before (the optimizer creating its momentum buffers in
step 1) is not. Host syncs: ops whose result size or value the host must wait for.
"""

from __future__ import annotations

import json
from pathlib import Path
from time import perf_counter
from typing import Any

from ssd_npu.config import ConfigError
from ssd_npu.engine import train_loop
from ssd_npu.op_recorder import OpRecorder, Signature
from ssd_npu.train import build_training

EXAMPLES = 4


class _Clock:
    """The Device the loop sees: its synchronize() calls also switch the recorder's phase."""

    def __init__(self, device: Any, recorder: OpRecorder) -> None:
        self.device, self.recorder, self.torch = device, recorder, device.torch

    def synchronize(self) -> None:
        self.device.synchronize()
        if self.recorder.phase is None:
            self.recorder.start_step()
        elif self.recorder.phase == "step":
            self.recorder.phase = "logging"


class _StepEnd:
    """The Telemetry the loop sees: log_step() closes the recorded step."""

    def __init__(self, recorder: OpRecorder) -> None:
        self.recorder, self.step_ms = recorder, []

    def log_step(self, step: int, step_ms: float, *args: Any, **kwargs: Any) -> None:
        self.recorder.end_step()
        self.step_ms.append(step_ms)


class _DataProbe:
    """Wraps the train loader; notes per batch the shapes the device would see unfixed."""

    def __init__(self, loader: Any) -> None:
        self.loader, self.sampler, self.batches = loader, loader.sampler, []
        self.batch_size = loader.batch_size

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            if isinstance(batch.images, list):  # DynamicBatch: what torchvision gets
                sizes = [list(image.shape) for image in batch.images]
                boxes = [len(t["boxes"]) for t in batch.targets]
                device = None
            else:  # FixedBatch: the image and box count before fitting and padding
                sizes = [[3, *hw] for hw in batch.orig_sizes.tolist()]
                boxes = batch.valid.sum(1).tolist()
                device = {"images": list(batch.images.shape), "boxes": list(batch.boxes.shape)}
            self.batches.append({"image_shapes": sizes, "boxes": boxes, "device": device})
            yield batch


def _fmt(sig: Signature) -> str:
    shapes_in, shapes_out = (", ".join(str(list(s)) for s in part) for part in sig)
    return f"{shapes_in} -> {shapes_out}"


def _by_line(site: str) -> tuple[str, int]:
    """Sort key: file, then line as a number (`_utils.py:92` before `_utils.py:100`)."""
    path, _, line = site.rpartition(":")
    return (path, int(line)) if line.isdigit() else (site, 0)


def analyse(recorder: OpRecorder) -> dict[str, Any]:
    """Dynamic ops, in-step host syncs and logging syncs from a recorder's steps."""
    keys = sorted(set().union(*recorder.steps)) if recorder.steps else []
    dynamic, syncs = [], []
    for key in keys:
        kind, site, op = key
        seqs = [step.get(key, []) for step in recorder.steps]
        ran = [set(seq) for seq in seqs if seq]  # the steps that ran this op here
        distinct = sorted(set().union(*ran))
        everywhere = ran[0].intersection(*ran[1:])
        varying = [s for s in distinct if s not in everywhere]
        entry = {
            "op": op,
            "site": site,
            "kind": kind,
            "called_from": sorted(recorder.callers.get(key, ()))[:3],
            "distinct_shapes": len(distinct),
            "calls_per_step": [len(seq) for seq in seqs],
            "examples": [_fmt(s) for s in (varying + [s for s in distinct if s in everywhere])],
        }
        entry["examples"] = entry["examples"][:EXAMPLES]
        if any(shapes != ran[0] for shapes in ran):
            dynamic.append(entry)
        if key in recorder.syncs:
            syncs.append({**entry, "reason": recorder.syncs[key]})
    # grouped by site, the sites with the most distinct shapes first
    worst = {}
    for e in dynamic + syncs:
        worst[e["site"]] = max(worst.get(e["site"], 0), e["distinct_shapes"])
    order = lambda e: (-worst[e["site"]], _by_line(e["site"]), -e["distinct_shapes"], e["op"])  # noqa: E731
    logging = [
        {"op": op, "site": site, "calls": n, "calls_per_step": n / max(1, len(recorder.steps))}
        for (site, op), n in sorted(recorder.logging.items())
    ]
    return {
        "dynamic_ops": sorted(dynamic, key=order),
        "host_syncs": sorted(syncs, key=order),
        "logging_syncs": logging,
    }


def summarise_data(batches: list[dict[str, Any]]) -> dict[str, Any]:
    """Distinct image shapes and box counts over the recorded batches (and device shapes)."""
    shapes = sorted({tuple(s) for b in batches for s in b["image_shapes"]})
    boxes = sorted({n for b in batches for n in b["boxes"]})
    device = sorted({json.dumps(b["device"]) for b in batches if b["device"]})
    return {
        "images": sum(len(b["boxes"]) for b in batches),
        "distinct_image_shapes": len(shapes),
        "image_shapes": [list(s) for s in shapes[:10]],
        "distinct_box_counts": len(boxes),
        "box_counts": boxes,
        "device_batch_shapes": [json.loads(d) for d in device],
        "per_batch": batches,
    }


def run_audit(cfg: Any) -> dict[str, Any]:
    """Record `cfg.audit.steps` training steps of the configured pipeline; return the report."""
    steps = int(cfg.audit.steps)
    if steps < 2:
        raise ConfigError(f"audit.steps={steps} is not valid; give an integer >= 2 to compare.")
    if cfg.compile:
        print("audit: compile=true ignored; the audit records the eager ops a compiler would get")
        cfg.compile = False
    t = build_training(cfg)
    recorder, probe = OpRecorder(), _DataProbe(t.train_loader)
    end = _StepEnd(recorder)
    start = perf_counter()
    try:
        epochs = -(-steps // len(t.train_loader))
        train_loop(
            t.step_fn,
            t.optimizer,
            t.scheduler,
            probe,
            _Clock(t.device, recorder),
            end,
            epochs,
            steps,
        )
    finally:
        recorder.end_step()  # leave no mode pushed if the step failed
    report = {
        "steps": len(end.step_ms),  # steps the loop completed and logged
        "shape": cfg.shape,
        "device": str(t.device.torch),
        "canvas": list(cfg.canvas),
        "batch_size": int(cfg.batch_size),
        "seconds": round(perf_counter() - start, 2),
        **analyse(recorder),
        "data": summarise_data(probe.batches),
    }
    return report


def write_report(report: dict[str, Any], path: str | Path) -> Path:
    """Write the report as JSON (the public `dynamic_shapes.json`); return its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path


def _site_rows(entries: list[dict[str, Any]]) -> list[str]:
    """One line per site (entries come grouped by site, worst first): its most distinct
    shapes, the ops there (fwd/bwd), an example of its worst op and where it was called from."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for e in entries:
        groups.setdefault(e["site"], []).append(e)
    lines = [f"  {'shapes':>6}  {'site':<46} {'ops':<44} example (worst op)  <- called from"]
    for site, ops in groups.items():
        names = [f"{e['kind']} {e['op'].removeprefix('aten::')}" for e in ops]
        if len(names) > 3:
            names = names[:3] + [f"+{len(names) - 3}"]
        worst = ops[0]
        caller = f"  <- {', '.join(worst['called_from'])}" if worst["kind"] == "fwd" else ""
        lines.append(
            f"  {worst['distinct_shapes']:>6}  {site:<46} {', '.join(names):<44} "
            f"{worst['examples'][0] if worst['examples'] else '-'}{caller}"
        )
    return lines


def _sync_rows(entries: list[dict[str, Any]]) -> list[str]:
    """One line per host-sync op: site, kind and op, calls per step, why it syncs."""
    return [
        f"  {e['site']:<46} {e['kind']} {e['op'].removeprefix('aten::'):<20} "
        f"calls/step {'/'.join(map(str, e['calls_per_step'])):<12} {e['reason']}"
        for e in entries
    ]


def format_report(report: dict[str, Any]) -> str:
    """The console table: data shapes, dynamic ops and host syncs grouped by site."""
    data = report["data"]
    dyn, syncs, logging = report["dynamic_ops"], report["host_syncs"], report["logging_syncs"]
    lines = [
        f"shape audit: shape={report['shape']} device={report['device']} "
        f"canvas={report['canvas']} batch={report['batch_size']} steps={report['steps']} "
        f"({report['seconds']} s)",
        f"data (what the device would see unfixed): {data['images']} images, "
        f"{data['distinct_image_shapes']} distinct shapes (e.g. "
        f"{', '.join('x'.join(map(str, s)) for s in data['image_shapes'][:3])}), "
        f"boxes per image {data['box_counts']}",
    ]
    if data["device_batch_shapes"]:
        lines.append(f"device batch shapes: {data['device_batch_shapes']}")
    sites = len({e["site"] for e in dyn})
    lines.append(f"\ndynamic ops: {len(dyn)} at {sites} sites")
    lines += _site_rows(dyn) if dyn else ["  none: every op has the same shapes in every step"]
    lines.append(f"\nhost syncs inside the step: {len(syncs)}")
    lines += _sync_rows(syncs) or ["  none"]
    per_step = sum(e["calls_per_step"] for e in logging)
    lines.append(
        f"\nlogging syncs, outside the step (train_loop reads the losses after the clock): "
        f"{per_step:g} per step at {', '.join(sorted({e['site'] for e in logging})) or '-'}"
    )
    return "\n".join(lines)
