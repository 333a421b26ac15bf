"""The model manager: the only code that puts model weights in memory.

Services register a loader per kind of model ("chat", "vision", ...). A caller
borrows a model with ``with manager.acquire(spec) as model:``; the manager
loads it on demand, counts references so a model in use is never evicted,
evicts others first according to the policy, unloads idle models after the
keep-alive, and measures every load and unload.

One condition variable guards all state. Loading and unloading happen outside
it, one transition at a time, so a request for a model that is already
resident is served while another model loads.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal, Protocol

from errors import AppError, BusyError, ModelLoadError, ModelTooLargeError, OutOfMemoryError

log = logging.getLogger(__name__)

Policy = Literal["one_at_a_time", "vram_budget"]
GIB = 1024**3


# ----------------------------------------------------------------------------
# What a service hands the manager
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadSpec:
    """Everything that changes the weights in memory: same spec, same model."""

    kind: str
    path: str
    options: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def of(cls, kind: str, path: str | Path, **options: Any) -> LoadSpec:
        return cls(kind, str(path), tuple(sorted(options.items())))

    def option(self, name: str, default: Any = None) -> Any:
        return dict(self.options).get(name, default)

    @property
    def label(self) -> str:
        return f"{self.kind}:{Path(self.path).name}"


@dataclass
class LoadedModel:
    """What a loader returns: the model, its own size report, an optional closer."""

    model: Any
    reported_bytes: int = 0
    close: Callable[[], None] | None = None


@dataclass(frozen=True)
class Loader:
    load: Callable[[LoadSpec], LoadedModel]
    # Bytes the model will need once loaded; raises ModelMissingError for absent files.
    estimate_bytes: Callable[[LoadSpec], int]


@dataclass(frozen=True)
class CatalogEntry:
    """A model a service can serve, for listings: its name, what it does, where its files are."""

    name: str
    capability: str  # "chat", "vision", "image", "speech"
    path: str
    present: bool


# ----------------------------------------------------------------------------
# Memory measurement
# ----------------------------------------------------------------------------


class MemoryProbe(Protocol):
    device: str

    def used_bytes(self) -> int: ...

    def release_cache(self) -> None: ...


class CpuMemoryProbe:
    """Resident memory of this process; models live in RAM."""

    device = "cpu"

    def used_bytes(self) -> int:
        import psutil

        return int(psutil.Process().memory_info().rss)

    def release_cache(self) -> None:
        # glibc keeps freed memory in its arenas; hand it back so RSS shows the unload.
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)


class CudaMemoryProbe:
    """Memory in use on the GPU as the driver reports it (llama.cpp's too, not only torch's)."""

    device = "cuda"

    def __init__(self, torch_module: Any) -> None:
        self._torch = torch_module

    def used_bytes(self) -> int:
        free, total = self._torch.cuda.mem_get_info()
        return int(total - free)

    def release_cache(self) -> None:
        self._torch.cuda.empty_cache()


def detect_memory_probe() -> MemoryProbe:
    """The GPU probe when torch sees CUDA, else the CPU probe."""
    try:
        import torch
    except ImportError:
        return CpuMemoryProbe()
    if torch.cuda.is_available():
        return CudaMemoryProbe(torch)
    return CpuMemoryProbe()


# ----------------------------------------------------------------------------
# The eviction decision, as a pure function
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ResidentInfo:
    key: Hashable
    size_bytes: int
    last_used: float
    in_use: bool
    held_by_caller: bool = False  # the requester itself holds it: waiting for it would never end


@dataclass(frozen=True)
class EvictionPlan:
    evict: tuple[Hashable, ...] = ()  # unload these now, in this order
    wait_for: tuple[Hashable, ...] = ()  # in use: wait until they are idle, then plan again
    refuse_reason: str | None = None  # cannot ever fit


def plan_eviction(
    needed_bytes: int, resident: Sequence[ResidentInfo], policy: Policy, budget_bytes: int
) -> EvictionPlan:
    """Decide what must go before a model of ``needed_bytes`` can load.

    Models in use are never evicted: the plan names those to wait for instead,
    the fewest, least recently used first, and the caller's own only as a last resort.
    """
    if needed_bytes > budget_bytes:
        return EvictionPlan(
            refuse_reason=(
                f"needs about {needed_bytes / GIB:.1f} GiB but the memory budget is {budget_bytes / GIB:.1f} GiB"
            )
        )
    least_recent_first = sorted(resident, key=lambda r: r.last_used)
    idle = [r for r in least_recent_first if not r.in_use]
    busy = [r for r in least_recent_first if r.in_use and not r.held_by_caller]
    busy += [r for r in least_recent_first if r.held_by_caller]
    if policy == "one_at_a_time":
        if busy:
            return EvictionPlan(wait_for=tuple(r.key for r in busy))
        return EvictionPlan(evict=tuple(r.key for r in idle))
    total = needed_bytes + sum(r.size_bytes for r in resident)
    evict: list[Hashable] = []
    for candidate in idle:
        if total <= budget_bytes:
            break
        evict.append(candidate.key)
        total -= candidate.size_bytes
    if total <= budget_bytes:
        return EvictionPlan(evict=tuple(evict))
    wait_for: list[Hashable] = []
    for candidate in busy:
        if total <= budget_bytes:
            break
        wait_for.append(candidate.key)
        total -= candidate.size_bytes
    return EvictionPlan(wait_for=tuple(wait_for))


# ----------------------------------------------------------------------------
# Status snapshots for the front ends
# ----------------------------------------------------------------------------


class ModelState(StrEnum):
    LOADING = "loading"
    READY = "ready"
    UNLOADING = "unloading"


@dataclass(frozen=True)
class TransitionRecord:
    action: Literal["load", "unload"]
    label: str
    seconds: float
    bytes: int  # measured memory taken (load) or given back (unload)
    at: float  # wall-clock time.time()


@dataclass(frozen=True)
class ResidentModel:
    label: str
    kind: str
    path: str
    state: str
    refs: int
    size_bytes: int
    measured_bytes: int
    reported_bytes: int
    load_seconds: float
    idle_seconds: float


@dataclass(frozen=True)
class ManagerStatus:
    device: str
    policy: str
    budget_bytes: int
    resident: tuple[ResidentModel, ...]
    history: tuple[TransitionRecord, ...]
    load_counts: dict[str, int]


@dataclass(eq=False)
class _Entry:
    spec: LoadSpec
    state: ModelState
    size_bytes: int
    last_used: float
    model: Any = None
    close: Callable[[], None] | None = None
    refs: int = 0
    drain_waiters: int = 0  # loads waiting for this model to go idle; new users wait too
    measured_bytes: int = 0
    reported_bytes: int = 0
    load_seconds: float = 0.0
    memory_before_load: int = 0


# ----------------------------------------------------------------------------
# The manager
# ----------------------------------------------------------------------------


class ModelManager:
    def __init__(
        self,
        *,
        policy: Policy = "one_at_a_time",
        budget_bytes: int = 24 * GIB,
        keep_alive_s: float = 300.0,
        wait_timeout_s: float = 600.0,
        probe: MemoryProbe | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.policy: Policy = policy
        self.budget_bytes = budget_bytes
        self.keep_alive_s = keep_alive_s
        self.wait_timeout_s = wait_timeout_s
        self._probe = probe or CpuMemoryProbe()
        self._clock = clock
        self._loaders: dict[str, Loader] = {}
        self._entries: dict[LoadSpec, _Entry] = {}
        self._cond = threading.Condition()
        self._transition_in_progress = False
        # What the current request holds, to refuse an acquire that would wait on itself. A
        # context variable, not a thread-local: web servers resume one streaming request on
        # different pool threads, and each request runs in its own copied context.
        self._held: ContextVar[dict[LoadSpec, int] | None] = ContextVar(f"models-held-{id(self)}", default=None)
        self._history: deque[TransitionRecord] = deque(maxlen=100)
        self._load_counts: dict[str, int] = {}
        self._reaper_stop = threading.Event()
        self._reaper: threading.Thread | None = None

    @property
    def device(self) -> str:
        return self._probe.device

    def register_loader(self, kind: str, loader: Loader) -> None:
        with self._cond:
            self._loaders[kind] = loader

    # -- borrowing ---------------------------------------------------------

    @contextlib.contextmanager
    def exclusive(self, lock: threading.Lock, spec: LoadSpec) -> Iterator[None]:
        """Hold a loaded model's own lock (one generation at a time), waiting at most wait_timeout_s."""
        if not lock.acquire(timeout=self.wait_timeout_s):
            raise BusyError(
                f"{spec.label} stayed busy with other requests for {self.wait_timeout_s:.0f} s; try again shortly"
            )
        try:
            yield
        finally:
            lock.release()

    @contextlib.contextmanager
    def acquire(self, spec: LoadSpec) -> Iterator[Any]:
        """Borrow the model for ``spec``, loading it (and evicting others) if needed."""
        entry = self._check_out(spec)
        held = self._held.get()
        if held is None:
            held = {}
            self._held.set(held)
        held[spec] = held.get(spec, 0) + 1
        try:
            yield entry.model
        finally:
            held[spec] -= 1
            if not held[spec]:
                del held[spec]
            self._check_in(entry)

    def _held_now(self) -> dict[LoadSpec, int]:
        return self._held.get() or {}

    def _check_out(self, spec: LoadSpec) -> _Entry:
        if spec.kind not in self._loaders:
            raise AppError(f"no loader is registered for models of kind '{spec.kind}'")
        deadline = time.monotonic() + self.wait_timeout_s
        draining: list[_Entry] = []
        with self._cond:
            try:
                while True:
                    entry = self._entries.get(spec)
                    if entry is not None and entry.state is ModelState.READY:
                        # A model others wait to see idle takes no new users, except from a
                        # thread that already holds a model: making it wait could deadlock.
                        if entry.drain_waiters == 0 or self._held_now():
                            entry.refs += 1
                            entry.last_used = self._clock()
                            return entry
                    elif entry is None and not self._transition_in_progress:
                        needed, plan = self._plan_for(spec)
                        self._drain(draining, [self._entries[key] for key in plan.wait_for])
                        if not plan.wait_for:
                            victims = [self._entries[key] for key in plan.evict]
                            loading = self._begin_transition(spec, needed, victims)
                            break
                        self._refuse_self_deadlock(spec, plan.wait_for)
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise BusyError(
                            f"{spec.label} could not be loaded within {self.wait_timeout_s:.0f} s: "
                            "other models stayed in use. Try again shortly."
                        )
                    self._cond.wait(remaining)
            finally:
                self._drain(draining, [])
        return self._finish_transition(loading, victims)

    def _drain(self, draining: list[_Entry], blockers: list[_Entry]) -> None:
        """Under the lock: make ``blockers`` the models this request waits to see idle."""
        if draining == blockers:
            return
        for entry in draining:
            entry.drain_waiters -= 1
        for entry in blockers:
            entry.drain_waiters += 1
        draining[:] = blockers
        self._cond.notify_all()

    def _plan_for(self, spec: LoadSpec) -> tuple[int, EvictionPlan]:
        needed = self._loaders[spec.kind].estimate_bytes(spec)
        resident = [
            ResidentInfo(e.spec, e.size_bytes, e.last_used, e.refs > 0, e.spec in self._held_now())
            for e in self._entries.values()
            if e.state is ModelState.READY
        ]
        plan = plan_eviction(needed, resident, self.policy, self.budget_bytes)
        if plan.refuse_reason:
            raise ModelTooLargeError(
                f"{spec.label} cannot be loaded: it {plan.refuse_reason}. "
                "Choose a smaller quantisation or raise manager.gpu_memory_budget_gb.",
                needed_bytes=needed,
                budget_bytes=self.budget_bytes,
            )
        return needed, plan

    def _refuse_self_deadlock(self, spec: LoadSpec, blockers: Sequence[Hashable]) -> None:
        mine = [key for key in blockers if key in self._held_now()]
        if mine:
            raise BusyError(
                f"{spec.label} cannot load while this request still holds "
                f"{', '.join(k.label for k in mine)}; release it first"  # type: ignore[attr-defined]
            )

    def _begin_transition(self, spec: LoadSpec, needed: int, victims: list[_Entry]) -> _Entry:
        """Under the lock: claim the one transition slot and mark what changes."""
        self._transition_in_progress = True
        for victim in victims:
            victim.state = ModelState.UNLOADING
        loading = _Entry(spec=spec, state=ModelState.LOADING, size_bytes=needed, last_used=self._clock())
        self._entries[spec] = loading
        return loading

    def _finish_transition(self, loading: _Entry, victims: list[_Entry]) -> _Entry:
        """Outside the lock: unload the victims, then load the new model."""
        try:
            for victim in victims:
                self._unload(victim)
            self._load(loading)
        except BaseException:
            with self._cond:
                self._entries.pop(loading.spec, None)
                self._transition_in_progress = False
                self._cond.notify_all()
            raise
        with self._cond:
            loading.state = ModelState.READY
            loading.refs = 1
            loading.last_used = self._clock()
            self._transition_in_progress = False
            self._cond.notify_all()
        return loading

    def _check_in(self, entry: _Entry) -> None:
        with self._cond:
            entry.refs -= 1
            entry.last_used = self._clock()
            self._cond.notify_all()
        if self.keep_alive_s == 0:
            self.unload_idle()

    # -- loading and unloading -------------------------------------------

    def _load(self, entry: _Entry) -> None:
        spec = entry.spec
        before = self._probe.used_bytes()
        started = time.perf_counter()
        try:
            loaded = self._loaders[spec.kind].load(spec)
        except AppError:
            self._collect()
            raise
        except Exception as error:
            self._collect()
            if _is_out_of_memory(error):
                raise OutOfMemoryError(
                    f"{spec.label} ran out of {self.device} memory while loading; "
                    "unload other models, pick a smaller quantisation or lower the GPU layers"
                ) from error
            raise ModelLoadError(f"{spec.label} failed to load from {spec.path}: {error}") from error
        seconds = time.perf_counter() - started
        measured = max(0, self._probe.used_bytes() - before)
        entry.model = loaded.model
        entry.close = loaded.close
        entry.memory_before_load = before
        entry.measured_bytes = measured
        entry.reported_bytes = loaded.reported_bytes
        entry.size_bytes = max(measured, loaded.reported_bytes)
        entry.load_seconds = seconds
        self._record("load", spec.label, seconds, measured)
        with self._cond:
            self._load_counts[spec.label] = self._load_counts.get(spec.label, 0) + 1
        log.info(
            "loaded %s in %.2f s on %s: %.0f MiB measured, %.0f MiB reported",
            spec.label,
            seconds,
            self.device,
            measured / 2**20,
            loaded.reported_bytes / 2**20,
        )

    def _unload(self, entry: _Entry) -> None:
        """Drop every reference the manager holds, release caches, check memory came back."""
        try:
            self._release_memory(entry)
        finally:
            with self._cond:
                self._entries.pop(entry.spec, None)
                self._cond.notify_all()

    def _release_memory(self, entry: _Entry) -> None:
        spec = entry.spec
        before = self._probe.used_bytes()
        started = time.perf_counter()
        tracker = _weak_reference(entry.model)
        try:
            if entry.close is not None:
                entry.close()
        except Exception:
            log.exception("closing %s raised; dropping it anyway", spec.label)
        entry.model = None
        entry.close = None
        self._collect()
        freed = self._wait_for_memory_back(before, entry.measured_bytes)
        seconds = time.perf_counter() - started
        if tracker is not None and tracker() is not None:
            log.warning("%s is still referenced after unloading: its memory may not be freed", spec.label)
        elif entry.measured_bytes and freed < 0.5 * entry.measured_bytes:
            log.info(
                "%s: %.0f MiB came back of %.0f MiB measured at load",
                spec.label,
                freed / 2**20,
                entry.measured_bytes / 2**20,
            )
        self._record("unload", spec.label, seconds, freed)
        log.info("unloaded %s in %.2f s, %.0f MiB freed", spec.label, seconds, freed / 2**20)

    def _wait_for_memory_back(self, before: int, expected: int) -> int:
        """On a GPU the driver frees memory asynchronously: poll briefly before the next load."""
        freed = before - self._probe.used_bytes()
        if self.device != "cuda":
            return max(0, freed)
        deadline = time.monotonic() + 2.0
        while freed < 0.9 * expected and time.monotonic() < deadline:
            time.sleep(0.05)
            freed = before - self._probe.used_bytes()
        return max(0, freed)

    def _collect(self) -> None:
        gc.collect()
        self._probe.release_cache()

    def _record(self, action: Literal["load", "unload"], label: str, seconds: float, size: int) -> None:
        with self._cond:
            self._history.append(TransitionRecord(action, label, seconds, size, time.time()))

    # -- keep-alive and shutdown -----------------------------------------

    def unload_idle(self) -> list[str]:
        """Unload idle models past their keep-alive. Returns their labels."""
        if self.keep_alive_s < 0:
            return []
        return self._unload_idle_for(self.keep_alive_s, wait_for_transition=False)

    def unload_all(self) -> list[str]:
        """Unload every idle model now (models in use stay). Returns their labels."""
        return self._unload_idle_for(0.0, wait_for_transition=True)

    def _unload_idle_for(self, min_idle_s: float, *, wait_for_transition: bool) -> list[str]:
        with self._cond:
            if wait_for_transition:
                self._cond.wait_for(lambda: not self._transition_in_progress, timeout=self.wait_timeout_s)
            if self._transition_in_progress:
                return []
            now = self._clock()
            victims = [
                e
                for e in self._entries.values()
                if e.state is ModelState.READY
                and e.refs == 0
                and e.drain_waiters == 0
                and now - e.last_used >= min_idle_s
            ]
            if not victims:
                return []
            self._transition_in_progress = True
            for victim in victims:
                victim.state = ModelState.UNLOADING
        try:
            for victim in victims:
                self._unload(victim)
        finally:
            with self._cond:
                self._transition_in_progress = False
                self._cond.notify_all()
        return [v.spec.label for v in victims]

    def start_reaper(self, interval_s: float = 5.0) -> None:
        """Unload idle models in a background thread every ``interval_s`` seconds."""
        if self._reaper is not None or self.keep_alive_s < 0:
            return

        def run() -> None:
            while not self._reaper_stop.wait(interval_s):
                try:
                    self.unload_idle()
                except Exception:
                    log.exception("keep-alive unload failed")

        self._reaper = threading.Thread(target=run, name="model-keep-alive", daemon=True)
        self._reaper.start()

    def close(self) -> None:
        self._reaper_stop.set()
        if self._reaper is not None:
            self._reaper.join(timeout=5)
        self.unload_all()

    # -- status ------------------------------------------------------------

    def status(self) -> ManagerStatus:
        with self._cond:
            now = self._clock()
            resident = tuple(
                ResidentModel(
                    label=e.spec.label,
                    kind=e.spec.kind,
                    path=e.spec.path,
                    state=e.state.value,
                    refs=e.refs,
                    size_bytes=e.size_bytes,
                    measured_bytes=e.measured_bytes,
                    reported_bytes=e.reported_bytes,
                    load_seconds=e.load_seconds,
                    idle_seconds=0.0 if e.refs else max(0.0, now - e.last_used),
                )
                for e in self._entries.values()
            )
            return ManagerStatus(
                device=self.device,
                policy=self.policy,
                budget_bytes=self.budget_bytes,
                resident=resident,
                history=tuple(self._history),
                load_counts=dict(self._load_counts),
            )


def _is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, MemoryError) or "out of memory" in str(error).lower()


def _weak_reference(model: Any) -> weakref.ref[Any] | None:
    try:
        return weakref.ref(model)
    except TypeError:
        return None
