"""Versions in and out of a running worker, without a failed request.

A new version is verified, loaded and warmed beside the one serving, then swapped in with one assignment
(service/models.py's ``ModelSlot``): requests that started on the old version finish on it, the next ones get the
new one, and the old one's threads and memory are let go a request timeout later. A version that fails to verify,
load or warm is never swapped in: the old one keeps serving, and the failure is logged and shown in the repository
index and ``/metadata``.

What asks for a load, in each worker of the ``inprocess``/``microbatch`` layouts and in each model process of the
``batched`` layout (one :class:`Reloader` thread per process; there, each applies its own model's requests only):

- polling (``TRANSFERKIT_POLL_S`` > 0): a repository model whose newest version folder changed (a new version
  folder, or the served one replaced); a failed version is tried again only once its files change;
- the operator (service/control.py): ``POST /v2/repository/models/NAME/load`` or ``/unload`` writes the request into
  the server's control folder, every worker applies it and writes what happened there, and the request is answered
  once every worker has.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transferkit.core.repository import ModelSource, repository_model
from transferkit.service.errors import mask_paths
from transferkit.service.ledger import ModelLedger
from transferkit.service.models import ModelSet, ModelSlot, to_evict

logger = logging.getLogger("transferkit.service.models")  # at INFO in a server (service/service.py)
TICK_S = 0.25  # how often a worker looks at the control folder
# Under a memory budget, a model stays loaded this long before another's request may evict it: two models whose
# requests alternate would otherwise evict each other at every request, and the worker would spend its time loading
# (measured without it: 92 loads in 30 s; BENCHMARKS.md).
MIN_RESIDENCY_S = 2.0
# An evicted version closes this long after it was let go, once its calls are done: the requests that took it have
# started their calls by then (they are refused 503 `reloading` after).
EVICTION_GRACE_S = 0.2
# An evicted model whose load on demand failed is tried again this long after, at its next request; meanwhile its
# requests are answered 503 `model_unavailable` with the reason (and the other models are not evicted for it).
RELOAD_BACKOFF_S = 30.0


def stamp(path: Path) -> tuple[int, int]:
    """What changes when a bundle folder's files do: their count, total size and latest modification."""
    sizes, latest, count = 0, 0, 0
    for root, _, files in os.walk(path):
        for name in files:
            info = os.stat(os.path.join(root, name))
            sizes, latest, count = sizes + info.st_size, max(latest, info.st_mtime_ns), count + 1
    return count * 1_000_003 + sizes, latest


@dataclass
class Outcome:
    """What one worker did with one request: ``ok``, the version now serving, and why not when it failed."""

    ok: bool
    version: str | None
    reason: str = ""


OpenModel = Callable[[str, Any], Any]  # (name, bundle path or store tag) -> a LocalModel, loading in the background


class Reloader:
    """Loads, swaps and unloads the versions of ``models`` in this worker (see the module docstring)."""

    def __init__(self, models: ModelSet, open_model: OpenModel, *, worker: int, ready_timeout_s: float,
                 retire_s: float, poll_s: float = 0.0, control_dir: Path | None = None,
                 on_event: Callable[[str, str, float | None], None] | None = None, budget_bytes: int = 0,
                 estimate: Callable[[str, Any], int] | None = None,
                 on_swap: Callable[[str, Any, Any], None] | None = None,
                 compatible: Callable[[Any], str | None] | None = None, only: str | None = None,
                 ledger: ModelLedger | None = None, spare: int | None = None):
        self.models, self.open_model, self.worker = models, open_model, worker
        self.compatible = compatible or (lambda new: None)  # a loaded version -> why it may not serve, or None
        self.only = only  # the one model whose control requests this process applies (batched layout), or all
        self.spare = spare  # a spare model service's index: it applies the requests addressed to it (service/spares.py)
        self.ready_timeout_s, self.retire_s, self.poll_s, self.control_dir = ready_timeout_s, retire_s, poll_s, \
            control_dir
        self.on_event = on_event or (lambda model, event, seconds: None)
        self.on_swap = on_swap or (lambda name, old, new: None)  # (name, version out or None, version in or None)
        self.budget_bytes = budget_bytes  # this worker's share of the memory budget; 0: none
        # The batched layout's budget, shared with the other model processes of this device (service/ledger.py).
        self.ledger = ledger
        self.estimate = estimate or (lambda name, where: 0)  # a version's resident memory, estimated before loading
        self._applied: dict[str, int] = {}  # control requests done, by model: their serial
        self._failed: dict[str, tuple] = {}  # the version folder (and its stamp) whose load failed, by model
        self._loading: set[str] = set()  # models loading on demand (one thread each)
        self._loading_lock = threading.Lock()
        # Under a budget, loads run one at a time in a worker: two at once would each find room the other is about
        # to take, and both would stay loaded, over the budget.
        self._budget_lock = threading.Lock() if budget_bytes or ledger else contextlib.nullcontext()
        if budget_bytes or ledger:
            models.on_demand = self.on_demand

    def start(self) -> None:
        threading.Thread(target=self._loop, name="reload", daemon=True).start()

    def _loop(self) -> None:
        next_poll = time.monotonic() + self.poll_s
        while True:
            try:
                if self.ledger is not None and self.ledger.asked_to_evict():
                    self.evict_for_others()
                if self.control_dir is not None:
                    self.apply_requests()
                if self.poll_s > 0 and time.monotonic() >= next_poll:
                    self.poll()
                    next_poll = time.monotonic() + self.poll_s
            except Exception:  # noqa: BLE001 - the loop must outlive any one bad request or folder
                logger.exception("transferkit: reload loop")
            time.sleep(TICK_S)

    # --- loading ------------------------------------------------------------------------------------------------

    def load(self, name: str, where: Any, source: ModelSource | None = None, unless_loaded: bool = False) -> Outcome:
        """Load ``where`` (a bundle folder or store tag) as model ``name`` and swap it in once warm; on failure the
        version serving stays. ``unless_loaded``: nothing to do when a version serves by the time it is this load's
        turn (a load on demand that another load got ahead of)."""
        slot = self.models.slots.get(name)
        if slot is None:  # a model the repository holds but this service did not serve yet
            slot = self.models.slots.setdefault(name, ModelSlot(name, None, source))
        with self._budget_lock, slot.lock:
            if unless_loaded and (slot.current is not None or not slot.evicted):  # loaded, or unloaded on purpose
                return Outcome(slot.current is not None, _version(slot.current))
            # The larger of the first guess and what its last load here measured: a measurement alone can come out
            # low (memory an evicted model left behind is reused without the worker growing).
            cost = max(slot.measured_bytes, self.estimate(name, where))
            self._make_room(slot, cost)
            try:
                return self._open_and_swap(slot, where, cost)
            except BaseException:
                self._held(slot)  # the room claimed goes with the failed load: the record says what is held
                raise

    def _open_and_swap(self, slot: ModelSlot, where: Any, cost: int) -> Outcome:
        """Open ``where``, wait for it to verify and warm, and swap it in; a failure keeps the serving version."""
        name = slot.name
        started = time.perf_counter()
        resident = _resident_bytes()
        new = self.open_model(name, where)
        new.runtime.settled.wait(self.ready_timeout_s)
        reason = None if new.is_ready() else new.error or f"not ready within {self.ready_timeout_s:.0f} s"
        if reason is None:
            reason = self.compatible(new)
        if reason is not None:
            new.runtime.retire(0)
            self._held(slot)
            slot.reason = f"{_shown(where)}: {reason}"
            self.on_event(name, "load_failed", None)
            logger.error("transferkit: worker %d kept %s %s serving: loading %s failed: %s", self.worker, name,
                         _version(slot.current), _shown(where), reason)
            return Outcome(False, _version(slot.current), slot.reason)
        # The worker's growth while it verified, loaded and warmed the version (with the largest request, where a
        # budget is set); other requests' transient memory blurs it a little.
        slot.measured_bytes = max(slot.measured_bytes, _resident_bytes() - resident)
        old = slot.swap(new)
        seconds = time.perf_counter() - started
        slot.path, slot.reason, slot.evicted, slot.load_seconds = where, "", False, seconds
        slot.reload_failed, slot.reload_failed_until = "", 0.0
        slot.loaded_at, slot.retry_s = time.monotonic(), 0.0
        slot.cost_bytes = max(cost, slot.measured_bytes)
        self._held(slot)
        self.on_event(name, "loaded", seconds)
        self.on_swap(name, old, new)
        logger.info("transferkit: worker %d serves %s %s (was %s; %.1f s to verify, load and warm)", self.worker,
                    name, _version(new), _version(old), seconds)
        if old is not None:
            old.runtime.retire(self.retire_s)
        return Outcome(True, _version(new))

    # --- the memory budget -----------------------------------------------------------------------------------------

    def open_initial(self, order: list[str], at_start: set[str] | None = None) -> None:
        """Start loading the models in ``order`` (the default first) while they fit in the budget (or those of
        ``at_start``, a plan made for several processes: :func:`loaded_at_start`); the others wait, evicted, for
        their first request."""
        costs = {name: self.estimate(name, self.models.slots[name].path) for name in order}
        if at_start is None:
            at_start = loaded_at_start(order, costs, self.budget_bytes)
        for name in order:
            slot = self.models.slots[name]
            if name not in at_start:
                slot.evicted = True
                logger.info("transferkit: worker %d loads %s at its first request (the memory budget holds the "
                            "models before it)", self.worker, name)
                continue
            slot.current, slot.cost_bytes = self.open_model(name, slot.path), costs[name]
            self._held(slot)

    def on_demand(self, slot: ModelSlot) -> None:
        """A request needs ``slot``'s evicted model: load it in the background (once, however many ask)."""
        with self._loading_lock:
            if slot.name in self._loading:
                return
            self._loading.add(slot.name)

        def load() -> None:
            try:
                source = slot.source  # the last version loaded here
                newest = repository_model(source.repository / slot.name) if source and source.repository else None
                signature = (newest.path, stamp(newest.path)) if newest is not None else None
                if signature is not None and self._failed.get(slot.name) == signature:
                    # It failed here (a swap that had let the serving version go for another model's room, then
                    # failed): the last version that loaded, until the newest one's files change.
                    newest = None
                outcome = self.load(slot.name, (newest or source).where if source else slot.path, newest or source,
                                    unless_loaded=True)
                if newest is not None and not outcome.ok:
                    self._failed[slot.name] = signature
                if not outcome.ok:
                    self._reload_failed(slot, outcome.reason)
            except Exception as exc:  # noqa: BLE001 - tried again after the back-off; the reason must not vanish
                logger.exception("transferkit: worker %d could not load %s on demand", self.worker, slot.name)
                self._reload_failed(slot, mask_paths(f"{type(exc).__name__}: {exc}"))
            finally:
                with self._loading_lock:
                    self._loading.discard(slot.name)

        threading.Thread(target=load, name=f"load-{slot.name}", daemon=True).start()

    @staticmethod
    def _reload_failed(slot: ModelSlot, reason: str) -> None:
        """Not tried again at every request (each would evict another model first): after the back-off."""
        if slot.current is None and slot.evicted:
            slot.reload_failed = reason or "see the server's log"
            slot.reload_failed_until = time.monotonic() + RELOAD_BACKOFF_S

    def _held(self, slot: ModelSlot) -> None:
        """Tell the other model processes (service/ledger.py) what this one holds now."""
        if self.ledger is not None:
            if slot.current is None:
                self.ledger.released()
            else:
                self.ledger.holding(slot.cost_bytes)

    def evict_for_others(self) -> None:
        """Another model process of this device needs the room this one's model holds (service/ledger.py)."""
        for slot in list(self.models.slots.values()):  # the batched layout's model process holds one model
            with slot.lock:  # the record says unloaded before a load on demand can claim room again
                if self._evict(slot):
                    logger.info("transferkit: %s unloaded to make room for another model's process (memory budget "
                                "%.0f MB a device)", slot.name, self.ledger.budget_bytes / 2**20)
                self.ledger.released()

    def _evict(self, victim: ModelSlot) -> bool:
        """Unload ``victim``'s version for the memory budget (loaded again at its next request); False when it
        held none."""
        old = victim.swap(None)
        if old is None:
            return False
        victim.evicted = True
        self.on_swap(victim.name, old, None)
        # Its memory is what the budget counts as freed: let go as soon as its calls are done (a request that took
        # it and has not started its call gets 503 `reloading`), not a request timeout later.
        old.runtime.retire(EVICTION_GRACE_S, self.retire_s)
        self.on_event(victim.name, "evicted", None)
        return True

    def _make_room(self, slot: ModelSlot, cost: int) -> None:
        """Evict the least recently used other models until ``cost`` more fits in the budget (every loaded version
        counts, the one ``slot`` is replacing too: both are resident during a swap), first waiting until the ones
        to evict have been loaded :data:`MIN_RESIDENCY_S`. Under a shared budget, the other processes' models
        are evicted the same way, by asking them."""
        if self.ledger is not None:
            self._claim_shared(slot, cost)
            return
        if not self.budget_bytes:
            return
        loaded = [s for s in self.models.slots.values() if s.current is not None]
        used = sum(s.cost_bytes for s in loaded)
        victims = sorted((s for s in loaded if s is not slot), key=lambda s: s.last_used)
        needed = to_evict(victims, used, cost, self.budget_bytes)
        wait = max((victim.loaded_at + MIN_RESIDENCY_S - time.monotonic() for victim in needed), default=0.0)
        if wait > 0:
            slot.retry_s = wait + (slot.load_seconds or 1.0)
            time.sleep(wait)
        for victim in victims:
            if used + cost <= self.budget_bytes:
                break
            if not self._evict(victim):
                continue
            used -= victim.cost_bytes
            logger.info("transferkit: worker %d unloaded %s to make room for %s (memory budget %.0f MB)",
                        self.worker, victim.name, slot.name, self.budget_bytes / 2**20)
        if used + cost > self.budget_bytes:
            logger.warning("transferkit: worker %d: %s needs %.0f MB beside %.0f MB it cannot evict: over the memory "
                           "budget of %.0f MB", self.worker, slot.name, cost / 2**20, used / 2**20,
                           self.budget_bytes / 2**20)

    def _claim_shared(self, slot: ModelSlot, cost: int) -> None:
        """Room on this device for ``cost`` more (and the version ``slot`` replaces, while it serves), asking the
        other model processes to let go (service/ledger.py); past the ready timeout it loads over the budget."""
        deadline = time.monotonic() + self.ready_timeout_s
        while True:
            if self.ledger.asked_to_evict() and self._evict(slot):
                # Another process waits for this one's room while this one waits for its (both swapping in new
                # versions): let the version being replaced go rather than both waiting out the timeout.
                logger.info("transferkit: %s unloaded while its new version waits for room (memory budget)", slot.name)
                self.ledger.released()
            held = slot.cost_bytes if slot.current is not None else 0
            expected = self.ledger.claim(held + cost, deadline - time.monotonic())
            if expected <= 0:
                return
            slot.retry_s = expected + (slot.load_seconds or 1.0)
            time.sleep(min(expected, 0.25))

    def unload(self, name: str) -> Outcome:
        slot = self.models.slots.get(name)
        if slot is None:
            return Outcome(True, None)
        with slot.lock:
            old = slot.swap(None)
            slot.evicted, slot.reason = False, ""  # the operator's choice: not loaded again on demand
            self._held(slot)
            if old is not None:
                self.on_swap(name, old, None)
                old.runtime.retire(self.retire_s)
                self.on_event(name, "unloaded", None)
                logger.info("transferkit: worker %d unloaded %s %s", self.worker, name, _version(old))
        return Outcome(True, None)

    # --- polling ------------------------------------------------------------------------------------------------

    def poll(self) -> None:
        """Load the newest version of every repository model whose newest version folder changed."""
        for name, slot in list(self.models.slots.items()):
            source = slot.source
            if source is None or source.repository is None or slot.current is None:
                continue  # a lone bundle, a store tag, or unloaded by the operator: not polled
            newest = repository_model(source.repository / name) if (source.repository / name).is_dir() else None
            if newest is None or newest.path == slot.path:
                continue
            signature = (newest.path, stamp(newest.path))
            if self._failed.get(name) == signature:
                continue  # failed before, and its files have not changed since
            if self.load(name, newest.path, newest).ok:
                self._failed.pop(name, None)
                slot.source = newest
            else:
                self._failed[name] = signature

    # --- operator requests ----------------------------------------------------------------------------------------

    def apply_requests(self) -> None:
        """Carry out every control request not yet applied by this worker, and write what happened."""
        for path in sorted((self.control_dir / "requests").glob("*.json")):
            request = read_json(path)
            if request is None or request.get("serial", 0) <= self._applied.get(request.get("model"), 0):
                continue
            if (request.get("spare") != self.spare) if self.spare is not None else \
                    (self.only is not None and request.get("model") != self.only):
                continue  # another model's process answers it
            name = request["model"]
            if request["action"] == "unload":
                outcome = self.unload(name)
            else:
                source = ModelSource.from_dict(request["source"])
                outcome = self.load(name, source.where, source)
                if outcome.ok:
                    self.models.slots[name].source = source
            self._applied[name] = request["serial"]
            status = {"serial": request["serial"], "worker": self.worker, "ok": outcome.ok,
                      "version": outcome.version, "reason": outcome.reason}
            write_json(self.control_dir / "status" / f"{name}.{self.worker}.json", status)


def loaded_at_start(order: list[str], costs: dict[str, int], budget_bytes: int) -> set[str]:
    """The models of ``order`` loaded at the start: each one that fits beside those before it (the first always;
    every model without a budget)."""
    chosen, used = set(), 0
    for name in order:
        if budget_bytes and used and used + costs[name] > budget_bytes:
            continue
        chosen.add(name)
        used += costs[name]
    return chosen


def _resident_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def write_json(path: Path, value: dict) -> None:
    """Whole or not at all: readers in other processes never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.write_text(json.dumps(value))
    os.replace(partial, path)


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _version(entry: Any) -> str:
    manifest = getattr(entry, "manifest", None)
    return manifest.version if manifest is not None else "(none)"


def _shown(where: Any) -> str:
    """A version folder as its model/version tail (no server paths in answers), a tag as itself."""
    path = Path(str(where))
    return "/".join(path.parts[-2:]) if isinstance(where, Path) else str(where)
