"""Checkpoints written atomically: a crash or kill never leaves a half-written newest file."""

from __future__ import annotations

import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ssd_npu.engine import Progress
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


def rng_state() -> dict[str, Any]:
    """python, numpy and torch RNG states, as plain lists and tensors (weights_only-safe)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [name, keys.tolist(), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(tuple(tuple(s) if isinstance(s, list) else s for s in state["python"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class TrainState:
    """What a checkpoint holds, so `resume` continues exactly: weights, optimizer, schedule,
    scaler, RNG states, the position (`Progress`) and the resolved config (for the reader)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None
    config: dict[str, Any]

    def to_dict(self, progress: Progress) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "progress": asdict(progress),
            "config": self.config,
            "rng": rng_state(),
        }

    def load(self, state: dict[str, Any]) -> Progress:
        """Load a `to_dict` into the built objects; return where to continue."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        return Progress(**state["progress"])
