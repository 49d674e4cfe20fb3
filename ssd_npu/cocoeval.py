"""COCOeval "bbox" with a choice of engine: faster-coco-eval (default) or pycocotools.

`eval.coco=faster` runs faster-coco-eval's `COCOeval_faster` (per-image matching and the
accumulation in C++); `eval.coco=pycocotools` runs pycocotools' `COCOeval`, the reference the
faster engine is tested against (the 12 stats equal to 1e-4: tests/test_cocoeval.py). On a
COCO-val-sized result (5,000 images x 100 detections) the faster engine takes about a tenth
of pycocotools' time (docs/bench.md).

`GroundTruth` holds the val annotations once per run, indexed for each engine on first use;
`evaluate(gt, results, image_ids, engine)` scores a results array (`ssd_npu.records`).
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Iterable
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
    "score"}): the one step that is per detection, done where the COCO engine needs it."""
    return [
        {"image_id": int(r[0]), "category_id": int(r[6]), "bbox": r[1:5], "score": r[5]}
        for r in results.tolist()
    ]


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


def evaluate(
    gt: GroundTruth, results: np.ndarray, image_ids: list[int], engine: str = "faster"
) -> CocoStats:
    """COCOeval "bbox" over `image_ids` of `results` [N, 7] (`ssd_npu.records`; N >= 1)."""
    coco_gt = gt.index(engine)
    quiet = io.StringIO()
    # both engines print progress lines: keep only summarize's table. loadRes edits records:
    # they are built here, fresh.
    with contextlib.redirect_stdout(quiet):
        coco_dt = coco_gt.loadRes(as_dicts(results))
        if engine == "faster":
            ev = _faster_coco_eval().COCOeval_faster(
                coco_gt, coco_dt, "bbox", print_function=lambda *a: None
            )
        else:
            from pycocotools.cocoeval import COCOeval

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

    results [N, 7] (`ssd_npu.records`). Returns {"mAP": AP@[.5:.95], "mAP50": AP@.5, "stats":
    the 12 COCOeval stats, "num_images", "num_detections"}. COCOeval reports -1 where no
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
