"""``transferkit export`` and ``transferkit predict``: thin commands over :mod:`transferkit.export.bundle` and
:mod:`transferkit.export.predictors`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from transferkit.core.console import print_summary
from transferkit.core.manifest import BACKENDS


def add_export_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="turn a training run into a validated SavedModel/ONNX bundle",
        description="Export RUN_DIR's model as a bundle: saved_model/, model.onnx (fp32), model.fp16.onnx and on "
                    "request model.int8.onnx, each taking float32 RGB 0-255 pixels named 'image' and returning "
                    "'probabilities', with the backbone's preprocessing inside. Every format is compared with the "
                    "Keras model on the run's test images; a format outside its gate stops the export (exit 4) "
                    "unless --allow-mismatch. The bundle is written atomically, described by manifest.json "
                    "(sha256 of every file) and registered in the BentoML model store.",
    )
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a directory written by `transferkit train`")
    p.add_argument("--out", type=Path, required=True, help="bundle directory to create")
    p.add_argument("--formats", default="savedmodel,onnx,onnx-fp16",
                   help=f"comma-separated, of {', '.join(BACKENDS)} (default: savedmodel,onnx,onnx-fp16)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (tf2onnx 1.17 supports 14-18; default 17)")
    p.add_argument("--name", help="BentoML model name (default: the run directory's name)")
    p.add_argument("--no-register", action="store_true", help="do not save the bundle to the BentoML model store")
    p.add_argument("--allow-mismatch", action="store_true",
                   help="publish even if a format fails its validation gate (recorded in the manifest)")
    p.add_argument("--data", type=Path,
                   help="the dataset directory, if it moved since training (default: the root in split.json)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.set_defaults(handler=run_export)


def run_export(args: argparse.Namespace) -> int:
    from transferkit.core.errors import UsageError
    from transferkit.export.bundle import export_run, parse_formats

    formats = parse_formats(args.formats)
    if not 14 <= args.opset <= 18:
        raise UsageError(f"--opset {args.opset}: tf2onnx 1.17 supports opsets 14 to 18")
    result = export_run(args.run_dir, args.out, formats, args.opset, args.name, not args.no_register,
                        args.allow_mismatch, args.force, args.data)
    m = result.manifest
    rows = [("bundle", str(result.bundle_dir)), ("model", f"{m.name} {m.version}"),
            ("backbone", f"{m.backbone} @ {m.image_size} px, {m.num_classes} classes")]
    for fmt, entry in m.formats.items():
        rows.append((fmt, f"{entry.file}  {entry.bytes / 1e6:.2f} MB  sha256 {entry.sha256[:12]}…"))
    verdict = "passed" if m.validation and m.validation.passed else "FAILED (published with --allow-mismatch)"
    rows.append(("validation", f"{verdict} on {m.validation.images} {m.validation.source} images"))
    rows.append(("BentoML tag", result.tag or "not registered (--no-register)"))
    rows.append(("time", ", ".join(f"{k} {v:.1f}s" for k, v in result.seconds.items())))
    print_summary(rows)
    target = result.tag or str(result.bundle_dir)
    print(f"\nserve it:  transferkit serve {target}   (or TRANSFERKIT_MODEL={target} bentoml serve)")
    return 0


def add_predict_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "predict", help="classify image files with a bundle and print JSON",
        description="Classify IMAGE files with a bundle (directory or BentoML model tag). Images are decoded with "
                    "the same guarded function as training. Prints a JSON list, one object per image: file, "
                    "label, score and top_k; an unreadable image gets an 'error' field and the exit status is 2.",
    )
    p.add_argument("bundle", metavar="BUNDLE", help="bundle directory or BentoML model tag")
    p.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    p.add_argument("--backend", default="onnx", choices=BACKENDS, help="format to run (default onnx)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "gpu"),
                   help="auto: CUDA if it loads, else CPU (default auto)")
    p.add_argument("--top-k", type=int, default=5, help="labels to list per image (default 5)")
    p.set_defaults(handler=run_predict)


def run_predict(args: argparse.Namespace) -> int:
    import numpy as np

    from transferkit.core.errors import InvalidImageError, UsageError
    from transferkit.core.images import decode_image
    from transferkit.export.predictors import load_bundle, top_k

    if args.top_k < 1:
        raise UsageError("--top-k must be at least 1")
    bundle = load_bundle(args.bundle)
    predictor = bundle.predictor(args.backend, args.device)
    size = bundle.manifest.image_size
    results: list[dict] = []
    pixels, positions = [], []
    for path in args.images:
        try:
            if not path.is_file():
                raise InvalidImageError("no such file")
            pixels.append(decode_image(path, size))
            positions.append(len(results))
            results.append({"file": str(path)})
        except InvalidImageError as exc:
            results.append({"file": str(path), "error": str(exc)})
    if pixels:
        probabilities = predictor(np.stack(pixels).astype(np.float32))
        for index, answer in zip(positions, top_k(probabilities, bundle.manifest.class_names, args.top_k)):
            results[index].update(answer)
    json.dump(results, sys.stdout, indent=2)
    print()
    failed = [r for r in results if "error" in r]
    print(f"{len(results) - len(failed)} classified with {bundle.manifest.name} ({args.backend} on "
          f"{predictor.provider}), {len(failed)} unreadable", file=sys.stderr)
    if failed:
        print(f"transferkit predict: error: {failed[0]['file']}: {failed[0]['error']}", file=sys.stderr)
        return 2
    return 0
