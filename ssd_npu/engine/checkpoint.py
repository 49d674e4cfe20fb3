"""Checkpoints written atomically: a crash or kill never leaves a half-written newest file."""

from __future__ import annotations

import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ssd_npu.device import distributed
from ssd_npu.device.backend import Device
from ssd_npu.engine.ema import WeightAverage
from ssd_npu.engine.loop import Progress
from ssd_npu.errors import UserError


def save_atomic(obj: Any, path: str | Path) -> Path:
    """torch.save to a temporary file beside `path`, fsync it, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)
    return path


STEP_PATTERN = "step_*.pt"


def checkpoint_path(folder: str | Path, step: int) -> Path:
    return Path(folder) / f"step_{step:07d}.pt"


def list_checkpoints(folder: str | Path) -> list[Path]:
    """Complete checkpoints in `folder`, oldest first (temporary files are never listed)."""
    return sorted(Path(folder).glob(STEP_PATTERN))


def save_checkpoint(obj: Any, folder: str | Path, step: int, keep: int) -> Path:
    """Write `step_<step>.pt` atomically, then delete all but the newest `keep`."""
    path = save_atomic(obj, checkpoint_path(folder, step))
    for old in list_checkpoints(folder)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
    return path


def find_resume(resume: str, folder: str | Path) -> Path:
    """`resume=auto`: the newest checkpoint in `folder`; otherwise `resume` is a path."""
    if resume == "auto":
        found = list_checkpoints(folder)
        if not found:
            raise UserError(
                f"resume=auto found no checkpoint in {folder}; run with hydra.run.dir=<the old "
                "run folder>, or give resume=/path/to/step_XXXXXXX.pt."
            )
        return found[-1]
    path = Path(resume)
    if not path.is_file():
        raise UserError(f"resume={resume}: no such file; give a checkpoint path or resume=auto.")
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint (tensors and plain containers only: weights_only=True)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated or foreign file: say which, not a deep traceback
        raise UserError(f"{path} cannot be read as an ssd-npu checkpoint ({err}).") from err


RngState = dict[str, Any]
"""One process's RNG states: `python` (random.getstate()), `numpy` (list), `torch` (the cpu
generator, uint8 [N]) and, on an accelerator, the generator of the device this rank works on
under its type's name (`cuda`: uint8 [16]; `npu`: torch_npu's state; `Device.rng_state`).
Plain lists and CPU uint8 tensors, so a checkpoint loads with weights_only=True."""


def rng_state(device: Device) -> RngState:
    """This process's RNG states (see `RngState`) on `device`."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: RngState = {
        "python": random.getstate(),
        "numpy": [name, keys.tolist(), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    # Only the generator of the device this rank works on: one state, whatever the device count.
    generator = device.rng_state()
    if generator is not None:
        state[device.type] = generator
    return state


def gather_rng_states(device: Device) -> list[RngState] | None:
    """Every rank's `rng_state(device)` on rank 0, as a list indexed by rank (None on the
    others; [rng_state(device)] in a world of one). A collective: every rank must call it at
    the same point.
    """
    return distributed.gather_to_main(rng_state(device))


def _rank_and_size() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _entries(saved: list[RngState] | dict[str, Any], device: Device) -> list[RngState]:
    """A checkpoint's `rng` as a list indexed by rank. An older checkpoint holds one dict
    (rank 0's states, `cuda` a list of one state per visible GPU): a list of one, whose device
    state is the one of `device`'s index (what `set_rng_state_all` restored there).
    """
    if isinstance(saved, list):
        return saved
    entry = {k: saved[k] for k in ("python", "numpy", "torch")}
    per_device, index = saved.get(device.type) or [], device.index
    if index is not None and index < len(per_device):
        entry[device.type] = per_device[index]
    return [entry]


def _restore(entry: RngState, device: Device) -> None:
    random.setstate(tuple(tuple(s) if isinstance(s, list) else s for s in entry["python"]))
    name, keys, pos, has_gauss, cached = entry["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(entry["torch"])
    # a generator of another device type (a cuda checkpoint on npu or cpu) is left as seeded
    if device.type in entry:
        device.set_rng_state(entry[device.type])


def set_rng_state(saved: list[RngState] | dict[str, Any], device: Device) -> None:
    """Restore this rank's RNG states on `device` from a checkpoint's `rng` (every rank calls
    it).

    Rule: rank r restores entry r, the states rank r saved, if the checkpoint has one. With
    the world size it was written with, every rank continues exactly. With fewer ranks now,
    each rank takes the states of the rank of the same number; with more, the ranks past the
    list keep their seeded states (seed + rank). Either way rank 0 says so in one line. The
    device generator's state goes to this rank's device only, and only where the device is of
    the type that saved it: a checkpoint from any GPU count resumes on any other, or on the CPU.
    """
    entries = _entries(saved, device)
    rank, size = _rank_and_size()
    if size != len(entries) and rank == 0:
        print(
            f"ssd-npu: the checkpoint holds the RNG states of {len(entries)} rank(s), this run "
            f"has {size}: each rank below {min(size, len(entries))} restores those saved by its "
            "number, any other keeps its seeded ones (random draws differ from the old run's).",
            flush=True,
        )
    if rank < len(entries):
        _restore(entries[rank], device)


class Stateful(Protocol):
    """A hook whose state a checkpoint keeps (the evaluation history, the bucket counts), so
    that a resumed run's summary.json covers the whole run."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class TrainState:
    """What a checkpoint holds, so `resume` continues exactly: weights, optimizer, schedule,
    scaler, RNG states, the position (`Progress`), the resolved config (for the reader) and the
    state of the hooks `attach`ed (their state as it is when the checkpoint is written)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None
    config: dict[str, Any]
    device: Device  # whose generator the RNG states include
    ema: WeightAverage | None = None  # optim.ema: the weight average, saved as "ema"
    hooks: dict[str, Stateful] = field(default_factory=dict)
    # a resumed checkpoint's hook states, until `attach` hands them to the hooks
    loaded_hooks: dict[str, dict[str, Any]] = field(default_factory=dict)

    def attach(self, hooks: dict[str, Stateful]) -> None:
        """Keep these hooks' state in every checkpoint from now on; a resumed checkpoint's saved
        states (`load` ran first: the hooks are built after it) are loaded into them now."""
        self.hooks = hooks
        for name, hook in hooks.items():
            if name in self.loaded_hooks:
                hook.load_state_dict(self.loaded_hooks[name])

    def to_dict(self, progress: Progress, rng: list[RngState] | None = None) -> dict[str, Any]:
        """The checkpoint's contents. `rng`: every rank's states from `gather_rng_states()`
        (a collective every rank calls; rank 0 alone then calls this); None: this process's
        alone, for a world of one."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "progress": asdict(progress),
            "config": self.config,
            "rng": rng if rng is not None else [rng_state(self.device)],
            "hooks": {name: hook.state_dict() for name, hook in self.hooks.items()},
        } | ({"ema": self.ema.state_dict()} if self.ema is not None else {})

    def load(self, state: dict[str, Any]) -> Progress:
        """Load a `to_dict` into the built objects; return where to continue."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"], self.device)
        self.loaded_hooks = dict(state.get("hooks") or {})  # none in checkpoints made before
        # a checkpoint without an average (optim.ema newly set): it starts from these weights
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        return Progress(**state["progress"])
