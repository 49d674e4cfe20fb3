"""detect_warmup on made-up step-time series (ms), and Telemetry's event file read back."""

import json

import pytest
from torch.utils.tensorboard import SummaryWriter

from ssd_npu.engine.telemetry import Telemetry, detect_warmup, read_scalar_series, steady_median
from ssd_npu.errors import UserError

STEADY = [100.0, 104.0, 98.0, 101.0, 99.0, 103.0, 97.0, 102.0, 100.0, 101.0]


@pytest.mark.parametrize(
    ("series", "warmup"),
    [
        ([60_000.0, *STEADY], 1),  # one compile spike
        ([60_000.0, 100.0, 30_000.0, *STEADY], 3),  # compile, normal step, a new shape
        (STEADY, 0),  # noise only: no warm-up
        ([130.0, 180.0, *STEADY], 0),  # slower but under 2x: not a compile
        ([*STEADY, 5_000.0], 0),  # a late spike (second half) is not warm-up
        ([60_000.0, 100.0, 99.0, 5_000.0, *STEADY], 1),  # a hiccup after normal steps is not
        ([100.0, 30_000.0, *STEADY], 2),  # the compile came one step late (a lazy backward)
        ([100.0, 99.0, 30_000.0, *STEADY], 0),  # a spike after two normal steps: a hiccup
        ([250.0], 1),  # one step: all warm-up
        ([], 0),
    ],
)
def test_detect_warmup(series, warmup):
    assert detect_warmup(series) == warmup


def test_steady_median_skips_warmup():
    series = [60_000.0, 100.0, 30_000.0, *STEADY]
    assert steady_median(series, detect_warmup(series)) == pytest.approx(100.5)
    assert steady_median([250.0], 1) == 250.0  # all warm-up: the whole run's median
    assert steady_median([], 0) is None


def test_telemetry_writes_events_and_summary(tmp_path):
    step_ms = [5_000.0, 100.0, 110.0, 90.0]
    tel = Telemetry(tmp_path, total_steps=len(step_ms))
    for i, ms in enumerate(step_ms, start=1):
        losses = {"total": 3.0 / i, "bbox_regression": 1.0 / i, "classification": 2.0 / i}
        tel.log_step(i, ms, 2.0, 4, losses, lr=0.01, boxes_dropped=1, graphs=1)
    summary = tel.summary(graphs_compiled=1, recompiles=0)
    tel.write_summary(summary)
    tel.close()

    scalars = read_scalar_series(tmp_path, "time/step_ms")
    assert scalars["time/step_ms"][0] == [1, 2, 3, 4]
    assert scalars["time/step_ms"][1] == pytest.approx(step_ms)
    assert scalars["compile/graphs"][1] == [1, 1, 1, 1]
    assert scalars["throughput/images_per_s"][1][1] == pytest.approx(40.0)
    assert scalars["loss/total"][1][-1] == pytest.approx(0.75)

    written = json.loads((tmp_path / "summary.json").read_text())
    assert written == summary
    assert summary["warmup_steps"] == 1 and summary["steady_step_ms"] == 100.0
    assert summary["first_step_ms"] == 5_000.0 and summary["boxes_dropped"] == 4
    assert summary["steady_images_per_s"] == pytest.approx(40.0)


def test_no_progress_bar_when_nothing_will_be_trained(tmp_path, capsys):
    Telemetry(tmp_path / "none", total_steps=0).close()  # eval_only, a finished run
    assert "step" not in capsys.readouterr().err
    Telemetry(tmp_path / "some", total_steps=2).close()
    assert "0/2" in capsys.readouterr().err  # control: a run with steps shows its bar


def test_read_scalar_series_reads_a_run_back(tmp_path):
    """The reader of scripts/plot_steptime.py and plot_curves.py: a real event file, read
    back sorted by step, from the run folder or its tensorboard/ folder."""
    writer = SummaryWriter(str(tmp_path / "tensorboard"))
    for step in (3, 1, 2):  # written out of order
        writer.add_scalar("loss/total", 10.0 - step, step)
    writer.add_scalar("eval/mAP50", 0.5, 3)
    writer.close()
    series = read_scalar_series(tmp_path, "loss/total")
    assert series["loss/total"] == ([1, 2, 3], [9.0, 8.0, 7.0])
    assert series["eval/mAP50"] == ([3], [0.5])
    assert read_scalar_series(tmp_path / "tensorboard", "eval/mAP50") == series
    with pytest.raises(UserError, match="has no 'time/step_ms' scalars"):
        read_scalar_series(tmp_path, "time/step_ms")
    with pytest.raises(UserError, match="is not a folder"):
        read_scalar_series(tmp_path / "missing", "loss/total")


def test_wall_clock_throughput_counts_recurring_data_waits(tmp_path):
    """Steady wall-clock img/s and data wait % are means over the steady steps: a batch that
    waits 300 ms for data (a new epoch's first) lowers the throughput, as it does by the clock."""
    t = Telemetry(tmp_path, 4, enabled=False)
    for step, (step_ms, data_ms) in enumerate(
        [(1000.0, 0.0), (10.0, 0.0), (10.0, 0.0), (10.0, 300.0)]
    ):
        losses = {"total": 1.0, "bbox_regression": 0.5, "classification": 0.5}
        t.log_step(step + 1, step_ms, data_ms, batch_size=4, losses=losses, lr=0.1, boxes_dropped=0)
    t.wall_s = [0.0, 0.02, 0.04, 0.36]  # when each step was read, s
    s = t.summary()
    assert s["warmup_steps"] == 1
    assert s["steady_wall_step_ms"] == pytest.approx(120.0)  # (0.36 - 0.0) s / 3 steps
    assert s["steady_wall_images_per_s"] == pytest.approx(4 * 1000.0 / 120.0)
    assert s["data_wait_pct"] == pytest.approx(100.0 * 100.0 / 120.0)  # mean wait 100 ms
    assert s["steady_images_per_s"] == pytest.approx(400.0)  # device time: 10 ms steps
