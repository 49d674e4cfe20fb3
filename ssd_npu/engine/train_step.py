"""Training steps: one batch in, the loss dict out (forward + loss; the loop does backward).

`FixedStep` runs the fixed-shape network and its family's fixed loss (`ssd_npu.families`:
`fixed_ssd_loss` for SSD and SSDLite, `fixed_retinanet_loss` for RetinaNet, `fixed_fcos_loss`
for FCOS) on a `FixedBatch`;
`DynamicStep` runs torchvision's unmodified `detector(list_of_images, targets)` on a
`DynamicBatch` (the baseline). Either can be compiled (`CompileOptions`): the step then owns
its `CompiledStep`, whose counters (graphs and recompiles per call, with dynamo's reasons)
are the run's compile statistics.

Under torchrun the compiled call is wrapped in DistributedDataParallel, never the reverse:
compiling through DDP's forward breaks dynamo's graph at DDP (its optimizer splits the graph
at the gradient buckets), so a rank would compile other graphs than one process does. The
compiled function takes the plain model; DDP wraps a module whose forward is that call
(`CompiledCall`), and its reducer still sees every parameter's gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ssd_npu.data.device_augment import DeviceAugment
from ssd_npu.data.dynamic import DynamicBatch
from ssd_npu.data.fixed_shape import FixedBatch
from ssd_npu.data.slots import SlotBatch
from ssd_npu.device.backend import Device
from ssd_npu.device.compiler import CompiledStep, CompileOptions
from ssd_npu.device.distributed import World, all_reduce
from ssd_npu.families import Targets, identity
from ssd_npu.models.detector import FixedDetector

Losses = dict[str, Tensor]
# summary.json data_counts of data.augment_on=device, counted on the device: valid boxes its
# crop or sanitising removed, images whose IoU crop no round decided (left whole)
DEVICE_COUNTS = ("augment_removed", "crop_undecided")
Wrap = Callable[[nn.Module], nn.Module]  # e.g. functools.partial(DistributedDataParallel, ...)


@dataclass(frozen=True)
class StepOptions:
    """How a step runs: mixed precision, compilation, data parallel."""

    amp: bool = False
    amp_dtype: str | None = None  # bf16 | fp16; None: the device's default
    compile: CompileOptions | None = None  # None: eager
    # wraps the module the step calls (the compiled call, if compiled) in DDP; None: as it is
    ddp: Wrap | None = None
    world: World = World()


class TrainStep:
    """Base of the steps: `step(batch)` -> losses; `compiled` holds the compile statistics."""

    compiled: CompiledStep | None = None

    def __call__(self, batch: FixedBatch | SlotBatch | DynamicBatch) -> Losses:
        raise NotImplementedError

    @property
    def graphs(self) -> int | None:
        """Graphs compiled by this step so far (None when it is not compiled)."""
        return self.compiled.graphs if self.compiled is not None else None

    @property
    def recompiles(self) -> int:
        """dynamo's recompiles of this step (a guard, mostly a shape, failed); 0 when eager."""
        return self.compiled.recompiles if self.compiled is not None else 0

    @property
    def recompile_reasons(self) -> list[str]:
        return list(self.compiled.recompile_reasons) if self.compiled is not None else []

    def compile_statistics(self) -> dict[str, Any]:
        """`CompiledStep.statistics` of this step (its eager form when not compiled)."""
        if self.compiled is None:
            return CompiledStep.eager_statistics()
        return self.compiled.statistics()

    def device_counts(self) -> dict[str, Tensor]:
        """Counters the last call computed on the device (0-d tensors, read with its losses,
        one step late): the device augmentation's; none for most steps."""
        return {}

    @property
    def graphs_last_call(self) -> int:
        """Graphs the most recent call compiled (0 when eager)."""
        if self.compiled is None or not self.compiled.graphs_per_call:
            return 0
        return self.compiled.graphs_per_call[-1]


def _compiled(fn: Callable[..., Any], options: StepOptions) -> CompiledStep | None:
    c = options.compile
    if c is None:
        return None
    return CompiledStep(
        fn, c.backend, c.fail_on_recompile, c.recompile_limit, c.fail_on_limit, mode=c.mode
    )


class CompiledCall(nn.Module):
    """A module whose forward is `call`, the compiled forward of `module`: what DDP wraps.

    `module` is a submodule, so DDP broadcasts its parameters and buffers and hooks its
    parameters' gradients (the compiled backward accumulates them all), while the graph that
    `call` compiles holds `module` alone, as it does in one process.
    """

    def __init__(self, module: nn.Module, call: CompiledStep) -> None:
        super().__init__()
        self.module, self.call = module, call

    def forward(self, *args: Any) -> Any:
        return self.call(*args)


def _callable(
    module: nn.Module, compiled: CompiledStep | None, options: StepOptions
) -> Callable[..., Any]:
    """What a step calls: `module` or its compiled call; under torchrun, that wrapped in DDP."""
    if options.ddp is None:
        return compiled or module
    return options.ddp(module if compiled is None else CompiledCall(module, compiled))


class LossSums(nn.Module):
    """The network and the model's fixed loss before normalisation: the part of a step that
    `compile=true` compiles and that DDP wraps (the normalisation may need a collective).

    forward(images [B, 3, H, W], boxes [B, M, 4] xyxy canvas px, labels [B, M], valid [B, M])
    -> the family's loss sums, then its foreground count: SSD (Smooth-L1 sum, cross-entropy
    sum, foreground anchors), scalars over the B images; RetinaNet the same three per image,
    [B] each; FCOS (focal, GIoU, centerness sums, foreground locations), scalars. The network
    runs under autocast when `amp`; the loss in the anchors' precision (fp32) whatever
    autocast gave the network. The loss (its options) is built once, from the model's spec.
    """

    def __init__(self, model: FixedDetector, device: Device, amp: bool, amp_dtype: str | None):
        super().__init__()
        self.model, self.device, self.amp, self.amp_dtype = model, device, amp, amp_dtype
        self.loss = model.family.loss(model.spec)

    def forward(
        self, images: Tensor, boxes: Tensor, labels: Tensor, valid: Tensor
    ) -> tuple[Tensor, ...]:
        with self.device.autocast(self.amp, self.amp_dtype):
            head = self.model(images)
        anchors = self.model.anchors
        head = tuple(output.to(anchors.dtype) for output in head)
        targets = Targets(boxes, labels, valid)
        return self.loss.sums(head, anchors, self.model.anchors_per_level, targets)


class SlotLossSums(nn.Module):
    """`data.augment_on=device`: the training augmentation and the fit to the canvas
    (`DeviceAugment`), then `LossSums`, as one function of the slot batch, so that
    `compile=true` compiles them into one graph (and one CUDA graph with reduce-overhead).

    forward(slots uint8 [B, 3, Hs, Ws], sizes [B, 2] (h, w) px, boxes [B, M, 4] xyxy image px,
    labels [B, M], valid [B, M], draws float32 [B, K]) -> LossSums' outputs and the
    augmentation's counters [2] (`DEVICE_COUNTS`: boxes it removed, crops left undecided).
    The augmentation runs outside autocast (float32 pixels, as the host's), the network inside.
    """

    def __init__(self, sums: LossSums, augment: DeviceAugment) -> None:
        super().__init__()
        self.sums, self.augment = sums, augment

    def forward(
        self,
        slots: Tensor,
        sizes: Tensor,
        boxes: Tensor,
        labels: Tensor,
        valid: Tensor,
        draws: Tensor,
    ) -> tuple[Tensor, ...]:
        out = self.augment(slots, sizes, boxes, labels, valid, draws)
        sums = self.sums(out.images, out.boxes, out.labels, out.valid)
        # the augmentation's own counters, read one step late with the losses (`device_counts`)
        counts = torch.stack([out.removed, out.undecided]).float()
        return (*sums, counts)


class FixedStep(TrainStep):
    """Loss of one FixedBatch: network (optionally autocast) + the model's fixed loss in fp32.

    The sums (`LossSums`) are compiled when asked, and DDP-wrapped under torchrun
    (`options.ddp`); the normalisation runs after them, outside the compiled graph. In a world
    of several ranks the loss is what one process would compute on the global batch, split
    into the ranks' shares (the family's `normalise`): SSD and FCOS divide by the foreground
    count of the global batch (all-reduced); RetinaNet divides each image by its own
    foreground count and averages over the global batch (B x world size images), as
    torchvision does. Compiled, the forward and the loss sums are one graph (`dynamic=False`: one compile per input shape, exactly like an
    NPU's online operator compile), the same graph on every rank as in one process (with
    sync_bn, BatchNorm's own all-reduces join it, which one process does not have); backward
    follows it.

    With `augment` (data.augment_on=device) the step takes `SlotBatch`es instead: the
    augmentation and the fit run first, inside the same compiled function (`SlotLossSums`).
    """

    def __init__(
        self,
        model: FixedDetector,
        device: Device,
        options: StepOptions = StepOptions(),
        augment: DeviceAugment | None = None,
    ):
        self.model, self.device, self.options, self.augment = model, device, options, augment
        self._counts: Tensor | None = None  # the last call's DEVICE_COUNTS [2], with augment
        sums = LossSums(model, device, options.amp, options.amp_dtype)
        self.loss = sums.loss
        self.sums: nn.Module = sums if augment is None else SlotLossSums(sums, augment)
        self.compiled = _compiled(self.sums, options)
        self.network = _callable(self.sums, self.compiled, options)

    def losses(self, *inputs: Tensor) -> Losses:
        """inputs: images [B, 3, H, W], boxes [B, M, 4] xyxy canvas px, labels [B, M], valid
        [B, M]; with `augment`, `SlotLossSums`' six inputs instead."""
        out = self.network(*inputs)
        sums, self._counts = (out[:-1], out[-1]) if self.augment is not None else (out, None)
        world = self.options.world
        # a global count is a collective: eager, after the compiled graph, on every rank
        reduce = all_reduce if world.distributed else identity
        return self.loss.normalise(sums, inputs[0].shape[0] * world.size, reduce)

    def device_counts(self) -> dict[str, Tensor]:
        """The last call's device counters (`DEVICE_COUNTS`: with `augment` only), 0-d."""
        if self._counts is None:
            return {}
        return dict(zip(DEVICE_COUNTS, self._counts.unbind(), strict=True))

    def __call__(self, batch: FixedBatch | SlotBatch) -> Losses:
        if isinstance(batch, SlotBatch):
            if self.augment is None:
                raise TypeError("FixedStep got a SlotBatch but has no DeviceAugment to fit it")
            slots = batch.decode_slots(self.device.torch)  # data.decode=device: decoded here
            return self.losses(
                slots, batch.sizes, batch.boxes, batch.labels, batch.valid, batch.draws
            )
        return self.losses(batch.images, batch.boxes, batch.labels, batch.valid)


class DynamicStep(TrainStep):
    """torchvision's unmodified path: `detector(list_of_images, targets)` -> its loss dict.

    With `options.compile` the plain detector is compiled; under torchrun (`options.ddp`) DDP
    wraps that call. Its loss is normalised by each rank's own positives, as torchvision's
    reference does.
    """

    def __init__(self, model: FixedDetector, device: Device, options: StepOptions = StepOptions()):
        self.device, self.options = device, options
        self.compiled = _compiled(model.detector, options)
        self.detector = _callable(model.detector, self.compiled, options)

    def __call__(self, batch: DynamicBatch) -> Losses:
        with self.device.autocast(self.options.amp, self.options.amp_dtype):
            return self.detector(batch.images, batch.targets)
