"""The vectorised IoU crop against torchvision's own `v2.RandomIoUCrop`.

1. Replay: fed the same random numbers (option, then each trial's scale and position),
   torchvision's sequential loop and `IoUCropSampler` pick the same crop, for random images
   and boxes: the tests inside a trial are the same, in the same dtypes.
2. Distribution: with their own random streams (a round here draws all trials at once, so
   the streams are consumed differently), thousands of crops from each have the same
   distribution of crop sizes, aspect ratios, positions, kept-box counts and "no crop"
   share: two-sample KS and chi-square tests, fixed seeds (deterministic), and a control
   that a slightly different sampler is told apart.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from ssd_npu.data.iou_crop import IoUCropSampler

OPTIONS = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0)


def _boxes(g: torch.Generator, n: int, h: int, w: int) -> torch.Tensor:
    """n boxes [n, 4] xyxy float32 inside an h x w image, sides log-uniform from 4 px to the
    whole image."""
    span = torch.tensor([w / 4.0, h / 4.0])
    side = 4.0 * torch.exp(torch.rand(n, 2, generator=g) * torch.log(span))
    xy = torch.rand(n, 2, generator=g) * (torch.tensor([w, h]) - side)
    return torch.cat([xy, xy + side], 1).to(torch.float32)


class _Replay:
    """Fake torch.randint / torch.rand serving fixed draws: per round an option index and a
    [trials, 4] matrix (scale w, scale h, position x, position y per trial).

    As torchvision (sequential): rand(2) -> the next trial's scales; rand(2) again only after
    the aspect test passed -> its positions. As IoUCropSampler: rand(trials, 4) -> the matrix.
    """

    def __init__(self, idx: list[int], r: list[np.ndarray], size: tuple[int, int]):
        self.idx, self.r, self.size = idx, r, size
        self.round, self.trial, self.want_pos = -1, 0, False

    def randint(self, low, high, size):
        self.round += 1
        self.trial, self.want_pos = 0, False
        return torch.tensor([self.idx[self.round]])

    def rand(self, *size):
        r = self.r[self.round]
        if size == (r.shape[0], 4):  # IoUCropSampler: the whole round at once
            return torch.from_numpy(r.copy())
        t = self.trial
        if self.want_pos:  # torchvision: the positions of trial t
            self.want_pos, self.trial = False, t + 1
            return torch.from_numpy(r[t, 2:].copy())
        # the scales of trial t; torchvision draws positions next only if the aspect test passes
        h, w = self.size
        s = np.float32(0.3) + np.float32(0.7) * r[t, :2]
        new_w, new_h = int(np.float32(w) * s[0]), int(np.float32(h) * s[1])
        if new_h > 0 and 0.5 <= new_w / new_h <= 2.0:
            self.want_pos = True
        else:
            self.trial = t + 1
        return torch.from_numpy(r[t, :2].copy())


def _torchvision_params(boxes, size, replay, monkeypatch) -> dict:
    h, w = size
    image = tv_tensors.Image(torch.zeros(3, h, w, dtype=torch.uint8))
    bb = tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(h, w))
    with monkeypatch.context() as m:
        m.setattr(torch, "randint", replay.randint)
        m.setattr(torch, "rand", replay.rand)
        return v2.RandomIoUCrop().make_params([image, bb])


def _ours(boxes, size, replay, monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(torch, "randint", replay.randint)
        m.setattr(torch, "rand", replay.rand)
        return IoUCropSampler()(boxes, size)


def test_replay_same_draws_same_crop(monkeypatch):
    g = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)
    crops = 0
    for case in range(150):
        h, w = int(rng.integers(40, 700)), int(rng.integers(40, 700))
        boxes = _boxes(g, int(rng.integers(1, 12)), h, w)
        rounds = 30  # enough rounds that one of them ends the loop
        idx = [int(v) for v in rng.integers(0, len(OPTIONS), rounds)]
        idx[-1] = len(OPTIONS) - 1  # the leave-as-is option ends it at the latest
        r = [rng.random((40, 4), dtype=np.float32) for _ in range(rounds)]
        tv = _torchvision_params(boxes, (h, w), _Replay(idx, r, (h, w)), monkeypatch)
        ours = _ours(boxes, (h, w), _Replay(idx, r, (h, w)), monkeypatch)
        if not tv:
            assert ours is None, f"case {case}"
            continue
        crops += 1
        assert ours is not None, f"case {case}"
        got = (ours.top, ours.left, ours.height, ours.width)
        assert got == (tv["top"], tv["left"], tv["height"], tv["width"]), f"case {case}"
        assert ours.keep.tolist() == tv["is_within_crop_area"].tolist(), f"case {case}"
    assert crops > 50  # most cases really crop


def _ks_p(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov p-value (asymptotic)."""
    a, b = np.sort(a), np.sort(b)
    grid = np.concatenate([a, b])
    d = np.abs(
        np.searchsorted(a, grid, side="right") / len(a)
        - np.searchsorted(b, grid, side="right") / len(b)
    ).max()
    lam = d * math.sqrt(len(a) * len(b) / (len(a) + len(b)))
    return float(
        min(1.0, 2 * sum((-1) ** (k - 1) * math.exp(-2 * k * k * lam * lam) for k in range(1, 101)))
    )


def _chi2_p(a: np.ndarray, b: np.ndarray) -> float:
    """Chi-square homogeneity p-value of two samples of small integers (bins with data)."""
    bins = np.union1d(a, b)
    table = np.array([[np.sum(x == v) for v in bins] for x in (a, b)], dtype=np.float64)
    expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / table.sum()
    stat = float(((table - expected) ** 2 / expected).sum())
    df = len(bins) - 1
    if df == 0:
        return 1.0
    return float(torch.special.gammaincc(torch.tensor(df / 2.0), torch.tensor(stat / 2.0)))


def _draws(sample, boxes, size, n: int, seed: int) -> np.ndarray:
    """[n, 6]: width, height, left, top, kept boxes, cropped (0/1) of n crops."""
    torch.manual_seed(seed)
    out = np.zeros((n, 6))
    h, w = size
    for i in range(n):
        p = sample()
        if p is None:
            out[i] = (w, h, 0, 0, len(boxes), 0)
        else:
            out[i] = (p[3], p[2], p[1], p[0], int(np.sum(p[4])), 1)
    return out


def _tv_sampler(boxes, size):
    h, w = size
    crop = v2.RandomIoUCrop()
    flat = [
        tv_tensors.Image(torch.zeros(3, h, w, dtype=torch.uint8)),
        tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(h, w)),
    ]

    def sample():
        p = crop.make_params(flat)
        if not p:
            return None
        return p["top"], p["left"], p["height"], p["width"], p["is_within_crop_area"].numpy()

    return sample


def _pvalues(x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    cx, cy = x[x[:, 5] == 1], y[y[:, 5] == 1]
    return {
        "cropped": _chi2_p(x[:, 5], y[:, 5]),
        "width": _ks_p(cx[:, 0], cy[:, 0]),
        "height": _ks_p(cx[:, 1], cy[:, 1]),
        "aspect": _ks_p(cx[:, 0] / cx[:, 1], cy[:, 0] / cy[:, 1]),
        "left": _ks_p(cx[:, 2], cy[:, 2]),
        "top": _ks_p(cx[:, 3], cy[:, 3]),
        "centre_x": _ks_p(cx[:, 2] + cx[:, 0] / 2, cy[:, 2] + cy[:, 0] / 2),
        "kept_boxes": _chi2_p(cx[:, 4], cy[:, 4]),
    }


# (h, w) and boxes: a photo with a few objects of mixed sizes, and a portrait with one big
# object and small ones (the high-IoU options fail often: several rounds per crop)
SCENES = {
    "photo": ((480, 640), [[20, 30, 200, 260], [300, 100, 420, 180], [500, 300, 630, 470],
                           [250, 250, 270, 275], [60, 380, 140, 460]]),
    "portrait": ((640, 480), [[40, 60, 440, 600], [10, 10, 30, 40], [400, 20, 470, 90]]),
}  # fmt: skip


@pytest.fixture(scope="module")
def samples() -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per scene: torchvision's crops, ours, and a wrong sampler's (min_scale 0.5, not 0.3)."""
    out = {}
    for k, (name, (size, boxes)) in enumerate(SCENES.items()):
        boxes = torch.tensor(boxes, dtype=torch.float32)
        n = 1500
        tv = _draws(_tv_sampler(boxes, size), boxes, size, n, seed=100 + k)
        ours = _draws(lambda b=boxes, s=size: IoUCropSampler()(b, s), boxes, size, n, 200 + k)
        off = _draws(
            lambda b=boxes, s=size: IoUCropSampler(min_scale=0.5)(b, s), boxes, size, n, 300 + k
        )
        out[name] = (tv, ours, off)
    return out


# Slow (~20 s of sampling in `samples`): the quick replay test above covers the same sampler.
@pytest.mark.slow
@pytest.mark.parametrize("scene", list(SCENES))
def test_same_distribution_as_torchvision(samples, scene):
    tv, ours, _ = samples[scene]
    p = _pvalues(tv, ours)
    assert min(p.values()) > 1e-3, p
    # and not vacuous: most draws crop, crops vary
    assert ours[:, 5].mean() > 0.6 and np.unique(ours[:, 0]).size > 100


@pytest.mark.slow
@pytest.mark.parametrize("scene", list(SCENES))
def test_a_different_sampler_is_detected(samples, scene):
    tv, _, off = samples[scene]
    p = _pvalues(tv, off)
    assert min(p.values()) < 1e-6, p


def test_no_boxes_is_refused():
    with pytest.raises(ValueError, match="at least one box"):
        IoUCropSampler()(torch.zeros(0, 4), (10, 10))
