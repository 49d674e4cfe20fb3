"""DevicePrefetcher: batch k+1's copy to the device is started before batch k is handed over,
on a side stream; step k's stream waits for batch k's copy alone (its event), and batch k's
memory is tied to the step's stream. torch.cuda's streams and events are faked at the
thinnest seam (there is no GPU here); on the cpu the prefetcher is a pass-through."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import pytest
import torch

from ssd_npu.data.batch import TensorFields
from ssd_npu.device.backend import Device
from ssd_npu.device.prefetch import DevicePrefetcher

log: list[str] = []


class FakeStream:
    def __init__(self, device: torch.device | None = None, name: str = "copy") -> None:
        self.name = name

    def wait_stream(self, other: FakeStream) -> None:
        log.append(f"{self.name} waits stream {other.name}")

    def wait_event(self, event: FakeEvent) -> None:
        log.append(f"{self.name} waits {event.name}")


class FakeEvent:
    made = 0

    def __init__(self, enable_timing: bool = False) -> None:
        self.name = f"event {FakeEvent.made}"
        FakeEvent.made += 1

    def record(self, stream: FakeStream) -> None:
        log.append(f"record {self.name} on {stream.name}")


MAIN = FakeStream(name="main")


@contextlib.contextmanager
def fake_stream_context(s: FakeStream):
    log.append(f"on {s.name}")
    yield
    log.append(f"off {s.name}")


class Tied(torch.Tensor):
    """A cpu tensor whose record_stream is logged (a real one needs a real stream)."""

    def record_stream(self, stream: FakeStream) -> None:
        log.append(f"tie {int(self[0])} to {stream.name}")


@dataclass
class FakeBatch(TensorFields):
    images: torch.Tensor  # [1], holding k

    def to(self, device: torch.device, non_blocking: bool = False) -> FakeBatch:
        log.append(f"copy {int(self.images[0])}" + (" async" if non_blocking else ""))
        return self


def batches(n: int) -> list[FakeBatch]:
    return [FakeBatch(torch.tensor([float(k)]).as_subclass(Tied)) for k in range(n)]


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda as the prefetcher uses it: Stream, Event, stream(), current_stream()."""
    log.clear()
    FakeEvent.made = 0
    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "stream", fake_stream_context)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: MAIN)


def test_step_k_waits_for_batch_k_copy_only(fake_cuda):
    for batch in DevicePrefetcher(batches(3), Device("cuda", 0)):
        log.append(f"step {int(batch.images[0])}")
    copy = ["on copy", "copy {k} async", "record event {k} on copy", "off copy"]
    use = ["main waits event {k}", "tie {k} to main", "step {k}"]
    expected = [line.format(k=k) for k, lines in ((0, copy), (1, copy)) for line in lines]
    expected += [line.format(k=0) for line in use]
    expected += [line.format(k=2) for line in copy]  # batch 2 copies during step 0
    expected += [line.format(k=k) for k in (1, 2) for line in use]
    assert log == expected
    # in particular: no wait on the whole copy stream, which holds batch k+1's copy too
    assert not [line for line in log if "waits stream" in line]


def test_a_single_batch_and_an_empty_loader(fake_cuda):
    assert [int(b.images[0]) for b in DevicePrefetcher(batches(1), Device("cuda", 0))] == [0]
    assert log == [
        "on copy", "copy 0 async", "record event 0 on copy", "off copy",
        "main waits event 0", "tie 0 to main",
    ]  # fmt: skip
    log.clear()
    assert list(DevicePrefetcher([], Device("cuda", 0))) == []
    assert log == []


def test_cpu_is_a_pass_through():
    log.clear()
    plain = [FakeBatch(torch.tensor([float(k)])) for k in range(3)]
    got = list(DevicePrefetcher(plain, Device("cpu", None)))
    assert len(got) == 3 and all(g is p for g, p in zip(got, plain, strict=True))
    assert log == []
    assert len(DevicePrefetcher(plain, Device("cpu", None))) == 3
