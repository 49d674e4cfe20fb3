"""Shared fixtures: a tiny synthetic COCO-format data set, generated once per session, and
`tiny_cfg`, tiny CPU configs on it."""

from __future__ import annotations

from pathlib import Path

import pytest

from ssd_npu.data.synthetic import make_synthetic_coco
from tests.helpers import TinyCfg


@pytest.fixture(scope="session")
def tiny_coco(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Root of a 12-train / 6-val synthetic COCO set (seed 0); treat it as read-only."""
    return make_synthetic_coco(
        tmp_path_factory.mktemp("tiny_coco"), num_train=12, num_val=6, seed=0
    )


@pytest.fixture
def tiny_cfg(tiny_coco: Path, tmp_path: Path) -> TinyCfg:
    """Tiny CPU configs on `tiny_coco`: `tiny_cfg(*overrides, out=None, config="train")`
    composes one with `out_dir=out or tmp_path` (see TinyCfg)."""
    return TinyCfg(tiny_coco, tmp_path)
