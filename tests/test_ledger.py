"""The batched layout's memory budget (service/ledger.py): model processes of one device share a budget through one
file; a process that needs room asks the least recently used others to let their models go, and waits for it."""

from __future__ import annotations

import os
import time

import pytest
from serving import local_model

from transferkit.core.repository import ModelSource
from transferkit.service.ledger import LOADED, LOADING, UNLOADED, ModelLedger
from transferkit.service.models import ModelSet, ModelSlot
from transferkit.service.reload import Reloader, loaded_at_start

MB = 2**20


@pytest.fixture
def shm(tmp_path, monkeypatch):
    from transferkit.service import shared

    monkeypatch.setattr(shared, "directory", lambda: tmp_path)
    return f"ledger-test-{os.getpid()}-{time.monotonic_ns()}"


def _ledgers(key: str, count: int, budget: int, devices: list[int] | None = None) -> list[ModelLedger]:
    devices = devices or [0] * count
    return [ModelLedger(count, i, devices[i], budget, min_residency_s=0.0, key=key) for i in range(count)]


def test_a_claim_that_fits_is_granted_and_one_that_does_not_asks_the_least_recently_used(shm):
    a, b, c = _ledgers(shm, 3, budget=250 * MB)
    assert a.claim(100 * MB, 5) == 0 and a.holder(0).state == LOADING
    a.holding(100 * MB)
    assert b.claim(100 * MB, 5) == 0
    b.holding(100 * MB)
    a.touch()  # a was used after b: b is the least recently used
    assert c.claim(100 * MB, 5) > 0  # 300 MB would not fit: c waits...
    assert b.asked_to_evict() and not a.asked_to_evict()  # ...for b, asked to let its model go
    assert c.holder(2).state == UNLOADED
    b.released()  # what b's reload loop does (service/reload.py's evict_for_others)
    assert c.claim(100 * MB, 5) == 0 and c.holder(2).state == LOADING
    assert (b.holder(1).state, b.holder(1).cost_bytes, b.asked_to_evict()) == (UNLOADED, 0, False)


def test_other_devices_and_dead_processes_do_not_count(shm):
    a, b = _ledgers(shm, 2, budget=150 * MB, devices=[0, 1])
    a.holding(100 * MB)
    assert b.claim(100 * MB, 5) == 0  # another GPU: its own budget
    c, d = _ledgers(shm + "-dead", 2, budget=150 * MB)
    c.holding(100 * MB)
    c._set("pid", 2**31 - 1)  # its process is gone (killed; the arbiter restarts it)
    assert d.claim(100 * MB, 5) == 0


def test_a_model_loaded_just_now_is_not_evicted_before_its_residency(shm):
    a, b = (ModelLedger(2, i, 0, 150 * MB, min_residency_s=30.0, key=shm) for i in range(2))
    a.holding(100 * MB)
    waited = b.claim(100 * MB, 60)
    assert 25 < waited <= 30 and not a.asked_to_evict()  # asked again once a has been loaded 30 s


def test_a_model_larger_than_the_budget_alone_loads_at_once_and_says_so(shm, caplog):
    """As in-process: a model whose measured load outgrew the budget waited a minute for room that never came."""
    a, b = _ledgers(shm, 2, budget=150 * MB)
    with caplog.at_level("WARNING"):
        assert b.claim(200 * MB, 60) == 0
    assert b.holder(1).state == LOADING and "over the memory budget of 150 MB" in caplog.text


def test_a_load_waits_for_another_still_loading_then_asks_it(shm):
    """Not both at once (seen: two models loaded together over a budget for one, never evicted after)."""
    a, b = _ledgers(shm, 2, budget=150 * MB)
    a.claim(100 * MB, 5)  # loading: not evictable yet
    assert b.claim(100 * MB, 60) > 0 and not a.asked_to_evict()
    a.holding(100 * MB)  # loaded (min_residency_s 0 here)
    assert b.claim(100 * MB, 60) > 0 and a.asked_to_evict()


def test_past_the_wait_a_load_goes_ahead(shm):
    a, b = (ModelLedger(2, i, 0, 150 * MB, min_residency_s=30.0, key=shm) for i in range(2))
    a.holding(100 * MB)  # loaded just now: not evictable for 30 s
    assert b.claim(100 * MB, wait_s=60) > 0 and b.holder(1).state == UNLOADED
    assert b.claim(100 * MB, wait_s=0) == 0 and b.holder(1).state == LOADING  # its wait spent: over the budget


def test_a_request_to_let_go_made_before_a_load_is_void_once_loaded(shm):
    """Else a process would evict the version it had just swapped in, for a request made about the old one."""
    a, b = _ledgers(shm, 2, budget=150 * MB)
    a.holding(100 * MB)
    assert b.claim(100 * MB, 60) > 0 and a.asked_to_evict()
    a.holding(100 * MB)  # a new version swapped in meanwhile
    assert not a.asked_to_evict()


def test_the_lock_excludes_this_process_s_threads_too(shm):
    """flock alone lets two threads of one process (one descriptor) in together: a load on demand and the reload
    loop decided on the same records at once."""
    import threading

    (a,) = _ledgers(shm, 1, budget=0)
    inside, overlaps = [], []

    def hold() -> None:
        with a.locked():
            inside.append(1)
            overlaps.append(len(inside))
            time.sleep(0.05)
            inside.pop()

    threads = [threading.Thread(target=hold) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert overlaps == [1, 1, 1, 1]


class _Version:
    """A loaded version as the reloader's eviction sees it (it only lets the runtime go)."""

    def __init__(self):
        self.runtime = self
        self.retired_after: float | None = None

    def retire(self, grace_s: float, within_s: float | None = None) -> None:
        self.retired_after = grace_s


def test_two_swaps_that_wait_for_each_other_s_room_settle_at_once(shm):
    """Two processes whose reload loops swap in new versions at once, each asked by the other to let go while it
    waits for room (its loop, the thread that would let go, is the one waiting): each drops the version it is
    replacing instead of both waiting out the ready timeout (60 s here) and loading over the budget."""
    import threading

    events, finished, processes = [], [], []
    for index, name in enumerate("ab"):
        slot = ModelSlot(name, _Version())
        slot.cost_bytes = 100 * MB
        ledger = ModelLedger(2, index, 0, 250 * MB, min_residency_s=0.0, key=shm)
        ledger.holding(100 * MB)
        reloader = Reloader(ModelSet({name: slot}, name), lambda name, where: None, worker=1, ready_timeout_s=60,
                            retire_s=0.1, ledger=ledger, on_event=lambda model, event, s: events.append((model, event)))
        processes.append((reloader, slot))

    def reload_loop(reloader: Reloader, slot: ModelSlot) -> None:
        reloader._make_room(slot, 100 * MB)  # a new version found: room for it (the old one still serves)...
        slot.swap(_Version())  # ...then it is in, and the old one let go (what load() does)
        slot.evicted = False
        reloader.ledger.holding(100 * MB)
        finished.append(slot.name)
        while len(finished) < 2:  # the loop goes on: it lets go when asked
            if reloader.ledger.asked_to_evict():
                reloader.evict_for_others()
            time.sleep(0.02)

    started = time.monotonic()
    threads = [threading.Thread(target=reload_loop, args=process, daemon=True) for process in processes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(70)
    assert time.monotonic() - started < 10, events
    assert ("a", "evicted") in events or ("b", "evicted") in events
    held = [r.ledger.holder(r.ledger.index) for r, _ in processes]
    assert sum(h.cost_bytes for h in held if h.state != UNLOADED) <= 250 * MB, held


def test_the_plan_at_the_start_is_the_default_then_each_model_that_fits():
    costs = {"a": 100, "b": 100, "c": 40}
    assert loaded_at_start(["a", "b", "c"], costs, 150) == {"a", "c"}
    assert loaded_at_start(["a", "b", "c"], costs, 0) == {"a", "b", "c"}
    assert loaded_at_start(["b", "a"], {"a": 100, "b": 500}, 150) == {"b"}  # the first always loads


def test_two_model_processes_under_a_budget_for_one_take_turns(bundle, shm):
    """Two processes' reloaders (as in the batched layout, each with its own model), one shared budget: a request
    for the evicted model asks the other process to let its model go, and loads once it has."""
    processes = []
    for index, name in enumerate("ab"):
        models = ModelSet({name: ModelSlot(name, None, ModelSource(name, path=bundle))}, name)
        ledger = ModelLedger(2, index, 0, 150 * MB, min_residency_s=0.0, key=shm)
        reloader = Reloader(models, lambda name, where, choice=None: local_model(where, name, wait=False), worker=1,
                            ready_timeout_s=60, retire_s=0.1, estimate=lambda name, where: 100 * MB, ledger=ledger)
        reloader.open_initial([name], loaded_at_start(["a", "b"], {"a": 100 * MB, "b": 100 * MB}, 150 * MB))
        reloader.start()
        processes.append((models, ledger))
    (a_models, a_ledger), (b_models, b_ledger) = processes
    assert a_models.slots["a"].current is not None and a_ledger.holder(0).state == LOADED
    assert b_models.slots["b"].current is None and b_models.slots["b"].evicted

    from transferkit.core.errors import ModelUnavailable

    with pytest.raises(ModelUnavailable) as refused:
        b_models.select("b")  # starts b's load: b's process asks a's
    assert refused.value.reason == "reloading" and refused.value.retry_after >= 1
    deadline = time.monotonic() + 60
    while b_models.slots["b"].current is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert b_models.slots["b"].current is not None and a_models.slots["a"].current is None
    assert a_models.slots["a"].evicted and (a_ledger.holder(0).state, b_ledger.holder(1).state) == (UNLOADED, LOADED)
    assert b_models.select("b").runtime.settled.wait(60)
    with pytest.raises(ModelUnavailable):
        a_models.select("a")  # and back
    while a_models.slots["a"].current is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert a_models.slots["a"].current is not None and b_models.slots["b"].current is None


class _Opened:
    """A version as ``Reloader.load`` sees it once opened: settled at once, ready or failed."""

    def __init__(self, ready: bool):
        self.runtime, self.manifest, self.error = self, None, None if ready else "broken"
        self.settled = self
        self._ready = ready

    def wait(self, timeout: float) -> bool:
        return True

    def is_ready(self) -> bool:
        return self._ready

    def retire(self, grace_s: float, within_s: float | None = None) -> None:
        pass


def test_a_load_that_raises_gives_back_the_room_it_claimed(shm):
    (ledger,) = _ledgers(shm, 1, budget=150 * MB)
    slot = ModelSlot("a", None)
    slot.evicted = True

    def unreadable(name, where):
        raise OSError("the disk went away")

    reloader = Reloader(ModelSet({"a": slot}, "a"), unreadable, worker=1, ready_timeout_s=5, retire_s=0.1,
                        ledger=ledger, estimate=lambda name, where: 100 * MB)
    with pytest.raises(OSError):
        reloader.load("a", "somewhere")
    assert (ledger.holder(0).state, ledger.holder(0).cost_bytes) == (UNLOADED, 0)  # not LOADING 100 MB for good


def test_a_load_on_demand_leaves_a_model_unloaded_by_an_operator_alone(tmp_path):
    opened = []
    slot = ModelSlot("a", None)  # unloaded by an operator (not evicted) after the request that asked for it
    reloader = Reloader(ModelSet({"a": slot}, "a"), lambda name, where: opened.append(where) or _Opened(True),
                        worker=1, ready_timeout_s=5, retire_s=0.1)
    assert not reloader.load("a", tmp_path, unless_loaded=True).ok and opened == [] and slot.current is None


def test_on_demand_a_newest_version_that_failed_here_gives_way_to_the_last_good_one(tmp_path):
    """A swap that let the serving version go for another model's room, then failed: its requests' loads on demand
    take the version that served before, not the broken one again (and again)."""
    from transferkit.core.repository import ModelSource
    from transferkit.service.reload import stamp

    repository = tmp_path / "repository"
    for version in ("1", "2"):
        (repository / "a" / version).mkdir(parents=True)
        (repository / "a" / version / "manifest.json").write_text("{}")
    opened = []

    def open_model(name, where):
        opened.append(where.name)
        return _Opened(ready=where.name == "1")

    slot = ModelSlot("a", None, ModelSource("a", path=repository / "a" / "1", repository=repository))
    slot.evicted = True
    reloader = Reloader(ModelSet({"a": slot}, "a"), open_model, worker=1, ready_timeout_s=5, retire_s=0.1)
    reloader._failed["a"] = (repository / "a" / "2", stamp(repository / "a" / "2"))  # as the reload loop records it
    reloader.on_demand(slot)
    deadline = time.monotonic() + 10
    while slot.current is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert opened == ["1"] and slot.current is not None


def test_an_evicted_model_whose_reload_failed_says_why_and_is_not_tried_at_every_request(tmp_path):
    """Each load on demand evicts another model first: a broken one tried at every request evicted the others in
    turn, and answered `reloading` for ever. After a failure it answers 503 `model_unavailable` with the reason
    until the back-off is over, then tries again."""
    import threading

    from transferkit.core.errors import ModelUnavailable
    from transferkit.service import reload

    opened, may_fail = [], threading.Event()

    def open_model(name, where):
        may_fail.wait(10)  # not before the first request has its answer
        opened.append(where)
        return _Opened(ready=False)

    slot = ModelSlot("a", None)
    slot.evicted = True
    models = ModelSet({"a": slot}, "a")
    Reloader(models, open_model, worker=1, ready_timeout_s=5, retire_s=0.1, budget_bytes=100 * MB,
             estimate=lambda name, where: MB)  # sets models.on_demand
    with pytest.raises(ModelUnavailable) as first:
        models.select("a")  # starts the load
    assert first.value.reason == "reloading"
    may_fail.set()
    deadline = time.monotonic() + 10
    while not slot.reload_failed and time.monotonic() < deadline:
        time.sleep(0.02)
    for _ in range(3):
        with pytest.raises(ModelUnavailable) as refused:
            models.select("a")
        assert refused.value.reason == "model_unavailable" and "broken" in refused.value.message
        assert 1 <= refused.value.retry_after <= reload.RELOAD_BACKOFF_S
    time.sleep(0.2)
    assert len(opened) == 1  # not tried again within the back-off
    slot.reload_failed_until = time.monotonic()  # the back-off is over
    with pytest.raises(ModelUnavailable):
        models.select("a")
    deadline = time.monotonic() + 10
    while len(opened) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(opened) == 2
