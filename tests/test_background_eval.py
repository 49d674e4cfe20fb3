"""eval.background (COCOeval in a side process), the phase times of every evaluation, and
eval.target_map (stop at the evaluation that reaches it)."""

import json

import numpy as np
import pytest

from ssd_npu.build import build_training
from ssd_npu.config import validate
from ssd_npu.data.coco import CocoDetectionDataset
from ssd_npu.engine.checkpoint import TrainState, list_checkpoints
from ssd_npu.engine.hooks import CheckpointHook
from ssd_npu.engine.telemetry import Telemetry, read_scalar_series
from ssd_npu.errors import ConfigError
from ssd_npu.evaluation.background import BackgroundCoco, BackgroundEvalError
from ssd_npu.evaluation.evaluate import Evaluator, Found
from ssd_npu.evaluation.hook import TIME_KEYS, EvalHook, Target
from ssd_npu.train import run
from tests.helpers import compose_cfg, train_loop

# A tiny run with an evaluation after epoch 1 (step 6: 12 images, batch 2) and at the end (12).
RUN = ("canvas=[128,128]", "max_boxes=8", "epochs=2", "eval_every=1", "optim.lr=0.02")


def test_background_history_equals_the_synchronous_one(tiny_cfg, tmp_path):
    summaries = {}
    for mode in ("false", "true"):
        out = tmp_path / mode
        # a target no evaluation reaches: the vote runs, training is not cut short
        cfg = tiny_cfg(*RUN, f"eval.background={mode}", "eval.target_map=0.99", out=out)
        summaries[mode] = run(cfg)
        assert json.loads((out / "summary.json").read_text())["eval"] == summaries[mode]["eval"]
        mAP = read_scalar_series(out, "eval/mAP")["eval/mAP"]  # noqa: N806
        assert mAP[0] == [6, 12]  # logged at the step each evaluation belongs to
        stall = read_scalar_series(out, "time/eval_stall_s")["time/eval_stall_s"]
        assert stall[0] == [6, 12] and all(s > 0 for s in stall[1])
    sync, background = summaries["false"]["eval"], summaries["true"]["eval"]
    assert (sync["background"], background["background"]) == (False, True)
    assert sync["coco"] == background["coco"] == "faster"
    assert summaries["false"]["global_step"] == summaries["true"]["global_step"] == 12
    for entry in sync["history"] + background["history"]:
        assert set(TIME_KEYS) <= entry.keys() and all(entry[k] >= 0 for k in TIME_KEYS)
        assert entry["stall_s"] >= entry["forward_s"] + entry["records_s"]
    assert background["history"][-1]["await_s"] > 0  # the last one is awaited at the end
    assert [{k: v for k, v in e.items() if k not in TIME_KEYS} for e in sync["history"]] == [
        {k: v for k, v in e.items() if k not in TIME_KEYS} for e in background["history"]
    ]
    assert sync["history"][-1]["num_detections"] > 0
    for summary in (sync, background):
        assert summary["target"] == {
            "metric": "mAP",
            "value": 0.99,
            "stop": True,
            "reached": False,
            "step": None,
            "wall_s": None,
            "stopped_step": 12,
        }


def ground_truth_results(coco) -> np.ndarray:
    """The val set's own boxes as detections with score 1: mAP 1.0."""
    rows = [
        [a["image_id"], *a["bbox"], 1.0, a["category_id"]]
        for a in coco.anns.values()
        if not a["iscrowd"]
    ]
    return np.array(rows, dtype=np.float64)


def perfect_loop(tiny_cfg, tiny_coco, tmp_path, background: bool, target: Target):
    """The tiny run's loop (18 steps: 3 epochs of 6) with a checkpoint hook and an EvalHook
    after every epoch whose detector returns the ground truth (mAP 1.0)."""
    cfg = tiny_cfg("canvas=[128,128]", "max_boxes=8", "eval=false")
    t = build_training(cfg)
    val = CocoDetectionDataset(tiny_coco, "val2017")
    perfect = ground_truth_results(val.coco)
    evaluator = Evaluator(
        lambda loader: Found(perfect, sorted(val.coco.imgs), 0.0, 0.0), [], val.coco
    )
    side = BackgroundCoco(val.ann_file, "faster") if background else None
    telemetry = Telemetry(tmp_path, 0, enabled=False)
    evals = EvalHook(evaluator, telemetry, 1, 3, background=side, target=target)
    state = TrainState(t.model, t.optimizer, t.scheduler, None, {}, t.device)
    checkpoints = CheckpointHook(state, tmp_path / "ckpt", 0, keep=5, main=True)
    return train_loop(t, tmp_path, [checkpoints, evals]), evals


@pytest.mark.parametrize("background", [False, True])
def test_training_stops_at_the_evaluation_that_reaches_the_target(
    tiny_cfg, tiny_coco, tmp_path, background
):
    """A detector that returns the ground truth (mAP 1.0) reaches eval.target_map=0.5 at the
    first evaluation (step 6): synchronous, training stops there; background, at the step the
    result arrives. Either way the checkpoint of the stop step is written."""
    target = Target(0.5, "mAP50")
    loop, evals = perfect_loop(tiny_cfg, tiny_coco, tmp_path, background, target)
    progress = loop.run(epochs=3)
    assert evals.reached is not None and evals.reached["step"] == 6
    assert evals.reached["mAP50"] == pytest.approx(1.0)
    if background:
        assert 6 <= progress.step <= 18  # when the result arrived (a loaded machine: later)
    else:
        assert progress.step == 6
    saved = [p.name for p in list_checkpoints(tmp_path / "ckpt")]
    assert saved[-1] == f"step_{progress.step:07d}.pt"
    target = evals.target_summary(progress.step)
    assert target["reached"] and target["step"] == 6 and target["wall_s"] > 0
    assert target["stopped_step"] == progress.step


def test_a_target_without_stop_is_only_recorded(tiny_cfg, tiny_coco, tmp_path):
    """eval.target_stop=false: the first evaluation reaching the target is recorded (step,
    wall time) and training runs to its end, evaluating again at the end."""
    loop, evals = perfect_loop(tiny_cfg, tiny_coco, tmp_path, False, Target(0.5, "mAP", False))
    progress = loop.run(epochs=3)
    assert progress.step == 18
    assert [e["step"] for e in evals.history] == [6, 12, 18]
    target = evals.target_summary(progress.step)
    assert target["reached"] and target["step"] == 6 and not target["stop"]
    assert target["wall_s"] == evals.history[0]["wall_s"] < evals.history[-1]["wall_s"]


def test_a_failure_in_the_side_process_is_one_clear_error(tiny_coco):
    val = CocoDetectionDataset(tiny_coco, "val2017")
    side = BackgroundCoco(val.ann_file, "faster")
    try:
        good = ground_truth_results(val.coco)
        ids = sorted(val.coco.imgs)
        side.submit(3, good, ids, {"stall_s": 0.1})
        side.submit(7, good[:2], ids, {"stall_s": 0.2})
        bad = good.copy()
        bad[:, 0] = 999  # an image the annotations do not have: COCO's loadRes refuses it
        side.submit(9, bad, ids, {"stall_s": 0.3})
        done = []
        with pytest.raises(BackgroundEvalError, match=r"evaluation of step 9 failed") as err:
            while side.pending:  # in order: 3, then 7, then the failure
                done.append(side.wait_next())
        assert [step for step, _ in done] == [3, 7]
        assert done[0][1]["mAP"] == pytest.approx(1.0) and done[0][1]["stall_s"] == 0.1
        assert err.value.__cause__ is not None  # the side process's own error is kept
    finally:
        side.close()


def test_eval_keys_are_validated():
    demo = compose_cfg().eval  # the default run reports its time to mAP50 0.5, trains on
    assert (demo.target_map, demo.target_metric, demo.target_stop) == (0.5, "mAP50", False)
    assert compose_cfg("model=ssd300_vgg16").eval.target_map is None
    validate(compose_cfg("eval.background=true", "eval.target_map=0.2", "eval_every=1"))
    with pytest.raises(ConfigError, match=r"^eval\.target_map=1\.5 is not valid"):
        validate(compose_cfg("eval.target_map=1.5", "eval_every=1"))
    with pytest.raises(ConfigError, match=r"^eval\.target_map=0\.2 needs evaluations"):
        validate(compose_cfg("eval.target_map=0.2", "eval_every=0", "eval.target_stop=true"))
    validate(compose_cfg("eval.target_map=0.2", "eval_every=0", "eval.target_stop=false"))
    with pytest.raises(ConfigError, match=r"^eval\.target_metric='AP' is not valid"):
        validate(compose_cfg("eval.target_metric=AP"))
