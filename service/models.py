"""The models one service serves, by name, and the one answering requests that name none.

Routes choose a model per request: ``?model=NAME`` on ``/predict``, ``/explain`` and ``/metadata``, the path on
``/v2/models/NAME``. A name the service does not serve is 404 ``unknown_model`` listing the names; a request that
names none where several models are served and no default is configured is 400 ``model_required``, listing them too.
Only configured names are ever looked up or shown, so a client cannot make the service remember a new string.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from starlette.requests import Request

from transferkit.core.errors import ModelUnavailable, ServiceError

MODEL_PARAMETER = "model"
# A loaded version's resident memory before it was ever measured, from its model file: measured with onnxruntime on
# a CPU after a 16-image request at 224 px (BENCHMARKS.md, "One service, many models"): MobileNetV2 172 MB for an
# 8.5 MB file, EfficientNetB0 276 MB for 15 MB, ResNet50 414 MB for 90 MB. Activations (the session's arena, which
# keeps its peak) dominate small models; weights and pre-packed kernels large ones. A version that grew the worker by
# more when it loaded there counts that instead (service/reload.py); the guess errs high for small, low-resolution
# models (a 32-px MobileNetV2 holds about 20 MB).
FIRST_GUESS_FIXED_BYTES = 150 * 2**20
FIRST_GUESS_PER_FILE_BYTE = 3.0


def estimated_bytes(manifest: Any, backend: str) -> int:
    """What a version will hold in memory once loaded with ``backend`` and used (see above): the memory budget's
    unit."""
    from transferkit.core.manifest import RUNTIME_BACKENDS

    file_bytes = manifest.formats[RUNTIME_BACKENDS[backend].format].bytes
    return int(FIRST_GUESS_FIXED_BYTES + file_bytes * FIRST_GUESS_PER_FILE_BYTE)
E = TypeVar("E")


def same_interface(expected: Any, new: Any) -> str | None:
    """Why ``new`` (a loaded version) may not serve in the batched layout, or None: there the entry decodes to the
    input size and names the classes of the manifest ``expected`` it read at its start, so every version it serves
    must keep both (a version that changes them is a new model: serve it under a new name)."""
    manifest = new.manifest
    if expected is None or manifest is None:
        return None
    if manifest.image_size != expected.image_size:
        return (f"its input size is {manifest.image_size} px, not the {expected.image_size} px this service started "
                "with: the batched layout serves versions of the same input size and classes only")
    if list(manifest.class_names) != list(expected.class_names):
        return ("its classes differ from those this service started with: the batched layout serves versions of "
                "the same input size and classes only")
    return None


def _listed(names: list[str]) -> str:
    return ", ".join(names[:20]) + (f" and {len(names) - 20} more" if len(names) > 20 else "")


def _shown(name: str) -> str:
    return ascii(name) if len(name) <= 70 else ascii(name[:67]) + "..."


def reloading(name: str, retry_after: int) -> ModelUnavailable:
    """The answer for a model the memory budget evicted, loading again (in either layout)."""
    return ModelUnavailable("reloading", f"model {name!r} was unloaded to keep within the memory budget and is "
                                         f"loading again; retry in {retry_after} s", retry_after)


def not_loaded(name: str, failure: str = "") -> ModelUnavailable:
    """The answer for a model no version of which is loaded: unloaded by an operator, or (``failure``: why) whose
    last load failed, such as a model added to the repository with a broken bundle (in either layout)."""
    again = "POST /v2/repository/models/NAME/load"
    if failure:
        return ModelUnavailable("model_unavailable", f"model {name!r} is not loaded: its last load failed: {failure} "
                                                     f"({again} tries again)", None)
    return ModelUnavailable("model_unloaded", f"model {name!r} is unloaded: an operator unloaded it ({again} serves "
                                              "it again)", None)


def to_evict(loaded: list, used: int, cost: int, budget: int) -> list:
    """The least recently used of ``loaded`` (each with ``last_used`` and ``cost_bytes``: a worker's slots, or the
    model processes of service/ledger.py) that must go for ``cost`` more bytes to fit beside ``used`` in ``budget``,
    in eviction order; all of them when even that is not enough."""
    chosen, freed = [], used
    for victim in sorted(loaded, key=lambda v: v.last_used):
        if freed + cost <= budget:
            break
        chosen.append(victim)
        freed -= victim.cost_bytes
    return chosen


class ModelSlot(Generic[E]):
    """One name's place in the set: the version that answers now (``current``; None once unloaded) and the last
    thing that happened to it (service/reload.py swaps versions in and out). Requests take ``current`` once, at
    their start, so a swap never splits a request between two versions."""

    def __init__(self, name: str, current: E | None, source: Any = None):
        self.name, self.current, self.source = name, current, source
        self.path: Any = source.where if source is not None else None  # what ``current`` was loaded from
        self.reason = ""  # why the last load or swap failed ("" when it did not)
        self.lock = threading.Lock()  # one load of this model at a time in a worker
        self.evicted = False  # unloaded to keep within the memory budget (not by an operator): loads on demand
        self.last_used = 0.0  # monotonic time of the last request that chose it: the LRU order
        self.cost_bytes = 0  # its resident memory while loaded, estimated or measured (service/reload.py)
        self.measured_bytes = 0  # the worker's growth at its last load here (0: never measured)
        self.load_seconds: float | None = None  # how long its last load took: the Retry-After of a reload
        self.loaded_at = 0.0  # monotonic time its version was swapped in
        self.retry_s = 0.0  # while its load waits for room: how long until it should answer
        # Evicted, then its load on demand failed: why, and until when (monotonic) no request tries it again.
        self.reload_failed, self.reload_failed_until = "", 0.0

    def retry_after(self) -> int:
        """While this evicted model loads again: the seconds until it should answer."""
        return max(1, round(self.retry_s or self.load_seconds or 2))

    def serving(self) -> E:
        current = self.current
        if current is None and self.evicted and self.reload_failed:
            wait = max(1, round(self.reload_failed_until - time.monotonic()))
            raise ModelUnavailable("model_unavailable", f"model {self.name!r} was let go for the memory budget and "
                                                        f"could not be loaded again: {self.reload_failed}", wait)
        if current is None and self.evicted:
            raise reloading(self.name, self.retry_after())
        if current is None:
            raise not_loaded(self.name, self.reason)
        return current

    def swap(self, new: E | None) -> E | None:
        """Make ``new`` the version that answers (None: unload); the one it replaces is returned."""
        old, self.current = self.current, new
        return old


class ModelSet(Generic[E]):
    """Name -> :class:`ModelSlot` of that model (its ``current`` is service/http.py's ``Entry``), and the default
    name (or None). Plain entries are put in slots of their own."""

    def __init__(self, models: dict[str, Any], default: str | None, unavailable: str | None = None):
        self.slots: dict[str, ModelSlot[E]] = {
            name: model if isinstance(model, ModelSlot) else ModelSlot(name, model) for name, model in models.items()}
        self.default, self.unavailable = default, unavailable
        # Called with an evicted model's slot when a request needs it (service/reload.py loads it again).
        self.on_demand: Callable[[ModelSlot], None] | None = None
        # Adds the models loaded since the start into spare model services (batched layout, service/spares.py):
        # called before a name is found unknown, and before the models are listed.
        self.discover: Callable[[], None] | None = None

    def refresh(self) -> None:
        """Take in the models loaded since the start into spare model services (a no-op elsewhere)."""
        if self.discover is not None:
            self.discover()

    @property
    def names(self) -> list[str]:
        return list(self.slots)

    def __iter__(self) -> Iterator[tuple[str, E]]:
        """The models that are loaded (unloaded ones are skipped), by name."""
        return iter([(name, slot.current) for name, slot in list(self.slots.items()) if slot.current is not None])

    def select(self, name: str | None) -> E:
        """The model ``name`` names, or the default one for None; a :class:`ServiceError` (404 or 400) otherwise,
        503 ``model_unavailable`` with the reason when the service has no model at all (a wrong setting), 503
        ``model_unloaded`` for one an operator unloaded, 503 ``reloading`` with Retry-After for one the memory
        budget evicted (its load starts now)."""
        if not self.slots:
            raise ModelUnavailable("model_unavailable", f"no model is served: {self.unavailable or 'see the log'}")
        if name is None:
            if self.default is None:
                raise ServiceError(400, "model_required", f"this service serves {len(self.slots)} models and none "
                                                          f"is the default: name one with ?{MODEL_PARAMETER}=NAME "
                                                          f"(or /v2/models/NAME): {_listed(self.names)}")
            name = self.default
        found = self.slots.get(name)
        if found is None and self.discover is not None:
            self.refresh()
            found = self.slots.get(name)
        if found is None:
            raise ServiceError(404, "unknown_model", f"no model {_shown(name)} is served here; the models are: "
                                                     f"{_listed(self.names)}")
        found.last_used = time.monotonic()
        if found.current is None and found.evicted and self.on_demand is not None and \
                time.monotonic() >= found.reload_failed_until:  # a failed reload is not tried at every request
            self.on_demand(found)
        return found.serving()


def requested_model(request: Request) -> str | None:
    """The ``model`` query parameter (at most once), or None."""
    values = request.query_params.getlist(MODEL_PARAMETER)
    if len(values) > 1:
        raise ServiceError(400, "bad_model", f"'{MODEL_PARAMETER}' given {len(values)} times; give it once")
    return values[0] if values else None


def select(service: Any, request: Request) -> Any:
    """The model a ``/predict``, ``/explain`` or ``/metadata`` request is for (see the module docstring)."""
    return service.models.select(requested_model(request))
