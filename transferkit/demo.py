"""``transferkit demo``: the whole toolkit on the embedded digits, offline, in a few minutes on two CPU cores.

The classic transfer-learning experiment (model A -> model B): train MobileNetV2 from scratch on digits 0-4 (task A),
transfer its backbone to digits 5-9 (task B: frozen base, then fine-tuning), and train the same architecture from
scratch on B with the same epoch budget. Then export the transferred model, serve it with BentoML, classify held-out
images over HTTP (and a corrupt file, to show the 400), benchmark the bundle's backends, and print where everything is.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from transferkit.core.atomic import check_output_dir
from transferkit.core.console import print_summary


@dataclass(frozen=True)
class DemoPlan:
    size: int
    epochs_a: int
    epochs_b_phase1: int
    epochs_b_phase2: int
    per_class_b: int  # task B has few labels: the situation transfer learning is for
    bench_repeats: int


QUICK = DemoPlan(size=32, epochs_a=7, epochs_b_phase1=5, epochs_b_phase2=3, per_class_b=40, bench_repeats=5)
FULL = DemoPlan(size=32, epochs_a=14, epochs_b_phase1=8, epochs_b_phase2=6, per_class_b=60, bench_repeats=20)


def _step(number: int, total: int, title: str) -> None:
    print(f"\n=== [{number}/{total}] {title}", flush=True)


def _train(config, label: str) -> tuple[object, float]:
    from transferkit.training.train import train

    start = time.perf_counter()
    result = train(config, log=lambda line: print(f"  {line}", flush=True))
    seconds = time.perf_counter() - start
    test = result.metrics["test"]
    print(f"  {label}: test accuracy {test['accuracy']:.4f} ({test['samples']} images), {seconds:.0f}s, "
          f"diagnosis: {result.metrics['diagnosis']['verdict']}", flush=True)
    return result, seconds


def _epochs_trained(result) -> int:
    """Epochs actually run (early stopping may end a phase before its budget)."""
    epochs = result.metrics["epochs"]
    return epochs["phase1"] + epochs["phase2"]


def run_demo(out: Path, quick: bool = False, force: bool = False) -> int:
    out = check_output_dir(Path(out), force)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    plan = QUICK if quick else FULL
    started = time.perf_counter()
    total = 7
    out.mkdir(parents=True)

    from transferkit.training.config import AugmentConfig, TrainConfig
    from transferkit.training.digits import write_digits

    _step(1, total, "data: scikit-learn's handwritten digits as class-folder PNG images")
    data_a, data_b = out / "data" / "digits_0-4", out / "data" / "digits_5-9"
    counts_a = write_digits(data_a, plan.size, [0, 1, 2, 3, 4])
    counts_b = write_digits(data_b, plan.size, [5, 6, 7, 8, 9], per_class=plan.per_class_b)
    print(f"  task A: {sum(counts_a.values())} images of digits 0-4 in {data_a}")
    print(f"  task B: {sum(counts_b.values())} images of digits 5-9 ({plan.per_class_b} per digit: few labels, "
          f"the situation transfer learning is for) in {data_b}")

    augment = AugmentConfig(flip="none", rotation=0.05, shift=0.05, zoom=0.05, contrast=0.0)
    common = dict(backbone="MobileNetV2", image_size=plan.size, batch_size=32, augment=augment, patience=4)
    budget_b = plan.epochs_b_phase1 + plan.epochs_b_phase2

    _step(2, total, f"model A: MobileNetV2 from scratch on task A ({plan.epochs_a} epochs)")
    run_a, _ = _train(TrainConfig(data=str(data_a), out=str(out / "runs" / "A_scratch"), weights="none",
                                  strategy="scratch", epochs=plan.epochs_a, **common), "model A")

    _step(3, total, f"model B: transfer A's backbone to task B ({plan.epochs_b_phase1} epochs frozen + "
                    f"{plan.epochs_b_phase2} fine-tuning) vs the same network from scratch ({budget_b} epochs)")
    run_b, seconds_b = _train(TrainConfig(
        data=str(data_b), out=str(out / "runs" / "B_transfer"), weights=str(run_a.run_dir), strategy="fine-tune",
        epochs=plan.epochs_b_phase1, fine_tune_epochs=plan.epochs_b_phase2, unfreeze="50", **common),
        "model B (transfer)")
    run_s, seconds_s = _train(TrainConfig(
        data=str(data_b), out=str(out / "runs" / "B_scratch"), weights="none", strategy="scratch",
        epochs=budget_b, **common), "model B (scratch)")
    transfer_acc, scratch_acc = run_b.metrics["test"]["accuracy"], run_s.metrics["test"]["accuracy"]
    chance = 1 / len(run_b.metrics["data"]["counts"]["test"])
    comparison = [
        "| task B (digits 5-9) | test accuracy | test loss | epochs trained (budget) | seconds |",
        "|---|---|---|---|---|",
        f"| transferred from A | {transfer_acc:.4f} | {run_b.metrics['test']['loss']:.4f} | "
        f"{_epochs_trained(run_b)} ({budget_b}) | {seconds_b:.0f} |",
        f"| from scratch | {scratch_acc:.4f} | {run_s.metrics['test']['loss']:.4f} | "
        f"{_epochs_trained(run_s)} ({budget_b}) | {seconds_s:.0f} |",
    ]
    (out / "transfer_vs_scratch.md").write_text("\n".join(comparison) + "\n")
    print("\n" + "\n".join(comparison))
    print(f"  what transfer bought: {transfer_acc - scratch_acc:+.4f} test accuracy with the same budget")
    if scratch_acc <= chance + 0.05:
        print(f"  ({chance:.2f} is chance for {round(1 / chance)} classes: from scratch, this network does not "
              f"generalise from {plan.per_class_b} images per digit and early stopping ends it; the transferred "
              f"backbone already knows pen strokes)")

    _step(4, total, "export model B: SavedModel, ONNX, ONNX-fp16, each checked against Keras")
    from transferkit.export.bundle import export_run

    exported = export_run(run_b.run_dir, out / "bundle", name="transferkit-demo", log=lambda line: print(f"  {line}"))
    print(f"  BentoML model: {exported.tag}")

    _step(5, total, "serve it with BentoML and classify held-out images over HTTP")
    served = _serve_and_query(out, exported.bundle_dir, run_b.run_dir)

    _step(6, total, "benchmark the bundle's backends on task B's test images")
    bench_dir = out / "bench"
    _benchmark(run_b.run_dir, exported.bundle_dir, bench_dir, plan.bench_repeats)

    _step(7, total, "summary")
    minutes = (time.perf_counter() - started) / 60
    summary = {
        "transfer_accuracy": transfer_acc, "scratch_accuracy": scratch_acc, "http": served,
        "bundle": str(exported.bundle_dir), "tag": exported.tag, "minutes": round(minutes, 2),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    rows = [
        ("transfer vs scratch", f"{transfer_acc:.4f} vs {scratch_acc:.4f}  ({out / 'transfer_vs_scratch.md'})"),
        ("runs", f"{out / 'runs'} (A_scratch, B_transfer, B_scratch: report.md, plots, metrics.json)"),
        ("plots", f"{run_b.run_dir / 'learning_curves.png'}, {run_b.run_dir / 'confusion_matrix.png'}"),
        ("bundle", f"{exported.bundle_dir} (manifest.json holds the validation report)"),
        ("BentoML model", str(exported.tag)),
        ("HTTP", f"{served['correct']}/{served['sent']} held-out images right; corrupt file -> "
                 f"{served['corrupt_status']}"),
        ("benchmark", str(bench_dir / "results.md")),
        ("time", f"{minutes:.1f} min"),
    ]
    print_summary(rows, title=None)
    print("\nnext:")
    print(f"  serve it:       transferkit serve {exported.tag}")
    print(f"                  (or: TRANSFERKIT_MODEL={exported.tag} bentoml serve, from the repository root)")
    print("  classify:       curl -F images=@photo.png http://127.0.0.1:3000/predict")
    print(f"  build a bento:  TRANSFERKIT_MODEL={exported.tag} bentoml build")
    print("  container:      bentoml containerize transferkit:latest")
    print(f"  load-test it:   transferkit loadtest --model {exported.tag} --users 16 --duration 30s --out loadtest")
    return 0


def _test_files(run_dir: Path) -> list[tuple[Path, str]]:
    split = json.loads((run_dir / "split.json").read_text())
    root = Path(split["root"])
    return [(root / f, item["label"]) for f, item in split["files"].items() if item["split"] == "test"]


def _serve_and_query(out: Path, bundle_dir: Path, run_dir: Path) -> dict:
    import requests

    from transferkit.benchmarks.loadtest import ManagedServer

    server = ManagedServer(str(bundle_dir), out / "service.log")
    try:
        print(f"  service ready at {server.url} (log: {out / 'service.log'})")
        by_label: dict[str, list] = {}
        for path, label in _test_files(run_dir):
            by_label.setdefault(label, []).append((path, label))
        files = [items[i] for i in range(2) for items in by_label.values() if len(items) > i]  # two per class
        correct = 0
        print(f"  {'file':<22} {'true':>4}  {'predicted':>9}  {'score':>6}")
        for path, label in files:
            with path.open("rb") as handle:
                answer = requests.post(server.url + "/predict", files=[("images", (path.name, handle, "image/png"))],
                                       timeout=60).json()[0]
            correct += answer["label"] == label
            mark = "" if answer["label"] == label else "   <- wrong"
            print(f"  {path.parent.name + '/' + path.name:<22} {label:>4}  {answer['label']:>9}  "
                  f"{answer['score']:6.3f}{mark}")
        corrupt = files[0][0].read_bytes()[:40]
        response = requests.post(server.url + "/predict", files=[("images", ("corrupt.png", corrupt, "image/png"))],
                                 timeout=60)
        print(f"  corrupt.png (40 bytes of a PNG) -> HTTP {response.status_code}: {response.json()['error']}")
        print(f"  {correct}/{len(files)} held-out images classified correctly over HTTP")
        return {"sent": len(files), "correct": int(correct), "corrupt_status": response.status_code}
    finally:
        server.stop()
        print("  service stopped")


def _benchmark(run_dir: Path, bundle_dir: Path, bench_dir: Path, repeats: int) -> None:
    import shutil

    from transferkit.benchmarks.measure import environment
    from transferkit.benchmarks.report import markdown, write_results
    from transferkit.benchmarks.sweep import BenchSettings, run_bundles

    test_dir = bench_dir / "test_images"
    for path, label in _test_files(run_dir):
        (test_dir / label).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, test_dir / label / path.name)
    settings = BenchSettings(batch_sizes=[1, 32], backends=["keras", "savedmodel", "onnx", "onnx-fp16"],
                             device="cpu", warmup=2, repeats=repeats)
    rows = run_bundles([str(bundle_dir)], test_dir, settings, log=lambda line: None)
    write_results(bench_dir, rows, settings.batch_sizes, environment(vars(settings)))
    print(markdown(rows, settings.batch_sizes))
