"""The batched layout's memory budget: which model process holds its model, known to all of them.

In the batched layout each model has processes of its own (one per GPU), so no process sees the others' models. Each
model process has a record here (service/shared.py): its process id and device, whether it holds its model (loading
or loaded), what that costs, when a request last used it, when it was loaded, and whether another process asked it
to let its model go. The processes of one device share that device's budget. A process that must load its model
asks the least recently used others of its device to let theirs go (each does so in its reload loop:
service/reload.py), waits until there is room, then loads; the file's lock makes the decision one at a time.
"""

from __future__ import annotations

import logging
import os
import struct
import time
from dataclasses import dataclass

from transferkit.service.models import to_evict
from transferkit.service.shared import SharedRecords, alive

logger = logging.getLogger("transferkit.service.models")

UNLOADED, LOADING, LOADED = 0, 1, 2
# A record's fields, each written on its own: the owner writes all but ``evict``, which the others set and the owner
# clears, so no writer ever overwrites another's field.
FIELDS = {"pid": "i", "device": "i", "state": "i", "evict": "i", "cost_bytes": "q", "last_used": "d", "loaded_at": "d"}
RECORD = struct.Struct("=" + "".join(FIELDS.values()))
_OFFSETS = {name: struct.calcsize("=" + "".join(list(FIELDS.values())[:i])) for i, name in enumerate(FIELDS)}
WAIT_STEP_S = 0.05


@dataclass
class Holder:
    """One model process's record."""

    index: int
    pid: int
    device: int
    state: int
    evict: int
    cost_bytes: int
    last_used: float
    loaded_at: float


class ModelLedger(SharedRecords):
    """This model process's record (``index`` of ``count``: its model's position times the processes per model,
    plus its worker index) and its device's share of the budget, ``budget_bytes``."""

    def __init__(self, count: int, index: int, device: int, budget_bytes: int, min_residency_s: float,
                 key: str | None = None):
        super().__init__("ledger", RECORD, count, index, key)
        self.device, self.budget_bytes, self.min_residency_s = device, budget_bytes, min_residency_s
        previous = self.holder(index).pid
        # A process the arbiter restarted: the others may have filled the budget since the start.
        self.restarted = previous != 0 and previous != os.getpid()
        with self.locked():
            for name, value in {"pid": os.getpid(), "device": device, "state": UNLOADED, "evict": 0, "cost_bytes": 0,
                                "last_used": 0.0, "loaded_at": 0.0}.items():
                self._set(name, value)

    def _set(self, name: str, value: float, index: int | None = None) -> None:
        where = self.record.size * (self.index if index is None else index) + _OFFSETS[name]
        struct.pack_into("=" + FIELDS[name], self._map, where, value)

    def holder(self, index: int) -> Holder:
        return Holder(index, *self.read(index))

    def neighbours(self) -> list[Holder]:
        """The other live processes of this device that hold (or are loading) their model."""
        found = [self.holder(i) for i in range(self.count) if i != self.index]
        return [h for h in found if h.device == self.device and h.state != UNLOADED and alive(h.pid)]

    def touch(self) -> None:
        """A request used this process's model (the LRU order)."""
        self._set("last_used", time.monotonic())

    def asked_to_evict(self) -> bool:
        return self.holder(self.index).evict == 1

    def holding(self, cost: int) -> None:
        """This process holds its model (``cost`` bytes), from now. A request to let go made before is void: the
        one who asked asks again while it still needs the room (after this model's residency)."""
        with self.locked():
            self._set("evict", 0)
            self._set("cost_bytes", cost)
            self._set("state", LOADED)
            self._set("loaded_at", time.monotonic())

    def released(self) -> None:
        with self.locked():
            self._set("state", UNLOADED)
            self._set("cost_bytes", 0)
            self._set("evict", 0)

    def claim(self, cost: int, wait_s: float) -> float:
        """Room for this process's model to hold ``cost`` bytes in all (a version it replaces counts too), asking
        the least recently used others to let theirs go, waiting at most ``wait_s``. Returns 0 once there is room
        (the record says loading), else the seconds it expects the wait to last (call again)."""
        with self.locked():
            holders = self.neighbours()
            used = sum(h.cost_bytes for h in holders)
            if not self.budget_bytes or used + cost <= self.budget_bytes:
                self._claimed(cost)
                return 0.0
            if not holders or wait_s <= 0:  # larger than the budget alone, or waited long enough: as in-process
                logger.warning("transferkit: process %d: its model needs %.0f MB beside %.0f MB held by others: "
                               "over the memory budget of %.0f MB", os.getpid(), cost / 2**20, used / 2**20,
                               self.budget_bytes / 2**20)
                self._claimed(cost)
                return 0.0
            # Others still loading are evicted once loaded (and past their residency): until then, wait.
            now, wait = time.monotonic(), 0.0
            for victim in to_evict([h for h in holders if h.state == LOADED], used, cost, self.budget_bytes):
                settled_at = victim.loaded_at + self.min_residency_s
                if settled_at <= now:
                    self._set("evict", 1, victim.index)
                wait = max(wait, settled_at - now)
            return max(wait, WAIT_STEP_S)

    def _claimed(self, cost: int) -> None:
        self._set("cost_bytes", cost)
        if self.holder(self.index).state == UNLOADED:  # a swap keeps serving the version it replaces
            self._set("state", LOADING)
