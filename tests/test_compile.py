"""compile=true: one graph for the whole fixed-shape run; a shape change is a clear error.

Slow (one real inductor compile of the tiny-canvas model, ~1 min on 2 cores), kept in the
default run: it is the proof that the fixed path never recompiles.
"""

import pytest
import torch

from ssd_npu.build import build_training
from ssd_npu.device.compiler import NO_REASON, CompiledStep, RecompileError, graphs_compiled, reset
from ssd_npu.engine.loop import Progress
from tests.helpers import train_loop, train_step

# What this torch's dynamo reports (the code runs on torch 2.6 to 2.14): compile records carry
# the recompile reason from torch 2.7; the fail_on_recompile error quotes the failed guard
# from torch 2.10 (pytorch/pytorch#165445).
RECOMPILE_REASONS = (
    "recompile_reason" in torch._dynamo.utils.CompilationMetrics.__dataclass_fields__
)
GUARD_TEXT_IN_ERROR = tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 10)


@pytest.mark.slow
def test_fixed_step_compiles_once_and_fails_on_a_changed_shape(tiny_cfg, tmp_path):
    reset()
    cfg = tiny_cfg(
        "canvas=[128,128]",
        "max_boxes=8",
        "compile=true",
        "compiler.fail_on_recompile=true",
    )
    t = build_training(cfg)
    loop, progress = train_loop(t, tmp_path), Progress()
    before, originals, counts = graphs_compiled(), set(), set()
    for i, batch in enumerate(t.data.train):
        if i == 4:
            break
        originals.update(tuple(s) for s in batch.orig_sizes.tolist())
        counts.update(batch.valid.sum(1).tolist())
        train_step(loop, batch, progress)  # fail_on_recompile is on: a recompile would raise
    assert len(originals) >= 4 and len(counts) >= 3  # the inputs really differ
    compiled = t.step.compiled
    assert isinstance(compiled, CompiledStep) and compiled.fail_on_recompile
    assert compiled.graphs_per_call == [1, 0, 0, 0]
    assert compiled.recompiles == 0 and graphs_compiled() - before == 1
    # the step's own statistics (what summary.json reports) are the compiled step's
    assert t.step.graphs == 1 and t.step.recompiles == 0 and t.step.recompile_reasons == []
    assert t.step.graphs_last_call == 0

    # One more box row per image: the shape an unfixed target list would change every step.
    pad = lambda x: torch.cat([x, x[:, :1]], dim=1)  # noqa: E731
    batch.boxes, batch.labels, batch.valid = pad(batch.boxes), pad(batch.labels), pad(batch.valid)
    with pytest.raises(RecompileError, match=r"fail_on_recompile.*\n.*") as err:
        t.step(batch)
    text = str(err.value)
    if not GUARD_TEXT_IN_ERROR:  # torch < 2.10: the message says where to read the reason
        assert NO_REASON in text
        return
    assert "size mismatch at index 1. expected 8, actual 9" in text
    assert any(f"tensor '{name}'" in text for name in ("boxes", "labels", "valid"))


def test_recompiles_are_counted_per_call_with_reasons():
    """A toy function: the first compile is warm-up; each new shape after it is a recompile."""
    reset()
    step = CompiledStep(lambda x: (x * 2).sum(), "eager")
    for n in (3, 3, 4, 5, 5):
        step(torch.ones(n))
    assert step.graphs_per_call == [1, 0, 1, 1, 0] and step.recompiles_per_call == [0, 0, 1, 1, 0]
    assert step.recompiles == 2
    if not RECOMPILE_REASONS:  # torch < 2.7: counted, but without dynamo's words
        assert step.recompile_reasons == [NO_REASON, NO_REASON]
        return
    assert "tensor 'x' size mismatch at index 0. expected 3, actual 4" in step.recompile_reasons[0]


def test_fail_on_recompile_names_the_tensor():
    reset()
    step = CompiledStep(lambda images, boxes: images.sum() + boxes.sum(), "eager", True)
    step(torch.ones(2, 3), torch.ones(2, 4, 4))
    step(torch.zeros(2, 3), torch.ones(2, 4, 4))  # same shapes, new values: no recompile
    expected = "tensor 'boxes' size mismatch at index 1" if GUARD_TEXT_IN_ERROR else "TORCH_LOGS"
    with pytest.raises(RecompileError, match=expected):
        step(torch.ones(2, 3), torch.ones(2, 5, 4))


@pytest.mark.slow
def test_device_augmentation_compiles_into_the_steps_one_graph(tiny_cfg, tmp_path):
    """data.augment_on=device: the IoU crop, flip and fit join the step's graph; varying
    images, box counts and crops never recompile it."""
    reset()
    cfg = tiny_cfg(
        "canvas=[128,128]",
        "max_boxes=8",
        "compile=true",
        "compiler.fail_on_recompile=true",
        "augment=true",
        "data.augment_on=device",
        "data.slot=[320,320]",
    )
    t = build_training(cfg)
    loop, progress = train_loop(t, tmp_path), Progress()
    before, sizes = graphs_compiled(), set()
    for i, batch in enumerate(t.data.train):
        if i == 3:
            break
        sizes.update(tuple(s) for s in batch.sizes.tolist())
        train_step(loop, batch, progress)
    assert len(sizes) >= 3  # the images in the slots really differ
    assert t.step.compiled.graphs_per_call == [1, 0, 0]
    assert graphs_compiled() - before == 1 and t.step.recompiles == 0
