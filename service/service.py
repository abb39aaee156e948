"""The BentoML service: ``bentoml serve`` (bentofile.yaml names ``transferkit.service.service:ImageClassifier``).

One bento, two layouts, chosen when the module is imported (``TRANSFERKIT_LAYOUT``, default by device; see
service/settings.py and /metadata's ``layout``):

- ``inprocess`` (CPU): ``ImageClassifier`` alone, with one worker process per core. Each worker verifies, loads and
  warms its own onnxruntime session (cores ÷ workers threads) and decodes and classifies a request on its own compute
  thread: no second process, no pickled pixels, no batching queue.
- ``batched`` (GPU): ``ImageClassifier`` (entry workers scaled to the cores) parses, validates and decodes every
  image, then sends the request's uint8 pixels to its model's service (``ClassifierModel``, one process per GPU per
  model), whose BentoML adaptive batcher merges concurrent requests into one device call. A bad image fails its own
  request; it never reaches a batch, and a batch never mixes models (service/remote.py).

Both serve ``POST /predict``, ``POST /explain`` (class activation maps), ``GET /metadata`` and the Open Inference
Protocol under ``/v2`` (service/http.py, service/oip.py). On SIGTERM a worker drains (service/lifecycle.py):
``/readyz`` turns 503, new requests are answered 503 ``shutting_down``, requests already received complete, and the
model processes stop after the entry.
TensorFlow is imported only by the ``savedmodel`` backend, inside the process that runs the model.

In the entry workers, uvicorn gets a deadline and a size cap for request heads, and BentoML's whole app sits inside
the route guard: unknown paths, wrong methods and missing bearer tokens are refused before BentoML labels a metric
or a body is read (service/connections.py, service/guard.py). ``NAME:latest`` is resolved once, by the arbiter, so
every worker serves the same version (:func:`_pinned`).
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import time
from pathlib import Path

import bentoml
import numpy as np

from transferkit.core.backends import Choice, choose_backend
from transferkit.core.errors import ModelUnavailable, ServiceError, TransferkitError
from transferkit.core.repository import ModelSource, default_model, model_sources, repository_model
from transferkit.core.store import STORE_LABEL
from transferkit.service import connections, guard, lifecycle
from transferkit.service.balance import WorkerLoads, WorkerReadiness
from transferkit.service.control import PREFIX as CONTROL_PREFIX
from transferkit.service.control import RepositoryControl
from transferkit.service.decoding import DecodeGate
from transferkit.service.decoding import decode_all as _decode_all
from transferkit.service.errors import mask_paths
from transferkit.service.guard import RouteGuard, collect_routes
from transferkit.service.http import build_app, metrics
from transferkit.service.ledger import ModelLedger
from transferkit.service.local import LocalModel, Pipeline, read_served_manifest
from transferkit.service.middleware import Admission, BodySizeLimit
from transferkit.service.models import ModelSet, ModelSlot, estimated_bytes, same_interface
from transferkit.service.oip import OpenInferenceProtocol
from transferkit.service.reload import MIN_RESIDENCY_S, Reloader, loaded_at_start
from transferkit.service.remote import RemoteModel
from transferkit.service.runtime import ModelRuntime, resolve_bundle, warmup_sizes
from transferkit.service.settings import ServiceSettings, env_name
from transferkit.service.shared import remove_server_files
from transferkit.service.spares import assignments

logger = logging.getLogger("transferkit.service")
SETTINGS = ServiceSettings.from_env()
TOKEN = SETTINGS.bearer_token()  # read now: a missing token file stops the service instead of serving it open
ADMIN_TOKEN = SETTINGS.admin_credential()  # model control (service/control.py): off without it
WARMING_WAIT_S = min(5.0, SETTINGS.timeout_s / 2)  # a warming worker holds a request this long, then 503
DECODE_WAIT_S = SETTINGS.timeout_s / 2  # waiting for a decode slot past this: 503 busy, before the 504 timeout

ROLE = lifecycle.install_worker_lifecycle(SETTINGS.drain_timeout_s)
if ROLE is not None:  # BentoML leaves the root logger at WARNING: show versions loaded, swapped and evicted
    logging.getLogger("transferkit.service.models").setLevel(logging.INFO)
if ROLE == "arbiter":  # the records its workers share (service/shared.py): gone with the server
    # Files of an earlier server with this process id are not this one's: a restarted container gets a new process
    # namespace (often the same id) while a pod's /dev/shm stays, and its records would count as live workers.
    remove_server_files(str(os.getpid()))
    atexit.register(remove_server_files, str(os.getpid()))
decode_all = metrics.timed("decode", _decode_all)  # every layout's decoding, observed on /metrics


def _no_tracing_unless_exported() -> dict:
    """The services' ``tracing`` config: no tracing work when BentoML has no tracing exporter configured.

    Then BentoML records nothing (its sample rate defaults to 0), yet OpenTelemetry's ASGI middleware still creates
    and enters a span per request and per body chunk received or sent: ~1 ms of CPU per request measured here (a
    113 KB upload, a 32 px model: 5.9 against 6.8 ms per request with the SDK off; paired runs), about 5 % of a
    MobileNetV2 request. So the middleware passes every URL straight through (``excluded_urls``; a service's config
    is merged over BentoML's when its app is built), and the SDK is off for the spans of calls to the model service.
    What is lost: the trace and span ids in BentoML's log lines. Configure an exporter (``tracing.exporter_type``),
    or set ``OTEL_SDK_DISABLED=false``, and tracing works as BentoML ships it.
    """
    from bentoml._internal.configuration.containers import BentoMLContainer

    if BentoMLContainer.tracing.exporter_type.get() is not None or os.environ.get("OTEL_SDK_DISABLED") == "false":
        return {}
    os.environ.setdefault("OTEL_SDK_DISABLED", "true")
    return {"tracing": {"excluded_urls": [".*"]}}


TRACING = _no_tracing_unless_exported()


def _exact_tag(tag: str) -> str:
    """``NAME:latest`` (or ``NAME``) as the exact ``NAME:VERSION`` the store holds now; unchanged when the store
    has no such model (the runtime then reports it, the service stays unready with the reason)."""
    try:
        return str(bentoml.models.get(tag).tag)
    except Exception:  # bentoml's NotFound, a malformed tag
        return tag


def _pinned(setting: str) -> str:
    """The model setting with every tag resolved once for the whole server.

    Every worker imports this module and would resolve ``latest`` on its own: a worker respawned after a new export
    served the new version beside siblings serving the old one. The arbiter (``bentoml serve``, which imports this
    before it starts any worker) resolves each tag and exports the exact ones; circus copies the arbiter's
    environment into every worker it spawns, respawned ones included, so they all read the same versions."""
    references = [reference.strip() for reference in setting.split(",")]
    exact = [reference if not reference or Path(reference).expanduser().is_dir() or "/" in reference
             else _exact_tag(reference) for reference in references]
    pinned = ",".join(exact)
    if ROLE == "arbiter":
        os.environ[env_name("model")] = pinned
        for before, after in zip(references, exact):
            if before != after:
                logger.info("transferkit: serving %s (%s resolved once, for every worker)", after, before)
    return pinned


def _configured_models(settings: ServiceSettings) -> tuple[list[ModelSource], str | None]:
    """The models to serve (transferkit/core/repository.py); none and the reason, also logged, when the setting is
    wrong: the service then stays unready and says why."""
    setting = settings.model
    if not setting:
        # Not configured: inside a built bento (or a store with a single bundle) the choice is unambiguous.
        candidates = sorted({m.tag.name for m in bentoml.models.list()
                             if m.info.labels.get("stage") == STORE_LABEL})
        if len(candidates) != 1:
            error = (f"TRANSFERKIT_MODEL is not set and the model store holds {len(candidates)} transferkit bundles "
                     f"({', '.join(candidates) or 'none'}); set it to a model tag, a bundle directory or a model "
                     "repository")
            logger.error("transferkit: refusing to serve: %s", error)
            return [], error
        setting = f"{candidates[0]}:latest"
    try:
        return model_sources(_pinned(setting)), None
    except TransferkitError as exc:
        logger.error("transferkit: refusing to serve: %s", exc)
        return [], mask_paths(str(exc))


SOURCES, CONFIG_ERROR = _configured_models(SETTINGS)
# Model-store references, so that ``bentoml build`` packs every tagged bundle (directories are not packed).
STORE_MODELS = {source.name: bentoml.models.BentoModel(source.tag) for source in SOURCES if source.tag}


def _bundle_path(source: ModelSource) -> Path:
    if source.tag:
        return resolve_bundle(STORE_MODELS[source.name], source.tag)
    return source.path


def _bundle_opener(where: Path | str):
    """What finds a version's bundle folder when its runtime loads: ``where`` itself, or the store tag's folder."""
    if isinstance(where, Path):
        return lambda: where
    return lambda: resolve_bundle(bentoml.models.BentoModel(where), where)


def _choose_backend(source: ModelSource | None) -> Choice:
    """The backend to run a model with, and its measured batch scaling (transferkit/core/backends.py); the default
    model's decides the CPU layout.

    Every process that imports this module asks; the measurement is cached per bundle and machine, so only the
    first import (``bentoml serve``'s arbiter) measures. A bundle that cannot be read here is the runtime's to
    report (the model stays unready with the reason), not an import error.
    """
    if SETTINGS.backend != "auto" and SETTINGS.layout != "auto":
        return Choice(SETTINGS.backend, "named by the user (TRANSFERKIT_BACKEND)")
    try:
        from transferkit.core.predictors import load_bundle

        if source is None:
            raise TransferkitError("no model to serve")
        # Measured with the threads each session gets in the CPU layouts (cores ÷ workers), which do not depend
        # on the outcome.
        threads = SETTINGS.plan(batch_scaling=None).threads
        return choose_backend(load_bundle(_bundle_path(source)), SETTINGS.device, threads, SETTINGS.backend)
    except TransferkitError as exc:
        fallback = "onnx" if SETTINGS.backend == "auto" else SETTINGS.backend
        logger.error("transferkit: could not choose a backend (%s); trying %s", exc, fallback)
        return Choice(fallback, f"could not measure: {mask_paths(str(exc))}")


try:
    DEFAULT_MODEL = default_model(SOURCES, SETTINGS.default_model) if SOURCES else None
except TransferkitError as exc:  # a default that is not served: every model still answers by name
    logger.error("transferkit: %s", exc)
    DEFAULT_MODEL = None
CHOICES = {source.name: _choose_backend(source) for source in SOURCES}
CHOICE = CHOICES.get(DEFAULT_MODEL or (SOURCES[0].name if SOURCES else ""), None) or _choose_backend(None)
PLAN = SETTINGS.plan(backend=CHOICE.backend, batch_scaling=CHOICE.batch_scaling)


def _estimated_bytes(name: str, where) -> int:
    """What a version of model ``name`` from ``where`` will hold in memory (service/models.py), 0 when its manifest
    cannot be read (the load will say why)."""
    from transferkit.core.manifest import read_manifest

    try:
        path = where if isinstance(where, Path) else resolve_bundle(bentoml.models.BentoModel(where), where)
        return estimated_bytes(read_manifest(path), (CHOICES.get(name) or CHOICE).backend)
    except (TransferkitError, KeyError):
        return 0


def _say_swapped(name: str, old, new) -> None:
    """``transferkit_model_info``: the version swapped out no longer runs here, the one swapped in does."""
    for entry, value in ((old, 0), (new, 1)):
        if entry is not None and entry.manifest is not None:
            metrics.model_info(name, entry.manifest.version, entry.backend, PLAN.layout, value)


def _control_dir() -> Path | None:
    """Where model-control requests and each worker's outcomes are written (service/control.py): made by the
    arbiter, inherited by every worker; none without the admin token."""
    if ADMIN_TOKEN is None:
        return None
    if ROLE == "arbiter" and CONTROL_DIR_ENV not in os.environ:
        import shutil
        import tempfile

        made = tempfile.mkdtemp(prefix="transferkit-control-")
        os.environ[CONTROL_DIR_ENV] = made
        atexit.register(shutil.rmtree, made, ignore_errors=True)  # ours: made just now
    return Path(os.environ[CONTROL_DIR_ENV]) if CONTROL_DIR_ENV in os.environ else None


CONTROL_DIR_ENV = "_TRANSFERKIT_CONTROL_DIR"  # internal: not a setting
CONTROL_DIR = _control_dir()


def _with_store_models(cls: type) -> type:
    """Each tagged model as a class attribute: what BentoML reads to pack models into a bento."""
    for index, model in enumerate(STORE_MODELS.values()):
        setattr(cls, f"bundle_{index}", model)
    return cls


def _worker_index() -> int:
    from bentoml._internal.context import server_context

    return max(0, (server_context.worker_index or 1) - 1)


class _Entry:
    """What both layouts' entry services share: the served models (service/models.py), readiness, the decode
    gate."""

    models: ModelSet
    _workers_readiness: WorkerReadiness | None = None  # set by _share_readiness

    def _init_entry(self) -> None:
        self.gate = DecodeGate(SETTINGS.decode_concurrency, SETTINGS.decode_memory_bytes)
        metrics.prepare(guard.REASONS)  # BentoML's Prometheus is set up by the time a service is instantiated

    def _say_served(self) -> None:
        for name, entry in self.models:
            if entry.manifest is None:
                logger.error("transferkit: refusing to serve %s: %s", name, entry.load_error)
            else:
                metrics.model_info(name, entry.manifest.version, entry.backend, PLAN.layout)

    def _entry_ready(self) -> bool:
        return bool(self.models.names) and all(entry.manifest is not None for _, entry in self.models) \
            and not lifecycle.is_draining()

    def _ready_here(self) -> bool:
        """This worker's own readiness (each layout's entry says what it waits for)."""
        raise NotImplementedError

    def _share_readiness(self) -> None:
        """With several workers behind one socket a probe reaches one of them: each publishes its readiness, and
        the server answers ready when every worker is (service/balance.py). Called once the models are set."""
        self._workers_readiness = WorkerReadiness(PLAN.entry_workers, _worker_index(), self._ready_here) \
            if PLAN.entry_workers > 1 else None

    def __is_ready__(self) -> bool:
        shared = self._workers_readiness
        return self._ready_here() and (shared is None or shared.others_ready())

    def is_ready(self) -> bool:
        return self.__is_ready__()


def _version_finder(source: ModelSource):
    """For a repository model: a function from a version to its manifest, read from the model's version folders
    (newest first), or None when no folder holds it; None for a lone bundle or a tag."""
    if source.repository is None:
        return None
    folder = source.repository / source.name

    def find(version: str):
        try:
            found = repository_model(folder)
        except (OSError, TransferkitError):
            return None
        paths = [folder / name for name in reversed(found.versions)] if found and found.versions else \
            [found.path] if found else []
        for path in paths:
            manifest = read_served_manifest(lambda path=path: path)[0]
            if manifest is not None and manifest.version == version:
                return manifest
        return None

    return find


def _say_version(name: str, old: str, new: str) -> None:
    """``transferkit_model_info`` once the entry sees a model process serve a new version (batched layout)."""
    backend = (CHOICES.get(name) or CHOICE).backend
    metrics.model_info(name, old, backend, PLAN.layout, 0)
    metrics.model_info(name, new, backend, PLAN.layout, 1)


def _model_ledger(index: int) -> ModelLedger | None:
    """The batched layout's record of model ``index``'s process under a memory budget (service/ledger.py): the
    processes of one device share the budget divided by the devices; None without a budget."""
    if not SETTINGS.memory_budget_mb:
        return None
    devices = max(1, PLAN.gpus)
    return ModelLedger((len(SOURCES) + SETTINGS.spare_models) * PLAN.model_workers,
                       index * PLAN.model_workers + _worker_index(),
                       _worker_index() % devices, SETTINGS.memory_budget_mb * 2**20 // devices, MIN_RESIDENCY_S)


def _loaded_at_start(ledger: ModelLedger | None) -> set[str] | None:
    """The models every device loads at the start: the same plan in every model process (the default first,
    then each that fits beside those before it); none for a process the arbiter restarted (the others may hold
    the budget by now: it loads at its first request). None without a budget (its model loads)."""
    if ledger is None:
        return None
    if ledger.restarted:
        return set()
    order = sorted((source.name for source in SOURCES), key=lambda name: name != DEFAULT_MODEL)
    costs = {source.name: _estimated_bytes(source.name, source.where) for source in SOURCES}
    return loaded_at_start(order, costs, ledger.budget_bytes)


def _model_service_names(sources: list[ModelSource]) -> dict[str, str]:
    """Each model's service name in the batched layout: ``transferkit-model`` for one model (as ever), else
    ``transferkit-model-NAME`` (lower case; BentoML labels its batching metrics with it, as `runner_name`)."""
    if len(sources) <= 1:
        return {source.name: "transferkit-model" for source in sources}
    names: dict[str, str] = {}
    for source in sources:
        slug = re.sub(r"[^a-z0-9]+", "-", source.name.lower()).strip("-") or "model"
        candidate, suffix = f"transferkit-model-{slug}", 2
        while candidate in names.values():  # names that differ only in case or punctuation
            candidate, suffix = f"transferkit-model-{slug}-{suffix}", suffix + 1
        names[source.name] = candidate
    return names


class NotServing(bentoml.exceptions.ServiceUnavailable):
    """A model process's 503 for a model not serving now (loading, reloading, unloaded, failed): the entry asks
    its describe() why and answers the client; the process logs what happened to the model once, not a
    traceback per refused call."""


def _no_tracebacks_for_not_serving(record: logging.LogRecord) -> bool:
    return not (record.exc_info and isinstance(record.exc_info[1], NotServing))


def _still_there(source: ModelSource, name: str) -> ModelSource:
    """The version a spare was first given, else (its folder pruned since) the newest one of its repository folder:
    the entry reads the manifest there, and follows whatever version the spare swaps in."""
    if source.path is None or source.path.is_dir() or source.repository is None:
        return source
    try:
        return repository_model(source.repository / name) or source
    except (OSError, TransferkitError):  # the model's folder is gone too: its manifest is missing, said as such
        return source


def _model_service(source: ModelSource | None, service_name: str, index: int):
    """The batched layout's model service of one model: one process per GPU, each with its own copy of the model
    and BentoML's adaptive batcher (a batch never mixes models: each model has its own service). Without a source:
    a spare (service/spares.py), given its model by the first load addressed to it."""
    choice = (CHOICES.get(source.name) if source else None) or CHOICE
    spare = None if source else index - len(SOURCES)

    class ClassifierModel:
        def __init__(self) -> None:
            gpus = max(1, PLAN.gpus)

            def open_model(name: str, where, _choice: Choice | None = None) -> LocalModel:
                """A version of this model from ``where`` (a bundle folder or a store tag), loading."""
                return LocalModel.open(name, _bundle_opener(where), choice, None, device=SETTINGS.device,
                                       threads=PLAN.threads, batch_sizes=warmup_sizes(SETTINGS.max_batch_size),
                                       device_id=_worker_index() % gpus, observe=metrics.observe)

            self.models = ModelSet({source.name: ModelSlot(source.name, None, source)} if source else {},
                                   source.name if source else None)
            # The manifest the entry reads at its start (a spare: its model's first version): every version this
            # process serves must keep its input size and classes (service/models.py's same_interface).
            self.started_with = read_served_manifest(_bundle_opener(source.where))[0] if source else None
            # New versions (polled), the operator's load and unload of this model, and the memory budget shared with
            # the other models' processes of this device (service/ledger.py) are applied here.
            self.ledger = _model_ledger(index)
            self.reloader = Reloader(self.models, open_model, worker=_worker_index() + 1,
                                     ready_timeout_s=max(60.0, SETTINGS.timeout_s * 4), retire_s=SETTINGS.timeout_s,
                                     poll_s=SETTINGS.poll_s, control_dir=CONTROL_DIR, on_event=metrics.model_event,
                                     compatible=self._compatible, only=source.name if source else None,
                                     estimate=_estimated_bytes, ledger=self.ledger, spare=spare)
            self.reloader.open_initial([source.name] if source else [], _loaded_at_start(self.ledger))
            if SETTINGS.poll_s > 0 or CONTROL_DIR is not None or self.ledger is not None:
                self.reloader.start()

        @property
        def slot(self) -> ModelSlot | None:
            """This process's one model (None: a spare not given one yet)."""
            return next(iter(self.models.slots.values()), None)

        def _compatible(self, new: LocalModel) -> str | None:
            if self.started_with is None:  # a spare's first model: what its entry will read
                self.started_with = new.manifest
                return None
            return same_interface(self.started_with, new)

        def _runtime(self) -> ModelRuntime:
            """The serving version's runtime (a call takes it once: a swap never splits a batch); 503 when an
            operator unloaded the model, or the memory budget did (its load starts now)."""
            if self.slot is None:
                raise NotServing("model unloaded")
            try:
                current = self.models.select(self.slot.name)
            except ModelUnavailable as exc:  # BentoML masks a 5xx's message: the entry asks describe() for it
                raise NotServing(exc.reason) from None
            if self.ledger is not None:
                self.ledger.touch()
            return current.runtime

        def __is_ready__(self) -> bool:
            current = self.slot.current if self.slot else None
            return current is None or current.runtime.ready  # unloaded on purpose: the service stays ready

        @bentoml.api(batchable=True, batch_dim=0, max_batch_size=SETTINGS.max_batch_size,
                     max_latency_ms=SETTINGS.max_latency_ms)
        def classify(self, pixels: np.ndarray) -> np.ndarray:
            """uint8 RGB [N, H, W, 3] -> float32 probabilities [N, C]; never raises for one bad row."""
            runtime = self._runtime()
            # With several model processes one may still be warming while another already answers /readyz.
            runtime.settled.wait(WARMING_WAIT_S)
            if not runtime.ready:  # BentoML masks a 5xx's message: the entry asks describe() for the reason
                raise NotServing(f"model {runtime.state}")
            try:
                return runtime.predict(pixels)
            except ModelUnavailable as exc:  # the version was let go meanwhile (evicted): the entry asks why
                raise NotServing(exc.reason) from None

        @bentoml.api
        def explain(self, pixels: np.ndarray) -> np.ndarray:
            """uint8 RGB [N, H, W, 3] -> [N, C + h*w]: the probabilities, then each top class's activation map
            flattened (one array: what BentoML's inter-service call carries best; service/remote.py splits it)."""
            runtime = self._runtime()
            runtime.settled.wait(WARMING_WAIT_S)
            if not runtime.ready:
                raise NotServing(f"model {runtime.state}")
            try:
                probabilities, maps = runtime.explain(pixels)
            except ModelUnavailable as exc:
                raise NotServing(exc.reason) from None
            return np.concatenate([probabilities, maps.reshape(len(maps), -1)], axis=1)

        @bentoml.api
        def describe(self) -> dict:
            if self.slot is None:
                return {"state": "unloaded"}
            current, reason = self.slot.current, {"reason": self.slot.reason} if self.slot.reason else {}
            if current is None and self.slot.evicted:
                return {"state": "reloading", "retry_s": self.slot.retry_after(), **reason}
            if current is None:
                return {"state": "unloaded", **reason}
            version = {"version": current.manifest.version} if current.manifest is not None else {}
            described = {**current.runtime.describe(), **version, **reason}
            if "ready_for_s" in described and self.slot.loaded_at:  # ready, then swapped in: answering since then
                described["ready_for_s"] = min(described["ready_for_s"],
                                               round(time.monotonic() - self.slot.loaded_at, 3))
            return described

    if source and source.tag:  # packed into a bento with the service that runs it
        ClassifierModel.bundle = STORE_MODELS[source.name]
    return bentoml.service(
        name=service_name,
        resources=SETTINGS.model_resources(PLAN),
        workers=PLAN.model_workers,  # one per GPU: each holds its own copy of the model and its own batcher
        traffic={"timeout": SETTINGS.timeout_s},
        **TRACING,
        # The entry service logs every client request; a second line per internal hop is noise and CPU.
        logging={"access": {"enabled": False}},
    )(ClassifierModel)


if PLAN.layout == "batched":
    MODEL_SERVICE_NAMES = _model_service_names(SOURCES)
    # BentoML logs every exception an API raises, with its traceback (bentoml._internal.server.http_app).
    logging.getLogger("bentoml._internal.server.http_app").addFilter(_no_tracebacks_for_not_serving)
    if len(SOURCES) > 1 and PLAN.gpus and ROLE == "arbiter":
        # Every model service asks for every GPU, as one does: BentoML's allocator would hand the second one GPUs
        # that do not exist. Each model process picks its GPU by worker index instead (its runtime's device_id).
        os.environ.setdefault("BENTOML_DISABLE_GPU_ALLOCATION", "1")

    def _with_model_services(cls: type) -> type:
        """Each model's service as a dependency of the entry (``model_0``, ``model_1``, ...: BentoML finds them on
        the class and starts their processes)."""
        for index, source in enumerate(SOURCES):
            setattr(cls, f"model_{index}",
                    bentoml.depends(_model_service(source, MODEL_SERVICE_NAMES[source.name], index)))
        for spare in range(SETTINGS.spare_models):  # service/spares.py
            setattr(cls, f"spare_{spare}", bentoml.depends(_model_service(
                None, f"transferkit-model-spare-{spare}", len(SOURCES) + spare)))
        return cls

    @bentoml.service(
        name="transferkit",
        workers=PLAN.entry_workers,
        traffic={"timeout": SETTINGS.timeout_s},  # max_concurrency: service/middleware.py's Admission
        **TRACING,
    )
    @_with_store_models
    @_with_model_services
    class ImageClassifier(_Entry):
        """The batched layout's entry: it decodes, each model's service batches and classifies
        (service/remote.py)."""

        def __init__(self) -> None:
            self._init_entry()
            self.pipeline = Pipeline(decode_all, self.gate, SETTINGS.max_pixels, WARMING_WAIT_S, DECODE_WAIT_S)
            models = {source.name: self._remote(source, f"model_{index}") for index, source in enumerate(SOURCES)}
            self.models = ModelSet(models, DEFAULT_MODEL, CONFIG_ERROR)
            if SETTINGS.spare_models:
                self.models.discover = self._adopt_spares
            self._say_served()
            self._share_readiness()

        def _remote(self, source: ModelSource, dependency: str) -> ModelSlot:
            """The slot of a model whose processes are the model service ``dependency`` (an attribute)."""
            return ModelSlot(source.name, RemoteModel(
                source.name, lambda: _bundle_path(source), CHOICES.get(source.name) or CHOICE,
                lambda: getattr(self, dependency), self.pipeline, find_version=_version_finder(source),
                on_version=_say_version), source)

        def _adopt_spares(self) -> None:
            """Serve every model given a spare model service since the start (service/spares.py)."""
            for name, (spare, source) in assignments(CONTROL_DIR).items():
                if name not in self.models.slots:
                    self.models.slots[name] = self._remote(_still_there(source, name), f"spare_{spare}")

        def _ready_here(self) -> bool:
            return self._entry_ready()  # BentoML also asks each model service (a dependency) before answering 200

else:  # inprocess and microbatch: the model runs in the HTTP worker

    @bentoml.service(
        name="transferkit",
        resources=SETTINGS.model_resources(PLAN),
        workers=PLAN.entry_workers,  # each worker holds its own session: no inter-process hop
        traffic={"timeout": SETTINGS.timeout_s},  # max_concurrency: service/middleware.py's Admission
        **TRACING,
    )
    @_with_store_models
    class ImageClassifier(_Entry):
        def __init__(self) -> None:
            self._init_entry()
            # onnxruntime on a CPU meets a new batch shape at no cost; a GPU session (forced layout) or OpenVINO
            # (a shape-specialised kernel per batch size) is warmed with every size it will see.
            batching = PLAN.layout == "microbatch"
            sizes = warmup_sizes(SETTINGS.max_batch_size if batching else SETTINGS.max_images) \
                if PLAN.gpus or batching else [1]
            if SETTINGS.memory_budget_mb and not (PLAN.gpus or batching):
                sizes = [1, SETTINGS.max_images]  # the largest request, so that a load measures the model's peak
            pipeline = Pipeline(decode_all, self.gate, SETTINGS.max_pixels, WARMING_WAIT_S, DECODE_WAIT_S)

            def open_model(name: str, where, choice: Choice | None = None) -> LocalModel:
                """A version of model ``name`` from ``where`` (a bundle folder or a store tag), loading."""
                return LocalModel.open(
                    name, _bundle_opener(where), choice or CHOICES.get(name) or CHOICE, pipeline,
                    device=SETTINGS.device, threads=PLAN.threads, batch_sizes=sizes, compute_threads=PLAN.threads,
                    device_id=_worker_index() % max(1, PLAN.gpus),
                    max_batch=SETTINGS.max_batch_size if batching else None, on_batch=metrics.microbatch,
                    observe=metrics.observe, worker=_worker_index() + 1,
                    start_within_s=SETTINGS.latency_budget_ms / 1000)

            self.models = ModelSet({source.name: ModelSlot(source.name, None, source) for source in SOURCES},
                                   DEFAULT_MODEL, CONFIG_ERROR)
            self.reloader = Reloader(self.models, open_model, worker=_worker_index() + 1,
                                     ready_timeout_s=max(60.0, SETTINGS.timeout_s * 4), retire_s=SETTINGS.timeout_s,
                                     poll_s=SETTINGS.poll_s, control_dir=CONTROL_DIR, on_event=metrics.model_event,
                                     budget_bytes=SETTINGS.memory_budget_mb * 2**20 // PLAN.entry_workers,
                                     estimate=_estimated_bytes, on_swap=_say_swapped)
            self.reloader.open_initial(sorted(self.models.names, key=lambda name: name != DEFAULT_MODEL))
            self._say_served()
            if SETTINGS.poll_s > 0 or CONTROL_DIR is not None:
                self.reloader.start()
            self._share_readiness()

        def _ready_here(self) -> bool:
            return self._entry_ready() and all(entry.is_ready() for _, entry in self.models)

        def estimated_rate(self) -> float | None:
            """The slowest model's rate once every model is warm (admission's estimate must not be optimistic)."""
            rates = [entry.runtime.estimated_rate() for _, entry in self.models]
            return min(rates) if rates and None not in rates else None


def _estimated_rate() -> float | None:
    """The worker's own models' rate once warm (in-process layouts); None where the model runs in another process
    or before the service is built."""
    try:
        service = bentoml.get_current_service()
    except bentoml.exceptions.BentoMLException:
        return None
    return service.estimated_rate() if hasattr(service, "estimated_rate") else None


# In the batched layout a model's own processes apply its control requests; they serve the models of the start only.
# A control request waits for the workers within the request timeout, which BentoML enforces on every route (its
# bare 504 would come first): past it, the documented 504 `control_timeout`, the load going on (a retry waits for it).
CONTROL = RepositoryControl(lambda: bentoml.get_current_service(), ADMIN_TOKEN, CONTROL_DIR,
                            PLAN.model_workers if PLAN.layout == "batched" else PLAN.entry_workers,
                            max(0.5, SETTINGS.timeout_s - 1.0), fixed_models=PLAN.layout == "batched",
                            spares=SETTINGS.spare_models if PLAN.layout == "batched" else 0)
ImageClassifier = bentoml.asgi_app(build_app(lambda: bentoml.get_current_service(), SETTINGS, PLAN, CONTROL),
                                   path="/")(ImageClassifier)
ImageClassifier.add_asgi_middleware(
    Admission, max_in_flight=-(-SETTINGS.max_concurrency // PLAN.entry_workers),
    is_draining=lifecycle.is_draining, track_request=lifecycle.track_request, on_reject=metrics.rejected,
    on_hand_back=metrics.handed_back, latency_budget_s=SETTINGS.latency_budget_ms / 1000,
    estimated_rate=_estimated_rate, unmetered=f"{CONTROL_PREFIX}/",
    # Several workers computing behind one socket: the busier hands keep-alive clients back (service/balance.py).
    loads=(lambda: WorkerLoads(PLAN.entry_workers, _worker_index()))
    if PLAN.layout in ("inprocess", "microbatch") and PLAN.entry_workers > 1 else None,
)
ImageClassifier.add_asgi_middleware(
    BodySizeLimit, max_bytes=SETTINGS.max_body_bytes, on_reject=lambda: metrics.rejected("body_too_large"),
)


def _check_model_params(params: dict[str, str]) -> None:
    """The route guard's check of ``/v2/models/{name}[/versions/{version}]``: a served model's, or the route's own
    404 (503 when no model could be read); of ``/v2/repository/models/{model_name}/...``: a well-formed name (the
    route looks for it after checking the admin credential: service/control.py)."""
    from transferkit.service.control import NAME_PARAMETER, NAME_PATTERN

    service = bentoml.get_current_service()
    if NAME_PARAMETER in params:
        # Only its form: which folders exist is for the admin credential's holder (the route checks it first).
        if not NAME_PATTERN.fullmatch(params[NAME_PARAMETER]):
            raise ServiceError(404, "unknown_model", f"no model {ascii(params[NAME_PARAMETER])[:70]} in this "
                                                     "service's repositories")
    else:
        OpenInferenceProtocol.model_for(service, params["name"], params.get("version"))


def guarded(app):
    """BentoML's whole app inside the route guard (service/guard.py): unknown paths, wrong methods, oversized heads
    and missing tokens are refused before BentoML's middleware (its metrics label paths) or a body is read."""
    return RouteGuard(app, collect_routes(app.routes), check_params=_check_model_params,
                      max_head_bytes=SETTINGS.max_header_bytes, token=TOKEN, protect_metrics=SETTINGS.protect_metrics,
                      on_reject=metrics.rejected, own_credentials=f"{CONTROL_PREFIX}/")


def _is_entry_worker() -> bool:
    from bentoml._internal.context import server_context

    return server_context.service_type == "entry_service"


if ROLE == "worker":  # the entry's uvicorn gets the head deadline, the head cap and the guard (service/connections.py)
    connections.install(SETTINGS.header_timeout_s, SETTINGS.max_header_bytes, guarded, _is_entry_worker,
                        keep_alive_s=SETTINGS.keep_alive_s)
