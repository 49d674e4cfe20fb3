"""cuDNN's algorithm search (`torch.backends.cudnn.benchmark`): on for the fixed path on cuda,
where every shape is static and the search is paid once; off for the dynamic path, where
each new image shape would pay it again, and off where there is no cuDNN."""

import pytest
import torch

from ssd_npu.build import build_training
from ssd_npu.device.backend import Device
from tests.helpers import FAST


@pytest.mark.parametrize(
    ("device_type", "shape", "on"),
    [
        ("cuda", True, True),
        ("cuda", False, False),
        ("cpu", True, False),
        ("npu", True, False),
    ],
)
def test_benchmark_only_for_fixed_shapes_on_cuda(device_type, shape, on):
    assert Device(device_type, 0).cudnn_benchmark(static_shapes=shape) is on


@pytest.mark.parametrize("shape", [True, False])
def test_the_setting_decides_on_cuda_and_never_turns_it_on_elsewhere(shape):
    """device.cudnn_benchmark: the same search for both paths (scripts/gpu_check.py's fair
    baseline); where there is no cuDNN it stays off."""
    for setting in (True, False):
        assert Device("cuda", 0).cudnn_benchmark(shape, setting) is setting
        assert Device("cpu", None).cudnn_benchmark(shape, setting) is False
        assert Device("npu", 0).cudnn_benchmark(shape, setting) is False


def test_build_sets_the_flag_from_the_device_and_shape(tiny_cfg, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)  # left on by an earlier run
    build_training(tiny_cfg(*FAST))
    assert torch.backends.cudnn.benchmark is False  # device=cpu: set, and off
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    build_training(tiny_cfg(*FAST, "device.cudnn_benchmark=true"))
    assert torch.backends.cudnn.benchmark is False  # asked for, but the cpu has no cuDNN
