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
from tests.helpers import FAST, REPO, losses, run_train, tiny_cfg, tiny_overrides


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


def test_resume_on_a_finished_run_trains_nothing_and_exits_0(tiny_coco, tmp_path, capsys):
    overrides = (*FAST, "max_steps=2")
    first = run(tiny_cfg(tiny_coco, tmp_path, *overrides))
    assert first["global_step"] == 2
    newest = tmp_path / "checkpoints" / "step_0000002.pt"
    written = newest.stat().st_mtime_ns
    capsys.readouterr()

    again = run(tiny_cfg(tiny_coco, tmp_path, *overrides, "resume=auto"))
    shown = capsys.readouterr()
    assert "is complete (step 2); nothing to train" in shown.out
    assert "step/s" not in shown.out + shown.err  # no progress bar: nothing started
    assert again == json.loads(json.dumps(first))  # the finished run's summary, as it stands

    def unchanged():
        assert json.loads((tmp_path / "summary.json").read_text())["global_step"] == 2
        assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == [newest.name]
        assert newest.stat().st_mtime_ns == written  # not even re-saved
        assert sorted(losses(tmp_path)) == [1, 2]  # no step logged after the second

    unchanged()
    # the command line: a finished run is not an error (train.py exits 0)
    proc = run_train(
        *tiny_overrides(tiny_coco, *overrides, "resume=auto", f"hydra.run.dir={tmp_path}")
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert f"the run in {tmp_path} is complete (step 2)" in proc.stdout
    unchanged()


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
        sys.executable, "train.py",
        *tiny_overrides(tiny_coco, *FAST, "epochs=50", f"hydra.run.dir={tmp_path}"),
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
    assert message.startswith("training stopped: the loss of step ")
    assert "bbox_regression=" in message and "classification=" in message
    step = int(message.split("step ")[1].split(" ")[0])
    assert f"the loss of step {step} (epoch 0) is not finite" in message  # names its step
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
