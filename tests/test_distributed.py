"""Data parallel on CPU (gloo, 2 processes) trains exactly what one process would.

The equivalence runs in float64 (`torch.set_default_dtype`): training-mode BatchNorm on a
random network turns float32 rounding differences (one sum over 4 images versus two sums
over 2) into ~1e-3 relative gradient noise, which would hide the comparison. Everything
else is the production path: build_training, DistributedSampler, DDP, the cross-rank
BatchNorm, the global-positive loss normalisation and TrainLoop.
"""

import datetime
import json
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ssd_npu.build import build_training
from ssd_npu.config import validate
from ssd_npu.device import distributed
from ssd_npu.device.backend import Device, HostCopy, Mark
from ssd_npu.device.distributed import World
from ssd_npu.engine.hooks import StopSignalHook
from ssd_npu.engine.loop import Hook, Progress, Read, TrainLoop
from ssd_npu.engine.telemetry import Telemetry
from ssd_npu.errors import ConfigError
from ssd_npu.evaluation.hook import TIME_KEYS
from ssd_npu.train import run
from tests.helpers import REPO, compose_cfg, tiny_config, tiny_overrides

GLOBAL_BATCH = 4
COMMON = ("canvas=[128,128]", "max_boxes=8", "eval=false", "sync_bn=true", "augment=false")
SMALL = ("canvas=[64,64]", "max_boxes=8", "eval=false", "augment=false")  # the quickest run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank: int, world: int, port: int, root: str, out: str, steps: int, dtype: str):
    """One rank (or the single process when world == 1): train `steps`, save what we compare."""
    if world > 1:
        join(rank, world, port)
    torch.set_num_threads(1)
    torch.set_default_dtype(getattr(torch, dtype))
    out_dir = Path(out) / f"world{world}"
    cfg = tiny_config(
        Path(root), out_dir, *COMMON, f"batch_size={GLOBAL_BATCH // world}", "optim.warmup_steps=0"
    )
    t = build_training(cfg)
    telemetry = Telemetry(out_dir / f"tb{rank}", steps, enabled=t.world.is_main)
    loop = TrainLoop(
        t.step, t.optimizer, t.scheduler, t.data.train, t.data.train_sampler, t.device,
        telemetry, scaler=t.scaler, world=t.world,
    )  # fmt: skip
    progress = loop.run(epochs=1, max_steps=steps)
    telemetry.close()
    assert progress.step == steps and progress.epoch == 0
    torch.save(
        {
            "losses": telemetry.last_losses,
            "grads": {n: p.grad.clone() for n, p in t.model.named_parameters()},
            "params": {n: p.detach().clone() for n, p in t.model.named_parameters()},
            "lr": t.optimizer.param_groups[0]["initial_lr"],
        },
        out_dir / f"rank{rank}.pt",
    )
    if t.world.distributed:
        torch.distributed.destroy_process_group()


def launch(world: int, root, out, steps: int, dtype: str) -> list[dict]:
    mp.spawn(worker, args=(world, free_port(), str(root), str(out), steps, dtype), nprocs=world)
    return [torch.load(Path(out) / f"world{world}" / f"rank{r}.pt") for r in range(world)]


@pytest.mark.slow
def test_two_ranks_equal_one_process_on_the_global_batch(tiny_coco, tmp_path):
    (single,) = launch(1, tiny_coco, tmp_path, steps=1, dtype="float64")
    ranks = launch(2, tiny_coco, tmp_path, steps=1, dtype="float64")
    assert single["lr"] == ranks[0]["lr"]  # lr follows the global batch
    for rank in ranks:
        for key, value in single["losses"].items():
            assert rank["losses"][key] == pytest.approx(value, rel=1e-5, abs=1e-8), key
        for name, grad in single["grads"].items():
            torch.testing.assert_close(rank["grads"][name], grad, rtol=1e-5, atol=1e-8, msg=name)


@pytest.mark.slow
def test_parameters_stay_identical_across_ranks(tiny_coco, tmp_path):
    ranks = launch(2, tiny_coco, tmp_path, steps=3, dtype="float32")
    moved = 0
    for name, value in ranks[0]["params"].items():
        assert torch.equal(value, ranks[1]["params"][name]), name
        moved += int(not torch.equal(ranks[0]["grads"][name], torch.zeros_like(value)))
    assert moved > 10


def torchrun_train(root, *overrides: str) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node=2 train.py` on the tiny set (COMMON, evaluation on) with
    `overrides`; it must exit 0."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
        f"--master_port={free_port()}", "train.py",
        *tiny_overrides(root, *[c for c in COMMON if c != "eval=false"], *overrides),
    ]  # fmt: skip
    proc = subprocess.run(
        cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_torchrun_writes_one_summary_and_one_event_file(tiny_coco, tiny_cfg, tmp_path):
    proc = torchrun_train(tiny_coco, "max_steps=2", f"hydra.run.dir={tmp_path}")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["global_step"] == 2 and summary["steps"] == 2
    assert summary["device"] == "cpu"
    assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_0000002.pt"]
    assert proc.stdout.count("ssd-npu: device=cpu ranks=2") == 1  # rank 0 alone prints

    # Evaluation was sharded over the ranks and gathered: one process evaluating the same
    # checkpoint on the whole val set gets the same numbers.
    single = run(
        tiny_cfg("canvas=[128,128]", "max_boxes=8", "eval_only=true",
                 f"weights={tmp_path / 'checkpoints' / 'step_0000002.pt'}", out=tmp_path / "single")
    )  # fmt: skip
    ranks, one = summary["eval"]["history"][-1], single["eval"]["history"][-1]
    assert ranks["num_images"] == one["num_images"] == 6  # every val image once
    assert ranks["num_detections"] == one["num_detections"] > 0
    assert summary["eval"]["mAP"] == pytest.approx(single["eval"]["mAP"], abs=1e-9)
    assert summary["eval"]["mAP50"] == pytest.approx(single["eval"]["mAP50"], abs=1e-9)


@pytest.mark.slow
def test_torchrun_background_eval_gives_the_synchronous_history(tiny_coco, tmp_path):
    """eval.background=true under torchrun: rank 0 alone hands the gathered detections to its
    side process (the other rank only takes part in the gather and trains on); the history is
    the synchronous run's."""
    histories = {}
    for mode in ("false", "true"):
        overrides = ("epochs=2", "eval_every=1", f"eval.background={mode}")
        torchrun_train(tiny_coco, *overrides, f"hydra.run.dir={tmp_path / mode}")
        summary = json.loads((tmp_path / mode / "summary.json").read_text())
        assert summary["eval"]["background"] == (mode == "true")
        histories[mode] = [
            {k: v for k, v in e.items() if k not in TIME_KEYS} for e in summary["eval"]["history"]
        ]
    assert [e["step"] for e in histories["true"]] == [3, 6]  # 12 images, 2 ranks x batch 2
    assert histories["true"] == histories["false"]


# --- torchrun without host waits -------------------------------------------------------------


@dataclass
class QueueLog:
    """What one rank's loop did, in order: the steps queued, the host reads of a step's
    results, the collectives issued (a cpu run stands in for a device whose queue runs ahead
    of the host: what matters is *when* the host asks for a value, not how long it waits)."""

    queued: int = 0  # steps whose optimizer update is queued (end marks made)
    in_step: bool = False  # between a step's start and end marks
    reads: list[tuple[int, int]] = field(default_factory=list)  # (step read, steps queued then)
    to_host: list[torch.Tensor] = field(default_factory=list)  # handed to Device.to_host
    # (host group?, inside a step?, tensor) for every torch.distributed.all_reduce
    collectives: list[tuple[bool, bool, torch.Tensor]] = field(default_factory=list)


class LoggedMark(Mark):
    def __init__(self, device: Device, log: QueueLog, step: int) -> None:
        super().__init__(device)
        self.log, self.step = log, step

    def wait(self) -> None:
        self.log.reads.append((self.step, self.log.queued))
        super().wait()


class LoggedHostCopy(HostCopy):
    def __init__(self, tensor: torch.Tensor, device: Device, log: QueueLog) -> None:
        super().__init__(tensor, device)
        self.log, self.step = log, log.queued

    def values(self) -> list[float]:
        self.log.reads.append((self.step, self.log.queued))
        return super().values()


@dataclass(frozen=True)
class LoggedDevice(Device):
    """The device seam: its marks and host copies log when they are made and read. The loop
    makes two marks per step (start, end), so they tell which step is being queued."""

    log: QueueLog = field(default_factory=QueueLog, compare=False)

    def mark(self) -> Mark:
        if self.log.in_step:
            self.log.queued += 1
        self.log.in_step = not self.log.in_step
        return LoggedMark(self, self.log, self.log.queued + int(self.log.in_step))

    def to_host(self, tensor: torch.Tensor) -> HostCopy:
        self.log.to_host.append(tensor)
        return LoggedHostCopy(tensor, self, self.log)


class StopOnRank(Hook):
    """A SIGTERM to this process on one rank, after step `step` is queued (before the
    StopSignalHook after it in the list votes on that step)."""

    def __init__(self, rank: int, world: int, step: int) -> None:
        self.request, self.step = rank == world - 1, step

    def after_update(self, progress: Progress) -> Read:
        if self.request and progress.step == self.step:
            signal.raise_signal(signal.SIGTERM)  # its Python handler runs before this returns
        return "late"


def queue_worker(rank: int, world: int, port: int, root: str, out: str, stop_at: int):
    """One rank of a 2-epoch run whose last rank asks to stop after step `stop_at`; saves its
    QueueLog summary."""
    join(rank, world, port)
    out_dir = Path(out)
    cfg = tiny_config(Path(root), out_dir, *SMALL, "sync_bn=true", "epochs=2")
    t = build_training(cfg)
    log = QueueLog()
    device = LoggedDevice(t.device.type, t.device.index, log=log)
    stop = StopSignalHook()
    telemetry = Telemetry(out_dir / f"tb{rank}", stop_at, enabled=t.world.is_main)
    hooks = [StopOnRank(rank, world, stop_at), stop]
    loop = TrainLoop(
        t.step, t.optimizer, t.scheduler, t.data.train, t.data.train_sampler, device,
        telemetry, hooks, scaler=t.scaler, world=t.world,
    )  # fmt: skip
    real_all_reduce = dist.all_reduce

    def logged_all_reduce(tensor: torch.Tensor, *args, **kwargs):
        host = kwargs.get("group") is distributed._host_group
        log.collectives.append((host, log.in_step, tensor))
        return real_all_reduce(tensor, *args, **kwargs)

    dist.all_reduce = logged_all_reduce
    try:
        progress = loop.run(epochs=2)
    finally:
        dist.all_reduce = real_all_reduce
    telemetry.close()
    outside = [(host, tensor) for host, inside, tensor in log.collectives if not inside]
    summary = {
        "steps": progress.step,
        "batches_per_epoch": len(t.data.train),
        "reads": log.reads,
        "host_collectives": sum(host for host, _ in outside),
        # device-group collectives issued by the loop around the steps whose result is not
        # handed to Device.to_host: the host would read them at once (the old stop vote and
        # slowest-rank times did, with .item() / .tolist())
        "read_at_once": sum(
            not host and all(tensor is not c for c in log.to_host) for host, tensor in outside
        ),
    }
    (out_dir / f"queue{rank}.json").write_text(json.dumps(summary))
    dist.destroy_process_group()


def join(rank: int, world: int, port: int) -> None:
    """torchrun's environment for rank `rank` of `world` on this host, one thread."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
    )
    torch.set_num_threads(1)


@pytest.mark.slow
def test_ddp_loop_reads_no_step_before_the_next_is_queued(tiny_coco, tmp_path):
    """2 ranks (gloo): step k's losses and times are read only after step k+1 is queued,
    except where the loop must read at once (an epoch's last step, the stop); no collective
    result is read at once; a stop asked on one rank stops both after the same step."""
    stop_at = 5
    mp.spawn(queue_worker, args=(2, free_port(), str(tiny_coco), str(tmp_path), stop_at), nprocs=2)
    for rank in range(2):
        log = json.loads((tmp_path / f"queue{rank}.json").read_text())
        assert log["steps"] == stop_at, rank  # both ranks stopped after the asking rank's step
        per_epoch = log["batches_per_epoch"]
        assert per_epoch >= 3 and stop_at > per_epoch  # late reads in both epochs
        read_at_once = {per_epoch, stop_at}  # the epoch's end and the stop: read right away
        late = [(step, queued) for step, queued in log["reads"] if step not in read_at_once]
        assert {step for step, _ in late} == set(range(1, stop_at)) - read_at_once
        assert all(queued > step for step, queued in late), log["reads"]
        assert log["read_at_once"] == 0
        # one stop vote per step, one slowest-rank time per step read: over the host group
        assert log["host_collectives"] == 2 * stop_at


# --- DDP + compile ---------------------------------------------------------------------------


def compile_worker(rank: int, world: int, port: int, root: str, out: str) -> None:
    """compile=true, 2 steps of batch 2 on each of `world` ranks; saves the compile counters
    and the parameters."""
    join(rank, world, port)
    out_dir = Path(out) / f"world{world}"
    cfg = tiny_config(Path(root), out_dir, *SMALL, "compile=true", "max_steps=2")
    t = build_training(cfg)
    telemetry = Telemetry(out_dir / f"tb{rank}", 2, enabled=t.world.is_main)
    loop = TrainLoop(
        t.step, t.optimizer, t.scheduler, t.data.train, t.data.train_sampler, t.device,
        telemetry, scaler=t.scaler, world=t.world,
    )  # fmt: skip
    loop.run(epochs=1, max_steps=2)
    telemetry.close()
    from torch._dynamo.utils import counters

    torch.save(
        {
            "graphs_per_call": t.step.compiled.graphs_per_call,
            "recompiles": t.step.recompiles,
            "graph_breaks": sum(counters["graph_break"].values()),
            "params": {n: p.detach().clone() for n, p in t.model.named_parameters()},
        },
        out_dir / f"rank{rank}.pt",
    )
    if t.world.distributed:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_compiles_the_graphs_one_process_compiles(tiny_coco, tmp_path):
    """DDP wraps the compiled call of the plain model: each rank compiles what one process
    compiles (1 graph, no break), and DDP still averages every gradient (equal parameters)."""

    def launch_compiled(world: int) -> list[dict]:
        args = (world, free_port(), str(tiny_coco), str(tmp_path))
        mp.spawn(compile_worker, args=args, nprocs=world)
        return [torch.load(tmp_path / f"world{world}" / f"rank{r}.pt") for r in range(world)]

    (single,) = launch_compiled(1)
    assert single["graphs_per_call"] == [1, 0] and single["graph_breaks"] == 0
    for rank in launch_compiled(2):
        for key in ("graphs_per_call", "recompiles", "graph_breaks"):
            assert rank[key] == single[key], key
    ranks = [torch.load(tmp_path / "world2" / f"rank{r}.pt")["params"] for r in range(2)]
    for name, value in ranks[0].items():
        assert torch.equal(value, ranks[1][name]), name


# --- the process group -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "device, bound",
    [(Device("cuda", 1), torch.device("cuda:1")), (Device("cpu", None), None)],
    ids=["cuda", "cpu"],
)
def test_init_binds_the_rank_device_and_sets_the_timeout(monkeypatch, device, bound):
    """torch.distributed is the seam (no second process, no GPU): what init asks of it."""
    calls: dict[str, dict] = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(distributed, "_host_group", None)  # restored after the test
    monkeypatch.setattr(dist, "is_initialized", lambda: "init" in calls)
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: calls.setdefault("init", kw))
    monkeypatch.setattr(dist, "new_group", lambda **kw: calls.setdefault("host", kw))
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    assert distributed.init(device, timeout_min=7) == World(rank=1, size=2)
    timeout = datetime.timedelta(minutes=7)
    assert calls["init"] == {
        "backend": device.dist_backend,
        "timeout": timeout,
        **({"device_id": bound} if bound is not None else {}),  # torch rejects a cpu device_id
    }
    assert calls["host"] == {"backend": "gloo", "timeout": timeout}  # the host numbers' group
    assert distributed._host_group is calls["host"]


def test_dist_timeout_is_checked_and_reaches_init(tiny_cfg, monkeypatch):
    with pytest.raises(ConfigError, match="dist_timeout_min=0 is not valid"):
        validate(compose_cfg("dist_timeout_min=0"))
    seen: list[int] = []
    real_init = distributed.init
    monkeypatch.setattr(
        distributed, "init", lambda device, minutes: seen.append(minutes) or real_init(device)
    )
    build_training(tiny_cfg("dist_timeout_min=45"))
    assert seen == [45]
