"""The one place that knows cpu / cuda / npu.

`resolve_device(name, index, jit_compile)` parses the name, imports the backend (torch_npu
for `npu`), checks it works, and fails with a message that says what to do. Nothing falls
back to another device silently: `auto` is the only name that chooses, and it says what
it chose.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import re
from dataclasses import dataclass
from time import perf_counter

import torch
from torch import Tensor

from ssd_npu.errors import DeviceError

_CANN_ENV = "source /usr/local/Ascend/ascend-toolkit/set_env.sh"
_NPU_REQUIREMENTS = (
    "pip install -r requirements-npu.txt (the CPU build of torch 2.14.0, torch-npu 2.14.0, "
    "torchvision 0.29.0; docs/npu.md lists other released pairs)"
)


class Mark:
    """A point in the device's queue, for timing without waiting: a timing event recorded on
    the current stream (cuda / npu), or a wall-clock stamp on the cpu, where ops run at once.
    """

    def __init__(self, device_type: str) -> None:
        self.event = None
        self.time = perf_counter()
        if device_type in ("cuda", "npu"):
            self.event = getattr(torch, device_type).Event(enable_timing=True)
            self.event.record()

    def wait(self) -> None:
        """Block the host until the device has passed this mark."""
        if self.event is not None:
            self.event.synchronize()

    def ms_since(self, start: Mark) -> float:
        """Device time from `start` to this mark in ms (waits for this mark)."""
        self.wait()
        if self.event is not None and start.event is not None:
            return float(start.event.elapsed_time(self.event))
        return (self.time - start.time) * 1000.0


class HostCopy:
    """A device tensor copied to the host without waiting; `values()` waits for that copy only
    (the device may already run later work), then returns the numbers."""

    def __init__(self, tensor: Tensor, device_type: str) -> None:
        self.tensor = tensor.detach().to("cpu", non_blocking=device_type != "cpu")
        self.ready = Mark(device_type)

    def values(self) -> list[float]:
        self.ready.wait()
        return self.tensor.tolist()


@dataclass(frozen=True)
class Device:
    """A resolved device: `type` is cpu | cuda | npu; `torch` is the torch.device."""

    type: str
    index: int | None

    @property
    def torch(self) -> torch.device:
        return torch.device(self.type if self.index is None else f"{self.type}:{self.index}")

    def synchronize(self) -> None:
        """Wait for queued device work, so a clock read after it measures the work."""
        if self.type == "cuda":
            torch.cuda.synchronize(self.torch)
        elif self.type == "npu":
            torch.npu.synchronize()

    def mark(self) -> Mark:
        """A timing mark at this point of the device's queue (see `Mark`)."""
        return Mark(self.type)

    def to_host(self, tensor: Tensor) -> HostCopy:
        """Start copying `tensor` to the host; read it later with `.values()`."""
        return HostCopy(tensor, self.type)

    @property
    def pin_memory(self) -> bool:
        """Whether host batches should be pinned (page-locked) for asynchronous copies."""
        return self.type in ("cuda", "npu")

    def amp_dtype(self, name: str | None = None) -> torch.dtype:
        """Autocast dtype: `name` (bf16 | fp16), or the device's default (cpu bf16, else fp16)."""
        if name is None:
            return torch.bfloat16 if self.type == "cpu" else torch.float16
        return {"bf16": torch.bfloat16, "fp16": torch.float16}[name]

    def autocast(self, enabled: bool, dtype: str | None = None):
        """Mixed precision for the network (the fixed loss stays fp32: see engine.py)."""
        if not enabled:
            return contextlib.nullcontext()
        return torch.autocast(self.type, dtype=self.amp_dtype(dtype))

    def grad_scaler(self, enabled: bool, dtype: str | None = None):
        """A GradScaler where the autocast dtype needs one (fp16), else None.

        fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none.
        On the NPU the scaler is torch_npu's own (`torch_npu.npu.amp.GradScaler`).
        """
        if not enabled or self.amp_dtype(dtype) != torch.float16:
            return None
        if self.type == "npu":
            return import_torch_npu().npu.amp.GradScaler()
        return torch.amp.GradScaler(self.type)

    def profiler(self, out_dir: str, steps: int):
        """A profiler over `steps` steps (after 1 wait + 1 warm-up step) writing a trace that
        TensorBoard's profiler plugin reads: torch_npu.profiler on npu, torch.profiler else.
        Call `.step()` after every training step."""
        prof_mod = import_torch_npu().profiler if self.type == "npu" else torch.profiler
        activities = [prof_mod.ProfilerActivity.CPU]
        if self.type == "cuda":
            activities.append(prof_mod.ProfilerActivity.CUDA)
        elif self.type == "npu":
            activities.append(prof_mod.ProfilerActivity.NPU)
        return prof_mod.profile(
            activities=activities,
            schedule=prof_mod.schedule(wait=1, warmup=1, active=steps, repeat=1),
            on_trace_ready=prof_mod.tensorboard_trace_handler(out_dir),
            record_shapes=True,
        )

    @property
    def dist_backend(self) -> str:
        return {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}[self.type]

    @property
    def compile_backend(self) -> str:
        """torch.compile backend: torch_npu registers "npu"; inductor elsewhere."""
        return "npu" if self.type == "npu" else "inductor"


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
                f"reinstall with {_NPU_REQUIREMENTS}."
            ) from err
        raise DeviceError(
            "device=npu needs torch_npu, which is not installed here. On an Ascend host: "
            f"{_NPU_REQUIREMENTS}, then `{_CANN_ENV}` in the same shell. "
            "Without an NPU use device=cpu, device=cuda or device=auto."
        ) from err
    except RuntimeError as err:
        # torch_npu's own check at import: torch was built for another accelerator (cuda)
        if "Two accelerators" not in str(err):
            raise
        raise DeviceError(
            f"device=npu: torch {torch.__version__} is a CUDA build, and torch_npu refuses to "
            "load beside another accelerator. torch_npu needs the CPU build of torch: "
            f"pip uninstall -y torch torchvision, then {_NPU_REQUIREMENTS} (on x86_64 it takes "
            "torch from https://download.pytorch.org/whl/cpu)."
        ) from err
    except (ImportError, OSError) as err:
        text = str(err)
        if any(lib in text for lib in ("libhccl", "libascendcl", "libascend", "libge_runner")):
            raise DeviceError(
                f"device=npu: torch_npu cannot load the Ascend CANN libraries ({text}). "
                f"Run `{_CANN_ENV}` in this shell (or your CANN install's set_env.sh), then retry."
            ) from err
        if torch.version.cuda is not None:
            raise DeviceError(
                f"device=npu: torch_npu failed to import beside a CUDA build of torch "
                f"({torch.__version__}): {text}. torch_npu needs the CPU build: {_NPU_REQUIREMENTS}."
            ) from err
        raise DeviceError(f"device=npu: importing torch_npu failed: {text}.") from err
    mismatch = npu_pair_mismatch(getattr(torch_npu, "__version__", ""), torch.__version__)
    if mismatch is not None:
        raise DeviceError(
            f"device=npu: {mismatch}, but torch {torch.__version__} is installed; "
            f"{_NPU_REQUIREMENTS}."
        )
    return torch_npu


def cudnn_benchmark(device_type: str, static_shapes: bool) -> bool:
    """Whether cuDNN should time its convolution algorithms and keep the fastest
    (`torch.backends.cudnn.benchmark`): on cuda when every shape is static (the fixed path),
    so the timing is paid once. Off for the dynamic path: each new shape would be timed anew."""
    return device_type == "cuda" and static_shapes


def use_deterministic_kernels() -> None:
    """`device.deterministic=true`: kernels that give the same bits on every run
    (`torch.use_deterministic_algorithms`, cuDNN's deterministic algorithms, cuBLAS with a
    fixed workspace), so a resumed run repeats an uninterrupted one exactly on a GPU. Without
    it, atomics in a few backward kernels change the last bits from run to run, and the
    hard-negative mining of the SSD loss turns those bits into visibly different losses
    within a few steps. Costs speed; ops with no deterministic kernel warn (warn_only)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before the first cuBLAS call
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True


def _local_rank_index(index: int | None) -> int:
    return int(os.environ.get("LOCAL_RANK", 0)) if index is None else index


def resolve_device(name: str, index: int | None = None, jit_compile: bool = False) -> Device:
    """Parse and set up a device. `auto` picks cuda, then npu (if torch_npu is installed), then cpu."""
    if name == "auto":
        if torch.cuda.is_available():
            return resolve_device("cuda", index)
        if importlib.util.find_spec("torch_npu") is not None:
            return resolve_device("npu", index, jit_compile)
        return Device("cpu", None)
    if name == "cpu":
        return Device("cpu", None)
    if name == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(
                "device=cuda: no CUDA GPU is visible to torch "
                f"(torch {torch.__version__}, built for CUDA {torch.version.cuda}). "
                "Check nvidia-smi and CUDA_VISIBLE_DEVICES, or use device=cpu / device=auto."
            )
        device = Device("cuda", _local_rank_index(index))
        torch.cuda.set_device(device.torch)
        return device
    if name == "npu":
        import_torch_npu()
        if not torch.npu.is_available():
            raise DeviceError(
                "device=npu: torch_npu is installed but sees no NPU. Check `npu-smi info`, "
                f"ASCEND_RT_VISIBLE_DEVICES and that `{_CANN_ENV}` was run in this shell."
            )
        device = Device("npu", _local_rank_index(index))
        torch.npu.set_device(device.torch)
        # False: binary (precompiled) kernels, no online compile for each new shape.
        torch.npu.set_compile_mode(jit_compile=jit_compile)
        return device
    raise DeviceError(f"device={name!r} is not valid; choose one of: auto, cpu, cuda, npu.")
