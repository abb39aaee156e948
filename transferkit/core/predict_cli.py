"""``transferkit predict``: classify files, folders, globs or path lists with a bundle, locally or on Ray Data.

A thin command over :mod:`transferkit.core.classifier` (the Python facade): inputs from :mod:`~transferkit.core.inputs`,
engines from :mod:`~transferkit.core.batch` and :mod:`~transferkit.core.ray_engine`, result files from
:mod:`~transferkit.core.outputs`, metrics from :mod:`~transferkit.core.evaluation`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from transferkit.core import stopping
from transferkit.core.atomic import atomic_output_dir, check_output_dir
from transferkit.core.console import print_summary
from transferkit.core.errors import OutputExistsError, UsageError
from transferkit.core.extras import require_module
from transferkit.core.inputs import Item, expand_inputs
from transferkit.core.manifest import RUNTIME_BACKENDS
from transferkit.core.outputs import (
    COLUMNS,
    PathKey,
    RowWriter,
    absolute_path,
    display_path,
    done_rows,
    has_output,
    open_writer,
    output_format,
    parts_dir,
    stored_path,
    written_by_transferkit,
)
from transferkit.core.system import available_cores

# The runtime (numpy, Pillow, onnxruntime, tqdm) is imported where it runs: every `transferkit` command imports this
# module for its parser.
if TYPE_CHECKING:
    from transferkit.core.batch import Outcome
    from transferkit.core.classifier import BundleClassifier
    from transferkit.core.evaluation import Evaluation
    from transferkit.core.manifest import Manifest
    from transferkit.core.progress import Progress

STDOUT_LIMIT = 1000  # images; beyond that a JSON list on stdout is the wrong tool (and would sit in memory)
LISTED = 10  # skipped / unreadable files named in the summary


def _paragraphs(text: str, width: int = 100) -> str:
    """Wrap each paragraph on its own (argparse's default formatter would merge them into one)."""
    return "\n\n".join(textwrap.fill(paragraph, width) for paragraph in text.split("\n\n"))


def add_predict_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "predict", help="classify images, folders or path lists with a bundle (CSV/JSONL/Parquet or JSON out)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=_paragraphs(
                    "Classify images with a bundle (a bundle directory or a BentoML model tag; every file's "
                    "checksum is verified first).\n\n"
                    "INPUT is any mix of image files, directories (searched recursively; files whose content is "
                    "not an image are skipped and listed), globs ('photos/**/*.jpg', quoted) and text or CSV "
                    "lists of paths (.txt/.lst one per line, .csv with a 'path' column; relative to the list).\n\n"
                    "Images are decoded in parallel by the guarded decoder shared with training and serving and "
                    "classified in batches of --batch-size, in bounded memory whatever the number of files, with a "
                    "progress bar on stderr and a summary at the end.\n\n"
                    "With --out FILE.csv|.jsonl|.parquet: one row per image (path, label, score, top_k, error; "
                    "path absolute, a name that is not UTF-8 with \\xNN escapes), written and fsynced as batches "
                    "finish (Parquet: each batch a part in FILE.parts/, merged into FILE at the end), so a killed "
                    "run loses at most its batches in flight; unreadable files get a row with an error (exit status "
                    "0: the errors are in the file and the summary). --resume skips the files already in FILE, "
                    "whatever the working directory or the spelling of the inputs (paths are compared resolved); "
                    "--retry-failed also classifies again the files that could not be read (not those that are not "
                    "valid images). Without "
                    "--out: a JSON list on stdout (up to 1000 images); exit status 2 if any image is unreadable. "
                    "Either way, exit status 2 when nothing could be classified (every input unreadable or not an "
                    "image).\n\n"
                    "--evaluate takes each image's parent folder name as its true label and writes accuracy, "
                    "top-5, per-class precision/recall/F1 and a confusion matrix (the training report's code).\n\n"
                    "--engine ray runs the same pipeline on Ray Data (decode tasks, then an actor pool in which "
                    "each actor loads the bundle once; one actor per CPU, or per GPU when the cluster has GPUs): "
                    "a local Ray, or the cluster at --address (inputs and bundle on storage every node sees)."),
    )
    p.add_argument("bundle", metavar="BUNDLE", help="bundle directory or BentoML model tag")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image file, directory, glob or .txt/.csv list")
    p.add_argument("--out", type=Path, metavar="FILE", help="write rows to FILE (.csv, .jsonl or .parquet)")
    p.add_argument("--resume", action="store_true", help="continue --out FILE: skip the files already in it")
    p.add_argument("--retry-failed", action="store_true",
                   help="with --resume: classify again the files whose row says they could not be read "
                        "(no such file, cannot read: ...), replacing those rows")
    p.add_argument("--force", action="store_true", help="replace an existing --out FILE / --report-dir")
    p.add_argument("--batch-size", type=int, default=32, help="images per model call (default 32)")
    p.add_argument("--workers", type=int, default=None,
                   help="local: decode+classify threads (default: the cores this process may use); "
                        "ray: actors (default: one per CPU, or per GPU)")
    p.add_argument("--engine", default="local", choices=("local", "ray"), help="local (default) or ray")
    p.add_argument("--address", metavar="ADDR",
                   help="--engine ray: join the Ray cluster at ADDR (e.g. ray://head:10001 or head:6379) "
                        "instead of starting a local Ray")
    p.add_argument("--evaluate", action="store_true",
                   help="parent folder names are the true labels: write metrics and a confusion matrix")
    p.add_argument("--report-dir", type=Path, metavar="DIR",
                   help="where --evaluate writes metrics.json/.md and confusion_matrix.png (default: "
                        "FILE-evaluation/ beside --out, else ./evaluation)")
    p.add_argument("--backend", default="auto", choices=("auto", *RUNTIME_BACKENDS),
                   help="what runs the model (default auto: the fastest backend the bundle was validated for, "
                        "measured once on this machine; openvino* need transferkit[openvino])")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "gpu"),
                   help="auto: CUDA if it loads, else CPU (default auto)")
    p.add_argument("--top-k", type=int, default=5, help="labels to list per image (default 5)")
    p.add_argument("--explain", type=Path, metavar="DIR",
                   help="also write each image's class activation map (where the model looked for its top class) "
                        "as an overlay PNG under DIR, mirroring the inputs' paths (local engine; bundles whose "
                        "head has a map: see the manifest's 'explain')")
    p.set_defaults(handler=run_predict)


def _check_arguments(args: argparse.Namespace) -> Path | None:
    """Every refusal that needs no work; returns the --evaluate report directory."""
    if args.top_k < 1:
        raise UsageError("--top-k must be at least 1")
    if args.batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    if args.workers is not None and args.workers < 1:
        raise UsageError("--workers must be at least 1")
    if args.address and args.engine != "ray":
        raise UsageError("--address joins a Ray cluster: add --engine ray")
    if args.resume and not args.out:
        raise UsageError("--resume continues an output file: give it with --out")
    if args.retry_failed and not args.resume:
        raise UsageError("--retry-failed classifies again the unreadable files of an output: add --resume")
    if args.resume and args.evaluate:
        raise UsageError("--evaluate needs every image's probabilities: run it without --resume")
    if args.explain and (args.resume or args.engine == "ray"):
        raise UsageError("--explain writes a new folder of overlays with the local engine: run it without "
                         + ("--resume" if args.resume else "--engine ray"))
    if args.explain:
        check_output_dir(args.explain, args.force, protected=[Path(args.bundle), *map(Path, args.inputs)])
    if args.out:
        output_format(args.out)
        if args.out.is_dir():
            raise UsageError(f"--out {args.out} is a directory; give a file name ending in .csv/.jsonl/.parquet")
        if args.out.exists() and not (args.resume or args.force):
            raise OutputExistsError(f"{args.out} exists: --resume continues it, --force replaces it")
        if has_output(args.out) and not (args.resume or args.force):
            raise OutputExistsError(f"{parts_dir(args.out)} holds the rows of a run that was stopped before its "
                                    "end: --resume continues it, --force starts over")
        if args.out.exists() and args.force and not written_by_transferkit(args.out):
            raise OutputExistsError(f"{args.out} exists and transferkit predict did not write it (its first row does "
                                    f"not name the columns {', '.join(COLUMNS)}): --force replaces only "
                                    "transferkit's own files")
    report_dir = None
    if args.evaluate:
        report_dir = args.report_dir or (args.out.with_name(args.out.stem + "-evaluation") if args.out
                                         else Path("evaluation"))
        check_output_dir(report_dir, args.force, protected=[Path(args.bundle), *map(Path, args.inputs)])
    if args.engine == "ray":
        from transferkit.core.ray_engine import import_ray

        import_ray()  # a missing extra is a one-line error before the bundle is loaded
    return report_dir


def _listed(paths: list[str], total: int) -> str:
    more = f" ... and {total - len(paths)} more" if total > len(paths) else ""
    return ", ".join(paths) + more


@dataclass
class _Results:
    """What a run of the classifier left: the counts (in ``progress``), the first files that failed or were skipped
    (for the summary), the JSON for stdout without --out, and whether Ctrl-C ended it."""

    progress: Progress
    evaluation: Evaluation | None
    printed: list[dict] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # the first LISTED unreadable files, with the error
    skipped: list[str] = field(default_factory=list)  # the first LISTED non-images
    interrupted: bool = False

    @property
    def classified(self) -> int:
        return self.progress.done - self.progress.errors - self.progress.skipped


def run_predict(args: argparse.Namespace) -> int:
    from transferkit.core.classifier import load_bundle

    report_dir = _check_arguments(args)
    # Before any output: what an extra provides fails here, not after a header (or every row) was written.
    if args.backend != "auto":
        require_module(RUNTIME_BACKENDS[args.backend].engine, f"--backend {args.backend}")
    if args.evaluate:
        require_module("sklearn", "--evaluate")
    classifier = load_bundle(args.bundle, args.backend, args.device)
    if args.explain:
        classifier = _explaining(args, classifier)
    pending = _pending(args)
    if args.explain:
        with atomic_output_dir(args.explain, args.force) as staging:
            results = _classify(args, classifier, pending, staging)
    else:
        results = _classify(args, classifier, pending)
    if results.interrupted:
        where = f"; {args.out} holds the rows so far: --resume continues" if args.out else ""
        how = "interrupted" if stopping.stop_exit_code() in (None, 130) else f"stopped by {stopping.stop_signal_name()}"
        print(f"transferkit predict: {how} after {results.progress.done} images{where}", file=sys.stderr)
        return stopping.stop_exit_code() or 130
    metrics = None
    if results.evaluation:
        context = {"bundle": f"{classifier.manifest.name} {classifier.manifest.version}",
                   "backend": classifier.backend, "inputs": " ".join(args.inputs),
                   "date": time.strftime("%Y-%m-%d %H:%M:%S")}
        metrics = results.evaluation.write(report_dir, args.force, context)
    if not args.out:
        json.dump(results.printed, sys.stdout, indent=2)
        print()
    rows = _summary_rows(args, classifier, results, pending)
    if metrics:
        rows += _metric_rows(metrics, classifier.manifest, results.evaluation, report_dir)
    # stdout carries the JSON when there is no --out: the summary goes to stderr then.
    with contextlib.redirect_stdout(sys.stdout if args.out else sys.stderr):
        print_summary(rows, title="transferkit predict")
    return _exit_status(args, results, pending.already)


def _explaining(args: argparse.Namespace, classifier: BundleClassifier) -> BundleClassifier:
    """The classifier for --explain: the one asked for when its backend answers maps; for ``auto``, whose choice
    weighs speed only, the fp32 ``onnx`` backend when the chosen one's map failed its bound at export."""
    from transferkit.core.classifier import load_bundle
    from transferkit.core.errors import NoClassActivationMap
    from transferkit.core.predictors import explaining_backend, map_refusal

    why = map_refusal(classifier.manifest, classifier.backend)
    if not why:
        return classifier
    fallback = explaining_backend(classifier.manifest, classifier.backend)
    if args.backend == "auto" and fallback is not None:
        print(f"transferkit predict: --explain: {classifier.backend} (auto's choice) answers no map here ({why}); "
              f"classifying with {fallback}", file=sys.stderr)
        return load_bundle(args.bundle, fallback, args.device)
    raise NoClassActivationMap(f"--explain: bundle {classifier.manifest.name}: {why}")


@dataclass
class _Pending:
    """The inputs to classify, how many were already in --out, and the keys of the rows --retry-failed replaces."""

    items: list[Item]
    already: int = 0
    retried: set[str] = field(default_factory=set)


def _pending(args: argparse.Namespace) -> _Pending:
    """The inputs still to classify (all of them, or with --resume those not yet in --out, and with --retry-failed
    those whose row says they could not be read)."""
    from transferkit.core.batch import is_transient

    items = list(expand_inputs(args.inputs))  # paths only (~100 bytes each): the total for the progress bar
    if args.out:  # rows name files absolutely: the output means the same from any directory
        items = [Item(absolute_path(item.path), item.named) for item in items]
    pending = _Pending(items)
    if args.resume:
        key = PathKey()
        done = done_rows(args.out, is_transient, key)
        keys = {item.path: key(item.path) for item in items}
        if args.retry_failed:
            pending.retried = done.transient & set(keys.values())  # rows of inputs not given this time stay
        skip = done.keys - pending.retried
        pending.items = [item for item in items if keys[item.path] not in skip]
        pending.already = len(items) - len(pending.items)
    _check_pending(args, pending)
    return pending


def _check_pending(args: argparse.Namespace, pending: _Pending) -> None:
    items, already = pending.items, pending.already
    if not items and not already:
        raise UsageError(f"no files to classify in {' '.join(args.inputs)}")
    if not args.out and len(items) > STDOUT_LIMIT:
        raise UsageError(f"{len(items)} images: write them to a file with --out FILE.csv|.jsonl|.parquet "
                         f"(JSON on stdout is for up to {STDOUT_LIMIT})")


def _classify(args: argparse.Namespace, classifier: BundleClassifier, pending: _Pending,
              explain_dir: Path | None = None) -> _Results:
    """Classify the pending items batch by batch into --out (or the JSON list), with the progress bar; Ctrl-C stops
    it with the rows so far written."""
    from transferkit.core.evaluation import Evaluation
    from transferkit.core.progress import Progress

    items = pending.items
    started_ray = False
    if args.engine == "ray" and items:  # nothing left after --resume: no Ray to start
        from transferkit.core.ray_engine import start_ray

        started_ray = start_ray(args.address, args.workers)
    columns = COLUMNS + (("true_label",) if args.evaluate else ())
    writer = open_writer(args.out, append=args.resume, columns=columns, drop=_retried(pending)) if args.out else None
    results = _Results(Progress(len(items), enabled=bool(args.out) or len(items) > args.batch_size),
                       Evaluation(classifier.manifest.class_names) if args.evaluate else None)
    try:
        for outcomes in classifier.outcomes(items, args.engine, args.batch_size, args.workers, explain_dir):
            _record(outcomes, results, writer, classifier.manifest.class_names, args.top_k)
    except KeyboardInterrupt:
        results.interrupted = True
    except SystemExit as exc:  # SIGTERM (core/stopping.py): like Ctrl-C, the rows so far are kept and merged
        if stopping.stop_exit_code() is None or exc.code != stopping.stop_exit_code():
            raise
        results.interrupted = True
    finally:
        if writer:
            writer.close()
        if started_ray:
            import ray

            ray.shutdown()
    results.progress.close()
    return results


def _retried(pending: _Pending):
    """For open_writer: whether a stored row is one that --retry-failed classifies again (its row is replaced)."""
    if not pending.retried:
        return None
    key = PathKey()
    return lambda stored: key(stored_path(stored)) in pending.retried


def _record(outcomes: list[Outcome], results: _Results, writer: RowWriter | None, class_names: list[str],
            top_k: int) -> None:
    """One batch's outcomes into the output, the evaluation and the counts."""
    from transferkit.core.batch import outcome_rows
    from transferkit.core.evaluation import true_label

    rows = outcome_rows(outcomes, class_names, top_k)
    if results.evaluation:
        results.evaluation.add(outcomes)
        for row in rows:
            row["true_label"] = true_label(row["path"])
    # Names for the summary and stdout as they are written (a name that is not UTF-8 cannot be printed as is).
    errors = [(display_path(row["path"]), row["error"]) for row in rows if row["error"]]
    skips = [display_path(outcome.path) for outcome in outcomes if outcome.skipped]
    results.failed += errors[:LISTED - len(results.failed)]
    results.skipped += skips[:LISTED - len(results.skipped)]
    if writer:
        writer.write(rows)
    else:
        results.printed += [{"file": display_path(r["path"]), **({"error": r["error"]} if r["error"] else
                                                    {k: r[k] for k in ("label", "score", "top_k")})} for r in rows]
    results.progress.update(len(outcomes), len(errors), len(skips))


def _summary_rows(args: argparse.Namespace, classifier: BundleClassifier, results: _Results,
                  pending: _Pending) -> list[tuple[str, str]]:
    progress = results.progress
    engine = (f"ray ({args.address or 'local Ray'})" if args.engine == "ray"
              else f"local, {args.workers or available_cores()} threads")
    failed = [f"{path} ({error})" for path, error in results.failed]
    rows = [
        ("bundle", f"{classifier.manifest.name} ({classifier.backend} on {_provider(classifier, args.engine)})"),
        ("backend", f"{classifier.backend}: {classifier.choice.reason}"),
        ("engine", engine),
        ("classified", f"{results.classified} images in {progress.elapsed:.1f} s ({progress.rate:.1f} images/s, "
                       f"batches of {args.batch_size})"),
        ("unreadable", f"{progress.errors}" + (f": {_listed(failed, progress.errors)}" if failed else "")),
        ("non-images skipped", f"{progress.skipped}" + (f": {_listed(results.skipped, progress.skipped)}"
                                                        if results.skipped else "")),
    ]
    if args.resume:
        retried = f"; {len(pending.retried)} unreadable before were tried again" if args.retry_failed else ""
        rows.append(("resumed", f"{pending.already} images already in {args.out} were skipped{retried}"))
    if args.out:
        rows.append(("output", f"{args.out} ({progress.done - progress.skipped} rows written)"))
    if args.explain:
        explain = classifier.manifest.explain
        rows.append(("class activation maps", f"{results.classified} overlays in {args.explain} (top class, "
                                              f"{explain.resolution[0]}x{explain.resolution[1]} map)"))
    return rows


def _metric_rows(metrics: dict, manifest: Manifest, evaluation: Evaluation, report_dir: Path,
                 ) -> list[tuple[str, str]]:
    top5 = metrics.get("top5_accuracy")
    rows = [("accuracy", f"{metrics['accuracy']:.4f} on {metrics['samples']} labelled images"),
            ("top-5 accuracy", f"{top5:.4f}" if top5 is not None else "n/a (5 classes or fewer)"),
            ("macro F1", f"{metrics['macro_f1']:.4f}")]
    recorded = (manifest.training or {}).get("test", {}).get("accuracy")
    if recorded is not None:
        rows.append(("run's test accuracy", f"{recorded:.4f} (recorded at training)"))
    if evaluation.unknown:
        rows.append(("left out", f"{sum(evaluation.unknown.values())} images whose folder is not a class"))
    rows.append(("report", f"{report_dir}/ (metrics.json, metrics.md, confusion_matrix.png)"))
    return rows


def _exit_status(args: argparse.Namespace, results: _Results, already: int) -> int:
    """2 when an image for stdout's list was unreadable, or when nothing could be classified: a script must not read
    a file of error rows, or of no rows, as success."""
    progress = results.progress
    if not args.out and progress.errors:
        path, error = results.failed[0]
        print(f"transferkit predict: error: {path}: {error}", file=sys.stderr)
        return 2
    if args.out and progress.errors and not results.classified:
        path, error = results.failed[0]
        print(f"transferkit predict: error: none of the {progress.errors} inputs could be classified "
              f"(first: {path}: {error}); their errors are in {args.out}", file=sys.stderr)
        return 2
    if progress.skipped and not results.classified and not already:  # --resume: the images were classified before
        print(f"transferkit predict: error: none of the {progress.skipped} files found is an image (skipped: "
              f"{_listed(results.skipped, progress.skipped)})", file=sys.stderr)
        return 2
    return 0


def _provider(classifier, engine: str) -> str:
    if engine == "ray":
        return "Ray actors"
    return classifier.predictor(threads=1).provider
