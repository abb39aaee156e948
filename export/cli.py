"""``transferkit export``: a thin command over :mod:`transferkit.export.bundle`."""

from __future__ import annotations

import argparse
from pathlib import Path

from transferkit.core.console import print_summary
from transferkit.core.manifest import BACKENDS


def add_export_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="turn a training run into a validated SavedModel/ONNX bundle",
        description="Export RUN_DIR's model as a bundle: saved_model/, model.onnx (fp32), model.fp16.onnx and on "
                    "request model.int8.onnx, each taking uint8 RGB pixels [N, H, W, 3] named 'image' and "
                    "returning float32 'probabilities', with the cast and the backbone's preprocessing inside. Every "
                    "format is compared with the Keras model on the run's test images (evenly across classes): its "
                    "error bound max |dp| is measured, top-1 flips are counted only where the Keras margin exceeds "
                    "twice that bound, and fp16/int8 must keep the accuracy within 0.5/1.5 points. A format "
                    "outside its gate stops the export (exit 4) unless --allow-mismatch. The bundle is written "
                    "atomically, described by manifest.json (schema 2: sha256 of every file, input dtype, the "
                    "resize rule) and registered in the BentoML model store.",
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
    calibration = m.calibration or {}
    rows.append(("calibration", f"temperature {calibration['temperature']:.4f} (in every format)"
                 if calibration.get("applied") else f"none ({calibration.get('reason') or 'not recorded'})"))
    if "model_card" in m.documents:
        rows.append(("model card", m.documents["model_card"].file))
    rows.append(("BentoML tag", result.tag or "not registered (--no-register)"))
    rows.append(("time", ", ".join(f"{k} {v:.1f}s" for k, v in result.seconds.items())))
    print_summary(rows)
    target = result.tag or str(result.bundle_dir)
    print(f"\nserve it:  transferkit serve {target}   (or TRANSFERKIT_MODEL={target} bentoml serve)")
    return 0
