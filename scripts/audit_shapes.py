"""Find the dynamic shapes: record the aten ops of real training steps, report what varies.

Usage:
    python scripts/audit_shapes.py [shape=fixed|dynamic] [audit.steps=6] [audit.out=PATH]
        [audit.fail_on_dynamic=true] [audit.target=train|eval] [eval.postprocess=device|host]
        [any train.py override: canvas=[H,W] batch_size=4 ...]

A thin user of `ssd_npu.find_dynamic_shapes` (which audits any step function: see the README).
Runs `audit.steps` steps of the pipeline exactly as `python train.py` with the same overrides
would (forward, loss, backward, optimizer step), prints the ops whose shapes change between
steps and the ops that force a device-to-host sync, each with its source line, and writes
`dynamic_shapes.json` into the run folder (or to `audit.out`). Exit status: 0; with
`audit.fail_on_dynamic=true`, 1 when any dynamic op or in-step host sync was found; 2 on a
bad config value.

`audit.target=eval` records `audit.steps` val batches of the evaluation forward instead:
with `eval.postprocess=device` the network and the fixed postprocess (0 dynamic ops, 0 host
syncs expected), with `eval.postprocess=host` the network and torchvision's own postprocess.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from ssd_npu.cli import expand_argv, run_folder, user_errors  # noqa: E402
from ssd_npu.config import config_dir  # noqa: E402


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="audit")
def main(cfg: DictConfig) -> None:
    from ssd_npu.tools.audit import run_audit

    out_dir = run_folder(cfg)
    with user_errors():
        report = run_audit(cfg)
    path = report.save(cfg.audit.out or out_dir / "dynamic_shapes.json")
    print(report)
    print(f"\nreport: {path}")
    if cfg.audit.fail_on_dynamic and (report.dynamic_ops or report.host_syncs):
        sys.exit(1)


if __name__ == "__main__":
    expand_argv()
    main()
