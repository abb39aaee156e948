"""Training at scale: peak memory and throughput of ``transferkit train`` on 2k and 8k generated JPEGs.

For each dataset size: generate class-folder JPEGs (textured noise, 256 px, 4 classes), run the real
``transferkit train`` command in a subprocess (one epoch, ``--weights none``, a small backbone) and read its peak
resident memory from the kernel (``wait4`` rusage of that process), then time the streaming input pipeline alone
(the cache already built) against the model's measured step rate. The claim checked: peak memory does not grow with
the dataset (RSS(8k) - RSS(2k) < 300 MB) and the input pipeline outruns the model.

Run under the machine-wide lock: ``flock /tmp/tk-heavy.lock python -m transferkit.benchmarks.train_memory --out
DIR``. Writes ``results.md`` and ``results.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SIZES = (2000, 8000)
CLASSES = 4


def generate_jpegs(out: Path, count: int, size: int = 256, seed: int = 0) -> Path:
    """``count`` JPEGs in ``CLASSES`` class folders (each class a different texture scale, so it is learnable)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    if (out / "done").exists():
        return out
    for index in range(count):
        label = index % CLASSES
        folder = out / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        cells = 4 * (label + 1)
        small = rng.integers(0, 256, (cells, cells, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((size, size), Image.Resampling.BILINEAR)
        image.save(folder / f"{index:06d}.jpg", quality=85)
    (out / "done").write_text("")
    return out


def run_train(data: Path, out: Path, args: argparse.Namespace) -> dict:
    """``transferkit train`` in a subprocess: its peak RSS (kernel accounting), wall time and metrics."""
    command = [sys.executable, "-m", "transferkit", "train", "--data", str(data), "--out", str(out), "--force",
               "--image-size", str(args.image_size), "--backbone", args.backbone, "--weights", "none",
               "--epochs", "1", "--batch-size", str(args.batch_size), "--no-augment"]
    if args.alpha:
        command += ["--alpha", str(args.alpha)]
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    stderr = process.stderr.read() if process.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"transferkit train failed on {data}:\n{stderr[-3000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    return {"peak_rss_mb": usage.ru_maxrss / 1024, "wall_seconds": seconds, "metrics": metrics}


def pipeline_rate(data: Path, args: argparse.Namespace) -> float:
    """Images/s of the streaming input pipeline alone over the training split (one pass, cache already built)."""
    from transferkit.training.data import load_dataset
    from transferkit.training.pipeline import streaming_dataset

    dataset = load_dataset(data, args.image_size)
    train = dataset.splits["train"]
    ds = streaming_dataset(train, args.batch_size, len(dataset.class_names), True, 42)
    start = time.perf_counter()
    seen = sum(int(x.shape[0]) for x, _ in ds)
    return seen / (time.perf_counter() - start)


def model_rate(args: argparse.Namespace, steps: int = 6) -> float:
    """Images/s of the model's training step alone (the same network and recipe, one batch held in memory, after
    two warm-up steps): the rate the input pipeline has to keep up with."""
    import keras

    from transferkit.core.backbones import get_backbone
    from transferkit.training import recipe
    from transferkit.training.config import HeadConfig, TrainConfig
    from transferkit.training.model import build_classifier

    config = TrainConfig(data=".", out=".", weights="none")
    model = build_classifier(get_backbone(args.backbone), CLASSES, args.image_size, "none", HeadConfig(),
                             args.alpha, trainable_base=True)
    model.compile(optimizer=recipe.optimizer(config, 1e-3), loss=recipe.loss(config))
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (args.batch_size, args.image_size, args.image_size, 3)).astype("float32")
    y = np.eye(CLASSES, dtype="float32")[rng.integers(0, CLASSES, args.batch_size)]
    for _ in range(2):
        model.train_on_batch(x, y)
    start = time.perf_counter()
    for _ in range(steps):
        model.train_on_batch(x, y)
    seconds = time.perf_counter() - start
    keras.backend.clear_session()
    return steps * args.batch_size / seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="working directory (datasets, runs, results)")
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help="dataset sizes (default 2000,8000)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--backbone", default="MobileNetV2")
    parser.add_argument("--alpha", type=float, default=0.35, help="width multiplier (default 0.35: small)")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TRANSFERKIT_CACHE_DIR", str(args.out / "cache"))
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for count in (int(v) for v in args.sizes.split(",")):
        print(f"{count} images: generating JPEGs", flush=True)
        data = generate_jpegs(args.out / f"data_{count}", count)
        print(f"{count} images: transferkit train (1 epoch, {args.backbone} alpha {args.alpha}, "
              f"{args.image_size} px)", flush=True)
        result = run_train(data, args.out / f"run_{count}", args)
        timings = result["metrics"]["timings"]
        train_images = result["metrics"]["train"]["samples"]
        input_rate = pipeline_rate(data, args)
        rows.append({"images": count, "peak_rss_mb": round(result["peak_rss_mb"]),
                     "decode_seconds": round(timings["decode_seconds"], 1),
                     "decode_images_per_s": round(count / max(timings["decode_seconds"], 1e-3)),
                     "epoch_images_per_s": round(train_images / timings["phase1_seconds"], 1),
                     "input_pipeline_images_per_s": round(input_rate),
                     "wall_seconds": round(result["wall_seconds"])})
        print(json.dumps(rows[-1]), flush=True)
    step_rate = model_rate(args)
    growth = rows[-1]["peak_rss_mb"] - rows[0]["peak_rss_mb"]
    slowest_input = min(r["input_pipeline_images_per_s"] for r in rows)
    lines = [
        f"| images | peak RSS (MB) | decode (images/s, {os.cpu_count()} cores) | epoch incl. graph tracing "
        "(images/s) | input pipeline alone (images/s) | wall (s) |",
        "|---|---|---|---|---|---|",
        *(f"| {r['images']} | {r['peak_rss_mb']} | {r['decode_images_per_s']} | {r['epoch_images_per_s']} | "
          f"{r['input_pipeline_images_per_s']} | {r['wall_seconds']} |" for r in rows),
        "",
        f"RSS({rows[-1]['images']}) - RSS({rows[0]['images']}) = {growth} MB (target < 300 MB). The model's training "
        f"step alone: {step_rate:.1f} images/s; the slowest input pipeline: {slowest_input} images/s, "
        f"{slowest_input / step_rate:.1f}x the step rate (target > 1x).",
    ]
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    (args.out / "results.json").write_text(json.dumps(
        {"rows": rows, "rss_growth_mb": growth, "model_step_images_per_s": step_rate}, indent=2) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
