"""``--backend auto``: the fastest backend this bundle was validated for, measured on this machine.

The rule (issue #30): on a GPU, onnxruntime's CUDA provider as before. On a CPU, every backend that can run here is
timed at batch 1 and batch 8 on this bundle, and the fastest wins: OpenVINO bf16 or int8 on a CPU with a matrix
engine, onnxruntime or OpenVINO f32 elsewhere. A candidate must have passed its validation gate at export and, when
it computes in less than fp32, cost at most half a point of validation accuracy: ``auto`` never trades more than
that for speed (``--backend onnx-int8`` still can, explicitly). The chosen backend's batch-8 ÷ batch-1 speed is the
*batch scaling* that decides whether the service batches requests (service/settings.py).

A measurement takes a few seconds (compiling each candidate, then a fraction of a second of timing each); it is kept
in the cache directory, keyed by the bundle's files, the CPU, the threads and the library versions, so a service's
workers and the next start read it instead.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from transferkit.core.errors import TransferkitError
from transferkit.core.manifest import RUNTIME_BACKENDS
from transferkit.core.system import cpu_model, default_cache_root, library_versions, matrix_engine_flags

logger = logging.getLogger(__name__)

AUTO = "auto"
CPU_CANDIDATES = ("onnx", "openvino", "openvino-bf16", "openvino-int8", "onnx-int8")
MAX_ACCURACY_COST = 0.005  # fraction of the validation images
SCALING_BATCH = 8
BATCH_SCALING_MIN = 1.3  # batch 8 vs batch 1 images/s: below this, batching adds queueing but little throughput
TIMING_SECONDS = 0.4  # per candidate and batch size, after warming up
CACHE_VERSION = 1


@dataclass
class Choice:
    """What ``auto`` chose and why (shown by /metadata, ``predict`` and ``bench``)."""

    backend: str
    reason: str
    batch_scaling: float | None = None  # the chosen backend's images/s at batch 8 ÷ batch 1; None: not measured
    images_per_second: dict[str, dict[str, float]] = field(default_factory=dict)  # backend -> {"1": .., "8": ..}
    skipped: dict[str, str] = field(default_factory=dict)  # backend -> why it was not a candidate
    cpu: str = ""
    threads: int = 0


def candidate_backends(bundle, capabilities: frozenset[str] | None = None) -> tuple[list[str], dict[str, str]]:
    """The CPU backends ``auto`` may pick for ``bundle`` and, for the others, why not."""
    from transferkit.core.openvino import unavailable_reason

    chosen, skipped = [], {}
    for name in CPU_CANDIDATES:
        spec, row = RUNTIME_BACKENDS[name], bundle.validation_of(name)
        why = ""
        if spec.format not in bundle.manifest.formats:
            why = f"the bundle has no {spec.format} file"
        elif spec.engine == "openvino" and (missing := unavailable_reason(spec.precision, capabilities)):
            why = missing
        elif row is None and spec.engine == "openvino":
            why = "not validated at export"
        elif row is not None and not row.passed:
            why = "failed its validation gate"
        elif spec.precision != "fp32" and (row is None or (row.accuracy_change or 0.0) < -MAX_ACCURACY_COST):
            cost = "unknown" if row is None else f"{-row.accuracy_change * 100:.1f} pt"
            why = f"accuracy cost {cost} > {MAX_ACCURACY_COST * 100:g} pt"
        if why:
            skipped[name] = why
        else:
            chosen.append(name)
    return chosen, skipped


def measure(predictor, size: int, batch: int, seconds: float = TIMING_SECONDS) -> float:
    """Images per second of ``predictor`` at ``batch`` (median of repeated calls over ``seconds``, after two)."""
    images = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    for _ in range(2):
        predictor(images)
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while len(times) < 3 or (time.perf_counter() < deadline and len(times) < 50):
        start = time.perf_counter()
        predictor(images)
        times.append(time.perf_counter() - start)
    return batch / float(np.median(times))


def _cache_path(bundle, candidates: list[str], threads: int):
    files = "".join(f"{k}:{v.sha256}" for k, v in sorted(bundle.manifest.formats.items()))
    versions = library_versions(("transferkit", "onnxruntime-gpu", "onnxruntime", "openvino"))
    key = json.dumps([CACHE_VERSION, files, cpu_model(), matrix_engine_flags(), threads, candidates, versions])
    return default_cache_root() / "backend-choice" / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"


def _read_cached(path) -> Choice | None:
    try:
        return Choice(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _write_cached(path, choice: Choice) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}")
        partial.write_text(json.dumps(asdict(choice), indent=2))
        os.replace(partial, path)  # readers see a whole file or none
    except OSError as exc:  # a read-only home: measure again next time
        logger.warning("could not keep the backend measurement in %s: %s", path.parent, exc)


def choose_backend(bundle, device: str = "auto", threads: int | None = None, backend: str = AUTO) -> Choice:
    """The backend ``auto`` resolves to for ``bundle`` on this machine (see the module docstring). A named
    ``backend`` is kept, and only its batch scaling is measured (on a CPU)."""
    from transferkit.core.predictors import cuda_libraries_missing
    from transferkit.core.system import available_cores

    threads = threads or available_cores()
    gpu = device != "cpu" and not cuda_libraries_missing()
    if backend != AUTO and (gpu or RUNTIME_BACKENDS[backend].engine == "tensorflow"):
        return Choice(backend, "named by the user", cpu=cpu_model(), threads=threads)
    if backend == AUTO and gpu and "onnx" in bundle.manifest.formats:
        return Choice("onnx", "GPU: onnxruntime's CUDA provider", cpu=cpu_model(), threads=threads)
    candidates, skipped = candidate_backends(bundle) if backend == AUTO else ([backend], {})
    if not candidates:
        fallback = next(iter(bundle.manifest.formats))
        return Choice(fallback, "no CPU backend qualified; the bundle's first format", skipped=skipped,
                      cpu=cpu_model(), threads=threads)
    path = _cache_path(bundle, candidates, threads)
    cached = _read_cached(path)
    if cached is not None:
        return cached
    speeds = {}
    for name in candidates:
        try:
            speeds[name] = _speeds(bundle, name, threads)
        except TransferkitError as exc:  # an engine that loads nowhere here is skipped, not fatal to the rest
            if backend != AUTO or len(candidates) == 1:
                raise
            skipped[name] = f"could not be measured: {exc}"
    if not speeds:
        raise TransferkitError(f"no backend could run bundle {bundle.manifest.name} here: {skipped}")
    best = max(speeds, key=lambda name: max(speeds[name].values()))
    rates = ", ".join(f"{n} {s['1']:g}/{s[str(SCALING_BATCH)]:g}" for n, s in speeds.items())
    reason = "named by the user" if backend != AUTO else "the fastest validated backend measured here"
    choice = Choice(best, f"{reason} (images/s at batch 1/{SCALING_BATCH}: {rates}, {threads} threads)",
                    round(speeds[best][str(SCALING_BATCH)] / speeds[best]["1"], 2), speeds, skipped, cpu_model(),
                    threads)
    _write_cached(path, choice)
    return choice


def _speeds(bundle, backend: str, threads: int) -> dict[str, float]:
    predictor = bundle.predictor(backend, "cpu", threads)
    return {str(b): round(measure(predictor, bundle.manifest.image_size, b), 1) for b in (1, SCALING_BATCH)}
