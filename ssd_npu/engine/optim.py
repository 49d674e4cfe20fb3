"""SGD and the learning-rate schedule of torchvision's ssdlite recipe, scaled to the batch, and
`OptimizerStep`: the update of one training step (backward, then the optimizer), optionally
compiled.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable

import torch
from torch import Tensor
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, LRScheduler, SequentialLR

from ssd_npu.device.backend import Device
from ssd_npu.device.compiler import CompiledStep, CompileOptions
from ssd_npu.errors import ConfigError


def scaled_lr(lr: float | None, base_lr: float, base_batch: int, global_batch: int) -> float:
    """`lr` if set, else the recipe's lr scaled linearly: base_lr * global_batch / base_batch.

    ssdlite320's recipe is lr 0.15 at global batch 192 (8 devices x 24); batch 8 gives 0.00625.
    """
    return float(lr) if lr is not None else base_lr * global_batch / base_batch


def fused_sgd_available() -> bool:
    """Whether this torch's SGD takes `fused` (torch >= 2.3; CPU kernels since 2.4)."""
    return "fused" in inspect.signature(torch.optim.SGD).parameters


def use_fused_sgd(device: Device, grad_scaler: bool) -> bool:
    """Fused SGD exactly for fp16 on cuda (a GradScaler in use), where this torch has it.

    Why: `GradScaler.step` with a plain SGD reads the inf/NaN check on the host
    (`found_inf.item()`), a device sync every step. A fused SGD declares
    `_step_supports_amp_scaling`: the scaler hands it `grad_scale` and `found_inf` as tensors
    and the kernel unscales and skips the update on the device, with no read. Only there:
    bf16 and fp32 need no scaler (nothing to gain), and torch_npu's fused SGD is unproven
    (`Device.fused_sgd_with_scaler`).
    """
    return device.fused_sgd_with_scaler and grad_scaler and fused_sgd_available()


def build_optimizer(
    params: Iterable[torch.nn.Parameter],
    lr: float,
    momentum: float,
    weight_decay: float,
    *,
    fused: bool = False,
) -> torch.optim.SGD:
    """SGD with momentum and weight decay, as the recipe (momentum 0.9, wd 4e-5).

    `fused`: one fused kernel per device and dtype (see `use_fused_sgd`); the same update.
    """
    kwargs = {"fused": True} if fused else {}  # older torch has no `fused` argument
    optimizer = torch.optim.SGD(
        params, lr=lr, momentum=momentum, weight_decay=weight_decay, **kwargs
    )
    if fused:
        zero_momentum_buffers(optimizer)
    return optimizer


def zero_momentum_buffers(optimizer: torch.optim.Optimizer) -> None:
    """Create SGD's momentum buffers as zeros now, instead of in its first step.

    With no dampening, a zero buffer gives the first step's buffer exactly (0 x momentum +
    grad = grad). Needed twice: (1) fused SGD makes its first buffers with `empty_like` and
    lets the kernel fill them, but when a GradScaler skips that step (fp16 gradients overflow
    at the initial scale, as they usually do) the kernel writes nothing, and the next step
    reads uninitialised memory: seen on an H200 as NaN losses from step 6 of amp fp16;
    (2) a compiled optimizer would recompile when the state appears after its first step.
    """
    for group in optimizer.param_groups:
        if group.get("momentum", 0) == 0 or group.get("dampening", 0) != 0:
            continue
        for p in group["params"]:
            optimizer.state[p].setdefault("momentum_buffer", torch.zeros_like(p))


def build_scheduler(
    optimizer: torch.optim.Optimizer, warmup_steps: int, warmup_factor: float, total_steps: int
) -> LRScheduler:
    """Per-step schedule: linear warm-up over `warmup_steps` (from `warmup_factor` x lr), then
    cosine to 0 at `total_steps`."""
    warmup = max(0, min(warmup_steps, total_steps - 1))
    cosine = CosineAnnealingLR(optimizer, T_max=max(1, total_steps - warmup))
    if warmup == 0:
        return cosine
    ramp = LinearLR(optimizer, start_factor=warmup_factor, total_iters=warmup)
    return SequentialLR(optimizer, [ramp, cosine], milestones=[warmup])


def _prepare_for_compile(optimizer: torch.optim.Optimizer) -> None:
    """Make the optimizer's state and hyperparameters look the same to dynamo on every step.

    lr becomes a 0-dim float64 tensor, changed in place by the schedule (torch's recipe for
    a compiled optimizer with an LR scheduler): a float lr is a constant of the graph and
    would recompile at every change. Done after the schedule is built: torch < 2.10's
    SequentialLR aliases a tensor lr with `initial_lr` and corrupts the cosine's base
    (pytorch/pytorch#162359); built on a float, `initial_lr` and the bases stay floats.
    float64 keeps the schedule's arithmetic that of a float lr; the kernels round it to the
    parameters' dtype as they round a float.
    Momentum buffers are created as zeros (`zero_momentum_buffers`).
    """
    for group in optimizer.param_groups:
        if not isinstance(group["lr"], Tensor):
            group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float64)
    zero_momentum_buffers(optimizer)


class OptimizerStep:
    """The update of one training step: `step(loss)` runs the backward, then the optimizer.

    `scaler`: a GradScaler for fp16 autocast (scaled backward, `scaler.step`, `update`).
    `compile`: run `optimizer.step()` under torch.compile (`compiler.optimizer=true`), as
    torch's compiled optimizer: the update of every parameter becomes a few generated kernels
    (one graph, the same on every step: see `_prepare_for_compile`). Its graphs are counted in
    its own `compiled` (a `CompiledStep`, one entry per step) and, when `counted_in` is the
    training step's `CompiledStep`, also added to that step's latest call, so `TrainStep.graphs`
    (summary.json `graphs_compiled`, `compile/graphs`) and `recompiles` include them.
    Its compile takes the backend and the recompile options of the step, not `mode`: the
    CUDA-graph modes mark a new iteration per call, which belongs to the training step.
    Not with a GradScaler: `GradScaler.step` calls the optimizer's eager `step` itself.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler | None = None,
        compile: CompileOptions | None = None,
        counted_in: CompiledStep | None = None,
    ) -> None:
        self.optimizer, self.scaler, self.counted_in = optimizer, scaler, counted_in
        self.compiled: CompiledStep | None = None
        if compile is None:
            return
        if scaler is not None:
            raise ConfigError(
                "compiler.optimizer=true cannot run with fp16 autocast: its GradScaler calls "
                "the optimizer's eager step itself. Use amp_dtype=bf16 (no scaler) or "
                "compiler.optimizer=false."
            )
        _prepare_for_compile(optimizer)
        c = compile
        self.compiled = CompiledStep(
            self._update, c.backend, c.fail_on_recompile, c.recompile_limit, c.fail_on_limit
        )

    def _update(self) -> None:
        self.optimizer.step()

    def __call__(self, loss: Tensor) -> None:
        """Backward of the scalar `loss`, then the optimizer's update (read nothing back)."""
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            return
        loss.backward()
        if self.compiled is None:
            self.optimizer.step()
            return
        if not isinstance(self.optimizer.param_groups[0]["lr"], Tensor):
            _prepare_for_compile(self.optimizer)  # a float lr, loaded from an eager checkpoint
        try:
            self.compiled()
        finally:
            if self.counted_in is not None:
                self.counted_in.add_last_call_of(self.compiled)
