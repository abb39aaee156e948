"""``transferkit export``: a thin command over :mod:`transferkit.export.bundle` (a run directory) and
:mod:`transferkit.export.foreign` (a Keras model file transferkit did not train)."""

from __future__ import annotations

import argparse
from pathlib import Path

from transferkit.core.console import print_summary
from transferkit.core.manifest import BACKENDS
from transferkit.export.quantize import METHODS as INT8_METHODS

MODEL_FLAGS = ("labels", "image_size", "preprocessing", "outputs")  # a model file's; a run directory records them


class _ExamplesFormatter(argparse.HelpFormatter):
    """Wraps the description as usual but prints the examples epilog line by line (one command per line)."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text.startswith("examples:"):
            return "\n".join(indent + line for line in text.splitlines())
        return super()._fill_text(text, width, indent)


def add_export_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="turn a training run, or any Keras model file, into a validated SavedModel/ONNX bundle",
        description="Export a model as a bundle: saved_model/, model.onnx (fp32), model.fp16.onnx and on "
                    "request model.int8.onnx, each taking uint8 RGB pixels [N, H, W, 3] named 'image' and "
                    "returning float32 'probabilities', with the cast and the preprocessing inside. The source is "
                    "either RUN_DIR, a directory written by `transferkit train` (its labels, image size, "
                    "preprocessing and test images are in the run), or MODEL.keras (or .h5), a Keras classifier "
                    "transferkit did not train: then --data DIR (class sub-folders of images) gives the validation "
                    "images, the class names are its sorted folder names unless --labels says otherwise, the input "
                    "size is read from the model (--image-size where it is not fixed), --preprocessing says what "
                    "the model expects of its pixels, and logits get a softmax appended (--outputs). Every "
                    "format is compared with the Keras model on those images (evenly across classes): its "
                    "error bound max |dp| is measured, top-1 flips are counted only where the Keras margin exceeds "
                    "twice that bound, and fp16/int8 must keep the accuracy within 0.5/1.5 points. A format "
                    "outside its gate stops the export (exit 4) unless --allow-mismatch. The bundle is written "
                    "atomically, described by manifest.json (sha256 of every file, input dtype, the resize rule) "
                    "and MODEL_CARD.md, and registered in the BentoML model store.",
        epilog="examples:\n"
               "  transferkit export runs/flowers --out bundles/flowers\n"
               "  transferkit export flowers.keras --data photos/val --preprocessing MobileNetV2 --out bundles/f\n"
               "  transferkit export net.keras --data photos --labels labels.json --image-size 160 "
               "--preprocessing tf --out bundles/net",
        formatter_class=_ExamplesFormatter,
    )
    p.add_argument("source", type=Path, metavar="RUN_DIR | MODEL.keras",
                   help="a directory written by `transferkit train`, or a Keras model file (.keras, .h5)")
    p.add_argument("--out", type=Path, required=True, help="bundle directory to create")
    p.add_argument("--formats", default="savedmodel,onnx,onnx-fp16",
                   help=f"comma-separated, of {', '.join(BACKENDS)} (default: savedmodel,onnx,onnx-fp16)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (tf2onnx 1.17 supports 14-18; default 17)")
    p.add_argument("--name", help="BentoML model name (default: the run directory's or model file's name)")
    p.add_argument("--no-register", action="store_true", help="do not save the bundle to the BentoML model store")
    p.add_argument("--allow-mismatch", action="store_true",
                   help="publish even if a format fails its validation gate (recorded in the manifest)")
    p.add_argument("--data", type=Path,
                   help="RUN_DIR: the dataset directory, if it moved since training (default: the root in "
                        "split.json). MODEL.keras (required): a folder of class sub-folders of images (or "
                        "train/val/test of them) to validate on; up to 512 images are taken evenly across classes")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--int8-calibration", choices=INT8_METHODS, default="minmax",
                   help="how onnx-int8 sets each activation's range from the calibration images: minmax (every "
                        "value seen; default), entropy or percentile (clip long tails). The file is uint8 "
                        "activations x int8 per-channel weights, the form x86 int8 kernels run fastest; nodes that "
                        "quantize worst stay float until int8 agrees with fp32 (see the manifest's quantization)")
    model = p.add_argument_group("a Keras model file (MODEL.keras) only")
    model.add_argument("--labels", type=Path, metavar="LABELS.json",
                       help="a JSON list of class names in the order of the model's outputs (default: the sorted "
                            "folder names of --data, as `transferkit train` and Keras' image_dataset_from_directory "
                            "name them); their count must equal the model's output units")
    model.add_argument("--image-size", type=int, metavar="N",
                       help="input size in pixels (default: read from the model's input shape; required when the "
                            "model takes any size)")
    model.add_argument("--preprocessing", metavar="MODE",
                       help="what the model expects of its RGB pixels, done inside the exported graph: none "
                            "(0-255 floats; the default, right for a model with its own Rescaling layer), scale "
                            "([0, 1]), tf ([-1, 1]), caffe (BGR minus the ImageNet mean), torch ([0, 1] with the "
                            "ImageNet mean/std), or a backbone name (MobileNetV2, ResNet50, ...) whose "
                            "keras.applications preprocess_input the model was trained with")
    model.add_argument("--outputs", choices=("auto", "probabilities", "logits"),
                       help="probabilities: the model ends in a softmax; logits: a softmax is appended; auto (the "
                            "default): logits unless the outputs on the --data images are non-negative and every "
                            "row sums to 1")
    p.set_defaults(handler=run_export)


def run_export(args: argparse.Namespace) -> int:
    from transferkit.core.errors import UsageError
    from transferkit.export.bundle import parse_formats
    from transferkit.export.foreign import is_model_file

    formats = parse_formats(args.formats)
    if not 14 <= args.opset <= 18:
        raise UsageError(f"--opset {args.opset}: tf2onnx 1.17 supports opsets 14 to 18")
    if is_model_file(args.source):
        return _export_model_file(args, formats)
    _check_run_source(args.source, [name for name in MODEL_FLAGS if getattr(args, name) is not None])
    from transferkit.export.bundle import export_run

    result = export_run(args.source, args.out, formats, args.opset, args.name, not args.no_register,
                        args.allow_mismatch, args.force, args.data, int8_method=args.int8_calibration)
    _print_result(result)
    return 0


def _check_run_source(source: Path, model_flags: list[str]) -> None:
    """One line for a SOURCE that is no run directory, or model-file flags given with one."""
    from transferkit.core.errors import UsageError

    if (source / "saved_model.pb").is_file():
        raise UsageError(f"{source} is a TensorFlow SavedModel; export takes a run directory or a Keras model file "
                         "(.keras, .h5): load it in Keras and save it with model.save('model.keras')")
    if source.is_file():
        raise UsageError(f"{source} is neither a run directory nor a Keras model file (.keras, .h5)")
    if model_flags:
        flags = ", ".join("--" + name.replace("_", "-") for name in model_flags)
        raise UsageError(f"{flags}: for a Keras model file only; a run directory records its own labels, image "
                         "size, preprocessing and outputs")


def _export_model_file(args: argparse.Namespace, formats: list[str]) -> int:
    from transferkit.core.errors import UsageError
    from transferkit.export.foreign import ForeignModel, export_foreign

    if args.data is None:
        raise UsageError(f"{args.source}: a Keras model file needs --data DIR, a folder of class sub-folders of "
                         "images to validate the export on")
    if args.image_size is not None and args.image_size < 1:
        raise UsageError(f"--image-size {args.image_size}: must be a positive number of pixels")
    spec = ForeignModel(path=args.source, data=args.data, labels=args.labels, image_size=args.image_size,
                        preprocessing=args.preprocessing or "none", outputs=args.outputs or "auto")
    result = export_foreign(spec, args.out, formats, args.opset, args.name, not args.no_register,
                            args.allow_mismatch, args.force, int8_method=args.int8_calibration)
    _print_result(result)
    return 0


def _print_result(result) -> None:
    m = result.manifest
    rows = [("bundle", str(result.bundle_dir)), ("model", f"{m.name} {m.version}"),
            ("backbone", f"{m.backbone} @ {m.image_size} px, {m.num_classes} classes")]
    foreign = m.training.get("source") == "keras_file"
    if foreign:
        rows.append(("source", f"{m.training['model_file']} (not trained by transferkit; outputs: "
                               f"{m.training['outputs']}, preprocessing: {m.preprocessing['mode']})"))
    for fmt, entry in m.formats.items():
        rows.append((fmt, f"{entry.file}  {entry.bytes / 1e6:.2f} MB  sha256 {entry.sha256[:12]}…"))
    int8 = m.formats["onnx-int8"].quantization if "onnx-int8" in m.formats else None
    if int8:
        kept = len(int8["excluded_nodes"])
        rows.append(("int8", f"{int8['activations']} activations x {int8['weights']} weights, {int8['method']} "
                             f"ranges{', 7-bit weights (no VNNI here)' if int8['reduce_range'] else ''}; "
                             f"{kept} node(s) kept in float; agrees with fp32 on "
                             f"{int8['calibration_agreement']:.1%} of the calibration images' decisive answers"))
    verdict = "passed" if m.validation and m.validation.passed else "FAILED (published with --allow-mismatch)"
    rows.append(("validation", f"{verdict} on {m.validation.images} {m.validation.source} images"))
    keras_accuracy = m.validation.formats[0].keras_accuracy if m.validation.formats else None
    if foreign and keras_accuracy is not None:
        # The gates compare formats with the Keras model, so a wrong --preprocessing or --labels order passes
        # them; the model's own accuracy on the images is what shows it.
        near_chance = keras_accuracy < 1.5 / m.num_classes
        rows.append(("keras accuracy", f"{keras_accuracy:.4f} on those images" + (
            " (near chance: check --preprocessing and the --labels order)" if near_chance else "")))
    calibration = m.calibration or {}
    reason = calibration.get("reason") or ("not trained by transferkit" if foreign else "not recorded")
    rows.append(("calibration", f"temperature {calibration['temperature']:.4f} (in every format)"
                 if calibration.get("applied") else f"none ({reason})"))
    if "model_card" in m.documents:
        rows.append(("model card", m.documents["model_card"].file))
    rows.append(("BentoML tag", result.tag or "not registered (--no-register)"))
    rows.append(("time", ", ".join(f"{k} {v:.1f}s" for k, v in result.seconds.items())))
    print_summary(rows)
    target = result.tag or str(result.bundle_dir)
    print(f"\nserve it:  transferkit serve {target}   (or TRANSFERKIT_MODEL={target} bentoml serve)")
