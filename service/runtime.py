"""One loaded model in one process: verified, loaded and warmed in the background, then called from a thread pool.

Both layouts use it: every HTTP worker of the ``inprocess`` layout holds one, the model service of the ``batched``
layout holds one per process. Its state decides the honest answer while it is not serving: ``loading`` (a retryable
503 ``warming_up``) or ``failed`` (503 ``model_unavailable`` with the reason, never "overloaded").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from transferkit.core.backends import measure
from transferkit.core.errors import ModelUnavailable, TransferkitError
from transferkit.service.errors import mask_paths
from transferkit.service.microbatch import MicroBatcher
from transferkit.service.middleware import ADMITTED_AT

logger = logging.getLogger("transferkit.service")


def warmup_sizes(max_batch_size: int) -> list[int]:
    """Every batch size the batcher can form would be a new input shape for CUDA; on CPU powers of two suffice."""
    sizes = {1, max_batch_size}
    size = 2
    while size < max_batch_size:
        sizes.add(size)
        size *= 2
    return sorted(sizes)


class ModelRuntime:
    """Loads ``bundle_path()`` with ``backend`` in a background thread; ``await run(fn, ...)`` uses its threads."""

    def __init__(self, bundle_path, backend: str, device: str, threads: int, batch_sizes: list[int],
                 compute_threads: int = 1, device_id: int = 0, max_batch: int | None = None,
                 on_batch=None, observe: Callable[[str, float], None] | None = None, start_within_s: float = 0.0):
        self.backend, self.device, self.threads, self.device_id = backend, device, threads, device_id
        self.batch_sizes = batch_sizes
        self.state = "loading"
        self.error: str | None = None
        self.predictor: Any = None
        self.manifest: Any = None
        self.bundle: Any = None
        self._explainer: Any = None  # the fp32 onnx predictor, loaded at the first map where the served one has none
        self._explainer_lock = threading.Lock()
        self.load_seconds: float | None = None
        self.ready_at: float | None = None  # time.monotonic() once ready
        self.ready_perf: float | None = None  # the same moment, time.perf_counter()
        self.warm_seconds: float | None = None  # one image's inference once warm: admission's first estimate
        self.settled = threading.Event()  # set once loading has succeeded or failed
        # Calls using this version now (requests from their model call's admission to its answer): a version let go
        # closes once none is left, and refuses new ones (:meth:`retire`).
        self._calls, self._calls_lock, self.retired = 0, threading.Lock(), False
        # The threads that run decoding and inference: one per session thread keeps a worker from running more
        # work at once than its share of the cores (a queue on the event loop is cheaper than preempted threads).
        self.compute_threads = compute_threads
        self.executor = ThreadPoolExecutor(compute_threads, thread_name_prefix="compute")
        # /metrics' histograms: observe("queue" | "inference", seconds), from the compute and model threads.
        self.observe = observe or (lambda stage, seconds: None)
        # The latency budget (0: none): admission predicts a request's wait from the measured rate, and a request
        # whose real wait left no time for its inference is refused here, before any work (see :meth:`run`).
        self.start_within_s = start_within_s
        # microbatch layout: requests' decoded pixels merge into one model call (service/microbatch.py).
        self.batcher = MicroBatcher(self.predict, max_batch, self._batched,
                                    on_wait=lambda seconds: self.observe("queue", seconds)) if max_batch else None
        self.batch_images: list[int] = [0, 0]  # model calls, images: this worker's, shown by /metadata
        self.on_batch = on_batch  # the whole service's figure: /metrics' histogram
        threading.Thread(target=self._load, args=(bundle_path,), name="load-bundle", daemon=True).start()

    def _load(self, bundle_path) -> None:
        from transferkit.core.predictors import load_bundle

        start = time.perf_counter()
        try:
            bundle = load_bundle(bundle_path())  # refuses a tampered or truncated file
            predictor = bundle.predictor(self.backend, self.device, self.threads, spin=False,
                                         device_id=self.device_id)
            size = bundle.manifest.image_size
            for batch in self.batch_sizes:
                probabilities = predictor(np.zeros((batch, size, size, 3), np.uint8))
                if not np.isfinite(probabilities).all():
                    raise TransferkitError(f"the {self.backend} model returns non-finite probabilities")
            self.warm_seconds = 1 / measure(predictor, size, batch=1, seconds=0)  # three timed calls' median
        except Exception as exc:  # any failure must keep the service unready, with the reason in the log
            self.error = str(exc) if isinstance(exc, TransferkitError) else f"{type(exc).__name__}: {exc}"
            self.state = "failed"
            logger.error("transferkit: refusing to serve: %s", self.error)
            self.settled.set()
            return
        self.predictor, self.manifest, self.bundle = predictor, bundle.manifest, bundle
        self.load_seconds = round(time.perf_counter() - start, 2)
        self.ready_at, self.ready_perf = time.monotonic(), time.perf_counter()
        self.state = "ready"
        self.settled.set()
        logger.info("transferkit: serving %s %s with %s on %s (%.1fs to verify, load and warm)",
                    bundle.manifest.name, bundle.manifest.version, self.backend, predictor.provider,
                    self.load_seconds)

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    def estimated_rate(self) -> float | None:
        """Requests per second this worker could answer, from the warm inference time and its compute threads (an
        upper bound: decoding is not counted); None until warm."""
        return self.compute_threads / self.warm_seconds if self.warm_seconds else None

    def check(self) -> None:
        """Raise :class:`ModelUnavailable` unless the model can answer now."""
        if self.state == "failed":
            raise ModelUnavailable("model_unavailable", f"the model failed to load: {mask_paths(self.error or '')}",
                                   None)
        if self.state != "ready":
            raise ModelUnavailable("warming_up", "the model is still loading and warming up; retry shortly", 2)

    async def wait_ready(self, timeout: float) -> None:
        """Wait (off the event loop) until loading settles, then :meth:`check`."""
        if not self.settled.is_set():
            await asyncio.get_running_loop().run_in_executor(None, self.settled.wait, timeout)
        self.check()

    async def run(self, fn, *args, since: float | None = None):
        """``fn(*args)`` on this runtime's compute threads. Without a micro-batcher these threads are where work
        waits for the model, so the wait is observed as ``queue``: from ``since`` (when the request began waiting,
        e.g. for a decode slot) or from now, until a thread takes the job."""
        loop = asyncio.get_running_loop()
        with self.in_use():
            if self.batcher is not None:
                return await loop.run_in_executor(self.executor, fn, *args)
            queued = time.perf_counter() if since is None else since
            admitted, behind_others = ADMITTED_AT.get() or (queued, True)
            # A request that waited for this version to load and warm counts from then: it was not refused for load.
            admitted = max(admitted, self.ready_perf or admitted)

            def job():
                now = time.perf_counter()
                self.observe("queue", now - queued)
                if behind_others:
                    self._refuse_if_late(now - admitted)
                return fn(*args)

            return await loop.run_in_executor(self.executor, job)

    def _refuse_if_late(self, waited: float) -> None:
        """503 ``overloaded`` for a request that waited so long since admission (its upload, a decode slot, a compute
        thread) that one image's inference would take it past the latency budget: admission's prediction was wrong (a
        burst before the worker had measured its rate, or a slower machine), and the client is better served by a
        retry elsewhere than by a late answer. The refusal costs no model work."""
        inference = self.warm_seconds or 0.0
        if inference < self.start_within_s < waited + inference:  # a model slower than the budget still answers
            raise ModelUnavailable("overloaded", f"waited {waited:.1f} s for the model: it could not be answered "
                                                 f"within the latency budget ({self.start_within_s:g} s); retry "
                                                 "with backoff", 1)

    def _batched(self, images: int) -> None:
        self.batch_images[0] += 1
        self.batch_images[1] += images
        if self.on_batch:
            self.on_batch(images)

    async def predict_batched(self, pixels: np.ndarray) -> np.ndarray:
        """``predict`` through the micro-batcher, with whatever other requests are queued."""
        self.check()
        with self.in_use():
            return await asyncio.wrap_future(self.batcher.submit(pixels))

    def predict(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 [N, H, W, 3] -> float32 [N, C] (the graph or the predictor casts); each call's duration is
        observed as ``inference`` (a call that raises is not)."""
        self.check()
        with self.in_use():
            start = time.perf_counter()
            probabilities = self.predictor(pixels)
            self.observe("inference", time.perf_counter() - start)
            return probabilities

    def explain(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 [N, H, W, 3] -> (probabilities [N, C], the top class's activation maps [N, h, w]); one model call,
        never micro-batched (a batch's graph output is the same, but the batcher carries probabilities only). Where
        the served backend's map failed its bound at export (e.g. int8, which ``auto`` may choose for speed), the
        fp32 onnx file answers, loaded at the first such request (core/predictors.py's ``explaining_backend``)."""
        self.check()
        with self.in_use():
            start = time.perf_counter()
            answer = self._explaining_predictor().explain(pixels)
            self.observe("inference", time.perf_counter() - start)
            return answer

    def _explaining_predictor(self) -> Any:
        from transferkit.core.predictors import explaining_backend

        backend = explaining_backend(self.manifest, self.backend)
        if backend is None or backend == self.backend:
            return self.predictor  # its explain() raises the one-line reason when there is no map
        with self._explainer_lock:
            if self._explainer is None:
                self._explainer = self.bundle.predictor(backend, self.device, self.threads, spin=False,
                                                        device_id=self.device_id)
                logger.info("transferkit: class activation maps from %s (%s's map failed its bound at export)",
                            backend, self.backend)
        return self._explainer

    @contextlib.contextmanager
    def in_use(self):
        """Around a call of this version: counted, so that :meth:`retire` lets it go only once it is idle; a version
        let go already answers 503 ``reloading`` (its replacement, or its reload, is on its way)."""
        with self._calls_lock:
            if self.retired:
                raise ModelUnavailable("reloading", "the version this request was given was let go meanwhile; retry "
                                                    "shortly", 1)
            self._calls += 1
        try:
            yield
        finally:
            with self._calls_lock:
                self._calls -= 1

    def retire(self, grace_s: float, within_s: float | None = None) -> None:
        """Let go of this version once no call uses it, ``grace_s`` from now at the earliest (a request that took
        this version just before a swap may not have started its call yet) and ``within_s`` after that at the latest
        (default ``grace_s``): its threads end, and its session's memory goes with the last reference to it. A swap
        waits a request timeout; an eviction for the memory budget, a moment (its memory is what the budget freed)."""
        within_s = grace_s if within_s is None else within_s

        def close_when_idle() -> None:
            time.sleep(grace_s)
            deadline = time.monotonic() + within_s
            while True:
                with self._calls_lock:
                    if self._calls == 0 or time.monotonic() >= deadline:
                        self.retired = True
                        break
                time.sleep(0.05)
            self.executor.shutdown(wait=False)
            if self.batcher is not None:
                self.batcher.close()
            self.predictor = self._explainer = None

        threading.Thread(target=close_when_idle, name="retire", daemon=True).start()

    def describe(self) -> dict:
        """The runtime part of /metadata (no filesystem paths)."""
        if self.state != "ready":
            return {"state": self.state, **({"error": mask_paths(self.error)} if self.error else {})}
        return {"state": "ready", "backend": self.backend, "provider": self.predictor.provider,
                "threads_per_session": getattr(self.predictor, "threads", None),
                "input_dtype": str(getattr(self.predictor, "input_dtype", "float32")),
                "cuda": getattr(self.predictor, "cuda_note", "n/a") or "loaded",
                "warmup_batch_sizes": self.batch_sizes, "load_seconds": self.load_seconds,
                # How long this version has answered: the batched entry retries a call this process refused only
                # when the version became ready after the call began (service/remote.py).
                "ready_for_s": round(time.monotonic() - self.ready_at, 3),
                "warm_inference_seconds": round(self.warm_seconds, 5),
                **({"microbatch": {"max_batch": self.batcher.max_batch, "model_calls": self.batch_images[0],
                                   "images": self.batch_images[1],
                                   "mean_batch": round(self.batch_images[1] / max(1, self.batch_images[0]), 2)}}
                   if self.batcher else {})}


def resolve_bundle(model_ref, configured: str | None) -> Path:
    """The bundle directory: the store model's path, or the configured directory."""
    if model_ref is not None:
        try:
            return Path(model_ref.stored.path)
        except Exception as exc:  # bentoml's NotFound and friends
            raise TransferkitError(f"BentoML model {configured or model_ref} is not in the model store "
                                   f"({type(exc).__name__}); see `bentoml models list`") from None
    if configured:
        return Path(configured)
    raise TransferkitError("no model configured: set TRANSFERKIT_MODEL to a BentoML model tag or a bundle directory")
