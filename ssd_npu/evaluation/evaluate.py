"""COCO box mAP for the fixed path and for torchvision's dynamic baseline, on the same weights.

Fixed path, `eval.postprocess=device` (`DeviceDetect`): the device runs the network AND the
detector's postprocess in fixed shapes (`ssd_npu.models.postprocess.fixed_postprocess`: [B, D]
detections and a valid mask, D = detections_per_img) as one static function, compiled once
under compile=true; the host receives one [B, D, 7] tensor per batch, keeps them, and after the pass maps every
box back (`unfit_boxes`, in bulk) and writes the COCO results in one go
(`ssd_npu.evaluation.records`).

Fixed path, `eval.postprocess=host`: the device runs only the static graph (`FixedDetector`:
`[B, 3, H, W]` -> head outputs). Everything data-dependent runs on the HOST: the detector's
own `postprocess_detections` (SSD: softmax over all anchors; RetinaNet: sigmoid per FPN level,
so the head outputs and anchors are split per level as `RetinaNet.forward` does; then box
decoding, score threshold, top-k, batched NMS; the number of boxes kept varies per image,
which would force a recompile on a shape-compiling device), then `unfit_boxes` maps canvas
pixels back to the original image for whichever fit (stretch, letterbox, pad) was used.

Dynamic path: `detector(list_of_images)` in eval mode, torchvision's unmodified inference
(its transform already maps boxes back to the input image). Where the device has no kernels
for torchvision's ops (nms on an NPU without torchvision_npu), its `postprocess_detections`
gets the head outputs and anchors copied to the host (`postprocess_on_host`).

Both produce COCO results as one array [N, 7] (`ssd_npu.evaluation.records`: image_id, xywh original
pixels, score, category_id), no dict per detection, and share `coco_map` (COCOeval with
`eval.coco`'s engine: faster-coco-eval, or pycocotools as the reference;
`ssd_npu.evaluation.cocoeval`).
Labels are COCO category ids here. Each evaluation is timed by phase: forward_s (the pass
over the val loader), records_s (the results array), cocoeval_s.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools.coco import COCO
from torch import Tensor

from ssd_npu.data.fixed_shape import FixedBatch
from ssd_npu.device import distributed
from ssd_npu.device.backend import Device
from ssd_npu.device.compiler import CompiledStep, CompileOptions
from ssd_npu.evaluation.cocoeval import GroundTruth, coco_map
from ssd_npu.evaluation.records import (
    empty_results,
    image_results,
    pack_per_image,
    packed_results,
    pad_cat,
)
from ssd_npu.families import eval_recipe_of
from ssd_npu.models.detector import Detector, FixedDetector, detector_spec, eval_mode
from ssd_npu.models.postprocess import Detections, as_dicts, fixed_postprocess


def check_eval_recipe(detector: Detector) -> None:
    """Raise ValueError if the detector's postprocess settings differ from its model's recipe
    (`eval_recipe_of`: what its torchvision builder sets)."""
    spec = detector_spec(detector)
    for name, want in dataclasses.asdict(eval_recipe_of(spec)).items():
        got = getattr(detector, name)
        if got != want:
            raise ValueError(
                f"detector.{name}={got}, but the {spec.name} eval recipe uses {want}; "
                "mAP would not be comparable to torchvision's published number."
            )


def postprocess_fixed(model: FixedDetector, *head: Tensor) -> list[dict]:
    """The detector's own postprocess of fixed head outputs, on the host, in fp32 (its
    family's `host_postprocess`).

    head: FixedDetector's outputs, e.g. cls_logits [B, A, C], bbox_regression [B, A, 4] (any
    device/dtype) -> per image {"boxes" [N, 4] xyxy canvas pixels, "scores" [N], "labels"
    [N]} (N varies: host only).
    """
    return model.family.host_postprocess(model, head)


def pack_detections(detections: Detections) -> Tensor:
    """Detections -> [B, D, 7] float32 (x1, y1, x2, y2, score, label, valid), so the host reads a
    batch's detections in one copy. Labels (< 2^24) and the 0/1 mask are exact in float32."""
    columns = (detections.scores, detections.labels, detections.valid)
    return torch.cat([detections.boxes.float(), *(c.float()[..., None] for c in columns)], dim=-1)


def unpack_detections(packed: Tensor) -> list[dict[str, Tensor]]:
    """[B, D, 7] from `pack_detections` -> per image {"boxes" [n, 4], "scores" [n], "labels" [n]}
    of the valid slots (n varies: host only), the format of `postprocess_detections`."""
    valid = packed[..., 6] > 0.5
    return as_dicts(Detections(packed[..., :4], packed[..., 4], packed[..., 5].long(), valid))


class DeviceDetect:
    """The fixed path's evaluation forward with the postprocess on the device.

    `detect(images [B, 3, H, W] on the device)` -> [B, D, 7] float32 packed detections
    (`pack_detections`; boxes in canvas pixels, D = detections_per_img): the network (under
    autocast with `amp`) and `fixed_postprocess` in float32, every shape static. With
    `compile_options` it runs under torch.compile(dynamic=False): one graph for the whole val set
    (its last batch is filled to the batch size), counted in `graphs`.
    """

    def __init__(
        self,
        model: FixedDetector,
        device: Device,
        amp: bool = False,
        compile_options: CompileOptions | None = None,
    ) -> None:
        self.model, self.device, self.amp = model, device, amp
        self.compiled: CompiledStep | None = None
        if compile_options is not None:
            self.compiled = CompiledStep(
                self.forward,
                compile_options.backend,
                fail_on_recompile=compile_options.fail_on_recompile,
                recompile_limit=compile_options.recompile_limit,
                mode=compile_options.mode,
            )

    def forward(self, images: Tensor) -> Tensor:
        with self.device.autocast(self.amp):
            head = self.model(images)
        detections = fixed_postprocess(self.model, *(output.float() for output in head))
        return pack_detections(detections)

    def __call__(self, images: Tensor) -> Tensor:
        return self.compiled(images) if self.compiled is not None else self.forward(images)

    @property
    def graphs(self) -> int | None:
        """Graphs compiled so far (None: not compiled)."""
        return self.compiled.graphs if self.compiled is not None else None


def _as_device(device: Device | torch.device | str) -> Device:
    if isinstance(device, Device):
        return device
    return Device.of(torch.device(device))


@dataclasses.dataclass
class Found:
    """One rank's detections over a val loader, and where the time went.

    results [N, 7] float64 (`ssd_npu.evaluation.records`: image_id, x, y, w, h original pixels,
    score, category_id); image_ids: the images evaluated (padding repeats left out); forward_s: the
    pass over the loader (batches, network, postprocess, copies to the host), seconds;
    records_s: building `results` from the detections, seconds."""

    results: np.ndarray
    image_ids: list[int]
    forward_s: float
    records_s: float


def fixed_batch_results(batch: FixedBatch, detections: list[dict[str, Tensor]]) -> np.ndarray:
    """Result rows of one FixedBatch; detections[i] boxes in canvas pixels (per-image dicts, as
    the host postprocess gives them), padding samples skipped."""
    packed = pack_per_image(detections)
    return packed_results(packed, batch.scales, batch.orig_sizes, batch.image_ids)


@torch.no_grad()
def fixed_detections(
    model: FixedDetector,
    loader: Iterable[FixedBatch],
    device: Device | torch.device | str,
    amp: bool = False,
    detect: DeviceDetect | None = None,
) -> Found:
    """Detections of every FixedBatch of `loader` (eval mode) as COCO results.

    With `detect` the postprocess runs on the device (`DeviceDetect`); without, on the host.
    The pass keeps each batch's packed detections [B, D, 7] (one copy per batch); the results
    are built after it, for all images at once (`ssd_npu.evaluation.records.packed_results`)."""
    dev = _as_device(device)
    check_eval_recipe(model.detector)
    start = time.perf_counter()
    packed: list[Tensor] = []
    scales, orig_sizes, image_ids = [], [], []
    with eval_mode(model):
        for batch in loader:
            images = batch.images.to(dev.torch, non_blocking=True)
            if detect is not None:
                packed.append(detect(images).cpu())  # one copy per batch
            else:
                with dev.autocast(amp):
                    head = model(images)
                # NMS keeps a data-dependent number of boxes: run it on the host, in fp32
                packed.append(pack_per_image(postprocess_fixed(model, *head)))
            scales.append(batch.scales)
            orig_sizes.append(batch.orig_sizes)
            image_ids.append(batch.image_ids)
    forward_s = time.perf_counter() - start
    start = time.perf_counter()
    if packed:
        ids = torch.cat(image_ids)
        results = packed_results(pad_cat(packed), torch.cat(scales), torch.cat(orig_sizes), ids)
        evaluated = [i for i in ids.tolist() if i >= 0]
    else:
        results, evaluated = empty_results(), []
    return Found(results, evaluated, forward_s, time.perf_counter() - start)


@contextlib.contextmanager
def postprocess_on_host(detector: Detector) -> Iterator[None]:
    """torchvision's inference with only its `postprocess_detections` (box decoding, score
    threshold, top-k, NMS) on the host: the transform, backbone, head and anchors stay on the
    device, their outputs are copied to the cpu, and `transform.postprocess` maps the cpu
    boxes back. For a device without kernels for torchvision's ops (nms on npu). An instance
    attribute shadows the method while this runs, so torchvision's own `forward` is kept."""
    method = type(detector).postprocess_detections

    def on_host(head_outputs: Any, anchors: Any, image_sizes: list) -> list[dict[str, Tensor]]:
        to_cpu = torch.utils._pytree.tree_map_only
        return method(
            detector,
            to_cpu(Tensor, Tensor.cpu, head_outputs),
            to_cpu(Tensor, Tensor.cpu, anchors),
            image_sizes,
        )

    detector.postprocess_detections = on_host
    try:
        yield
    finally:
        del detector.postprocess_detections


@torch.no_grad()
def dynamic_detections(
    detector: Detector | FixedDetector,
    loader: Iterable,
    device: Device | torch.device | str,
    postprocess: str = "device",
) -> Found:
    """COCO results and image ids from torchvision's own inference on each DynamicBatch;
    `postprocess`: "device", or "host" (`postprocess_on_host`; `Device.dynamic_postprocess`)."""
    dev = _as_device(device)
    detector = detector.detector if isinstance(detector, FixedDetector) else detector
    check_eval_recipe(detector)
    start = time.perf_counter()
    rows: list[np.ndarray] = []
    image_ids: list[int] = []
    records_s = 0.0  # torchvision's inference returns per-image dicts: rows image by image
    host = postprocess_on_host(detector) if postprocess == "host" else contextlib.nullcontext()
    with eval_mode(detector), host:
        for batch in loader:
            outputs = detector([img.to(dev.torch) for img in batch.images])
            mark = time.perf_counter()
            for image_id, det in zip(batch.image_ids.tolist(), outputs, strict=True):
                rows.append(image_results(image_id, det["boxes"], det["scores"], det["labels"]))
                image_ids.append(image_id)
            records_s += time.perf_counter() - mark
    mark = time.perf_counter()
    results = np.concatenate(rows) if rows else empty_results()
    records_s += time.perf_counter() - mark
    return Found(results, image_ids, time.perf_counter() - start - records_s, records_s)


# A path's detections over a val loader (results, evaluated image ids, times) of this rank
DetectFn = Callable[[Iterable], Found]


@dataclasses.dataclass
class Gathered:
    """Every rank's detections, on rank 0: what COCOeval needs (picklable, no tensor), and the
    times so far. results [N, 7] (`ssd_npu.evaluation.records`); forward_s / records_s: the slowest
    rank's, seconds."""

    results: np.ndarray
    image_ids: list[int]
    forward_s: float
    records_s: float


class Evaluator:
    """COCO mAP on a val loader, from the path's `detections` (`ssd_npu.build` binds
    `fixed_detections` or `dynamic_detections` to the model and device).

    Each rank runs its share of the val set; rank 0 gathers every rank's detections (`gather`)
    and runs COCOeval with `engine` (`score`; `ssd_npu.evaluation.cocoeval`). `run` does both:
    it returns None on the other ranks; in one process it always returns. `detect`: the fixed path's
    device postprocess when it is used (its graph count), else None. `ann_file`: the val
    annotations' json, which a side process reads instead of being sent the index
    (`ssd_npu.evaluation.background`).
    """

    def __init__(
        self,
        detections: DetectFn,
        loader: Iterable,
        coco: COCO,
        detect: DeviceDetect | None = None,
        engine: str = "faster",
        ann_file: Path | None = None,
    ) -> None:
        self.detections, self.loader, self.coco, self.detect = detections, loader, coco, detect
        self.engine, self.ann_file = engine, ann_file
        self.gt = GroundTruth.of_coco(coco)

    @property
    def postprocess(self) -> str:
        """Where the postprocess runs: "device" or "host" (the dynamic path's is torchvision's)."""
        return "device" if self.detect is not None else "host"

    def gather(self) -> Gathered | None:
        """This rank's detections (the part that needs the weights), gathered on rank 0;
        None on the other ranks."""
        found = self.detections(self.loader)
        parts = distributed.gather_to_main(found)
        if parts is None:
            return None
        return Gathered(
            np.concatenate([p.results for p in parts]),
            sorted({i for p in parts for i in p.image_ids}),
            max(p.forward_s for p in parts),
            max(p.records_s for p in parts),
        )

    def score(self, gathered: Gathered) -> dict[str, Any]:
        """COCOeval of gathered detections: `coco_map`'s dict plus forward_s, records_s and
        cocoeval_s (seconds)."""
        return score(self.gt, gathered, self.engine)

    def run(self) -> dict[str, Any] | None:
        gathered = self.gather()
        return None if gathered is None else self.score(gathered)


def score(gt: GroundTruth, gathered: Gathered, engine: str) -> dict[str, Any]:
    """`coco_map` of `gathered` with its phase times (forward_s, records_s, cocoeval_s): the
    same function in the loop's process and in the side process of `eval.background=true`."""
    start = time.perf_counter()
    result = coco_map(gt, gathered.results, gathered.image_ids, engine)
    cocoeval_s = time.perf_counter() - start
    times = {"forward_s": gathered.forward_s, "records_s": gathered.records_s}
    return {**result, **times, "cocoeval_s": cocoeval_s}
