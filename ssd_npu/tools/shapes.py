"""Find the dynamic shapes of any training step: `find_dynamic_shapes(step, batches)`.

Calls `step(batch)` once per batch under an `OpRecorder` (every aten op with its shapes and
the source line that called it) and reports the ops whose shapes change between calls: on a
shape-compiling device (Ascend NPU, torch.compile(dynamic=False)) each new shape is a new
kernel compile. It also reports the ops that force the host to wait for the device (host
syncs). Works on any model: pass your own forward + backward as `step`.

Dynamic: an op at a site (same kind, fwd/bwd) is dynamic when the set of (input, output)
shapes it ran with differs between any two recorded calls that ran it, the first call
included. An op that runs only in some calls with shapes seen before (the optimizer creating
its momentum buffers in step 1) is not. `read(result)`, if given, runs after each call under
the recorder's "logging" phase: the host reads a loop makes on purpose, counted apart.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from time import perf_counter
from typing import Any

from ssd_npu.tools.op_recorder import OpRecorder, Signature

EXAMPLES = 4


@dataclass
class ShapeReport:
    """What `find_dynamic_shapes` found. Prints as the audit table; `save` writes JSON.

    dynamic_ops: one entry per (kind, site, op) whose shapes changed: `op` (aten name),
    `site` ("file:line" of the first frame outside torch: your code, or torchvision's),
    `kind` (fwd | bwd), `distinct_shapes`, `calls_per_step`, `examples` ("in -> out" shapes).
    host_syncs: entries of the ops that made the host wait inside the step, with `reason`.
    logging_syncs: host reads made by `read` (outside the step), per site.
    """

    steps: int
    dynamic_ops: list[dict[str, Any]]
    host_syncs: list[dict[str, Any]]
    logging_syncs: list[dict[str, Any]]
    seconds: float
    info: dict[str, Any] = field(default_factory=dict)  # e.g. shape, device, data summary

    def to_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "seconds": self.seconds,
            **self.info,
            "dynamic_ops": self.dynamic_ops,
            "host_syncs": self.host_syncs,
            "logging_syncs": self.logging_syncs,
        }

    def save(self, path: str | Path) -> Path:
        """Write the report as JSON (the public `dynamic_shapes.json`); return its path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    def __str__(self) -> str:
        return format_report(self.to_dict())


def find_dynamic_shapes(
    step: Callable[[Any], Any],
    batches: Iterable[Any],
    *,
    read: Callable[[Any], Any] | None = None,
    info: dict[str, Any] | None = None,
) -> ShapeReport:
    """Record `step(batch)` for every batch (at least two, to compare); return the report.

    `step`: your training step (forward, loss, backward, optimizer step), or any function of
    one batch. `read(result)`: optional host reads of the step's result (logging), recorded
    apart from the step. `info`: extra fields for the report (shown in its header).
    """
    recorder = OpRecorder()
    start = perf_counter()
    calls = 0
    try:
        for batch in batches:
            recorder.start_step()
            result = step(batch)
            if read is not None:
                recorder.phase = "logging"
                read(result)
            recorder.end_step()
            calls += 1
    finally:
        recorder.end_step()  # leave no mode pushed if the step failed
    if calls < 2:
        raise ValueError(f"find_dynamic_shapes needs at least 2 batches to compare; got {calls}.")
    found = analyse(recorder)
    return ShapeReport(
        steps=calls, seconds=round(perf_counter() - start, 2), info=dict(info or {}), **found
    )


def _fmt(sig: Signature) -> str:
    shapes_in, shapes_out = (", ".join(str(list(s)) for s in part) for part in sig)
    return f"{shapes_in} -> {shapes_out}"


def _by_line(site: str) -> tuple[str, int]:
    """Sort key: file, then line as a number (`_utils.py:92` before `_utils.py:100`)."""
    path, _, line = site.rpartition(":")
    return (path, int(line)) if line.isdigit() else (site, 0)


def analyse(recorder: OpRecorder) -> dict[str, list[dict[str, Any]]]:
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


def _header(report: dict[str, Any]) -> list[str]:
    """The report's first lines: what was recorded (the app's audit adds its pipeline and data)."""
    known = ("shape", "device", "canvas", "batch_size")
    setting = " ".join(f"{k.removesuffix('_size')}={report[k]}" for k in known if k in report)
    lines = [
        f"shape audit: {setting + ' ' if setting else ''}steps={report['steps']} "
        f"({report['seconds']} s)"
    ]
    data = report.get("data")
    if data:
        shapes = ", ".join("x".join(map(str, s)) for s in data["image_shapes"][:3])
        lines.append(
            f"data (what the device would see unfixed): {data['images']} images, "
            f"{data['distinct_image_shapes']} distinct shapes (e.g. {shapes}), "
            f"boxes per image {data['box_counts']}"
        )
        if data["device_batch_shapes"]:
            lines.append(f"device batch shapes: {data['device_batch_shapes']}")
    return lines


def format_report(report: dict[str, Any]) -> str:
    """The console table: what was recorded, dynamic ops and host syncs grouped by site."""
    dyn, syncs, logging = report["dynamic_ops"], report["host_syncs"], report["logging_syncs"]
    lines = _header(report)
    sites = len({e["site"] for e in dyn})
    lines.append(f"\ndynamic ops: {len(dyn)} at {sites} sites")
    lines += _site_rows(dyn) if dyn else ["  none: every op has the same shapes in every step"]
    lines.append(f"\nhost syncs inside the step: {len(syncs)}")
    lines += _sync_rows(syncs) or ["  none"]
    if logging:
        per_step = sum(e["calls_per_step"] for e in logging)
        lines.append(
            f"\nlogging syncs, outside the step (the loop reads the losses one step late): "
            f"{per_step:g} per step at {', '.join(sorted({e['site'] for e in logging}))}"
        )
    return "\n".join(lines)
