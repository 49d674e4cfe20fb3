"""Decoding images: the exact full-size decode, and the deferred one of `data.decode=reduced`.

exact (the default): the dataset decodes every image at full size into uint8 [3, h, w]
(PIL, the decoder torchvision's COCO reader uses); augmentation and fit follow.

reduced (opt-in): the dataset returns a `DeferredImage` (file, size, and the crop and flip
the augmentation asked for) and the pixels are decoded by the fit, which knows how large the
image will be on the canvas: a JPEG whose region is at least 2x, 4x or 8x larger than its
place on the canvas is decoded at 1/2, 1/4 or 1/8 scale by libjpeg's DCT scaling (PIL's
`Image.draft`: fewer pixels to inverse-transform, colour-convert and resize), then cropped
and resized in uint8, and the canvas stays uint8 (the device divides by 255). The reduction
is never below the canvas resolution (the last resize only shrinks or keeps the size). Not
the exact pixels (other rounding, DCT-domain downscale), so it is for training runs that do
not need torchvision's pixels.
"""

from __future__ import annotations

import functools
import io
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from ssd_npu.choices import DECODES as DECODE_MODES
from ssd_npu.choices import Canvas
from ssd_npu.errors import DataError

_DECODE_ERRORS = (OSError, UnidentifiedImageError, SyntaxError, ValueError)


def check_decode(mode: str) -> str:
    if mode not in DECODE_MODES:
        raise ValueError(f"decode={mode!r} is not valid; choose one of: {', '.join(DECODE_MODES)}")
    return mode


def _bad(name: str, err: Exception) -> DataError:
    return DataError(
        f"Image file {name} cannot be decoded ({err}); replace it, or set data.on_bad_image=skip."
    )


def decode_rgb(path: Path, name: str | None = None) -> Tensor:
    """Decode a whole image file: uint8 [3, h, w] RGB (DataError naming the file as `name`,
    default its path, if it cannot). PIL converts L, P, RGBA, CMYK, ... to RGB.

    A colour (YCbCr) JPEG is decoded by libjpeg-turbo through torchcodec when it is installed:
    the same pixels as PIL's decoder (both libjpeg-turbo with its defaults: tests/test_decode.py
    compares them), straight into a tensor, about 0.5 ms faster per 640x480 photo than PIL's
    decode and its copy out. Everything else (grey, CMYK, PNG, a file torchcodec rejects) goes
    through PIL, which also gives the error messages.

    The memory is interleaved [h, w, 3] either way (the tensor is a channels-last view): no
    transposing copy, and torch's resize takes channels-last input as it is (for 3 channels
    on one thread it converts a contiguous image to channels-last anyway).
    """
    try:
        data = Path(path).read_bytes()
        if colour_jpeg(data) and (pixels := _decode_jpeg_turbo(data)) is not None:
            return pixels
        rgb = load_rgb(io.BytesIO(data))  # the bytes already read: no second read
    except _DECODE_ERRORS as e:
        raise _bad(name or str(path), e) from e
    return torch.from_numpy(np.array(rgb)).permute(2, 0, 1)


def jpeg_for_device(path: Path) -> Tensor | None:
    """The file's bytes as uint8 [L] for a batched decode on the device (`data.decode=device`),
    or None where it must be decoded on the host: not a colour (3-component) JPEG (grey,
    CMYK, PNG: nvJPEG's batched decode takes colour JPEGs), or torchcodec is not there."""
    if jpeg_decoder() is None:
        return None
    try:
        data = Path(path).read_bytes()
    except OSError:
        return None  # the host decode names the problem
    if not colour_jpeg(data):
        return None
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def decode_jpegs(jpegs: list[Tensor], device: torch.device) -> list[Tensor]:
    """Decode encoded JPEGs (uint8 [L] each, on the host) on `device` in one batched call:
    nvJPEG on cuda, libjpeg-turbo on the cpu (torchcodec's `decode_jpeg`). uint8 [3, h, w]
    each, on `device`."""
    decode = jpeg_decoder()
    if decode is None:
        raise DataError("data.decode=device needs torchcodec (pip install -r requirements.txt).")
    return decode(list(jpegs), mode="RGB", device=device)


@functools.cache
def jpeg_decoder() -> Callable[..., Tensor] | None:
    """torchcodec's `decode_jpeg`, or None where torchcodec is missing or does not load
    (its binary is built for one torch release: another torch, e.g. a GPU host's, may not load
    it)."""
    try:
        from torchcodec.decoders import decode_jpeg
    except (ImportError, OSError, RuntimeError):
        return None
    return decode_jpeg


def _decode_jpeg_turbo(data: bytes) -> Tensor | None:
    """uint8 [3, h, w] (channels-last memory) from libjpeg-turbo, or None to let PIL decode
    (no torchcodec, or it refused the file: PIL then decodes it or names the problem)."""
    decode = jpeg_decoder()
    if decode is None:
        return None
    try:
        return decode(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode="RGB")
    except RuntimeError:
        return None


# JPEG start-of-frame markers (the frame header holds the component count); the other
# 0xC0-0xCF markers are DHT (C4), JPG (C8) and DAC (CC)
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def colour_jpeg(data: bytes) -> bool:
    """Whether `data` is a JPEG with 3 components (what PIL opens as mode "RGB"): its frame
    header read by walking the marker segments (a few microseconds; PIL's header parse costs
    about 0.1 ms). False for anything else, a truncated header included (PIL decides then)."""
    if data[:2] != b"\xff\xd8":
        return False
    at = 2
    while at + 4 <= len(data):
        if data[at] != 0xFF:
            return False
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if 0xD0 <= marker <= 0xD9 or marker == 0x01:  # standalone markers: no length
            at += 2
            continue
        length = int.from_bytes(data[at + 2 : at + 4], "big")
        if marker in _SOF:
            return at + 9 < len(data) and data[at + 9] == 3  # length, P, Y, X, then Nf
        if marker == 0xDA:  # start of scan before any frame header: not a valid JPEG
            return False
        at += 2 + length
    return False


def load_rgb(path: Path | io.BytesIO, reduce: int = 1) -> Image.Image:
    """The decoded RGB image (OSError & co. if the file is bad); `reduce` 2, 4 or 8 asks
    libjpeg for a 1/reduce-scale decode (JPEG only; other formats decode at full size).

    `load()` forces the full decode (truncation shows here); an RGB image is returned as it
    is, since `convert("RGB")` would copy it.
    """
    with Image.open(path) as img:
        if reduce > 1:
            w, h = img.size
            img.draft("RGB", (w // reduce, h // reduce))
        img.load()
        return img if img.mode == "RGB" else img.convert("RGB")


def image_size(path: Path, name: str | None = None) -> tuple[int, int]:
    """(h, w) from the file header, without decoding (DataError if it is not an image)."""
    try:
        with Image.open(path) as img:
            return int(img.size[1]), int(img.size[0])
    except _DECODE_ERRORS as e:
        raise _bad(name or str(path), e) from e


@dataclass(frozen=True)
class DeferredImage:
    """An image file whose pixels are decoded by the fit (`data.decode=reduced`).

    Looks like a [3, height, width] image to the augmentation: `crop` and `hflip` only record
    the region (original pixels) and the mirror; `decode_fit` decodes.
    """

    path: Path
    orig_size: tuple[int, int]  # (h, w) of the file
    region: tuple[int, int, int, int]  # (top, left, height, width) in file pixels
    flipped: bool = False
    skip_bad: bool = False  # on_bad_image=skip: a corrupt file decodes to None (counted)

    @classmethod
    def open(cls, path: Path, skip_bad: bool = False, name: str | None = None) -> DeferredImage:
        """Read the size from the header (DataError naming `name` if it is not an image)."""
        h, w = image_size(path, name)
        return cls(Path(path), (h, w), (0, 0, h, w), False, skip_bad)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (3, self.region[2], self.region[3])

    def crop(self, top: int, left: int, height: int, width: int) -> DeferredImage:
        """Crop rows top..top+height, columns left..left+width of the image as it looks now."""
        t0, l0, _, w0 = self.region
        if self.flipped:  # columns count from the right edge of the mirrored region
            left = w0 - left - width
        return replace(self, region=(t0 + top, l0 + left, height, width))

    def hflip(self) -> DeferredImage:
        return replace(self, flipped=not self.flipped)

    def decode(self) -> Tensor:
        """The pixels at full scale: uint8 [3, height, width] (the region, mirrored if flipped),
        as the exact path decodes them (DataError if the file is bad)."""
        try:
            rgb = load_rgb(self.path)
        except _DECODE_ERRORS as e:
            raise _bad(str(self.path), e) from e
        top, left, h, w = self.region
        hwc = torch.from_numpy(np.array(rgb))[top : top + h, left : left + w]
        return (hwc.flip(1) if self.flipped else hwc).permute(2, 0, 1)

    def as_subclass(self, cls: type) -> Tensor:
        """`decode()` as `cls`: code that reads the reader's image as a tensor (drawing
        detections on the original, ssd_npu.evaluation.detections) gets its pixels in reduced
        mode too."""
        return self.decode().as_subclass(cls)

    def _load(self, content: tuple[int, int]) -> tuple[Image.Image, float, float] | None:
        """Decode at the coarsest scale that keeps the region >= content: (RGB image, fy, fx)
        with fy, fx = decoded / file pixels; None for a corrupt file when skipping."""
        h, w = self.orig_size
        _, _, rh, rw = self.region
        k = max(1, min(rh // content[0], rw // content[1], 8))
        k = 1 << (k.bit_length() - 1)  # a power of two: libjpeg scales by 1/2, 1/4, 1/8
        try:
            rgb = load_rgb(self.path, k)
        except _DECODE_ERRORS as e:
            if not self.skip_bad:
                raise _bad(str(self.path), e) from e
            warnings.warn(f"skipping bad image: {self.path} cannot be decoded ({e})", stacklevel=3)
            return None
        return rgb, rgb.size[1] / h, rgb.size[0] / w

    def decode_fit(
        self, canvas: tuple[int, int], content: tuple[int, int], fill: int
    ) -> tuple[Tensor, Tensor, Tensor] | None:
        """The region, mirrored if flipped, resized to `content` (ch, cw) at the top left of a
        uint8 [3, H, W] canvas filled with `fill`.

        Returns (canvas, scale [4], offset [4]): box rows of the region (xyxy, file pixels,
        origin at the region's top-left, mirrored if flipped) map to canvas pixels as
        (box + offset) * scale. None for a skipped corrupt file.
        """
        loaded = self._load(content)
        if loaded is None:
            return None
        rgb, fy, fx = loaded
        top, left, rh, rw = self.region
        # the region in decoded pixels, rounded to whole pixels (exact when k = 1)
        y0, x0 = round(top * fy), round(left * fx)
        y1 = min(rgb.size[1], max(y0 + 1, round((top + rh) * fy)))
        x1 = min(rgb.size[0], max(x0 + 1, round((left + rw) * fx)))
        hwc = torch.from_numpy(np.array(np.asarray(rgb)[y0:y1, x0:x1]))  # [h', w', 3] uint8
        ch, cw = content
        image = hwc.permute(2, 0, 1)[None]  # channels-last memory: torch's fast uint8 kernel
        if image.shape[-2:] != (ch, cw):
            image = F.interpolate(image, size=(ch, cw), mode="bilinear", align_corners=False)
        if self.flipped:
            image = image.flip(-1)
        out = torch.full((3, *Canvas.of(canvas)), fill, dtype=torch.uint8)
        out[:, :ch, :cw] = image[0]
        # the region actually decoded, in file pixels, relative to the requested one
        ry0, rx0, ry1, rx1 = y0 / fy - top, x0 / fx - left, y1 / fy - top, x1 / fx - left
        sy, sx = ch / (ry1 - ry0), cw / (rx1 - rx0)
        ox = rx1 - rw if self.flipped else -rx0  # mirrored: x is measured from the right
        scale = torch.tensor([sx, sy, sx, sy], dtype=torch.float32)
        offset = torch.tensor([ox, -ry0, ox, -ry0], dtype=torch.float32)
        return out, scale, offset


def fill_value(pad_value: float) -> int:
    """pad_value in [0, 1] image units -> the uint8 fill of a reduced-mode canvas."""
    return int(min(255, max(0, math.floor(pad_value * 255 + 0.5))))
