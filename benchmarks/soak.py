"""Soak benchmark (not a CI test): the project's locust load for many minutes, watching every server process.

    flock /tmp/tk-heavy.lock python -m transferkit.benchmarks.soak --model BUNDLE --minutes 10 --users 16 --out soak

Starts the service through the launcher (service/launcher.py), runs benchmarks/locustfile.py headless, and every few
seconds samples the RSS and the open file descriptors of the arbiter and of each worker (entry and model processes).
Every request's latency is recorded by a small locust listener, so the per-minute p50/p95/p99 are exact, not the
rolling-window figures of locust's history file. At the end the server is stopped with SIGTERM (its drain is part of
the run) and the results are checked against issue 16's targets: no failures, RSS growth after warm-up under 5 % per
process, and a flat count of open file descriptors.

Writes soak.md (the tables), soak.json, per_minute.csv, processes.csv (every sample), requests.csv (every request)
and soak.png (RSS, FDs and latency over time) to --out.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import psutil
import requests

from transferkit.core.errors import TransferkitError, UsageError
from transferkit.service.launcher import BentoServer, worker_service

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
RSS_GROWTH_TARGET_PCT = 5.0
FD_DRIFT_TARGET = 2  # open descriptors more at the end than after warm-up: a socket in flight, not a leak

# Loaded by locust beside the project's locustfile: one CSV row per request (written where the env var says).
LISTENER = '''"""transferkit soak: record every request (written by benchmarks/soak.py)."""
import csv
import os
import time

from locust import events

_handle = open(os.environ["TRANSFERKIT_SOAK_REQUESTS"], "w", newline="")
_writer = csv.writer(_handle)
_writer.writerow(["start", "name", "ms", "ok"])


@events.request.add_listener
def _record(name, response_time, exception=None, start_time=None, **kwargs):
    _writer.writerow([f"{start_time or time.time():.3f}", name, f"{response_time:.1f}", int(exception is None)])


@events.quitting.add_listener
def _close(**kwargs):
    _handle.close()
'''


@dataclass
class MinuteStats:
    minute: int
    requests: int
    failures: int
    overloaded: int
    predict_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float


@dataclass
class ProcessStats:
    pid: int
    role: str  # arbiter | entry | model
    samples: int
    rss_warm_mb: float  # mean over the first minute after warm-up
    rss_end_mb: float  # mean over the last minute
    rss_growth_pct: float
    rss_max_mb: float
    fds_warm: int
    fds_end: int
    fds_max: int


def role_of(process: psutil.Process, arbiter_pid: int) -> str:
    if process.pid == arbiter_pid:
        return "arbiter"
    service = worker_service(process) or ""
    # The batched layout's model services: ``transferkit-model``, or ``transferkit-model-NAME`` per model.
    return "entry" if service == "transferkit" else "model" if service.startswith("transferkit-model") else "other"


def sample_processes(server: BentoServer, start: float) -> list[dict]:
    """One row per process of the server: seconds since start, pid, role, RSS (MB) and open descriptors."""
    rows = []
    processes = [psutil.Process(server.pid)] + server.workers()
    now = time.monotonic() - start
    for process in processes:
        try:
            with process.oneshot():
                rows.append({"t_s": round(now, 1), "pid": process.pid, "role": role_of(process, server.pid),
                             "rss_mb": round(process.memory_info().rss / 2**20, 2), "fds": process.num_fds()})
        except psutil.Error:  # exited between listing and sampling
            continue
    return rows


def per_minute(requests_csv: Path) -> list[MinuteStats]:
    with requests_csv.open() as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        raise TransferkitError("locust recorded no requests; is the service reachable? (see locust_output.txt)")
    start = min(float(r["start"]) for r in rows)
    minutes: dict[int, list[dict]] = {}
    for row in rows:
        minutes.setdefault(int((float(row["start"]) - start) // 60), []).append(row)
    end = max(float(r["start"]) for r in rows)
    stats = []
    for minute in sorted(minutes):
        chunk = minutes[minute]
        seconds = max(1.0, min(60.0, end - start - 60 * minute))  # the last minute may be partial
        served = np.array([float(r["ms"]) for r in chunk if r["name"].startswith("/predict") and r["ok"] == "1"])
        p50, p95, p99 = (np.percentile(served, [50, 95, 99]) if served.size else (float("nan"),) * 3)
        stats.append(MinuteStats(
            minute=minute + 1, requests=len(chunk), failures=sum(r["ok"] != "1" for r in chunk),
            overloaded=sum(r["name"].startswith("overloaded") for r in chunk),
            predict_per_s=round(served.size / seconds, 2),
            p50_ms=round(float(p50), 1), p95_ms=round(float(p95), 1), p99_ms=round(float(p99), 1)))
    return stats


def per_process(samples: list[dict], warmup_s: float, end_s: float) -> list[ProcessStats]:
    """RSS growth and descriptor drift of every process alive after warm-up."""
    stats = []
    for pid in sorted({s["pid"] for s in samples}):
        rows = [s for s in samples if s["pid"] == pid and s["t_s"] >= warmup_s]
        if len(rows) < 2:
            continue  # started or ended during warm-up (a respawn would show here as a new pid)
        warm = [s for s in rows if s["t_s"] < rows[0]["t_s"] + 60]
        last = [s for s in rows if s["t_s"] >= min(end_s, rows[-1]["t_s"]) - 60]
        rss_warm = float(np.mean([s["rss_mb"] for s in warm]))
        rss_end = float(np.mean([s["rss_mb"] for s in last]))
        stats.append(ProcessStats(
            pid=pid, role=rows[0]["role"], samples=len(rows), rss_warm_mb=round(rss_warm, 1),
            rss_end_mb=round(rss_end, 1), rss_growth_pct=round(100 * (rss_end - rss_warm) / rss_warm, 2),
            rss_max_mb=round(max(s["rss_mb"] for s in rows), 1), fds_warm=rows[0]["fds"], fds_end=rows[-1]["fds"],
            fds_max=max(s["fds"] for s in rows)))
    return stats


def verdicts(minutes: list[MinuteStats], processes: list[ProcessStats]) -> dict[str, bool]:
    return {
        "no failures": sum(m.failures for m in minutes) == 0,
        f"RSS growth after warm-up < {RSS_GROWTH_TARGET_PCT:.0f} % (every process)":
            all(p.rss_growth_pct < RSS_GROWTH_TARGET_PCT for p in processes),
        f"open FDs flat (end - after warm-up <= {FD_DRIFT_TARGET}, every process)":
            all(p.fds_end - p.fds_warm <= FD_DRIFT_TARGET for p in processes),
    }


def markdown(summary: dict) -> str:
    lines = [f"# Soak: {summary['model']} ({summary['backend']}, layout {summary['layout']}), "
             f"{summary['users']} users, {summary['minutes']} min", "",
             f"{summary['requests']} requests, {summary['failures']} failures, {summary['overloaded']} overloaded "
             f"(429/503), warm-up {summary['warmup_minutes']} min; stopped with SIGTERM: exit code "
             f"{summary['exit_code']} after {summary['stop_seconds']} s.", "",
             "| target | met |", "|---|---|"]
    lines += [f"| {name} | {'yes' if ok else '**no**'} |" for name, ok in summary["verdicts"].items()]
    lines += ["", "| minute | requests | failures | overloaded | /predict per s | p50 ms | p95 ms | p99 ms |",
              "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {m['minute']} | {m['requests']} | {m['failures']} | {m['overloaded']} | {m['predict_per_s']} | "
              f"{m['p50_ms']} | {m['p95_ms']} | {m['p99_ms']} |" for m in summary["per_minute"]]
    lines += ["", "| process | pid | RSS after warm-up MB | RSS last minute MB | growth % | max MB | "
                  "FDs after warm-up | FDs end | FDs max |", "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {p['role']} | {p['pid']} | {p['rss_warm_mb']} | {p['rss_end_mb']} | {p['rss_growth_pct']} | "
              f"{p['rss_max_mb']} | {p['fds_warm']} | {p['fds_end']} | {p['fds_max']} |" for p in summary["processes"]]
    return "\n".join(lines) + "\n"


def plot(samples: list[dict], minutes: list[MinuteStats], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # no pyplot: no global backend switch
    from matplotlib.figure import Figure

    figure = Figure(figsize=(13, 4), layout="constrained")
    rss, fds, latency = figure.subplots(1, 3)
    for pid in sorted({s["pid"] for s in samples}):
        rows = [s for s in samples if s["pid"] == pid]
        label = f"{rows[0]['role']} {pid}"
        rss.plot([s["t_s"] / 60 for s in rows], [s["rss_mb"] for s in rows], label=label)
        fds.plot([s["t_s"] / 60 for s in rows], [s["fds"] for s in rows], label=label)
    for axis, title in ((rss, "RSS (MB)"), (fds, "open file descriptors")):
        axis.set(title=title, xlabel="minutes")
        axis.legend(fontsize=7)
    for key in ("p50_ms", "p95_ms", "p99_ms"):
        latency.plot([m.minute for m in minutes], [getattr(m, key) for m in minutes], marker="o", label=key[:-3])
    latency.set(title="/predict latency per minute (ms)", xlabel="minute")
    latency.legend()
    FigureCanvasAgg(figure).print_png(str(path))


def soak(model: str, out: Path, minutes: float = 10, users: int = 16, spawn_rate: float = 16, warmup_minutes: float = 1,
         sample_s: float = 5, backend: str = "onnx", layout: str = "auto", log=print) -> dict:
    """Serve ``model``, load it with locust for ``minutes`` while sampling every server process, stop it with
    SIGTERM, and write the results to ``out`` (see the module docstring); returns the summary."""
    if minutes <= warmup_minutes or users < 1 or sample_s <= 0:
        raise UsageError("--minutes must exceed --warmup-minutes, --users >= 1, --sample-s > 0")
    out.mkdir(parents=True, exist_ok=True)
    listener = out / "soak_listener.py"
    listener.write_text(LISTENER)
    requests_csv = out / "requests.csv"
    log(f"starting the service for {model} ({backend}, layout {layout})")
    with BentoServer(model, log_path=out / "service.log", backend=backend, layout=layout) as server:
        layout_name = requests.get(server.url + "/metadata", timeout=10).json().get("layout", {}).get("name", layout)
        command = [sys.executable, "-m", "locust", "-f", f"{LOCUSTFILE},{listener}", "--headless", "--host", server.url,
                   "-u", str(users), "-r", str(spawn_rate), "-t", f"{int(minutes * 60)}s", "--csv", str(out / "locust"),
                   "--only-summary", "--exit-code-on-error", "0"]
        log(f"running locust: {users} users for {minutes:g} min against {server.url} (layout {layout_name})")
        samples, end_s = _sample_under_load(server, command, requests_csv, out / "locust_output.txt", minutes,
                                            sample_s, log)
        log("load finished; stopping the service with SIGTERM")
        stop_start = time.monotonic()
        exit_code = server.stop()
        stop_seconds = round(time.monotonic() - stop_start, 1)
    minute_stats = per_minute(requests_csv)
    process_stats = per_process(samples, warmup_minutes * 60, end_s)
    summary = {
        "model": str(model), "backend": backend, "layout": layout_name, "users": users, "minutes": minutes,
        "warmup_minutes": warmup_minutes, "requests": sum(m.requests for m in minute_stats),
        "failures": sum(m.failures for m in minute_stats), "overloaded": sum(m.overloaded for m in minute_stats),
        "exit_code": exit_code, "stop_seconds": stop_seconds,
        "verdicts": verdicts(minute_stats, process_stats),
        "per_minute": [asdict(m) for m in minute_stats], "processes": [asdict(p) for p in process_stats],
    }
    _write_results(out, summary, samples, minute_stats)
    return summary


def _sample_under_load(server: BentoServer, command: list[str], requests_csv: Path, output: Path, minutes: float,
                       sample_s: float, log) -> tuple[list[dict], float]:
    """Run locust (``command``) to its end, sampling the server's processes every ``sample_s`` seconds and logging
    them once a minute; returns the samples and the seconds the load lasted."""
    samples: list[dict] = []
    start = time.monotonic()
    with output.open("w") as locust_log:
        locust = subprocess.Popen(command, stdout=locust_log, stderr=subprocess.STDOUT,
                                  env={**server.environment, "TRANSFERKIT_SOAK_REQUESTS": str(requests_csv)})
        try:
            next_report = 60.0
            while locust.poll() is None:
                samples.extend(sample_processes(server, start))
                elapsed = time.monotonic() - start
                if elapsed >= next_report:
                    now = [s for s in samples if s["t_s"] == samples[-1]["t_s"]]
                    log(f"  {elapsed / 60:4.1f}/{minutes:g} min  " + "  ".join(
                        f"{s['role']} {s['rss_mb']:.0f} MB {s['fds']} fds" for s in now))
                    next_report += 60
                time.sleep(sample_s)
        finally:
            if locust.poll() is None:
                locust.terminate()
                locust.wait(60)
    return samples, time.monotonic() - start


def _write_results(out: Path, summary: dict, samples: list[dict], minute_stats: list[MinuteStats]) -> None:
    """soak.json, soak.md, processes.csv, per_minute.csv and soak.png."""
    (out / "soak.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "soak.md").write_text(markdown(summary))
    with (out / "processes.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["t_s", "pid", "role", "rss_mb", "fds"])
        writer.writeheader()
        writer.writerows(samples)
    with (out / "per_minute.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(asdict(minute_stats[0])))
        writer.writeheader()
        writer.writerows(asdict(m) for m in minute_stats)
    plot(samples, minute_stats, out / "soak.png")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m transferkit.benchmarks.soak",
        description="Soak benchmark: the project's locust load (benchmarks/locustfile.py) against `bentoml serve` "
                    "for --minutes, sampling RSS and open file descriptors of the arbiter and every worker, with "
                    "p50/p95/p99 per minute. Targets (issue 16): 0 failures, RSS growth after warm-up < 5 %, flat "
                    "FDs. Run it under `flock /tmp/tk-heavy.lock` on a shared machine.")
    parser.add_argument("--model", required=True, help="bundle directory or BentoML model tag")
    parser.add_argument("--out", type=Path, required=True, help="directory for soak.md/.json/.png and the CSVs")
    parser.add_argument("--minutes", type=float, default=10, help="load duration (default 10)")
    parser.add_argument("--users", type=int, default=16, help="locust users (default 16)")
    parser.add_argument("--spawn-rate", type=float, default=16, help="users started per second (default 16)")
    parser.add_argument("--warmup-minutes", type=float, default=1,
                        help="excluded from the RSS baseline (default 1)")
    parser.add_argument("--sample-s", type=float, default=5, help="seconds between process samples (default 5)")
    parser.add_argument("--backend", default="onnx", help="bundle format to serve (default onnx)")
    parser.add_argument("--layout", default="auto", choices=("auto", "inprocess", "batched"),
                        help="service layout (default auto: inprocess on CPU)")
    args = parser.parse_args(argv)
    try:
        summary = soak(args.model, args.out, args.minutes, args.users, args.spawn_rate, args.warmup_minutes,
                       args.sample_s, args.backend, args.layout)
    except TransferkitError as exc:
        print(f"soak: error: {exc}", file=sys.stderr)
        return exc.exit_code
    print()
    print(markdown(summary))
    print(f"wrote {args.out}/soak.md, soak.json, soak.png, per_minute.csv, processes.csv, requests.csv")
    return 0 if all(summary["verdicts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
