"""COCOeval "bbox" with a choice of engine: faster-coco-eval (default) or pycocotools.

`eval.coco=faster` runs faster-coco-eval's `COCOeval_faster` (per-image matching and the
accumulation in C++); `eval.coco=pycocotools` runs pycocotools' `COCOeval`, the reference the
faster engine is tested against (the 12 stats equal to 1e-4: tests/test_cocoeval.py). On a
COCO-val-sized result (5,000 images x 100 detections) the faster engine took 5.8 s against
pycocotools' 49.5 s on a shared 2-core CPU (docs/bench.md).

`GroundTruth` holds the val annotations once per run, indexed for each engine on first use;
`evaluate(gt, results, image_ids, engine)` scores a results array (`ssd_npu.evaluation.records`).
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from pycocotools.coco import COCO

from ssd_npu.errors import UserError

ENGINES = ("faster", "pycocotools")


def as_dicts(results: np.ndarray) -> list[dict[str, int | float | list[float]]]:
    """Rows -> the dicts COCO's `loadRes` takes ({"image_id", "category_id", "bbox" xywh,
    "score"}): the one step that is per detection, done where the COCO engine needs it
    (column by column into Python lists first: a third of the time of row by row)."""
    columns = (
        results[:, 0].astype(np.int64).tolist(),
        results[:, 6].astype(np.int64).tolist(),
        results[:, 1:5].tolist(),
        results[:, 5].tolist(),
    )
    return [
        {"image_id": i, "category_id": c, "bbox": b, "score": s}
        for i, c, b, s in zip(*columns, strict=True)
    ]


def _faster_detections(coco_gt: COCO, results: np.ndarray) -> COCO:
    """faster-coco-eval's index of the detections, as its `loadRes` makes it for boxes (area
    w * h, ids 1..N in row order, iscrowd 0) without the polygon it adds to every detection,
    which box evaluation never reads (loadRes's own per-detection loop is a sixth of the
    engine's time at 500,000 detections)."""
    unknown = np.setdiff1d(np.unique(results[:, 0]), np.array(coco_gt.getImgIds()))
    if len(unknown):
        raise ValueError(
            f"results hold image ids the annotations do not have: {unknown[:5].tolist()}"
        )
    columns = (
        results[:, 0].astype(np.int64).tolist(),
        results[:, 6].astype(np.int64).tolist(),
        results[:, 1:5].tolist(),
        results[:, 5].tolist(),
        (results[:, 3] * results[:, 4]).tolist(),  # w * h in float64, as loadRes
    )
    anns = [
        {"image_id": i, "category_id": c, "bbox": b, "score": s, "area": a, "id": n, "iscrowd": 0}
        for n, (i, c, b, s, a) in enumerate(zip(*columns, strict=True), start=1)
    ]
    dt = _faster_coco_eval().COCO(print_function=lambda *a: None)
    keep = ("images", "categories")
    dt.dataset = {**{k: coco_gt.dataset[k] for k in keep}, "annotations": anns}
    dt.createIndex()
    return dt


def _faster_coco_eval() -> ModuleType:
    """faster_coco_eval, or one error that says what to do."""
    try:
        import faster_coco_eval
    except ImportError as err:
        raise UserError(
            "eval.coco=faster needs faster-coco-eval: pip install faster-coco-eval==1.8.0 "
            "(requirements.txt), or evaluate with eval.coco=pycocotools."
        ) from err
    return faster_coco_eval


@dataclass
class GroundTruth:
    """The annotation set COCOeval compares against: `dataset` is the parsed COCO json
    (`images`, `annotations`, `categories`); each engine's index is built once, on first use.
    `coco`: an existing pycocotools index of the same dataset, reused when given."""

    dataset: dict
    coco: COCO | None = None
    _faster: object | None = field(default=None, repr=False)

    @classmethod
    def of_coco(cls, coco: COCO) -> GroundTruth:
        return cls(coco.dataset, coco)

    @classmethod
    def of_file(cls, path: str | Path) -> GroundTruth:
        return cls(json.loads(Path(path).read_text()))

    def index(self, engine: str) -> COCO:
        """The engine's COCO index of the ground truth (pycocotools' or faster-coco-eval's)."""
        if engine == "pycocotools":
            if self.coco is None:
                with contextlib.redirect_stdout(io.StringIO()):  # its progress lines
                    self.coco = COCO()
                    self.coco.dataset = self.dataset
                    self.coco.createIndex()
            return self.coco
        if engine != "faster":
            raise ValueError(
                f"eval.coco={engine!r} is not valid; choose one of: faster, pycocotools."
            )
        if self._faster is None:
            FasterCOCO = _faster_coco_eval().COCO  # noqa: N806 (the library's class name)

            # COCOeval writes "ignore" (and the engine's own keys) into the ground-truth dicts:
            # give it copies, so the pycocotools index of the same json stays untouched
            # (segmentations are not needed for boxes and are the bulk of a COCO json)
            anns = [
                {k: v for k, v in a.items() if k != "segmentation"}
                for a in self.dataset["annotations"]
            ]
            copy = {**self.dataset, "annotations": anns}
            self._faster = FasterCOCO(copy, print_function=lambda *a: None)
        return self._faster  # type: ignore[return-value]


@dataclass
class CocoStats:
    """COCOeval's result: the 12 AP/AR stats (`stats[0]` AP@[.5:.95], `stats[1]` AP@.5; -1
    where no ground truth exists) and the printed 12-line table."""

    stats: list[float]
    table: str


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Python's cycle collector off for the block. Both engines make a dict per detection and
    per match (millions at COCO-val size), none of them in a reference cycle; each few hundred
    new objects start a collection that walks all of them again: on 500,000 detections the
    collector took a third of faster-coco-eval's time and a sixth of pycocotools' (measured,
    docs/bench.md). It is switched back on (as it was) when the block ends."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def evaluate(
    gt: GroundTruth, results: np.ndarray, image_ids: list[int], engine: str = "faster"
) -> CocoStats:
    """COCOeval "bbox" over `image_ids` of `results` [N, 7] (`ssd_npu.evaluation.records`;
    N >= 1)."""
    coco_gt = gt.index(engine)
    quiet = io.StringIO()
    # both engines print progress lines: keep only summarize's table. loadRes edits records:
    # they are built here, fresh.
    with contextlib.redirect_stdout(quiet), _gc_paused():
        if engine == "faster":
            coco_dt = _faster_detections(coco_gt, results)
            ev = _faster_coco_eval().COCOeval_faster(
                coco_gt, coco_dt, "bbox", print_function=lambda *a: None
            )
        else:
            from pycocotools.cocoeval import COCOeval

            coco_dt = coco_gt.loadRes(as_dicts(results))  # the reference: its own loader
            ev = COCOeval(coco_gt, coco_dt, "bbox")
        ev.params.imgIds = sorted(image_ids)
        ev.evaluate()
        ev.accumulate()
    table = io.StringIO()
    if engine == "faster":
        ev.print_function = print  # its summarize prints through this
    with contextlib.redirect_stdout(table):
        ev.summarize()
    return CocoStats([float(v) for v in np.asarray(ev.stats)[:12]], table.getvalue())


def coco_map(
    gt: GroundTruth | COCO,
    results: np.ndarray,
    image_ids: Iterable[int],
    engine: str = "faster",
) -> dict[str, Any]:
    """COCOeval "bbox" (`engine`: faster | pycocotools) on `image_ids` only; prints the
    12-line AP/AR table.

    results [N, 7] (`ssd_npu.evaluation.records`). Returns {"mAP": AP@[.5:.95], "mAP50": AP@.5,
    "stats": the 12 COCOeval stats, "num_images", "num_detections"}. COCOeval reports -1 where no
    ground truth exists.
    """
    gt = gt if isinstance(gt, GroundTruth) else GroundTruth.of_coco(gt)
    ids = sorted({int(i) for i in image_ids})
    out: dict[str, Any] = {"num_images": len(ids), "num_detections": len(results)}
    if not len(results):  # loadRes cannot take an empty list; nothing detected scores 0
        print(f"COCOeval: no detections on {len(ids)} images; mAP = 0.0")
        return {"mAP": 0.0, "mAP50": 0.0, "stats": [0.0] * 12, **out, "note": "no detections"}
    scored = evaluate(gt, results, ids, engine)
    print(scored.table, end="")
    return {"mAP": scored.stats[0], "mAP50": scored.stats[1], "stats": scored.stats, **out}
