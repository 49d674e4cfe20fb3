"""Checkpoints: exact resume, atomic writes under kill -9, clean stop on SIGTERM, NaN stop."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ssd_npu.checkpoint import list_checkpoints, load_checkpoint, save_atomic, save_checkpoint
from ssd_npu.engine import NonFiniteLoss
from ssd_npu.train import run
from tests.test_train import read_scalars, tiny_cfg

REPO = Path(__file__).resolve().parents[1]
FAST = ("canvas=[128,128]", "max_boxes=8", "eval=false")


def losses(out: Path) -> dict[int, float]:
    return {e.step: e.value for e in read_scalars(out)["loss/total"]}


def test_resume_continues_the_same_loss_curve(tiny_coco, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    run(tiny_cfg(tiny_coco, straight, *FAST, "max_steps=8"))
    run(tiny_cfg(tiny_coco, split, *FAST, "max_steps=4"))
    resumed = run(tiny_cfg(tiny_coco, split, *FAST, "max_steps=8", "resume=auto"))

    assert resumed["global_step"] == 8 and resumed["steps"] == 4
    expected, got = losses(straight), losses(split)
    assert sorted(got) == list(range(1, 9))
    # Steps 7-8 cross the epoch boundary (6 batches per epoch): the data order follows too.
    for step in range(5, 9):
        assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-7), step
    final = {
        k: v
        for k, v in load_checkpoint(list_checkpoints(straight / "checkpoints")[-1])["model"].items()
    }
    for name, value in load_checkpoint(list_checkpoints(split / "checkpoints")[-1])[
        "model"
    ].items():
        torch.testing.assert_close(value, final[name], rtol=1e-5, atol=1e-6, msg=name)


def test_checkpoint_holds_the_training_state(tiny_coco, tmp_path):
    run(
        tiny_cfg(
            tiny_coco, tmp_path, *FAST, "max_steps=3", "checkpoint_every=1", "keep_checkpoints=2"
        )
    )
    found = list_checkpoints(tmp_path / "checkpoints")
    assert [p.name for p in found] == ["step_0000002.pt", "step_0000003.pt"]  # keeps the last 2
    state = load_checkpoint(found[-1])
    assert {"model", "optimizer", "scheduler", "scaler", "progress", "config", "rng"} <= set(state)
    assert state["progress"] == {"epoch": 0, "batch": 3, "step": 3}
    assert state["optimizer"]["state"]  # momentum buffers are saved
    assert state["config"]["max_boxes"] == 8


KILLER = """
import sys, torch
from ssd_npu.checkpoint import save_checkpoint
step = 0
while True:
    step += 1
    save_checkpoint({"w": torch.full((4_000_000,), float(step))}, sys.argv[1], step, keep=3)
    print(step, flush=True)
"""


def test_kill_9_never_leaves_a_corrupt_newest_checkpoint(tmp_path):
    folder = tmp_path / "ckpt"
    for delay in (0.3, 0.7, 1.1):
        proc = subprocess.Popen(
            [sys.executable, "-c", KILLER, str(folder)], cwd=REPO, stdout=subprocess.PIPE, text=True
        )
        proc.stdout.readline()  # at least one checkpoint is complete
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        found = list_checkpoints(folder)
        assert found
        for path in found:
            step = int(path.stem.split("_")[1])
            assert torch.equal(load_checkpoint(path)["w"][:3], torch.full((3,), float(step)))


def test_crash_between_write_and_rename_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "state.pt"
    save_atomic({"v": 1}, path)

    def crash(*args):
        raise OSError("simulated crash before rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated"):
        save_atomic({"v": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]  # no temporary left behind
    save_checkpoint({"v": 3}, tmp_path, 5, keep=1)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000005.pt"]


def test_sigterm_stops_after_the_step_and_says_how_to_resume(tiny_coco, tmp_path):
    args = [
        sys.executable, "train.py", "device=cpu", "data=coco", f"data.root={tiny_coco}",
        "data.num_classes=6", "batch_size=2", "num_workers=0", *FAST, "epochs=50",
        f"hydra.run.dir={tmp_path}",
    ]  # fmt: skip
    proc = subprocess.Popen(args, cwd=REPO, stderr=subprocess.PIPE, text=True)
    seen = ""
    while "step_ms=" not in seen:  # tqdm's postfix: a step has finished
        char = proc.stderr.read(1)
        assert char, f"train.py ended early: {seen[-2000:]}"
        seen += char
    proc.send_signal(signal.SIGTERM)
    err = seen + proc.stderr.read()
    proc.wait(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM
    assert "Traceback" not in err
    assert "resume=auto" in err and f"hydra.run.dir={tmp_path}" in err
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["interrupted"] is True
    newest = list_checkpoints(tmp_path / "checkpoints")[-1]
    assert newest == Path(summary["checkpoint"])
    assert load_checkpoint(newest)["progress"]["step"] == summary["global_step"] >= 1

    resumed = run(
        tiny_cfg(
            tiny_coco, tmp_path, *FAST, "resume=auto", f"max_steps={summary['global_step'] + 1}"
        )
    )
    assert resumed["global_step"] == summary["global_step"] + 1


def test_non_finite_loss_stops_and_names_the_step(tiny_coco, tmp_path):
    cfg = tiny_cfg(
        tiny_coco, tmp_path, *FAST, "optim.lr=1e30", "optim.warmup_steps=0", "checkpoint_every=1"
    )
    with pytest.raises(NonFiniteLoss) as err:
        run(cfg)
    message = str(err.value)
    assert "training stopped at step" in message
    assert "bbox_regression=" in message and "classification=" in message
    step = int(message.split("step ")[1].split(" ")[0])
    kept = list_checkpoints(tmp_path / "checkpoints")
    assert step >= 2 and kept and kept[-1].name == f"step_{step - 1:07d}.pt"
    assert str(kept[-1]) in message
    assert all(torch.isfinite(v).all() for v in load_checkpoint(kept[-1])["model"].values())
    summary = json.loads((tmp_path / "summary.json").read_text())  # written even so
    assert summary["error"] == message and summary["global_step"] == step
    assert summary["steps"] == step - 1  # the failed step is not logged as a step


def test_same_seed_same_losses_with_workers(tiny_coco, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        run(tiny_cfg(tiny_coco, out, *FAST, "num_workers=2", "max_steps=20", "augment=true"))
    assert losses(a) == losses(b) and len(losses(a)) == 20
