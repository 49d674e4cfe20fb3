"""What every batch kind offers the loop and the prefetcher: one protocol, no isinstance.

The kinds are `FixedBatch` (fixed_shape.py: the canvas batch), `SlotBatch` (slots.py: uint8
slots the device augments) and `DynamicBatch` (dynamic.py: torchvision's lists). The loop
moves a batch (`to`), the DataLoader pins it (`pin_memory`), the prefetcher marks its tensors
as used by the compute stream (`map_tensors`), and the loop takes its host counters
(`host_counts`) when the step is queued; each kind says how for its own fields.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Protocol, Self

import torch
from torch import Tensor

# Per-batch data counters (degenerate / clipped boxes, skipped images, images scaled down by
# fit=pad or into a slot, images the host decoded under data.decode=device) summed into
# summary.json's `data_counts`. A batch kind without one of them counts 0 there.
DATA_COUNTS = ("degenerate", "clipped", "skipped", "downscaled", "host_decoded")


@dataclass(frozen=True)
class HostCounts:
    """A batch's host counters: host ints of the collated batch or tensor shapes, nothing read
    from the device."""

    images: int  # B: images in this rank's batch
    box_rows: int | None  # M of boxes [B, M, 4] (the box-count bucket); None: no fixed M
    boxes_dropped: int  # boxes cut by max_boxes in this batch
    data: dict[str, int]  # DATA_COUNTS of this batch


class Batch(Protocol):
    """A collated batch, whatever its kind."""

    image_ids: Tensor  # [B] int64; -1 marks a padding sample

    def map_tensors(self, fn: Callable[[Tensor], Tensor]) -> Self:
        """Replace every tensor the batch holds by `fn(tensor)`, in place; return self."""
        ...

    def to(self, device: torch.device | str, non_blocking: bool = True) -> Self:
        """Move the tensors (in place) and return self."""
        ...

    def pin_memory(self) -> Self:
        """Page-locked host memory (DataLoader pin_memory=True): copies can run asynchronously."""
        ...

    def host_counts(self) -> HostCounts:
        """The batch's counters, read on the host (see HostCounts)."""
        ...


class TensorFields:
    """`Batch` methods for a dataclass batch whose tensors are its Tensor fields (FixedBatch,
    SlotBatch); a kind holding tensors elsewhere (lists, dicts) extends `map_tensors`."""

    def map_tensors(self, fn: Callable[[Tensor], Tensor]) -> Self:
        for f in fields(self):  # type: ignore[arg-type]  (the subclasses are dataclasses)
            value = getattr(self, f.name)
            if isinstance(value, Tensor):
                setattr(self, f.name, fn(value))
        return self

    def to(self, device: torch.device | str, non_blocking: bool = True) -> Self:
        return self.map_tensors(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Self:
        return self.map_tensors(Tensor.pin_memory)


class PaddedBoxes(TensorFields):
    """`TensorFields` with `host_counts` for a batch whose boxes are padded to M rows
    (`boxes [B, M, 4]`, `image_ids [B]`, `boxes_dropped`): FixedBatch and SlotBatch."""

    def host_counts(self) -> HostCounts:
        rows = int(self.boxes.shape[1])  # type: ignore[attr-defined]
        dropped = int(self.boxes_dropped)  # type: ignore[attr-defined]
        return HostCounts(len(self.image_ids), rows, dropped, data_counts(self))  # type: ignore[attr-defined]


def data_counts(batch: object) -> dict[str, int]:
    """The DATA_COUNTS a batch carries as int attributes (0 for those its kind has not)."""
    return {name: int(getattr(batch, name, 0)) for name in DATA_COUNTS}
