"""The one place that knows cpu / cuda / npu.

`resolve_device(name, index, jit_compile)` parses the name, imports the backend (torch_npu
for `npu`, through `ssd_npu.device.ascend`), checks it works, and fails with a message that
says what to do. Nothing falls back to another device silently: `auto` is the only name that chooses, and it says what
it chose. The rest of the package asks the `Device` (streams, events, the generator, DDP's
ids, the defaults that differ per device) and never names a device type itself
(tests/test_device_seam.py), so a new device type is added here.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from dataclasses import dataclass
from time import perf_counter
from types import ModuleType

import torch
from torch import Tensor

from ssd_npu.device.ascend import CANN_ENV, import_torch_npu, import_torchvision_npu
from ssd_npu.errors import DeviceError


class Mark:
    """A point in the device's queue, for timing without waiting: a timing event recorded on
    the current stream (an accelerator), or a wall-clock stamp on the cpu, where ops run at once.
    """

    def __init__(self, device: Device) -> None:
        self.event: torch.Event | None = None
        self.time = perf_counter()
        if device.is_accelerator:
            self.event = device.event(timing=True)
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

    def __init__(self, tensor: Tensor, device: Device) -> None:
        self.tensor = tensor.detach().to("cpu", non_blocking=device.is_accelerator)
        self.ready = Mark(device)

    def values(self) -> list[float]:
        self.ready.wait()
        return self.tensor.tolist()


_NPU_FP16_NOTE = (
    "amp fp16 on npu: torch_npu's GradScaler reads the device twice per step (its inf check), "
    "a host sync every step; amp_dtype=bf16 needs no scaler (Ascend 910B and later)"
)


@dataclass(frozen=True)
class Device:
    """A resolved device: `type` is cpu | cuda | npu; `torch` is the torch.device.

    `amp_default`: the autocast dtype when `amp_dtype` is not given (bf16 | fp16); None: the
    type's own (bf16 on cpu, fp16 on cuda). `resolve_device` asks the NPU once (bf16 from
    Ascend 910B on), so no compiled step ever calls into torch_npu to choose a dtype.
    """

    type: str
    index: int | None
    amp_default: str | None = None

    @classmethod
    def of(cls, where: torch.device | None) -> Device:
        """The Device a tensor lives on (`tensor.device`). None, a call without tensors: cuda,
        whose graph trees torch's own CUDA-graph call marks (as before devices were told apart).
        """
        if where is None:
            return cls("cuda", None)
        return cls(where.type, where.index)

    @property
    def torch(self) -> torch.device:
        return torch.device(self.type if self.index is None else f"{self.type}:{self.index}")

    @property
    def is_accelerator(self) -> bool:
        """A device with its own queue and memory (cuda, npu): its work is queued behind the
        host's back, copies to it can overlap a step, and the host must wait to read. False
        on the cpu, where every op has run when it returns."""
        return self.type != "cpu"

    @property
    def _backend(self) -> ModuleType:
        """torch's module of this device type: `torch.cuda`, or `torch.npu` (torch_npu's, once
        imported). Both offer the same streams, events, synchronize and generator calls."""
        if not self.is_accelerator:
            raise DeviceError(f"device={self.type} has no streams, events or generator of its own.")
        return getattr(torch, self.type)

    def _on_this(self) -> dict[str, int]:
        """The `device=` argument of the backend's calls: this device's index, or nothing (the
        current device) where none was given."""
        return {} if self.index is None else {"device": self.index}

    # --- the queue: waits, timing, streams, events ------------------------------------------

    def synchronize(self) -> None:
        """Wait for queued device work, so a clock read after it measures the work."""
        if self.is_accelerator:
            self._backend.synchronize(**self._on_this())

    def mark(self) -> Mark:
        """A timing mark at this point of the device's queue (see `Mark`)."""
        return Mark(self)

    def to_host(self, tensor: Tensor) -> HostCopy:
        """Start copying `tensor` to the host; read it later with `.values()`."""
        return HostCopy(tensor, self)

    def event(self, timing: bool = False) -> torch.Event:
        """A new event of this accelerator (`timing`: one `elapsed_time` can measure from)."""
        return self._backend.Event(enable_timing=True) if timing else self._backend.Event()

    def stream(self) -> torch.Stream:
        """A new side stream of this accelerator, e.g. for copies beside the step's stream."""
        return self._backend.Stream(**self._on_this())

    def current_stream(self) -> torch.Stream:
        """The stream this device's ops are queued on now (the step's stream)."""
        return self._backend.current_stream(**self._on_this())

    def on_stream(self, stream: torch.Stream) -> contextlib.AbstractContextManager:
        """A context whose ops this device queues on `stream` instead of the current one."""
        return self._backend.stream(stream)

    def record_stream(self, tensor: Tensor, stream: torch.Stream) -> Tensor:
        """Tie `tensor`'s memory to `stream`, so the caching allocator does not hand it out
        again before the work queued on `stream` so far has run; returns `tensor`."""
        tensor.record_stream(stream)
        return tensor

    def mark_step_begin(self) -> None:
        """The step boundary: a new training iteration begins. Here the graph trees learn that
        the previous replay's outputs may be overwritten (compile modes with device graphs):
        torch_npu's NPU graph trees on npu, torch's CUDA graph trees elsewhere (a no-op where
        nothing was captured). A lazy-tensor device (XLA-like) would cut and run its traced
        graph here (its `mark_step`)."""
        if self.type == "npu":
            torch.compiler.npugraph_mark_step_begin()
        else:
            torch.compiler.cudagraph_mark_step_begin()

    # --- the generator -------------------------------------------------------------------

    def rng_state(self) -> Tensor | None:
        """This device's generator state (a cpu uint8 tensor), for a checkpoint; None on the
        cpu, whose generator is torch's own (`torch.get_rng_state`)."""
        if not self.is_accelerator:
            return None
        return self._backend.get_rng_state(**self._on_this())

    def set_rng_state(self, state: Tensor) -> None:
        """Restore this device's generator from `rng_state()`'s tensor (no-op on the cpu)."""
        if self.is_accelerator:
            self._backend.set_rng_state(state, **self._on_this())

    # --- what the build asks of a device type ------------------------------------------

    @property
    def pin_memory(self) -> bool:
        """Whether host batches should be pinned (page-locked) for asynchronous copies."""
        return self.is_accelerator

    @property
    def auto_place(self) -> str:
        """Where `auto` puts per-batch work either side can do (`data.augment_on`,
        `eval.postprocess`): "device" on an accelerator, where the host's per-image work is
        the bottleneck and the host postprocess copies every head output (docs/bench.md);
        "host" on the cpu, where the workers run beside the step on other cores and both
        sides are the same processor."""
        return "device" if self.is_accelerator else "host"

    @property
    def ddp_device_ids(self) -> list[int] | None:
        """DistributedDataParallel's `device_ids`: this rank's device; None on the cpu (DDP
        takes no device ids for cpu modules)."""
        return [self.index] if self.is_accelerator and self.index is not None else None

    @property
    def process_group_device(self) -> torch.device | None:
        """The device `init_process_group` binds the group to (`device_id`), so NCCL / HCCL
        connect at once and fail there, not at the first step; None on the cpu (torch wants an
        accelerator with an index there)."""
        return self.torch if self.is_accelerator else None

    @property
    def fused_sgd_with_scaler(self) -> bool:
        """Whether this device's fused SGD takes GradScaler's inf check as a tensor (no host
        read per step): cuda; torch_npu's fused SGD is unproven (optim.use_fused_sgd)."""
        return self.type == "cuda"

    def cudnn_benchmark(self, static_shapes: bool, setting: bool | None = None) -> bool:
        """Whether cuDNN should time its convolution algorithms and keep the fastest
        (`torch.backends.cudnn.benchmark`). `setting` (device.cudnn_benchmark) decides where
        given; None: on cuda when every shape is static (the fixed path), so the timing is paid
        once, and off for the dynamic path, where each new shape would be timed anew. Off
        where there is no cuDNN, whatever the setting."""
        if self.type != "cuda":
            return False
        return static_shapes if setting is None else setting

    def tune_convolutions(
        self, static_shapes: bool, deterministic: bool, setting: bool | None = None
    ) -> None:
        """Set cuDNN's algorithm search for this run (`cudnn_benchmark`); off with
        `device.deterministic`, whose kernels must not be chosen by timing."""
        search = self.cudnn_benchmark(static_shapes, setting)
        torch.backends.cudnn.benchmark = search and not deterministic

    @property
    def decodes_jpeg(self) -> bool:
        """Whether `data.decode=device` can decode a batch's JPEGs here (torchcodec): nvJPEG on
        cuda, libjpeg-turbo on the cpu. Not on npu yet: Ascend's DVPP decoder comes with
        torchvision_npu, which this project does not drive."""
        return self.type in ("cpu", "cuda")

    def channels_last_default(self, amp: bool) -> bool:
        """`device.channels_last=null`: on for fp32 training on the cpu, where oneDNN's
        channels-last step of ssdlite320 is about 1.45x faster (docs/bench.md). Off under amp:
        with bf16 autocast on the cpu, channels-last weights diverged within 18 steps in
        tests/test_train.py where NCHW weights did not. cuda and npu keep the layout
        torchvision gives (npu refuses channels-last: config.check_channels_last)."""
        return self.type == "cpu" and not amp

    def amp_name(self, name: str | None = None) -> str:
        """The autocast dtype's name: `name` (bf16 | fp16), else `amp_default`, else bf16 on
        the cpu (its autocast dtype) and fp16 on cuda / an NPU that did not say bf16."""
        return name or self.amp_default or ("bf16" if self.type == "cpu" else "fp16")

    def amp_dtype(self, name: str | None = None) -> torch.dtype:
        """Autocast dtype: `name` (bf16 | fp16), or the device's default (`amp_name`)."""
        return {"bf16": torch.bfloat16, "fp16": torch.float16}[self.amp_name(name)]

    def amp_note(self, enabled: bool, name: str | None = None) -> str | None:
        """What this amp setting costs that a user would not guess, for the banner and
        summary.json: fp16 on npu keeps torch_npu's GradScaler, whose inf check is read on
        the host every step (on cuda a fused SGD takes it as a tensor). None: nothing to say."""
        if enabled and self.type == "npu" and self.amp_name(name) == "fp16":
            return _NPU_FP16_NOTE
        return None

    def autocast(self, enabled: bool, dtype: str | None = None):
        """Mixed precision for the network (the fixed loss stays fp32: `engine/train_step.py`)."""
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
        """torch.compile's backend when `compiler.backend` is not given: inductor on every
        device. On npu that is inductor with triton-ascend, which Ascend lists first for
        training; torch_npu's own "npu" backend (torchair's GE graph mode) is meant mainly for
        inference and stays a choice (`compiler.backend=npu`)."""
        return "inductor"

    def require_compiler(self, backend: str) -> None:
        """Fail at start, not at the first compile minutes later, where the backend cannot
        generate code here: inductor on npu needs triton-ascend (the `triton` package), and
        torch_npu only warns at import when it is missing."""
        if self.type == "npu" and backend == "inductor" and not _importable("triton"):
            raise DeviceError(
                "compiler.backend=inductor on device=npu needs triton-ascend (inductor's code "
                "generator for the NPU), which is not installed: pip install triton-ascend, or "
                "set compiler.backend=npu (torchair's GE graph mode), or compile=false."
            )

    @property
    def dynamic_postprocess(self) -> str:
        """Where torchvision's own postprocess of `shape=dynamic` runs ("device" | "host"); on
        npu this imports torchvision_npu when it is installed (it registers the NPU kernels)."""
        return dynamic_postprocess_place(self.type, self.type == "npu" and import_torchvision_npu())


def _importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


CPU = Device("cpu", None)
"""The host as a device: where nothing is queued (tests, tools, and `shape_path`'s default)."""


def dynamic_postprocess_place(device_type: str, torchvision_npu: bool) -> str:
    """Where torchvision's postprocess (box decoding, score threshold, top-k, NMS) of the
    dynamic path runs: "host" on npu without torchvision_npu, since torchvision's nms has no
    NPU kernel of its own (pytorch/vision#6725); "device" everywhere else."""
    return "host" if device_type == "npu" and not torchvision_npu else "device"


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
                f"ASCEND_RT_VISIBLE_DEVICES and that `{CANN_ENV}` was run in this shell."
            )
        index = _local_rank_index(index)
        torch.npu.set_device(Device("npu", index).torch)
        # False: binary (precompiled) kernels, no online compile for each new shape.
        torch.npu.set_compile_mode(jit_compile=jit_compile)
        # asked once, after set_device: the chip of this rank
        return Device("npu", index, "bf16" if torch.npu.is_bf16_supported() else "fp16")
    raise DeviceError(f"device={name!r} is not valid; choose one of: auto, cpu, cuda, npu.")
