"""COCO box mAP for the fixed path and for torchvision's dynamic baseline, on the same weights.

Fixed path, `eval.postprocess=device` (`DeviceDetect`): the device runs the network AND the
detector's postprocess in fixed shapes (`ssd_npu.postprocess.fixed_postprocess`: [B, D]
detections and a valid mask, D = detections_per_img) as one static function, compiled once
under compile=true; the host receives one [B, D, 7] tensor per batch and only maps boxes back
(`unfit_boxes`) and writes the COCO records.

Fixed path, `eval.postprocess=host`: the device runs only the static graph (`FixedSSD`:
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

Both produce COCO result records (`image_id`, `category_id`, `bbox` xywh original pixels,
`score`) and share `coco_map` (pycocotools COCOeval). Labels are COCO category ids here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import Tensor

from ssd_npu import distributed
from ssd_npu.compiler import CompiledStep
from ssd_npu.data.fixed_shape import FixedBatch, unfit_boxes
from ssd_npu.device import Device
from ssd_npu.families import eval_recipe_of
from ssd_npu.model import Detector, FixedSSD, detector_spec, eval_mode
from ssd_npu.postprocess import Detections, as_dicts, fixed_postprocess
from ssd_npu.step import CompileOptions


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


def postprocess_fixed(model: FixedSSD, *head: Tensor) -> list[dict]:
    """The detector's own postprocess of fixed head outputs, on the host, in fp32 (its
    family's `host_postprocess`).

    head: FixedSSD's outputs, e.g. cls_logits [B, A, C], bbox_regression [B, A, 4] (any
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
        model: FixedSSD,
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


def coco_records(image_id: int, boxes: Tensor, scores: Tensor, labels: Tensor) -> list[dict]:
    """One image's detections as COCO result records.

    boxes [N, 4] xyxy original-image pixels; scores [N]; labels [N] int64 category ids.
    """
    xyxy = boxes.detach().to("cpu", torch.float64)
    xywh = torch.cat([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]], dim=1).tolist()
    return [
        {"image_id": int(image_id), "category_id": int(c), "bbox": b, "score": float(s)}
        for b, s, c in zip(xywh, scores.tolist(), labels.tolist(), strict=True)
    ]


def fixed_batch_records(batch: FixedBatch, detections: list[dict[str, Tensor]]) -> list[dict]:
    """Records of one FixedBatch; detections[i] boxes in canvas pixels, padding samples skipped."""
    records: list[dict] = []
    for i, det in enumerate(detections):
        image_id = int(batch.image_ids[i])
        if image_id < 0:  # a repeat that only fills the last val batch
            continue
        boxes = unfit_boxes(det["boxes"].cpu(), batch.fit_info(i))
        records += coco_records(image_id, boxes, det["scores"].cpu(), det["labels"].cpu())
    return records


def coco_map(coco_gt: COCO, results: list[dict], image_ids: Iterable[int]) -> dict[str, Any]:
    """COCOeval "bbox" on `image_ids` only; prints the 12-line AP/AR table.

    Returns {"mAP": AP@[.5:.95], "mAP50": AP@.5, "stats": the 12 COCOeval stats,
    "num_images", "num_detections"}. COCOeval reports -1 where no ground truth exists.
    """
    ids = sorted({int(i) for i in image_ids})
    out: dict[str, Any] = {"num_images": len(ids), "num_detections": len(results)}
    if not results:  # loadRes cannot take an empty list; nothing detected scores 0
        print(f"COCOeval: no detections on {len(ids)} images; mAP = 0.0")
        return {"mAP": 0.0, "mAP50": 0.0, "stats": [0.0] * 12, **out, "note": "no detections"}
    # pycocotools prints progress lines; keep only the table. loadRes edits records: copy.
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes([dict(r) for r in results])
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        ev.params.imgIds = ids
        ev.evaluate()
        ev.accumulate()
    ev.summarize()
    stats = [float(v) for v in ev.stats]
    return {"mAP": stats[0], "mAP50": stats[1], "stats": stats, **out}


@torch.no_grad()
def fixed_detections(
    model: FixedSSD,
    loader: Iterable[FixedBatch],
    device: Device | torch.device | str,
    amp: bool = False,
    detect: DeviceDetect | None = None,
) -> tuple[list[dict], list[int]]:
    """COCO records and evaluated image ids for every FixedBatch of `loader` (eval mode).

    With `detect` the postprocess runs on the device (`DeviceDetect`); without, on the host."""
    dev = _as_device(device)
    check_eval_recipe(model.detector)
    records: list[dict] = []
    image_ids: list[int] = []
    with eval_mode(model):
        for batch in loader:
            images = batch.images.to(dev.torch, non_blocking=True)
            if detect is not None:
                detections = unpack_detections(detect(images).cpu())  # one copy per batch
            else:
                with dev.autocast(amp):
                    head = model(images)
                # NMS keeps a data-dependent number of boxes: run it on the host, in fp32
                detections = postprocess_fixed(model, *head)
            records += fixed_batch_records(batch, detections)
            image_ids += [i for i in batch.image_ids.tolist() if i >= 0]
    return records, image_ids


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
    detector: Detector | FixedSSD,
    loader: Iterable,
    device: Device | torch.device | str,
    postprocess: str = "device",
) -> tuple[list[dict], list[int]]:
    """COCO records and image ids from torchvision's own inference on each DynamicBatch;
    `postprocess`: "device", or "host" (`postprocess_on_host`; `Device.dynamic_postprocess`)."""
    dev = _as_device(device)
    detector = detector.detector if isinstance(detector, FixedSSD) else detector
    check_eval_recipe(detector)
    records: list[dict] = []
    image_ids: list[int] = []
    host = postprocess_on_host(detector) if postprocess == "host" else contextlib.nullcontext()
    with eval_mode(detector), host:
        for batch in loader:
            outputs = detector([img.to(dev.torch) for img in batch.images])
            for image_id, det in zip(batch.image_ids.tolist(), outputs, strict=True):
                records += coco_records(image_id, det["boxes"], det["scores"], det["labels"])
                image_ids.append(image_id)
    return records, image_ids


# A path's detections over a val loader: (COCO records, evaluated image ids) of this rank
DetectFn = Callable[[Iterable], tuple[list[dict], list[int]]]


class Evaluator:
    """COCO mAP on a val loader, from the path's `detections` (`ssd_npu.build` binds
    `fixed_detections` or `dynamic_detections` to the model and device).

    Each rank runs its share of the val set; rank 0 gathers every rank's detections and runs
    COCOeval (`run` returns None on the other ranks; in one process it always returns).
    `detect`: the fixed path's device postprocess when it is used (its graph count), else None.
    """

    def __init__(
        self,
        detections: DetectFn,
        loader: Iterable,
        coco: COCO,
        detect: DeviceDetect | None = None,
    ) -> None:
        self.detections, self.loader, self.coco, self.detect = detections, loader, coco, detect

    @property
    def postprocess(self) -> str:
        """Where the postprocess runs: "device" or "host" (the dynamic path's is torchvision's)."""
        return "device" if self.detect is not None else "host"

    def run(self) -> dict[str, Any] | None:
        gathered = distributed.gather_to_main(self.detections(self.loader))
        if gathered is None:
            return None
        records = [r for part, _ in gathered for r in part]
        image_ids = sorted({i for _, ids in gathered for i in ids})
        return coco_map(self.coco, records, image_ids)
