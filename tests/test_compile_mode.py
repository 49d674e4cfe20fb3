"""compiler.mode: torch.compile's mode, checked at start and passed to torch.compile.

The last test compiles the tiny-canvas model once with inductor (slow: ~1 min on 2 cores).
"""

import re

import pytest
import torch

from ssd_npu.build import build_training, step_options
from ssd_npu.config import COMPILE_MODES, validate
from ssd_npu.device.backend import Device
from ssd_npu.device.compiler import reset
from ssd_npu.device.distributed import World
from ssd_npu.engine.loop import Progress
from ssd_npu.errors import ConfigError
from tests.helpers import FAST, compose_cfg, train_loop, train_step


def test_compile_modes_are_torch_compiles_own():
    """The allowed values are the ones torch.compile's docstring lists."""
    doc = torch.compile.__doc__
    line = next(x for x in doc.splitlines() if x.strip().startswith("mode (str)"))
    assert re.findall(r'"([^"]+)"', line) == list(COMPILE_MODES)


def test_bad_compiler_mode_names_the_key_and_the_choices():
    with pytest.raises(ConfigError) as err:
        validate(compose_cfg("compiler.mode=fast"))
    assert str(err.value) == (
        "compiler.mode='fast' is not valid; choose one of: default, reduce-overhead, "
        "max-autotune, max-autotune-no-cudagraphs."
    )
    for mode in COMPILE_MODES:
        validate(compose_cfg(f"compiler.mode={mode}", "compile=true"))
    assert compose_cfg().compiler.mode is None


@pytest.mark.parametrize(
    "overrides",
    [
        ("compiler.backend=eager", "compiler.mode=reduce-overhead"),
        ("compiler.backend=aot_eager", "compiler.mode=max-autotune"),
        ("device=npu", "compiler.backend=npu", "compiler.mode=reduce-overhead"),  # torchair GE
    ],
)
def test_a_mode_needs_inductor(overrides):
    with pytest.raises(ConfigError, match=r"^compiler\.mode=\S+ needs compiler\.backend=inductor"):
        validate(compose_cfg(*overrides))


def test_default_mode_and_inductor_pass():
    """Both pass the check at start and reach the step's compile options as given."""
    for backend, mode in (("eager", "default"), ("inductor", "reduce-overhead")):
        cfg = compose_cfg("compile=true", f"compiler.backend={backend}", f"compiler.mode={mode}")
        validate(cfg)
        options = step_options(cfg, Device("cpu", None), World(), None)
        assert (options.compile.backend, options.compile.mode) == (backend, mode)


def test_step_options_check_the_resolved_backend(monkeypatch):
    """device=auto: validate cannot know the device; step_options checks the backend against
    the device auto became (inductor is every device's default, npu's too)."""
    monkeypatch.setattr("ssd_npu.device.backend._importable", lambda module: True)  # triton-ascend
    cfg = compose_cfg("compile=true", "compiler.mode=max-autotune-no-cudagraphs")
    validate(cfg)
    for device in (Device("cpu", None), Device("npu", 0)):
        options = step_options(cfg, device, World(), None)
        assert options.compile.backend == "inductor"
        assert options.compile.mode == "max-autotune-no-cudagraphs"
    cfg = compose_cfg("compile=true", "compiler.backend=npu")  # torchair GE: npu only
    validate(cfg)
    assert step_options(cfg, Device("npu", 0), World(), None).compile.backend == "npu"
    with pytest.raises(ConfigError, match=r"^compiler\.backend=npu .* needs device=npu"):
        step_options(cfg, Device("cpu", None), World(), None)


@pytest.mark.slow
def test_compiler_mode_reaches_torch_compile(tiny_cfg, tmp_path, monkeypatch):
    """A real compiled training step: torch.compile gets mode="reduce-overhead", and inductor
    acts on it: it asks for CUDA graphs and, the graph being on the CPU, skips them (dynamo's
    `cudagraph_skips` counter; 0 without the mode)."""
    from torch._dynamo.utils import counters

    calls = []
    real_compile = torch.compile

    def spy(fn, **kwargs):
        calls.append(kwargs)
        return real_compile(fn, **kwargs)

    monkeypatch.setattr(torch, "compile", spy)
    reset()
    cfg = tiny_cfg(*FAST, "compile=true", "compiler.mode=reduce-overhead", "max_steps=2")
    t = build_training(cfg)
    assert calls == [{"dynamic": False, "backend": "inductor", "mode": "reduce-overhead"}]
    batches, loop, progress = iter(t.data.train), train_loop(t, tmp_path), Progress()
    for _ in range(2):
        train_step(loop, next(batches), progress)  # a non-finite loss raises NonFiniteLoss
    assert t.step.compiled.cudagraphs and t.step.compiled.graphs_per_call == [1, 0]
    assert counters["inductor"]["cudagraph_skips"] >= 1
