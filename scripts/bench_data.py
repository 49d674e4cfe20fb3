"""Host pipeline benchmark: images/s per core of the data path, against torchvision's.

Usage:
    python scripts/bench_data.py [data=coco data.root=/path/to/coco] [canvas=[H,W]]
        [max_boxes=N] [pad_value=F] [seed=0] [batch_size=8] [any train.py override]
        [--repeats 5] [--images 120] [--workers N] [--make-photos DIR]

`--make-photos DIR` first writes a real-world-sized, photo-like COCO set into DIR (120 train
JPEGs of ~640x480 and a few portrait / other sizes: scripts/make_photo_coco.py; kept if
already there) and benchmarks on it (it implies data=coco data.root=DIR data.num_classes=91).

Single-threaded, one process, the first `--images` train images that have boxes (torchvision's
reference drops the others from training), read from the page cache (a warm-up pass first).
Variants, each the full per-image path from the file to what the collate stacks:

    decode_only            PIL open + load (+ convert to RGB where the file is not): the
                           decoder both pipelines use; the limit of any exact pipeline
    torchvision_reference  references/detection DetectionPresetTrain(data_augmentation="ssdlite",
                           backend="pil", use_v2=True): RandomIoUCrop, RandomHorizontalFlip (on
                           the PIL image), ToImage, ToDtype(float32, scale=True),
                           ConvertBoundingBoxFormat(XYXY), SanitizeBoundingBoxes, ToPureTensor
                           (no resize: torchvision's model resizes)
    fixed_<fit>            ours, data.decode=exact: decode, IoU crop + flip, fit to the canvas
                           (float32), targets padded to max_boxes (SampleDataset + FixSample)
    fixed_<fit>_reduced    ours, data.decode=reduced (uint8 canvas, DCT-scaled decode)
    fixed_device           the host's share of data.augment_on=device: decode, the image at
                           the top-left of a uint8 data.slot (scaled down only when larger),
                           targets padded, the device's uniforms drawn (SampleDataset +
                           SlotSample); no augmentation and no fit: the device does those
    fixed_device_decode    the host's share with data.decode=device as well: the file's bytes
                           and header (the device decodes), targets padded, uniforms drawn

Each repeat runs every image through every variant back to back (the order rotated per image
and repeat: a noisy neighbour slows all variants alike), with the same per-image seeds;
ms/image is the median over repeats; cores per 1000 img/s = 1000 / (images/s per core): the
host cores a variant needs to feed 1000 training images per second. Then the DataLoader end
to end (the training loader's dataset, FixSample and collate) for num_workers 1..cores (or
1..--workers; 0 skips it): images/s after the first batch, all workers together.
Prints a table; writes bench_data.json into the run folder:
{"variants": {name: {"images_per_s_per_core", "cores_per_1000_img_s", "ms_per_image",
"vs_torchvision", "repeats_ms"}}, "loader": {name: {workers: images_per_s}}, "data": {...},
"machine": {...}}.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# ssd_npu first: it sets TORCH_DEVICE_BACKEND_AUTOLOAD=0, which only works before torch loads
import ssd_npu  # noqa: E402, F401

# isort: split
import hydra  # noqa: E402
import torch  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from ssd_npu.choices import FITS, Canvas  # noqa: E402
from ssd_npu.cli import expand_argv, run_folder, user_errors  # noqa: E402
from ssd_npu.config import config_dir  # noqa: E402

OPTS = argparse.Namespace(repeats=5, images=120, workers=None, make_photos=None)


def _pop_flags() -> None:
    """Take this script's own --flags out of sys.argv; the rest are Hydra overrides."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--images", type=int, default=120)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--make-photos", type=Path, default=None)
    known, rest = parser.parse_known_args(sys.argv[1:])
    vars(OPTS).update(vars(known))
    sys.argv[1:] = rest
    if known.make_photos is not None:
        from make_photo_coco import make_photo_coco

        root = known.make_photos.resolve()
        if not (root / "annotations" / "instances_train2017.json").is_file():
            make_photo_coco(root)
        sys.argv += ["data=coco", f"data.root={root}", "data.num_classes=91"]


def _reference(base):
    """torchvision's ssdlite training pipeline on one image: PIL decode, preset transforms."""
    from PIL import Image
    from torchvision.transforms import v2

    preset = v2.Compose(
        [
            v2.RandomIoUCrop(),
            v2.RandomHorizontalFlip(p=0.5),
            v2.ToImage(),
            v2.ToDtype(torch.float, scale=True),
            v2.ConvertBoundingBoxFormat("XYXY"),
            v2.SanitizeBoundingBoxes(),
            v2.ToPureTensor(),
        ]
    )

    def run(index: int):
        img_id = base.ids[index]
        with Image.open(base.img_dir / str(base.file_names[index])) as img:
            pil = img.convert("RGB")
        t = base.target(index, pil.size[1], pil.size[0])
        return preset(pil, {"boxes": t["boxes"], "labels": t["labels"], "image_id": img_id})

    return run


def _decode_only(base):
    from ssd_npu.data.decode import load_rgb

    def run(index: int):
        return load_rgb(base.img_dir / str(base.file_names[index]))

    return run


def _ours(cfg, root: Path, fit: str, decode: str):
    from ssd_npu.data.coco import CocoDetectionDataset
    from ssd_npu.data.fixed_shape import FixSample
    from ssd_npu.data.loader import SampleDataset
    from ssd_npu.data.samplers import SampleKey
    from ssd_npu.data.transforms import train_augmentation

    base = CocoDetectionDataset(root, cfg.data.train_split, decode=decode)
    mb = cfg.max_boxes if isinstance(cfg.max_boxes, int) else max(cfg.max_boxes)
    finish = FixSample(cfg.canvas, mb, fit, cfg.pad_value, cfg.seed)
    ds = SampleDataset(base, train_augmentation(), finish, cfg.seed)
    return ds, (lambda index: ds[SampleKey(index)])


def _device(cfg, root: Path, decode: str = "exact"):
    """data.augment_on=device's worker: decode + SlotSample (no augmentation, no fit), with
    as many uniforms per sample as the step's DeviceAugment takes for this canvas and fit."""
    from ssd_npu.data.coco import CocoDetectionDataset
    from ssd_npu.data.device_augment import DeviceAugment
    from ssd_npu.data.loader import SampleDataset
    from ssd_npu.data.samplers import SampleKey
    from ssd_npu.data.slots import SlotSample

    base = CocoDetectionDataset(root, cfg.data.train_split, decode=decode)
    mb = cfg.max_boxes if isinstance(cfg.max_boxes, int) else max(cfg.max_boxes)
    draws = DeviceAugment(Canvas.of(cfg.canvas), cfg.fit, cfg.pad_value).draws
    finish = SlotSample(cfg.data.slot, mb, draws, cfg.seed, device_decode=decode == "device")
    ds = SampleDataset(base, None, finish, cfg.seed)
    return lambda index: ds[SampleKey(index)]


def _variants(cfg, root: Path) -> dict:
    from ssd_npu.data.coco import CocoDetectionDataset

    base = CocoDetectionDataset(root, cfg.data.train_split)
    out = {"decode_only": _decode_only(base), "torchvision_reference": _reference(base)}
    for decode in ("exact", "reduced"):  # data.decode=device: fixed_device_decode below
        for fit in FITS:
            name = f"fixed_{fit}" if decode == "exact" else f"fixed_{fit}_{decode}"
            out[name] = _ours(cfg, root, fit, decode)[1]
    out["fixed_device"] = _device(cfg, root)
    out["fixed_device_decode"] = _device(cfg, root, decode="device")
    return out


def _images(cfg, root: Path) -> list[int]:
    """Indices of the first OPTS.images train images with at least one (non-crowd) box."""
    from ssd_npu.data.coco import CocoDetectionDataset

    base = CocoDetectionDataset(root, cfg.data.train_split)
    counts = base.box_counts
    return [i for i in range(len(base.ids)) if counts[i] > 0][: OPTS.images]


def time_variants(variants: dict, indices: list[int], repeats: int, seed: int) -> dict:
    """{name: [ms per image, one per repeat]}, interleaved per image: each image goes through
    every variant back to back, in an order rotated per image and repeat, so a noisy
    neighbour slows all variants alike. Each variant gets the same seed per image (the same
    crops in every repeat); seeding is outside the timed region."""
    names = list(variants)
    times: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(-1, repeats):  # rep -1: warm-up (page cache, lazy imports), not kept
        total = dict.fromkeys(names, 0.0)
        for j, i in enumerate(indices):
            k = (rep + j) % len(names)
            for name in names[k:] + names[:k]:
                # the CPU generator only: torch.manual_seed also seeds CUDA (~0.2-1 ms on a
                # CUDA build of torch without a GPU: it records a traceback)
                torch.default_generator.manual_seed(seed + i)
                start = time.perf_counter()
                variants[name](i)
                total[name] += time.perf_counter() - start
        if rep >= 0:
            for name in names:
                times[name].append(total[name] * 1e3 / len(indices))
    return times


def time_loader(cfg, root: Path, fit: str, decode: str, indices: list[int]) -> dict:
    """{num_workers: images/s} of a DataLoader over `indices`, after its first batch."""
    from torch.utils.data import DataLoader

    from ssd_npu.data.fixed_shape import collate_fixed
    from ssd_npu.data.samplers import SampleKey

    ds, _ = _ours(cfg, root, fit, decode)
    keys = [SampleKey(i) for i in indices]
    out = {}
    most = (os.cpu_count() or 1) if OPTS.workers is None else OPTS.workers
    for workers in range(1, most + 1):
        loader = DataLoader(
            ds, batch_size=cfg.batch_size, sampler=keys, num_workers=workers,
            collate_fn=collate_fixed,
        )  # fmt: skip
        it = iter(loader)
        next(it)  # worker start-up and the first batch are not timed
        start, n = time.perf_counter(), 0
        for batch in it:
            n += batch.images.shape[0]
        out[workers] = round(n / (time.perf_counter() - start), 1) if n else None
    return out


def machine() -> dict:
    from PIL import __version__ as pil_version
    from PIL import features

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "pillow": pil_version,
        "libjpeg_turbo": features.version("libjpeg_turbo"),
        "python": platform.python_version(),
    }


def table(variants: dict) -> str:
    rows = [
        "| variant | ms/image | images/s per core | cores per 1000 img/s | vs torchvision |",
        "|---|---|---|---|---|",
    ]
    for name, v in variants.items():
        rows.append(
            f"| {name} | {v['ms_per_image']:.2f} | {v['images_per_s_per_core']:.1f} | "
            f"{v['cores_per_1000_img_s']:.2f} | {v['vs_torchvision']:.2f} |"
        )
    return "\n".join(rows)


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
def main(cfg: DictConfig) -> None:
    from ssd_npu.build import resolve_data_root
    from ssd_npu.config import validate

    out_dir = run_folder(cfg)
    with user_errors():
        validate(cfg)
        root = resolve_data_root(cfg)
        indices = _images(cfg, root)
    torch.set_num_threads(1)
    times = time_variants(_variants(cfg, root), indices, OPTS.repeats, int(cfg.seed))
    ref = statistics.median(times["torchvision_reference"])
    variants = {}
    for name, ms in times.items():
        med = statistics.median(ms)
        per_core = 1e3 / med
        variants[name] = {
            "images_per_s_per_core": round(per_core, 1),
            # host cores that feed 1000 img/s (numerically the ms per image)
            "cores_per_1000_img_s": round(1e3 / per_core, 2),
            "ms_per_image": round(med, 3),
            "vs_torchvision": round(ref / med, 2),
            "repeats_ms": [round(v, 3) for v in ms],
        }
    print(f"\n{len(indices)} images from {root}, canvas {list(cfg.canvas)}, one thread:\n")
    print(table(variants))
    loader = {
        f"fixed_{cfg.fit}": time_loader(cfg, root, cfg.fit, "exact", indices),
        f"fixed_{cfg.fit}_reduced": time_loader(cfg, root, cfg.fit, "reduced", indices),
    }
    if any(loader.values()):
        print("\nDataLoader end to end, images/s (all workers) by num_workers:")
        for name, by_workers in loader.items():
            print(f"  {name}: " + ", ".join(f"{w}: {v}" for w, v in by_workers.items()))
    result = {
        "variants": variants,
        "loader": loader,
        "data": {
            "root": str(root),
            "images": len(indices),
            "canvas": list(cfg.canvas),
            "repeats": OPTS.repeats,
        },
        "machine": machine(),
    }
    path = out_dir / "bench_data.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print(f"\nbench_data.json: {path}")


if __name__ == "__main__":
    expand_argv()
    _pop_flags()
    main()
