"""The package as a library: installable, its public names, imports pointing one way, and the
README's own-loop example run as written."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PUBLIC = (
    "fixed_batched_nms",
    "fixed_ssd_loss",
    "FixedSSD",
    "FixedDetector",
    "build_detector",
    "fit_to_canvas",
    "unfit_boxes",
    "pad_targets",
    "FixSample",
    "FixedBatch",
    "collate_fixed",
    "find_dynamic_shapes",
    "SlotSample",
    "SlotBatch",
    "collate_slots",
    "DeviceAugment",
)


def _python(code: str, cwd: Path, env_path: str | None = None) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(cwd)}
    if env_path:
        env["PYTHONPATH"] = env_path
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_public_names_import_from_the_top_level():
    import ssd_npu

    for name in PUBLIC:
        assert getattr(ssd_npu, name) is not None, name
    assert sorted(ssd_npu.__all__) == sorted(PUBLIC)
    assert ssd_npu.FixedSSD is ssd_npu.FixedDetector  # the first name of the one class
    with pytest.raises(AttributeError):
        ssd_npu.no_such_name  # noqa: B018


@pytest.mark.slow
def test_pip_install_target_works_outside_the_checkout(tmp_path):
    """Build and install from a copy of the tracked files, import from another folder."""
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    src = tmp_path / "src"
    for name in tracked:
        if (REPO / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, src / name)
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(site), str(src)],
        check=True, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = f"""
import sys
sys.path[:0] = [{str(site)!r}] + {[p for p in sys.path if "site-packages" in p]!r}
import ssd_npu
from ssd_npu import {", ".join(PUBLIC)}
from ssd_npu.config import config_dir
assert ssd_npu.__file__.startswith({str(site)!r}), ssd_npu.__file__
assert config_dir().startswith({str(site)!r}), config_dir()
from hydra import compose, initialize_config_dir
from ssd_npu.config import register_configs
register_configs()
with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
    cfg = compose(config_name="train", overrides=["canvas=[256,256]", "device=cpu"])
print("ok", cfg.canvas, cfg.device.name)
"""
    result = _python(code, elsewhere)
    assert result.returncode == 0, result.stderr
    assert "ok [256, 256] cpu" in result.stdout
    assert (site / "bin" / "ssd-npu-train").is_file()


def test_training_input_path_imports_no_tool_compiler_or_model():
    code = """
import sys
import ssd_npu.data.loader, ssd_npu.data.buckets, ssd_npu.data.samplers, ssd_npu.data.transforms
import ssd_npu.data.fixed_shape, ssd_npu.data.coco, ssd_npu.data.dynamic, ssd_npu.data.synthetic
# (`import torchvision` itself loads torch._dynamo and its detection models: not ours to avoid)
bad = ("ssd_npu.tools", "ssd_npu.device.compiler", "ssd_npu.models.detector",
       "ssd_npu.engine.train_step", "ssd_npu.engine.loop", "ssd_npu.loss.ssd", "ssd_npu.build",
       "ssd_npu.train")
print(sorted(m for m in sys.modules if m.startswith(bad)))
"""
    result = _python(code, REPO, env_path=str(REPO))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_training_path_imports_no_tool():
    code = """
import sys
import ssd_npu.train, ssd_npu.build, ssd_npu.engine.loop, ssd_npu.engine.hooks
print(sorted(m for m in sys.modules if m.startswith("ssd_npu.tools")))
"""
    result = _python(code, REPO, env_path=str(REPO))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def readme_block(heading: str, index: int = 0) -> str:
    """The index-th ```python block of the README section under `heading`."""
    text = (REPO / "README.md").read_text()
    section = text.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)[index]


def test_readme_own_loop_example_runs_as_written():
    namespace: dict = {}
    exec(
        compile(readme_block("Use the pieces in your own training loop"), "README", "exec"),
        namespace,
    )
    batch, losses = namespace["batch"], namespace["losses"]
    assert tuple(batch.images.shape) == (2, 3, 320, 320)
    assert tuple(batch.boxes.shape) == (2, 16, 4) and batch.valid.sum().item() == 4
    assert set(losses) == {"bbox_regression", "classification"}
    assert all(v.isfinite() and v > 0 for v in losses.values())
    # the optimizer step ran: every trained parameter has a gradient
    assert all(p.grad is not None for p in namespace["model"].parameters() if p.requires_grad)


def test_every_package_folder_is_listed_for_pip_install():
    """pyproject.toml lists its packages explicitly: a new folder of ssd_npu must be in it, or
    `pip install .` ships a package that fails at import (the slow test above shows that)."""
    import tomllib

    root = Path(__file__).resolve().parents[1]
    listed = set(
        tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    folders = {
        ".".join(init.parent.relative_to(root).parts)
        for init in (root / "ssd_npu").rglob("__init__.py")
    }
    assert folders <= listed, sorted(folders - listed)
