"""``transferkit bench-models``: one service, many models (issue 26), measured against real ``bentoml serve``.

- **swap**: a repository with model ``a`` at version 1, polled every second; USERS clients post to
  ``/v2/models/a/infer`` for the whole run; a third of the way in, version 2 is copied in (under a dot name, then
  renamed). Reported: every status code (the target: nothing but 200), when the first answer from version 2 came,
  the last one from version 1, and each worker's swap time from the server log.
- **spread**: the same load against one model alone, then spread over three models (``a``, ``b``, ``c``: copies of
  the bundle) served together; images/s of each (the target: three ≥ 0.95 × one).
- **budget**: two models and a memory budget that holds one per worker (batched: per device), requests alternating
  between them: every status code (the target: 200, or 503 with Retry-After while a model reloads) and each reload's
  seconds.

The clients are threads of this process posting one small PNG per request (JSON, base64), each waiting what a 503's
Retry-After asks (at most 5 s) before its next request: the same client for every figure, so the ratios compare the
servers, not the clients.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import requests

from transferkit.benchmarks.workload import load_images
from transferkit.service.launcher import BentoServer

SWAP_LINE = re.compile(r"worker (\d+) serves (\S+) (\S+) \(was (\S+);")


@dataclass
class Answer:
    at: float  # seconds since the load started
    model: str
    status: int
    version: str | None
    retry_after: bool = False  # a 503 that says when to retry
    error: str = ""  # no answer: the exception's type


@dataclass
class Run:
    """One load: every answer, and images/s over the whole run."""

    answers: list[Answer]
    seconds: float
    stale_connections: int = 0  # idle keep-alive connections the server had closed, sent again on a new one

    @property
    def statuses(self) -> dict[int, int]:
        return dict(Counter(a.status for a in self.answers))

    @property
    def errors(self) -> dict[str, int]:
        return dict(Counter(a.error for a in self.answers if a.error))

    @property
    def images_per_s(self) -> float:
        return sum(a.status == 200 for a in self.answers) / self.seconds


@dataclass
class Results:
    users: int
    seconds: float
    layout: str = "inprocess"  # the service's layout (batched: a model service per model)
    swap: dict = field(default_factory=dict)
    spread: dict = field(default_factory=dict)
    budget: dict = field(default_factory=dict)


def version_copy(bundle: Path, dest: Path, version: str) -> Path:
    """``bundle`` copied to ``dest`` with its manifest saying ``version`` (complete before it appears: copied under a
    dot name, then renamed, as a repository user should)."""
    partial = dest.with_name("." + dest.name)
    shutil.copytree(bundle, partial)
    manifest = json.loads((partial / "manifest.json").read_text())
    manifest["version"] = version
    (partial / "manifest.json").write_text(json.dumps(manifest))
    partial.rename(dest)
    return dest


def drive(url: str, models: list[str], users: int, seconds: float,
          during: tuple[float, callable] | None = None) -> Run:
    """``users`` threads posting to ``/v2/models/M/infer`` for ``seconds``, each request to the next of ``models``;
    ``during``: (at which second, what to do) once, from the caller's thread."""
    image = base64.b64encode(load_images()["small"][0][1]).decode()
    body = json.dumps({"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1], "data": [image]}]})
    answers: list[Answer] = []
    start = time.monotonic()
    stop = threading.Event()

    def post(session: requests.Session, model: str) -> requests.Response:
        """One request; sent again once if the server had closed the pooled connection while it sat idle (its
        keep-alive timeout, 5 s, can end just as a client that waited for Retry-After reuses it), as urllib3 and
        browsers do for a connection that fails before any answer."""
        for attempt in (0, 1):
            try:
                return session.post(f"{url}/v2/models/{model}/infer", data=body, timeout=60,
                                    headers={"Content-Type": "application/json"})
            except requests.ConnectionError as exc:
                if attempt or "RemoteDisconnected" not in repr(exc):
                    raise
                stale[0] += 1
        raise AssertionError("unreachable")

    stale = [0]

    def user(index: int) -> None:
        with requests.Session() as session:
            count = index
            while not stop.is_set():
                model = models[count % len(models)]
                count += 1
                try:
                    response = post(session, model)
                    version = response.json().get("model_version") if response.status_code == 200 else None
                    answers.append(Answer(time.monotonic() - start, model, response.status_code, version,
                                          "Retry-After" in response.headers))
                except requests.RequestException as exc:  # a reset or a timeout
                    answers.append(Answer(time.monotonic() - start, model, 0, None, error=type(exc).__name__))
                    continue
                if response.status_code == 503 and "Retry-After" in response.headers:
                    stop.wait(min(5.0, float(response.headers["Retry-After"])))  # as a client should

    threads = [threading.Thread(target=user, args=(i,), daemon=True) for i in range(users)]
    for thread in threads:
        thread.start()
    if during is not None:
        time.sleep(max(0.0, during[0] - (time.monotonic() - start)))
        during[1]()
    time.sleep(max(0.0, seconds - (time.monotonic() - start)))
    stop.set()
    for thread in threads:
        thread.join()
    return Run(answers, time.monotonic() - start, stale[0])


def _served(repository: Path, log: Path, workers: int | None, layout: str = "inprocess", **settings) -> BentoServer:
    extra = {"workers": workers} if workers else {}
    return BentoServer(repository, log_path=log, backend="onnx", layout=layout, **extra,
                       **settings).start().wait_ready(timeout=180)


def swap(bundle: Path, out: Path, users: int, seconds: float, workers: int | None, log,
         layout: str = "inprocess") -> dict:
    repository = out / "swap-repository"
    version_copy(bundle, repository / "a" / "1", "1")
    server = _served(repository, out / "swap-server.log", workers, layout, poll_s=1)
    try:
        log(f"swap: {users} users on a for {seconds:.0f} s; version 2 copied in at {seconds / 3:.0f} s")
        run = drive(server.url, ["a"], users, seconds,
                    during=(seconds / 3, lambda: version_copy(bundle, repository / "a" / "2", "2")))
        text = server.log()
    finally:
        server.stop()
    new = [a.at for a in run.answers if a.version == "2"]
    first_new = min(new) if new else None
    old_after = [a.at for a in run.answers if a.version == "1" and first_new is not None and a.at > first_new]
    swaps = [{"worker": int(w), "version": v} for w, name, v, _ in SWAP_LINE.findall(text) if name == "a"]
    return {"statuses": run.statuses, "errors": run.errors, "requests": len(run.answers),
            "images_per_s": round(run.images_per_s, 1),
            "copied_at_s": round(seconds / 3, 1), "first_v2_answer_s": first_new and round(first_new, 2),
            "last_v1_answer_s": round(max(a.at for a in run.answers if a.version == "1"), 2),
            "v1_answers_after_the_first_v2": len(old_after), "workers_swapped": swaps,
            "timeline": _timeline(run)}


def _timeline(run: Run, step: float = 0.5) -> list[dict]:
    """Answers per half second, by version (and failures): what the plot shows."""
    buckets: dict[int, Counter] = {}
    for answer in run.answers:
        key = answer.version if answer.status == 200 else f"status {answer.status}"
        buckets.setdefault(int(answer.at / step), Counter())[key] += 1
    return [{"at_s": index * step, **counts} for index, counts in sorted(buckets.items())]


def spread(bundle: Path, out: Path, users: int, seconds: float, workers: int | None, log,
           layout: str = "inprocess") -> dict:
    figures = {}
    for label, names in (("one model", ["a"]), ("three models", ["a", "b", "c"])):
        repository = out / f"spread-{len(names)}"
        for name in names:
            version_copy(bundle, repository / name / "1", "1")
        server = _served(repository, out / f"spread-{len(names)}-server.log", workers, layout)
        try:
            log(f"spread: {users} users over {', '.join(names)} for {seconds:.0f} s")
            run = drive(server.url, names, users, seconds)
        finally:
            server.stop()
        figures[label] = {"images_per_s": round(run.images_per_s, 1), "statuses": run.statuses}
    figures["ratio"] = round(figures["three models"]["images_per_s"] / figures["one model"]["images_per_s"], 3)
    return figures


LOAD_LINE = re.compile(r"worker (\d+) serves (\S+) \S+ \(was [^;]*; ([0-9.]+) s to verify, load and warm\)")


MEASURE = """
import sys, numpy as np, psutil
from transferkit.core.predictors import load_bundle
bundle = load_bundle(sys.argv[1])
size = bundle.manifest.image_size
warm = load_bundle(sys.argv[1]).predictor("onnx", "cpu", 1)  # the runtime's one-time set-up, not counted
warm(np.zeros((1, size, size, 3), np.uint8))
before = psutil.Process().memory_info().rss
predictor = bundle.predictor("onnx", "cpu", 1)
for batch in (1, 16):
    predictor(np.zeros((batch, size, size, 3), np.uint8))
print(psutil.Process().memory_info().rss - before)
"""


def model_megabytes(bundle: Path) -> float:
    """A second copy of the bundle's onnx model in one process, after a 1- and a 16-image request: what a worker
    holds per model (in a fresh process, as a worker is)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", MEASURE, str(bundle)], capture_output=True, text=True, check=True)
    return int(done.stdout.split()[-1]) / 2**20


def budget(bundle: Path, out: Path, users: int, seconds: float, workers: int | None, log,
           layout: str = "inprocess") -> dict:
    """Two models, a memory budget that holds one of them per worker (batched layout: per device, where each
    model has a process of its own), requests alternating between them."""
    from transferkit.core.system import available_cores
    from transferkit.service.settings import ServiceSettings

    repository = out / "budget-repository"
    for name in ("a", "b"):
        version_copy(bundle, repository / name / "1", "1")
    one = model_megabytes(bundle)
    count = max(1, ServiceSettings(layout="batched").plan().gpus) if layout == "batched" else \
        workers or available_cores()
    budget_mb = max(1, int(one * 1.5 * count))  # each worker's (device's) share holds one model, not two
    server = _served(repository, out / "budget-server.log", workers, layout, memory_budget_mb=budget_mb)
    try:
        log(f"budget: {users} users alternating between a and b for {seconds:.0f} s, budget {budget_mb} MB")
        run = drive(server.url, ["a", "b"], users, seconds)
        text = server.log()
    finally:
        server.stop()
    loads = [float(s) for _, name, s in LOAD_LINE.findall(text)]
    bare = sum(a.status == 503 and not a.retry_after for a in run.answers)
    return {"statuses": run.statuses, "errors": run.errors, "stale_connections_retried": run.stale_connections,
            "requests": len(run.answers), "budget_mb": budget_mb,
            "one_model_mb": round(one, 1),
            "503_without_retry_after": bare,
            "images_per_s": round(run.images_per_s, 1), "reloads": len(loads),
            "reload_seconds_median": round(sorted(loads)[len(loads) // 2], 2) if loads else None,
            "reload_seconds_max": round(max(loads), 2) if loads else None}


def write(results: Results, out: Path, cpu: str) -> list[Path]:
    """results.json, results.md and swap.png (answers per half second by version)."""
    (out / "results.json").write_text(json.dumps(asdict(results), indent=2) + "\n")
    lines = [f"# One service, many models ({cpu})", "",
             f"{results.users} users, {results.seconds:.0f} s per run, {results.layout} layout", ""]
    if results.swap:
        s = results.swap
        lines += ["## A new version swapped in under load", "", "| figure | value |", "|---|---|",
                  f"| status codes | {s['statuses']} |", f"| version 2 copied in at | {s['copied_at_s']} s |",
                  f"| first answer from version 2 | {s['first_v2_answer_s']} s |",
                  f"| last answer from version 1 | {s['last_v1_answer_s']} s |",
                  f"| version-1 answers after the first version-2 one | {s['v1_answers_after_the_first_v2']} |",
                  f"| workers that swapped | {', '.join(str(w['worker']) for w in s['workers_swapped'])} |", ""]
    if results.spread:
        s = results.spread
        lines += ["## Three models against one, same load", "", "| served | images/s | status codes |",
                  "|---|---|---|"] + [f"| {k} | {v['images_per_s']} | {v['statuses']} |" for k, v in s.items()
                                      if k != "ratio"] + ["", f"three ÷ one: **{s['ratio']}**", ""]
    if results.budget:
        s = results.budget
        lines += ["## Two models alternating, a budget that holds one", "", "| figure | value |", "|---|---|",
                  f"| one model, measured | {s['one_model_mb']} MB per worker |",
                  f"| budget (all workers) | {s['budget_mb']} MB |", f"| status codes | {s['statuses']} |",
                  f"| 503 without Retry-After | {s['503_without_retry_after']} |",
                  f"| no answer (client errors) | {s['errors'] or 0} |",
                  f"| idle keep-alive connections closed by the server, sent again | "
                  f"{s['stale_connections_retried']} |",
                  f"| reloads | {s['reloads']} |", f"| reload seconds, median / max | "
                  f"{s['reload_seconds_median']} / {s['reload_seconds_max']} |", f"| images/s | {s['images_per_s']} |",
                  ""]
    (out / "results.md").write_text("\n".join(lines))
    files = [out / "results.json", out / "results.md"]
    if results.swap:
        files.append(_plot(results.swap["timeline"], out / "swap.png"))
    return files


def _plot(timeline: list[dict], path: Path) -> Path:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 4))
    axes = figure.subplots()
    keys = sorted({k for row in timeline for k in row if k != "at_s"})
    for key in keys:
        axes.plot([row["at_s"] for row in timeline], [row.get(key, 0) for row in timeline],
                  label=f"version {key}" if not key.startswith("status") else key)
    axes.set_xlabel("seconds into the load")
    axes.set_ylabel("answers per 0.5 s")
    axes.set_title("Answers by version while version 2 is swapped in")
    axes.legend()
    figure.savefig(path, dpi=100)
    return path
