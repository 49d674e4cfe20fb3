"""DevicePrefetcher: batch k+1's copy to the device is started before batch k is handed over,
on a side stream the step's stream waits for. The streams are faked at the thinnest seam
(there is no GPU here); on the cpu the prefetcher is a pass-through."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from ssd_npu.device import Device
from ssd_npu.prefetch import DevicePrefetcher

LOG: list[str] = []


@dataclass
class FakeBatch:
    k: int

    def to(self, device, non_blocking: bool = False) -> FakeBatch:
        LOG.append(f"copy {self.k}" + (" async" if non_blocking else ""))
        return self


class FakeStream:
    def __init__(self, name: str) -> None:
        self.name = name

    def wait_stream(self, other: FakeStream) -> None:
        LOG.append(f"{self.name} waits {other.name}")


class FakeBackend:
    """torch.cuda / torch.npu as the prefetcher uses them: Stream, stream(), current_stream()."""

    def __init__(self) -> None:
        self.main = FakeStream("main")

    @contextlib.contextmanager
    def stream(self, s: FakeStream):
        LOG.append(f"on {s.name}")
        yield

    def current_stream(self, device) -> FakeStream:
        return self.main


def test_next_batch_is_copied_before_the_current_one_is_handed_over():
    LOG.clear()
    prefetcher = DevicePrefetcher([FakeBatch(k) for k in range(3)], Device("cpu", None))
    prefetcher.backend, prefetcher.stream = FakeBackend(), FakeStream("copy")
    for batch in prefetcher:
        LOG.append(f"step {batch.k}")
    assert LOG.index("copy 1 async") < LOG.index("step 0")
    assert LOG.index("copy 2 async") < LOG.index("step 1")
    assert LOG.count("main waits copy") == 3  # before every step uses its batch
    assert LOG.index("main waits copy") < LOG.index("step 0")
    assert [e for e in LOG if e.startswith("step")] == ["step 0", "step 1", "step 2"]


def test_cpu_is_a_pass_through():
    batches = [FakeBatch(k) for k in range(3)]
    LOG.clear()
    assert list(DevicePrefetcher(batches, Device("cpu", None))) == batches
    assert LOG == []
    assert len(DevicePrefetcher(batches, Device("cpu", None))) == 3
