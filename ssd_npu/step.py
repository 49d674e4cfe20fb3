"""Training steps: one batch in, the loss dict out (forward + loss; the loop does backward).

`FixedStep` runs the fixed-shape network and the model's fixed loss (`fixed_ssd_loss` for SSD
and SSDLite, `fixed_retinanet_loss` for RetinaNet) on a `FixedBatch`;
`DynamicStep` runs torchvision's unmodified `detector(list_of_images, targets)` on a
`DynamicBatch` (the baseline). Either can be compiled (`CompileOptions`): the step then owns
its `CompiledStep`, whose counters (graphs and recompiles per call, with dynamo's reasons)
are the run's compile statistics.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from ssd_npu.compiler import CompiledStep
from ssd_npu.data.dynamic import DynamicBatch
from ssd_npu.data.fixed_shape import FixedBatch
from ssd_npu.device import Device
from ssd_npu.distributed import World, all_reduce
from ssd_npu.loss import fixed_ssd_loss, normalise, ssd_loss_sums
from ssd_npu.model import FixedSSD
from ssd_npu.retinanet_loss import retinanet_loss_sums, retinanet_normalise

Losses = dict[str, Tensor]


@dataclass(frozen=True)
class CompileOptions:
    """`torch.compile(dynamic=False)` of the step: one graph per input shape, like an NPU."""

    backend: str = "inductor"  # "npu" on Ascend (torch_npu's dynamo backend)
    fail_on_recompile: bool = False  # a new graph after the first call raises RecompileError
    recompile_limit: int | None = None  # dynamo's per-function limit; None: torch's default
    fail_on_limit: bool = False  # past the limit: raise instead of running eagerly
    mode: str | None = None  # torch.compile's mode (inductor only); None: torch's default


@dataclass(frozen=True)
class StepOptions:
    """How a step runs: mixed precision, compilation, data parallel."""

    amp: bool = False
    amp_dtype: str | None = None  # bf16 | fp16; None: the device's default
    compile: CompileOptions | None = None  # None: eager
    network: nn.Module | None = None  # what to call instead of the model (a DDP wrapper)
    world: World = World()


class TrainStep:
    """Base of the steps: `step(batch)` -> losses; `compiled` holds the compile statistics."""

    compiled: CompiledStep | None = None

    def __call__(self, batch: FixedBatch | DynamicBatch) -> Losses:
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

    @property
    def graphs_last_call(self) -> int:
        """Graphs the most recent call compiled (0 when eager)."""
        if self.compiled is None or not self.compiled.graphs_per_call:
            return 0
        return self.compiled.graphs_per_call[-1]


def _compiled(fn, options: StepOptions) -> CompiledStep | None:
    c = options.compile
    if c is None:
        return None
    return CompiledStep(
        fn, c.backend, c.fail_on_recompile, c.recompile_limit, c.fail_on_limit, mode=c.mode
    )


class FixedStep(TrainStep):
    """Loss of one FixedBatch: network (optionally autocast) + the model's fixed loss in fp32.

    `options.network` is the module to call (DistributedDataParallel-wrapped under torchrun;
    default `model`). In a world of several ranks the loss is what one process would compute
    on the global batch, split into the ranks' shares: SSD divides by the foreground count of
    the global batch (all-reduced); RetinaNet divides each image by its own foreground count
    and averages over the global batch (B x world size images), as torchvision does.
    Compiled, the forward and loss become one graph (`dynamic=False`: one compile per input
    shape, exactly like an NPU's online operator compile); backward follows it.
    """

    def __init__(self, model: FixedSSD, device: Device, options: StepOptions = StepOptions()):
        self.model, self.device, self.options = model, device, options
        self.network = options.network or model
        self.compiled = _compiled(self.losses, options)

    def losses(self, images: Tensor, boxes: Tensor, labels: Tensor, valid: Tensor) -> Losses:
        """images [B, 3, H, W]; boxes [B, M, 4] xyxy canvas px; labels [B, M]; valid [B, M]."""
        with self.device.autocast(self.options.amp, self.options.amp_dtype):
            cls_logits, bbox_regression = self.network(images)
        # The loss runs in the anchors' precision (fp32) whatever autocast gave the network.
        anchors = self.model.anchors
        args = (cls_logits.to(anchors.dtype), bbox_regression.to(anchors.dtype), anchors)
        if self.model.kind == "retinanet":
            return self._retinanet(args, boxes, labels, valid)
        if not self.options.world.distributed:
            return fixed_ssd_loss(*args, boxes, labels, valid)
        bbox_sum, cls_sum, num_foreground = ssd_loss_sums(*args, boxes, labels, valid)
        return normalise(bbox_sum, cls_sum, all_reduce(num_foreground))

    def _retinanet(self, args: tuple, boxes: Tensor, labels: Tensor, valid: Tensor) -> Losses:
        """RetinaNet: labels are logit columns as given (COCO ids; column 0 never a target);
        the box loss is the detector's own ("l1" for v1, "giou" for v2)."""
        loss_type = self.model.detector.head.regression_head._loss_type
        sums = retinanet_loss_sums(*args, boxes, labels, valid, bbox_reg_loss_type=loss_type)
        return retinanet_normalise(*sums, num_images=boxes.shape[0] * self.options.world.size)

    def __call__(self, batch: FixedBatch) -> Losses:
        fn = self.compiled or self.losses
        return fn(batch.images, batch.boxes, batch.labels, batch.valid)


class DynamicStep(TrainStep):
    """torchvision's unmodified path: `detector(list_of_images, targets)` -> its loss dict.

    `options.network`: the detector to call (DDP-wrapped under torchrun). Its loss is
    normalised by each rank's own positives, as torchvision's reference does.
    """

    def __init__(self, model: FixedSSD, device: Device, options: StepOptions = StepOptions()):
        self.device, self.options = device, options
        self.detector = options.network or model.detector
        self.compiled = _compiled(self.detector, options)

    def __call__(self, batch: DynamicBatch) -> Losses:
        fn = self.compiled or self.detector
        with self.device.autocast(self.options.amp, self.options.amp_dtype):
            return fn(batch.images, batch.targets)
