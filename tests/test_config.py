"""The command-line contract: Hydra composition, schema strictness, value validation."""

import pytest
from hydra.errors import ConfigCompositionException

from ssd_npu.config import validate
from ssd_npu.errors import ConfigError
from tests.helpers import compose_cfg, run_train


def test_defaults_follow_the_contract():
    cfg = compose_cfg()
    validate(cfg)
    assert cfg.device.name == "auto"
    assert list(cfg.model.canvas) == [320, 320]
    assert cfg.shape == "fixed" and cfg.fit == "stretch" and cfg.compile is False
    assert cfg.data.name == "synthetic" and cfg.data.num_classes == 6
    for key in ("max_boxes", "batch_size", "epochs", "max_steps", "seed", "num_workers", "amp"):
        assert key in cfg


def test_demo_settings_apply_to_the_default_pair_only():
    """configs/data_model/synthetic_ssdlite320_mobilenet_v3_large.yaml: the demo's canvas and
    schedule for ssdlite on the synthetic set; other models and COCO keep their own, and the
    command line wins."""
    demo = compose_cfg()
    assert list(demo.canvas) == [224, 224] and demo.epochs == 13 and demo.eval_every == 7
    assert demo.optim.lr == 0.025 and demo.optim.warmup_steps == 60
    ssd300 = compose_cfg("model=ssd300_vgg16")
    assert list(ssd300.canvas) == [300, 300] and ssd300.optim.lr is None and ssd300.epochs == 8
    coco = compose_cfg("data=coco", "data.root=/data/coco")
    assert list(coco.canvas) == [320, 320] and coco.optim.lr is None and coco.epochs == 4
    mine = compose_cfg("canvas=[320,320]", "optim.lr=0.04")
    assert list(mine.canvas) == [320, 320] and mine.optim.lr == 0.04 and mine.epochs == 13


def test_npu_override_parses():
    cfg = compose_cfg("device=npu", "canvas=[512,512]", "max_boxes=50")
    validate(cfg)
    assert cfg.device.name == "npu" and cfg.device.jit_compile is False
    assert list(cfg.canvas) == [512, 512] and cfg.max_boxes == 50


def test_coco_group_sets_91_classes():
    cfg = compose_cfg("data=coco", "data.root=/data/coco")
    validate(cfg)
    assert cfg.data.num_classes == 91 and cfg.data.root == "/data/coco"


@pytest.mark.parametrize(
    ("override", "key", "hint"),
    [
        ("canvas=[300,320]", "canvas", "divisible by 32"),
        ("canvas=[320]", "canvas", "two integers"),
        ("canvas=[0,320]", "canvas", ">= 64"),
        ("max_boxes=0", "max_boxes", ">= 1"),
        ("fit=crop", "fit", "stretch, letterbox, pad"),
        ("shape=ragged", "shape", "fixed, dynamic"),
        ("batch_size=0", "batch_size", ">= 1"),
        ("data.num_classes=1", "data.num_classes", ">= 2"),
        ("data.on_bad_image=ignore", "data.on_bad_image", "fail, skip"),
        ("max_steps=0", "max_steps", ">= 1"),
    ],
)
def test_bad_values_name_the_key(override, key, hint):
    cfg = compose_cfg(override)
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert str(err.value).startswith(f"{key}=")
    assert hint in str(err.value)


def test_augment_on_and_slot_defaults():
    cfg = compose_cfg()
    validate(cfg)
    assert cfg.data.augment_on == "auto" and list(cfg.data.slot) == [640, 640]
    validate(compose_cfg("data.augment_on=device", "data.slot=[480,640]"))
    validate(compose_cfg("data.augment_on=host", "shape=dynamic"))
    validate(compose_cfg("data.augment_on=auto", "shape=dynamic"))
    validate(compose_cfg("data.augment_on=host", "data.decode=reduced"))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["data.augment_on=gpu"],
            "data.augment_on='gpu' is not valid; choose one of: auto, host, device",
        ),
        (["data.slot=[640]"], "data.slot=[640] is not valid; give two integers >= 32"),
        (["data.slot=[16,640]"], "data.slot=[16,640] is not valid; give two integers >= 32"),
        (["data.slot=[640,640,3]"], "data.slot=[640,640,3] is not valid"),
        (
            ["data.augment_on=device", "shape=dynamic"],
            "data.augment_on=device needs shape=fixed; the dynamic baseline keeps torchvision's "
            "host pipeline: use data.augment_on=auto (or host)",
        ),
        (
            ["data.augment_on=device", "data.decode=reduced"],
            "data.augment_on=device does not work with data.decode=reduced: the reduced decode "
            "picks its JPEG scale from the host's fit to the canvas, which the device does now; "
            "use data.decode=exact",
        ),
    ],
)
def test_bad_augment_on_and_slot_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        validate(compose_cfg(*overrides))
    assert str(err.value).startswith(message)
    assert str(err.value).startswith(overrides[0].split("=")[0] + "=")


def test_unknown_key_and_device_fail_at_compose():
    with pytest.raises(ConfigCompositionException, match="max_boxs"):
        compose_cfg("max_boxs=3")
    with pytest.raises(Exception, match="(?s)tpu.*cpu"):
        compose_cfg("device=tpu")


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("canvas=[300,300]",), "canvas=[300, 300] is not valid"),
        # two more validate() errors through the command line: each starts torch (~6 s);
        # test_bad_values_name_the_key checks every message in process
        pytest.param(
            ("fit=crop",),
            "fit='crop' is not valid; choose one of: stretch, letterbox, pad",
            marks=pytest.mark.slow,
        ),
        pytest.param(("max_boxes=0",), "max_boxes=0 is not valid", marks=pytest.mark.slow),
        (("max_boxs=3",), "max_boxs"),
        (("device=tpu",), "Available options in 'device'"),
    ],
)
def test_cli_rejects_bad_values_without_traceback(tmp_path, args, needle):
    proc = run_train(*args, f"hydra.run.dir={tmp_path}")
    assert proc.returncode != 0
    assert needle in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_device_npu_without_torch_npu_explains(tmp_path):
    proc = run_train("device=npu", "max_steps=1", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    message = proc.stderr.strip()
    assert "torch_npu" in message and "requirements-npu.txt" in message
    assert "set_env.sh" in message
    assert len(message.splitlines()) == 1
