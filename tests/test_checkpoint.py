"""Checkpoints: exact resume, atomic writes under kill -9, clean stop on SIGTERM, NaN stop."""

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from ssd_npu.device.backend import CPU, Device
from ssd_npu.engine.checkpoint import (
    list_checkpoints,
    load_checkpoint,
    rng_state,
    save_atomic,
    save_checkpoint,
    set_rng_state,
)
from ssd_npu.engine.loop import NonFiniteLoss
from ssd_npu.train import run
from tests.helpers import FAST, REPO, TinyCfg, losses, run_train, tiny_overrides


def test_resume_continues_the_same_loss_curve(tiny_cfg, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    run(tiny_cfg(*FAST, "max_steps=8", out=straight))
    run(tiny_cfg(*FAST, "max_steps=4", out=split))
    resumed = run(tiny_cfg(*FAST, "max_steps=8", "resume=auto", out=split))

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


FINISHED = (*FAST, "max_steps=2")  # a run that ends at step 2


def finished_run(tiny_cfg: TinyCfg, out: Path) -> tuple[dict, Callable[[], None]]:
    """A 2-step run in `out`: (its summary, a check that the run in `out` is still as it
    finished: summary.json, checkpoints, files untouched, no step logged after the second)."""
    first = run(tiny_cfg(*FINISHED, out=out))
    assert first["global_step"] == 2
    newest = out / "checkpoints" / "step_0000002.pt"
    written = newest.stat().st_mtime_ns

    def unchanged() -> None:
        assert json.loads((out / "summary.json").read_text())["global_step"] == 2
        assert [p.name for p in list_checkpoints(out / "checkpoints")] == [newest.name]
        assert newest.stat().st_mtime_ns == written  # not even re-saved
        assert sorted(losses(out)) == [1, 2]

    return first, unchanged


def test_resume_on_a_finished_run_trains_nothing(tiny_cfg, tmp_path, capsys):
    first, unchanged = finished_run(tiny_cfg, tmp_path)
    capsys.readouterr()
    again = run(tiny_cfg(*FINISHED, "resume=auto"))
    shown = capsys.readouterr()
    assert "is complete (step 2); nothing to train" in shown.out
    assert "step/s" not in shown.out + shown.err  # no progress bar: nothing started
    assert again == json.loads(json.dumps(first))  # the finished run's summary, as it stands
    unchanged()


@pytest.mark.slow  # train.py in a subprocess (~6 s); the test above covers run() itself
def test_resume_on_a_finished_run_exits_0_from_the_command_line(tiny_coco, tiny_cfg, tmp_path):
    _, unchanged = finished_run(tiny_cfg, tmp_path)
    proc = run_train(
        *tiny_overrides(tiny_coco, *FINISHED, "resume=auto", f"hydra.run.dir={tmp_path}")
    )
    assert proc.returncode == 0, proc.stderr[-2000:]  # a finished run is not an error
    assert "Traceback" not in proc.stderr
    assert f"the run in {tmp_path} is complete (step 2)" in proc.stdout
    unchanged()


def test_checkpoint_holds_the_training_state(tiny_cfg, tmp_path):
    run(tiny_cfg(*FAST, "max_steps=3", "checkpoint_every=1", "keep_checkpoints=2"))
    found = list_checkpoints(tmp_path / "checkpoints")
    assert [p.name for p in found] == ["step_0000002.pt", "step_0000003.pt"]  # keeps the last 2
    state = load_checkpoint(found[-1])
    assert {"model", "optimizer", "scheduler", "scaler", "progress", "config", "rng"} <= set(state)
    assert state["progress"] == {"epoch": 0, "batch": 3, "step": 3}
    assert len(state["rng"]) == 1 and {"python", "numpy", "torch"} <= set(state["rng"][0])
    assert state["optimizer"]["state"]  # momentum buffers are saved
    assert state["config"]["max_boxes"] == 8


KILLER = """
import sys, torch
from ssd_npu.engine.checkpoint import save_checkpoint
step = 0
while True:
    step += 1
    save_checkpoint({"w": torch.full((4_000_000,), float(step))}, sys.argv[1], step, keep=3)
    print(step, flush=True)
"""


@pytest.mark.slow  # 3 killed processes, ~17 s; the quick crash test below covers save_atomic
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


def test_sigterm_stops_after_the_step_and_says_how_to_resume(tiny_coco, tiny_cfg, tmp_path):
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

    resumed = run(tiny_cfg(*FAST, "resume=auto", f"max_steps={summary['global_step'] + 1}"))
    assert resumed["global_step"] == summary["global_step"] + 1


def test_non_finite_loss_stops_and_names_the_step(tiny_cfg, tmp_path):
    cfg = tiny_cfg(*FAST, "optim.lr=1e30", "optim.warmup_steps=0", "checkpoint_every=1")
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


def test_same_seed_same_losses_with_workers(tiny_cfg, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        run(tiny_cfg(*FAST, "num_workers=2", "max_steps=20", "augment=true", out=out))
    assert losses(a) == losses(b) and len(losses(a)) == 20


# The CUDA generator's state: seed (uint64) and offset (int64), 16 bytes.
CUDA_STATE_BYTES = 16


def cuda_state(r: int) -> torch.Tensor:
    return torch.tensor([r] + [0] * (CUDA_STATE_BYTES - 1), dtype=torch.uint8)


def seed(n: int) -> None:
    random.seed(n)
    np.random.seed(n)
    torch.manual_seed(n)


def seeded_state(n: int) -> dict:
    seed(n)
    return rng_state(CPU)


def draws() -> list[float]:
    return [random.random(), float(np.random.rand()), float(torch.rand(1))]


def eight_gpu_checkpoint(layout: str) -> dict:
    """The `rng` of a checkpoint written on 8 GPUs: `ranks` (8 ranks, one CUDA state each)
    or `old` (the earlier format: rank 0's states, `cuda` one state per visible GPU)."""
    if layout == "ranks":
        return {"rng": [{**seeded_state(100 + r), "cuda": cuda_state(r)} for r in range(8)]}
    return {"rng": {**seeded_state(100), "cuda": [cuda_state(r) for r in range(8)]}}


@pytest.mark.parametrize("layout", ["ranks", "old"])
@pytest.mark.parametrize("gpus", [1, 0])
def test_a_checkpoint_with_8_cuda_states_resumes_with_1_gpu_or_none(
    tmp_path, monkeypatch, capsys, layout, gpus
):
    saved = eight_gpu_checkpoint(layout)
    seed(100)
    expected = draws()  # rank 0's draws right after the checkpoint
    path = save_atomic(saved, tmp_path / "step.pt")
    loaded = load_checkpoint(path)  # weights_only=True reads both layouts

    seed(7)  # a fresh process's seeding (before the seam: manual_seed would seed CUDA too)
    # The seam: CUDA's generator (this rank on GPU 0; or a cpu run, which has none).
    restored: list[tuple[torch.Tensor, int]] = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device: restored.append((s, device)))
    set_rng_state(loaded["rng"], Device("cuda", 0) if gpus else CPU)

    assert draws() == expected  # python, numpy and torch: rank 0's
    if gpus:  # exactly one state, this device's (rank 0 / GPU 0), to this device
        assert len(restored) == 1 and restored[0][1] == 0
        assert torch.equal(restored[0][0], cuda_state(0))
    else:
        assert restored == []
    note = capsys.readouterr().out
    assert ("RNG states of 8 rank(s), this run has 1" in note) == (layout == "ranks")


class FakeNpuGenerator:
    """torch.npu's generator calls (torch_npu.npu.random): what was set, and on which device."""

    def __init__(self) -> None:
        self.state = torch.arange(16, dtype=torch.uint8)
        self.restored: list[tuple[torch.Tensor, int]] = []

    def get_rng_state(self, device: int) -> torch.Tensor:
        return self.state.clone()

    def set_rng_state(self, new_state: torch.Tensor, device: int) -> None:
        self.restored.append((new_state, device))


def test_the_npu_generator_is_saved_and_restored_on_npu_only(tmp_path, monkeypatch):
    """An npu rank's states hold its generator under `npu`; resume gives it back to that
    device, and a checkpoint of another device type (cuda, old or new layout) leaves it."""
    generator = FakeNpuGenerator()
    monkeypatch.setattr(torch, "npu", generator, raising=False)
    npu = Device("npu", 1)
    path = save_atomic({"rng": [rng_state(npu)]}, tmp_path / "step.pt")
    saved = load_checkpoint(path)["rng"]
    assert torch.equal(saved[0]["npu"], generator.state) and "cuda" not in saved[0]
    set_rng_state(saved, npu)
    assert [(s.tolist(), d) for s, d in generator.restored] == [(list(range(16)), 1)]
    for layout in ("ranks", "old"):  # cuda checkpoints resumed on npu
        set_rng_state(eight_gpu_checkpoint(layout)["rng"], npu)
    set_rng_state(saved, CPU)  # an npu checkpoint resumed on the cpu
    assert len(generator.restored) == 1


RANK_SCRIPT = """
import json, random, sys
from pathlib import Path
import numpy as np
import torch, torch.distributed as dist
from ssd_npu.device import distributed
from ssd_npu.engine.checkpoint import TrainState, load_checkpoint, set_rng_state
from ssd_npu.device.backend import CPU, Device
from ssd_npu.engine.loop import Progress
from ssd_npu.engine.hooks import CheckpointHook

def draws():
    return [random.random(), float(np.random.rand()), float(torch.rand(1))]

rank = int(sys.argv[1])
distributed.init(Device("cpu", None))  # gloo; RANK, WORLD_SIZE, MASTER_* from the env
model = torch.nn.Linear(2, 1)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
hook = CheckpointHook(
    TrainState(model, optimizer, scheduler, None, {}, CPU), Path(sys.argv[2]), 1, 1, rank == 0
)
random.seed(10 + rank), np.random.seed(10 + rank), torch.manual_seed(10 + rank)  # its own
hook.save(Progress(step=1))  # every rank calls it: the RNG gather is a collective
expected = draws()  # what this rank draws right after the checkpoint
dist.barrier()  # the file is written
saved = load_checkpoint(hook.last)
draws()  # training went on
set_rng_state(saved["rng"], CPU)
print(json.dumps({"expected": expected, "resumed": draws(), "ranks": len(saved["rng"])}))
distributed.shutdown()
"""


@pytest.mark.slow  # two processes
def test_each_rank_saves_and_restores_its_own_rng_states(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        env = {
            **os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
        }  # fmt: skip
        args = [sys.executable, "-c", RANK_SCRIPT, str(rank), str(tmp_path)]
        procs.append(
            subprocess.Popen(
                args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    results = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=180)  # a rank missing the gather hangs here
            assert proc.returncode == 0, err[-2000:]
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for proc in procs:
            proc.kill()  # only ours, and a no-op for those that ended
    assert [r["ranks"] for r in results] == [2, 2]  # one entry per rank in the file
    for r in results:
        assert r["resumed"] == r["expected"]  # each rank continues its own stream
    assert results[0]["expected"] != results[1]["expected"]  # and the streams differ


def test_a_resumed_runs_summary_holds_every_evaluation_and_count(tiny_cfg, tmp_path):
    """The evaluation history and the bucket counts travel in the checkpoint: the resumed
    run's summary.json covers the whole run, not only the steps after the resume."""
    every_epoch = (*FAST, "epochs=2", "eval_every=1", "eval.enabled=false", "show.images=1")
    first = run(tiny_cfg(*every_epoch, "max_steps=8", out=tmp_path))  # 6 batches an epoch
    resumed = run(tiny_cfg(*every_epoch, "resume=auto", out=tmp_path))

    assert [entry["step"] for entry in first["eval"]["history"]] == [6]
    assert resumed["global_step"] == 12 and resumed["steps"] == 4
    # the evaluation at step 6 was made before the interruption; the resumed run made none
    assert resumed["eval"]["history"] == first["eval"]["history"]
    assert first["buckets"]["batches"] == {"8": 8}
    assert resumed["buckets"]["batches"] == {"8": 12}  # the whole run's batches


def test_a_checkpoint_at_an_epochs_end_holds_that_epochs_evaluation(tiny_cfg, tmp_path):
    """checkpoint_every = the epoch's length: the checkpoint of step 6 is written after the
    epoch's evaluation, so a run resumed from it (the newer checkpoint lost, as after a kill)
    still reports the evaluation of step 6."""
    every_epoch = (*FAST, "epochs=3", "eval_every=1", "eval.enabled=false", "show.images=1")
    first = run(tiny_cfg(*every_epoch, "checkpoint_every=6", "max_steps=8", out=tmp_path))
    assert [entry["step"] for entry in first["eval"]["history"]] == [6]
    folder = tmp_path / "checkpoints"
    assert [p.name for p in list_checkpoints(folder)] == ["step_0000006.pt", "step_0000008.pt"]
    (folder / "step_0000008.pt").unlink()  # killed after step 8: only step 6's survives
    held = load_checkpoint(folder / "step_0000006.pt")["hooks"]["eval"]["history"]
    assert [entry["step"] for entry in held] == [6]
    resumed = run(tiny_cfg(*every_epoch, "resume=auto", out=tmp_path))
    assert resumed["global_step"] == 18 and resumed["steps"] == 12
    assert [entry["step"] for entry in resumed["eval"]["history"]] == [6, 12]
    assert resumed["eval"]["history"][0] == first["eval"]["history"][0]
