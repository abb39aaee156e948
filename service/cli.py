"""``transferkit serve``: a convenience wrapper around ``bentoml serve transferkit.service.service:ImageClassifier``."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from transferkit.core.manifest import BACKENDS

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def add_serve_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "serve", help="serve a bundle over HTTP with BentoML (adaptive batching)",
        description="Start `bentoml serve` for MODEL (a BentoML model tag such as digits:latest, or a bundle "
                    "directory). POST /predict takes multipart 'images' file fields and answers a JSON list of "
                    "{label, score, top_k}; GET /metadata, /livez, /readyz and /metrics describe the server. "
                    "Every option maps to a TRANSFERKIT_* environment variable read by service/service.py.",
    )
    p.add_argument("model", metavar="MODEL", help="BentoML model tag or bundle directory")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=3000, help="port (default 3000)")
    p.add_argument("--backend", default="onnx", choices=BACKENDS, help="bundle format to run (default onnx)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "gpu"),
                   help="auto: CUDA when it really loads, else CPU")
    p.add_argument("--max-batch-size", type=int, default=32, help="images per model call (default 32)")
    p.add_argument("--max-latency-ms", type=int, default=10_000,
                   help="adaptive batching latency budget; requests that cannot meet it get 503 (default 10000)")
    p.add_argument("--max-images", type=int, default=16, help="images per request (default 16)")
    p.add_argument("--top-k", type=int, default=5, help="labels listed per image (default 5)")
    p.set_defaults(handler=run_serve)


def serve_environment(args: argparse.Namespace, model: str) -> dict[str, str]:
    return {
        **os.environ,
        "TRANSFERKIT_MODEL": model,
        "TRANSFERKIT_BACKEND": args.backend,
        "TRANSFERKIT_DEVICE": args.device,
        "TRANSFERKIT_MAX_BATCH_SIZE": str(args.max_batch_size),
        "TRANSFERKIT_MAX_LATENCY_MS": str(args.max_latency_ms),
        "TRANSFERKIT_MAX_IMAGES": str(args.max_images),
        "TRANSFERKIT_TOP_K": str(args.top_k),
        "BENTOML_DO_NOT_TRACK": "true",
    }


def run_serve(args: argparse.Namespace) -> int:
    from transferkit.core.errors import UsageError
    from transferkit.export.predictors import load_bundle

    if args.max_batch_size < 2:
        raise UsageError("--max-batch-size must be at least 2 (BentoML's batcher needs room to batch)")
    model = args.model
    if Path(model).is_dir():
        model = str(Path(model).resolve())
    # Fail here with one line rather than in a server log: the bundle must exist, verify and have the format.
    bundle = load_bundle(model, formats=None)
    if args.backend not in bundle.manifest.formats:
        raise UsageError(f"{args.model} has no {args.backend} format (it has {', '.join(bundle.manifest.formats)})")
    print(f"serving {bundle.manifest.name} {bundle.manifest.version} ({bundle.manifest.backbone}, "
          f"{len(bundle.manifest.class_names)} classes) with {args.backend} on http://{args.host}:{args.port}")
    print(f"  try: curl -F images=@photo.jpg http://{args.host}:{args.port}/predict", flush=True)
    command = [sys.executable, "-m", "bentoml", "serve", "transferkit.service.service:ImageClassifier",
               "--working-dir", str(PROJECT_ROOT), "--host", args.host, "--port", str(args.port)]
    os.execve(sys.executable, command, serve_environment(args, model))
    return 0  # not reached
