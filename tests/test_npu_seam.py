"""The NPU seam, on a machine without an NPU.

No Ascend hardware or CANN exists here, so the thinnest seam is faked: a `torch_npu`
package on the path that does what the real one does at import (rename the privateuse1
backend to "npu", register `torch.npu` with the functions our code calls) and records the
calls. Everything above it (ssd_npu.device, distributed, engine) is the real code.
"""

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ssd_npu.build import ShapePath, shape_path, step_options, uses_channels_last
from ssd_npu.compiler import CompiledStep, device_of
from ssd_npu.config import ConfigError, validate
from ssd_npu.device import (
    Device,
    dynamic_postprocess_place,
    import_torch_npu,
    npu_pair_mismatch,
    release_of,
)
from ssd_npu.distributed import World
from ssd_npu.errors import DeviceError
from ssd_npu.evaluate import dynamic_detections
from ssd_npu.model import FixedSSD, build_detector
from tests.helpers import REPO, compose_cfg

FAKE_TORCH_NPU = """
import os

import torch

CALLS = []
__version__ = torch.__version__.split("+")[0]


class _Npu:
    def is_available(self):
        return True

    def set_device(self, device):
        CALLS.append(["set_device", str(device)])

    def set_compile_mode(self, jit_compile):
        CALLS.append(["set_compile_mode", jit_compile])

    def synchronize(self, device=None):
        CALLS.append(["synchronize"])

    def is_bf16_supported(self):  # FAKE_NPU_BF16=1: an Ascend 910B or later
        CALLS.append(["is_bf16_supported"])
        return os.environ.get("FAKE_NPU_BF16") == "1"

    def get_amp_supported_dtype(self):
        return [torch.float16, torch.bfloat16]

    def is_autocast_enabled(self):
        return True

    def get_autocast_dtype(self):
        return torch.float16


class _Amp:
    class GradScaler:
        def __init__(self):
            CALLS.append(["GradScaler"])


class npu:  # torch_npu.npu
    amp = _Amp


torch.utils.rename_privateuse1_backend("npu")
torch._register_device_module("npu", _Npu())
# what torch_npu's dynamo patches install at import (torch_npu/utils/_dynamo.py)
torch.compiler.npugraph_mark_step_begin = lambda: CALLS.append(["npugraph_mark_step_begin"])
"""

SEAM_SCRIPT = """
import json, os, sys
import ssd_npu  # sets TORCH_DEVICE_BACKEND_AUTOLOAD=0 before torch
import torch
import torch.distributed as dist
from ssd_npu import distributed
from ssd_npu.build import uses_channels_last
from ssd_npu.config import ConfigError
from ssd_npu.device import resolve_device

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
    channels_last = uses_channels_last(True, dev.type, False)
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
    model = FixedSSD(build_detector(3, (64, 64)), (64, 64))
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
    assert seen["host"] == seen["device"] and len(seen["host"][0]) > 0
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
    monkeypatch.setattr("ssd_npu.device._importable", lambda module: module != "triton")
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
    assert uses_channels_last(None, "npu", amp=False) is False


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


@pytest.mark.slow  # 3 subprocesses, ~11 s; the import-order checks below cover it statically
def test_installed_torch_npu_without_cann_does_not_break_cpu(tmp_path):
    """torch autoloads an installed torch_npu on import; ssd_npu switches that off first."""
    broken = 'raise ImportError("libhccl.so: cannot open shared object file: No such file")\n'
    site = fake_site(tmp_path, broken, entry_point=True)
    bare = run_python(site, "import torch")
    assert bare.returncode != 0 and "libhccl.so" in bare.stderr  # the trap is real
    ours = run_python(
        site, "import ssd_npu; import torch; from ssd_npu.device import resolve_device; "
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
