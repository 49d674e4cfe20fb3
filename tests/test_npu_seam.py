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

import pytest
import torch

from ssd_npu.device import import_torch_npu, npu_pair_mismatch, release_of
from ssd_npu.errors import DeviceError
from tests.helpers import REPO

FAKE_TORCH_NPU = """
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
"""

SEAM_SCRIPT = """
import json, os, sys
import ssd_npu  # sets TORCH_DEVICE_BACKEND_AUTOLOAD=0 before torch
import torch
import torch.distributed as dist
from ssd_npu import distributed
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
dev.grad_scaler(True)
dev.synchronize()
print(json.dumps({
    "calls": torch_npu.CALLS, "backend": seen["backend"], "world": [world.rank, world.size],
    "device": str(dev.torch), "compile_backend": dev.compile_backend,
    "autocast_dtype": str(autocast_device), "amp_dtype": str(dev.amp_dtype()),
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


def run_python(site: Path, code: str, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TORCH_DEVICE_BACKEND_AUTOLOAD"}
    env["PYTHONPATH"] = f"{site}{os.pathsep}{REPO}"
    return subprocess.run(
        [sys.executable, *(["-c", code] if code else []), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("jit", [False, True])
def test_npu_device_uses_torch_npu_as_documented(tmp_path, jit):
    site = fake_site(tmp_path, FAKE_TORCH_NPU)
    proc = run_python(site, SEAM_SCRIPT.replace("JIT", str(jit)))
    assert proc.returncode == 0, proc.stderr[-2000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["calls"][:2] == [["set_device", "npu:1"], ["set_compile_mode", jit]]
    assert ["GradScaler"] in seen["calls"] and ["synchronize"] in seen["calls"]
    assert seen["backend"] == "hccl" and seen["world"] == [1, 2]
    assert seen["device"] == "npu:1" and seen["compile_backend"] == "npu"
    assert seen["autocast_dtype"] == "torch.float16" == seen["amp_dtype"]


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
