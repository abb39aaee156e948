"""``transferkit train`` and ``transferkit data``: thin argument parsing over the training library.

``train``'s options are generated from :class:`~transferkit.training.config.TrainConfig`: each field gives its flag,
type, choices, default and help, so a setting is written down once, in the model.
"""

from __future__ import annotations

import argparse
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from transferkit.core.console import print_summary
from transferkit.core.errors import UsageError
from transferkit.training.config import PER_INVOCATION, TrainConfig
from transferkit.training.rundir import read_settings

TRAIN_EPILOG = """\
examples:
  transferkit data digits --out data/digits --size 32
  transferkit train --data data/digits --out runs/digits --backbone MobileNetV2 --image-size 32 \\
      --weights none --epochs 5 --fine-tune-epochs 3 --flip none
  transferkit train --data ~/flowers --out runs/flowers --backbone EfficientNetB0   # ImageNet weights
  transferkit train --list-backbones

  transferkit train --data ~/flowers --out runs/flowers --resume   # continue an interrupted run
  transferkit train --config runs/flowers/config.json --out runs/flowers-s7 --seed 7   # the same run, one change

The run directory holds model.keras, labels.json, config.json, split.json, history.csv, metrics.json,
learning_curves.png, confusion_matrix.png, reliability.png, misclassified.png and report.md (with a fit diagnosis).
The saved model is calibrated by temperature scaling fitted on the validation split (--no-calibrate: not). The run
directory appears only when complete; while training, the run lives in .NAME.partial next to it, which Ctrl-C keeps
for --resume. Decoded images are cached in $TRANSFERKIT_CACHE_DIR (default ~/.cache/transferkit) and reused while
the files and the size are unchanged.
"""


# Where each setting appears in `transferkit train --help`, in this order (a test checks that every field is here).
OPTION_GROUPS: dict[str, tuple[str, ...]] = {
    "data and output": ("data", "out", "force", "resume", "val_fraction", "test_fraction", "strict"),
    "model": ("backbone", "image_size", "weights", "alpha", "head.kind", "head.dropout", "head.hidden_units",
              "head.hidden_dropout", "head.l2"),
    "training": ("strategy", "epochs", "fine_tune_epochs", "unfreeze", "batch_size", "learning_rate", "fine_tune_lr",
                 "optimizer", "weight_decay", "momentum", "schedule", "warmup_epochs", "label_smoothing",
                 "class_weight", "patience", "restore_best", "early_stopping_start", "seed", "cache_features",
                 "calibrate", "kfold", "mixed_precision"),
    "augmentation (training split only)": ("augment.enabled", "augment.flip", "augment.rotation", "augment.shift",
                                           "augment.zoom", "augment.contrast"),
}
SETTINGS = tuple(path for paths in OPTION_GROUPS.values() for path in paths)
# Flags other than the field's own name (--augment comes with --no-augment).
FLAGS: dict[str, tuple[str, ...]] = {
    "head.kind": ("--head",),
    "augment.enabled": ("--augment",),
    "learning_rate": ("--learning-rate", "--lr"),
}


def setting_field(path: str) -> FieldInfo:
    """The model field of a setting, by its dotted path in :class:`TrainConfig` (e.g. ``head.dropout``)."""
    model: type[BaseModel] = TrainConfig
    *parents, name = path.split(".")
    for parent in parents:
        model = model.model_fields[parent].annotation
    return model.model_fields[name]


def flags_of(path: str) -> tuple[str, ...]:
    return FLAGS.get(path, ("--" + path.rsplit(".", 1)[-1].replace("_", "-"),))


def _value_type(annotation: Any) -> tuple[type, tuple[str, ...] | None]:
    """(argparse type, choices) of a field: ``X | None`` is ``X``, a ``Literal`` gives its choices."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        (annotation,) = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
    if typing.get_origin(annotation) is typing.Literal:
        return str, typing.get_args(annotation)
    return annotation, None


def _help(field: FieldInfo, value_type: type) -> str:
    default = field.get_default(call_default_factory=False)
    text = field.description or ""
    if value_type is bool:
        text += f" (default: {'on' if default else 'off'})"
    elif default is not None and not field.is_required():
        text += f" (default: {default})"
    return text.replace("%", "%%")  # argparse formats help with %


def _add_setting(group: argparse._ArgumentGroup, path: str) -> None:
    """One option for a setting. Defaults stay with the model: an option not given leaves nothing in the namespace
    (SUPPRESS), so a --config file's value is kept and the model's default applies otherwise."""
    field = setting_field(path)
    flags = flags_of(path)
    value_type, choices = _value_type(field.annotation)
    options: dict[str, Any] = {"dest": path, "default": argparse.SUPPRESS}
    if path in PER_INVOCATION:
        options.update(action="store_true", help=field.description)
    elif value_type is bool:
        options.update(action=argparse.BooleanOptionalAction, help=_help(field, bool))
    else:
        options.update(type=value_type, choices=choices, help=_help(field, value_type))
        if choices is None:
            options["metavar"] = flags[0].removeprefix("--").replace("-", "_").upper()
    group.add_argument(*flags, **options)


def add_train_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="fine-tune a keras.applications backbone on a folder of labelled images",
        description="Two-phase transfer learning: train a new head on a frozen backbone, then fine-tune the top "
                    "backbone layers at a lower learning rate. Writes a run directory atomically.",
        epilog=TRAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--list-backbones", action="store_true", help="print the backbone registry and exit")
    p.add_argument("--config", type=Path, metavar="CONFIG_JSON",
                   help="train again with the settings of a run's config.json (or its run directory); the options "
                        "given here override them (--force and --resume are never taken from it)")
    for title, paths in OPTION_GROUPS.items():
        group = p.add_argument_group(title)
        for path in paths:
            _add_setting(group, path)
    p.set_defaults(handler=run_train)


def _given_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given on the command line, nested like the model (``head.dropout`` -> ``{"head": {...}}``)."""
    settings: dict[str, Any] = {}
    for path in SETTINGS:
        if hasattr(args, path):
            *parents, name = path.split(".")
            target = settings
            for parent in parents:
                target = target.setdefault(parent, {})
            target[name] = getattr(args, path)
    return settings


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            value = _merge(merged[key], value)
        merged[key] = value
    return merged


def _one_line(error: ValidationError) -> str:
    """Pydantic's errors as one line, each named by its flag (a --config file's unknown key by the key)."""
    flags = {path: flags_of(path)[0] for path in SETTINGS}
    problems = []
    for item in error.errors():
        path = ".".join(str(part) for part in item["loc"])
        message = item["msg"].removeprefix("Value error, ")
        if not path:  # a rule across settings: its message names the flags
            problems.append(message)
            continue
        got = "" if item["type"] == "missing" else f" (got {item['input']!r})"
        problems.append(f"{flags.get(path, path)}: {message}{got}")
    return "; ".join(problems)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The configuration of ``transferkit train ARGS``: a --config file's settings, then the options given."""
    recorded = read_settings(args.config) if args.config else {}
    settings = _merge(recorded, _given_settings(args))
    if "data" not in settings or "out" not in settings:
        raise UsageError("train needs --data DIR and --out DIR (or --config RUN/config.json, or --list-backbones)")
    try:
        return TrainConfig.model_validate(settings)
    except ValidationError as exc:
        raise UsageError(_one_line(exc)) from None


def print_backbones() -> None:
    from transferkit.core.backbones import registry

    header = ("backbone", "family", "size", "min", "preprocessing", "imagenet sizes", "alphas", "params", "top1")
    rows = []
    for b in registry().values():
        pub = b.published
        params = (f"{pub.parameters:,}" if pub and pub.parameters else
                  f"{pub.parameters_approx}M" if pub and pub.parameters_approx else "-")
        rows.append((b.name, b.family, str(b.default_size), str(b.min_size), b.preprocessing,
                     ",".join(map(str, b.imagenet_sizes)) if b.imagenet_sizes else "any",
                     ",".join(map(str, b.alphas)) if b.alphas else "-", params,
                     f"{pub.top1:.3f}" if pub and pub.top1 else "-"))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


def run_train(args: argparse.Namespace) -> int:
    if args.list_backbones:
        print_backbones()
        return 0
    config = config_from_args(args)  # before importing TensorFlow: a usage error is instant
    from transferkit.training.train import train

    print_summary(_summary(train(config, log=print)))
    return 0


def _summary(result) -> list[tuple[str, str]]:
    """The closing lines of ``transferkit train`` for a finished run (a ``TrainResult``)."""
    metrics, config = result.metrics, result.config
    failures = metrics.get("failures", [])
    if "test" not in metrics:  # evaluation failed: the model is saved, the numbers are missing
        return [("run directory", str(result.run_dir)), *((f"failed: {f['step']}", f["error"]) for f in failures)]
    test = metrics["test"]
    summary = [
        ("run directory", str(result.run_dir)),
        ("backbone", f"{config['backbone']} @ {config['image_size']} px, "
                     f"weights {config['weights_resolved']}, {config['strategy']}"),
        ("epochs", f"{metrics['epochs']['phase1']} + {metrics['epochs']['phase2']} (phase 1 + 2)"),
        ("test accuracy", f"{test['accuracy']:.4f}" + (f"  (top-5 {test['top5_accuracy']:.4f})"
                                                         if "top5_accuracy" in test else "")),
        ("test loss", f"{test['loss']:.4f}"),
        ("diagnosis", (metrics.get("diagnosis") or {}).get("verdict", "-")),
        ("time", ", ".join(f"{k.replace('_seconds', '')} {v:.1f}s" for k, v in metrics["timings"].items())),
    ]
    if "kfold" in metrics:
        s = metrics["kfold"]["summary"]["accuracy"]
        summary.append((f"{metrics['kfold']['k']}-fold accuracy", f"{s['mean']:.4f} ± {s['std']:.4f}"))
    summary.append(("report", str(result.run_dir / "report.md")))
    summary += [(f"failed: {f['step']}", f"{f['error']} (the run is complete without it)") for f in failures]
    return summary


def add_data_parser(subparsers) -> None:
    p = subparsers.add_parser("data", help="write an embedded dataset as class-folder images",
                              description="Write a dataset that ships with a dependency as class-folder images.")
    sub = p.add_subparsers(dest="dataset", required=True, metavar="DATASET")
    d = sub.add_parser("digits", help="scikit-learn's 1,797 handwritten digits (8x8 scans) as PNG files",
                       description="Write scikit-learn's handwritten digits as DIR/<digit>/<index>.png, upscaled "
                                   "to --size px RGB: the embedded default for demos and tests.")
    d.add_argument("--out", type=Path, required=True, help="directory to create")
    d.add_argument("--size", type=int, default=32, help="image size in px (default 32)")
    d.add_argument("--classes", help="digits to include, e.g. 0-4 or 5,6,7 (default: all ten)")
    d.add_argument("--per-class", type=int, help="keep only the first N images of each digit")
    d.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.set_defaults(handler=run_data)


def run_data(args: argparse.Namespace) -> int:
    from transferkit.training.digits import parse_classes, write_digits

    counts = write_digits(args.out, args.size, parse_classes(args.classes), args.force, args.per_class)
    print(f"wrote {sum(counts.values())} images of {len(counts)} classes to {args.out.absolute()}")
    print("  " + ", ".join(f"{k}: {v}" for k, v in counts.items()))
    return 0
