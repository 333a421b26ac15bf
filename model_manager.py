"""The model manager: the only code that puts model weights in memory.

Services register a loader per kind of model ("chat", "vision", ...). A request
borrows a model with ``with manager.acquire(spec, cancel=...) as model:``; the
manager loads it on demand, evicts others first according to the policy, unloads
idle models after the keep-alive, and measures every load and unload.

How requests are served:
- One request uses a model at a time (llama.cpp contexts, ``generate`` and diffusers
  pipelines are not re-entrant); others wait in one first-come, first-served queue.
  A request behind the queue's head is served early only when that takes nothing
  the requests ahead of it wait for.
- The queue is bounded (``max_queue``): a full queue is refused at once as busy.
  Each request has one deadline (``wait_timeout_s``) for its whole wait.
- A request whose cancel signal is set (Stop pressed, client gone) leaves the queue
  at once and never triggers a load; after it gets its model it checks again.
- Each device (``cpu``, ``cuda``) has its own memory budget: a model's device is part
  of its load spec, so a chat model on the CPU never evicts a model on the GPU.
- Memory estimates (file I/O) are made before taking the lock.
- Loading and unloading happen outside the lock, one transition at a time; every path
  out of the LOADING and UNLOADING states is in a ``finally``.
- Auxiliary uses of a model (classifying a message, rewriting a prompt) go through
  ``borrow_if_idle``: the model is lent only if it is resident and nobody waits,
  so such a use never costs a swap.
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
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from contextvars import ContextVar
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal, Protocol

from errors import AppError, BusyError, ModelLoadError, ModelTooLargeError, OutOfMemoryError, RequestCancelledError
from model_memory.warm_tier import ParkedModel, WarmTier

log = logging.getLogger(__name__)

Policy = Literal["one_at_a_time", "vram_budget"]
GIB = 1024**3
CANCEL_POLL_S = 0.05  # how often a waiting request looks at its cancel signal


# ----------------------------------------------------------------------------
# What a service hands the manager
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadSpec:
    """Everything that changes the weights in memory: same spec, same model."""

    kind: str
    path: str
    device: str = "cpu"  # "cpu" or "cuda" (or "cuda:1"): whose memory budget the model counts against
    options: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def of(cls, kind: str, path: str | Path, *, device: str = "cpu", **options: Any) -> LoadSpec:
        return cls(kind, str(path), device, tuple(sorted(options.items())))

    def option(self, name: str, default: Any = None) -> Any:
        return dict(self.options).get(name, default)

    @property
    def label(self) -> str:
        return f"{self.kind}:{Path(self.path).name}"

    @property
    def budget_device(self) -> str:
        """The budget this model counts against: "cuda:1" counts as "cuda"."""
        return self.device.split(":", 1)[0]


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
    # Models whose work runs on a compute thread (PyTorch, llama.cpp: OpenMP) load there too.
    on_compute_thread: bool = False
    # The warm tier: ``park`` moves an evicted model into CPU RAM and returns it (None: this one cannot
    # be moved, e.g. a bitsandbytes-quantised model; it is unloaded); ``unpark`` moves it back onto
    # the spec's device and returns it. Both None: the kind is always unloaded.
    park: Callable[[Any, LoadSpec], Any] | None = None
    unpark: Callable[[Any, LoadSpec], Any] | None = None


class ComputeThread:
    """One long-lived thread that runs model work: loads, preprocessing, forward passes, decoding.

    PyTorch and llama.cpp run their CPU threads as OpenMP teams (one process-wide libgomp), one team
    per calling thread, kept for the thread's life. Once the teams together have more threads than
    there are cores, libgomp stops spinning at its barriers and every parallel step pays for waking
    threads: measured on two cores, LLaVA decoding ran 2-3 times slower and llama.cpp chat 3.6 times
    slower (80 to 22 tokens/s) after a second thread had used torch. Running the work of all models
    on one thread keeps one team. The model manager lends a model to one request at a time, so little
    is lost by queueing here; work submitted from this thread itself runs at once.
    """

    def __init__(self, name: str) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self._ident: int | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=name, initializer=self._remember_thread)

    def _remember_thread(self) -> None:
        self._ident = threading.get_ident()

    def submit(self, work: Callable[[], Any]) -> Future[Any]:
        if threading.get_ident() == self._ident:  # already here: waiting for ourselves would never end
            done: Future[Any] = Future()
            try:
                done.set_result(work())
            except BaseException as error:
                done.set_exception(error)
            return done
        return self._executor.submit(work)

    def call(self, work: Callable[[], Any]) -> Any:
        """Run ``work`` on this thread and return its result (or raise its error)."""
        return self.submit(work).result()

    # After the first item the reader is woken for every few items or after a moment, whichever comes
    # first: each wake-up takes a core from the model's OpenMP threads (measured: 10-20 % of a small
    # model's speed on two cores when woken for every token), and ten updates a second read smoothly.
    BATCH_ITEMS = 8
    BATCH_SECONDS = 0.1

    def stream(self, make: Callable[[], Iterator[Any]]) -> Iterator[Any]:
        """The items of the iterator ``make()`` returns, produced on this thread and handed over as
        they come (the first at once, then in small batches). Leaving early stops the producer after
        its current item, and waits for it: the model it uses is only given back once it is done."""
        if threading.get_ident() == self._ident:
            yield from make()
            return
        items: deque[Any] = deque()
        changed = threading.Condition()
        state: dict[str, Any] = {"done": False, "leaving": False, "error": None, "wanted": 1}

        def produce() -> None:
            try:
                iterator = make()
                try:
                    for item in iterator:
                        with changed:
                            items.append(item)
                            if len(items) >= state["wanted"]:
                                changed.notify()
                            if state["leaving"]:
                                break
                finally:
                    close = getattr(iterator, "close", None)
                    if close is not None:
                        close()
            except BaseException as error:
                state["error"] = error
            finally:
                with changed:
                    state["done"] = True
                    changed.notify()

        producing = self.submit(produce)
        first = True
        try:
            while True:
                with changed:
                    if not first and len(items) < self.BATCH_ITEMS and not state["done"]:
                        state["wanted"] = self.BATCH_ITEMS
                        changed.wait(self.BATCH_SECONDS)
                    state["wanted"] = 1  # slow items: each one as soon as it comes
                    while not items and not state["done"]:
                        changed.wait()
                    batch = list(items)
                    items.clear()
                    done = state["done"]
                first = False
                yield from batch
                if done:
                    break
        finally:
            with changed:
                state["leaving"] = True
            if not producing.cancel():  # not started: it never will; else let it finish
                producing.result()
        if state["error"] is not None:
            raise state["error"]

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


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


@dataclass(frozen=True)
class DeviceBudget:
    """One device's memory: how to measure it, and how much the models may use."""

    probe: MemoryProbe
    budget_bytes: int


def total_ram_bytes() -> int:
    import psutil

    return int(psutil.virtual_memory().total)


def available_ram_bytes() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


def warm_tier_budget(setting: float | str, devices: Mapping[str, DeviceBudget]) -> int:
    """The warm tier's RAM budget in bytes. "auto": 40 % of RAM when there is a GPU to park models
    from, else 0: on a CPU-only machine the models already live in RAM, and parking one would only
    keep what the CPU budget (``one_at_a_time``) meant to free."""
    if setting == "auto":
        return int(0.4 * total_ram_bytes()) if any(name != "cpu" for name in devices) else 0
    return int(float(setting) * GIB)


def detect_devices(gpu_budget_bytes: int, cpu_budget_bytes: int | None = None) -> dict[str, DeviceBudget]:
    """The CPU always; the GPU too when torch sees CUDA. ``cpu_budget_bytes`` None: 80 % of RAM."""
    cpu = cpu_budget_bytes if cpu_budget_bytes is not None else int(0.8 * total_ram_bytes())
    devices = {"cpu": DeviceBudget(CpuMemoryProbe(), cpu)}
    try:
        import torch
    except ImportError:
        return devices
    if torch.cuda.is_available():
        devices["cuda"] = DeviceBudget(CudaMemoryProbe(torch), gpu_budget_bytes)
    return devices


# ----------------------------------------------------------------------------
# The eviction decision, as a pure function
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ResidentInfo:
    key: Hashable
    size_bytes: int
    last_used: float
    in_use: bool  # serving a request, or wanted by a request ahead in the queue


@dataclass(frozen=True)
class EvictionPlan:
    evict: tuple[Hashable, ...] = ()  # unload these now, in this order
    wait_for: tuple[Hashable, ...] = ()  # in use: wait until they are idle, then plan again
    refuse_reason: str | None = None  # cannot ever fit


def plan_eviction(
    needed_bytes: int, resident: Sequence[ResidentInfo], policy: Policy, budget_bytes: int
) -> EvictionPlan:
    """Decide what must go before a model of ``needed_bytes`` can load on one device.

    ``resident`` holds the models on that device only. Models in use are never evicted:
    the plan names those to wait for instead, the fewest, least recently used first.
    """
    if needed_bytes > budget_bytes:
        return EvictionPlan(
            refuse_reason=(
                f"needs about {needed_bytes / GIB:.1f} GiB but the memory budget is {budget_bytes / GIB:.1f} GiB"
            )
        )
    least_recent_first = sorted(resident, key=lambda r: r.last_used)
    idle = [r for r in least_recent_first if not r.in_use]
    busy = [r for r in least_recent_first if r.in_use]
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


Action = Literal["load", "unload", "park", "unpark"]


@dataclass(frozen=True)
class TransitionRecord:
    action: Action  # park: evicted into the warm tier; unpark: loaded back from it
    label: str
    seconds: float
    bytes: int  # measured device memory taken (load, unpark) or given back (unload, park)
    at: float  # wall-clock time.time()


@dataclass(frozen=True)
class ResidentModel:
    label: str
    kind: str
    name: str  # the file or folder name, never a full path: status goes to clients
    device: str
    state: str
    in_use: bool
    size_bytes: int
    measured_bytes: int
    reported_bytes: int
    load_seconds: float
    idle_seconds: float


@dataclass(frozen=True)
class ParkedStatus:
    """A model in the warm tier: off its device, in CPU RAM, ready to be copied back."""

    label: str
    kind: str
    name: str
    device: str  # where it goes back to
    size_bytes: int
    parked_seconds: float


@dataclass(frozen=True)
class DeviceStatus:
    name: str
    budget_bytes: int
    resident_bytes: int


@dataclass(frozen=True)
class ManagerStatus:
    device: str  # where the big models go: "cuda" when there is a GPU, else "cpu"
    policy: str
    devices: tuple[DeviceStatus, ...]
    resident: tuple[ResidentModel, ...]
    history: tuple[TransitionRecord, ...]
    load_counts: dict[str, int]  # loads from disk and from the warm tier alike
    waiting: int  # requests in the queue
    parked: tuple[ParkedStatus, ...] = ()
    warm_tier_budget_bytes: int = 0

    @property
    def budget_bytes(self) -> int:
        """The budget of the device the big models go to."""
        return next(d.budget_bytes for d in self.devices if d.name == self.device)


@dataclass(eq=False)
class _Entry:
    spec: LoadSpec
    state: ModelState
    size_bytes: int
    last_used: float
    model: Any = None
    close: Callable[[], None] | None = None
    in_use: bool = False
    measured_bytes: int = 0
    reported_bytes: int = 0
    load_seconds: float = 0.0


@dataclass(eq=False)
class _Transition:
    """The one load (after unloading ``victims``) that a request was granted to perform."""

    loading: _Entry
    victims: list[_Entry]


@dataclass(eq=False)
class _Ticket:
    """A request waiting in the queue, and what the scheduler decided for it."""

    spec: LoadSpec
    cancel: threading.Event | None
    needed: int | None  # the memory estimate; None until someone had to make it
    needs_estimate: bool = False  # the scheduler asks the owner to make it (outside the lock)
    outcome: _Entry | _Transition | BaseException | None = None

    @property
    def cancelled(self) -> bool:
        return self.cancel is not None and self.cancel.is_set()


# ----------------------------------------------------------------------------
# The manager
# ----------------------------------------------------------------------------


class ModelManager:
    def __init__(
        self,
        *,
        policy: Policy = "one_at_a_time",
        devices: Mapping[str, DeviceBudget] | None = None,
        keep_alive_s: float = 300.0,
        wait_timeout_s: float = 600.0,
        max_queue: int = 32,
        warm_tier_bytes: int = 0,
        available_ram: Callable[[], int] = available_ram_bytes,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.policy: Policy = policy
        self.keep_alive_s = keep_alive_s
        self.wait_timeout_s = wait_timeout_s
        self.max_queue = max_queue
        self._devices = dict(devices) if devices else {"cpu": DeviceBudget(CpuMemoryProbe(), total_ram_bytes())}
        self._clock = clock
        self._loaders: dict[str, Loader] = {}
        self._entries: dict[LoadSpec, _Entry] = {}
        self._queue: deque[_Ticket] = deque()
        self._cond = threading.Condition()
        self._transition_in_progress = False
        # The model the current request holds, to refuse a nested acquire: with one user per
        # model and one model per request, a nested acquire could only wait for itself.
        self._held: ContextVar[LoadSpec | None] = ContextVar(f"model-held-{id(self)}", default=None)
        self._history: deque[TransitionRecord] = deque(maxlen=100)
        self._load_counts: dict[str, int] = {}
        self._reaper_stop = threading.Event()
        self._reaper: threading.Thread | None = None
        self._compute_threads: dict[str, ComputeThread] = {}
        self._warm = WarmTier(warm_tier_bytes, available_ram)  # guarded by self._cond

    @property
    def device(self) -> str:
        """Where the big models go: the GPU when there is one, else the CPU."""
        return next((name for name in self._devices if name != "cpu"), "cpu")

    def has_device(self, name: str) -> bool:
        return name in self._devices

    def compute_thread(self, spec: LoadSpec) -> ComputeThread:
        """The thread that runs the model's work (started on first use). On the CPU one thread runs
        every model's (their OpenMP threads then form one team); on a GPU one per kind of model, so
        co-resident models still run side by side."""
        key = spec.device if spec.device == "cpu" else f"{spec.device}-{spec.kind}"
        with self._cond:
            thread = self._compute_threads.get(key)
            if thread is None:
                thread = self._compute_threads[key] = ComputeThread(f"compute-{key}")
            return thread

    def register_loader(self, kind: str, loader: Loader) -> None:
        with self._cond:
            self._loaders[kind] = loader

    def would_wait(self, spec: LoadSpec) -> bool:
        """Whether a request for ``spec`` made now would wait for other requests: its model is busy,
        or it is not resident and its device's memory is held by models in use, or a swap or queued
        requests are ahead of it. A load that only evicts idle models is not a wait. A hint, for
        choosing a cheaper path (chat on the CPU while the GPU draws); ``acquire`` decides."""
        with self._cond:
            if self._queue or self._transition_in_progress:
                return True
            entry = self._entries.get(spec)
            if entry is not None:
                return entry.state is not ModelState.READY or entry.in_use
            device = spec.budget_device
            if device not in self._devices:
                return False
            if not any(e.in_use for e in self._entries.values() if e.spec.budget_device == device):
                return False
        needed = self._estimate(spec)  # file I/O: outside the lock
        with self._cond:
            resident = [
                ResidentInfo(e.spec, e.size_bytes, e.last_used, e.in_use)
                for e in self._entries.values()
                if e.spec.budget_device == device
            ]
            plan = plan_eviction(needed, resident, self.policy, self._devices[device].budget_bytes)
            return bool(plan.wait_for)

    def is_busy(self, spec: LoadSpec) -> bool:
        """Whether the model for ``spec`` is loaded and lent to a request right now."""
        with self._cond:
            entry = self._entries.get(spec)
            return entry is not None and entry.in_use

    def others_waiting(self, spec: LoadSpec) -> bool:
        """Whether requests for other models on ``spec``'s device wait in the queue (a batch of chat
        requests then stops taking new ones, so the model goes to them in their turn)."""
        with self._cond:
            return any(
                t.spec != spec and t.spec.budget_device == spec.budget_device and not t.cancelled for t in self._queue
            )

    # -- borrowing ---------------------------------------------------------

    @contextlib.contextmanager
    def acquire(self, spec: LoadSpec, *, cancel: threading.Event | None = None) -> Iterator[Any]:
        """Borrow the model for ``spec``, loading it (and evicting others) if needed.

        Raises RequestCancelledError as soon as ``cancel`` is set while waiting (nothing
        loads for a cancelled request), BusyError when the queue is full or the wait
        passes ``wait_timeout_s``, ModelTooLargeError when it can never fit.
        """
        self._refuse_nested(spec)
        entry = self._check_out(spec, cancel)
        with self._holding(entry):
            yield entry.model

    @contextlib.contextmanager
    def borrow_if_idle(self, spec: LoadSpec) -> Iterator[Any | None]:
        """The model for ``spec`` if it is loaded, idle and nobody waits for any model; else None.

        Atomic: it never loads, never waits and never delays a queued request, so an
        auxiliary use of a model costs no swap.
        """
        with self._cond:
            entry = self._entries.get(spec)
            lendable = (
                entry is not None
                and entry.state is ModelState.READY
                and not entry.in_use
                and not self._queue
                and self._held.get() is None
            )
            if lendable:
                assert entry is not None
                entry.in_use = True
                entry.last_used = self._clock()
        if not lendable:
            yield None
            return
        with self._holding(entry):
            yield entry.model

    @contextlib.contextmanager
    def _holding(self, entry: _Entry) -> Iterator[None]:
        self._held.set(entry.spec)
        try:
            yield
        finally:
            # Not reset(token): a generator may finish in another context than it started in.
            self._held.set(None)
            self._check_in(entry)

    def _refuse_nested(self, spec: LoadSpec) -> None:
        held = self._held.get()
        if held is not None:
            raise AppError(
                f"{spec.label} was asked for while this request still holds {held.label}; "
                "a request uses one model at a time: finish with the first before asking for the next"
            )

    def _check_out(self, spec: LoadSpec, cancel: threading.Event | None) -> _Entry:
        if spec.kind not in self._loaders:
            raise AppError(f"no loader is registered for models of kind '{spec.kind}'")
        if spec.budget_device not in self._devices:
            raise AppError(
                f"{spec.label} is meant for the device '{spec.device}', which this machine does not have; "
                f"available: {', '.join(self._devices)}"
            )
        self._raise_if_cancelled(spec, cancel)
        deadline = time.monotonic() + self.wait_timeout_s
        resident = spec in self._entries  # a hint only (read without the lock): skip the estimate
        ticket = _Ticket(spec, cancel, None if resident else self._estimate(spec))
        with self._cond:
            if len(self._queue) >= self.max_queue:
                raise BusyError(
                    f"{len(self._queue)} requests are already waiting for a model (manager.max_queue); "
                    "try again shortly"
                )
            self._queue.append(ticket)
            self._schedule()
            try:
                self._wait_for_outcome(ticket, deadline)
            except BaseException:
                self._withdraw(ticket)
                raise
        outcome = ticket.outcome
        if isinstance(outcome, BaseException):
            raise outcome
        entry = self._perform(outcome, cancel) if isinstance(outcome, _Transition) else outcome
        assert isinstance(entry, _Entry)
        if cancel is not None and cancel.is_set():  # cancelled while it loaded: it stays, for others
            self._check_in(entry)
            self._raise_if_cancelled(spec, cancel)
        return entry

    def _wait_for_outcome(self, ticket: _Ticket, deadline: float) -> None:
        """Under the lock: sleep until the scheduler decides for ``ticket``."""
        while ticket.outcome is None:
            self._raise_if_cancelled(ticket.spec, ticket.cancel)
            if ticket.needs_estimate:
                ticket.needs_estimate = False
                self._cond.release()
                try:
                    needed = self._estimate(ticket.spec)
                finally:
                    self._cond.acquire()
                ticket.needed = needed
                self._schedule()
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BusyError(
                    f"{ticket.spec.label} was not free within {self.wait_timeout_s:.0f} s "
                    "(manager.wait_timeout_s): other requests kept the models busy. Try again shortly."
                )
            self._cond.wait(min(remaining, CANCEL_POLL_S) if ticket.cancel is not None else remaining)

    def _withdraw(self, ticket: _Ticket) -> None:
        """Under the lock: take a ticket that gives up out of the queue, undoing a grant it got."""
        if ticket in self._queue:
            self._queue.remove(ticket)
        outcome, ticket.outcome = ticket.outcome, None
        if isinstance(outcome, _Entry):
            outcome.in_use = False
        elif isinstance(outcome, _Transition):
            self._abandon(outcome)
        self._schedule()
        self._cond.notify_all()

    def _abandon(self, transition: _Transition) -> None:
        """Under the lock: give back a transition that never started."""
        for victim in transition.victims:
            victim.state = ModelState.READY
        self._entries.pop(transition.loading.spec, None)
        self._transition_in_progress = False

    @staticmethod
    def _raise_if_cancelled(spec: LoadSpec, cancel: threading.Event | None) -> None:
        if cancel is not None and cancel.is_set():
            raise RequestCancelledError(f"the request for {spec.label} was cancelled")

    def _estimate(self, spec: LoadSpec) -> int:
        return self._loaders[spec.kind].estimate_bytes(spec)

    # -- the scheduler -----------------------------------------------------

    def _schedule(self) -> None:
        """Under the lock: grant what can be granted, in queue order, without delaying anyone ahead.

        A request gets its resident model when it is idle and no request ahead wants it; the
        first request that needs a load on a device plans it; the models it must wait for and
        the budget it waits on are reserved from everyone behind it.
        """
        reserved: set[LoadSpec] = set()  # models requests ahead want or wait to see idle
        blocked_devices: set[str] = set()  # a request ahead waits for memory there
        changed = False
        for ticket in list(self._queue):
            if ticket.cancelled:
                continue  # its owner takes it out
            spec = ticket.spec
            entry = self._entries.get(spec)
            if entry is not None:
                if entry.state is ModelState.READY and not entry.in_use and spec not in reserved:
                    self._queue.remove(ticket)
                    entry.in_use = True
                    entry.last_used = self._clock()
                    ticket.outcome = entry
                    changed = True
                reserved.add(spec)
                continue
            device = spec.budget_device
            if self._transition_in_progress or device in blocked_devices or ticket.needed is None:
                if ticket.needed is None and not ticket.needs_estimate:
                    ticket.needs_estimate = changed = True
                blocked_devices.add(device)
                continue
            budget = self._devices[device].budget_bytes
            resident = [
                ResidentInfo(e.spec, e.size_bytes, e.last_used, e.in_use or e.spec in reserved)
                for e in self._entries.values()
                if e.spec.budget_device == device
            ]
            plan = plan_eviction(ticket.needed, resident, self.policy, budget)
            if plan.refuse_reason:
                self._queue.remove(ticket)
                ticket.outcome = ModelTooLargeError(
                    f"{spec.label} cannot be loaded on {device}: it {plan.refuse_reason}. Choose a smaller "
                    f"model or quantisation, or raise manager.{'cpu' if device == 'cpu' else 'gpu'}_memory_budget_gb",
                    needed_bytes=ticket.needed,
                    budget_bytes=budget,
                )
                changed = True
                continue
            blocked_devices.add(device)
            if plan.wait_for:
                # Reserve what it waits for and the idle models it will evict once those are idle,
                # or a request behind could take one of them and make it wait again.
                once_idle = [replace(r, in_use=False) if r.key in plan.wait_for else r for r in resident]
                reserved.update(plan_eviction(ticket.needed, once_idle, self.policy, budget).evict)  # type: ignore[arg-type]
                reserved.update(plan.wait_for)  # type: ignore[arg-type]
                continue
            self._queue.remove(ticket)
            ticket.outcome = self._begin_transition(spec, ticket.needed, [self._entries[k] for k in plan.evict])  # type: ignore[index]
            changed = True
        if changed:
            self._cond.notify_all()

    def _begin_transition(self, spec: LoadSpec, needed: int, victims: list[_Entry]) -> _Transition:
        """Under the lock: claim the one transition slot and mark what changes."""
        self._transition_in_progress = True
        for victim in victims:
            victim.state = ModelState.UNLOADING
        loading = _Entry(spec, ModelState.LOADING, needed, self._clock(), in_use=True)
        self._entries[spec] = loading
        return _Transition(loading, victims)

    def _perform(self, transition: _Transition, cancel: threading.Event | None) -> _Entry:
        """Outside the lock: unload the victims, then load the new model (unless cancelled first)."""
        loading = transition.loading
        if cancel is not None and cancel.is_set():
            with self._cond:
                self._abandon(transition)
                self._schedule()
                self._cond.notify_all()
            self._raise_if_cancelled(loading.spec, cancel)
        try:
            for victim in transition.victims:
                self._unload(victim)
            self._load_or_make_room(loading)
        except BaseException:
            with self._cond:
                self._entries.pop(loading.spec, None)
                self._transition_in_progress = False
                self._schedule()
                self._cond.notify_all()
            raise
        with self._cond:
            loading.state = ModelState.READY
            loading.last_used = self._clock()
            self._transition_in_progress = False
            self._schedule()
            self._cond.notify_all()
        return loading

    def _load_or_make_room(self, loading: _Entry) -> None:
        """Outside the lock, holding the transition slot: load; when the device runs out of memory
        (the estimates were short, or something else took memory), unload its other idle models
        and try once more before giving up."""
        try:
            self._load(loading)
        except OutOfMemoryError:
            device = loading.spec.budget_device
            with self._cond:
                victims = [e for e in self._idle_entries(0.0) if e.spec.budget_device == device]
                for victim in victims:
                    victim.state = ModelState.UNLOADING
            if not victims:
                raise
            log.warning(
                "%s ran out of %s memory while loading; unloading %s and trying once more",
                loading.spec.label,
                device,
                ", ".join(v.spec.label for v in victims),
            )
            for victim in victims:
                self._unload(victim)
            self._load(loading)

    def _check_in(self, entry: _Entry) -> None:
        with self._cond:
            entry.in_use = False
            entry.last_used = self._clock()
            self._schedule()
            self._cond.notify_all()
        if self.keep_alive_s == 0:
            self.unload_idle()

    # -- loading and unloading -------------------------------------------

    def _run_for(self, loader: Loader, spec: LoadSpec, work: Callable[[], Any]) -> Any:
        """``work`` on the model's compute thread when its loader asks for one, else here."""
        return self.compute_thread(spec).call(work) if loader.on_compute_thread else work()

    def _load(self, entry: _Entry) -> None:
        if self._load_parked(entry):
            return
        with self._cond:  # a load from disk needs RAM on the way, even to a GPU: parked models give it
            out = self._warm.free_ram_for(entry.size_bytes)
        self._close_parked(out)
        spec = entry.spec
        probe = self._devices[spec.budget_device].probe
        before = probe.used_bytes()
        started = time.perf_counter()
        try:
            loader = self._loaders[spec.kind]
            loaded = self._run_for(loader, spec, lambda: loader.load(spec))
        except AppError:
            self._collect(probe)
            raise
        except Exception as error:
            self._collect(probe)
            if _is_out_of_memory(error):
                raise OutOfMemoryError(
                    f"{spec.label} ran out of {spec.device} memory while loading; "
                    "unload other models, pick a smaller quantisation or lower the GPU layers"
                ) from error
            raise ModelLoadError(f"{spec.label} failed to load: {error}") from error
        seconds = time.perf_counter() - started
        measured = max(0, probe.used_bytes() - before)
        entry.model = loaded.model
        entry.close = loaded.close
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
            spec.device,
            measured / 2**20,
            loaded.reported_bytes / 2**20,
        )

    # -- the warm tier ----------------------------------------------------

    def _load_parked(self, entry: _Entry) -> bool:
        """Outside the lock, holding the transition slot: move the model back from the warm tier, if
        it is there. False when it is not, or the move failed (then it is dropped, and loads from disk)."""
        spec = entry.spec
        with self._cond:
            parked = self._warm.take(spec)
        if parked is None:
            return False
        loader = self._loaders[spec.kind]
        probe = self._devices[spec.budget_device].probe
        before = _measure(probe)
        started = time.perf_counter()
        try:
            assert loader.unpark is not None  # only models whose loader can park are parked
            model = self._run_for(loader, spec, lambda: loader.unpark(parked.model, spec))  # type: ignore[misc]
        except Exception as error:
            log.warning("%s could not be moved back from RAM (%s); it loads from disk", spec.label, error)
            self._close_parked([parked])
            return False
        seconds = time.perf_counter() - started
        after = _measure(probe)
        entry.model, entry.close = model, parked.close
        entry.measured_bytes, entry.reported_bytes = parked.measured_bytes, parked.reported_bytes
        entry.size_bytes = max(parked.measured_bytes, parked.reported_bytes) or entry.size_bytes
        entry.load_seconds = seconds
        self._record("unpark", spec.label, seconds, 0 if before is None or after is None else max(0, after - before))
        with self._cond:
            self._load_counts[spec.label] = self._load_counts.get(spec.label, 0) + 1
        log.info("moved %s back from RAM to %s in %.2f s", spec.label, spec.device, seconds)
        return True

    def _park(self, entry: _Entry) -> bool:
        """Outside the lock, holding the transition slot: move an evicted model into the warm tier
        instead of unloading it, when its loader can and the tier has room. False: unload it."""
        spec = entry.spec
        loader = self._loaders[spec.kind]
        if loader.park is None or loader.unpark is None or entry.model is None or self.keep_alive_s == 0:
            return False
        new_ram = spec.budget_device != "cpu"  # a CPU model stays where it is; a GPU model takes RAM
        with self._cond:
            out = self._warm.make_room(entry.size_bytes, new_ram=new_ram)
        if out is None:
            return False
        self._close_parked(out)
        probe = self._devices[spec.budget_device].probe
        before = _measure(probe)
        started = time.perf_counter()
        try:
            parked_model = self._run_for(loader, spec, lambda: loader.park(entry.model, spec))  # type: ignore[misc]
        except Exception as error:
            log.warning("%s could not be parked in RAM (%s); it is unloaded", spec.label, error)
            return False
        if parked_model is None:
            return False
        if new_ram:  # the device's copies were freed as the weights moved; the allocator's cache keeps them
            self._release_cache(probe)
        freed = self._wait_for_memory_back(probe, before, entry.measured_bytes if new_ram else 0)
        seconds = time.perf_counter() - started
        parked = ParkedModel(
            spec, parked_model, entry.close, entry.size_bytes, new_ram, self._clock(),
            entry.measured_bytes, entry.reported_bytes,
        )  # fmt: skip
        entry.model = entry.close = None
        with self._cond:
            self._warm.put(parked)
        self._record("park", spec.label, seconds, freed)
        log.info("parked %s in RAM in %.2f s, %.0f MiB of %s freed", spec.label, seconds, freed / 2**20, spec.device)
        return True

    def _close_parked(self, parked_models: list[ParkedModel]) -> None:
        """Unload models taken out of the warm tier (never raises)."""
        if not parked_models:
            return
        started = time.perf_counter()
        closers = []
        for parked in parked_models:
            closers.append(parked.close)
            parked.close = parked.model = None
        gc.collect()  # the weights are freed first: a close may then give their pinned RAM back
        for parked, close in zip(parked_models, closers, strict=True):
            try:
                if close is not None:
                    close()
            except Exception:
                log.exception("closing the parked %s failed; it is dropped anyway", parked.key)
            label = parked.key.label if isinstance(parked.key, LoadSpec) else str(parked.key)
            self._record("unload", label, time.perf_counter() - started, parked.size_bytes)
            log.info("dropped %s from the warm tier", label)
        if "cpu" in self._devices:
            self._release_cache(self._devices["cpu"].probe)

    def _unload(self, entry: _Entry, *, may_park: bool = True) -> None:
        """Park the model in the warm tier if allowed and possible, else drop every reference the
        manager holds and check the memory came back. Never raises an ordinary exception: a model
        that fails to close is dropped anyway, and logged."""
        try:
            if not (may_park and self._park(entry)):
                self._release_memory(entry)
        except Exception:
            log.exception("unloading %s failed; it is dropped anyway", entry.spec.label)
        finally:
            with self._cond:
                self._entries.pop(entry.spec, None)
                self._cond.notify_all()

    def _release_memory(self, entry: _Entry) -> None:
        spec = entry.spec
        probe = self._devices[spec.budget_device].probe
        before = _measure(probe)
        started = time.perf_counter()
        tracker = _weak_reference(entry.model)
        close, entry.close, entry.model = entry.close, None, None
        try:
            if close is not None:
                close()
        finally:
            close = None  # a closer may hold the model (a closure): it must not outlive the call
            # A full garbage collection costs a few tenths of a second in a process holding PyTorch;
            # it is only needed when the model outlived its references (in reference cycles).
            self._release_cache(probe)
            if (tracker is not None and tracker() is not None) or not _came_back(probe, before, entry.measured_bytes):
                self._collect(probe)
        freed = self._wait_for_memory_back(probe, before, entry.measured_bytes)
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

    @staticmethod
    def _wait_for_memory_back(probe: MemoryProbe, before: int | None, expected: int) -> int:
        """On a GPU the driver frees memory asynchronously: poll briefly before the next load."""
        if before is None:
            return 0
        after = _measure(probe)  # 0 is a reading; only None means the probe failed
        freed = 0 if after is None else before - after
        if probe.device != "cuda":
            return max(0, freed)
        deadline = time.monotonic() + 2.0
        while freed < 0.9 * expected and time.monotonic() < deadline:
            time.sleep(0.05)
            after = _measure(probe)
            freed = 0 if after is None else before - after
        return max(0, freed)

    @staticmethod
    def _collect(probe: MemoryProbe) -> None:
        gc.collect()
        ModelManager._release_cache(probe)

    @staticmethod
    def _release_cache(probe: MemoryProbe) -> None:
        try:
            probe.release_cache()
        except Exception:
            log.exception("releasing the %s memory cache failed", probe.device)

    def _record(self, action: Literal["load", "unload"], label: str, seconds: float, size: int) -> None:
        with self._cond:
            self._history.append(TransitionRecord(action, label, seconds, size, time.time()))

    # -- keep-alive and shutdown -----------------------------------------

    def unload_idle(self) -> list[str]:
        """Unload (or park, with a warm tier) idle models past their keep-alive, and drop parked models
        past it. Returns the labels of those that left their device."""
        if self.keep_alive_s < 0:
            return []
        labels = self._unload_idle_for(self.keep_alive_s, wait_for_transition=False)
        with self._cond:
            expired = self._warm.expired(self._clock(), self.keep_alive_s)
        self._close_parked(expired)
        return labels

    def unload_all(self) -> list[str]:
        """Unload every idle model now (models in use stay), and empty the warm tier. Returns the
        labels of those unloaded from their device."""
        labels = self._unload_idle_for(0.0, wait_for_transition=True, may_park=False)
        with self._cond:
            parked = self._warm.take_all()
        self._close_parked(parked)
        return labels

    def unload(self, label: str) -> bool:
        """Unload one idle or parked model by its label (a status panel's button); False if it is busy or absent."""
        unloaded = self._unload_idle_for(
            0.0, wait_for_transition=True, only=lambda e: e.spec.label == label, may_park=False
        )
        with self._cond:
            parked = self._warm.take_all(lambda key: isinstance(key, LoadSpec) and key.label == label)
        self._close_parked(parked)
        return bool(unloaded or parked)

    def make_room(self, keep: LoadSpec) -> list[str]:
        """Unload every idle model on ``keep``'s device but ``keep`` itself: for a request that ran out
        of memory while generating, before it tries once more. Returns their labels."""
        device = keep.budget_device
        return self._unload_idle_for(
            0.0, wait_for_transition=True, only=lambda e: e.spec.budget_device == device and e.spec != keep
        )

    def _idle_entries(self, min_idle_s: float) -> list[_Entry]:
        """Under the lock: ready models nobody uses or waits for, idle for at least ``min_idle_s``."""
        wanted = {ticket.spec for ticket in self._queue}
        now = self._clock()
        return [
            e
            for e in self._entries.values()
            if e.state is ModelState.READY and not e.in_use and e.spec not in wanted and now - e.last_used >= min_idle_s
        ]

    def _unload_idle_for(
        self,
        min_idle_s: float,
        *,
        wait_for_transition: bool,
        only: Callable[[_Entry], bool] | None = None,
        may_park: bool = True,
    ) -> list[str]:
        with self._cond:
            if wait_for_transition:
                self._cond.wait_for(lambda: not self._transition_in_progress, timeout=self.wait_timeout_s)
            if self._transition_in_progress:
                return []
            victims = [e for e in self._idle_entries(min_idle_s) if only is None or only(e)]
            if not victims:
                return []
            self._transition_in_progress = True
            for victim in victims:
                victim.state = ModelState.UNLOADING
        try:
            for victim in victims:
                self._unload(victim, may_park=may_park)
        finally:
            with self._cond:
                self._transition_in_progress = False
                self._schedule()
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
        with self._cond:
            threads, self._compute_threads = list(self._compute_threads.values()), {}
        for thread in threads:
            thread.close()

    # -- status ------------------------------------------------------------

    def status(self) -> ManagerStatus:
        with self._cond:
            now = self._clock()
            resident = tuple(
                ResidentModel(
                    label=e.spec.label,
                    kind=e.spec.kind,
                    name=Path(e.spec.path).name,
                    device=e.spec.device,
                    state=e.state.value,
                    in_use=e.in_use,
                    size_bytes=e.size_bytes,
                    measured_bytes=e.measured_bytes,
                    reported_bytes=e.reported_bytes,
                    load_seconds=e.load_seconds,
                    idle_seconds=0.0 if e.in_use else max(0.0, now - e.last_used),
                )
                for e in self._entries.values()
            )
            devices = tuple(
                DeviceStatus(
                    name,
                    device.budget_bytes,
                    sum(e.size_bytes for e in self._entries.values() if e.spec.budget_device == name),
                )
                for name, device in self._devices.items()
            )
            return ManagerStatus(
                device=self.device,
                policy=self.policy,
                devices=devices,
                resident=resident,
                history=tuple(self._history),
                load_counts=dict(self._load_counts),
                waiting=len(self._queue),
                parked=tuple(
                    ParkedStatus(
                        label=p.key.label,
                        kind=p.key.kind,
                        name=Path(p.key.path).name,
                        device=p.key.device,
                        size_bytes=p.size_bytes,
                        parked_seconds=max(0.0, now - p.parked_at),
                    )
                    for p in self._warm.parked()
                    if isinstance(p.key, LoadSpec)
                ),
                warm_tier_budget_bytes=self._warm.budget_bytes,
            )


def _measure(probe: MemoryProbe) -> int | None:
    """The probe's reading, or None when the probe itself fails (a measurement is never worth a stuck model)."""
    try:
        return probe.used_bytes()
    except Exception:
        log.exception("measuring %s memory failed", probe.device)
        return None


def _came_back(probe: MemoryProbe, before: int | None, expected: int) -> bool:
    """Whether most of the memory a model took (``expected``) is measurably free again."""
    after = _measure(probe)
    return before is not None and after is not None and before - after >= 0.9 * expected


def _is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, MemoryError) or "out of memory" in str(error).lower()


def _weak_reference(model: Any) -> weakref.ref[Any] | None:
    try:
        return weakref.ref(model)
    except TypeError:
        return None
