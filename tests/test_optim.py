"""The optimizer step: fp16's GradScaler without a per-step host read (fused SGD on cuda), and
the compiled optimizer (compiler.optimizer=true): same losses, one graph, counted in the step's.

The fast compiled-optimizer test uses dynamo's "eager" backend on a toy model (seconds): the
graph capture, guards and recompiles are dynamo's whatever the backend. The slow one trains
the real model on the tiny set with inductor through TrainLoop, as train.py does.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ssd_npu.build import Training, build_training, sgd_settings
from ssd_npu.config import OptimConfig, validate
from ssd_npu.device.backend import Device
from ssd_npu.device.compiler import CompiledStep, CompileOptions, reset
from ssd_npu.engine.loop import Hook, Progress, StepRecord
from ssd_npu.engine.optim import (
    OptimizerStep,
    build_optimizer,
    build_scheduler,
    fused_sgd_available,
    use_fused_sgd,
)
from ssd_npu.errors import ConfigError
from ssd_npu.models.specs import MODELS
from ssd_npu.tools.op_recorder import OpRecorder
from tests.helpers import FAST, compose_cfg, host_syncs, recorded_step, train_loop


def toy_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))


def toy_batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(i)
    return torch.randn(16, 8, generator=g), torch.randn(16, 1, generator=g)


def scaled_steps(fused: bool, steps: int = 3) -> tuple[list[list[str]], list[torch.Tensor]]:
    """`steps` fp32 steps of the toy through a CPU GradScaler and OptimizerStep; the host reads
    of each (backward, scaler step and update: any op that makes the host wait for the device,
    as the audit's OpRecorder flags them) and the final weights."""
    model = toy_model()
    optimizer = build_optimizer(model.parameters(), 0.1, 0.9, 4e-5, fused=fused)
    update = OptimizerStep(optimizer, torch.amp.GradScaler("cpu"))
    recorder = OpRecorder()
    for i in range(steps):
        x, y = toy_batch(i)
        loss = (model(x) - y).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        with recorded_step(recorder):
            update(loss)
    reads = [host_syncs(recorder, step) for step in recorder.steps]
    return reads, [p.detach().clone() for p in model.parameters()]


@pytest.mark.skipif(not fused_sgd_available(), reason="this torch's SGD has no fused kernel")
def test_grad_scaler_step_with_fused_sgd_reads_nothing_back():
    plain_reads, plain = scaled_steps(fused=False)
    fused_reads, fused = scaled_steps(fused=True)
    # plain SGD: GradScaler reads found_inf on the host (.item()) every step before it steps
    assert plain_reads == [["aten::_local_scalar_dense"]] * 3
    # fused SGD takes grad_scale and found_inf as tensors: unscale and skip on the device
    assert fused_reads == [[], [], []]
    for a, b in zip(plain, fused, strict=True):  # and the same update
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_fused_sgd_is_picked_exactly_for_cuda_with_a_grad_scaler():
    assert use_fused_sgd(Device("cuda", 0), grad_scaler=True) == fused_sgd_available()
    for device_type, scaler in (("cuda", False), ("cpu", True), ("cpu", False), ("npu", True)):
        device = Device(device_type, 0)
        assert not use_fused_sgd(device, grad_scaler=scaler), (device_type, scaler)


def test_cpu_fp16_build_keeps_plain_sgd(tiny_cfg):
    """The CPU build of an fp16 run: a GradScaler, and not the fused SGD (cuda only)."""
    t = build_training(tiny_cfg("amp=true", "amp_dtype=fp16", "eval=false"))
    assert t.scaler is not None and t.optimizer_step.scaler is t.scaler
    assert not t.optimizer.param_groups[0]["fused"]
    assert t.optimizer_step.compiled is None


def test_compiled_optimizer_needs_compile():
    cfg = compose_cfg("device=cpu", "compiler.optimizer=true")
    with pytest.raises(ConfigError, match=r"compiler.optimizer=true .* needs compile=true"):
        validate(cfg)
    validate(compose_cfg("device=cpu", "compile=true", "compiler.optimizer=true"))


def test_compiled_optimizer_with_a_grad_scaler_is_refused():
    optimizer = build_optimizer(toy_model().parameters(), 0.1, 0.9, 0.0)
    scaler = torch.amp.GradScaler("cpu")
    with pytest.raises(ConfigError, match=r"compiler.optimizer=true .* amp_dtype=bf16"):
        OptimizerStep(optimizer, scaler, CompileOptions(backend="eager"))


def train_toy(compile_update: bool, steps: int = 10) -> tuple[list[float], list[float], list]:
    """`steps` steps of the toy (forward compiled with dynamo's eager backend), the update
    compiled or not; the schedule changes lr every step. Returns losses, lrs and the forward
    step's CompiledStep (which counts the optimizer's graphs too)."""
    reset()
    model = toy_model()
    optimizer = build_optimizer(model.parameters(), 0.1, 0.9, 4e-5)
    scheduler = build_scheduler(optimizer, warmup_steps=4, warmup_factor=0.1, total_steps=12)
    options = CompileOptions(backend="eager", fail_on_recompile=True)
    forward = CompiledStep(lambda x, y: (model(x) - y).pow(2).mean(), "eager", True)
    update = OptimizerStep(optimizer, None, options if compile_update else None, forward)
    losses, lrs = [], []
    for i in range(steps):
        loss = forward(*toy_batch(i))
        optimizer.zero_grad(set_to_none=True)
        update(loss)
        lrs.append(float(optimizer.param_groups[0]["lr"]))
        scheduler.step()
        losses.append(loss.item())
    return losses, lrs, forward, update


def test_compiled_optimizer_same_losses_one_graph_counted_in_the_step():
    eager_losses, eager_lrs, eager_forward, _ = train_toy(compile_update=False)
    losses, lrs, forward, update = train_toy(compile_update=True)
    assert len(set(lrs)) == len(lrs)  # lr changed every step: a float lr would recompile
    assert lrs == eager_lrs  # the schedule is untouched by the tensor lr (no aliasing)
    # fp32 update arithmetic in both; the compiled graph multiplies by lr in its own order
    assert losses == pytest.approx(eager_losses, rel=1e-6)
    # fail_on_recompile is on: a recompile would have raised; one graph in the first step
    assert update.compiled.graphs_per_call == [1] + [0] * 9
    assert update.compiled.recompiles == 0
    # the step's counters (summary.json's graphs_compiled) hold the forward's and the update's
    assert forward.graphs_per_call == [2] + [0] * 9 and forward.recompiles == 0
    assert eager_forward.graphs_per_call == [1] + [0] * 9


class Records(Hook):
    """Each step's total loss, lr and graphs compiled, as the loop read them."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.lrs: list[float] = []
        self.graphs: list[int] = []

    def after_step(self, record: StepRecord, progress: Progress) -> None:
        self.losses.append(record.values["total"])
        self.lrs.append(record.lr)
        self.graphs.append(record.graphs)


def train_tiny(
    tiny_cfg, out, compile_update: bool
) -> tuple[Records, Training, torch.Tensor, torch.Tensor]:
    """6 steps of ssdlite on the tiny set (64 px canvas, batch 2), forward compiled with
    inductor, as train.py runs them (TrainLoop with the built OptimizerStep). Returns the
    records, the built run and all weights (flat) before and after."""
    reset()
    cfg = tiny_cfg(
        "canvas=[64,64]",
        "max_boxes=8",
        "augment=false",
        "eval=false",
        "epochs=2",
        "max_steps=6",
        "compile=true",
        "compiler.fail_on_recompile=true",  # a recompile after step 1 raises
        f"compiler.optimizer={str(compile_update).lower()}",
        out=out,
    )
    t = build_training(cfg)
    start = torch.cat([p.detach().flatten() for p in t.model.parameters()])
    records = Records()
    train_loop(t, out, [records]).run(cfg.epochs, cfg.max_steps)
    return records, t, start, torch.cat([p.detach().flatten() for p in t.model.parameters()])


@pytest.mark.slow
def test_compiled_optimizer_trains_the_model_as_the_eager_one(tiny_cfg, tmp_path):
    eager, _, start, eager_end = train_tiny(tiny_cfg, tmp_path / "eager", compile_update=False)
    compiled, t, _, end = train_tiny(tiny_cfg, tmp_path / "compiled", compile_update=True)
    assert len(compiled.losses) == 6 and len(set(compiled.lrs)) == 6  # lr changes each step
    assert compiled.lrs == eager.lrs
    # Same data, same forward graph; only the update's fp32 rounding may differ (inductor's
    # kernel computes p - lr * buf in its own order): a few ulp per weight per step. Over 6
    # steps that stays far below 1e-5 relative; a wrong update (lr, momentum, weight decay) is
    # orders of magnitude more. (Over 10 steps on the current tiny set the step-10 losses
    # parted by 0.2%, rounding amplified by a from-scratch detector: 6 steps stay before it.)
    assert compiled.losses == pytest.approx(eager.losses, rel=1e-5), (compiled.losses, eager.losses)
    # the weights after 6 updates: equal to that tolerance, and moved far more than it. atol
    # 1e-6: with one thread (OMP_NUM_THREADS=1) the backward's sums round in another order
    # and a few near-zero weights part by up to 6e-7 (107 of 2.3M); a wrong update moves 1e-4.
    torch.testing.assert_close(end, eager_end, rtol=1e-5, atol=1e-6)
    # (a weight moved 1e-4: 50x what the tolerance allows a weight of 0.1, the typical size)
    assert (eager_end - start).abs().max() > 1e-4
    optimizer_graphs = t.optimizer_step.compiled.graphs_per_call
    assert optimizer_graphs[0] >= 1 and optimizer_graphs[1:] == [0] * 5
    # the run's graphs (summary.json graphs_compiled) are the forward's and the update's
    assert compiled.graphs[0] == eager.graphs[0] + optimizer_graphs[0]
    assert compiled.graphs[1:] == [0] * 5 and t.step.recompiles == 0
    assert t.step.graphs == compiled.graphs[0]


def test_another_functions_graphs_and_recompiles_count_in_the_steps_last_call():
    """What OptimizerStep does with its graphs: a second compiled function's calls are folded
    into the step's latest call, recompiles and their reasons included."""
    reset()
    step = CompiledStep(lambda x: x * 2, "eager")
    other = CompiledStep(lambda x: x + 1, "eager")
    for n in (3, 4, 4):
        step(torch.ones(3))
        other(torch.ones(n))  # a new shape in the second call: a recompile of `other`
        step.add_last_call_of(other)
    assert other.graphs_per_call == [1, 1, 0] and other.recompiles == 1
    assert step.graphs_per_call == [2, 1, 0] and step.recompiles_per_call == [0, 1, 0]
    assert step.recompile_reasons == other.recompile_reasons
    assert "size mismatch at index 0. expected 3, actual 4" in step.recompile_reasons[0]


def test_fused_sgd_after_a_step_the_scaler_skipped_equals_plain_sgd(monkeypatch):
    """fp16's first steps overflow and GradScaler skips them; fused SGD's first momentum
    buffers (torch's `empty_like`, filled by the kernel) must not stay uninitialised then.
    Uninitialised memory is made visible here: empty_like returns NaNs."""
    real_empty_like = torch.empty_like
    monkeypatch.setattr(
        torch, "empty_like", lambda t, *a, **k: real_empty_like(t, *a, **k).fill_(float("nan"))
    )

    def train(fused: bool) -> torch.Tensor:
        torch.manual_seed(0)
        weight = torch.nn.Parameter(torch.randn(5))
        optimizer = build_optimizer([weight], lr=0.1, momentum=0.9, weight_decay=4e-5, fused=fused)
        scaler = torch.amp.GradScaler("cpu")
        for grad in (torch.full((5,), float("inf")), torch.ones(5)):  # skipped, then a real step
            optimizer.zero_grad()
            scaler.scale((weight * grad).sum()).backward()
            scaler.step(optimizer)
            scaler.update()
        return weight.detach()

    plain, fused = train(fused=False), train(fused=True)
    assert torch.isfinite(fused).all()
    torch.testing.assert_close(fused, plain)


@pytest.mark.parametrize(
    ("model", "lr_at_16", "weight_decay"),
    [
        # torchvision references/detection README (8 GPUs): lr at a global batch, scaled to 16
        ("ssdlite320_mobilenet_v3_large", 0.15 * 16 / 192, 4e-5),  # --lr 0.15, 8 x 24
        ("ssd300_vgg16", 0.002 * 16 / 32, 5e-4),  # --lr 0.002 --batch-size 4
        ("retinanet_resnet50_fpn", 0.01, 1e-4),  # --lr 0.01, 8 x 2 (train.py's default)
        ("retinanet_resnet50_fpn_v2", 0.01, 1e-4),
        ("fcos_resnet50_fpn", 0.01, 1e-4),
    ],
)
def test_each_model_trains_with_its_torchvision_sgd_recipe(model, lr_at_16, weight_decay):
    """optim.lr=null: the model's own recipe scaled to the global batch (ssd300 at ssdlite's lr
    diverged within 9 steps on the synthetic set); given keys win over the recipe."""
    spec = MODELS[model]
    assert sgd_settings(OptimConfig(), spec, 16) == pytest.approx((lr_at_16, weight_decay))
    lr, _ = sgd_settings(OptimConfig(), spec, 32)
    assert lr == pytest.approx(2 * lr_at_16)  # linear in the global batch
    mine = OptimConfig(base_lr=0.1, base_batch=8, weight_decay=0.0)
    assert sgd_settings(mine, spec, 16) == pytest.approx((0.2, 0.0))
    assert sgd_settings(OptimConfig(lr=0.03), spec, 16)[0] == 0.03


def test_the_default_run_uses_the_demo_lr_and_ssdlite_decay(tiny_cfg):
    t = build_training(tiny_cfg(*FAST, "optim.lr=0.025"))
    group = t.optimizer.param_groups[0]
    assert group["weight_decay"] == 4e-5 and group["initial_lr"] == 0.025
