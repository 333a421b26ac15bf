"""model_manager.py with fake loaders, fake memory probes and a fake clock: no real models, no torch."""

from __future__ import annotations

import contextlib
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from errors import (
    AppError,
    BusyError,
    ModelLoadError,
    ModelMissingError,
    ModelTooLargeError,
    OutOfMemoryError,
    RequestCancelledError,
)
from model_manager import (
    GIB,
    DeviceBudget,
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
    """Memory "in use" on one device: the fake loaders raise it on load and lower it on close."""

    def __init__(self, device: str = "cpu") -> None:
        self.device = device
        self.used = 0
        self.peak = 0
        self.release_calls = 0
        self.fail_used: Callable[[], bool] | None = None  # used_bytes raises while this says so
        self.release_error: BaseException | None = None  # release_cache raises this
        self._lock = threading.Lock()

    def add(self, delta: int) -> None:
        with self._lock:
            self.used += delta
            self.peak = max(self.peak, self.used)

    def used_bytes(self) -> int:
        if self.fail_used is not None and self.fail_used():
            raise RuntimeError(f"the {self.device} driver did not answer")
        return self.used

    def release_cache(self) -> None:
        self.release_calls += 1
        if self.release_error is not None:
            raise self.release_error


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
    """A loader for every kind: the size of a model is looked up by its file stem; its memory goes
    to the probe of its device. It records what a correct manager never does (two loads at once, the
    same model loaded twice) in ``violations`` as well as raising, since the manager turns a
    loader's exception into a ModelLoadError."""

    def __init__(self, probes: dict[str, FakeProbe], sizes: dict[str, int], load_delay_s: float = 0.0) -> None:
        self.probes = probes
        self.sizes = sizes
        self.load_delay_s = load_delay_s
        self.load_delays: dict[str, float] = {}
        self.load_gates: dict[str, tuple[threading.Event, threading.Event]] = {}
        self.load_errors: dict[str, BaseException] = {}
        self.close_errors: dict[str, BaseException] = {}
        self.estimate_errors: dict[str, BaseException] = {}
        self.estimate_hook: Callable[[LoadSpec], None] | None = None
        self.estimate_calls: Counter[str] = Counter()
        self.loads: Counter[LoadSpec] = Counter()
        self.load_attempts: Counter[str] = Counter()
        self.closes: Counter[LoadSpec] = Counter()
        self.live: dict[LoadSpec, FakeModel] = {}
        self.loading: set[LoadSpec] = set()
        self.max_loading = 0
        self.max_live = 0
        self.max_live_bytes = 0
        self.max_live_by_device: Counter[str] = Counter()
        self.max_live_bytes_by_device: Counter[str] = Counter()
        self.violations: list[str] = []
        self.lock = threading.Lock()

    @property
    def probe(self) -> FakeProbe:
        return self.probes["cpu"]

    def size(self, spec: LoadSpec) -> int:
        return self.sizes[Path(spec.path).stem]

    def gate(self, name: str) -> tuple[threading.Event, threading.Event]:
        """Make the next loads of ``name`` signal the first event and wait for the second."""
        self.load_gates[name] = (threading.Event(), threading.Event())
        return self.load_gates[name]

    def estimate_bytes(self, spec: LoadSpec) -> int:
        name = Path(spec.path).stem
        with self.lock:
            self.estimate_calls[name] += 1
        if self.estimate_hook is not None:
            self.estimate_hook(spec)
        error = self.estimate_errors.get(name)
        if error is not None:
            raise error
        return self.size(spec)

    def load(self, spec: LoadSpec) -> LoadedModel:
        name = Path(spec.path).stem
        with self.lock:
            self.load_attempts[name] += 1
            if self.loading:
                self.violations.append(f"{spec} loaded while {self.loading} was loading")
            if spec in self.live:
                self.violations.append(f"{spec} loaded twice")
            self.loading.add(spec)
            self.max_loading = max(self.max_loading, len(self.loading))
        try:
            error = self.load_errors.get(name)
            if error is not None:
                raise error
            if name in self.load_gates:
                started, proceed = self.load_gates[name]
                started.set()
                assert proceed.wait(JOIN_S), "the load was never let through"
            delay = self.load_delays.get(name, self.load_delay_s)
            if delay:
                time.sleep(delay)
        finally:
            with self.lock:
                self.loading.discard(spec)
        size = self.size(spec)
        device = spec.budget_device
        probe = self.probes[device]
        model = FakeModel(spec)
        with self.lock:
            assert spec not in self.live, f"{spec} loaded twice"
            self.live[spec] = model
            self.loads[spec] += 1
            self.max_live = max(self.max_live, len(self.live))
            self.max_live_bytes = max(self.max_live_bytes, self.live_bytes())
            on_device = [s for s in self.live if s.budget_device == device]
            self.max_live_by_device[device] = max(self.max_live_by_device[device], len(on_device))
            self.max_live_bytes_by_device[device] = max(
                self.max_live_bytes_by_device[device], sum(self.size(s) for s in on_device)
            )
        probe.add(size)

        def close() -> None:
            close_error = self.close_errors.get(name)
            if close_error is not None:
                raise close_error  # the model stays where it was: its memory is not given back
            with self.lock:
                model.closed = True
                self.closes[spec] += 1
                del self.live[spec]
            probe.add(-size)

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
    cuda_probe: FakeProbe | None = None

    def resident(self) -> dict[str, Any]:
        return {m.label: m for m in self.manager.status().resident}


def spec(name: str, *, kind: str = "chat", device: str = "cpu", **options: Any) -> LoadSpec:
    return LoadSpec.of(kind, f"/models/{name}.gguf", device=device, **options)


def label(name: str, kind: str = "chat") -> str:
    return f"{kind}:{name}.gguf"


DEFAULT_SIZES = {"a": 4 * GIB, "b": 4 * GIB, "c": 4 * GIB, "d": 4 * GIB}


def make(
    policy: str = "one_at_a_time",
    budget_gib: float = 24,
    sizes: dict[str, int] | None = None,
    keep_alive_s: float = 300.0,
    wait_timeout_s: float = JOIN_S,
    load_delay_s: float = 0.0,
    max_queue: int = 32,
    cuda_budget_gib: float | None = None,
) -> Harness:
    """A manager with a "cpu" device (and a "cuda" one when ``cuda_budget_gib`` is given), and one
    fake loader registered for the kinds "chat" and "image"."""
    probe = FakeProbe("cpu")
    probes = {"cpu": probe}
    devices = {"cpu": DeviceBudget(probe, int(budget_gib * GIB))}
    cuda_probe = None
    if cuda_budget_gib is not None:
        cuda_probe = FakeProbe("cuda")
        probes["cuda"] = cuda_probe
        devices["cuda"] = DeviceBudget(cuda_probe, int(cuda_budget_gib * GIB))
    clock = FakeClock()
    manager = ModelManager(
        policy=policy,  # type: ignore[arg-type]
        devices=devices,
        keep_alive_s=keep_alive_s,
        wait_timeout_s=wait_timeout_s,
        max_queue=max_queue,
        clock=clock,
    )
    loader = FakeLoader(probes, dict(sizes or DEFAULT_SIZES), load_delay_s)
    manager.register_loader("chat", loader.as_loader())
    manager.register_loader("image", loader.as_loader())
    return Harness(manager, loader, probe, clock, cuda_probe)


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


def start_holding(h: Harness, load_spec: LoadSpec) -> tuple[Worker, threading.Event]:
    """A request that holds ``load_spec`` (loaded and in use) until the returned event is set."""
    entered, release = threading.Event(), threading.Event()
    worker = Worker(lambda: hold(h.manager, load_spec, entered, release)).start()
    assert entered.wait(JOIN_S), f"{load_spec.label} was never served"
    return worker, release


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = JOIN_S) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.002)


def wait_queued(h: Harness, count: int) -> None:
    wait_until(lambda: h.manager.status().waiting == count, f"{count} requests wait in the queue")


def use(h: Harness, load_spec: LoadSpec, order: list[str] | None = None, tag: str | None = None) -> Callable[[], Any]:
    """A request body: acquire, note ``tag`` in ``order`` once served, release at once."""

    def run() -> Any:
        with h.manager.acquire(load_spec) as model:
            if order is not None:
                order.append(tag or Path(load_spec.path).stem)
            return model

    return run


def assert_consistent(h: Harness) -> None:
    """Nothing in use or in transition, nothing queued, every resident model live in the fake loader."""
    status = h.manager.status()
    for model in status.resident:
        assert not model.in_use, model
        assert model.state == "ready", model
    assert status.waiting == 0
    assert {m.label for m in status.resident} == {s.label for s in h.loader.live}
    assert len(status.resident) == len(h.loader.live)
    assert h.loader.violations == []


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
        4,
        [r("a", 4, 10, in_use=True), r("b", 4, 20, in_use=True)],
        10,
        EvictionPlan(wait_for=("a",)),
        id="vram_budget-waits-for-the-fewest-busy-lru-first",
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


def test_the_device_is_part_of_the_spec() -> None:
    assert LoadSpec.of("chat", "/m/a.gguf").device == "cpu"
    assert LoadSpec.of("chat", "/m/a.gguf", device="cuda") != LoadSpec.of("chat", "/m/a.gguf")
    assert LoadSpec.of("chat", "/m/a.gguf", device="cuda:1").budget_device == "cuda"
    assert LoadSpec.of("chat", "/m/a.gguf", device="cuda:1", n=1).options == (("n", 1),)


def test_a_different_option_is_a_different_model() -> None:
    h = make(policy="vram_budget", budget_gib=24)
    cpu, gpu = spec("a", gpu_layers=0), spec("a", gpu_layers=99)
    assert cpu != gpu
    with h.manager.acquire(cpu) as first:
        pass
    with h.manager.acquire(gpu) as second:
        assert first is not second
    assert first.spec == cpu and second.spec == gpu
    assert h.loader.loads[cpu] == 1
    assert h.loader.loads[gpu] == 1
    assert len(h.manager.status().resident) == 2


# ----------------------------------------------------------------------------
# one_at_a_time
# ----------------------------------------------------------------------------


def test_one_at_a_time_unloads_a_before_loading_b() -> None:
    sizes = {"a": 3 * GIB, "b": 5 * GIB}
    h = make(sizes=sizes)
    with h.manager.acquire(spec("a")) as a:
        assert h.resident()[label("a")].in_use
    with h.manager.acquire(spec("b")) as b:
        assert a.closed, "A must be closed before B is used"
        assert not b.closed
    assert h.loader.max_live == 1
    assert h.probe.peak == 5 * GIB, "A's memory must be given back before B loads"

    status = h.manager.status()
    assert [m.label for m in status.resident] == [label("b")]
    (resident_b,) = status.resident
    assert not resident_b.in_use
    assert resident_b.state == "ready"
    assert resident_b.size_bytes == 5 * GIB
    assert resident_b.measured_bytes == 5 * GIB
    assert resident_b.reported_bytes == 5 * GIB
    assert resident_b.kind == "chat"
    assert resident_b.name == "b.gguf"
    assert resident_b.device == "cpu"
    assert status.device == "cpu"
    assert status.policy == "one_at_a_time"
    assert status.waiting == 0
    assert [(d.name, d.budget_bytes, d.resident_bytes) for d in status.devices] == [("cpu", 24 * GIB, 5 * GIB)]

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
# One user per model; the queue
# ----------------------------------------------------------------------------


def test_a_model_in_use_is_not_evicted_the_other_request_waits() -> None:
    h = make()
    b_loaded = threading.Event()

    def use_b() -> FakeModel:
        with h.manager.acquire(spec("b")) as model:
            b_loaded.set()
            return model

    holder, a_release = start_holding(h, spec("a"))
    waiter = Worker(use_b).start()

    assert not b_loaded.wait(0.3), "B was served while A was still in use"
    assert h.loader.loads[spec("b")] == 0
    assert h.loader.closes[spec("a")] == 0
    assert h.resident()[label("a")].in_use
    assert h.manager.status().waiting == 1

    a_release.set()
    assert b_loaded.wait(JOIN_S), "B was not served after A was released"
    holder.join()
    waiter.join()
    assert holder.error is None and waiter.error is None
    assert holder.result.closed
    assert h.loader.max_live == 1
    assert list(h.resident()) == [label("b")]


def test_one_user_per_model_a_second_request_for_a_busy_model_waits_for_it() -> None:
    h = make()
    holder, release = start_holding(h, spec("a"))
    second = threading.Event()

    def use_a() -> FakeModel:
        with h.manager.acquire(spec("a")) as model:
            second.set()
            return model

    waiter = Worker(use_a).start()
    assert not second.wait(0.3), "two requests used the same model at once"
    assert h.manager.status().waiting == 1
    release.set()
    holder.join()
    waiter.join()
    assert waiter.error is None
    assert waiter.result is holder.result, "the model was reused, not reloaded"
    assert h.loader.loads[spec("a")] == 1
    assert_consistent(h)


def test_requests_are_served_in_arrival_order() -> None:
    """With A busy, requests for B, C and A (in this order) are served B, C, A under one_at_a_time,
    although A is resident and becomes idle first."""
    h = make()
    holder, a_release = start_holding(h, spec("a"))
    order: list[str] = []
    workers = []
    for count, name in enumerate(["b", "c", "a"], start=1):
        workers.append(Worker(use(h, spec(name), order)).start())
        wait_queued(h, count)  # the arrival order is known
    a_release.set()
    for worker in [holder, *workers]:
        worker.join()
        assert worker.error is None, worker.error
    assert order == ["b", "c", "a"]
    assert h.manager.status().load_counts == {label("a"): 2, label("b"): 1, label("c"): 1}
    assert h.loader.max_live == 1
    assert_consistent(h)


def test_new_users_of_a_model_that_a_load_waits_for_wait_too() -> None:
    """While B waits for A to go idle, a new request for A does not get A first."""
    h = make()
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

    holder, a_release = start_holding(h, spec("a"))
    b_worker = Worker(hold_b).start()
    wait_queued(h, 1)
    late = Worker(use_a_again).start()
    wait_queued(h, 2)
    assert not a_again.wait(0.2), "a new user got A while A was busy"

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


def test_a_stream_of_requests_for_the_busy_model_does_not_starve_a_load_waiting_for_it() -> None:
    """X waits for B, which needs the busy A evicted. Requests for A keep arriving, before and after
    A's user releases it; X still gets B next, and the requests for A are served after X."""
    h = make()
    holder, a_release = start_holding(h, spec("a"))
    order: list[str] = []
    x_served = threading.Event()

    def request_x() -> None:
        with h.manager.acquire(spec("b")):
            order.append("x")
            x_served.set()
            time.sleep(0.02)

    x = Worker(request_x).start()
    wait_queued(h, 1)
    late: list[Worker] = []

    def feed() -> None:  # a new request for A every 10 ms, until X is served (and a few more)
        for _ in range(40):
            late.append(Worker(use(h, spec("a"), order, "a-late")).start())
            if x_served.wait(0.01) and len(late) >= 8:
                return

    feeder = Worker(feed).start()
    wait_until(lambda: h.manager.status().waiting >= 5, "several requests for A arrived behind X")
    a_release.set()
    feeder.join()
    for worker in [holder, x, *late]:
        worker.join()
        assert worker.error is None, worker.error
    assert order[0] == "x", f"requests that came after X were served first: {order}"
    assert order.count("a-late") == len(late)
    assert h.manager.status().load_counts == {label("a"): 2, label("b"): 1}
    assert_consistent(h)


def test_a_model_a_load_waits_to_see_idle_is_not_lent_to_a_later_request() -> None:
    """vram_budget: X needs both busy A and C evicted. When A goes idle first, a later request for A
    does not get it (X would then wait for A again); X loads once C is idle too, then A is served."""
    sizes = {"a": 4 * GIB, "c": 4 * GIB, "b": 8 * GIB}
    h = make(policy="vram_budget", budget_gib=10, sizes=sizes)
    a_holder, a_release = start_holding(h, spec("a"))
    c_holder, c_release = start_holding(h, spec("c"))
    order: list[str] = []
    x = Worker(use(h, spec("b"), order, "x")).start()
    wait_queued(h, 1)
    late = Worker(use(h, spec("a"), order, "a-late")).start()
    wait_queued(h, 2)
    a_release.set()
    a_holder.join()
    time.sleep(0.1)
    assert order == [], "the later request took A, which the load ahead of it waits to evict"
    c_release.set()
    for worker in (c_holder, x, late):
        worker.join()
        assert worker.error is None, worker.error
    assert order == ["x", "a-late"]
    assert h.loader.max_live_bytes <= 10 * GIB
    assert_consistent(h)


def test_a_later_load_does_not_take_the_memory_an_earlier_load_waits_for() -> None:
    """vram_budget: X waits for the busy A to make room for B. C would fit beside A right now, but
    loading it would take the room X waits for: C is loaded after X."""
    sizes = {"a": 6 * GIB, "b": 7 * GIB, "c": 4 * GIB}
    h = make(policy="vram_budget", budget_gib=10, sizes=sizes)
    holder, release = start_holding(h, spec("a"))
    order: list[str] = []
    x = Worker(use(h, spec("b"), order, "x")).start()
    wait_queued(h, 1)
    y = Worker(use(h, spec("c"), order, "y")).start()
    wait_queued(h, 2)
    time.sleep(0.1)
    assert order == [], "a later load went ahead of the load waiting for memory"
    release.set()
    for worker in (holder, x, y):
        worker.join()
        assert worker.error is None, worker.error
    assert order == ["x", "y"]
    assert h.loader.max_live_bytes <= 10 * GIB
    assert_consistent(h)


def test_a_full_queue_is_refused_at_once_as_busy() -> None:
    h = make(max_queue=2, wait_timeout_s=30)
    holder, release = start_holding(h, spec("a"))
    waiters = [Worker(use(h, spec("a"))).start(), Worker(use(h, spec("b"))).start()]
    wait_queued(h, 2)

    third = Worker(use(h, spec("c"))).start()
    third.join()  # wait_timeout_s is 30 s: a refusal that came by timing out would fail this join
    assert not release.is_set(), "raised before the holder released A"
    assert isinstance(third.error, BusyError), third.error
    assert "max_queue" in str(third.error)
    assert h.resident()[label("a")].in_use
    assert h.manager.status().waiting == 2
    assert h.loader.load_attempts["c"] == 0

    release.set()
    for worker in [holder, *waiters]:
        worker.join()
        assert worker.error is None, worker.error
    with h.manager.acquire(spec("c")):  # the queue has room again
        pass
    assert_consistent(h)


def test_wait_timeout_raises_busy_error_and_leaves_the_manager_usable() -> None:
    h = make(wait_timeout_s=0.3)
    holder, a_release = start_holding(h, spec("a"))

    started = time.monotonic()
    waiter = Worker(use(h, spec("b"))).start()
    waiter.join()
    elapsed = time.monotonic() - started
    assert isinstance(waiter.error, BusyError), waiter.error
    assert label("b") in str(waiter.error)
    assert "wait_timeout_s" in str(waiter.error)
    assert elapsed >= 0.25, "gave up before its deadline"
    assert h.loader.loads[spec("b")] == 0
    assert h.resident()[label("a")].in_use
    assert h.manager.status().waiting == 0, "the request that gave up is still in the queue"

    a_release.set()
    holder.join()
    # Nothing is left waiting for A: it can be borrowed (which needs an empty queue) and then B loads.
    with h.manager.borrow_if_idle(spec("a")) as borrowed:
        assert borrowed is holder.result
    with h.manager.acquire(spec("b")):
        pass
    assert list(h.resident()) == [label("b")]


def test_one_deadline_covers_the_whole_wait() -> None:
    """W waits behind a busy model (A), then behind another request's load (C). It gives up once
    wait_timeout_s has passed since it asked, not wait_timeout_s after each phase."""
    timeout = 0.6
    h = make(wait_timeout_s=timeout)
    h.loader.load_delays["c"] = 0.8
    holder, a_release = start_holding(h, spec("a"))
    y = Worker(use(h, spec("c"))).start()  # ahead of W: waits for A to go idle, then evicts it and loads C
    wait_queued(h, 1)
    w_started = time.monotonic()
    w = Worker(use(h, spec("a"))).start()
    wait_queued(h, 2)
    time.sleep(0.35)  # W's first phase: A is busy
    a_release.set()  # W's second phase: Y unloads A and loads C, slowly
    w.join()
    elapsed = w.finished_at - w_started  # type: ignore[operator]
    assert isinstance(w.error, BusyError), w.error
    assert elapsed >= 0.9 * timeout, "gave up before its deadline"
    assert elapsed < 1.5 * timeout, f"waited {elapsed:.2f} s: the deadline restarted between the phases"
    for worker in (holder, y):
        worker.join()
        assert worker.error is None, worker.error
    assert h.loader.loads[spec("c")] == 1
    assert_consistent(h)


# ----------------------------------------------------------------------------
# Cancellation
# ----------------------------------------------------------------------------


def test_a_cancelled_waiter_leaves_the_queue_at_once_and_never_loads() -> None:
    h = make(wait_timeout_s=30)
    holder, release = start_holding(h, spec("a"))
    cancel = threading.Event()

    def use_b() -> None:
        with h.manager.acquire(spec("b"), cancel=cancel):
            pass

    waiter = Worker(use_b).start()
    wait_queued(h, 1)
    cancel.set()
    waiter.join(2.0)  # wait_timeout_s is 30 s and A stays busy: only the cancel can end the wait
    assert not release.is_set()
    assert isinstance(waiter.error, RequestCancelledError), waiter.error
    assert label("b") in str(waiter.error)
    assert h.manager.status().waiting == 0
    assert h.resident()[label("a")].in_use

    release.set()
    holder.join()
    assert h.loader.load_attempts["b"] == 0
    assert h.loader.loads[spec("b")] == 0
    assert list(h.resident()) == [label("a")], "A was evicted for a cancelled request"
    assert not holder.result.closed
    assert_consistent(h)


def test_a_request_cancelled_before_it_asks_raises_at_once_and_does_nothing() -> None:
    h = make()
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(RequestCancelledError), h.manager.acquire(spec("a"), cancel=cancel):
        pytest.fail("the body must not run")
    assert h.loader.estimate_calls["a"] == 0, "a cancelled request read the model's files"
    assert h.loader.load_attempts["a"] == 0
    status = h.manager.status()
    assert status.resident == () and status.waiting == 0 and status.load_counts == {}


class CancelledAfterGrant(threading.Event):
    """A Stop pressed at the worst moment: after the scheduler granted the request its load (the
    model is LOADING, its victims UNLOADING) and before the request starts the transition."""

    def __init__(self, manager: ModelManager, wanted: LoadSpec) -> None:
        super().__init__()
        self.manager = manager
        self.wanted = wanted

    def is_set(self) -> bool:
        if not super().is_set() and self._granted():
            self.set()
        return super().is_set()

    def _granted(self) -> bool:
        return any(m.label == self.wanted.label and m.state == "loading" for m in self.manager.status().resident)


def test_a_request_cancelled_between_its_grant_and_its_load_gives_the_transition_back() -> None:
    h = make()
    with h.manager.acquire(spec("a")) as a:
        pass
    cancel = CancelledAfterGrant(h.manager, spec("b"))
    with pytest.raises(RequestCancelledError), h.manager.acquire(spec("b"), cancel=cancel):
        pytest.fail("the body must not run")
    assert cancel.is_set()
    assert h.loader.load_attempts["b"] == 0
    assert not a.closed, "a victim of an abandoned transition was unloaded"
    status = h.manager.status()
    assert [(m.label, m.state, m.in_use) for m in status.resident] == [(label("a"), "ready", False)]
    assert status.waiting == 0
    # The transition slot was given back: the next request loads B.
    with h.manager.acquire(spec("b")) as b:
        assert a.closed and not b.closed
    assert_consistent(h)


def test_a_request_cancelled_while_its_model_loads_leaves_the_model_for_the_next() -> None:
    h = make()
    started, proceed = h.loader.gate("b")
    cancel = threading.Event()

    def use_b() -> None:
        with h.manager.acquire(spec("b"), cancel=cancel):
            pytest.fail("the body must not run")

    waiter = Worker(use_b).start()
    assert started.wait(JOIN_S)
    cancel.set()
    proceed.set()
    waiter.join()
    assert isinstance(waiter.error, RequestCancelledError), waiter.error
    assert [(m.label, m.state, m.in_use) for m in h.manager.status().resident] == [(label("b"), "ready", False)]
    assert h.loader.loads[spec("b")] == 1
    with h.manager.acquire(spec("b")) as b:
        assert b is h.loader.live[spec("b")]
    assert h.loader.loads[spec("b")] == 1, "the next request reloaded the model"
    assert_consistent(h)


# ----------------------------------------------------------------------------
# Devices
# ----------------------------------------------------------------------------


def test_each_device_has_its_own_budget() -> None:
    sizes = {"a": 4 * GIB, "x": 6 * GIB, "y": 5 * GIB, "huge": 12 * GIB}
    h = make(budget_gib=16, cuda_budget_gib=10, sizes=sizes)
    assert h.cuda_probe is not None
    assert h.manager.device == "cuda"
    assert h.manager.has_device("cpu") and h.manager.has_device("cuda")
    assert not h.manager.has_device("mps")
    chat_a = spec("a")
    image = {name: spec(name, kind="image", device="cuda") for name in ["x", "y", "huge"]}

    with h.manager.acquire(chat_a) as a:
        pass
    with h.manager.acquire(image["x"]) as x:
        pass
    assert not a.closed, "a model on the GPU evicted a model on the CPU"
    assert set(h.resident()) == {label("a"), label("x", "image")}
    assert h.resident()[label("x", "image")].device == "cuda"
    devices = {d.name: d for d in h.manager.status().devices}
    assert (devices["cpu"].budget_bytes, devices["cpu"].resident_bytes) == (16 * GIB, 4 * GIB)
    assert (devices["cuda"].budget_bytes, devices["cuda"].resident_bytes) == (10 * GIB, 6 * GIB)
    assert h.manager.status().budget_bytes == 10 * GIB  # the budget of manager.device
    assert h.probe.used == 4 * GIB and h.cuda_probe.used == 6 * GIB

    with h.manager.acquire(image["y"]) as y:
        pass
    assert x.closed, "one_at_a_time: the second model on the GPU evicts the first"
    assert not a.closed, "only the models of the same device are evicted"
    assert set(h.resident()) == {label("a"), label("y", "image")}

    with pytest.raises(ModelTooLargeError) as caught, h.manager.acquire(image["huge"]):
        pass
    assert (caught.value.needed_bytes, caught.value.budget_bytes) == (12 * GIB, 10 * GIB)
    assert "cuda" in str(caught.value) and "gpu_memory_budget" in str(caught.value)
    assert not y.closed and not a.closed, "a refused model evicted something"
    assert h.loader.load_attempts["huge"] == 0

    # The same model fits the CPU's budget: it evicts the CPU's model only.
    with h.manager.acquire(spec("huge", kind="image", device="cpu")):
        pass
    assert a.closed and not y.closed
    assert set(h.resident()) == {label("huge", "image"), label("y", "image")}
    # "cuda:1" counts against the "cuda" budget.
    with h.manager.acquire(spec("x", kind="image", device="cuda:1")):
        pass
    assert y.closed
    assert h.probe.peak == 12 * GIB
    assert h.cuda_probe.peak == 6 * GIB
    assert_consistent(h)


def test_a_device_the_machine_does_not_have_is_refused() -> None:
    h = make()
    assert h.manager.device == "cpu"
    assert h.manager.status().device == "cpu"
    assert h.manager.status().budget_bytes == 24 * GIB
    assert not h.manager.has_device("cuda")
    with pytest.raises(AppError) as caught, h.manager.acquire(spec("a", device="cuda")):
        pass
    assert type(caught.value) is AppError
    assert "cuda" in str(caught.value) and "cpu" in str(caught.value)
    assert h.loader.estimate_calls["a"] == 0
    assert h.manager.status().resident == ()


def test_without_devices_the_manager_uses_the_cpu() -> None:
    manager = ModelManager()
    assert manager.device == "cpu"
    assert manager.has_device("cpu") and not manager.has_device("cuda")
    (device,) = manager.status().devices
    assert device.name == "cpu" and device.budget_bytes > 0


# ----------------------------------------------------------------------------
# Memory estimates happen outside the lock
# ----------------------------------------------------------------------------


def test_estimates_are_made_outside_the_lock_and_skipped_for_a_resident_model() -> None:
    h = make()
    lock_held: list[bool] = []
    h.loader.estimate_hook = lambda s: lock_held.append(h.manager._cond._is_owned())  # type: ignore[attr-defined]

    with h.manager.acquire(spec("a")):
        pass
    assert h.loader.estimate_calls == Counter({"a": 1})
    for _ in range(2):
        with h.manager.acquire(spec("a")):
            pass
    assert h.loader.estimate_calls == Counter({"a": 1}), "a request for a resident model estimated it"

    # A request queued for the resident A, which a request ahead of it evicts: the scheduler then
    # needs A's estimate, and its owner makes it, again outside the lock.
    holder, release = start_holding(h, spec("a"))
    y = Worker(use(h, spec("b"))).start()
    wait_queued(h, 1)
    w = Worker(use(h, spec("a"))).start()
    wait_queued(h, 2)
    assert h.loader.estimate_calls == Counter({"a": 1, "b": 1})
    release.set()
    for worker in (holder, y, w):
        worker.join()
        assert worker.error is None, worker.error
    assert h.loader.estimate_calls["a"] >= 2, "A was loaded again without an estimate"
    assert h.manager.status().load_counts == {label("a"): 2, label("b"): 1}
    assert lock_held and not any(lock_held), "an estimate was made while holding the manager's lock"
    assert_consistent(h)


# ----------------------------------------------------------------------------
# One model per request: a nested acquire is refused
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("inner", ["a", "b"], ids=["same-model", "other-model"])
def test_a_nested_acquire_is_refused_at_once_and_the_manager_stays_usable(inner: str) -> None:
    h = make(wait_timeout_s=30)

    def nested() -> BaseException | None:
        with h.manager.acquire(spec("a")):
            try:
                with h.manager.acquire(spec(inner)):
                    return None
            except AppError as error:
                return error

    worker = Worker(nested).start()
    worker.join(2.0)  # wait_timeout_s is 30 s: a refusal that came by timing out would fail this join
    assert worker.error is None, worker.error
    error = worker.result
    assert type(error) is AppError, error
    assert label(inner) in str(error) and label("a") in str(error)
    assert "one model at a time" in str(error)
    assert h.loader.load_attempts["b"] == 0
    # The refusal left nothing behind: A is idle, nothing waits, and B loads.
    assert not h.resident()[label("a")].in_use
    assert h.manager.status().waiting == 0
    with h.manager.acquire(spec("b")):
        pass
    with h.manager.acquire(spec("a")):
        pass
    assert_consistent(h)


def test_a_nested_borrow_gives_none() -> None:
    h = make(policy="vram_budget")
    for name in ["a", "b"]:
        with h.manager.acquire(spec(name)):
            pass
    with h.manager.acquire(spec("a")), h.manager.borrow_if_idle(spec("b")) as borrowed:
        assert borrowed is None
    with h.manager.borrow_if_idle(spec("b")) as borrowed:
        assert borrowed is h.loader.live[spec("b")]


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
            except AppError as error:
                return str(error)

        outcome = step(other_request)
        assert "was not free within" in outcome  # it waited, then gave up: not "one model at a time"
        reply.close()
        assert step(other_request) == "loaded"


# ----------------------------------------------------------------------------
# borrow_if_idle: use a model only if it is there
# ----------------------------------------------------------------------------


def test_borrow_if_idle_lends_a_resident_idle_model_without_loading() -> None:
    h = make()
    with h.manager.acquire(spec("a")) as loaded:
        pass
    with h.manager.borrow_if_idle(spec("a")) as borrowed:
        assert borrowed is loaded
        assert h.resident()[label("a")].in_use
    assert not h.resident()[label("a")].in_use
    assert h.loader.loads[spec("a")] == 1
    assert h.loader.estimate_calls["a"] == 1
    assert_consistent(h)


def test_borrow_if_idle_gives_none_for_a_model_not_loaded_and_loads_nothing() -> None:
    h = make()
    with h.manager.acquire(spec("a")) as a:
        pass
    with h.manager.borrow_if_idle(spec("b")) as borrowed:
        assert borrowed is None
    assert h.loader.load_attempts["b"] == 0
    assert h.loader.estimate_calls["b"] == 0
    assert not a.closed, "borrowing cost a swap"
    assert list(h.resident()) == [label("a")]
    assert h.manager.status().load_counts == {label("a"): 1}


def test_borrow_if_idle_gives_none_while_the_model_is_in_use() -> None:
    h = make()
    holder, release = start_holding(h, spec("a"))
    with h.manager.borrow_if_idle(spec("a")) as borrowed:
        assert borrowed is None
    release.set()
    holder.join()
    with h.manager.borrow_if_idle(spec("a")) as borrowed:
        assert borrowed is holder.result


def test_borrow_if_idle_gives_none_while_a_request_waits() -> None:
    h = make(policy="vram_budget")
    with h.manager.acquire(spec("c")) as c:
        pass
    holder, release = start_holding(h, spec("a"))
    waiter = Worker(use(h, spec("a"))).start()
    wait_queued(h, 1)
    with h.manager.borrow_if_idle(spec("c")) as borrowed:
        assert borrowed is None, "a borrow went ahead of a queued request"
    release.set()
    for worker in (holder, waiter):
        worker.join()
        assert worker.error is None, worker.error
    with h.manager.borrow_if_idle(spec("c")) as borrowed:
        assert borrowed is c


def test_an_acquire_waits_until_a_borrow_ends() -> None:
    h = make()
    with h.manager.acquire(spec("a")) as loaded:
        pass
    served = threading.Event()

    def use_a() -> FakeModel:
        with h.manager.acquire(spec("a")) as model:
            served.set()
            return model

    with h.manager.borrow_if_idle(spec("a")) as borrowed:
        assert borrowed is loaded
        waiter = Worker(use_a).start()
        assert not served.wait(0.2), "a borrowed model was handed to a second user"
        assert h.manager.status().waiting == 1
    waiter.join()
    assert waiter.error is None
    assert waiter.result is loaded
    assert h.loader.loads[spec("a")] == 1
    assert_consistent(h)


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
    assert "bad magic number" in message
    assert isinstance(caught.value.__cause__, ValueError)

    status = h.manager.status()
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
    assert h.manager.status().waiting == 0
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
    assert h.manager.status().waiting == 0


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
    assert "cpu_memory_budget" in str(error)
    assert not a.closed
    assert list(h.resident()) == [label("a")]
    assert h.loader.load_attempts["huge"] == 0
    assert h.manager.status().waiting == 0


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
    holder, release = start_holding(h, spec("a"))
    h.clock.advance(1)
    # A is the most recently used, but B is idle: B goes, A stays.
    with h.manager.acquire(spec("c")):
        assert not h.loader.live[spec("a")].closed
    release.set()
    holder.join()
    assert not holder.result.closed
    assert set(h.resident()) == {label("a"), label("c")}


def test_vram_budget_a_load_waits_for_a_busy_model_when_only_its_eviction_makes_room() -> None:
    sizes = {"a": 6 * GIB, "b": 6 * GIB}
    h = make(policy="vram_budget", budget_gib=10, sizes=sizes)
    holder, release = start_holding(h, spec("a"))
    b_served = threading.Event()

    def use_b() -> None:
        with h.manager.acquire(spec("b")):
            b_served.set()

    waiter = Worker(use_b).start()
    assert not b_served.wait(0.2), "B loaded beside the busy A over the budget"
    release.set()
    for worker in (holder, waiter):
        worker.join()
        assert worker.error is None, worker.error
    assert holder.result.closed
    assert h.loader.max_live_bytes <= 10 * GIB
    assert list(h.resident()) == [label("b")]


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


def test_unload_one_model_by_its_label() -> None:
    h = make(policy="vram_budget", budget_gib=24)
    models = {}
    for name in ["a", "b"]:
        with h.manager.acquire(spec(name)) as model:
            models[name] = model
    assert h.manager.unload(label("a")) is True
    assert models["a"].closed and not models["b"].closed
    assert list(h.resident()) == [label("b")]
    assert h.manager.unload(label("a")) is False  # no longer there
    holder, release = start_holding(h, spec("b"))
    assert h.manager.unload(label("b")) is False  # in use
    assert not models["b"].closed
    release.set()
    holder.join()
    assert h.manager.unload(label("b")) is True
    assert h.manager.status().resident == ()


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


def test_a_probe_that_fails_to_measure_during_an_unload_does_not_keep_the_model() -> None:
    h = make()
    with h.manager.acquire(spec("a")) as a:
        pass
    h.probe.fail_used = lambda: spec("a") in h.loader.live  # the driver fails while A's memory is held
    with h.manager.acquire(spec("b")) as b:  # evicts A
        assert a.closed, "A's close callback did not run"
    assert h.loader.closes[spec("a")] == 1
    assert list(h.resident()) == [label("b")]
    assert h.manager.status().load_counts == {label("a"): 1, label("b"): 1}

    h.probe.fail_used = lambda: True  # an explicit unload, with the probe failing throughout
    assert h.manager.unload(label("b")) is True
    assert b.closed
    assert h.manager.status().resident == ()
    h.probe.fail_used = None
    with h.manager.acquire(spec("a")):  # the next load proceeds
        pass
    assert_consistent(h)


def test_a_probe_that_fails_to_release_its_cache_does_not_keep_the_model() -> None:
    h = make()
    with h.manager.acquire(spec("a")) as a:
        pass
    h.probe.release_error = RuntimeError("cache release failed")
    with h.manager.acquire(spec("b")) as b:  # evicts A
        assert a.closed
    assert h.probe.release_calls >= 1
    assert list(h.resident()) == [label("b")]
    unloads = [t for t in h.manager.status().history if t.action == "unload"]
    assert [(t.label, t.bytes) for t in unloads] == [(label("a"), 4 * GIB)], "the unload was not recorded"
    assert h.manager.unload(label("b")) is True
    assert b.closed
    with h.manager.acquire(spec("c")):
        pass
    assert_consistent(h)


def test_a_victim_whose_close_raises_does_not_stop_the_other_victims_unloading() -> None:
    sizes = {"a": 4 * GIB, "b": 4 * GIB, "c": 8 * GIB}
    h = make(policy="vram_budget", budget_gib=10, sizes=sizes)
    models = {}
    for name in ["a", "b"]:
        h.clock.advance(1)
        with h.manager.acquire(spec(name)) as model:
            models[name] = model
    h.loader.close_errors["a"] = RuntimeError("driver hiccup")  # A, least recently used, is unloaded first
    h.clock.advance(1)
    with h.manager.acquire(spec("c")) as c:
        assert not c.closed
    assert models["b"].closed, "the second victim was not unloaded"
    assert not models["a"].closed  # its close failed, but the manager let go of it
    status = h.manager.status()
    assert [(m.label, m.state) for m in status.resident] == [(label("c"), "ready")]
    assert status.load_counts == {label("a"): 1, label("b"): 1, label("c"): 1}


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


def test_keep_alive_zero_hands_the_model_to_a_queued_request_instead_of_unloading_it() -> None:
    h = make(keep_alive_s=0)
    holder, release = start_holding(h, spec("a"))

    def use_a() -> tuple[FakeModel, bool]:
        with h.manager.acquire(spec("a")) as model:
            return model, model.closed

    waiter = Worker(use_a).start()
    wait_queued(h, 1)
    release.set()
    for worker in (holder, waiter):
        worker.join()
        assert worker.error is None, worker.error
    model, closed_while_used = waiter.result
    assert model is holder.result
    assert not closed_while_used, "the model was closed while the queued request used it"
    assert h.loader.loads[spec("a")] == 1, "the model was unloaded between its two users"
    assert holder.result.closed, "keep_alive_s 0 unloads once nobody uses or waits for the model"
    assert h.manager.status().resident == ()


def test_start_reaper_unloads_idle_models_in_the_background() -> None:
    h = make(keep_alive_s=5)
    with h.manager.acquire(spec("a")) as model:
        pass
    h.clock.advance(6)
    h.manager.start_reaper(interval_s=0.02)
    try:
        wait_until(lambda: model.closed, "the reaper unloaded A")
    finally:
        h.manager.close()
    assert h.manager.status().resident == ()


# ----------------------------------------------------------------------------
# Many threads
# ----------------------------------------------------------------------------


class UseTracker:
    """Counts the users of each model at once: more than one is a failure."""

    def __init__(self) -> None:
        self.users: Counter[LoadSpec] = Counter()
        self.problems: list[str] = []
        self.lock = threading.Lock()

    @contextlib.contextmanager
    def using(self, h: Harness, load_spec: LoadSpec, model: FakeModel) -> Iterator[None]:
        with self.lock:
            self.users[load_spec] += 1
            if self.users[load_spec] > 1:
                self.problems.append(f"{load_spec.label} had two users at once")
        if model.spec != load_spec:
            self.problems.append(f"asked for {load_spec.label}, got {model.spec.label}")
        if model.closed or h.loader.live.get(load_spec) is not model:
            self.problems.append(f"{load_spec.label} was not live when handed out")
        try:
            yield
        finally:
            if model.closed:
                self.problems.append(f"{load_spec.label} was closed while in use")
            with self.lock:
                self.users[load_spec] -= 1


def run_many(h: Harness, names: list[str], threads: int = 8, rounds: int = 6) -> tuple[int, list[str]]:
    served = 0
    served_lock = threading.Lock()
    tracker = UseTracker()

    def work(seed: int) -> None:
        nonlocal served
        rng = random.Random(seed)
        for _ in range(rounds):
            load_spec = spec(rng.choice(names))
            with h.manager.acquire(load_spec) as model, tracker.using(h, load_spec, model):
                time.sleep(rng.uniform(0, 0.003))
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
    return served, tracker.problems


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


@pytest.mark.parametrize("policy", ["one_at_a_time", "vram_budget"])
def test_stress_two_devices_with_random_cancels(policy: str) -> None:
    """8 threads ask for random models on two devices; some requests are cancelled before they ask,
    some at a random moment while they wait or load. Afterwards nothing is stuck."""
    sizes = {"a": 3 * GIB, "b": 4 * GIB, "c": 6 * GIB, "x": 3 * GIB, "y": 4 * GIB, "z": 7 * GIB}
    h = make(policy, budget_gib=10, cuda_budget_gib=10, sizes=sizes, wait_timeout_s=60, load_delay_s=0.002)
    assert h.cuda_probe is not None
    specs = [spec(n) for n in "abc"] + [spec(n, kind="image", device="cuda") for n in "xyz"]
    tracker = UseTracker()
    counts: Counter[str] = Counter()
    counts_lock = threading.Lock()
    rounds = 10

    def work(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(rounds):
            load_spec = rng.choice(specs)
            cancel = threading.Event()
            timer: threading.Timer | None = None
            roll = rng.random()
            if roll < 0.1:
                cancel.set()
            elif roll < 0.4:
                timer = threading.Timer(rng.uniform(0, 0.01), cancel.set)
                timer.start()
            try:
                with h.manager.acquire(load_spec, cancel=cancel) as model, tracker.using(h, load_spec, model):
                    time.sleep(rng.uniform(0, 0.003))
                outcome = "served"
            except RequestCancelledError:
                if not cancel.is_set():
                    tracker.problems.append("RequestCancelledError without a cancel")
                outcome = "cancelled-before" if roll < 0.1 else "cancelled"
            finally:
                if timer is not None:
                    timer.cancel()
                    timer.join(JOIN_S)
            with counts_lock:
                counts[outcome] += 1

    workers = [Worker(lambda seed=seed: work(seed)).start() for seed in range(8)]
    for worker in workers:
        worker.join(60.0)
    assert [repr(w.error) for w in workers if w.error is not None] == []
    assert tracker.problems == []
    assert h.loader.violations == [], "two loads at once, or a model loaded twice"
    assert h.loader.max_loading == 1
    assert sum(counts.values()) == 8 * rounds
    assert counts["served"] > 0 and counts["cancelled-before"] > 0

    status = h.manager.status()
    assert status.waiting == 0
    assert [(m.label, m.state, m.in_use) for m in status.resident if m.state != "ready" or m.in_use] == []
    assert_consistent(h)
    assert h.probe.peak <= 10 * GIB and h.cuda_probe.peak <= 10 * GIB, "a device's budget was exceeded"
    assert max(h.loader.max_live_bytes_by_device.values()) <= 10 * GIB
    if policy == "one_at_a_time":
        assert h.loader.max_live_by_device == Counter({"cpu": 1, "cuda": 1})
    loads = sum(t.action == "load" for t in status.history)
    unloads = sum(t.action == "unload" for t in status.history)
    assert loads == sum(status.load_counts.values()) == sum(h.loader.loads.values())
    assert loads - unloads == len(status.resident)


# -- the compute thread ----------------------------------------------------------------------------------


def test_a_compute_thread_streams_items_in_order_and_passes_errors_on() -> None:
    from model_manager import ComputeThread

    compute = ComputeThread("test")
    caller = threading.current_thread().name
    seen: list[str] = []

    def numbers() -> Iterator[int]:
        for number in range(50):
            seen.append(threading.current_thread().name)
            yield number

    assert list(compute.stream(numbers)) == list(range(50))
    assert set(seen) != {caller} and len(set(seen)) == 1, "produced on the compute thread"

    def failing() -> Iterator[int]:
        yield 1
        raise ValueError("broken model")

    with pytest.raises(ValueError, match="broken model"):
        list(compute.stream(failing))
    # Work submitted from the compute thread itself runs at once instead of waiting for itself.
    assert compute.call(lambda: compute.call(lambda: 7)) == 7
    compute.close()


def test_leaving_a_compute_stream_early_stops_the_producer_before_returning() -> None:
    from model_manager import ComputeThread

    compute = ComputeThread("test")
    produced: list[int] = []
    closed = threading.Event()

    def endless() -> Iterator[int]:
        try:
            number = 0
            while True:
                produced.append(number)
                yield number
                number += 1
                time.sleep(0.001)
        finally:
            closed.set()

    items = compute.stream(endless)
    assert [next(items) for _ in range(3)] == [0, 1, 2]
    items.close()  # the consumer leaves (a client disconnected, a stop string)
    assert closed.is_set(), "the producer was closed before the consumer went on (the model is given back after)"
    count = len(produced)
    time.sleep(0.05)
    assert len(produced) == count, "nothing more was produced"
    compute.close()


def test_models_whose_loader_asks_for_it_load_on_their_compute_thread() -> None:
    threads: dict[str, str] = {}

    def load(spec: LoadSpec) -> LoadedModel:
        threads[spec.kind] = threading.current_thread().name
        return LoadedModel(model=object(), reported_bytes=1)

    manager = ModelManager(keep_alive_s=-1)
    manager.register_loader("torch", Loader(load=load, estimate_bytes=lambda spec: 1, on_compute_thread=True))
    manager.register_loader("plain", Loader(load=load, estimate_bytes=lambda spec: 1))
    torch_spec, plain_spec = LoadSpec.of("torch", "/a", device="cpu"), LoadSpec.of("plain", "/b", device="cpu")
    with manager.acquire(torch_spec):
        pass
    with manager.acquire(plain_spec):
        pass
    compute = manager.compute_thread(torch_spec).call(lambda: threading.current_thread().name)
    assert threads == {"torch": compute, "plain": threading.current_thread().name}
    assert manager.compute_thread(plain_spec) is manager.compute_thread(torch_spec), "one thread for the CPU"
    gpu = LoadSpec.of("torch", "/a", device="cuda")
    assert manager.compute_thread(gpu) is not manager.compute_thread(LoadSpec.of("plain", "/b", device="cuda"))
    manager.close()
