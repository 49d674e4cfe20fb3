"""The `train.py` / `ssd-npu-train` entry, and what every Hydra entry (scripts/) shares: the
run folder, and user errors as one line on stderr with an exit status (2: a bad value,
130/143: stopped by a signal) instead of a traceback."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

import hydra
from omegaconf import DictConfig

from ssd_npu.config import config_dir, expand_short_forms, register_configs
from ssd_npu.errors import UserError

register_configs()


def run_folder(cfg: DictConfig) -> Path:
    """`cfg.out_dir`, set to Hydra's run folder (hydra.run.dir) when not given."""
    if cfg.out_dir is None:
        from hydra.core.hydra_config import HydraConfig

        cfg.out_dir = HydraConfig.get().runtime.output_dir
    return Path(cfg.out_dir)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Print a UserError's message (it says what to do) and exit with its status."""
    try:
        yield
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)


def expand_argv() -> None:
    """Spell out the command line's short forms (`eval=false` is `eval.enabled=false`) before
    Hydra parses it; every Hydra entry calls this first."""
    sys.argv[1:] = expand_short_forms(sys.argv[1:])


def main() -> None:
    """`python train.py` / `ssd-npu-train`: train (or evaluate) as the overrides say."""
    expand_argv()
    train_main()


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
def train_main(cfg: DictConfig) -> None:
    from ssd_npu.device.distributed import shutdown
    from ssd_npu.train import run

    run_folder(cfg)
    try:
        with user_errors():
            run(cfg)
    finally:
        shutdown()  # leave torchrun's process group cleanly
