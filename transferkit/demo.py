"""``transferkit demo``: the whole toolkit on the embedded digits, offline, in a few minutes on two CPU cores.

The classic transfer-learning experiment (model A -> model B), measured honestly:

- task A: digits 0-4, every image; model A is trained on it from scratch (ImageNet weights cannot be fetched
  offline, so the demo makes its own source model);
- task B: digits 5-9 with few labels (a seeded random 40 per digit for training, 10 for validation); its test split
  is every other image of those digits, several hundred, so the accuracy is measured, not guessed from 30 images;
- model B starts from A's backbone (frozen base, then fine-tuning); the baseline is the same network trained from
  scratch on the same labels with the same recipe and the same epoch budget. Both learning curves go on one chart.
  The baseline needs nothing from model A, so it trains in a second process meanwhile (:class:`BackgroundRun`):
  the demo measured 3.7 min instead of 4.0-4.7 with the three runs in turn, with identical accuracies.

Then the transferred model is exported (every format checked against Keras), served with BentoML, asked about
held-out images over HTTP (and a corrupt file, to show the 400), its backends are benchmarked, and the summary says
where everything is. Library code: progress goes to the ``transferkit.demo`` logger; the CLI shows it.
"""

from __future__ import annotations

import csv
import json
import logging
import multiprocessing
import os
import shutil
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import requests

from transferkit.benchmarks.measure import environment
from transferkit.benchmarks.report import markdown, write_results
from transferkit.benchmarks.sweep import BenchSettings, run_bundles
from transferkit.core.atomic import check_output_dir, mark_output
from transferkit.core.console import print_summary
from transferkit.core.errors import TransferkitError
from transferkit.core.logs import log_file
from transferkit.core.manifest import read_manifest
from transferkit.export.bundle import ExportResult, export_run, stratified
from transferkit.service.launcher import BentoServer
from transferkit.training import rundir
from transferkit.training.config import AugmentConfig, TrainConfig
from transferkit.training.digits import write_digits
from transferkit.training.train import TrainResult, train

logger = logging.getLogger(__name__)

TASK_A, TASK_B = [0, 1, 2, 3, 4], [5, 6, 7, 8, 9]
STEPS = 8


@dataclass(frozen=True)
class DemoPlan:
    backbone: str
    alpha: float | None
    size: int
    epochs_a: int
    epochs_b_phase1: int  # frozen base: the new head learns to read A's features (one epoch: a start for phase 2)
    epochs_b_phase2: int  # every layer fine-tuned (BatchNormalization statistics frozen)
    train_per_class: int  # task B has few labels: the situation transfer learning is for
    val_per_class: int
    bench_repeats: int
    batch_size: int = 8  # small batches: more updates per epoch for networks trained on a few hundred images
    learning_rate: float = 5e-3  # model A, B's head, and the scratch baseline (one recipe for all)
    fine_tune_lr: float = 1e-3  # 3e-3 wrecked A's features on one split (0.737): a factor of 3 below that

    @property
    def budget_b(self) -> int:
        return self.epochs_b_phase1 + self.epochs_b_phase2


QUICK = DemoPlan(backbone="MobileNetV2", alpha=0.35, size=48, epochs_a=10, epochs_b_phase1=1, epochs_b_phase2=7,
                 train_per_class=40, val_per_class=10, bench_repeats=5)
# 48 px, not 32: at 32 px MobileNetV2's last blocks see a 1x1 map; model A reached 0.81-0.98 on task A over four
# seeds, its features gave a linear probe on task B only 0.39-0.57 (raw pixels: 0.92), and transfer 0.86-0.96. At
# 48 px model A reaches 0.99-1.0 in 10 epochs (BENCHMARKS.md, "The demo's results on another CPU").
# Task B: 1 epoch frozen + 7 fine-tuning at 1e-3, measured on a 2-core AMD EPYC (AVX-512, no AMX; oneDNN rounds
# differently there than on the Intel AMX Xeon where the earlier 2 + 6 at 2e-3 gave 0.961 vs 0.878). Model A seed 42
# (the demo's; 0.993 on task A) and 43 (0.985), task-B split seeds 0-3 (the demo's is 0), scratch 8 epochs:
#   2 + 6, 2e-3: transfer 0.903 / 0.941 / 0.941 (A 42, splits 0-2) vs scratch 0.904 / 0.827 / 0.865: a tie on the
#                demo's own split, the CI failure;
#   1 + 7, 2e-3: transfer 0.916-0.957, but 3e-3 collapses (0.737 on split 0): 2e-3 sits next to a cliff;
#   1 + 7, 1e-3 (the plan): transfer 0.940 / 0.938 / 0.933 / 0.935 (A 42, splits 0-3) and 0.941 / 0.951 (A 43, splits
#                0 and 3) vs scratch 0.904 / 0.827 / 0.865 / 0.933: transfer - scratch +0.036 on the demo's split,
#                +0.002 to +0.111 over all six.
# The frozen phase buys little (A's pooled features: head alone 0.48-0.78 on validation after 2-6 epochs), the
# fine-tuning epochs do. Scratch varies with the split (0.827-0.933 over splits 0-3), transfer much less, so the
# margin over scratch is not the same on every split: 4 + 4, 6 + 2, a 5- or 6-epoch budget, 20 or 60 labels per digit,
# --unfreeze 50 and a 2e-2 head rate were measured too (most on the demo's split only) and none did better there
# without doing worse elsewhere. The default mode trains exactly as --quick does and benchmarks with more repeats.
FULL = replace(QUICK, bench_repeats=20)


def _step(number: int, title: str) -> None:
    logger.info("\n=== [%d/%d] %s", number, STEPS, title)


def _train(config, label: str):
    start = time.perf_counter()
    result = train(config, log=lambda line: logger.info("  %s", line))
    seconds = time.perf_counter() - start
    test = result.metrics["test"]
    logger.info("  %s: test accuracy %.4f (%d images), %.0fs, diagnosis: %s", label, test["accuracy"],
                test["samples"], seconds, (result.metrics.get("diagnosis") or {}).get("verdict"))
    return result, seconds


def _train_in_child(config, log_path: str) -> None:
    """The body of the baseline's process: one training run, all its output (TensorFlow's C++ lines included) in
    ``log_path``. Exit status 1 with the error as the log's last line when it fails."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)  # before TensorFlow is imported: its C++ log lines go to the file too
    os.dup2(fd, 2)

    def log(line: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} {line}", flush=True)

    try:
        train(config, log=log)
    except TransferkitError as exc:
        log(f"error: {exc}")
        sys.exit(1)


class BackgroundRun:
    """A training run in a second process. TensorFlow traces each fit in one Python thread (about 30 s per fit for
    the demo's network on two cores), so two independent runs side by side finish well before the two in turn."""

    def __init__(self, config, label: str, log_path: Path):
        self.config, self.label, self.log_path = config, label, log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.started = time.perf_counter()
        # spawn, not fork: this process has TensorFlow's threads running.
        self.process = multiprocessing.get_context("spawn").Process(
            target=_train_in_child, args=(config, str(log_path)), name=label, daemon=True)
        self.process.start()

    def result(self):
        """Wait for the run; (TrainResult, seconds) as :func:`_train` returns them."""
        self.process.join()
        wall = time.perf_counter() - self.started
        text = self.log_path.read_text(errors="replace")
        logger.debug("%s (second process), its log %s:\n%s", self.label, self.log_path, text)
        if self.process.exitcode != 0:
            lines = text.strip().splitlines()
            last = next((line for line in reversed(lines) if "error:" in line), f"exit status {self.process.exitcode}")
            raise TransferkitError(f"{self.label} failed ({last.split('error:', 1)[-1].strip()}); its log: "
                                   f"{self.log_path}")
        run_dir = Path(self.config.out).absolute()
        metrics = json.loads((run_dir / rundir.METRICS).read_text())  # the dict train() returns, as written
        result = TrainResult(run_dir=run_dir, metrics=metrics,
                             config=rundir.read_config(run_dir).model_dump(mode="json"))
        test = metrics["test"]
        seconds = (metrics.get("timings") or {}).get("total_seconds", wall)  # its own time, as _train's
        logger.info("  %s: test accuracy %.4f (%d images), %.0fs in a second process, diagnosis: %s (log: %s)",
                    self.label, test["accuracy"], test["samples"], seconds,
                    (metrics.get("diagnosis") or {}).get("verdict"), self.log_path)
        return result, seconds

    def stop(self) -> None:
        """Stop the run if it is still going (the demo failed or was interrupted)."""
        if self.process.is_alive():
            self.process.terminate()  # SIGTERM: training keeps its state and exits
            self.process.join(30)
            if self.process.is_alive():
                self.process.kill()


def _epochs_trained(result) -> int:
    """Epochs actually run (early stopping may end a phase before its budget)."""
    epochs = result.metrics["epochs"]
    return epochs["phase1"] + epochs["phase2"]


def write_task_b(out: Path, size: int, train_per_class: int, val_per_class: int, seed: int = 0) -> dict[str, int]:
    """Digits 5-9 as ``out/{train,val,test}/<digit>/*.png``: a seeded random ``train_per_class`` images of each
    digit for training, ``val_per_class`` more for validation, every other one for testing. Returns the image count
    per split.

    Random, not the first images in the dataset's order: the digits are stored writer by writer, so the first 50 of a
    digit come from a few people, and a validation set drawn from them ran 23 points below the test set."""
    staging = out.parent / f".{out.name}.all"
    shutil.rmtree(staging, ignore_errors=True)
    write_digits(staging, size, TASK_B)
    counts = {"train": 0, "val": 0, "test": 0}
    rng = np.random.default_rng(seed)  # numpy's generator: the same draw on every machine
    for digit_dir in sorted(path for path in staging.iterdir() if path.is_dir()):  # not the marker file
        paths = sorted(digit_dir.iterdir())
        for rank, index in enumerate(rng.permutation(len(paths))):
            split = ("train" if rank < train_per_class else
                     "val" if rank < train_per_class + val_per_class else "test")
            target = out / split / digit_dir.name
            target.mkdir(parents=True, exist_ok=True)
            paths[index].rename(target / paths[index].name)
            counts[split] += 1
    shutil.rmtree(staging)
    return counts


def _history(run_dir: Path) -> list[dict[str, float]]:
    with (run_dir / "history.csv").open() as handle:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(handle)]


def plot_transfer_vs_scratch(transfer_dir: Path, scratch_dir: Path, transfer_acc: float, scratch_acc: float,
                             chance: float, path: Path) -> None:
    """Validation accuracy per epoch of both runs on one chart, test accuracies as horizontal marks."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    transfer, scratch = _history(transfer_dir), _history(scratch_dir)
    fig = Figure(figsize=(8, 5))
    FigureCanvasAgg(fig)  # renders to files only: no pyplot, no process-wide backend switch
    ax = fig.add_subplot()
    ax.plot([r["epoch"] for r in transfer], [r["val_accuracy"] for r in transfer], "o-", color="tab:blue",
            label=f"transferred from model A (validation); test accuracy {transfer_acc:.3f}")
    ax.plot([r["epoch"] for r in scratch], [r["val_accuracy"] for r in scratch], "s-", color="tab:orange",
            label=f"from scratch, same labels and budget (validation); test accuracy {scratch_acc:.3f}")
    ax.axhline(transfer_acc, color="tab:blue", linestyle=":", linewidth=1)
    ax.axhline(scratch_acc, color="tab:orange", linestyle=":", linewidth=1)
    ax.axhline(chance, color="gray", linestyle="--", linewidth=1, label=f"chance ({chance:.2f})")
    phase1 = sum(1 for r in transfer if r.get("phase") == 1)
    if 0 < phase1 < len(transfer):
        ax.axvline(phase1 + 0.5, color="tab:blue", alpha=0.3, label="transfer: start of fine-tuning")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(f"Task B (digits 5-9, few labels): transfer {transfer_acc:.3f} vs scratch {scratch_acc:.3f} "
                 "test accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run_demo(out: Path, quick: bool = False, force: bool = False) -> int:
    """Run the demo into ``out`` (see the module docstring); returns the exit status."""
    out = check_output_dir(Path(out), force)  # --force replaces only an earlier demo's (marked) directory
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    mark_output(out)
    with log_file(out / "demo.log"):
        return _run(out, QUICK if quick else FULL)


@dataclass(frozen=True)
class TaskB:
    """Task B's two runs: model B transferred from model A, and the same network from scratch (the baseline)."""

    transfer: TrainResult
    transfer_seconds: float
    scratch: TrainResult
    scratch_seconds: float

    @property
    def transfer_acc(self) -> float:
        return self.transfer.metrics["test"]["accuracy"]

    @property
    def scratch_acc(self) -> float:
        return self.scratch.metrics["test"]["accuracy"]


def _run(out: Path, plan: DemoPlan) -> int:
    started = time.perf_counter()
    _step(1, "data: scikit-learn's handwritten digits as class-folder PNG images")
    data_a, data_b = _write_data(out, plan)
    runs = _train_models(out, plan, data_a, data_b)  # steps 2 and 3
    figure = _compare(out, plan, runs)

    _step(4, "export model B: SavedModel, ONNX, ONNX-fp16, each checked against Keras")
    exported = export_run(runs.transfer.run_dir, out / "bundle", name="transferkit-demo",
                          log=lambda line: logger.info("  %s", line.replace("\n", "\n  ")))
    logger.info("  BentoML model: %s", exported.tag)

    _step(5, "serve it with BentoML and classify held-out images over HTTP")
    served = _serve_and_query(out, exported.bundle_dir, runs.transfer.run_dir)

    _step(6, "benchmark the bundle's backends on task B's test images")
    _benchmark(runs.transfer.run_dir, exported.bundle_dir, out / "bench", plan.bench_repeats)

    _step(7, "what it shows")
    _show_verdicts(plan, runs, served)

    _step(8, "summary")
    minutes = (time.perf_counter() - started) / 60
    _summarise(out, plan, runs, figure, exported, served, minutes)
    return 0


def _write_data(out: Path, plan: DemoPlan) -> tuple[Path, Path]:
    """Task A (digits 0-4, every image) and task B (digits 5-9, few labels) as class folders."""
    data_a, data_b = out / "data" / "digits_0-4", out / "data" / "digits_5-9"
    counts_a = write_digits(data_a, plan.size, TASK_A)
    counts_b = write_task_b(data_b, plan.size, plan.train_per_class, plan.val_per_class)
    logger.info("  task A: %d images of digits 0-4 in %s", sum(counts_a.values()), data_a)
    logger.info("  task B: digits 5-9 with %d labelled images per digit for training and %d for validation (few "
                "labels: the situation transfer learning is for); %d test images in %s", plan.train_per_class,
                plan.val_per_class, counts_b["test"], data_b)
    return data_a, data_b


def _train_models(out: Path, plan: DemoPlan, data_a: Path, data_b: Path) -> TaskB:
    """Model A here, then model B from A's backbone, while the baseline trains in a second process."""
    augment = AugmentConfig(flip="none", rotation=0.05, shift=0.08, zoom=0.08, contrast=0.0)
    # One recipe for every run (the training defaults: AdamW, warm-up then cosine decay, label smoothing), the same
    # augmentation, and patience as long as the budget: nothing stops early.
    common = dict(backbone=plan.backbone, alpha=plan.alpha, image_size=plan.size, batch_size=plan.batch_size,
                  learning_rate=plan.learning_rate, augment=augment, patience=max(plan.epochs_a, plan.budget_b))
    net = f"{plan.backbone}" + (f" (alpha {plan.alpha})" if plan.alpha else "")

    # Task B's runs end with their last epoch's weights: 10 validation images per digit are too few to pick an epoch
    # by (restoring the one with the lowest validation loss cost one seed 0.929 -> 0.892 on test), and the cosine
    # schedule ends at 0. Model A, with ~140 validation images, keeps the usual restore.
    task_b = dict(common, restore_best=False)
    # The baseline needs nothing from model A: it trains in a second process while model A and model B train here.
    scratch_config = TrainConfig(data=str(data_b), out=str(out / "runs" / "B_scratch"), weights="none",
                                 strategy="scratch", epochs=plan.budget_b, **task_b)
    _step(2, f"model A: {net} from scratch on task A ({plan.epochs_a} epochs); meanwhile, in a second process, the "
             f"baseline for task B: the same network from scratch ({plan.budget_b} epochs)")
    baseline = BackgroundRun(scratch_config, "model B (scratch)", out / "runs" / "B_scratch.log")
    try:
        run_a, _ = _train(TrainConfig(data=str(data_a), out=str(out / "runs" / "A_scratch"), weights="none",
                                      strategy="scratch", epochs=plan.epochs_a, **common), "model A")

        _step(3, f"model B: transfer A's backbone to task B ({plan.epochs_b_phase1} "
                 f"epoch{'s' if plan.epochs_b_phase1 != 1 else ''} frozen + "
                 f"{plan.epochs_b_phase2} fine-tuning), then compare with the baseline")
        run_b, seconds_b = _train(TrainConfig(
            data=str(data_b), out=str(out / "runs" / "B_transfer"), weights=str(run_a.run_dir),
            strategy="fine-tune", epochs=plan.epochs_b_phase1, fine_tune_epochs=plan.epochs_b_phase2,
            unfreeze="all", fine_tune_lr=plan.fine_tune_lr, **task_b),
            "model B (transfer)")
        run_s, seconds_s = baseline.result()
    finally:
        baseline.stop()
    return TaskB(run_b, seconds_b, run_s, seconds_s)


def _compare(out: Path, plan: DemoPlan, runs: TaskB) -> Path:
    """transfer_vs_scratch.md and the learning curves of both runs; returns the figure's path."""
    chance = 1 / len(TASK_B)
    comparison = [
        "| task B (digits 5-9) | test accuracy | test loss | epochs trained (budget) | seconds |",
        "|---|---|---|---|---|",
        f"| transferred from A | {runs.transfer_acc:.4f} | {runs.transfer.metrics['test']['loss']:.4f} | "
        f"{_epochs_trained(runs.transfer)} ({plan.budget_b}) | {runs.transfer_seconds:.0f} |",
        f"| from scratch | {runs.scratch_acc:.4f} | {runs.scratch.metrics['test']['loss']:.4f} | "
        f"{_epochs_trained(runs.scratch)} ({plan.budget_b}) | {runs.scratch_seconds:.0f} |",
    ]
    (out / "transfer_vs_scratch.md").write_text("\n".join(comparison) + "\n")
    figure = out / "transfer_vs_scratch.png"
    plot_transfer_vs_scratch(runs.transfer.run_dir, runs.scratch.run_dir, runs.transfer_acc, runs.scratch_acc,
                             chance, figure)
    logger.info("\n%s", "\n".join(comparison))
    logger.info("  what transfer bought: %+.4f test accuracy with the same labels, recipe and epoch budget "
                "(chance: %.2f); learning curves: %s", runs.transfer_acc - runs.scratch_acc, chance, figure)
    return figure


def _show_verdicts(plan: DemoPlan, runs: TaskB, served: dict) -> None:
    chance = 1 / len(TASK_B)
    verdicts = [
        f"transfer reaches {runs.transfer_acc:.1%} on {runs.transfer.metrics['test']['samples']} test images of "
        f"task B, from {plan.train_per_class} training labels per digit",
        f"from scratch, the same network, labels, recipe and budget reach {runs.scratch_acc:.1%}"
        + (" (chance level: too few labels to learn features from)" if runs.scratch_acc <= chance + 0.1 else ""),
        f"over HTTP, {served['test_correct']} of {served['test_sent']} test images came back right "
        f"({served['test_correct'] / served['test_sent']:.1%}); of the ten shown, {served['correct']}",
        f"what transfer buys here is a good model within a short budget, steadily: on a 2-core AMD EPYC, over "
        f"other label draws, the baseline ranged 0.83-0.93 in {plan.budget_b} epochs, transfer 0.93-0.95; given 14 "
        "epochs the baseline closes most of the gap (BENCHMARKS.md, \"The demo's results on another CPU\")",
    ]
    for line in verdicts:
        logger.info("  - %s", line)


def _summarise(out: Path, plan: DemoPlan, runs: TaskB, figure: Path, exported: ExportResult, served: dict,
               minutes: float) -> None:
    """summary.json, the summary table and what to do next."""
    summary = {
        "plan": plan.__dict__, "transfer_accuracy": runs.transfer_acc, "scratch_accuracy": runs.scratch_acc,
        "test_images": runs.transfer.metrics["test"]["samples"], "http": served, "figure": str(figure),
        "bundle": str(exported.bundle_dir), "tag": exported.tag, "minutes": round(minutes, 2),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    rows = [
        ("transfer vs scratch", f"{runs.transfer_acc:.4f} vs {runs.scratch_acc:.4f}  "
                                f"({out / 'transfer_vs_scratch.md'})"),
        ("learning curves", str(figure)),
        ("runs", f"{out / 'runs'} (A_scratch, B_transfer, B_scratch: report.md, plots, metrics.json)"),
        ("bundle", f"{exported.bundle_dir} (manifest.json holds the validation report)"),
        ("BentoML model", str(exported.tag)),
        ("HTTP", f"{served['test_correct']}/{served['test_sent']} test images right ({served['correct']}/"
                 f"{served['sent']} of those shown); corrupt file -> {served['corrupt_status']}"),
        ("benchmark", str(out / "bench" / "results.md")),
        ("log", f"{out / 'demo.log'} (everything, library log lines included)"),
        ("time", f"{minutes:.1f} min"),
    ]
    print_summary(rows, title=None)
    print("\nnext:")
    print(f"  serve it:       transferkit serve {exported.tag}")
    print(f"                  (or: TRANSFERKIT_MODEL={exported.tag} bentoml serve, from the repository root)")
    print("  classify:       curl -F images=@photo.png http://127.0.0.1:3000/predict")
    print("  explain:        curl -F images=@photo.png http://127.0.0.1:3000/explain -o where.png   (where it looked)")
    print(f"  build a bento:  transferkit build {exported.tag}   (--gpu for the CUDA image)")
    print("  container:      bentoml containerize transferkit:latest")
    print(f"  load-test it:   transferkit loadtest --model {exported.tag} --users 16 --duration 30s --out loadtest")


def _held_out(test: list[tuple[Path, str]], per_class: int = 2, seed: int = 0) -> list[tuple[Path, str]]:
    """``per_class`` test images of each class drawn at random (seeded, so not chosen by how they are answered)."""
    return stratified(test, per_class * len({label for _, label in test}), seed=seed)


def _classify(url: str, images: list[tuple[Path, str]]) -> list[dict]:
    """POST ``images`` (PNG files) to ``url``/predict in one request; the service's answers, in order."""
    response = requests.post(url + "/predict", timeout=60, files=[
        ("images", (path.name, path.read_bytes(), "image/png")) for path, _ in images])
    response.raise_for_status()
    return response.json()


def _serve_and_query(out: Path, bundle_dir: Path, run_dir: Path) -> dict:
    test = rundir.split_files(run_dir, "test")
    with BentoServer(bundle_dir, log_path=out / "service.log") as server:
        logger.info("  service ready at %s (log: %s)", server.url, out / "service.log")
        meta = requests.get(server.url + "/metadata", timeout=10).json()
        logger.info("  running %s (%s), layout %s", meta["backend"], meta["backend_choice"]["reason"],
                    meta["layout"]["name"])
        files = _held_out(test)
        correct = 0
        answers = []
        logger.info("  %-22s %4s  %9s  %6s", "file", "true", "predicted", "score")
        for path, label in files:
            answer = _classify(server.url, [(path, label)])[0]
            correct += answer["label"] == label
            answers.append({"file": str(path), "true": label, "predicted": answer["label"], "score": answer["score"]})
            mark = "" if answer["label"] == label else "   <- wrong"
            logger.info("  %-22s %4s  %9s  %6.3f%s", f"{path.parent.name}/{path.name}", label, answer["label"],
                        answer["score"], mark)
        logger.info("  %d/%d held-out images classified correctly over HTTP", correct, len(files))
        # Ten images are a small sample (a 96%-accurate model gets 8 or fewer right 6% of the time): the whole test
        # split goes over HTTP too, as many images per request as the service accepts (16 unless configured).
        per_request = requests.get(server.url + "/metadata", timeout=60).json()["limits"]["max_images_per_request"]
        test_correct = 0
        for start in range(0, len(test), per_request):
            chunk = test[start:start + per_request]
            test_correct += sum(a["label"] == label for a, (_, label) in zip(_classify(server.url, chunk), chunk))
        logger.info("  the whole test split over HTTP: %d of %d right (%.1f%%)", test_correct, len(test),
                    100 * test_correct / len(test))
        corrupt = files[0][0].read_bytes()[:40]
        rejected = requests.post(server.url + "/predict", files=[("images", ("corrupt.png", corrupt, "image/png"))],
                                 timeout=60)
        logger.info("  corrupt.png (40 bytes of a PNG) -> HTTP %d: %s", rejected.status_code,
                    rejected.json().get("error"))
    logger.info("  service stopped")
    return {"sent": len(files), "correct": int(correct), "corrupt_status": rejected.status_code, "answers": answers,
            "test_sent": len(test), "test_correct": int(test_correct)}


def _benchmark(run_dir: Path, bundle_dir: Path, bench_dir: Path, repeats: int) -> None:
    test_dir = bench_dir / "test_images"
    for path, label in stratified(rundir.split_files(run_dir, "test"), 200):  # enough for accuracy, quick to time
        (test_dir / label).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, test_dir / label / path.name)
    # Every backend the export validated and passed, OpenVINO's included where it ran here.
    report = read_manifest(bundle_dir).validation
    engines = [row.format for row in report.formats if row.format.startswith("openvino") and row.passed]
    settings = BenchSettings(batch_sizes=[1, 32], backends=["keras", "savedmodel", "onnx", "onnx-fp16", *engines],
                             device="cpu", warmup=2, repeats=repeats)
    rows = run_bundles([str(bundle_dir)], test_dir, settings, log=lambda line: None)
    write_results(bench_dir, rows, settings.batch_sizes, environment(vars(settings)))
    logger.info("%s", markdown(rows, settings.batch_sizes))
