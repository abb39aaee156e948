"""Run locust headless against the service (and, with ``compare_baseline``, against the plain FastAPI server) and
measure the in-process pipeline beside it.

- The in-process pipeline is what the same cores do with no HTTP at all: one process per core, each decoding the
  load test's images with the same decoder and running them through its own one-thread onnxruntime session, one
  image at a time. Served ÷ pipeline says how much of that the server keeps.
- The baseline (benchmarks/baseline_server.py) is the simplest thing a user could write instead: FastAPI +
  onnxruntime under ``uvicorn --workers <cores>``, one intra-op thread, no batching.
- Batch sizes come from BentoML's ``bentoml_service_adaptive_batch_size`` histogram, parsed with prometheus_client's
  parser; the counters are cumulative, so the figures are the difference between before and after the load.
"""

from __future__ import annotations

import csv
import json
import os
import re
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path

from transferkit.core.errors import TransferkitError, UsageError
from transferkit.core.system import available_cores
from transferkit.service.launcher import PROJECT_ROOT, BentoServer, ServerProcess

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
BATCH_METRIC = "bentoml_service_adaptive_batch_size"
HANDED_BACK_METRIC = "transferkit_connections_handed_back"
MICROBATCH_METRIC = "transferkit_microbatch_size"  # the microbatch layout's own batches (no BentoML batcher)


@dataclass
class LoadTestSummary:
    server: str  # "transferkit", "baseline", or "external" for --url
    url: str
    users: int
    duration_s: int
    requests: int
    failures: int
    overloaded: int
    requests_per_s: float
    images_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    failure_ratio: float
    layout: str | None = None
    backend: str | None = None  # what the service ran (its /metadata): `auto` resolved
    batch_size_mean: float | None = None
    batch_calls: int | None = None
    pipeline_images_per_s: float | None = None
    served_over_pipeline: float | None = None
    connections_handed_back: int | None = None  # keep-alive connections a busier worker closed (service/balance.py)
    round: int = 1  # --rounds: which pair of runs this one belongs to
    by_name: dict[str, dict] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------------- servers


def start_transferkit(model: str, log_path: Path, backend: str = "auto") -> BentoServer:
    """``bentoml serve`` of ``model`` through the one launcher (service/launcher.py), ready when returned."""
    return BentoServer(model, log_path=log_path, backend=backend).start().wait_ready(timeout=180)


class BaselineServer(ServerProcess):
    """benchmarks/baseline_server.py under ``uvicorn --workers N``, started, awaited and stopped by the same launcher
    (its own session, the parent-death signal, the orphan sweep)."""

    name = "the baseline server"

    def __init__(self, log_path: Path, env: dict[str, str], workers: int):
        # From the project root: `python -m uvicorn` imports the app from the working directory in a plain checkout.
        super().__init__(log_path=log_path, env=env, cwd=PROJECT_ROOT)
        self.worker_count = workers

    def command(self) -> list[str]:
        return [sys.executable, "-m", "uvicorn", "transferkit.benchmarks.baseline_server:app", "--host", self.host,
                "--port", str(self.port), "--workers", str(self.worker_count)]


def start_baseline(model: str, log_path: Path, backend: str = "onnx", workers: int | None = None) -> BaselineServer:
    """The baseline server for ``model``, ready when returned."""
    from transferkit.core.manifest import RUNTIME_BACKENDS
    from transferkit.core.predictors import resolve_bundle_path

    # The plain server runs onnxruntime: the file of an onnxruntime backend, else the fp32 ONNX.
    spec = RUNTIME_BACKENDS.get(backend)
    backend = backend if spec is not None and spec.engine == "onnxruntime" else "onnx"
    env = {**os.environ, "TRANSFERKIT_BASELINE_BUNDLE": str(resolve_bundle_path(model)),
           "TRANSFERKIT_BASELINE_BACKEND": backend}
    return BaselineServer(log_path, env, workers or available_cores()).start().wait_ready(timeout=120)


# ------------------------------------------------------------------------------------------------------- metrics


def metric_totals(url: str) -> dict[str, float]:
    """Every sample on ``url``/metrics summed by sample name over workers and labels (one request)."""
    import requests
    from prometheus_client.parser import text_string_to_metric_families

    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(requests.get(url + "/metrics", timeout=10).text):
        for sample in family.samples:
            totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals


def _read_stats(prefix: Path) -> dict[str, dict]:
    path = Path(f"{prefix}_stats.csv")
    if not path.is_file():
        raise TransferkitError(f"locust wrote no statistics ({path.name} missing); see locust_output.txt")
    with path.open() as handle:
        return {row["Name"]: row for row in csv.DictReader(handle)}


def run_locust(url: str, users: int, spawn_rate: float, duration: int, out: Path) -> subprocess.CompletedProcess:
    prefix = out / "locust"
    command = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", url,
               "-u", str(users), "-r", str(spawn_rate), "-t", f"{duration}s", "--csv", str(prefix),
               "--html", str(out / "locust.html"), "--only-summary", "--exit-code-on-error", "0"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=duration + 120)
    (out / "locust_output.txt").write_text(result.stdout + result.stderr)
    return result


def summarise(server: str, url: str, users: int, duration: int, out: Path) -> LoadTestSummary:
    stats = _read_stats(out / "locust")
    aggregated = stats.get("Aggregated")
    if not aggregated or int(aggregated["Request Count"]) == 0:
        raise TransferkitError("the load test made no requests; is the service reachable?")
    predict_rows = {k: v for k, v in stats.items() if k.startswith("/predict")}
    overloaded = sum(int(v["Request Count"]) for k, v in stats.items() if k.startswith("overloaded"))
    requests_total = int(aggregated["Request Count"])
    failures = int(aggregated["Failure Count"])
    served = sum(float(v["Requests/s"]) - float(v["Failures/s"]) for v in predict_rows.values())
    percentile = {}
    for key, column in (("p50", "50%"), ("p95", "95%"), ("p99", "99%")):
        values = [(float(v[column]), int(v["Request Count"])) for v in predict_rows.values() if v[column] != "N/A"]
        percentile[key] = max((value for value, n in values if n), default=float("nan"))
    return LoadTestSummary(
        server=server, url=url, users=users, duration_s=duration, requests=requests_total, failures=failures,
        overloaded=overloaded, requests_per_s=float(aggregated["Requests/s"]), images_per_s=served,
        p50_ms=percentile["p50"], p95_ms=percentile["p95"], p99_ms=percentile["p99"],
        failure_ratio=failures / requests_total,
        by_name={k: {"requests": int(v["Request Count"]), "failures": int(v["Failure Count"]),
                     "median_ms": v["50%"], "p95_ms": v["95%"], "requests_per_s": float(v["Requests/s"])}
                 for k, v in stats.items() if k != "Aggregated"},
    )


def measure(server: str, url: str, users: int, spawn_rate: float, duration: int, out: Path) -> LoadTestSummary:
    """One locust run against ``url``, with the batch histogram's difference over the run."""
    import requests

    out.mkdir(parents=True, exist_ok=True)
    before = metric_totals(url) if server != "baseline" else {}
    run_locust(url, users, spawn_rate, duration, out)
    summary = summarise(server, url, users, duration, out)
    if server != "baseline":
        after = metric_totals(url)

        def change(name: str) -> float:
            return after.get(name, 0.0) - before.get(name, 0.0)

        metric = MICROBATCH_METRIC if change(MICROBATCH_METRIC + "_count") else BATCH_METRIC
        calls = change(metric + "_count")
        summary.batch_calls = int(calls)
        summary.batch_size_mean = change(metric + "_sum") / calls if calls else None
        summary.connections_handed_back = int(change(HANDED_BACK_METRIC + "_total"))
        try:
            meta = requests.get(url + "/metadata", timeout=10).json()
            summary.layout = meta["layout"]["name"]
            summary.backend = meta["backend"]
        except Exception:  # an older service, or not ours
            summary.layout = None
    return summary


# ------------------------------------------------------------------------------------------ in-process pipeline


def _pipeline_worker(bundle: str, backend: str, images: list[bytes], weights: list[float], barrier,
                     seconds: float) -> int:
    """In a process of its own: warm up, wait for the others, then decode + predict one image at a time."""
    import random

    from transferkit.core.images import decode_image
    from transferkit.core.predictors import load_bundle

    loaded = load_bundle(bundle)
    predictor = loaded.predictor(backend, device="cpu", threads=1, spin=False)
    size = loaded.manifest.image_size
    rng = random.Random(os.getpid())
    for data in images:  # warm-up: every image once
        predictor(decode_image(data, size)[None])
    barrier.wait()  # every process measures over the same window
    done, end = 0, time.time() + seconds
    while time.time() < end:
        data = rng.choices(images, weights)[0]
        predictor(decode_image(data, size)[None])
        done += 1
    return done


def pipeline_images_per_s(model: str, backend: str = "onnx", seconds: float = 15.0,
                          processes: int | None = None) -> float:
    """Images/s of decode + onnxruntime on the load test's images, one process per core, no HTTP."""
    from transferkit.benchmarks.workload import load_images, mix_weights
    from transferkit.core.predictors import resolve_bundle_path

    groups = load_images()
    kinds = list(groups)
    kind_weights = mix_weights(kinds)
    images, weights = [], []
    for kind, weight in zip(kinds, kind_weights):
        for _, data, _ in groups[kind]:
            images.append(data)
            weights.append(weight / len(groups[kind]))
    processes = processes or available_cores()
    bundle = str(resolve_bundle_path(model))
    context = get_context("spawn")
    with context.Manager() as manager, ProcessPoolExecutor(processes, mp_context=context) as pool:
        barrier = manager.Barrier(processes)
        futures = [pool.submit(_pipeline_worker, bundle, backend, images, weights, barrier, seconds)
                   for _ in range(processes)]
        done = sum(f.result() for f in futures)
    return done / seconds


# ------------------------------------------------------------------------------------------------------ commands


def run_order(rounds: int) -> list[tuple[int, str]]:
    """(round, server) in the order they run: the pair alternates which goes first (transferkit first in round 1),
    so a machine that slows down or speeds up during the test favours neither server."""
    order = []
    for number in range(1, rounds + 1):
        pair = ["transferkit", "baseline"] if number % 2 else ["baseline", "transferkit"]
        order += [(number, name) for name in pair]
    return order


def loadtest(url: str | None, model: str | None, users: int, spawn_rate: float, duration: int, out: Path,
             backend: str = "auto", compare_baseline: bool = False, pipeline_seconds: float = 15.0,
             rounds: int = 1, log=print) -> list[LoadTestSummary]:
    """Load-test the service (started for ``model``, or running at ``url``); with ``compare_baseline`` also the
    plain FastAPI server, back to back (both started once), ``rounds`` times (see :func:`run_order`). Summaries come
    in round order, transferkit before the baseline within a round, each with served ÷ in-process pipeline when the
    bundle is known."""
    if (url is None) == (model is None):
        raise UsageError("give exactly one of --url URL (a running service) or --model MODEL (started for you)")
    if compare_baseline and model is None:
        raise UsageError("--compare-baseline needs --model MODEL (both servers are started for the same bundle)")
    if users < 1 or duration < 1 or spawn_rate <= 0:
        raise UsageError("--users and --duration must be >= 1 and --spawn-rate > 0")
    if rounds < 1 or (rounds > 1 and not compare_baseline):
        raise UsageError("--rounds must be >= 1, and more than 1 only with --compare-baseline")
    out.mkdir(parents=True, exist_ok=True)
    summaries = []
    if url is not None:
        log(f"running locust: {users} users, spawn rate {spawn_rate}/s, {duration}s against {url}")
        summaries.append(measure("external", url, users, spawn_rate, duration, out))
    else:
        kinds = {"transferkit": start_transferkit, "baseline": start_baseline}
        names = list(kinds) if compare_baseline else ["transferkit"]
        homes = {name: out / name if compare_baseline else out for name in names}
        servers: dict = {}
        try:
            # Both servers stay up for every round, the idle one costing nothing: the runs of a pair are seconds
            # apart instead of a server restart apart, so a machine whose speed drifts favours neither.
            for name in names:
                homes[name].mkdir(parents=True, exist_ok=True)
                log(f"starting {name} for {model} ({backend})")
                servers[name] = kinds[name](model, homes[name] / "service.log", backend)
            for number, name in run_order(rounds) if compare_baseline else [(1, "transferkit")]:
                folder = homes[name] / f"round-{number}" if rounds > 1 else homes[name]
                label = name if rounds == 1 else f"{name} (round {number} of {rounds})"
                log(f"running locust against {label}: {users} users, spawn rate {spawn_rate}/s, {duration}s")
                summary = measure(name, servers[name].url, users, spawn_rate, duration, folder)
                summary.round = number
                summaries.append(summary)
        finally:
            for server in servers.values():
                server.stop()
        summaries.sort(key=lambda s: (s.round, s.server != "transferkit"))
    bundle = model if model is not None else _local_bundle(summaries[0].url)
    backend = next((s.backend for s in summaries if s.server != "baseline" and s.backend), backend)
    if bundle is not None and backend != "auto":
        log(f"measuring the in-process pipeline (decode + {backend}, {available_cores()} processes, no HTTP, "
            f"{pipeline_seconds:.0f}s)")
        pipeline = pipeline_images_per_s(bundle, backend, pipeline_seconds)
        for summary in summaries:
            summary.pipeline_images_per_s = pipeline
            summary.served_over_pipeline = summary.images_per_s / pipeline
    (out / "summary.json").write_text(json.dumps([asdict(s) for s in summaries] if compare_baseline
                                                 else asdict(summaries[0]), indent=2) + "\n")
    if compare_baseline:
        (out / "comparison.md").write_text(comparison_table(summaries) + "\n")
    return summaries


def paired_ratios(summaries: list[LoadTestSummary]) -> list[tuple[float, float]]:
    """Per round: (transferkit images/s ÷ baseline images/s, transferkit p95 − baseline p95 in ms)."""
    pairs: dict[int, dict[str, LoadTestSummary]] = {}
    for s in summaries:
        pairs.setdefault(s.round, {})[s.server] = s
    return [(p["transferkit"].images_per_s / p["baseline"].images_per_s, p["transferkit"].p95_ms - p["baseline"].p95_ms)
            for _, p in sorted(pairs.items()) if {"transferkit", "baseline"} <= p.keys()]


def comparison_table(summaries: list[LoadTestSummary]) -> str:
    rounds = max((s.round for s in summaries), default=1)
    lines = [("| round " if rounds > 1 else "") + "| server | requests | failures | images/s | p50 / p95 / p99 ms | "
             "served ÷ pipeline |", ("|---" if rounds > 1 else "") + "|---|---|---|---|---|---|"]
    for s in summaries:
        ratio = "-" if s.served_over_pipeline is None else f"{s.served_over_pipeline:.2f}"
        name = s.server + (f" ({', '.join(filter(None, (s.backend, s.layout)))})" if s.layout else "")
        lines.append((f"| {s.round} " if rounds > 1 else "") + f"| {name} | {s.requests} | {s.failures} | "
                     f"{s.images_per_s:.1f} | {s.p50_ms:.0f} / {s.p95_ms:.0f} / {s.p99_ms:.0f} | {ratio} |")
    if summaries and summaries[0].pipeline_images_per_s:
        lines.append(f"\nin-process pipeline: {summaries[0].pipeline_images_per_s:.1f} images/s")
    ratios = paired_ratios(summaries)
    if len(ratios) > 1:
        lines.append(f"transferkit ÷ baseline images/s, per round: {', '.join(f'{r:.2f}' for r, _ in ratios)} "
                     f"(median {statistics.median(r for r, _ in ratios):.2f}); p95 transferkit − baseline: "
                     f"{', '.join(f'{d:+.0f}' for _, d in ratios)} ms (median "
                     f"{statistics.median(d for _, d in ratios):+.0f})")
    return "\n".join(lines)


def _local_bundle(url: str) -> str | None:
    """The bundle a running local service serves, when it is in this machine's BentoML store."""
    import requests

    try:
        meta = requests.get(url + "/metadata", timeout=10).json()
        from transferkit.core.predictors import resolve_bundle_path

        return str(resolve_bundle_path(f"{meta['name']}:{meta['version']}"))
    except Exception:
        return None


def parse_duration(text: str) -> int:
    match = re.fullmatch(r"(\d+)\s*(s|m)?", text.strip())
    if not match:
        raise UsageError(f"--duration {text!r}: expected seconds, e.g. 30 or 30s or 2m")
    return int(match.group(1)) * (60 if match.group(2) == "m" else 1)
