"""``transferkit predict``: a thin command over :mod:`transferkit.export.predictors`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from transferkit.core.manifest import BACKENDS


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
