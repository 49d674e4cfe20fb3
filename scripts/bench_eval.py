"""Benchmark: evaluation with the postprocess on the host against on the device.

Usage:
    python scripts/bench_eval.py [bench.eval_rounds=5] [bench.out=PATH] [compile=true]
        [any train.py override: device=cuda model=retinanet_resnet50_fpn batch_size=8 ...]

Builds the pipeline as `python train.py` would (same overrides, same val loader), reads the
val batches once into memory (so JPEG decoding is not timed), then times whole passes of
`ssd_npu.evaluation.evaluate.fixed_detections` over them, `bench.eval_rounds` passes per variant, one
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

The evaluation's host side on a COCO-val-sized result, without a model:
    python scripts/bench_eval.py bench.eval_images=5000 [bench.eval_per_image=100]
        [bench.eval_rounds=3]

generates 5,000 images' ground truth (~37,900 boxes, as val2017) and 100 detections per image
(`ssd_npu.tools.coco_results`), packed as the device postprocess hands them over ([I, D, 7]
canvas pixels, stretch to 320x320), and times by phase, `bench.eval_rounds` rounds each, the
rounds of the variants interleaved (medians):

    records       loop: the per-detection loop evaluation used before (unfit_boxes per image, a
                  dict per detection); bulk: `ssd_npu.evaluation.records.packed_results`
    cocoeval      each engine (eval.coco=faster | pycocotools): loadRes + evaluate +
                  accumulate + summarize, the same 12 stats checked
    modes         synchronous: the loop waits for records + COCOeval; background
                  (eval.background=true): for records + the hand-off to the side process,
                  whose result comes `result_s` after the hand-off

The val forward pass is not part of it (no model): its time is the model's and the device's
(`forward_s` in summary.json). Writes bench_eval.json: {"records": {...}, "cocoeval":
{engine: {...}}, "modes": {"<engine>_<mode>": {...}}, "ratios": {...}, "machine": {...}}.
"""

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
    from ssd_npu.evaluation.evaluate import DeviceDetect, coco_map, fixed_detections

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
            result["found"] = fixed_detections(
                t.model, batches, t.device, amp=cfg.amp, detect=detect
            )

        times = time_passes(
            one_pass, rounds + (1 if name == "device_compiled" else 0), t.device.synchronize
        )
        if name == "device_compiled":
            times = times[1:]  # the first pass compiled the graph
        scores = coco_map(coco, result["found"].results, coco.getImgIds())
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


def bench_generated(cfg: DictConfig, out_dir: Path) -> dict:
    """The COCO-val-sized host side of evaluation, by phase (see the module docstring)."""
    from ssd_npu.evaluation.background import BackgroundCoco
    from ssd_npu.evaluation.cocoeval import ENGINES, GroundTruth, evaluate
    from ssd_npu.evaluation.records import packed_results
    from ssd_npu.tools.coco_results import as_packed, coco_val_sized, loop_records

    images, per_image = int(cfg.bench.eval_images), int(cfg.bench.eval_per_image)
    rounds = int(cfg.bench.eval_rounds)
    dataset, results = coco_val_sized(images, per_image, seed=int(cfg.seed))
    ann_file = out_dir / "generated_instances_val.json"  # what the side process reads
    ann_file.parent.mkdir(parents=True, exist_ok=True)
    ann_file.write_text(json.dumps(dataset))
    packed = as_packed(dataset, results)
    ids = [img["id"] for img in dataset["images"]]
    gt = GroundTruth(dataset)
    for engine in ENGINES:
        gt.index(engine)  # once per run, as the Evaluator does: not an evaluation's time
    times: dict[str, list[float]] = {}
    stats: dict[str, list[float]] = {}
    sides = {engine: BackgroundCoco(ann_file, engine) for engine in ENGINES}
    for side in sides.values():
        side.started.result()  # spawned and the annotations loaded before any timing

    def timed(name: str, fn):
        start = time.perf_counter()
        out = fn()
        times.setdefault(name, []).append(time.perf_counter() - start)
        return out

    for r in range(rounds):
        timed("records_loop", lambda: loop_records(*packed))
        rows = timed("records_bulk", lambda: packed_results(*packed))
        for engine in ENGINES:
            scored = timed(
                f"cocoeval_{engine}", lambda e=engine, rows=rows: evaluate(gt, rows, ids, e)
            )
            stats[engine] = scored.stats
            # background: the loop's part is the records and the hand-off; then it trains on
            start = time.perf_counter()
            handed = packed_results(*packed)
            sides[engine].submit(r, handed, ids, {})
            times.setdefault(f"stall_{engine}_background", []).append(time.perf_counter() - start)
            _, result = sides[engine].wait_next()
            times.setdefault(f"result_{engine}_background", []).append(time.perf_counter() - start)
            assert result["stats"] == stats[engine]
        print(
            f"round {r + 1}/{rounds}: " + json.dumps({k: round(v[-1], 3) for k, v in times.items()})
        )
    for side in sides.values():
        side.close()
    med = {k: statistics.median(v) for k, v in times.items()}
    equal = max(abs(a - b) for a, b in zip(stats["faster"], stats["pycocotools"], strict=True))
    per_1000 = 1000.0 / images
    report = {
        "records": {
            name: {
                "s": med[f"records_{name}"],
                "ms_per_1000_images": med[f"records_{name}"] * per_1000 * 1000,
            }
            for name in ("loop", "bulk")
        },
        "cocoeval": {
            e: {"s": med[f"cocoeval_{e}"], "rounds": times[f"cocoeval_{e}"], "stats": stats[e]}
            for e in ENGINES
        },
        "modes": {},
        "ratios": {
            "cocoeval_pycocotools_vs_faster": med["cocoeval_pycocotools"] / med["cocoeval_faster"],
            "records_loop_vs_bulk": med["records_loop"] / med["records_bulk"],
        },
        "max_stat_difference": equal,
        "images": images,
        "detections": len(results),
        "gt_boxes": len(dataset["annotations"]),
        "machine": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
        },
    }
    for e in ENGINES:
        report["modes"][f"{e}_sync"] = {
            "records_s": med["records_bulk"],
            "cocoeval_s": med[f"cocoeval_{e}"],
            "stall_s": med["records_bulk"] + med[f"cocoeval_{e}"],
            "result_s": med["records_bulk"] + med[f"cocoeval_{e}"],
        }
        report["modes"][f"{e}_background"] = {
            "records_s": med["records_bulk"],
            "cocoeval_s": med[f"cocoeval_{e}"],
            "stall_s": med[f"stall_{e}_background"],
            "result_s": med[f"result_{e}_background"],
        }
    return report


def markdown(header: list[str], rows: list[list[str]]) -> list[str]:
    """A markdown table's lines."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def generated_table(report: dict) -> str:
    phases = [
        ["records", name, f"{r['s']:.3f}", f"{r['ms_per_1000_images']:.1f}"]
        for name, r in report["records"].items()
    ]
    phases += [["cocoeval", name, f"{r['s']:.2f}", ""] for name, r in report["cocoeval"].items()]
    modes = [
        [name, f"{r['records_s']:.3f}", f"{r['cocoeval_s']:.2f}", f"{r['stall_s']:.3f}",
         f"{r['result_s']:.2f}"]
        for name, r in report["modes"].items()
    ]  # fmt: skip
    head = (
        f"COCO-val-sized: {report['images']} images, {report['gt_boxes']} boxes, "
        f"{report['detections']} detections; stats differ by at most "
        f"{report['max_stat_difference']:.1e}"
    )
    return "\n".join(
        [head, ""]
        + markdown(["phase", "variant", "s (median)", "ms per 1,000 images"], phases)
        + [""]
        + markdown(
            [
                "engine + mode",
                "records s",
                "cocoeval s",
                "loop stall s (+ forward)",
                "result after s",
            ],
            modes,
        )  # fmt: skip
    )


def table(report: dict) -> str:
    rows = [
        [name, f"{r['images_per_s']:.1f}", f"{r['pass_s']:.3f}", f"{r['mAP']:.4f}",
         f"{r['mAP50']:.4f}", str(r["num_detections"]), str(r["graphs"])]
        for name, r in report["runs"].items()
    ]  # fmt: skip
    header = ["variant", "images/s", "pass s (median)", "mAP", "mAP50", "detections", "graphs"]
    return "\n".join(markdown(header, rows))


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="bench")
def main(cfg: DictConfig) -> None:
    out_dir = run_folder(cfg)
    with user_errors():
        report = bench_generated(cfg, out_dir) if cfg.bench.eval_images > 0 else bench(cfg)
    print(generated_table(report) if cfg.bench.eval_images > 0 else table(report))
    print("ratios:", json.dumps({k: round(v, 2) for k, v in report["ratios"].items()}))
    path = Path(cfg.bench.out or out_dir / "bench_eval.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    print(f"\nbench_eval.json: {path}")


if __name__ == "__main__":
    expand_argv()
    main()
