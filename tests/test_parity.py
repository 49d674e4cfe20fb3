"""Training parity: the fixed pipeline is torchvision's training, not an approximation.

From the same initial weights and the same un-augmented batch (images of different sizes
and box counts), a few SGD steps of torchvision's own `model(images, targets)` and of the
fixed pipeline (FixedDetector, padded targets, fixed_ssd_loss) give the same losses and the same
parameters.

Both paths get the images after the host's stretch to the canvas (torchvision's own resize
to the same size is then an exact copy): training-mode BatchNorm on a random network turns
a 1-ulp input difference into ~1e-3 relative gradient differences, which would hide the
comparison. That the host stretch gives torchvision's pixels (to 1e-6) is tested in
test_fixed_shape.py; here the first-step loss on the original images is checked as well.
"""

import copy

import torch

from ssd_npu.data.fixed_shape import fit_to_canvas, pad_targets
from ssd_npu.device.backend import Device
from ssd_npu.engine.train_step import FixedStep
from ssd_npu.models.detector import FixedDetector, build_detector

CANVAS = (192, 160)  # non-square, small: fast, and anchors follow the canvas
NUM_CLASSES = 5
MAX_BOXES = 6


def make_batch(seed: int):
    """uint8 images of different sizes with 0..5 boxes each (xyxy original pixels)."""
    g = torch.Generator().manual_seed(seed)
    sizes = [(240, 400), (333, 217), (160, 160)]
    counts = [3, 0, 5]
    images, targets = [], []
    for (h, w), n in zip(sizes, counts, strict=True):
        images.append(torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g))
        xy = torch.rand(n, 2, generator=g) * torch.tensor([w * 0.6, h * 0.6])
        wh = 8 + torch.rand(n, 2, generator=g) * torch.tensor([w * 0.35, h * 0.35])
        labels = torch.randint(1, NUM_CLASSES, (n,), generator=g)
        targets.append({"boxes": torch.cat([xy, xy + wh], 1), "labels": labels})
    return images, targets


def fixed_inputs(images, targets):
    fitted = [
        fit_to_canvas(im, t["boxes"], CANVAS, "stretch")
        for im, t in zip(images, targets, strict=True)
    ]
    padded = [
        pad_targets(boxes, t["labels"], MAX_BOXES, torch.Generator().manual_seed(0))
        for (_, boxes, _), t in zip(fitted, targets, strict=True)
    ]

    class Batch:
        images = torch.stack([f[0] for f in fitted])
        boxes = torch.stack([p[0] for p in padded])
        labels = torch.stack([p[1] for p in padded])
        valid = torch.stack([p[2] for p in padded])

    return Batch


def test_fixed_training_equals_torchvision_training():
    torch.manual_seed(0)
    reference = build_detector(NUM_CLASSES, CANVAS)
    fixed = FixedDetector(copy.deepcopy(reference), CANVAS)
    initial = {n: p.detach().clone() for n, p in reference.named_parameters()}
    reference.train()
    fixed.train()
    opt_ref = torch.optim.SGD(reference.parameters(), lr=0.01, momentum=0.9, weight_decay=4e-5)
    opt_fix = torch.optim.SGD(fixed.parameters(), lr=0.01, momentum=0.9, weight_decay=4e-5)
    step = FixedStep(fixed, Device("cpu", None))

    for i in range(3):
        images, targets = make_batch(i)
        batch = fixed_inputs(images, targets)
        canvas_targets = [
            {"boxes": boxes[valid], "labels": labels[valid]}
            for boxes, labels, valid in zip(batch.boxes, batch.labels, batch.valid, strict=True)
        ]
        if i == 0:  # torchvision on the original images: the same loss before any step
            with torch.no_grad():
                originals = reference([im.float() / 255 for im in images], targets)
                fixed_first = step(batch)
            for key in originals:
                torch.testing.assert_close(fixed_first[key], originals[key], rtol=1e-6, atol=1e-6)
        ref_losses = reference(list(batch.images), canvas_targets)
        fix_losses = step(batch)
        for key in ("bbox_regression", "classification"):
            torch.testing.assert_close(fix_losses[key], ref_losses[key], rtol=1e-5, atol=1e-6)
        for opt, losses in ((opt_ref, ref_losses), (opt_fix, fix_losses)):
            opt.zero_grad()
            sum(losses.values()).backward()
            opt.step()

    ref_params = dict(reference.named_parameters())
    for name, param in fixed.detector.named_parameters():
        torch.testing.assert_close(param, ref_params[name], rtol=1e-4, atol=1e-5, msg=name)
    # The parameters really moved: parity is not the trivial "nothing trained".
    moved = max((p - initial[n]).abs().max() for n, p in fixed.detector.named_parameters())
    assert moved > 1e-3
