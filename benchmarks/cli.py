"""``transferkit bench`` and ``transferkit loadtest``: thin commands over :mod:`transferkit.benchmarks.sweep` and
:mod:`transferkit.benchmarks.loadtest`."""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from transferkit.core.console import print_summary
from transferkit.core.errors import UsageError
from transferkit.core.manifest import RUNTIME_BACKENDS

# The benchmarks and the runtime (numpy, onnxruntime, tqdm) are imported where they run: every `transferkit`
# command imports this module for its parser.
if TYPE_CHECKING:
    from transferkit.core.progress import Progress


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_bench_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "bench", help="latency/size/accuracy table per backbone and backend",
        description="Sweep mode (--backbones): build each backbone with a 10-class head (weights=None), export it "
                    "through the real export stage and time every backend side by side. Bundle mode (--bundles "
                    "with --data): time trained bundles and add top-1/top-5 accuracy on a class-folder test "
                    "directory. Keras is timed through a compiled tf.function; model.predict() is shown once at "
                    "batch 1 for contrast. Writes results.md/.csv/.json and latency.png (plus "
                    "accuracy_vs_latency.png in bundle mode) to --out.",
    )
    p.add_argument("--backbones", help="comma-separated registry names, or 'all' (sweep mode)")
    p.add_argument("--bundles", help="comma-separated bundle directories or BentoML model tags (bundle mode)")
    p.add_argument("--data", type=Path, help="class-folder test images for bundle mode")
    p.add_argument("--image-size", type=int, help="input size (default: each backbone's default size)")
    p.add_argument("--batch-sizes", type=_ints, default=[1, 32], help="comma-separated (default 1,32)")
    p.add_argument("--backends", default="keras,savedmodel,onnx,onnx-fp16",
                   help=f"comma-separated, of keras, {', '.join(RUNTIME_BACKENDS)} "
                        "(default keras,savedmodel,onnx,onnx-fp16); "
                        "the openvino ones run the bundle's ONNX files with OpenVINO (transferkit[openvino]): "
                        "f32, bf16 on a CPU with AMX or AVX-512 BF16, int8 from onnx-int8")
    p.add_argument("--device", default="auto", choices=("cpu", "gpu", "auto"), help="default auto")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per cell (default 3)")
    p.add_argument("--repeats", type=int, default=10, help="timed steps per cell (default 10)")
    p.add_argument("--threads", type=int, help="onnxruntime intra-op threads (default: the available cores)")
    p.add_argument("--keep-bundles", type=Path, help="keep the sweep's exported bundles here (to serve them)")
    p.add_argument("--out", type=Path, required=True, help="directory for the results")
    p.set_defaults(handler=run_bench)


def _advance(progress: Progress) -> Callable[[int, int, str], None]:
    """The callback of run_sweep and run_bundles (items done, items, the next one's name; "done" at the end) drawn
    as ``progress``: a line naming each item as it starts."""

    def advance(done: int, total: int, name: str) -> None:
        progress.update(done - progress.done)
        progress.describe(name)

    return advance


def run_bench(args: argparse.Namespace) -> int:
    from transferkit.benchmarks.measure import environment
    from transferkit.benchmarks.report import markdown, write_results
    from transferkit.benchmarks.sweep import BenchSettings, run_bundles, run_sweep
    from transferkit.core.backbones import parse_backbones
    from transferkit.core.progress import Progress

    if (args.backbones is None) == (args.bundles is None):
        raise UsageError("give --backbones (sweep mode) or --bundles with --data (bundle mode)")
    settings = BenchSettings(batch_sizes=args.batch_sizes, device=args.device, warmup=args.warmup,
                             repeats=args.repeats, threads=args.threads, image_size=args.image_size,
                             backends=[b.strip().lower() for b in args.backends.split(",") if b.strip()])
    settings.validate()
    if args.backbones:
        backbones = parse_backbones(args.backbones)
        print(f"benchmarking {len(backbones)} backbone(s) on {', '.join(settings.backends)}, batch sizes "
              f"{settings.batch_sizes}")
        progress = Progress(len(backbones), label="backbones", stream=sys.stdout)
        rows = run_sweep(backbones, settings, log=progress.write, keep_bundles=args.keep_bundles,
                         progress=_advance(progress))
    else:
        if args.data is None:
            raise UsageError("bundle mode needs --data DIR (class folders of test images)")
        bundles = [b.strip() for b in args.bundles.split(",") if b.strip()]
        progress = Progress(len(bundles), label="bundles", stream=sys.stdout)
        rows = run_bundles(bundles, args.data, settings, log=progress.write, progress=_advance(progress))
    progress.close()
    env = environment({**vars(settings), "mode": "sweep" if args.backbones else "bundles"})
    paths = write_results(args.out, rows, settings.batch_sizes, env)
    print()
    print(markdown(rows, settings.batch_sizes))
    failed = [r for r in rows if r.error]
    print(f"\n{len(rows) - len(failed)} rows measured, {len(failed)} failed; results in {args.out.absolute()}: "
          + ", ".join(p.name for p in paths.values()))
    return 0


def add_loadtest_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "loadtest", help="locust load test against the service (and the plain baseline server)",
        description="Run benchmarks/locustfile.py headless against --url (a running service) or --model (the "
                    "service is started and stopped for you), write locust's CSV and HTML to --out, and print "
                    "requests/s, images/s, p50/p95/p99, failure ratio, the batch sizes the service formed, and "
                    "served ÷ in-process pipeline (decode + onnxruntime on the same images and cores, no HTTP). "
                    "--compare-baseline also runs the same load against benchmarks/baseline_server.py (FastAPI + "
                    "onnxruntime, uvicorn --workers <cores>, no batching), back to back (both servers stay up, one "
                    "idle while the other is measured), and writes comparison.md; --rounds N repeats the pair N "
                    "times, alternating which server goes first, and reports the "
                    "ratio per round and its median (one pair on a noisy machine can be off by several percent). "
                    "Exits 1 when --max-failure-ratio or --max-p95-ms is exceeded by the service.",
    )
    p.add_argument("--url", help="base URL of a running service, e.g. http://127.0.0.1:3000")
    p.add_argument("--model", help="BentoML model tag or bundle directory to serve for the test")
    p.add_argument("--backend", default="auto", help="backend to serve and to run in-process (default auto: the "
                                                      "service's choice; the plain server always runs onnxruntime)")
    p.add_argument("--compare-baseline", action="store_true",
                   help="also load-test the plain FastAPI + onnxruntime server (needs --model)")
    p.add_argument("--rounds", type=int, default=1,
                   help="with --compare-baseline: pairs of runs, alternating which server goes first (default 1)")
    p.add_argument("--users", type=int, default=16, help="concurrent users (default 16)")
    p.add_argument("--spawn-rate", type=float, default=16, help="users started per second (default 16)")
    p.add_argument("--duration", default="30s", help="per server, e.g. 30s or 2m (default 30s)")
    p.add_argument("--pipeline-seconds", type=float, default=15.0,
                   help="how long to time the in-process pipeline (default 15)")
    p.add_argument("--max-failure-ratio", type=float, default=0.01, help="exit 1 above this (default 0.01)")
    p.add_argument("--max-p95-ms", type=float, help="exit 1 when p95 latency exceeds this")
    p.add_argument("--out", type=Path, required=True, help="directory for locust's CSV/HTML and summary.json")
    p.set_defaults(handler=run_loadtest)


def run_loadtest(args: argparse.Namespace) -> int:
    from transferkit.benchmarks.loadtest import comparison_table, loadtest, paired_ratios, parse_duration

    summaries = loadtest(args.url, args.model, args.users, args.spawn_rate, parse_duration(args.duration),
                         args.out, args.backend, compare_baseline=args.compare_baseline,
                         pipeline_seconds=args.pipeline_seconds, rounds=args.rounds)
    summary = summaries[0]  # the service (round 1)
    rows = [
        ("layout", summary.layout or "-"),
        ("requests", f"{summary.requests} ({summary.failures} failed, {summary.overloaded} overloaded 429/503)"),
        ("requests/s", f"{summary.requests_per_s:.1f}"),
        ("images/s served", f"{summary.images_per_s:.1f}"),
        ("latency p50/p95/p99", f"{summary.p50_ms:.0f} / {summary.p95_ms:.0f} / {summary.p99_ms:.0f} ms"),
        ("failure ratio", f"{summary.failure_ratio:.4f}"),
        ("batch size (mean)", "- (no batching in this layout)" if not summary.batch_calls
         else f"{summary.batch_size_mean:.2f} over {summary.batch_calls} model calls"),
    ]
    if summary.connections_handed_back is not None:
        rows.append(("connections handed back", f"{summary.connections_handed_back} (a busier worker closed a "
                                                "keep-alive connection to rebalance)"))
    if summary.pipeline_images_per_s:
        rows.append(("in-process pipeline", f"{summary.pipeline_images_per_s:.1f} images/s"))
        rows.append(("served ÷ pipeline", f"{summary.served_over_pipeline:.2f}"))
    if args.compare_baseline:
        baseline = summaries[1]
        rows.append(("baseline images/s", f"{baseline.images_per_s:.1f} (transferkit ÷ baseline "
                                          f"{summary.images_per_s / baseline.images_per_s:.2f})"))
        rows.append(("baseline p50/p95/p99", f"{baseline.p50_ms:.0f} / {baseline.p95_ms:.0f} / "
                                             f"{baseline.p99_ms:.0f} ms"))
        if args.rounds > 1:
            ratios = paired_ratios(summaries)
            rows.append((f"over {args.rounds} rounds", f"transferkit ÷ baseline images/s median "
                         f"{statistics.median(r for r, _ in ratios):.2f} (min {min(r for r, _ in ratios):.2f}); "
                         f"p95 difference median {statistics.median(d for _, d in ratios):+.0f} ms"))
    files = "comparison.md, summary.json, transferkit/ and baseline/" if args.compare_baseline else \
        "locust_stats.csv, locust.html, summary.json"
    rows.append(("files", f"{args.out.absolute()} ({files})"))
    if args.compare_baseline:
        print(comparison_table(summaries))
    print_summary(rows)
    problems = []
    served = [s for s in summaries if s.server != "baseline"]  # the thresholds judge the service, every round
    worst_failures, worst_p95 = max(s.failure_ratio for s in served), max(s.p95_ms for s in served)
    if worst_failures > args.max_failure_ratio:
        problems.append(f"failure ratio {worst_failures:.4f} > {args.max_failure_ratio}")
    if args.max_p95_ms is not None and worst_p95 > args.max_p95_ms:
        problems.append(f"p95 {worst_p95:.0f} ms > {args.max_p95_ms:.0f} ms")
    if problems:
        print(f"transferkit loadtest: error: thresholds exceeded: {'; '.join(problems)}", file=sys.stderr)
        return 1
    return 0


def add_bench_models_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "bench-models", help="one service, many models: a version swapped in under load, three models against one",
        description="Serve BUNDLE from model repositories with real `bentoml serve` (inprocess layout, onnx) and "
                    "load it with --users client threads posting one small PNG per request to /v2/models/NAME/infer. "
                    "swap: version 2 of model a is copied into the polled repository a third of the way into the "
                    "run; every status code, when answers switched, and each worker's swap are reported (target: "
                    "only 200). spread: the same load on one model, then spread over three served together "
                    "(target: three >= 0.95 x one). budget: two models alternating under a memory budget that holds "
                    "one per worker, or per device in the batched layout (target: 200, or 503 with Retry-After "
                    "while one reloads). Writes results.md, "
                    "results.json, swap.png and the server logs to --out.",
    )
    p.add_argument("bundle", type=Path, metavar="BUNDLE", help="a bundle directory (copied into the repositories)")
    p.add_argument("--out", type=Path, required=True, help="new directory for the results")
    p.add_argument("--force", action="store_true", help="replace --out if an earlier bench-models wrote it")
    p.add_argument("--scenarios", default="swap,spread,budget",
                   help="comma-separated: swap, spread, budget (default all three)")
    p.add_argument("--users", type=int, default=16, help="client threads (default 16)")
    p.add_argument("--duration", default="30s", help="per run, e.g. 30s or 2m (default 30s)")
    p.add_argument("--workers", type=int, help="server workers (default: the service's, one per core)")
    p.add_argument("--layout", choices=["inprocess", "batched"], default="inprocess",
                   help="the service's layout (default inprocess; batched: the GPU layout, a model service per "
                        "model, forced on a CPU here)")
    p.set_defaults(handler=run_bench_models)


def run_bench_models(args: argparse.Namespace) -> int:
    import shutil

    from transferkit.benchmarks import models
    from transferkit.benchmarks.loadtest import parse_duration
    from transferkit.core.atomic import atomic_output_dir
    from transferkit.core.manifest import read_manifest
    from transferkit.core.system import cpu_model

    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    if not scenarios or set(scenarios) - {"swap", "spread", "budget"}:
        raise UsageError(f"--scenarios: choose from swap, spread, budget (got {args.scenarios!r})")
    if args.users < 1:
        raise UsageError("--users must be >= 1")
    read_manifest(args.bundle)  # not a bundle: one line, before anything starts
    seconds = float(parse_duration(args.duration))
    results = models.Results(args.users, seconds, args.layout)
    log = lambda line: print(line, flush=True)  # noqa: E731
    with atomic_output_dir(args.out, args.force) as staging:
        if "swap" in scenarios:
            results.swap = models.swap(args.bundle, staging, args.users, seconds, args.workers, log, args.layout)
        if "spread" in scenarios:
            results.spread = models.spread(args.bundle, staging, args.users, seconds, args.workers, log,
                                           args.layout)
        if "budget" in scenarios:
            results.budget = models.budget(args.bundle, staging, args.users, seconds, args.workers, log,
                                           args.layout)
        for folder in [*staging.glob("*-repository"), *staging.glob("spread-[0-9]")]:
            shutil.rmtree(folder)  # copies of the bundle this command made
        files = models.write(results, staging, cpu_model())
    rows = [("cpu", cpu_model()), ("layout", args.layout)]
    if results.swap:
        rows.append(("swap: status codes", str(results.swap["statuses"])))
        rows.append(("swap: v1 answers after the first v2", str(results.swap["v1_answers_after_the_first_v2"])))
    if results.budget:
        rows.append(("budget: status codes", f"{results.budget['statuses']} ({results.budget['reloads']} reloads, "
                                             f"median {results.budget['reload_seconds_median']} s)"))
    if results.spread:
        rows.append(("spread: three / one images/s", f"{results.spread['three models']['images_per_s']} / "
                                                     f"{results.spread['one model']['images_per_s']} = "
                                                     f"{results.spread['ratio']}"))
    rows.append(("files", ", ".join(str(args.out.absolute() / f.name) for f in files)))
    print_summary(rows)
    return 0
