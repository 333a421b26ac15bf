"""model_manager.py with fake loaders, a fake memory probe and a fake clock: no real models, no torch."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from errors import AppError, BusyError, ModelLoadError, ModelMissingError, ModelTooLargeError, OutOfMemoryError
from model_manager import (
    GIB,
    EvictionPlan,
    LoadedModel,
    Loader,
    LoadSpec,
    ModelManager,
    ResidentInfo,
    plan_eviction,
)

JOIN_S = 5.0  # every join has a timeout, so a deadlock fails the test instead of hanging it


# ----------------------------------------------------------------------------
# Fakes
# ----------------------------------------------------------------------------


class FakeProbe:
    """Memory "in use": the fake loaders raise it on load and lower it on close."""

    device = "cpu"

    def __init__(self) -> None:
        self.used = 0
        self.peak = 0
        self.release_calls = 0
        self._lock = threading.Lock()

    def add(self, delta: int) -> None:
        with self._lock:
            self.used += delta
            self.peak = max(self.peak, self.used)

    def used_bytes(self) -> int:
        return self.used

    def release_cache(self) -> None:
        self.release_calls += 1


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeModel:
    def __init__(self, spec: LoadSpec) -> None:
        self.spec = spec
        self.closed = False


class FakeLoader:
    """A loader for kind "chat": the size of a model is looked up by its file stem."""

    def __init__(self, probe: FakeProbe, sizes: dict[str, int], load_delay_s: float = 0.0) -> None:
        self.probe = probe
        self.sizes = sizes
        self.load_delay_s = load_delay_s
        self.load_errors: dict[str, BaseException] = {}
        self.estimate_errors: dict[str, BaseException] = {}
        self.loads: Counter[LoadSpec] = Counter()
        self.load_attempts: Counter[str] = Counter()
        self.closes: Counter[LoadSpec] = Counter()
        self.live: dict[LoadSpec, FakeModel] = {}
        self.max_live = 0
        self.max_live_bytes = 0
        self.lock = threading.Lock()

    def size(self, spec: LoadSpec) -> int:
        return self.sizes[Path(spec.path).stem]

    def estimate_bytes(self, spec: LoadSpec) -> int:
        error = self.estimate_errors.get(Path(spec.path).stem)
        if error is not None:
            raise error
        return self.size(spec)

    def load(self, spec: LoadSpec) -> LoadedModel:
        name = Path(spec.path).stem
        self.load_attempts[name] += 1
        error = self.load_errors.get(name)
        if error is not None:
            raise error
        if self.load_delay_s:
            time.sleep(self.load_delay_s)
        size = self.size(spec)
        model = FakeModel(spec)
        with self.lock:
            assert spec not in self.live, f"{spec} loaded twice"
            self.live[spec] = model
            self.loads[spec] += 1
            self.max_live = max(self.max_live, len(self.live))
            self.max_live_bytes = max(self.max_live_bytes, self.live_bytes())
        self.probe.add(size)

        def close() -> None:
            with self.lock:
                model.closed = True
                self.closes[spec] += 1
                del self.live[spec]
            self.probe.add(-size)

        return LoadedModel(model=model, reported_bytes=size, close=close)

    def live_bytes(self) -> int:
        return sum(self.size(spec) for spec in self.live)

    def as_loader(self) -> Loader:
        return Loader(load=self.load, estimate_bytes=self.estimate_bytes)


@dataclass
class Harness:
    manager: ModelManager
    loader: FakeLoader
    probe: FakeProbe
    clock: FakeClock

    def resident(self) -> dict[str, Any]:
        return {m.label: m for m in self.manager.status().resident}


def spec(name: str, **options: Any) -> LoadSpec:
    return LoadSpec.of("chat", f"/models/{name}.gguf", **options)


def label(name: str) -> str:
    return f"chat:{name}.gguf"


DEFAULT_SIZES = {"a": 4 * GIB, "b": 4 * GIB, "c": 4 * GIB, "d": 4 * GIB}


def make(
    policy: str = "one_at_a_time",
    budget_gib: float = 24,
    sizes: dict[str, int] | None = None,
    keep_alive_s: float = 300.0,
    wait_timeout_s: float = JOIN_S,
    load_delay_s: float = 0.0,
) -> Harness:
    probe = FakeProbe()
    clock = FakeClock()
    manager = ModelManager(
        policy=policy,  # type: ignore[arg-type]
        budget_bytes=int(budget_gib * GIB),
        keep_alive_s=keep_alive_s,
        wait_timeout_s=wait_timeout_s,
        probe=probe,
        clock=clock,
    )
    loader = FakeLoader(probe, dict(sizes or DEFAULT_SIZES), load_delay_s)
    manager.register_loader("chat", loader.as_loader())
    return Harness(manager, loader, probe, clock)


@dataclass
class Worker:
    """A thread that records its result or its exception."""

    target: Callable[[], Any]
    result: Any = None
    error: BaseException | None = None
    finished_at: float | None = None
    thread: threading.Thread = field(init=False)

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            self.result = self.target()
        except BaseException as error:
            self.error = error
        finally:
            self.finished_at = time.monotonic()

    def start(self) -> Worker:
        self.thread.start()
        return self

    def join(self, timeout: float = JOIN_S) -> None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the thread did not finish: deadlock or lost wake-up"


def hold(manager: ModelManager, load_spec: LoadSpec, entered: threading.Event, release: threading.Event) -> Any:
    """Acquire ``load_spec``, signal ``entered``, keep it until ``release`` is set."""
    with manager.acquire(load_spec) as model:
        entered.set()
        assert release.wait(JOIN_S), "never told to release"
        return model


def assert_consistent(h: Harness) -> None:
    """No references left, every resident model ready and live in the fake loader."""
    status = h.manager.status()
    for model in status.resident:
        assert model.refs == 0, model
        assert model.state == "ready", model
    assert {m.label for m in status.resident} == {label(Path(s.path).stem) for s in h.loader.live}
    assert len(status.resident) == len(h.loader.live)


# ----------------------------------------------------------------------------
# plan_eviction, a pure function
# ----------------------------------------------------------------------------


def r(key: str, size_gib: float, last_used: float, in_use: bool = False) -> ResidentInfo:
    return ResidentInfo(key, int(size_gib * GIB), last_used, in_use)


PLAN_CASES = [
    pytest.param("one_at_a_time", 4, [], 24, EvictionPlan(), id="one_at_a_time-empty"),
    pytest.param("vram_budget", 4, [], 24, EvictionPlan(), id="vram_budget-empty"),
    pytest.param(
        "one_at_a_time",
        1,
        [r("a", 1, 30), r("b", 1, 10), r("c", 1, 20)],
        24,
        EvictionPlan(evict=("b", "c", "a")),
        id="one_at_a_time-evicts-all-idle-lru-first",
    ),
    pytest.param(
        "one_at_a_time",
        1,
        [r("a", 1, 30), r("b", 1, 10, in_use=True), r("c", 1, 20)],
        24,
        EvictionPlan(wait_for=("b",)),
        id="one_at_a_time-waits-for-busy-evicts-nothing",
    ),
    pytest.param(
        "one_at_a_time",
        1,
        [r("a", 1, 30, in_use=True), r("b", 1, 10, in_use=True), r("c", 1, 20)],
        24,
        EvictionPlan(wait_for=("b", "a")),
        id="one_at_a_time-waits-for-all-busy-lru-order",
    ),
    pytest.param(
        "vram_budget",
        2,
        [r("a", 3, 10), r("b", 4, 20)],
        10,
        EvictionPlan(),
        id="vram_budget-keeps-all-while-sum-fits",
    ),
    pytest.param(
        "vram_budget",
        3,
        [r("a", 3, 10), r("b", 4, 20)],
        10,
        EvictionPlan(),
        id="vram_budget-exact-fit-keeps-all",
    ),
    pytest.param(
        "vram_budget",
        4,
        [r("c", 2, 30), r("a", 3, 10), r("b", 4, 20)],
        10,
        EvictionPlan(evict=("a",)),
        id="vram_budget-evicts-only-the-lru-one-needed",
    ),
    pytest.param(
        "vram_budget",
        6,
        [r("c", 2, 30), r("a", 3, 10), r("b", 4, 20)],
        10,
        EvictionPlan(evict=("a", "b")),
        id="vram_budget-evicts-two-lru-first",
    ),
    pytest.param(
        "vram_budget",
        4,
        [r("a", 3, 10, in_use=True), r("b", 4, 20), r("c", 2, 30)],
        10,
        EvictionPlan(evict=("b",)),
        id="vram_budget-skips-busy-lru-evicts-next-idle",
    ),
    pytest.param(
        "vram_budget",
        6,
        [r("a", 5, 10, in_use=True), r("b", 2, 20)],
        10,
        EvictionPlan(wait_for=("a",)),
        id="vram_budget-waits-when-only-busy-could-make-room",
    ),
    pytest.param(
        "vram_budget",
        10,
        [r("a", 1, 10, in_use=True), r("b", 1, 20, in_use=True)],
        10,
        EvictionPlan(wait_for=("a", "b")),
        id="vram_budget-waits-for-busy-lru-order",
    ),
    pytest.param(
        "vram_budget",
        10,
        [],
        10,
        EvictionPlan(),
        id="vram_budget-model-equal-to-budget-fits",
    ),
]


@pytest.mark.parametrize(("policy", "needed_gib", "resident", "budget_gib", "expected"), PLAN_CASES)
def test_plan_eviction(
    policy: str, needed_gib: float, resident: list[ResidentInfo], budget_gib: float, expected: EvictionPlan
) -> None:
    plan = plan_eviction(int(needed_gib * GIB), resident, policy, int(budget_gib * GIB))  # type: ignore[arg-type]
    assert plan == expected


@pytest.mark.parametrize("policy", ["one_at_a_time", "vram_budget"])
@pytest.mark.parametrize(
    "resident",
    [pytest.param([], id="empty"), pytest.param([r("a", 1, 10), r("b", 1, 20, in_use=True)], id="with-residents")],
)
def test_plan_eviction_refuses_a_model_larger_than_the_budget(policy: str, resident: list[ResidentInfo]) -> None:
    plan = plan_eviction(int(12.5 * GIB), resident, policy, 10 * GIB)  # type: ignore[arg-type]
    assert plan.refuse_reason is not None
    assert "12.5 GiB" in plan.refuse_reason
    assert "10.0 GiB" in plan.refuse_reason
    assert plan.evict == ()
    assert plan.wait_for == ()


def test_plan_eviction_does_not_mutate_its_input() -> None:
    resident = [r("a", 3, 30), r("b", 4, 10)]
    before = list(resident)
    plan_eviction(8 * GIB, resident, "vram_budget", 10 * GIB)
    assert resident == before


# ----------------------------------------------------------------------------
# Loading on demand, reuse, specs
# ----------------------------------------------------------------------------


def test_acquire_loads_on_demand_and_reuses_the_same_spec() -> None:
    h = make()
    assert h.manager.status().resident == ()
    with h.manager.acquire(spec("a")) as first:
        assert isinstance(first, FakeModel)
        assert first.spec == spec("a")
    with h.manager.acquire(spec("a")) as second:
        assert second is first
    assert h.loader.loads[spec("a")] == 1
    assert h.manager.status().load_counts == {label("a"): 1}
    assert h.loader.closes[spec("a")] == 0


def test_load_spec_equality_ignores_option_order() -> None:
    assert LoadSpec.of("chat", "/m/a.gguf", x=1, y=2) == LoadSpec.of("chat", "/m/a.gguf", y=2, x=1)
    assert LoadSpec.of("chat", Path("/m/a.gguf")) == LoadSpec.of("chat", "/m/a.gguf")
    assert spec("a", gpu_layers=0).option("gpu_layers") == 0
    assert spec("a").option("gpu_layers", "auto") == "auto"
    assert spec("a").label == "chat:a.gguf"


def test_a_different_option_is_a_different_model() -> None:
    h = make(policy="vram_budget", budget_gib=24)
    cpu, gpu = spec("a", gpu_layers=0), spec("a", gpu_layers=99)
    assert cpu != gpu
    with h.manager.acquire(cpu) as first, h.manager.acquire(gpu) as second:
        assert first is not second
        assert first.spec == cpu and second.spec == gpu
    assert h.loader.loads[cpu] == 1
    assert h.loader.loads[gpu] == 1
    assert len(h.manager.status().resident) == 2


def test_nested_acquire_of_the_same_model_in_one_thread_is_reentrant() -> None:
    h = make()
    with h.manager.acquire(spec("a")) as outer, h.manager.acquire(spec("a")) as inner:
        assert inner is outer
        assert h.resident()[label("a")].refs == 2
    assert h.resident()[label("a")].refs == 0
    assert h.loader.loads[spec("a")] == 1


# ----------------------------------------------------------------------------
# one_at_a_time
# ----------------------------------------------------------------------------


def test_one_at_a_time_unloads_a_before_loading_b() -> None:
    sizes = {"a": 3 * GIB, "b": 5 * GIB}
    h = make(sizes=sizes)
    with h.manager.acquire(spec("a")) as a:
        assert h.resident()[label("a")].refs == 1
    with h.manager.acquire(spec("b")) as b:
        assert a.closed, "A must be closed before B is used"
        assert not b.closed
    assert h.loader.max_live == 1
    assert h.probe.peak == 5 * GIB, "A's memory must be given back before B loads"

    status = h.manager.status()
    assert [m.label for m in status.resident] == [label("b")]
    (resident_b,) = status.resident
    assert resident_b.refs == 0
    assert resident_b.state == "ready"
    assert resident_b.size_bytes == 5 * GIB
    assert resident_b.measured_bytes == 5 * GIB
    assert resident_b.reported_bytes == 5 * GIB
    assert resident_b.kind == "chat"
    assert resident_b.path == "/models/b.gguf"
    assert status.device == "cpu"
    assert status.policy == "one_at_a_time"

    assert [(t.action, t.label) for t in status.history] == [
        ("load", label("a")),
        ("unload", label("a")),
        ("load", label("b")),
    ]
    assert [t.bytes for t in status.history] == [3 * GIB, 3 * GIB, 5 * GIB]
    for record in status.history:
        assert 0 <= record.seconds < 5
        assert record.at > 0
    assert status.load_counts == {label("a"): 1, label("b"): 1}
    assert h.loader.closes == Counter({spec("a"): 1})
    assert h.probe.release_calls >= 1, "unloading releases the device cache"


def test_returning_to_a_model_reloads_it_and_counts_the_load() -> None:
    h = make()
    for name in ["a", "b", "a"]:
        with h.manager.acquire(spec(name)):
            pass
    assert h.manager.status().load_counts == {label("a"): 2, label("b"): 1}
    assert h.loader.max_live == 1
    assert [m.label for m in h.manager.status().resident] == [label("a")]


# ----------------------------------------------------------------------------
# Reference counts
# ----------------------------------------------------------------------------


def test_a_model_in_use_is_not_evicted_the_other_request_waits() -> None:
    h = make()
    a_entered, a_release = threading.Event(), threading.Event()
    b_loaded = threading.Event()

    def use_b() -> FakeModel:
        with h.manager.acquire(spec("b")) as model:
            b_loaded.set()
            return model

    holder = Worker(lambda: hold(h.manager, spec("a"), a_entered, a_release)).start()
    assert a_entered.wait(JOIN_S)
    waiter = Worker(use_b).start()

    assert not b_loaded.wait(0.3), "B was served while A was still in use"
    assert h.loader.loads[spec("b")] == 0
    assert h.loader.closes[spec("a")] == 0
    assert h.resident()[label("a")].refs == 1

    a_release.set()
    assert b_loaded.wait(JOIN_S), "B was not served after A was released"
    holder.join()
    waiter.join()
    assert holder.error is None and waiter.error is None
    assert holder.result.closed
    assert h.loader.max_live == 1
    assert list(h.resident()) == [label("b")]


def test_wait_timeout_raises_busy_error_and_leaves_the_manager_usable() -> None:
    h = make(wait_timeout_s=0.3)
    a_entered, a_release = threading.Event(), threading.Event()
    holder = Worker(lambda: hold(h.manager, spec("a"), a_entered, a_release)).start()
    assert a_entered.wait(JOIN_S)

    def use_b() -> None:
        with h.manager.acquire(spec("b")):
            pass

    started = time.monotonic()
    waiter = Worker(use_b).start()
    waiter.join()
    elapsed = time.monotonic() - started
    assert isinstance(waiter.error, BusyError), waiter.error
    assert label("b") in str(waiter.error)
    assert 0.25 <= elapsed < 2.0
    assert h.loader.loads[spec("b")] == 0
    assert h.resident()[label("a")].refs == 1

    # The timed-out waiter no longer drains A: another thread can still share A.
    second_user_done = threading.Event()

    def share_a() -> None:
        with h.manager.acquire(spec("a")):
            second_user_done.set()

    shared = Worker(share_a).start()
    assert second_user_done.wait(1.0), "A stayed blocked for new users after the waiter gave up"
    shared.join()
    assert shared.error is None

    a_release.set()
    holder.join()
    with h.manager.acquire(spec("b")):
        pass
    assert list(h.resident()) == [label("b")]


def test_new_users_of_a_model_that_a_load_waits_for_wait_too() -> None:
    """Fairness: while B waits for A to go idle, a new request for A does not keep A busy."""
    h = make()
    a_entered, a_release = threading.Event(), threading.Event()
    b_entered, b_release = threading.Event(), threading.Event()
    a_again = threading.Event()
    order: list[str] = []

    def use_a_again() -> None:
        with h.manager.acquire(spec("a")):
            order.append("a-again")
            a_again.set()

    def hold_b() -> Any:
        result = hold(h.manager, spec("b"), b_entered, b_release)
        order.append("b-done")
        return result

    holder = Worker(lambda: hold(h.manager, spec("a"), a_entered, a_release)).start()
    assert a_entered.wait(JOIN_S)
    b_worker = Worker(hold_b).start()
    time.sleep(0.2)  # B is now waiting for A to drain
    late = Worker(use_a_again).start()
    assert not a_again.wait(0.2), "a new user got A while a load was waiting for A to go idle"

    a_release.set()
    assert b_entered.wait(JOIN_S)
    assert not a_again.is_set()
    b_release.set()
    assert a_again.wait(JOIN_S)
    for worker in (holder, b_worker, late):
        worker.join()
        assert worker.error is None
    assert order == ["b-done", "a-again"]
    assert h.loader.max_live == 1
    assert h.manager.status().load_counts == {label("a"): 2, label("b"): 1}


def test_holding_a_and_acquiring_b_in_one_thread_is_refused_not_a_deadlock() -> None:
    h = make(wait_timeout_s=30)

    def nested() -> None:
        with h.manager.acquire(spec("a")), h.manager.acquire(spec("b")):
            pass

    started = time.monotonic()
    worker = Worker(nested).start()
    worker.join(2.0)
    assert time.monotonic() - started < 2.0
    assert isinstance(worker.error, BusyError), worker.error
    assert "release it first" in str(worker.error)
    assert label("a") in str(worker.error)
    assert h.loader.loads[spec("b")] == 0
    # The refusal left nothing behind: A is idle and B can load now.
    assert h.resident()[label("a")].refs == 0
    with h.manager.acquire(spec("b")):
        pass
    assert_consistent(h)


# ----------------------------------------------------------------------------
# Keep-alive
# ----------------------------------------------------------------------------


def test_unload_idle_waits_for_the_keep_alive() -> None:
    h = make(keep_alive_s=300)
    with h.manager.acquire(spec("a")) as model:
        pass
    h.clock.advance(299)
    assert h.manager.unload_idle() == []
    assert list(h.resident()) == [label("a")]
    assert h.resident()[label("a")].idle_seconds == pytest.approx(299)
    assert not model.closed

    h.clock.advance(1)
    assert h.manager.unload_idle() == [label("a")]
    assert model.closed
    assert h.manager.status().resident == ()
    assert h.probe.used == 0
    assert [t.action for t in h.manager.status().history] == ["load", "unload"]
    assert h.manager.unload_idle() == []


def test_unload_idle_counts_from_the_last_release() -> None:
    h = make(keep_alive_s=300)
    with h.manager.acquire(spec("a")):
        pass
    h.clock.advance(200)
    with h.manager.acquire(spec("a")):
        pass
    h.clock.advance(200)
    assert h.manager.unload_idle() == []
    h.clock.advance(100)
    assert h.manager.unload_idle() == [label("a")]


def test_unload_idle_never_unloads_a_model_in_use() -> None:
    h = make(keep_alive_s=10)
    with h.manager.acquire(spec("a")) as model:
        h.clock.advance(10_000)
        assert h.manager.unload_idle() == []
        assert h.manager.unload_all() == []
        assert not model.closed
        assert h.resident()[label("a")].idle_seconds == 0.0
    h.clock.advance(10)
    assert h.manager.unload_idle() == [label("a")]


def test_keep_alive_minus_one_never_unloads() -> None:
    h = make(keep_alive_s=-1)
    with h.manager.acquire(spec("a")) as model:
        pass
    h.clock.advance(10**9)
    assert h.manager.unload_idle() == []
    assert not model.closed
    assert list(h.resident()) == [label("a")]


def test_keep_alive_zero_unloads_right_after_release() -> None:
    h = make(keep_alive_s=0)
    with h.manager.acquire(spec("a")) as model:
        assert not model.closed
        assert list(h.resident()) == [label("a")]
    assert model.closed
    assert h.manager.status().resident == ()
    assert h.probe.used == 0


def test_keep_alive_zero_keeps_a_model_that_is_still_held() -> None:
    h = make(keep_alive_s=0)
    with h.manager.acquire(spec("a")) as outer:
        with h.manager.acquire(spec("a")):
            pass
        assert not outer.closed
    assert outer.closed


def test_start_reaper_unloads_idle_models_in_the_background() -> None:
    h = make(keep_alive_s=5)
    with h.manager.acquire(spec("a")) as model:
        pass
    h.clock.advance(6)
    h.manager.start_reaper(interval_s=0.02)
    try:
        deadline = time.monotonic() + JOIN_S
        while not model.closed and time.monotonic() < deadline:
            time.sleep(0.01)
        assert model.closed
    finally:
        h.manager.close()
    assert h.manager.status().resident == ()


# ----------------------------------------------------------------------------
# Many threads
# ----------------------------------------------------------------------------


def run_many(h: Harness, names: list[str], threads: int = 8, rounds: int = 6) -> tuple[int, list[str]]:
    served = 0
    served_lock = threading.Lock()
    problems: list[str] = []

    def work(seed: int) -> None:
        nonlocal served
        rng = random.Random(seed)
        for _ in range(rounds):
            name = rng.choice(names)
            with h.manager.acquire(spec(name)) as model:
                if model.closed or h.loader.live.get(spec(name)) is not model:
                    problems.append(f"{name} was unloaded while in use")
                if model.spec != spec(name):
                    problems.append(f"asked for {name}, got {model.spec}")
                time.sleep(rng.uniform(0, 0.003))
                if model.closed:
                    problems.append(f"{name} was closed while in use")
            with served_lock:
                served += 1
            time.sleep(rng.uniform(0, 0.002))

    workers = [Worker(lambda seed=seed: work(seed)).start() for seed in range(threads)]
    for worker in workers:
        # Generous: every unload runs gc.collect(), slow in a process that also holds torch models
        # (the full suite); a deadlock still fails, only later.
        worker.join(60.0)
    errors = [repr(w.error) for w in workers if w.error is not None]
    assert errors == []
    return served, problems


def test_eight_threads_four_models_one_at_a_time() -> None:
    h = make(wait_timeout_s=60, load_delay_s=0.001)
    served, problems = run_many(h, ["a", "b", "c", "d"])
    assert problems == []
    assert served == 8 * 6
    assert h.loader.max_live == 1, "two models were live at once under one_at_a_time"
    assert h.probe.peak <= 4 * GIB
    status = h.manager.status()
    assert len(status.resident) <= 1
    assert_consistent(h)
    loads = sum(t.action == "load" for t in status.history)
    unloads = sum(t.action == "unload" for t in status.history)
    assert loads == sum(status.load_counts.values()) == sum(h.loader.loads.values())
    assert loads - unloads == len(status.resident)


def test_eight_threads_four_models_vram_budget() -> None:
    sizes = {"a": 3 * GIB, "b": 4 * GIB, "c": 5 * GIB, "d": 6 * GIB}
    h = make(policy="vram_budget", budget_gib=10, sizes=sizes, wait_timeout_s=60, load_delay_s=0.001)
    served, problems = run_many(h, list(sizes))
    assert problems == []
    assert served == 8 * 6
    assert h.loader.max_live_bytes <= 10 * GIB, "live models exceeded the budget"
    assert h.probe.peak <= 10 * GIB
    assert h.loader.max_live >= 2, "vram_budget should keep several models resident"
    assert_consistent(h)
    assert sum(m.size_bytes for m in h.manager.status().resident) <= 10 * GIB


# ----------------------------------------------------------------------------
# Failed loads
# ----------------------------------------------------------------------------


def test_a_loader_error_becomes_model_load_error_and_the_manager_stays_consistent() -> None:
    h = make()
    h.loader.sizes["bad"] = 1 * GIB
    h.loader.load_errors["bad"] = ValueError("bad magic number")
    with pytest.raises(ModelLoadError) as caught, h.manager.acquire(spec("bad")):
        pytest.fail("the body must not run")
    message = str(caught.value)
    assert label("bad") in message
    assert "/models/bad.gguf" in message
    assert "bad magic number" in message
    assert isinstance(caught.value.__cause__, ValueError)

    status = h.manager.status()
    assert all(m.label != label("bad") for m in status.resident)
    assert status.resident == ()
    assert status.load_counts == {}

    with h.manager.acquire(spec("a")) as model:
        assert model.spec == spec("a")
    with pytest.raises(ModelLoadError), h.manager.acquire(spec("bad")):
        pass
    assert h.loader.load_attempts["bad"] == 2, "a failed load must not be cached"
    assert h.manager.status().resident == ()  # one_at_a_time evicted A before trying the bad one
    assert_consistent(h)


@pytest.mark.parametrize(
    "error",
    [MemoryError(), RuntimeError("CUDA error: out of memory")],
    ids=["MemoryError", "out-of-memory-message"],
)
def test_running_out_of_memory_while_loading_becomes_out_of_memory_error(error: BaseException) -> None:
    h = make()
    h.loader.sizes["big"] = 1 * GIB
    h.loader.load_errors["big"] = error
    with pytest.raises(OutOfMemoryError) as caught, h.manager.acquire(spec("big")):
        pass
    assert label("big") in str(caught.value)
    assert caught.value.__cause__ is error
    assert h.manager.status().resident == ()


def test_an_app_error_from_a_loader_passes_through_unchanged() -> None:
    h = make()
    h.loader.sizes["gone"] = 1 * GIB
    missing = ModelMissingError("gone.gguf is not in /models")
    h.loader.load_errors["gone"] = missing
    with pytest.raises(ModelMissingError) as caught, h.manager.acquire(spec("gone")):
        pass
    assert caught.value is missing
    assert h.manager.status().resident == ()
    with h.manager.acquire(spec("a")):
        pass


def test_estimate_raising_model_missing_evicts_nothing() -> None:
    h = make()
    with h.manager.acquire(spec("a")) as a:
        pass
    h.loader.estimate_errors["gone"] = ModelMissingError("gone.gguf is missing")
    with pytest.raises(ModelMissingError), h.manager.acquire(spec("gone")):
        pass
    assert not a.closed
    assert list(h.resident()) == [label("a")]
    assert h.loader.load_attempts["gone"] == 0
    with h.manager.acquire(spec("a")) as again:
        assert again is a


def test_waiters_for_a_failing_load_are_woken() -> None:
    """A load that fails wakes the requests queued behind it; each gets its own error, none hangs."""
    h = make(load_delay_s=0.0)
    h.loader.sizes["bad"] = 1 * GIB
    h.loader.load_errors["bad"] = ValueError("corrupt")

    def use_bad() -> None:
        with h.manager.acquire(spec("bad")):
            pass

    workers = [Worker(use_bad).start() for _ in range(4)]
    for worker in workers:
        worker.join()
        assert isinstance(worker.error, ModelLoadError), worker.error
    assert h.manager.status().resident == ()


# ----------------------------------------------------------------------------
# The budget
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["one_at_a_time", "vram_budget"])
def test_a_model_too_large_for_the_budget_is_refused_and_evicts_nothing(policy: str) -> None:
    h = make(policy=policy, budget_gib=8, sizes={"a": 2 * GIB, "huge": 12 * GIB})
    with h.manager.acquire(spec("a")) as a:
        pass
    with pytest.raises(ModelTooLargeError) as caught, h.manager.acquire(spec("huge")):
        pass
    error = caught.value
    assert error.needed_bytes == 12 * GIB
    assert error.budget_bytes == 8 * GIB
    assert "12.0 GiB" in str(error)
    assert "8.0 GiB" in str(error)
    assert label("huge") in str(error)
    assert not a.closed
    assert list(h.resident()) == [label("a")]
    assert h.loader.load_attempts["huge"] == 0


def test_vram_budget_keeps_models_that_fit_and_evicts_the_least_recently_used() -> None:
    h = make(policy="vram_budget", budget_gib=10, sizes={"a": 4 * GIB, "b": 4 * GIB, "c": 4 * GIB})
    with h.manager.acquire(spec("a")) as a:
        pass
    h.clock.advance(1)
    with h.manager.acquire(spec("b")) as b:
        pass
    assert set(h.resident()) == {label("a"), label("b")}
    assert not a.closed and not b.closed
    h.clock.advance(1)
    with h.manager.acquire(spec("c")) as c:
        assert not c.closed
    assert a.closed, "A was least recently used and must go"
    assert not b.closed
    assert set(h.resident()) == {label("b"), label("c")}
    assert h.loader.max_live_bytes <= 10 * GIB


def test_vram_budget_recent_use_protects_a_model() -> None:
    h = make(policy="vram_budget", budget_gib=10, sizes={"a": 4 * GIB, "b": 4 * GIB, "c": 4 * GIB})
    for name in ["a", "b", "a"]:
        h.clock.advance(1)
        with h.manager.acquire(spec(name)):
            pass
    h.clock.advance(1)
    with h.manager.acquire(spec("c")):
        pass
    assert set(h.resident()) == {label("a"), label("c")}


def test_vram_budget_evicts_an_idle_model_but_not_the_one_in_use() -> None:
    h = make(policy="vram_budget", budget_gib=10, sizes={"a": 4 * GIB, "b": 4 * GIB, "c": 4 * GIB})
    with h.manager.acquire(spec("b")):
        pass
    h.clock.advance(1)
    with h.manager.acquire(spec("a")) as a:
        h.clock.advance(1)
        # A is the most recently used, but B is idle: B goes, A stays.
        with h.manager.acquire(spec("c")):
            assert not a.closed
    assert set(h.resident()) == {label("a"), label("c")}


# ----------------------------------------------------------------------------
# Unloading and errors
# ----------------------------------------------------------------------------


def test_unload_calls_the_close_callback() -> None:
    h = make(policy="vram_budget", budget_gib=24)
    models = {}
    for name in ["a", "b"]:
        with h.manager.acquire(spec(name)) as model:
            models[name] = model
    assert h.loader.closes == Counter()
    unloaded = h.manager.unload_all()
    assert sorted(unloaded) == [label("a"), label("b")]
    closed = [name for name, model in models.items() if model.closed]
    assert closed == ["a", "b"]
    assert h.loader.closes == Counter({spec("a"): 1, spec("b"): 1})
    assert h.manager.status().resident == ()
    assert h.probe.used == 0
    assert [t.bytes for t in h.manager.status().history if t.action == "unload"] == [4 * GIB, 4 * GIB]


def test_unload_all_leaves_models_in_use_and_keeps_the_keep_alive() -> None:
    h = make(policy="vram_budget", budget_gib=24, keep_alive_s=300)
    with h.manager.acquire(spec("b")):
        pass
    with h.manager.acquire(spec("a")) as a:
        assert h.manager.unload_all() == [label("b")]
        assert not a.closed
    assert list(h.resident()) == [label("a")]
    assert h.manager.keep_alive_s == 300
    assert h.manager.unload_all() == [label("a")]
    assert h.manager.status().resident == ()


def test_a_close_callback_that_raises_does_not_break_unloading() -> None:
    h = make()

    def broken_close() -> None:
        raise RuntimeError("driver hiccup")

    h.manager.register_loader(
        "odd", Loader(load=lambda s: LoadedModel(object(), 0, broken_close), estimate_bytes=lambda s: GIB)
    )
    odd = LoadSpec.of("odd", "/models/odd.bin")
    with h.manager.acquire(odd):
        pass
    assert h.manager.unload_all() == ["odd:odd.bin"]
    assert h.manager.status().resident == ()


def test_close_unloads_everything_idle() -> None:
    h = make()
    with h.manager.acquire(spec("a")) as a:
        pass
    h.manager.close()
    assert a.closed
    assert h.manager.status().resident == ()


def test_unknown_kind_raises_app_error() -> None:
    h = make()
    with pytest.raises(AppError) as caught, h.manager.acquire(LoadSpec.of("vision", "/models/llava.gguf")):
        pass
    assert type(caught.value) is AppError
    assert "vision" in str(caught.value)
    assert h.manager.status().resident == ()


def test_device_comes_from_the_probe() -> None:
    h = make()
    assert h.manager.device == "cpu"
    assert h.manager.status().device == "cpu"
    assert h.manager.status().budget_bytes == 24 * GIB


# ----------------------------------------------------------------------------
# Nested acquires under vram_budget (both were bugs in commit e4875b7)
# ----------------------------------------------------------------------------


def test_holding_a_while_acquiring_a_resident_b_does_not_deadlock_with_a_waiting_load() -> None:
    """A thread that holds A gets the idle resident B even while another load waits for A and B.

    In e4875b7 it waited on B's drain_waiters, left there by a load that itself waited for A (held by
    that same thread): a deadlock that only wait_timeout_s broke.
    """
    sizes = {"a": 4 * GIB, "b": 4 * GIB, "c": 8 * GIB}
    h = make(policy="vram_budget", budget_gib=10, sizes=sizes, wait_timeout_s=1.0)
    for name in ["a", "b"]:
        with h.manager.acquire(spec(name)):
            pass
    a_entered, b_entered, b_release = threading.Event(), threading.Event(), threading.Event()
    want_b, got_b, release_a = threading.Event(), threading.Event(), threading.Event()

    def t1() -> None:
        with h.manager.acquire(spec("a")):
            a_entered.set()
            assert want_b.wait(JOIN_S)
            with h.manager.acquire(spec("b")):  # B is resident and idle; nested use fits the budget
                got_b.set()
            assert release_a.wait(JOIN_S)

    def t3() -> None:
        with h.manager.acquire(spec("c")) as model:  # 8 GiB: needs both A and B gone, waits for them
            return model

    first = Worker(t1).start()
    second = Worker(lambda: hold(h.manager, spec("b"), b_entered, b_release)).start()
    assert a_entered.wait(JOIN_S) and b_entered.wait(JOIN_S)
    third = Worker(t3).start()
    time.sleep(0.15)  # C is now waiting for A and B to go idle
    b_release.set()
    second.join()
    time.sleep(0.1)  # C re-planned: it evicts B only together with A, so it keeps waiting for A
    want_b.set()
    served = got_b.wait(0.5)  # with the bug T1 waited until C's wait_timeout_s (1 s) expired
    release_a.set()
    first.join()
    third.join()
    assert served, "the thread holding A was not given the idle resident B"
    assert first.error is None and second.error is None
    assert third.error is None, f"C should load once A and B are idle: {third.error!r}"
    assert set(h.resident()) == {label("c")}
    assert h.loader.max_live_bytes <= 10 * GIB


def test_vram_budget_a_request_holding_a_waits_for_another_threads_model_instead_of_refusing() -> None:
    """Holding A, loading C waits for B (held by another thread) when evicting B alone makes room.

    In e4875b7 plan_eviction waited for every busy model, A included, so this was refused as a self-deadlock.
    """
    sizes = {"a": 4 * GIB, "b": 4 * GIB, "c": 4 * GIB}
    h = make(policy="vram_budget", budget_gib=10, sizes=sizes, wait_timeout_s=2.0)
    b_entered, b_release = threading.Event(), threading.Event()
    other = Worker(lambda: hold(h.manager, spec("b"), b_entered, b_release)).start()
    assert b_entered.wait(JOIN_S)
    outcome: list[str] = []

    def nested() -> None:
        with h.manager.acquire(spec("a")) as a:
            # A (4) + B (4) + C (4) = 12 > 10, but evicting B once it is released leaves 8: fits.
            timer = threading.Timer(0.2, b_release.set)
            timer.start()
            with h.manager.acquire(spec("c")):
                outcome.append("loaded")
                assert not a.closed
            timer.join(JOIN_S)

    worker = Worker(nested).start()
    worker.join()
    other.join()
    assert worker.error is None, f"refused: {worker.error!r}"
    assert outcome == ["loaded"]
    assert set(h.resident()) == {label("a"), label("c")}


def test_vram_budget_plan_waits_for_the_fewest_busy_models_and_the_callers_own_last() -> None:
    def mine(key: str, size_gib: float, last_used: float) -> ResidentInfo:
        return ResidentInfo(key, int(size_gib * GIB), last_used, in_use=True, held_by_caller=True)

    # A (caller's, LRU) and B (another's) busy: waiting for B alone makes room.
    resident = [mine("a", 4, 10), r("b", 4, 20, in_use=True)]
    assert plan_eviction(4 * GIB, resident, "vram_budget", 10 * GIB) == EvictionPlan(wait_for=("b",))
    # Only the caller's own model could make room: it is named, and the manager refuses instead of waiting.
    resident = [mine("a", 4, 10), r("b", 1, 20, in_use=True)]
    assert plan_eviction(7 * GIB, resident, "vram_budget", 10 * GIB) == EvictionPlan(wait_for=("b", "a"))
    # one_at_a_time waits for every busy model, the caller's own last.
    resident = [mine("a", 1, 10), r("b", 1, 20, in_use=True)]
    assert plan_eviction(GIB, resident, "one_at_a_time", 10 * GIB) == EvictionPlan(wait_for=("b", "a"))


def test_a_streaming_request_resumed_on_a_pool_thread_does_not_mark_that_thread_as_holding() -> None:
    """Web servers run each step of a streaming reply on whichever pool thread is free, in a copy of
    the request's context. Another request later served by the same thread must wait for the model
    like everyone else, not be refused as if it held the model itself."""
    import contextvars
    from concurrent.futures import ThreadPoolExecutor

    h = make(wait_timeout_s=0.3)

    def streaming_reply() -> Iterator[None]:
        with h.manager.acquire(spec("a")):
            yield
            yield

    reply = streaming_reply()
    with ThreadPoolExecutor(max_workers=1) as pool:  # one thread: both requests share it

        def step(function: Any) -> Any:
            return pool.submit(contextvars.copy_context().run, function).result(timeout=JOIN_S)

        step(lambda: next(reply))  # the first request now holds "a"

        def other_request() -> str:
            try:
                with h.manager.acquire(spec("b")):
                    return "loaded"
            except BusyError as error:
                return str(error)

        outcome = step(other_request)
        assert "could not be loaded within" in outcome  # it waited, then gave up: not "release it first"
        reply.close()
        assert step(other_request) == "loaded"


def test_exclusive_use_of_a_loaded_model_times_out_as_busy() -> None:
    h = make(wait_timeout_s=0.2)
    lock = threading.Lock()
    refused: list[str] = []

    def second_request() -> None:
        try:
            with h.manager.exclusive(lock, spec("a")):
                refused.append("")
        except BusyError as error:
            refused.append(str(error))

    with h.manager.exclusive(lock, spec("a")):
        Worker(second_request).start().join()
    assert len(refused) == 1 and "stayed busy" in refused[0]
    with h.manager.exclusive(lock, spec("a")):  # free again once released
        assert lock.locked()
    assert not lock.locked()
