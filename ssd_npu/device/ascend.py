"""Ascend specifics: importing torch_npu (and torchvision_npu) and checking its pairing.

Each known failure of `import torch_npu` (not installed, CANN's libraries not sourced, a CUDA
build of torch, a torch release it does not pair with) becomes one message that says what to
do. `ssd_npu.device.backend` calls these when `device=npu` asks for the NPU.
"""

from __future__ import annotations

import importlib
import re

import torch

from ssd_npu.errors import DeviceError

CANN_ENV = "source /usr/local/Ascend/ascend-toolkit/set_env.sh"
NPU_REQUIREMENTS = (
    "pip install -r requirements-npu.txt (the CPU build of torch 2.14.0, torch-npu 2.14.0, "
    "torchvision 0.29.0; docs/npu.md lists other released pairs)"
)


def import_torchvision_npu() -> bool:
    """Import torchvision_npu (Ascend's kernels for torchvision's ops); False when it is not
    installed. A torchvision_npu that is installed but fails to import raises: a broken
    install should be seen, not quietly evaluated on the host."""
    try:
        importlib.import_module("torchvision_npu")
    except ModuleNotFoundError as err:
        if err.name != "torchvision_npu":
            raise
        return False
    return True


def release_of(version: str) -> tuple[int, int, int] | None:
    """The X.Y.Z release of a torch or torch_npu version string, the part their pairing is
    about: local labels (`+cpu`, `+git6b88d20`) and post-releases (`.post3`) stripped, as
    torch_npu's own requirement reads (torch_npu 2.12.0.post3 requires torch==2.12.0; 2.14.0
    requires torch==2.14.0.*). None when the string has no X.Y.Z at its start."""
    match = re.match(r"(\d+)\.(\d+)\.(\d+)", version.strip())
    return None if match is None else (int(match[1]), int(match[2]), int(match[3]))


def npu_pair_mismatch(npu_version: str, torch_version: str) -> str | None:
    """A sentence saying why torch_npu `npu_version` cannot run on torch `torch_version`, or
    None when they pair (same X.Y.Z release; see `release_of`)."""
    npu_release, torch_release = release_of(npu_version), release_of(torch_version)
    if npu_release is None or npu_release == torch_release:
        return None  # an unversioned (source) build: torch_npu's own import checks it
    wanted = ".".join(map(str, npu_release))
    return f"torch_npu {npu_version} needs torch {wanted} (any {wanted} build: +cpu, .postN)"


def import_torch_npu():
    """Import torch_npu, turning each known failure into a message that says what to do."""
    try:
        torch_npu = importlib.import_module("torch_npu")
    except ModuleNotFoundError as err:
        if err.name != "torch_npu":
            raise DeviceError(
                f"device=npu: torch_npu is installed but its dependency {err.name!r} is missing; "
                f"reinstall with {NPU_REQUIREMENTS}."
            ) from err
        raise DeviceError(
            "device=npu needs torch_npu, which is not installed here. On an Ascend host: "
            f"{NPU_REQUIREMENTS}, then `{CANN_ENV}` in the same shell. "
            "Without an NPU use device=cpu, device=cuda or device=auto."
        ) from err
    except RuntimeError as err:
        # torch_npu's own check at import: torch was built for another accelerator (cuda)
        if "Two accelerators" not in str(err):
            raise
        raise DeviceError(
            f"device=npu: torch {torch.__version__} is a CUDA build, and torch_npu refuses to "
            "load beside another accelerator. torch_npu needs the CPU build of torch: "
            f"pip uninstall -y torch torchvision, then {NPU_REQUIREMENTS} (on x86_64 it takes "
            "torch from https://download.pytorch.org/whl/cpu)."
        ) from err
    except (ImportError, OSError) as err:
        text = str(err)
        if any(lib in text for lib in ("libhccl", "libascendcl", "libascend", "libge_runner")):
            raise DeviceError(
                f"device=npu: torch_npu cannot load the Ascend CANN libraries ({text}). "
                f"Run `{CANN_ENV}` in this shell (or your CANN install's set_env.sh), then retry."
            ) from err
        if torch.version.cuda is not None:
            raise DeviceError(
                f"device=npu: torch_npu failed to import beside a CUDA build of torch "
                f"({torch.__version__}): {text}. torch_npu needs the CPU build: {NPU_REQUIREMENTS}."
            ) from err
        raise DeviceError(f"device=npu: importing torch_npu failed: {text}.") from err
    mismatch = npu_pair_mismatch(getattr(torch_npu, "__version__", ""), torch.__version__)
    if mismatch is not None:
        raise DeviceError(
            f"device=npu: {mismatch}, but torch {torch.__version__} is installed; "
            f"{NPU_REQUIREMENTS}."
        )
    return torch_npu
