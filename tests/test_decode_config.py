"""`data.decode` from the command line to the batch: reduced gives uint8 canvases that train;
bad values and the dynamic baseline are refused with a message naming the key."""

from __future__ import annotations

import pytest
import torch

from ssd_npu.build import build_training
from ssd_npu.config import validate
from ssd_npu.errors import ConfigError
from tests.helpers import FAST, compose_cfg


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.decode=fast"], "data.decode='fast' is not valid; choose one of: exact, reduced"),
        (["data.decode=reduced", "shape=dynamic"], "data.decode=reduced needs shape=fixed"),
    ],
)
def test_bad_decode_values_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose_cfg(*overrides))


def test_reduced_decode_trains_on_uint8_canvases(tiny_cfg):
    t = build_training(tiny_cfg(*FAST, "data.decode=reduced", "fit=letterbox"))
    batch = next(iter(t.data.train))
    assert batch.images.dtype == torch.uint8 and tuple(batch.images.shape[1:]) == (3, 128, 128)
    losses = t.step(batch)  # FixedDetector scales uint8 to [0, 1] on the device
    assert all(torch.isfinite(v) for v in losses.values())
    exact = build_training(tiny_cfg(*FAST, "fit=letterbox"))
    assert next(iter(exact.data.train)).images.dtype == torch.float32
