"""Benchmark: evaluation with the postprocess on the host against on the device.

Usage:
    python scripts/bench_eval.py [bench.eval_rounds=5] [bench.out=PATH] [compile=true]
        [any train.py override: device=cuda model=retinanet_resnet50_fpn batch_size=8 ...]

Builds the pipeline as `python train.py` would (same overrides, same val loader), reads the
val batches once into memory (so JPEG decoding is not timed), then times whole passes of
`ssd_npu.evaluate.fixed_detections` over them, `bench.eval_rounds` passes per variant, one
variant after another in this process:

    host             the network on the device; head outputs copied to the host, where the
                     detector's own `postprocess_detections` runs image by image
    device           `eval.postprocess=device`: network + fixed postprocess on the device, one
                     [B, D, 7] copy per batch to the host
    device_compiled  the same under torch.compile (compile=true only; its first pass, the
                     compile, is left out of the median)

Each pass covers the network, the postprocess, the copies and the COCO records (boxes mapped
back to the original image); COCOeval runs once per variant, untimed, to show the mAP is the
same. Prints a markdown table and writes bench_eval.json (bench.out, or
<out_dir>/bench_eval.json): {"runs": {variant: {"images_per_s", "pass_s" (median), "passes",
"mAP", "mAP50", "num_detections", "graphs"}}, "ratios": {"device_vs_host",
"device_compiled_vs_host"}, "machine": {...}}.
"""

import json
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

from ssd_npu.cli import expand_argv, run_folder, user_errors  # noqa: E402
from ssd_npu.config import config_dir  # noqa: E402


def time_passes(run_pass, rounds: int, sync) -> list[float]:
    """Seconds of each of `rounds` calls of run_pass(), the device synchronised after each."""
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        run_pass()
        sync()
        times.append(time.perf_counter() - start)
    return times


def bench(cfg: DictConfig) -> dict:
    from ssd_npu.build import build_training, step_options
    from ssd_npu.evaluate import DeviceDetect, coco_map, fixed_detections

    if cfg.shape != "fixed":
        raise SystemExit("bench_eval compares the fixed path's postprocess: use shape=fixed.")
    compile_requested = bool(cfg.compile)
    cfg.compile = False  # the training step is not used; only the eval variant compiles
    t = build_training(cfg)
    batches = list(t.data.val)  # decoded once: the passes time the device and the host work
    images = sum(int((b.image_ids >= 0).sum()) for b in batches)
    coco = t.data.val_set.coco
    variants: dict[str, DeviceDetect | None] = {
        "host": None,
        "device": DeviceDetect(t.model, t.device, cfg.amp),
    }
    if compile_requested:
        cfg.compile = True
        options = step_options(cfg, t.device, t.world, None).compile
        variants["device_compiled"] = DeviceDetect(t.model, t.device, cfg.amp, options)
    rounds = int(cfg.bench.eval_rounds)
    runs = {}
    for name, detect in variants.items():
        result: dict = {}

        def one_pass(detect=detect, result=result) -> None:
            result["records"], _ = fixed_detections(
                t.model, batches, t.device, amp=cfg.amp, detect=detect
            )

        times = time_passes(
            one_pass, rounds + (1 if name == "device_compiled" else 0), t.device.synchronize
        )
        if name == "device_compiled":
            times = times[1:]  # the first pass compiled the graph
        scores = coco_map(coco, result["records"], coco.getImgIds())
        pass_s = statistics.median(times)
        runs[name] = {
            "images_per_s": images / pass_s,
            "pass_s": pass_s,
            "passes": times,
            "images": images,
            "mAP": scores["mAP"],
            "mAP50": scores["mAP50"],
            "num_detections": scores["num_detections"],
            "graphs": detect.graphs if detect is not None else None,
        }
        print(json.dumps({name: {k: v for k, v in runs[name].items() if k != "passes"}}))
    host = runs["host"]["images_per_s"]
    ratios = {
        f"{name}_vs_host": runs[name]["images_per_s"] / host for name in runs if name != "host"
    }
    info = {
        "device": str(t.device.torch),
        "model": cfg.model.name,
        "canvas": list(cfg.canvas),
        "batch_size": int(cfg.batch_size),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
    }
    if t.device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(t.device.torch)
    return {"runs": runs, "ratios": ratios, "machine": info}


def table(report: dict) -> str:
    rows = [
        "| variant | images/s | pass s (median) | mAP | mAP50 | detections | graphs |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in report["runs"].items():
        rows.append(
            f"| {name} | {r['images_per_s']:.1f} | {r['pass_s']:.3f} | {r['mAP']:.4f} | "
            f"{r['mAP50']:.4f} | {r['num_detections']} | {r['graphs']} |"
        )
    return "\n".join(rows)


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="bench")
def main(cfg: DictConfig) -> None:
    out_dir = run_folder(cfg)
    with user_errors():
        report = bench(cfg)
    print(table(report))
    print("ratios:", json.dumps({k: round(v, 2) for k, v in report["ratios"].items()}))
    path = Path(cfg.bench.out or out_dir / "bench_eval.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    print(f"\nbench_eval.json: {path}")


if __name__ == "__main__":
    expand_argv()
    main()
