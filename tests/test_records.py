"""Records in bulk: `packed_results` gives exactly the rows of the per-detection loop it
replaced (`unfit_boxes` image by image, then one dict per detection), for every fit."""

import numpy as np
import torch

from ssd_npu.evaluation.cocoeval import as_dicts
from ssd_npu.evaluation.records import pack_per_image, packed_results, pad_cat
from ssd_npu.tools.coco_results import as_packed, coco_val_sized, loop_records


def random_packed(images: int, d: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(images, d, 2, generator=g) * 300
    wh = torch.rand(images, d, 2, generator=g) * 200  # some reach past the canvas and image
    packed = torch.cat(
        [
            xy - 20,
            xy + wh,
            torch.rand(images, d, 1, generator=g),
            torch.randint(1, 91, (images, d, 1), generator=g).float(),
            (torch.rand(images, d, 1, generator=g) < 0.7).float(),
        ],
        dim=-1,
    )
    # stretch (sx != sy), letterbox (one scale), pad (1.0): canvas px per original px
    scales = torch.rand(images, 2, generator=g) * 1.5 + 0.25
    scales[::3, 1] = scales[::3, 0]
    scales[1::3] = 1.0
    orig_sizes = torch.randint(100, 700, (images, 2), generator=g)
    image_ids = torch.arange(1, images + 1)
    image_ids[-2:] = -1  # repeats that fill the last batch
    return packed, scales, orig_sizes, image_ids


def test_bulk_rows_equal_the_per_detection_loop():
    packed, scales, orig_sizes, image_ids = random_packed(40, 25, seed=0)
    rows = packed_results(packed, scales, orig_sizes, image_ids)
    want = loop_records(packed, scales, orig_sizes, image_ids)
    assert rows.dtype == np.float64 and rows.shape == (len(want), 7)
    assert as_dicts(rows) == want  # exactly: same floats, same order
    assert (rows[:, 3:5] >= 0).all()  # clipped into the image


def test_per_image_detections_pack_into_the_same_rows():
    """The host postprocess's per-image dicts (varying counts) packed and padded give the rows
    of the device's packed form."""
    packed, scales, orig_sizes, image_ids = random_packed(6, 10, seed=1)
    dicts = []
    for p in packed:
        v = p[:, 6] > 0.5
        dicts.append({"boxes": p[v, :4], "scores": p[v, 4], "labels": p[v, 5].long()})
    dicts[2] = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0)}
    repacked = pad_cat([pack_per_image(dicts[:3]), pack_per_image(dicts[3:])])
    assert repacked.shape[0] == 6
    got = packed_results(repacked, scales, orig_sizes, image_ids)
    packed[2, :, 6] = 0.0
    assert np.array_equal(got, packed_results(packed, scales, orig_sizes, image_ids))


def test_generated_coco_val_sized_detections_round_trip():
    """The benchmark's packed form of a generated result gives its rows back (boxes within
    float32 rounding of the canvas scaling, clipped to the image)."""
    dataset, results = coco_val_sized(images=50, per_image=20, seed=2)
    packed, scales, orig_sizes, image_ids = as_packed(dataset, results)
    rows = packed_results(packed, scales, orig_sizes, image_ids)
    assert rows.shape == results.shape
    assert np.array_equal(rows[:, [0, 5, 6]], results[:, [0, 5, 6]].astype(np.float32))
    size = orig_sizes.numpy()[results[:, 0].astype(int) - 1]  # (h, w) of each row's image
    inside = (results[:, 1:3] >= 0).all(1)
    inside &= results[:, 1] + results[:, 3] <= size[:, 1]
    inside &= results[:, 2] + results[:, 4] <= size[:, 0]
    assert inside.mean() > 0.5
    np.testing.assert_allclose(rows[inside, 1:5], results[inside, 1:5], atol=1e-3)
