"""``transferkit predict --engine ray``: the same read -> decode -> classify pipeline on Ray Data.

The paths become a dataset (``from_items``); a ``map_batches`` task reads and decodes each batch with the same
function as the local engine; a second ``map_batches`` runs an actor pool in which every actor loads and verifies
the bundle once and classifies batches with it. On CPUs each actor takes one CPU and runs onnxruntime on one thread
(as many actors as the cluster has CPUs, unless ``workers`` says otherwise), and Ray Data fuses the decode step into
the actors so pixels never cross the object store. With GPUs, each actor takes one GPU and decoding runs as separate
CPU tasks. The driver streams the results back in input order and writes them with the same writers as the local
engine.

Without ``address`` a local Ray is started (and stopped at the end); with one, the job joins that cluster. On a
cluster every node must see the inputs and the bundle at the same paths (shared storage) and have transferkit
installed.
"""

from __future__ import annotations

import logging
import math
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from transferkit.core.batch import Outcome, read_and_decode
from transferkit.core.errors import TransferkitError, UsageError
from transferkit.core.extras import install_hint
from transferkit.core.inputs import Item
from transferkit.core.manifest import RUNTIME_BACKENDS
from transferkit.core.system import available_cores

RAY_MISSING = f"the Ray engine needs Ray Data, the 'ray' extra: {install_hint('ray')}"


class RayEngineError(TransferkitError):
    """The Ray job failed (a worker could not load the bundle, the cluster went away...)."""

    exit_code = 1
    reason = "ray_failed"


def import_ray():
    """The ``ray`` module with Ray Data, or a one-line UsageError naming the extra to install."""
    try:
        import ray
        import ray.data  # noqa: F401  (ray without the [data] extra has no pyarrow/pandas)
    except ImportError:
        raise UsageError(RAY_MISSING) from None
    return ray


def start_ray(address: str | None = None, num_cpus: int | None = None,
              object_store_memory: int | None = None) -> bool:
    """Join the cluster at ``address``, or start a local Ray with ``num_cpus`` (default: this process' cores).
    Returns whether this call started the connection (the caller then shuts it down)."""
    ray = import_ray()
    if ray.is_initialized():
        return False
    # ERROR: Ray's start-up notices would bury the progress bar; errors from the actors still reach the driver.
    if address:
        _check_reachable(address)
    options = dict(include_dashboard=False, logging_level=logging.ERROR, log_to_driver=True)
    try:
        if address:
            ray.init(address=address, **options)
        else:
            ray.init(num_cpus=num_cpus or available_cores(), object_store_memory=object_store_memory, **options)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        where = f"join the Ray cluster at {address}" if address else "start a local Ray"
        raise UsageError(f"cannot {where}: {str(exc).splitlines()[0]}") from None
    return True


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail in seconds, not after minutes of Ray's own retries, when nothing listens at a ``host:port`` address."""
    if "://" in address or address == "auto":
        return  # ray:// client addresses and "auto" are Ray's to resolve
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"--address {address}: expected HOST:PORT of the Ray head (e.g. 10.0.0.5:6379) or ray://HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise UsageError(f"--address {address}: no Ray cluster answers there ({exc.strerror or exc})") from None


def _decode_batch(batch: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    """Ray stage 1: read and decode a batch of paths (the local engine's function), marking failures."""
    count = len(batch["path"])
    pixels = np.zeros((count, size, size, 3), np.uint8)
    errors, skipped = [""] * count, np.zeros(count, bool)
    for index, (path, named) in enumerate(zip(batch["path"], batch["named"])):
        decoded, error, skip = read_and_decode(Item(os.fsdecode(bytes(path)), bool(named)), size)
        if decoded is not None:
            pixels[index] = decoded
        errors[index], skipped[index] = error or "", skip
    ok = np.array([not e for e in errors]) & ~skipped
    return {"path": batch["path"], "pixels": pixels, "ok": ok, "error": np.array(errors, dtype=object),
            "skipped": skipped}


class BundleActor:
    """Ray stage 2: one verified bundle per actor, loaded once, classifying decoded batches."""

    def __init__(self, bundle_path: str, backend: str, device: str, threads: int):
        from transferkit.core.predictors import load_bundle

        bundle = load_bundle(bundle_path, [RUNTIME_BACKENDS[backend].format])
        self.predictor = bundle.predictor(backend, device, threads=threads, spin=False)
        self.classes = len(bundle.manifest.class_names)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = np.asarray(batch["ok"], bool)
        probabilities = np.full((len(ok), self.classes), np.nan, np.float32)
        if ok.any():
            probabilities[ok] = self.predictor(batch["pixels"][ok])
        return {"path": batch["path"], "probabilities": probabilities, "error": batch["error"],
                "skipped": batch["skipped"]}


def _cause(exc: BaseException) -> BaseException:
    while getattr(exc, "cause", None) is not None and exc.cause is not exc:
        exc = exc.cause
    return exc


def ray_outcomes(items: list[Item], bundle_path: Path, backend: str, size: int, device: str = "auto",
                 batch_size: int = 32, workers: int | None = None) -> Iterator[list[Outcome]]:
    """Classify ``items`` on the Ray cluster this process is connected to (see :func:`start_ray`), yielding
    outcomes in input order, one list per block that comes back."""
    if not items:
        return
    ray = import_ray()

    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # rows come back in input order, like the local engine
    context.enable_progress_bars = False  # transferkit predict draws its own
    context.print_on_execution_start = False
    context.execution_options.verbose_progress = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)

    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0)) if device != "cpu" else 0
    if device == "gpu" and not gpus:
        raise UsageError("--device gpu: the Ray cluster has no GPU")
    if gpus:
        actor_resources, threads = {"num_cpus": 1, "num_gpus": 1}, 1
        actors = workers or gpus
    else:
        actor_resources, threads = {"num_cpus": 1}, 1
        actors = workers or max(1, int(resources.get("CPU", 1)))
    blocks = max(1, min(math.ceil(len(items) / batch_size), 10_000))
    # Paths travel as the file system's bytes: Arrow strings must be UTF-8, and a file name need not be.
    dataset = ray.data.from_items([{"path": os.fsencode(item.path), "named": item.named} for item in items],
                                  override_num_blocks=blocks)
    dataset = dataset.map_batches(_decode_batch, fn_kwargs={"size": size}, batch_size=batch_size,
                                  batch_format="numpy", num_cpus=1)
    dataset = dataset.map_batches(
        BundleActor, fn_constructor_kwargs={"bundle_path": str(bundle_path), "backend": backend,
                                            "device": device, "threads": threads},
        batch_size=batch_size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=actors),
        **actor_resources)
    try:
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2):
            outcomes = []
            for path, probabilities, error, skipped in zip(batch["path"], batch["probabilities"], batch["error"],
                                                           batch["skipped"]):
                classified = not error and not skipped
                outcomes.append(Outcome(os.fsdecode(bytes(path)),
                                        np.asarray(probabilities, np.float32) if classified else None,
                                        str(error) or None, bool(skipped)))
            yield outcomes
    except ray.exceptions.RayError as exc:
        cause = _cause(exc)
        if isinstance(cause, TransferkitError):
            raise cause from None
        raise RayEngineError(f"the Ray job failed: {str(cause).strip().splitlines()[-1]}") from None
