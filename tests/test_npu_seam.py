"""The NPU seam, on a machine without an NPU.

No Ascend hardware or CANN exists here, so the thinnest seam is faked: a `torch_npu`
package on the path that does what the real one does at import (rename the privateuse1
backend to "npu", register `torch.npu` with the functions our code calls) and records the
calls. Everything above it (ssd_npu.device.backend, distributed, engine) is the real code.
"""

import ast
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ssd_npu.build import ShapePath, shape_path, step_options, uses_channels_last
from ssd_npu.config import validate
from ssd_npu.device.ascend import import_torch_npu, npu_pair_mismatch, release_of
from ssd_npu.device.backend import Device, dynamic_postprocess_place
from ssd_npu.device.compiler import CompiledStep, device_of
from ssd_npu.device.distributed import World
from ssd_npu.errors import ConfigError, DeviceError
from ssd_npu.evaluation.evaluate import dynamic_detections
from ssd_npu.models.detector import FixedDetector, build_detector
from tests.helpers import REPO, compose_cfg

FAKE_TORCH_NPU = """
import contextlib
import os
from time import perf_counter

import torch

CALLS = []  # the fake's own record of the calls made to it, in order (not a torch_npu name)
__version__ = torch.__version__.split("+")[0]


def _log(*entry):
    CALLS.append(list(entry))


class _Stream:  # torch_npu.npu.Stream; s0 is the default stream, current until one is entered
    _made = 0

    def __init__(self, device=None, priority=0):
        self._name = f"s{_Stream._made}"
        _Stream._made += 1

    def wait_event(self, event):
        assert event._stream is not None, "waits for an event that was never recorded"
        _log("Stream.wait_event", self._name, event._name)

    def wait_stream(self, stream):
        _log("Stream.wait_stream", self._name, stream._name)


_current = [_Stream()]  # the stream stack of torch.npu.stream(...): its top is current


class _Event:  # torch_npu.npu.Event, timed by the host clock
    _made = 0

    def __init__(self, enable_timing=False, blocking=False, interprocess=False):
        self._name, self._timing, self._stream = f"e{_Event._made}", enable_timing, None
        _Event._made += 1
        _log("Event", self._name, enable_timing)

    def record(self, stream=None):
        self._stream, self._time = stream or _current[-1], perf_counter()
        _log("Event.record", self._name, self._stream._name)

    def synchronize(self):
        _log("Event.synchronize", self._name)

    def query(self):
        _log("Event.query", self._name)
        return self._stream is not None

    def elapsed_time(self, end_event):
        assert self._timing and end_event._timing, "elapsed_time needs enable_timing=True"
        _log("Event.elapsed_time", self._name, end_event._name)
        return (end_event._time - self._time) * 1000.0


class _GradScaler:  # torch_npu.npu.amp.GradScaler
    def __init__(self):
        _log("GradScaler")


class _Amp:  # torch_npu.npu.amp
    GradScaler = _GradScaler


class _Npu:  # torch_npu.npu, registered as torch.npu
    Stream = _Stream
    Event = _Event
    amp = _Amp

    def is_available(self):
        return True

    def set_device(self, device):
        _log("set_device", str(device))

    def set_compile_mode(self, jit_compile):
        _log("set_compile_mode", jit_compile)

    def synchronize(self, device=None):
        _log("synchronize")

    def is_bf16_supported(self):  # FAKE_NPU_BF16=1: an Ascend 910B or later
        _log("is_bf16_supported")
        return os.environ.get("FAKE_NPU_BF16") == "1"

    def get_amp_supported_dtype(self):
        return [torch.float16, torch.bfloat16]

    @contextlib.contextmanager
    def stream(self, stream):
        _log("stream", stream._name)
        _current.append(stream)
        try:
            yield
        finally:
            _current.pop()

    def current_stream(self, device=None):
        _log("current_stream", device)
        return _current[-1]

    def get_rng_state(self, device="npu"):
        _log("get_rng_state", device)
        return torch.arange(16, dtype=torch.uint8)

    def set_rng_state(self, new_state, device="npu"):
        _log("set_rng_state", new_state.tolist(), device)

    def manual_seed_all(self, seed):  # torch.manual_seed seeds the device module through it
        _log("manual_seed_all", seed)

    def _is_in_bad_fork(self):  # asked by torch.manual_seed before manual_seed_all
        return False


npu = _Npu()
torch.utils.rename_privateuse1_backend("npu")
torch._register_device_module("npu", npu)
# what torch_npu's dynamo patches install at import (torch_npu/utils/_dynamo.py)
torch.compiler.npugraph_mark_step_begin = lambda: _log("npugraph_mark_step_begin")
"""

SEAM_SCRIPT = """
import json, os, sys
import ssd_npu  # sets TORCH_DEVICE_BACKEND_AUTOLOAD=0 before torch
import torch
import torch.distributed as dist
from ssd_npu.device import distributed
from ssd_npu.build import uses_channels_last
from ssd_npu.errors import ConfigError
from ssd_npu.device.backend import resolve_device

os.environ.update(WORLD_SIZE="2", RANK="1", LOCAL_RANK="1")
dev = resolve_device("npu", None, jit_compile=JIT)
import torch_npu

seen = {}
dist.init_process_group = lambda backend, **kw: seen.setdefault("backend", backend)
dist.is_initialized = lambda: "backend" in seen
dist.get_rank = lambda group=None: 1
dist.get_world_size = lambda group=None: 2
dist.new_group = lambda **kw: seen.setdefault("host_group", kw["backend"])
world = distributed.init(dev)
with dev.autocast(True):
    autocast_device = torch.get_autocast_dtype("npu")
scaler = dev.grad_scaler(True)
dev.synchronize()
dev.mark_step_begin()
try:
    channels_last = uses_channels_last(True, dev, False)
except ConfigError as err:
    channels_last = str(err)
print(json.dumps({
    "calls": torch_npu.CALLS, "backend": seen["backend"], "world": [world.rank, world.size],
    "device": str(dev.torch), "compile_backend": dev.compile_backend,
    "autocast_dtype": str(autocast_device), "amp_dtype": str(dev.amp_dtype()),
    "scaler": scaler is not None, "amp_note": dev.amp_note(True),
    "dynamic_postprocess": dev.dynamic_postprocess, "channels_last": channels_last,
}))
"""


def fake_site(tmp_path: Path, init_source: str, entry_point: bool = False) -> Path:
    site = tmp_path / "site"
    (site / "torch_npu").mkdir(parents=True)
    (site / "torch_npu" / "__init__.py").write_text(init_source)
    if entry_point:  # what a pip-installed torch_npu registers: torch autoloads it
        info = site / "torch_npu-2.14.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text("Metadata-Version: 2.1\nName: torch_npu\nVersion: 2.14.1\n")
        (info / "entry_points.txt").write_text(
            "[torch.backends]\ndevice_backend = torch_npu:_autoload\n"
        )
    return site


def run_python(
    site: Path, code: str, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """`python -c code args` (or `python args`) with the fake `site` first on the path and
    `env` added to this process's environment."""
    merged = {k: v for k, v in os.environ.items() if k != "TORCH_DEVICE_BACKEND_AUTOLOAD"}
    merged |= (env or {}) | {"PYTHONPATH": f"{site}{os.pathsep}{REPO}"}
    return subprocess.run(
        [sys.executable, *(["-c", code] if code else []), *args],
        cwd=REPO,
        env=merged,
        capture_output=True,
        text=True,
        timeout=120,
    )


def run_seam(site: Path, jit: bool = False, **env: str) -> dict:
    """SEAM_SCRIPT against the fake torch_npu in `site`, with `env` added; what it saw."""
    proc = run_python(site, SEAM_SCRIPT.replace("JIT", str(jit)), env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("jit", [False, True])
def test_npu_device_uses_torch_npu_as_documented(tmp_path, jit):
    seen = run_seam(fake_site(tmp_path, FAKE_TORCH_NPU), jit)
    assert seen["calls"][:3] == [
        ["set_device", "npu:1"],
        ["set_compile_mode", jit],
        ["is_bf16_supported"],  # asked once, at resolve_device
    ]
    assert ["GradScaler"] in seen["calls"] and ["synchronize"] in seen["calls"]
    assert seen["calls"].count(["is_bf16_supported"]) == 1
    assert seen["backend"] == "hccl" and seen["world"] == [1, 2]
    assert seen["device"] == "npu:1" and seen["compile_backend"] == "inductor"
    # reduce-overhead's new iteration is marked in torch_npu's NPU graph trees
    assert seen["calls"][-1] == ["npugraph_mark_step_begin"]
    # device=auto that became npu: refused when the model is built, naming the key
    assert seen["channels_last"].startswith("device.channels_last=true is not supported on")


@pytest.mark.parametrize("bf16", [False, True])
def test_npu_amp_default_follows_is_bf16_supported(tmp_path, bf16):
    """bf16 where the chip has it (no scaler, no per-step host read); fp16 keeps torch_npu's
    GradScaler, and the run says what its inf check costs."""
    seen = run_seam(fake_site(tmp_path, FAKE_TORCH_NPU), FAKE_NPU_BF16="1" if bf16 else "0")
    want = "torch.bfloat16" if bf16 else "torch.float16"
    assert seen["autocast_dtype"] == want == seen["amp_dtype"]
    assert seen["scaler"] is (not bf16) and (["GradScaler"] in seen["calls"]) is (not bf16)
    if bf16:
        assert seen["amp_note"] is None
    else:
        assert "GradScaler reads the device twice per step" in seen["amp_note"]


@pytest.mark.parametrize("torchvision_npu", [False, True])
def test_npu_dynamic_postprocess_runs_where_nms_has_a_kernel(tmp_path, torchvision_npu):
    """torchvision's nms has no NPU kernel: shape=dynamic's postprocess runs on the host,
    unless torchvision_npu (which registers one) imports."""
    site = fake_site(tmp_path, FAKE_TORCH_NPU)
    if torchvision_npu:
        (site / "torchvision_npu").mkdir()
        (site / "torchvision_npu" / "__init__.py").write_text("")
    seen = run_seam(site)
    assert seen["dynamic_postprocess"] == ("device" if torchvision_npu else "host")


@pytest.mark.parametrize(
    ("device_type", "torchvision_npu", "want"),
    [("npu", False, "host"), ("npu", True, "device"), ("cuda", False, "device"),
     ("cpu", False, "device")],
)  # fmt: skip
def test_dynamic_postprocess_place(device_type, torchvision_npu, want):
    assert dynamic_postprocess_place(device_type, torchvision_npu) == want


def test_dynamic_path_binds_where_its_postprocess_runs(monkeypatch):
    """The dynamic path's evaluation gets the place its device answers; the fixed path has
    its own (`eval.postprocess`)."""
    monkeypatch.setitem(sys.modules, "torchvision_npu", None)  # not installed
    path: ShapePath = shape_path(compose_cfg("shape=dynamic"))
    model = FixedDetector(build_detector(3, (64, 64)), (64, 64))
    detect = path.detections(model, Device("npu", 0), amp=False, detect=None)
    assert detect.func is dynamic_detections and detect.keywords["postprocess"] == "host"
    detect = path.detections(model, Device("cpu", None), amp=False, detect=None)
    assert detect.keywords["postprocess"] == "device"


def test_postprocess_on_host_gives_torchvision_own_detections():
    """postprocess=host runs the same torchvision inference, its postprocess on copies on
    the cpu: the same COCO records, and the detector is left as it was."""
    torch.manual_seed(0)
    detector = build_detector(3, (64, 64)).eval()
    # the fields of a DynamicBatch that evaluation reads: images of two sizes
    batch = SimpleNamespace(
        images=[torch.rand(3, 48, 80), torch.rand(3, 64, 40)], image_ids=torch.tensor([1, 2])
    )
    seen = {
        where: dynamic_detections(detector, [batch], "cpu", where) for where in ("device", "host")
    }
    assert np.array_equal(seen["host"].results, seen["device"].results)
    assert seen["host"].image_ids == seen["device"].image_ids and len(seen["host"].results) > 0
    assert "postprocess_detections" not in vars(detector)


def test_npu_compile_backends_are_validated():
    for backend in ("inductor", "npu"):
        validate(compose_cfg("device=npu", "compile=true", f"compiler.backend={backend}"))
    with pytest.raises(ConfigError) as err:
        validate(compose_cfg("device=npu", "compiler.backend=aot_eager"))
    assert str(err.value).startswith("compiler.backend=aot_eager is not valid with device=npu;")
    with pytest.raises(ConfigError, match=r"^compiler\.backend=npu .* needs device=npu"):
        validate(compose_cfg("device=cpu", "compiler.backend=npu"))


def test_inductor_on_npu_needs_triton_ascend(monkeypatch):
    """The default backend on npu is inductor; without triton-ascend it fails at start,
    naming the key, instead of at the first compile."""
    monkeypatch.setattr("ssd_npu.device.backend._importable", lambda module: module != "triton")
    cfg = compose_cfg("device=npu", "compile=true")
    with pytest.raises(
        DeviceError, match=r"^compiler\.backend=inductor on device=npu needs triton"
    ):
        step_options(cfg, Device("npu", 0), World(), None)
    cfg = compose_cfg("device=npu", "compile=true", "compiler.backend=npu")
    assert step_options(cfg, Device("npu", 0), World(), None).compile.backend == "npu"


def test_channels_last_on_npu_is_refused_at_start():
    with pytest.raises(ConfigError) as err:
        validate(compose_cfg("device=npu", "device.channels_last=true"))
    assert str(err.value).startswith("device.channels_last=true is not supported on device=npu")
    validate(compose_cfg("device=npu", "device.channels_last=false"))
    assert uses_channels_last(None, Device("npu", 0), amp=False) is False


def test_a_device_graph_step_marks_the_iteration_on_its_inputs_device(monkeypatch):
    """compiler.mode=reduce-overhead: each call marks a new iteration in the graph trees of
    the device its inputs are on (`Device.mark_step_begin`: npugraph_mark_step_begin on npu)."""
    marked = []
    monkeypatch.setattr(Device, "mark_step_begin", lambda self: marked.append(self.type))
    step = CompiledStep(lambda x: x * 2, "eager")
    step.cudagraphs = True  # as mode=reduce-overhead sets it (eager takes no mode)
    step(torch.ones(2))
    assert marked == ["cpu"]
    assert device_of(([1, {"images": torch.ones(1)}],)).type == "cpu"
    assert device_of((3,)).type == "cuda"


LOOP_SCRIPT = """
import json, sys
from pathlib import Path
import ssd_npu  # sets TORCH_DEVICE_BACKEND_AUTOLOAD=0 before torch
import torch
import torch_npu  # the fake: torch.npu with its streams, events and generator
from ssd_npu.build import build_training
from ssd_npu.engine.checkpoint import TrainState, load_checkpoint
from ssd_npu.device.backend import Device
from ssd_npu.engine.loop import TrainLoop
from ssd_npu.engine.hooks import CheckpointHook
from ssd_npu.device.prefetch import DevicePrefetcher
from ssd_npu.engine.telemetry import Telemetry
from tests.helpers import FAST, tiny_config


class HostNpu(Device):
    # An npu whose tensors live on the cpu (no NPU kernel exists here): its queue, waits and
    # generator are torch.npu's, so the fake sees every call the loop makes.

    @property
    def torch(self) -> torch.device:
        return torch.device("cpu")

    def record_stream(self, tensor, stream):
        torch_npu.CALLS.append(["record_stream", stream._name])  # a host tensor has no stream
        return tensor


root, out = Path(sys.argv[1]), Path(sys.argv[2])
cfg = tiny_config(root, out, *FAST, "max_steps=3")
t = build_training(cfg)
npu = HostNpu("npu", 0)
state = TrainState(t.model, t.optimizer, t.scheduler, None, {}, npu)
hook = CheckpointHook(state, out / "checkpoints", every=2, keep=5, main=True)
loop = TrainLoop(
    t.step, t.optimizer, t.scheduler, DevicePrefetcher(t.data.train, npu), t.data.train_sampler,
    npu, Telemetry(out, 0, enabled=False), [hook], world=t.world, optimizer_step=t.optimizer_step,
)
torch_npu.CALLS.clear()
loop.run(cfg.epochs, cfg.max_steps)
calls, saved = list(torch_npu.CALLS), load_checkpoint(hook.last)
torch_npu.CALLS.clear()
state.load(saved)
print(json.dumps({
    "loop": calls, "resume": torch_npu.CALLS, "rng": saved["rng"][0]["npu"].tolist(),
}))
"""


@pytest.fixture(scope="module")
def fake_loop(tmp_path_factory: pytest.TempPathFactory, tiny_coco: Path) -> dict:
    """LOOP_SCRIPT on the fake torch_npu: 3 steps of the tiny config through the prefetcher,
    a checkpoint at step 2 and at the end, then a resume from the last one (what it saw)."""
    tmp_path = tmp_path_factory.mktemp("fake_loop")
    site = fake_site(tmp_path, FAKE_TORCH_NPU)
    proc = run_python(site, LOOP_SCRIPT, str(tiny_coco), str(tmp_path / "run"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def step_reads(calls: list[list]) -> list[tuple[int, int]]:
    """(step read, steps queued then) for each host wait on an event. The loop's timing events
    (enable_timing) come three per step: its start and end marks, then its losses' copy."""
    step_of: dict[str, int] = {}
    queued, reads = 0, []
    for call in calls:
        if call[0] == "Event" and call[2]:  # a timing event
            step_of[call[1]] = len(step_of) // 3 + 1
            queued = max(queued, step_of[call[1]])
        elif call[0] == "Event.synchronize":
            reads.append((step_of[call[1]], queued))
    return reads


def test_the_loop_on_the_fake_npu_waits_only_where_it_reads(fake_loop):
    """TrainLoop + DevicePrefetcher on an npu (the fake torch_npu, tensors on the cpu): the
    copies go on one side stream, each step waits for its own batch's copy event only, and the
    host waits on an event only to read a step: step 1 after step 2 is queued, step 2 (the
    checkpoint's) and step 3 (the last) at once; never a device-wide synchronize."""
    calls = fake_loop["loop"]
    names = [c[0] for c in calls]
    assert "synchronize" not in names and "Stream.wait_stream" not in names
    copy_events = [c[1] for c in calls if c[0] == "Event" and not c[2]]
    recorded = {c[1]: c[2] for c in calls if c[0] == "Event.record"}
    # 4 batches copied (one ahead of the 3 steps), each on the copy stream s1, entered for it
    assert len(copy_events) == 4 and {recorded[e] for e in copy_events} == {"s1"}
    assert [c[1] for c in calls if c[0] == "stream"] == ["s1"] * 4
    # the step's stream (s0) waits for batches 0, 1, 2's own copies, each after its record
    waits = [c for c in calls if c[0] == "Stream.wait_event"]
    assert waits == [["Stream.wait_event", "s0", e] for e in copy_events[:3]]
    for wait in waits:
        record = calls.index(["Event.record", wait[2], "s1"])
        assert record < calls.index(wait)
    assert {c[1] for c in calls if c[0] == "record_stream"} == {"s0"}  # memory tied to s0
    # the marks and the losses' copies are recorded on the step's stream, 3 per step
    timing = [c[1] for c in calls if c[0] == "Event" and c[2]]
    assert len(timing) == 9 and {recorded[e] for e in timing} == {"s0"}
    assert step_reads(calls) == [(1, 2), (1, 2), (2, 2), (2, 2), (3, 3), (3, 3)]
    elapsed = [c[1:] for c in calls if c[0] == "Event.elapsed_time"]
    assert elapsed == [[timing[k], timing[k + 1]] for k in (0, 3, 6)]  # start -> end mark


def test_a_checkpoint_keeps_the_npu_generator(fake_loop):
    """The checkpoints of the fake-npu loop hold torch.npu's generator state (asked of this
    rank's device, 0), and resuming gives it back to that device."""
    seen = fake_loop
    asked = [c for c in seen["loop"] if c[0] == "get_rng_state"]
    assert asked == [["get_rng_state", 0]] * 2  # the checkpoints at steps 2 and 3
    assert seen["rng"] == list(range(16))
    assert seen["resume"] == [["set_rng_state", list(range(16)), 0]]


API_LIST = REPO / "tests" / "data" / "torch_npu_api.txt"
UNPACKED_WHEEL = Path("/tmp/npu/torch_npu-2.14.0-cp311-cp311-manylinux_2_28_x86_64")
_spec = importlib.util.spec_from_file_location("npu_api_names", REPO / "scripts/npu_api_names.py")
npu_api_names = importlib.util.module_from_spec(_spec)
sys.modules["npu_api_names"] = npu_api_names  # dataclasses look their module up while being made
_spec.loader.exec_module(npu_api_names)


def listed_names() -> set[str]:
    return set(npu_api_names.read_names(API_LIST.read_text()))


def fake_api(source: str) -> set[str]:
    """The torch_npu names a fake offers: its public module-level names (CALLS, its own record,
    aside), the members of the classes they are instances or aliases of, recursively (`npu =
    _Npu()`, `Event = _Event`: npu.Event.record), and the torch attributes it sets. A class's
    methods are all offered (torch asks for `_is_in_bad_fork`), dunders aside; a leading _
    marks the fake's own data (`_made`) and module-level helpers (`_log`, `_Stream`)."""
    tree = ast.parse(source)
    classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
    names: set[str] = set()

    def bind(name: str, value: ast.expr) -> None:
        names.add(name)
        if isinstance(value, ast.Call):
            value = value.func  # an instance: its class's members
        if isinstance(value, ast.Name) and value.id in classes:
            for node in classes[value.id].body:
                if isinstance(node, ast.FunctionDef) and not node.name.startswith("__"):
                    names.add(f"{name}.{node.name}")
                if isinstance(node, ast.Assign):
                    for target in node.targets:
                        if isinstance(target, ast.Name) and not target.id.startswith("_"):
                            bind(f"{name}.{target.id}", node.value)

    for node in tree.body:
        for target in node.targets if isinstance(node, ast.Assign) else []:
            if isinstance(target, ast.Attribute):
                names.add(ast.unparse(target))  # torch.compiler.npugraph_mark_step_begin
            elif isinstance(target, ast.Name) and not target.id.startswith("_"):
                bind(target.id, node.value)
        if isinstance(node, ast.FunctionDef | ast.ClassDef) and not node.name.startswith("_"):
            names.add(node.name)
    return names - {"CALLS"}


def test_the_fake_offers_only_names_torch_npu_has():
    offered = fake_api(FAKE_TORCH_NPU)
    assert {"npu.Event.record", "npu.stream", "npu.get_rng_state"} <= offered  # it reads them
    assert offered - listed_names() == set(), "add them to scripts/npu_api_names.py (API)"


def test_the_fake_api_reader_sees_what_is_offered():
    source = "class _E:\n    _made = 0\n    def record(self): ...\n    def __init__(self): ...\n"
    source += "class _N:\n    Event = _E\n    def _in_fork(self): ...\nnpu = _N()\n"
    source += "_private = 1\ndef _log(): ...\ntorch.a.b = 2\nCALLS = []\n"
    want = {"npu", "npu.Event", "npu.Event.record", "npu._in_fork", "torch.a.b"}
    assert fake_api(source) == want


def test_the_list_is_what_the_script_writes():
    text = API_LIST.read_text()
    assert npu_api_names.read_names(text) == npu_api_names.API
    assert text.endswith(npu_api_names.render("2.14.0").split("\n", 5)[-1])


def test_the_device_module_calls_only_listed_names():
    """What ssd_npu/device/backend.py and ascend.py reach through torch.npu (`self._backend` on
    npu, `torch.npu`) and torch_npu (`import_torch_npu()`) is on the list (calls on events and
    streams they hold are covered by the fake instead)."""
    source = "\n".join(
        (REPO / "ssd_npu" / "device" / name).read_text() for name in ("backend.py", "ascend.py")
    )
    tree = ast.parse(source)
    inner = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    prefixes = {"self._backend.": "npu.", "torch.npu.": "npu.", "import_torch_npu().": ""}
    used = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and id(node) not in inner:
            text = ast.unparse(node)
            used |= {
                new + text[len(old) :] for old, new in prefixes.items() if text.startswith(old)
            }
    assert {"npu.Event", "npu.get_rng_state", "npu.amp.GradScaler", "profiler"} <= used
    assert used - listed_names() == set()


@pytest.mark.skipif(not UNPACKED_WHEEL.is_dir(), reason=f"no torch_npu wheel at {UNPACKED_WHEEL}")
def test_every_listed_name_is_in_torch_npu_2_14():
    sources = npu_api_names.Sources(UNPACKED_WHEEL)
    assert sources.version == "2.14.0"
    missing = [name for name in sorted(listed_names()) if npu_api_names.find(sources, name) is None]
    assert missing == []
    assert npu_api_names.find(sources, "npu.Event.no_such_method") is None  # it can say no


@pytest.mark.slow  # 3 subprocesses, ~11 s; the import-order checks below cover it statically
def test_installed_torch_npu_without_cann_does_not_break_cpu(tmp_path):
    """torch autoloads an installed torch_npu on import; ssd_npu switches that off first."""
    broken = 'raise ImportError("libhccl.so: cannot open shared object file: No such file")\n'
    site = fake_site(tmp_path, broken, entry_point=True)
    bare = run_python(site, "import torch")
    assert bare.returncode != 0 and "libhccl.so" in bare.stderr  # the trap is real
    ours = run_python(
        site, "import ssd_npu; import torch; from ssd_npu.device.backend import resolve_device; "
        "print(resolve_device('cpu').torch)"
    )  # fmt: skip
    assert ours.returncode == 0, ours.stderr[-2000:]
    assert ours.stdout.strip() == "cpu"
    cli = run_python(site, "", "train.py", "device=npu", f"hydra.run.dir={tmp_path / 'run'}")
    assert cli.returncode == 2 and "Traceback" not in cli.stderr
    assert "source /usr/local/Ascend/ascend-toolkit/set_env.sh" in cli.stderr


@pytest.mark.parametrize(
    ("source", "needles"),
    [
        (
            'raise ImportError("libascendcl.so: cannot open shared object file")',
            ["CANN", "set_env.sh"],
        ),
        ('__version__ = "2.9.0"', ["torch_npu 2.9.0 needs torch 2.9.0", "requirements-npu.txt"]),
        (
            '__version__ = "2.9.0.post8+git029a19d"',
            ["torch_npu 2.9.0.post8+git029a19d needs torch 2.9.0", "requirements-npu.txt"],
        ),
        (
            # torch_npu's own first check at import (torch_npu/__init__.py, 2.12 and later)
            'raise RuntimeError("Two accelerators cannot be used at the same time in PyTorch: '
            'npu and cuda. You can install the cpu version of PyTorch")',
            ["CUDA build", "CPU build of torch", "download.pytorch.org/whl/cpu"],
        ),
        (
            'raise ImportError("undefined symbol: _ZN3c104cuda9SetDevice")',
            ["CUDA build of torch", "CPU build", "requirements-npu.txt"],
        ),
    ],
)
def test_import_failures_say_what_to_do(tmp_path, monkeypatch, source, needles):
    site = fake_site(tmp_path, textwrap.dedent(source) + "\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delitem(sys.modules, "torch_npu", raising=False)
    if "CUDA" in needles[0]:
        monkeypatch.setattr(torch.version, "cuda", "13.0")
    with pytest.raises(DeviceError) as err:
        import_torch_npu()
    for needle in needles:
        assert needle in str(err.value)
    monkeypatch.delitem(sys.modules, "torch_npu", raising=False)


# Version strings as published: torch_npu/version.py of the wheels on PyPI, torch's +cpu/+cu builds.
@pytest.mark.parametrize(
    ("npu_version", "torch_version", "pairs"),
    [
        ("2.12.0.post3", "2.12.0", True),  # requires torch==2.12.0 (its METADATA)
        ("2.12.0.post3", "2.12.0+cpu", True),
        ("2.9.0.post8+git029a19d", "2.9.0+cpu", True),  # requires torch==2.9.0+cpu
        ("2.14.0", "2.14.0+cpu", True),  # requires torch==2.14.0.*
        ("2.14.0", "2.14.0.post1", True),
        ("2.14.0", "2.14.1+cu130", False),
        ("2.12.0.post3", "2.13.0", False),
        ("2.1.0.post17", "2.1.0", True),
    ],
)
def test_torch_npu_pairs_by_release_as_its_requirement_says(npu_version, torch_version, pairs):
    assert (npu_pair_mismatch(npu_version, torch_version) is None) == pairs


def test_a_post_release_of_torch_npu_imports(tmp_path, monkeypatch):
    torch_release = ".".join(map(str, release_of(torch.__version__)))
    site = fake_site(tmp_path, f'__version__ = "{torch_release}.post3+git6b88d20"\n')
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delitem(sys.modules, "torch_npu", raising=False)
    assert import_torch_npu().__version__.startswith(torch_release)
    monkeypatch.delitem(sys.modules, "torch_npu", raising=False)


def _requirements(path: Path) -> dict[str, dict[str, str]]:
    """{machine: {package: pinned version}} of a requirements file with platform markers."""
    pins: dict[str, dict[str, str]] = {"x86_64": {}, "aarch64": {}}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if not line or line.startswith("-"):
            continue
        spec, _, marker = line.partition(";")
        name, _, version = spec.strip().partition("==")
        for machine in pins:
            if not marker or machine in marker:
                pins[machine][name.strip()] = version.strip()
    return pins


def test_requirements_npu_install_a_released_cpu_pair():
    text = (REPO / "requirements-npu.txt").read_text()
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in text
    for machine, pins in _requirements(REPO / "requirements-npu.txt").items():
        assert npu_pair_mismatch(pins["torch-npu"], pins["torch"]) is None, machine
        if machine == "x86_64":  # PyPI's x86_64 torch is the CUDA build
            assert pins["torch"].endswith("+cpu") and pins["torchvision"].endswith("+cpu")
        # torchvision X.(Y+15).Z pairs with torch 2.Y.Z
        t, v = release_of(pins["torch"]), release_of(pins["torchvision"])
        assert (v[0], v[1] - 15, v[2]) == (0, t[1], t[2]), machine


def test_missing_torch_npu_names_the_requirements_file(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_npu", None)  # import raises ModuleNotFoundError
    with pytest.raises(DeviceError, match="requirements-npu.txt"):
        import_torch_npu()


AUTOLOAD = "TORCH_DEVICE_BACKEND_AUTOLOAD"


def _imported(node: ast.stmt) -> list[str]:
    """The top-level package names an import statement loads ([] for any other statement)."""
    if isinstance(node, ast.Import):
        return [alias.name.split(".")[0] for alias in node.names]
    if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        return [node.module.split(".")[0]]
    return []


def _sets_autoload(node: ast.stmt) -> bool:
    """`os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", ...)` or
    `os.environ["TORCH_DEVICE_BACKEND_AUTOLOAD"] = ...`."""
    if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
        func, args = node.value.func, node.value.args
        return (
            ast.unparse(func) == "os.environ.setdefault"
            and bool(args)
            and isinstance(args[0], ast.Constant)
            and args[0].value == AUTOLOAD
        )
    if isinstance(node, ast.Assign):
        return any(
            isinstance(t, ast.Subscript)
            and ast.unparse(t.value) == "os.environ"
            and isinstance(t.slice, ast.Constant)
            and t.slice.value == AUTOLOAD
            for t in node.targets
        )
    return False


def _module_level(body: list[ast.stmt]):
    """The statements that run when the module is imported, in order: into if / try / with
    blocks, not into functions or classes (their imports run later, after the header's)."""
    for node in body:
        yield node
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            continue
        for name in ("body", "orelse", "finalbody"):
            yield from _module_level(getattr(node, name, []))
        for handler in getattr(node, "handlers", []):
            yield from _module_level(handler.body)


def torch_before_autoload_off(path: Path) -> str | None:
    """The first torch / torchvision import that runs before ssd_npu is imported or the
    autoload switch is set (None if there is none): that import would autoload torch_npu."""
    for node in _module_level(ast.parse(path.read_text()).body):
        if _sets_autoload(node) or "ssd_npu" in _imported(node):
            return None
        if {"torch", "torchvision"} & set(_imported(node)):
            return f"{path.name}:{node.lineno}: {ast.unparse(node)}"
    return None


def test_no_script_imports_torch_before_switching_autoload_off():
    scripts = sorted((REPO / "scripts").glob("*.py")) + [REPO / "train.py"]
    assert len(scripts) > 5
    early = [hit for path in scripts if (hit := torch_before_autoload_off(path))]
    assert early == [], "import ssd_npu (or set TORCH_DEVICE_BACKEND_AUTOLOAD=0) before torch"


def test_the_import_order_check_catches_an_early_torch(tmp_path):
    cases = {
        "import torch\nimport ssd_npu\n": True,
        "import sys\nif sys:\n    from torchvision import ops\nimport ssd_npu\n": True,
        "import ssd_npu\nimport torch\n": False,
        f"import os\nos.environ.setdefault({AUTOLOAD!r}, '0')\nimport torch\n": False,
        f"import os\nos.environ[{AUTOLOAD!r}] = '0'\nimport torch\n": False,
        "def f():\n    import torch\nimport ssd_npu\n": False,  # runs after the header
    }
    for i, (source, early) in enumerate(cases.items()):
        path = tmp_path / f"case_{i}.py"
        path.write_text(source)
        assert (torch_before_autoload_off(path) is not None) == early, source
