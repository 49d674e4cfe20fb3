"""Every batch kind implements the loop's batch protocol (ssd_npu/data/batch.py) for all the
tensors it holds: the loop and the prefetcher never ask which kind a batch is."""

import torch

from ssd_npu.data.batch import DATA_COUNTS, HostCounts
from ssd_npu.data.dynamic import DynamicBatch
from ssd_npu.data.fixed_shape import FixedBatch
from ssd_npu.data.slots import SlotBatch


def fixed_batch() -> FixedBatch:
    return FixedBatch(
        images=torch.zeros(2, 3, 8, 8), boxes=torch.zeros(2, 5, 4),
        labels=torch.zeros(2, 5, dtype=torch.int64), valid=torch.zeros(2, 5, dtype=torch.bool),
        image_ids=torch.tensor([1, 2]), orig_sizes=torch.ones(2, 2, dtype=torch.int64),
        content_sizes=torch.ones(2, 2, dtype=torch.int64), scales=torch.ones(2, 2),
        boxes_dropped=3, degenerate=1, clipped=2, downscaled=1, skipped=0,
    )  # fmt: skip


def slot_batch() -> SlotBatch:
    return SlotBatch(
        slots=None, sizes=torch.ones(2, 2, dtype=torch.int64), boxes=torch.zeros(2, 4, 4),
        labels=torch.zeros(2, 4, dtype=torch.int64), valid=torch.zeros(2, 4, dtype=torch.bool),
        draws=torch.rand(2, 6), image_ids=torch.tensor([5, 6]), boxes_dropped=1, host_decoded=1,
        jpegs=[torch.zeros(10, dtype=torch.uint8)],
        pixels=[torch.zeros(3, 4, 4, dtype=torch.uint8), torch.zeros(0, dtype=torch.uint8)],
    )  # fmt: skip


def dynamic_batch() -> DynamicBatch:
    return DynamicBatch(
        images=[torch.zeros(3, 4, 5), torch.zeros(3, 6, 2)],
        targets=[{"boxes": torch.zeros(1, 4), "labels": torch.ones(1, dtype=torch.int64)}] * 2,
        image_ids=torch.tensor([7, 8]), orig_sizes=torch.ones(2, 2, dtype=torch.int64),
        clipped=4,
    )  # fmt: skip


def tensors_of(batch) -> list[torch.Tensor]:
    """Every tensor a batch holds, found by walking its attributes (lists and dicts too)."""
    found = []

    def walk(value):
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, list | tuple):
            for item in value:
                walk(item)
        elif isinstance(value, dict):
            for item in value.values():
                walk(item)

    for value in vars(batch).values():
        walk(value)
    return found


def marked(batch) -> list[torch.Tensor]:
    """The tensors `map_tensors` hands to its function, in order."""
    seen: list[torch.Tensor] = []

    def mark(tensor: torch.Tensor) -> torch.Tensor:
        seen.append(tensor)
        return tensor

    assert batch.map_tensors(mark) is batch
    return seen


def test_map_tensors_reaches_every_tensor_but_the_jpegs():
    for batch in (fixed_batch(), slot_batch(), dynamic_batch()):
        jpegs = getattr(batch, "jpegs", None) or []
        seen = {id(t) for t in marked(batch)}
        # the jpegs stay on the host for the decoder: never moved, pinned or marked
        expected = {id(t) for t in tensors_of(batch)} - {id(j) for j in jpegs}
        assert seen == expected, type(batch).__name__


def test_to_moves_every_tensor_but_the_jpegs():
    for batch in (fixed_batch(), slot_batch(), dynamic_batch()):
        jpegs = {id(j) for j in getattr(batch, "jpegs", None) or []}
        moved = batch.to(torch.device("meta"))
        assert moved is batch
        for tensor in tensors_of(moved):
            assert tensor.device.type == ("cpu" if id(tensor) in jpegs else "meta")


def test_host_counts_per_kind():
    assert fixed_batch().host_counts() == HostCounts(
        2, 5, 3, {"degenerate": 1, "clipped": 2, "skipped": 0, "downscaled": 1, "host_decoded": 0}
    )
    slot = slot_batch().host_counts()
    assert (slot.images, slot.box_rows, slot.boxes_dropped) == (2, 4, 1)
    assert slot.data["host_decoded"] == 1
    dynamic = dynamic_batch().host_counts()
    assert (dynamic.images, dynamic.box_rows, dynamic.boxes_dropped) == (2, None, 0)
    assert dynamic.data == dict.fromkeys(DATA_COUNTS, 0) | {"clipped": 4}
