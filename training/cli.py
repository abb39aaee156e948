"""``transferkit train`` and ``transferkit data``: thin argument parsing over the training library."""

from __future__ import annotations

import argparse
from pathlib import Path

from transferkit.core.console import print_summary
from transferkit.training.config import (
    CLASS_WEIGHTS,
    FLIPS,
    OPTIMIZERS,
    SCHEDULES,
    STRATEGIES,
    AugmentConfig,
    HeadConfig,
    TrainConfig,
)

TRAIN_EPILOG = """\
examples:
  transferkit data digits --out data/digits --size 32
  transferkit train --data data/digits --out runs/digits --backbone MobileNetV2 --image-size 32 \\
      --weights none --epochs 5 --fine-tune-epochs 3 --flip none
  transferkit train --data ~/flowers --out runs/flowers --backbone EfficientNetB0   # ImageNet weights
  transferkit train --list-backbones

  transferkit train --data ~/flowers --out runs/flowers --resume   # continue an interrupted run

The run directory holds model.keras, labels.json, config.json, split.json, history.csv, metrics.json,
learning_curves.png, confusion_matrix.png, misclassified.png and report.md (with a fit diagnosis). It appears only
when complete; while training, the run lives in .NAME.partial next to it, which Ctrl-C keeps for --resume.
Decoded images are cached in $TRANSFERKIT_CACHE_DIR (default ~/.cache/transferkit) and reused while the files and
the size are unchanged.
"""


def add_train_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="fine-tune a keras.applications backbone on a folder of labelled images",
        description="Two-phase transfer learning: train a new head on a frozen backbone, then fine-tune the top "
                    "backbone layers at a lower learning rate. Writes a run directory atomically.",
        epilog=TRAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--list-backbones", action="store_true", help="print the backbone registry and exit")
    io = p.add_argument_group("data and output")
    io.add_argument("--data", type=Path, help="class-folder dataset, or a folder with train/ val/ test/ sub-folders")
    io.add_argument("--out", type=Path, help="run directory to create")
    io.add_argument("--force", action="store_true", help="replace --out (and any interrupted run of it)")
    io.add_argument("--resume", action="store_true",
                    help="continue the interrupted run of --out (same settings) from its last finished epoch")
    io.add_argument("--val-fraction", type=float, default=0.15, help="validation share when not pre-split")
    io.add_argument("--test-fraction", type=float, default=0.15, help="test share when not pre-split")
    io.add_argument("--strict", action="store_true", help="fail on the first unreadable image instead of skipping it")
    m = p.add_argument_group("model")
    m.add_argument("--backbone", default="MobileNetV2", help="a registry name (see --list-backbones)")
    m.add_argument("--image-size", type=int, help="square input size in px (default: the backbone's)")
    m.add_argument("--weights", default="imagenet",
                   help="imagenet (default), none, a weights file, or a previous run directory (same backbone)")
    m.add_argument("--alpha", type=float, help="width multiplier (MobileNet families)")
    m.add_argument("--head", choices=("pool", "flatten"), default="pool",
                   help="pool: GAP->dropout->softmax; flatten: avgpool 2x2->flatten->dense 128->dropout 0.4")
    m.add_argument("--dropout", type=float, default=0.2, help="dropout after pooling (pool head)")
    m.add_argument("--hidden-units", type=int, default=0, help="add a hidden dense layer of this width")
    m.add_argument("--hidden-dropout", type=float, help="dropout after the hidden layer")
    m.add_argument("--l2", type=float, default=0.0, help="L2 weight decay on the head's dense layers")
    t = p.add_argument_group("training")
    t.add_argument("--strategy", choices=STRATEGIES,
                   help="feature-extraction: phase 1 only; fine-tune: both phases; scratch: random weights, "
                        "everything trainable (the baseline transfer is compared against). Default: scratch with "
                        "--weights none, fine-tune otherwise")
    t.add_argument("--epochs", type=int, default=10, help="phase-1 epochs (max; early stopping)")
    t.add_argument("--fine-tune-epochs", type=int, default=5, help="phase-2 epochs (0 skips fine-tuning)")
    t.add_argument("--unfreeze", default="50",
                   help="phase 2 unfreezes the top N backbone layers, from a named layer on, or 'all'")
    t.add_argument("--batch-size", type=int, default=32)
    t.add_argument("--learning-rate", "--lr", type=float, default=1e-3, help="phase-1 learning rate")
    t.add_argument("--fine-tune-lr", type=float, help="phase-2 learning rate (default: phase-1 rate / 10)")
    t.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw", help="default adamw")
    t.add_argument("--weight-decay", type=float, default=1e-4, help="decoupled weight decay (adamw)")
    t.add_argument("--momentum", type=float, default=0.9, help="momentum for sgd")
    t.add_argument("--schedule", choices=SCHEDULES, default="cosine",
                   help="cosine: linear warm-up, then cosine decay to 0 over each phase's epochs; constant")
    t.add_argument("--warmup-epochs", type=float, default=1.0, help="linear warm-up per phase (cosine schedule)")
    t.add_argument("--label-smoothing", type=float, default=0.1, help="label smoothing of the loss (default 0.1)")
    t.add_argument("--class-weight", choices=CLASS_WEIGHTS, default="none",
                   help="balanced: weight the loss by n / (classes x count), for imbalanced folders")
    t.add_argument("--patience", type=int, default=5, help="early-stopping patience (epochs, on val loss)")
    t.add_argument("--restore-best", action=argparse.BooleanOptionalAction, default=True,
                   help="end each phase with the weights of its best epoch by validation loss (default); "
                        "--no-restore-best keeps the last epoch's, e.g. when a few dozen validation images are too "
                        "few to pick an epoch by and the cosine schedule ends at 0")
    t.add_argument("--early-stopping-start", type=int,
                   help="epochs before early stopping may stop or pick a best epoch (default: 0; a third of "
                        "--epochs for scratch, whose BatchNormalization statistics lag at first)")
    t.add_argument("--seed", type=int, default=42, help="seed for the split, initialisation and shuffling")
    t.add_argument("--cache-features", action="store_true",
                   help="phase 1 on features computed once by the frozen base (needs --no-augment)")
    t.add_argument("--kfold", type=int, default=0, help="also run K-fold cross-validation and report mean ± std")
    t.add_argument("--mixed-precision", action="store_true", help="float16 compute on GPU")
    a = p.add_argument_group("augmentation (training split only)")
    a.add_argument("--no-augment", action="store_true", help="turn augmentation off")
    a.add_argument("--flip", choices=FLIPS, default="horizontal")
    a.add_argument("--rotation", type=float, default=0.1, help="max rotation, fraction of a full turn")
    a.add_argument("--shift", type=float, default=0.1, help="max translation, fraction of the size")
    a.add_argument("--zoom", type=float, default=0.1)
    a.add_argument("--contrast", type=float, default=0.1)
    p.set_defaults(handler=run_train)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    strategy = args.strategy or ("scratch" if args.weights == "none" else "fine-tune")
    return TrainConfig(
        data=str(args.data), out=str(args.out), backbone=args.backbone, image_size=args.image_size,
        weights=args.weights, strategy=strategy, alpha=args.alpha, epochs=args.epochs,
        fine_tune_epochs=0 if strategy != "fine-tune" else args.fine_tune_epochs,
        batch_size=args.batch_size, learning_rate=args.learning_rate, fine_tune_lr=args.fine_tune_lr,
        optimizer=args.optimizer, weight_decay=args.weight_decay, momentum=args.momentum, schedule=args.schedule,
        warmup_epochs=args.warmup_epochs, label_smoothing=args.label_smoothing, class_weight=args.class_weight,
        early_stopping_start=args.early_stopping_start, unfreeze=args.unfreeze, patience=args.patience,
        restore_best=args.restore_best,
        head=HeadConfig(args.head, args.dropout, args.hidden_units, args.hidden_dropout, args.l2),
        augment=AugmentConfig(not args.no_augment, args.flip, args.rotation, args.shift, args.zoom, args.contrast),
        val_fraction=args.val_fraction, test_fraction=args.test_fraction, seed=args.seed, strict=args.strict,
        cache_features=args.cache_features, kfold=args.kfold, mixed_precision=args.mixed_precision,
        force=args.force, resume=args.resume,
    )


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
    from transferkit.core.errors import UsageError

    if args.list_backbones:
        print_backbones()
        return 0
    if args.data is None or args.out is None:
        raise UsageError("train needs --data DIR and --out DIR (or --list-backbones)")
    from transferkit.training.train import train

    result = train(config_from_args(args), log=print)
    metrics = result.metrics
    failures = metrics.get("failures", [])
    if "test" not in metrics:  # evaluation failed: the model is saved, the numbers are missing
        print_summary([("run directory", str(result.run_dir)),
                       *((f"failed: {f['step']}", f["error"]) for f in failures)])
        return 0
    test = metrics["test"]
    summary = [
        ("run directory", str(result.run_dir)),
        ("backbone", f"{result.config['backbone']} @ {result.config['image_size']} px, "
                     f"weights {result.config['weights_resolved']}, {result.config['strategy']}"),
        ("epochs", f"{result.metrics['epochs']['phase1']} + {result.metrics['epochs']['phase2']} (phase 1 + 2)"),
        ("test accuracy", f"{test['accuracy']:.4f}" + (f"  (top-5 {test['top5_accuracy']:.4f})"
                                                         if "top5_accuracy" in test else "")),
        ("test loss", f"{test['loss']:.4f}"),
        ("diagnosis", (result.metrics.get("diagnosis") or {}).get("verdict", "-")),
        ("time", ", ".join(f"{k.replace('_seconds', '')} {v:.1f}s" for k, v in result.metrics["timings"].items())),
    ]
    if "kfold" in result.metrics:
        s = result.metrics["kfold"]["summary"]["accuracy"]
        summary.append((f"{result.metrics['kfold']['k']}-fold accuracy", f"{s['mean']:.4f} ± {s['std']:.4f}"))
    summary.append(("report", str(result.run_dir / "report.md")))
    summary += [(f"failed: {f['step']}", f"{f['error']} (the run is complete without it)") for f in failures]
    print_summary(summary)
    return 0


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
