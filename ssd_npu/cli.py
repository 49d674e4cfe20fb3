"""The `train.py` / `ssd-npu-train` entry: compose the Hydra config, run, turn user errors into
one line on stderr and an exit status (2: a bad value, 130/143: stopped by a signal)."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from ssd_npu.config import config_dir, register_configs
from ssd_npu.errors import UserError

register_configs()


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from ssd_npu.distributed import shutdown
    from ssd_npu.train import run

    if cfg.out_dir is None:
        cfg.out_dir = HydraConfig.get().runtime.output_dir
    try:
        run(cfg)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    finally:
        shutdown()  # leave torchrun's process group cleanly
