"""Data parallel on CPU (gloo, 2 processes) trains exactly what one process would.

The equivalence runs in float64 (`torch.set_default_dtype`): training-mode BatchNorm on a
random network turns float32 rounding differences (one sum over 4 images versus two sums
over 2) into ~1e-3 relative gradient noise, which would hide the comparison. Everything
else is the production path: build_training, DistributedSampler, DDP, the cross-rank
BatchNorm, the global-positive loss normalisation and TrainLoop.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from ssd_npu.build import build_training
from ssd_npu.engine import TrainLoop
from ssd_npu.telemetry import Telemetry
from ssd_npu.train import run
from tests.helpers import REPO, tiny_cfg, tiny_overrides

GLOBAL_BATCH = 4
COMMON = ("canvas=[128,128]", "max_boxes=8", "eval=false", "sync_bn=true", "augment=false")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank: int, world: int, port: int, root: str, out: str, steps: int, dtype: str):
    """One rank (or the single process when world == 1): train `steps`, save what we compare."""
    if world > 1:
        os.environ.update(
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(world),
        )
    torch.set_num_threads(1)
    torch.set_default_dtype(getattr(torch, dtype))
    out_dir = Path(out) / f"world{world}"
    cfg = tiny_cfg(
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


@pytest.mark.slow
def test_torchrun_writes_one_summary_and_one_event_file(tiny_coco, tmp_path):
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
        f"--master_port={free_port()}", "train.py",
        *tiny_overrides(tiny_coco, *[c for c in COMMON if c != "eval=false"], "max_steps=2",
                        f"hydra.run.dir={tmp_path}"),
    ]  # fmt: skip
    proc = subprocess.run(
        cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["global_step"] == 2 and summary["steps"] == 2
    assert summary["device"] == "cpu"
    assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_0000002.pt"]
    assert proc.stdout.count("ssd-npu: device=cpu ranks=2") == 1  # rank 0 alone prints

    # Evaluation was sharded over the ranks and gathered: one process evaluating the same
    # checkpoint on the whole val set gets the same numbers.
    single = run(
        tiny_cfg(tiny_coco, tmp_path / "single", "canvas=[128,128]", "max_boxes=8",
                 "eval_only=true", f"weights={tmp_path / 'checkpoints' / 'step_0000002.pt'}")
    )  # fmt: skip
    ranks, one = summary["eval"]["history"][-1], single["eval"]["history"][-1]
    assert ranks["num_images"] == one["num_images"] == 6  # every val image once
    assert ranks["num_detections"] == one["num_detections"] > 0
    assert summary["eval"]["mAP"] == pytest.approx(single["eval"]["mAP"], abs=1e-9)
    assert summary["eval"]["mAP50"] == pytest.approx(single["eval"]["mAP50"], abs=1e-9)
