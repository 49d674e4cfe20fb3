"""Train ssdlite320 with every device-side shape fixed (or the dynamic baseline).

Usage: python train.py [device=cpu|cuda|npu|auto] [canvas=[H,W]] [max_boxes=N] [fit=...]
       [shape=fixed|dynamic] [compile=true] [max_steps=N] [data=coco data.root=/path] ...
"""

import sys

import hydra
from omegaconf import DictConfig

from ssd_npu.config import register_configs
from ssd_npu.errors import UserError

register_configs()


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
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


if __name__ == "__main__":
    main()
