"""Batches on their way to the device while the current step runs.

`DevicePrefetcher` wraps a loader: when the loop asks for batch k, it takes batch k+1 from the
loader and starts copying it to the device on a side stream (pinned host memory, non-blocking),
then hands over batch k, whose copy started one step earlier. The copy of k+1 thus overlaps
the device's work on step k. Right after each batch's copy is queued, an event is recorded on
the copy stream; the step's stream waits for that batch's event only (`wait_event`; a
`wait_stream` would also wait for batch k+1's copy, queued since). The batch's memory is tied
to the step's stream (`record_stream`), so the caching allocator never reuses it early. On the
cpu it is a plain pass-through.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch

from ssd_npu.device.backend import Device

B = TypeVar("B")


@dataclass
class _Copy(Generic[B]):
    """A batch whose copy to the device is queued, and the event recorded on the copy stream
    right after it: the event is done when this batch's copy is."""

    batch: B
    done: torch.Event


class DevicePrefetcher(Iterable[B]):
    """Iterate `loader`'s batches already on `device`, the next one copied one step ahead."""

    def __init__(self, loader: Iterable[B], device: Device) -> None:
        self.loader, self.device = loader, device
        # the copy stream; None on the cpu, where there is no queue to overlap
        self.stream = device.stream() if device.is_accelerator else None

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def _start(self, batch: B, stream: torch.Stream) -> _Copy[B]:
        with self.device.on_stream(stream):
            moved = batch.to(self.device.torch, non_blocking=True)
            done = self.device.event()
            done.record(stream)
        return _Copy(moved, done)

    def _ready(self, copy: _Copy[B]) -> B:
        current = self.device.current_stream()
        current.wait_event(copy.done)  # this batch's copy only, not the one queued after it
        return copy.batch.map_tensors(lambda t: self.device.record_stream(t, current))

    def __iter__(self) -> Iterator[B]:
        if self.stream is None:
            yield from self.loader
            return
        batches = iter(self.loader)
        upcoming = next(batches, None)
        if upcoming is None:
            return
        upcoming = self._start(upcoming, self.stream)
        for batch in batches:
            ready, upcoming = upcoming, self._start(batch, self.stream)
            yield self._ready(ready)
        yield self._ready(upcoming)
