"""The warm tier's bookkeeping: which evicted models are parked in CPU RAM, and which must go.

A model evicted from its device is parked here when the tier's RAM budget and the machine's free
RAM allow, so the next load of the same model is a copy back instead of a load from disk. Parked
models leave least recently parked first: when the budget is full, when free RAM runs short, and
after the keep-alive. The class only decides; the model manager moves and closes the models, under
its own lock.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

GIB = 1024**3
RAM_RESERVE_BYTES = 2 * GIB  # free RAM parking never takes: the app and the next load need some


@dataclass(eq=False)
class ParkedModel:
    key: Hashable  # the model's load spec
    model: Any  # what the loader's park returned
    close: Callable[[], None] | None
    size_bytes: int  # RAM it holds (its size on the device it came from)
    new_ram: bool  # it took RAM when it was parked (moved from a GPU), not RAM it already held
    parked_at: float
    measured_bytes: int = 0  # what the manager measured at its first load, given back on return
    reported_bytes: int = 0


class WarmTier:
    """Parked models within a RAM budget, oldest first."""

    def __init__(self, budget_bytes: int, available_ram: Callable[[], int]) -> None:
        self.budget_bytes = budget_bytes
        self._available_ram = available_ram
        self._parked: dict[Hashable, ParkedModel] = {}  # insertion order: oldest first

    @property
    def enabled(self) -> bool:
        return self.budget_bytes > 0

    @property
    def used_bytes(self) -> int:
        return sum(p.size_bytes for p in self._parked.values())

    def parked(self) -> list[ParkedModel]:
        return list(self._parked.values())

    def __contains__(self, key: Hashable) -> bool:
        return key in self._parked

    def make_room(self, size_bytes: int, *, new_ram: bool) -> list[ParkedModel] | None:
        """Take out the oldest parked models until one of ``size_bytes`` fits the budget and, when
        parking takes new RAM, leaves the reserve free. Returns those taken out (the caller closes
        them), or None when it cannot fit at all; then nothing is taken out."""
        if not self.enabled or size_bytes > self.budget_bytes:
            return None
        oldest_first = list(self._parked.values())
        available = self._available_ram() if new_ram else 0
        used = self.used_bytes
        out: list[ParkedModel] = []

        def fits() -> bool:
            ram_ok = not new_ram or available - size_bytes >= RAM_RESERVE_BYTES
            return used + size_bytes <= self.budget_bytes and ram_ok

        while not fits() and oldest_first:
            victim = oldest_first.pop(0)
            out.append(victim)
            used -= victim.size_bytes
            available += victim.size_bytes
        if not fits():
            return None
        for victim in out:
            del self._parked[victim.key]
        return out

    def put(self, parked: ParkedModel) -> None:
        self._parked.pop(parked.key, None)
        self._parked[parked.key] = parked

    def take(self, key: Hashable) -> ParkedModel | None:
        return self._parked.pop(key, None)

    def free_ram_for(self, needed_bytes: int) -> list[ParkedModel]:
        """Before a load from disk: take out the oldest parked models until ``needed_bytes`` of RAM
        and the reserve are free (or none is left). Returns those taken out."""
        out: list[ParkedModel] = []
        if not self._parked:
            return out
        available = self._available_ram()
        while self._parked and available - needed_bytes < RAM_RESERVE_BYTES:
            victim = self._parked.pop(next(iter(self._parked)))
            out.append(victim)
            available += victim.size_bytes
        return out

    def expired(self, now: float, keep_alive_s: float) -> list[ParkedModel]:
        """Take out the models parked for longer than the keep-alive."""
        out = [p for p in self._parked.values() if now - p.parked_at >= keep_alive_s]
        for parked in out:
            del self._parked[parked.key]
        return out

    def take_all(self, only: Callable[[Hashable], bool] | None = None) -> list[ParkedModel]:
        out = [p for p in self._parked.values() if only is None or only(p.key)]
        for parked in out:
            del self._parked[parked.key]
        return out
