"""Batch prediction benchmark: ``transferkit predict`` local engine vs Ray engine vs the in-process ceiling.

    flock /tmp/tk-heavy.lock python -m transferkit.benchmarks.batch_predict --images 5000

1. Generates ``--images`` JPEGs of 1152x864 (~1 MP; smooth colour fields, shapes and sensor-like noise, quality 90)
   and exports an untrained MobileNetV2 at 224 px (``weights=None``, ONNX) through the real export stage. Both are
   cached in ``--work`` for reruns.
2. The ceiling, in this process, on ``--ceiling-images`` images held in memory (no file reads, no output): the
   better of (a) all decodes on a thread pool, then onnxruntime on all cores, one stage after the other, and (b)
   one decode+classify thread per core, each with a one-thread onnxruntime session.
3. The local engine and the Ray engine (a local Ray with this machine's cores), each in a child process that runs
   what ``transferkit predict DIR --out x.parquet`` runs; the parent samples the memory of the child's whole process
   tree (Ray's raylet, GCS and workers included) every 0.25 s. Peak memory is the sum of PSS (shared pages such as
   the Ray object store counted once), and RSS for comparison.
4. The driver's own cost per row (building rows and writing Parquet) bounds how far the Ray engine scales with
   nodes; the scaling estimate derived from it is on paper, not measured.

Prints a Markdown table and writes ``results.json`` in ``--work``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from transferkit.core.system import available_cores

WIDTH, HEIGHT, SIZE = 1152, 864, 224


def _write_jpeg(args: tuple[Path, int]) -> int:
    from PIL import Image, ImageDraw

    path, seed = args
    rng = np.random.default_rng(seed)
    # Smooth colour field (a 4x3 grid upsampled), a few shapes and mild noise: JPEGs of a photo-like size.
    field = Image.fromarray(rng.integers(0, 256, (3, 4, 3), dtype=np.uint8)).resize((WIDTH, HEIGHT),
                                                                                     Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(field)
    for _ in range(6):
        x, y = rng.integers(0, WIDTH), rng.integers(0, HEIGHT)
        w, h = rng.integers(40, 400, 2)
        draw.ellipse((x, y, x + w, y + h), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    pixels = np.asarray(field, np.int16) + rng.normal(0, 6, (HEIGHT, WIDTH, 3)).astype(np.int16)
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)
    return path.stat().st_size


def prepare_images(directory: Path, count: int) -> dict:
    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / f"{index // 1000:03d}" / f"img_{index:05d}.jpg" for index in range(count)]
    missing = [(p, i) for i, p in enumerate(paths) if not p.exists()]
    for folder in {p.parent for p, _ in missing}:
        folder.mkdir(exist_ok=True)
    if missing:
        print(f"generating {len(missing)} JPEGs of {WIDTH}x{HEIGHT} in {directory}", flush=True)
        with ProcessPoolExecutor(available_cores()) as pool:
            list(pool.map(_write_jpeg, missing, chunksize=32))
    sizes = [p.stat().st_size for p in paths]
    return {"images": count, "mean_kb": round(sum(sizes) / len(sizes) / 1024, 1), "total_mb": round(sum(sizes) / 1e6)}


def prepare_bundle(directory: Path) -> Path:
    if (directory / "manifest.json").is_file():
        return directory
    print("exporting MobileNetV2 224 (weights none) to ONNX", flush=True)
    from transferkit.core.backbones import get_backbone
    from transferkit.export.bundle import ValidationImages, export_model
    from transferkit.training.config import HeadConfig
    from transferkit.training.model import build_classifier

    model = build_classifier(get_backbone("MobileNetV2"), 10, SIZE, "none", HeadConfig(dropout=0.0))
    images = np.random.default_rng(0).integers(0, 256, (16, SIZE, SIZE, 3), dtype=np.uint8)
    export_model(model, out=directory, backbone="MobileNetV2", image_size=SIZE,
                 class_names=[f"class_{i}" for i in range(10)],
                 validation=ValidationImages(images, None, "random pixels (untrained benchmark model)"),
                 calibration=images, formats=["onnx"], name="bench-batch-mobilenetv2", register=False,
                 allow_mismatch=True, force=True, log=lambda line: None)
    return directory


def ceiling(bundle_dir: Path, paths: list[Path], batch_size: int) -> dict:
    """Images/s of decode + onnxruntime on bytes held in memory (see the module docstring)."""
    from transferkit.core.classifier import load_bundle
    from transferkit.core.images import decode_image

    cores = available_cores()
    blobs = [p.read_bytes() for p in paths]
    classifier = load_bundle(bundle_dir, "onnx", "cpu")
    full, single = classifier.predictor(), classifier.predictor(threads=1)
    warm = np.stack([decode_image(b, SIZE) for b in blobs[:batch_size]])
    full(warm), single(warm)  # first runs allocate and pick kernels

    start = time.perf_counter()
    with ThreadPoolExecutor(cores) as pool:
        pixels = list(pool.map(lambda b: decode_image(b, SIZE), blobs, chunksize=16))
    decode_s = time.perf_counter() - start
    start = time.perf_counter()
    for i in range(0, len(pixels), batch_size):
        full(np.stack(pixels[i:i + batch_size]))
    infer_s = time.perf_counter() - start
    staged = len(blobs) / (decode_s + infer_s)
    del pixels

    def fused(chunk: list[bytes]) -> None:
        single(np.stack([decode_image(b, SIZE) for b in chunk]))

    chunks = [blobs[i:i + batch_size] for i in range(0, len(blobs), batch_size)]
    start = time.perf_counter()
    with ThreadPoolExecutor(cores) as pool:
        list(pool.map(fused, chunks))
    fused_rate = len(blobs) / (time.perf_counter() - start)
    return {"images": len(blobs), "decode_images_per_s": len(blobs) / decode_s,
            "infer_images_per_s": len(blobs) / infer_s, "staged_images_per_s": staged,
            "fused_images_per_s": fused_rate, "images_per_s": max(staged, fused_rate)}


def driver_cost(rows: int = 20000, classes: int = 1000) -> float:
    """Rows/s the driver alone can build and write to Parquet (what bounds a many-node Ray job)."""
    import tempfile

    from transferkit.core.batch import Outcome, outcome_rows
    from transferkit.core.outputs import open_writer

    rng = np.random.default_rng(0)
    batch = [Outcome(f"/data/archive/{i:08d}.jpg", rng.dirichlet(np.ones(classes)).astype(np.float32))
             for i in range(256)]
    names = [f"class_{i}" for i in range(classes)]
    with tempfile.TemporaryDirectory() as tmp:
        writer = open_writer(Path(tmp) / "rows.parquet", append=False)
        start = time.perf_counter()
        for _ in range(rows // len(batch)):
            writer.write(outcome_rows(batch, names, 5))
        writer.close()
        return (rows // len(batch)) * len(batch) / (time.perf_counter() - start)


def child(engine: str, bundle_dir: Path, images: Path, out: Path, batch_size: int) -> None:
    """What `transferkit predict IMAGES --out OUT [--engine ray]` runs, timed; prints one JSON line."""
    wall_start = time.perf_counter()
    from transferkit.core.batch import outcome_rows
    from transferkit.core.classifier import load_bundle
    from transferkit.core.inputs import expand_inputs
    from transferkit.core.outputs import open_writer

    classifier = load_bundle(bundle_dir, "onnx", "cpu")
    items = list(expand_inputs([images]))
    if engine == "ray":
        from transferkit.core.ray_engine import start_ray

        start_ray(num_cpus=available_cores())
    writer = open_writer(out, append=False)
    start = time.perf_counter()
    # "Steady": from the moment a tenth of the images is written to the end, leaving out start-up and warm-up
    # (Ray returns blocks in bursts, so the first block alone would be a poor mark).
    first = first_count = None
    done = 0
    for outcomes in classifier.outcomes(items, engine, batch_size):
        writer.write(outcome_rows(outcomes, classifier.class_names, 5))
        done += len(outcomes)
        if first is None and done >= len(items) / 10:
            first, first_count = time.perf_counter(), done
    writer.close()
    end = time.perf_counter()
    if engine == "ray":
        import ray

        ray.shutdown()
    print(json.dumps({"images": done, "stream_s": end - start, "images_per_s": done / (end - start),
                      "steady_images_per_s": (done - first_count) / (end - first),
                      "startup_s": start - wall_start, "wall_s": time.perf_counter() - wall_start}))


def _tree_memory(process) -> tuple[int, int]:
    import psutil

    rss = pss = 0
    for proc in [process, *process.children(recursive=True)]:
        try:
            info = proc.memory_full_info()
            rss, pss = rss + info.rss, pss + info.pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return rss, pss


def run_child(engine: str, count: int, work: Path, batch_size: int) -> dict:
    import psutil

    command = [sys.executable, "-m", "transferkit.benchmarks.batch_predict", "--child", engine, "--work", str(work),
               "--batch-size", str(batch_size), "--images", str(count)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    peak = [0, 0]
    watched = psutil.Process(process.pid)

    def sample() -> None:
        while process.poll() is None:
            rss, pss = _tree_memory(watched)
            peak[0], peak[1] = max(peak[0], rss), max(peak[1], pss)
            time.sleep(0.25)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, _ = process.communicate()
    sampler.join()
    if process.returncode != 0:
        raise SystemExit(f"the {engine} engine failed (exit {process.returncode})")
    result = json.loads(stdout.strip().splitlines()[-1])
    return {**result, "peak_rss_mb": peak[0] / 1e6, "peak_pss_mb": peak[1] / 1e6}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=5000, help="JPEGs to generate and classify (default 5000)")
    parser.add_argument("--ceiling-images", type=int, default=1000, help="images held in memory for the ceiling")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--work", type=Path, default=Path("/tmp/tk-batch-bench"), help="cache and results")
    parser.add_argument("--engines", default="local,ray", help="engines to run (default local,ray)")
    parser.add_argument("--child", choices=("local", "ray"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    work = args.work
    images, bundle_dir = work / f"jpeg-{WIDTH}x{HEIGHT}-{args.images}", work / "mobilenetv2-224"
    if args.child:
        child(args.child, bundle_dir, images, work / f"{args.child}.parquet", args.batch_size)
        return 0

    os.environ.setdefault("KERAS_HOME", str(work / "keras"))
    data = prepare_images(images, args.images)
    prepare_bundle(bundle_dir)
    cores = available_cores()
    print(f"{data['images']} JPEGs, mean {data['mean_kb']} KB; {cores} cores; measuring the ceiling", flush=True)
    paths = sorted(images.rglob("*.jpg"))[:args.ceiling_images]
    top = ceiling(bundle_dir, paths, args.batch_size)
    results = {"data": data, "cores": cores, "batch_size": args.batch_size, "ceiling": top}
    for engine in args.engines.split(","):
        print(f"running the {engine} engine", flush=True)
        results[engine] = run_child(engine, args.images, work, args.batch_size)
    results["driver_rows_per_s"] = driver_cost()
    (work / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(render(results))
    return 0


def render(results: dict) -> str:
    top = results["ceiling"]["images_per_s"]
    lines = ["| pipeline | images/s (stream) | steady images/s | start-up s | peak PSS MB (RSS) | vs ceiling |",
             "|---|---|---|---|---|---|",
             f"| in-process ceiling (decode + onnxruntime, no I/O) | {top:.1f} | | | | 1.00 |"]
    for engine in ("local", "ray"):
        if engine in results:
            r = results[engine]
            lines.append(f"| `--engine {engine}` | {r['images_per_s']:.1f} | {r['steady_images_per_s']:.1f} | "
                         f"{r['startup_s']:.1f} | {r['peak_pss_mb']:.0f} ({r['peak_rss_mb']:.0f}) | "
                         f"{r['images_per_s'] / top:.2f} |")
    if "local" in results and "ray" in results:
        lines.append(f"\nRay / local: {results['ray']['images_per_s'] / results['local']['images_per_s']:.2f} "
                     f"(stream), {results['ray']['steady_images_per_s'] / results['local']['steady_images_per_s']:.2f}"
                     " (steady)")
    c = results["ceiling"]
    lines.append(f"\nCeiling parts: decode {c['decode_images_per_s']:.1f}/s on {results['cores']} threads, "
                 f"onnxruntime {c['infer_images_per_s']:.1f}/s; staged {c['staged_images_per_s']:.1f}/s, "
                 f"fused {c['fused_images_per_s']:.1f}/s. Driver alone: {results['driver_rows_per_s']:.0f} rows/s "
                 "(1000 classes, top-5, Parquet).")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
