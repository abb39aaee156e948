"""Run locust headless against the service and summarise it, with the raw backend measured beside it.

Served ÷ raw: after the load test, the bundle's predictor is timed in this process at the mean batch size the service
formed (read from BentoML's ``bentoml_service_adaptive_batch_size`` histogram on /metrics), so the ratio compares the
HTTP service with the bare model on the same machine in the same run.
"""

from __future__ import annotations

import csv
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from transferkit.core.errors import TransferkitError, UsageError
from transferkit.core.system import free_port

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
PROJECT_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class LoadTestSummary:
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
    batch_size_mean: float | None
    batch_calls: int | None
    raw_images_per_s: float | None = None
    raw_batch_size: int | None = None
    served_over_raw: float | None = None
    by_name: dict[str, dict] = field(default_factory=dict)


class ManagedServer:
    """``bentoml serve`` for ``--model``, started and stopped by the load test."""

    def __init__(self, model: str, log_path: Path, backend: str = "onnx"):
        import requests

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        if Path(model).is_dir():  # the server runs from the project root
            model = str(Path(model).resolve())
        env = {**os.environ, "TRANSFERKIT_MODEL": model, "TRANSFERKIT_BACKEND": backend,
               "BENTOML_DO_NOT_TRACK": "true"}
        self._log = log_path.open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bentoml", "serve", "transferkit.service.service:ImageClassifier", "--working-dir",
             str(PROJECT_ROOT), "--host", "127.0.0.1", "--port", str(self.port)],
            stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise TransferkitError(f"the service exited while starting; see {log_path}")
            try:
                if requests.get(self.url + "/readyz", timeout=3).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        self.stop()
        raise TransferkitError(f"the service did not become ready in 180 s; see {log_path}")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
        self._log.close()


def batch_histogram(url: str) -> tuple[float | None, int | None]:
    """Mean batch size and number of model calls from the service's /metrics."""
    import requests

    text = requests.get(url + "/metrics", timeout=10).text
    total = count = 0.0
    for line in text.splitlines():
        if line.startswith("bentoml_service_adaptive_batch_size_sum"):
            total += float(line.split()[-1])
        elif line.startswith("bentoml_service_adaptive_batch_size_count"):
            count += float(line.split()[-1])
    return (total / count, int(count)) if count else (None, None)


def _read_stats(prefix: Path) -> dict[str, dict]:
    path = Path(f"{prefix}_stats.csv")
    if not path.is_file():
        raise TransferkitError(f"locust wrote no statistics ({path.name} missing); see its output above")
    with path.open() as handle:
        return {row["Name"]: row for row in csv.DictReader(handle)}


def run_locust(url: str, users: int, spawn_rate: float, duration: int, out: Path) -> subprocess.CompletedProcess:
    prefix = out / "locust"
    command = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", url,
               "-u", str(users), "-r", str(spawn_rate), "-t", f"{duration}s", "--csv", str(prefix),
               "--html", str(out / "locust.html"), "--only-summary", "--exit-code-on-error", "0"]
    return subprocess.run(command, capture_output=True, text=True, timeout=duration + 120)


def raw_images_per_s(model: str, backend: str, batch: int, seconds: float = 5.0) -> float:
    """The bare predictor's images/s at ``batch``, this process, after warm-up."""
    from transferkit.export.predictors import load_bundle

    bundle = load_bundle(model)
    predictor = bundle.predictor(backend)
    size = bundle.manifest.image_size
    x = np.random.default_rng(0).uniform(0, 255, (batch, size, size, 3)).astype(np.float32)
    for _ in range(3):
        predictor(x)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        predictor(x)
        done += batch
    return done / (time.perf_counter() - start)


def summarise(url: str, users: int, duration: int, out: Path) -> LoadTestSummary:
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
    mean_batch, calls = batch_histogram(url)
    return LoadTestSummary(
        url=url, users=users, duration_s=duration, requests=requests_total, failures=failures,
        overloaded=overloaded, requests_per_s=float(aggregated["Requests/s"]), images_per_s=served,
        p50_ms=percentile["p50"], p95_ms=percentile["p95"], p99_ms=percentile["p99"],
        failure_ratio=failures / requests_total, batch_size_mean=mean_batch, batch_calls=calls,
        by_name={k: {"requests": int(v["Request Count"]), "failures": int(v["Failure Count"]),
                     "median_ms": v["50%"], "p95_ms": v["95%"], "requests_per_s": float(v["Requests/s"])}
                 for k, v in stats.items() if k != "Aggregated"},
    )


def loadtest(url: str | None, model: str | None, users: int, spawn_rate: float, duration: int, out: Path,
             backend: str = "onnx", log=print) -> LoadTestSummary:
    if (url is None) == (model is None):
        raise UsageError("give exactly one of --url URL (a running service) or --model MODEL (started for you)")
    if users < 1 or duration < 1 or spawn_rate <= 0:
        raise UsageError("--users and --duration must be >= 1 and --spawn-rate > 0")
    out.mkdir(parents=True, exist_ok=True)
    server = None
    if model is not None:
        log(f"starting the service for {model} ({backend})")
        server = ManagedServer(model, out / "service.log", backend)
        url = server.url
    try:
        log(f"running locust: {users} users, spawn rate {spawn_rate}/s, {duration}s against {url}")
        result = run_locust(url, users, spawn_rate, duration, out)
        (out / "locust_output.txt").write_text(result.stdout + result.stderr)
        summary = summarise(url, users, duration, out)
        if model is None:
            model = _local_bundle(url)
        if model is not None and summary.batch_size_mean:
            batch = max(1, round(summary.batch_size_mean))
            log(f"timing the raw {backend} predictor at batch {batch} for comparison")
            summary.raw_batch_size = batch
            summary.raw_images_per_s = raw_images_per_s(model, backend, batch)
            summary.served_over_raw = summary.images_per_s / summary.raw_images_per_s
    finally:
        if server is not None:
            server.stop()
    import json

    (out / "summary.json").write_text(json.dumps(asdict(summary), indent=2) + "\n")
    return summary


def _local_bundle(url: str) -> str | None:
    """The bundle a running local service serves, if its directory is readable here."""
    import requests

    try:
        path = requests.get(url + "/metadata", timeout=10).json()["runtime"].get("bundle")
    except Exception:
        return None
    return path if path and Path(path).is_dir() else None


def parse_duration(text: str) -> int:
    match = re.fullmatch(r"(\d+)\s*(s|m)?", text.strip())
    if not match:
        raise UsageError(f"--duration {text!r}: expected seconds, e.g. 30 or 30s or 2m")
    return int(match.group(1)) * (60 if match.group(2) == "m" else 1)
