"""Service settings, read once from ``TRANSFERKIT_*`` environment variables.

BentoML reads the batching and traffic settings when the service class is decorated, i.e. at import time, so they
cannot come from a request or a config object built later. Bad values fail at start-up with the variable's name.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

from transferkit.core.errors import UsageError
from transferkit.core.images import DEFAULT_MAX_PIXELS
from transferkit.core.manifest import BACKENDS
from transferkit.core.system import available_cores


def gpu_present() -> bool:
    """An NVIDIA GPU is visible (checked without importing a framework: this runs at import time)."""
    return Path("/proc/driver/nvidia/gpus").is_dir() and any(Path("/proc/driver/nvidia/gpus").iterdir())


def _int(name: str, default: int, minimum: int = 1) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise UsageError(f"{name}={raw!r}: expected an integer") from None
    if value < minimum:
        raise UsageError(f"{name}={value}: must be at least {minimum}")
    return value


@dataclass(frozen=True)
class ServiceSettings:
    model: str | None  # BentoML model tag or bundle directory; None: the only transferkit model in the store
    backend: str
    device: str  # auto | cpu | gpu
    model_workers: int  # model processes, each with its own copy of the model and its own batcher
    threads: int  # onnxruntime intra-op threads per model process
    top_k: int
    max_batch_size: int  # images per model call, across requests
    max_latency_ms: int  # BentoML's adaptive batcher answers 503 when a request cannot meet it
    max_images: int  # per request
    max_body_bytes: int  # per request, enforced before the body is read
    max_pixels: int  # per image, from its header
    timeout_s: int  # per request -> 504
    max_concurrency: int  # requests in flight -> 429 beyond it

    @classmethod
    def from_env(cls) -> ServiceSettings:
        backend = os.environ.get("TRANSFERKIT_BACKEND", "onnx").strip().lower()
        if backend not in BACKENDS:
            raise UsageError(f"TRANSFERKIT_BACKEND={backend!r}: choose one of {', '.join(BACKENDS)}")
        device = os.environ.get("TRANSFERKIT_DEVICE", "auto").strip().lower()
        if device not in ("auto", "cpu", "gpu"):
            raise UsageError(f"TRANSFERKIT_DEVICE={device!r}: choose auto, cpu or gpu")
        # On CPU, several single-threaded model processes beat one process with many intra-op threads once
        # anything else wants the cores (decoding, HTTP): a preempted intra-op thread stalls every operator of
        # its batch, a preempted process only itself (measured: BENCHMARKS.md). Capped at 4 copies of the model.
        # On a GPU, and for TensorFlow's SavedModel with its own thread pools, one process owns the device.
        on_device = backend == "savedmodel" or (device != "cpu" and gpu_present())
        cores = available_cores()
        model_workers = _int("TRANSFERKIT_MODEL_WORKERS", 1 if on_device else min(cores, 4))
        threads = _int("TRANSFERKIT_THREADS", max(1, cores // model_workers))
        max_batch_size = _int("TRANSFERKIT_MAX_BATCH_SIZE", 32, minimum=2)  # BentoML requires > 1
        return cls(
            model=os.environ.get("TRANSFERKIT_MODEL") or None,
            backend=backend,
            device=device,
            model_workers=model_workers,
            threads=threads,
            top_k=_int("TRANSFERKIT_TOP_K", 5),
            max_batch_size=max_batch_size,
            max_latency_ms=_int("TRANSFERKIT_MAX_LATENCY_MS", 10_000),
            max_images=_int("TRANSFERKIT_MAX_IMAGES", 16),
            max_body_bytes=_int("TRANSFERKIT_MAX_BODY_MB", 32) * 1024 * 1024,
            max_pixels=_int("TRANSFERKIT_MAX_PIXELS", DEFAULT_MAX_PIXELS),
            timeout_s=_int("TRANSFERKIT_TIMEOUT_S", 30),
            max_concurrency=_int("TRANSFERKIT_MAX_CONCURRENCY", 64),
        )

    def resources(self) -> dict:
        """BentoML resources: ask for a GPU only when one is present (on CPU BentoML would warn and carry on)."""
        return {"gpu": 1} if self.device != "cpu" and gpu_present() else {}

    def public(self) -> dict:
        return asdict(self)
