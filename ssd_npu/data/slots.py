"""The host's share of `data.augment_on=device`: decode, place the image in a fixed-size slot.

With the augmentation on the device, a DataLoader worker does the least work that still gives
static shapes: it puts the decoded image, unchanged, at the top-left of a zero uint8 slot
`[3, Hs, Ws]`, pads its targets to M rows, and draws the uniforms the device's IoU crop, flip
and fit to the canvas consume. The device then does that work for the whole batch inside the
compiled step (`ssd_npu.data.device_augment`). An image larger than the slot on either side
is scaled down on the host first (keeping its aspect, counted in `downscaled`): the only resize
left on the host.

Units: slots uint8 0..255; sizes (h, w) pixels of the image inside its slot; boxes float32
xyxy in those pixels (the slot's, since the image sits at its top-left); draws float32 in
[0, 1).

Why the uniforms travel with the sample: each sample's randomness is seeded from
(seed, image_id, epoch) on the host, as the host augmentation is, so the same seed gives the
same crops and flips whatever the worker count, a resumed run draws exactly what the
interrupted one would have, and the device draws nothing (no generator state in the compiled
step, no random op the compiler has to handle, nothing that depends on the device's RNG).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torchvision.models.detection.transform import resize_boxes

from ssd_npu.choices import Canvas
from ssd_npu.data.batch import PaddedBoxes
from ssd_npu.data.decode import DeferredImage, decode_jpegs, decode_rgb, jpeg_for_device
from ssd_npu.data.fit import _clip, _resize, content_size
from ssd_npu.data.fixed_shape import (
    SAMPLE_COUNTERS,
    pad_targets,
    sample_seed,
    summed_counters,
)
from ssd_npu.errors import DataError

_NO_BYTES = torch.zeros(0, dtype=torch.uint8)  # data.decode=device: no JPEG (host-decoded)
_NO_PIXELS = torch.zeros(3, 0, 0, dtype=torch.uint8)  # ... or no host pixels (a JPEG)

# the key the draws are seeded from: (seed, image_id, epoch, DRAWS_STREAM); FixSample's box
# subset uses (seed, image_id, epoch), the host augmentation (..., 1)
DRAWS_STREAM = 2


def _downscale(image: Tensor, size: tuple[int, int]) -> Tensor:
    """uint8 [3, h, w] -> uint8 [3, nh, nw]: bilinear, align_corners=False, no antialias (the
    resize of `fit_to_canvas`), computed in float32 and rounded back to uint8."""
    h, w = int(image.shape[-2]), int(image.shape[-1])
    # channels-last float copy: the kernel torch's single-thread bilinear resize runs anyway
    x = torch.empty((h, w, 3), dtype=torch.float32).permute(2, 0, 1)
    x.copy_(image)
    return _resize(x, size).round_().clamp_(0, 255).to(torch.uint8)


def _channels_last_slot(image: Tensor, slot: tuple[int, int]) -> Tensor:
    """uint8 [3, Hs, Ws] over [Hs, Ws, 3] memory with `image` [3, h, w] at the top left and
    zeros elsewhere. Channels-last because the decoder gives [h, w, 3] memory: the copy is then
    row by row, not a transposing copy (about 1.5 ms of a 640x480 photo's 3.8 ms per core),
    and only the margins are zeroed."""
    h, w = int(image.shape[-2]), int(image.shape[-1])
    memory = torch.empty((*slot, 3), dtype=torch.uint8)
    memory[h:].zero_()
    memory[:h, w:].zero_()
    out = memory.permute(2, 0, 1)
    out[:, :h, :w] = image
    return out


class SlotSample:
    """Per-sample finish of `data.augment_on=device`: (image, target, epoch) -> slot sample.

    slot: (Hs, Ws) pixels; max_boxes: M target rows; draws: K uniforms per sample; seed: the
    run's seed. image: `tv_tensors.Image` uint8 [3, h, w] (data.decode=exact).

    Returns a dict: `slot` uint8 [3, Hs, Ws] (the image at the top-left, zeros elsewhere),
    `size` (h, w) ints of the image inside the slot, `boxes` float32 [M, 4] xyxy in those
    pixels, `labels` int64 [M], `valid` bool [M] (`pad_targets`, the subset generator seeded
    from (seed, image_id, epoch) as FixSample's), `draws` float32 [K] in [0, 1) (seeded from
    (seed, image_id, epoch, 2)), `image_id`, and the counters `boxes_dropped`, `degenerate`,
    `clipped`, `downscaled` (1 when the image was larger than the slot and scaled down),
    `skipped` (FixSample's meanings). With `device_decode` (data.decode=device; image a
    `DeferredImage`) `slot` gives way to `jpeg` (the file's bytes, uint8 [L]; empty when the
    worker decoded it), `pixels` (uint8 [3, h, w] the worker decoded; empty for a JPEG) and
    `host_decoded` (1 when the worker decoded it).
    """

    def __init__(
        self, slot: Any, max_boxes: int, draws: int, seed: int = 0, device_decode: bool = False
    ):
        self.slot = Canvas.of(slot)
        self.max_boxes, self.draws, self.seed = int(max_boxes), int(draws), int(seed)
        self.device_decode = device_decode  # data.decode=device: JPEG bytes, not pixels

    def _jpeg_for_device(self, image: Any) -> Tensor | None:
        """data.decode=device: the file's bytes when the device can decode it (a colour JPEG
        that fits the slot), else None: the worker decodes it (grey, CMYK, PNG, larger)."""
        if not isinstance(image, DeferredImage):
            return None
        if not self.device_decode:
            raise ValueError(
                "data.augment_on=device places decoded images in slots; data.decode=reduced "
                "defers the decode to the host fit, which the device does now: use "
                "data.decode=exact."
            )
        h, w = image.orig_size
        return jpeg_for_device(image.path) if h <= self.slot[0] and w <= self.slot[1] else None

    def __call__(self, image: Any, target: dict[str, Any], epoch: int = 0) -> dict[str, Any]:
        boxes = target["boxes"].as_subclass(Tensor).to(torch.float32).reshape(-1, 4)
        jpeg = self._jpeg_for_device(image)
        if jpeg is not None:  # the device decodes it straight into its slot, at its own size
            h, w = nh, nw = image.orig_size
            downscaled = False
            pixels = {"jpeg": jpeg, "pixels": _NO_PIXELS, "host_decoded": 0}
        else:
            img = decode_rgb(image.path) if isinstance(image, DeferredImage) else image
            img = img.as_subclass(Tensor)
            h, w = int(img.shape[-2]), int(img.shape[-1])
            nh, nw, downscaled = content_size(h, w, self.slot, "pad")
            if downscaled:
                img = _downscale(img, (nh, nw))
            if self.device_decode:  # decoded here (counted), placed in its slot on the device
                pixels = {"jpeg": _NO_BYTES, "pixels": img, "host_decoded": 1}
            else:
                pixels = {"slot": _channels_last_slot(img, self.slot)}
        if downscaled:
            boxes = _clip(resize_boxes(boxes, [h, w], [nh, nw]), nh, nw)
        image_id = int(target["image_id"])
        gen = torch.Generator().manual_seed(sample_seed(self.seed, image_id, epoch))
        boxes, labels, valid, dropped = pad_targets(boxes, target["labels"], self.max_boxes, gen)
        draw_gen = torch.Generator().manual_seed(
            sample_seed(self.seed, image_id, epoch, DRAWS_STREAM)
        )
        return {
            **pixels,
            "size": (nh, nw),
            "boxes": boxes,
            "labels": labels,
            "valid": valid,
            "draws": torch.rand(self.draws, generator=draw_gen),
            "image_id": image_id,
            "boxes_dropped": dropped,
            "degenerate": int(target.get("degenerate", 0)),
            "clipped": int(target.get("clipped", 0)),
            "downscaled": int(downscaled),
            "skipped": int(target.get("skipped", 0)),
        }


@dataclass
class SlotBatch(PaddedBoxes):
    """A batch of slot samples, every shape static. image_ids -1 mark padding samples."""

    # [B, 3, Hs, Ws] uint8 0..255 over [B, Hs, Ws, 3] memory (channels-last), each image at
    # the top-left, zeros elsewhere
    slots: Tensor | None
    sizes: Tensor  # [B, 2] int64 (h, w) px of the image inside its slot
    boxes: Tensor  # [B, M, 4] float32 xyxy px of the image in its slot
    labels: Tensor  # [B, M] int64 category ids, 0 on padding rows
    valid: Tensor  # [B, M] bool
    draws: Tensor  # [B, K] float32 uniforms in [0, 1) for the device's crop, flip and fit
    image_ids: Tensor  # [B] int64
    boxes_dropped: int = 0
    degenerate: int = 0
    clipped: int = 0
    downscaled: int = 0
    skipped: int = 0
    host_decoded: int = 0  # data.decode=device: images the host decoded instead (counted)
    # data.decode=device: `slots` is None until `decode_slots` fills it on the device from
    # `jpegs` (each image's file bytes, uint8 [L], kept on the host: the decoder reads them
    # there) and `pixels` (uint8 [3, h, w] images the host decoded; empty where a JPEG is)
    jpegs: list[Tensor] | None = None
    pixels: list[Tensor] | None = None
    slot_size: tuple[int, int] = (0, 0)  # (Hs, Ws), for decode_slots

    def map_tensors(self, fn: Callable[[Tensor], Tensor]) -> SlotBatch:
        """The tensor fields and the host-decoded `pixels`; `jpegs` stay on the host (the
        decoder reads them there), so they are not moved, pinned or marked."""
        super().map_tensors(fn)
        if self.pixels is not None:
            self.pixels = [fn(t) for t in self.pixels]
        return self

    def decode_slots(self, device: torch.device) -> Tensor:
        """data.decode=device: the slots [B, 3, Hs, Ws] uint8 (channels-last) on `device`, the
        JPEGs decoded there in one batched call (nvJPEG on cuda), the host's fallbacks copied in;
        stored in `slots` and returned. Outside the compiled step: the decoder is opaque to it.
        """
        if self.slots is not None:
            return self.slots
        if self.jpegs is None or self.pixels is None:
            raise ValueError("SlotBatch has neither slots nor encoded images")
        B, (hs, ws) = len(self.jpegs), self.slot_size
        slots = torch.zeros((B, hs, ws, 3), dtype=torch.uint8, device=device).permute(0, 3, 1, 2)
        encoded = [i for i, data in enumerate(self.jpegs) if data.numel() > 0]
        try:
            decoded = decode_jpegs([self.jpegs[i] for i in encoded], device) if encoded else []
        except RuntimeError as err:
            ids = self.image_ids.tolist()
            raise DataError(
                f"data.decode=device: a JPEG of images {ids} failed to decode on {device} "
                f"({err}); find it with data.decode=exact, which names the file."
            ) from err
        for i, image in zip(encoded, decoded, strict=True):
            slots[i, :, : image.shape[1], : image.shape[2]] = image
        for i, image in enumerate(self.pixels):
            if image.numel() > 0:
                slots[i, :, : image.shape[1], : image.shape[2]] = image
        self.slots = slots
        return slots


def collate_slots(samples: list[dict[str, Any]], slot: tuple[int, int] = (0, 0)) -> SlotBatch:
    """Stack SlotSample outputs into a SlotBatch; the counters are summed. With
    data.decode=device the samples carry JPEG bytes instead of slots: `jpegs` and `pixels` are
    lists, `slot` (Hs, Ws) the size `decode_slots` makes."""
    encoded = "jpeg" in samples[0]
    return SlotBatch(
        # stacked in [B, Hs, Ws, 3] memory (the slots' own), viewed as [B, 3, Hs, Ws]: a
        # plain copy; torch.stack of the channels-last views would transpose every pixel
        slots=None
        if encoded
        else torch.stack([s["slot"].permute(1, 2, 0) for s in samples]).permute(0, 3, 1, 2),
        jpegs=[s["jpeg"] for s in samples] if encoded else None,
        pixels=[s["pixels"] for s in samples] if encoded else None,
        slot_size=tuple(slot),
        sizes=torch.tensor([s["size"] for s in samples], dtype=torch.int64),
        boxes=torch.stack([s["boxes"] for s in samples]),
        labels=torch.stack([s["labels"] for s in samples]),
        valid=torch.stack([s["valid"] for s in samples]),
        draws=torch.stack([s["draws"] for s in samples]),
        image_ids=torch.tensor([s["image_id"] for s in samples], dtype=torch.int64),
        **summed_counters(samples, (*SAMPLE_COUNTERS, "host_decoded")),
    )
