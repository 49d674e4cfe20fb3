"""`optim.ema=DECAY`: an exponential moving average of the weights, evaluated instead of them.

As detectron2's `ModelEMA`, timm's `ModelEmaV3` and the YOLO trainers: after every optimizer
step, for every parameter,

    averaged <- decay * averaged + (1 - decay) * current        (the first update copies)

kept by torch's own `torch.optim.swa_utils.AveragedModel` with `get_ema_multi_avg_fn(decay)`
(one `_foreach_lerp_` per device and dtype: elementwise, every shape static, nothing read
back to the host). No warm-up of the decay: the first update copies the weights, and the
initial weights' share after n updates is decay^(n-1).

Buffers (BatchNorm's running statistics): `buffers=False` (the default, `optim.ema_buffers`)
copies the trained model's at each update (`use_buffers=False`), `True` averages them as the
parameters (`use_buffers=True`, as timm and the YOLO trainers do). Measured on the demo
(docs/demo.md), averaged statistics do not fit the averaged weights of a network trained from
scratch for 416 steps: mAP50 0.11 against 0.80 with the trained statistics (seed 0).

The average is of the plain module (`Training.model`), never of a compiled or DDP wrapper;
each rank keeps its own copy (DDP keeps the ranks' weights equal, so the copies are too).
Evaluation swaps the averaged values into the live module's own tensors (in place, as
detectron2's `apply_model_ema_and_restore`), so the detector object, its compiled evaluation
graph and the device postprocess all see them, then swaps the trained values back.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ssd_npu.engine.loop import Hook, Progress, Read


def _state(module: nn.Module) -> list[torch.Tensor]:
    """The module's parameters then buffers, in `AveragedModel`'s order (detached)."""
    return [t.detach() for t in (*module.parameters(), *module.buffers())]


class WeightAverage:
    """The EMA of `model`'s parameters (`decay` in (0, 1), per optimizer step); its buffers
    averaged too (`buffers=True`) or copied from the model at each update."""

    def __init__(self, model: nn.Module, decay: float, buffers: bool = False) -> None:
        self.model, self.decay = model, float(decay)
        self.averaged = AveragedModel(
            model, multi_avg_fn=get_ema_multi_avg_fn(self.decay), use_buffers=buffers
        )

    @torch.no_grad()
    def update(self) -> None:
        """One EMA step from the model's current values (after an optimizer step)."""
        self.averaged.update_parameters(self.model)

    @property
    def updates(self) -> int:
        """Optimizer steps averaged so far (a host int: reads the counter from its device)."""
        return int(self.averaged.n_averaged)

    def state_dict(self) -> dict[str, Any]:
        """For the checkpoint: the averaged module's tensors (`module.*`) and `n_averaged`."""
        return self.averaged.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.averaged.load_state_dict(state)

    @contextlib.contextmanager
    @torch.no_grad()
    def applied(self) -> Iterator[None]:
        """Inside: the model's own tensors hold the averaged values (the trained ones are
        copied aside and written back on exit). Before any update the model is left as is."""
        if self.updates == 0:
            yield
            return
        live, averaged = _state(self.model), _state(self.averaged.module)
        kept = [t.clone() for t in live]
        for t, a in zip(live, averaged, strict=True):
            t.copy_(a)
        try:
            yield
        finally:
            for t, k in zip(live, kept, strict=True):
                t.copy_(k)


class WeightAverageHook(Hook):
    """Updates the average after every optimizer step (queued work only: read "late")."""

    def __init__(self, average: WeightAverage) -> None:
        self.average = average

    def after_update(self, progress: Progress) -> Read:
        self.average.update()
        return "late"


def on_averaged_weights(
    detections: Callable[..., Any], average: WeightAverage
) -> Callable[..., Any]:
    """`detections` (an `Evaluator`'s DetectFn) run on the averaged weights."""

    def averaged(*args: Any, **kwargs: Any) -> Any:
        with average.applied():
            return detections(*args, **kwargs)

    return averaged
