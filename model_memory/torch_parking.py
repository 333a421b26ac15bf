"""Moving a PyTorch model's weights off its device into CPU RAM and back, for the warm tier.

On CUDA the weights go into page-locked (pinned) memory: the copy back then runs at the bus's full
speed and without a staging copy. Parameters keep their identity (only ``.data`` changes), so what
holds a reference to them (LoRA layers, hooks, pipelines made from the same components) stays valid.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

# torch rounds every pinned allocation up to a power of two: one allocation per tensor would take
# about a third more RAM than the weights. Tensors are packed into blocks of this size instead.
PINNED_BLOCK_BYTES = 512 * 2**20
ALIGNMENT = 64  # bytes: every packed tensor starts at a multiple of this (any dtype's alignment)


class PinnedArena:
    """Hands out CPU tensors packed into large (pinned, with ``pin``) blocks."""

    def __init__(self, pin: bool, block_bytes: int = PINNED_BLOCK_BYTES) -> None:
        self.pin = pin
        self.block_bytes = block_bytes
        self.allocated_bytes = 0  # RAM the blocks took
        self._block: Any = None
        self._offset = 0

    def empty_like(self, tensor: Any) -> Any:
        """An uninitialised CPU tensor of ``tensor``'s shape and dtype, inside a block."""
        import torch

        size = tensor.numel() * tensor.element_size()
        if size == 0 or size > self.block_bytes:  # too big to share a block: its own allocation
            self.allocated_bytes += size
            return torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=self.pin)
        if self._block is None or self._offset + size > self.block_bytes:
            self._block = torch.empty(self.block_bytes, dtype=torch.uint8, pin_memory=self.pin)
            self._offset = 0
            self.allocated_bytes += self.block_bytes
        start = self._offset
        self._offset = -(-(start + size) // ALIGNMENT) * ALIGNMENT
        return self._block[start : start + size].view(tensor.dtype).view(tensor.shape)


def park_modules(modules: Iterable[Any]) -> int:
    """Copy every parameter and buffer of ``modules`` (torch ``nn.Module``) into CPU RAM, pinned when
    CUDA is there, and free their device memory. Returns the bytes of RAM taken."""
    import torch

    arena = PinnedArena(pin=torch.cuda.is_available())

    def to_ram(tensor: Any) -> Any:
        if tensor.device.type == "cpu":
            return tensor
        parked = arena.empty_like(tensor)
        parked.copy_(tensor, non_blocking=arena.pin)
        return parked

    _move(modules, to_ram)
    return arena.allocated_bytes


def unpark_modules(modules: Iterable[Any], device: str) -> None:
    """Copy every parameter and buffer of ``modules`` back onto ``device``."""
    import torch

    target = torch.device(device)

    def to_device(tensor: Any) -> Any:
        return tensor if tensor.device == target else tensor.to(target, non_blocking=True)

    _move(modules, to_device)


def release_pinned_memory() -> None:
    """Give back the page-locked RAM torch keeps for reuse once its tensors are freed (a model that
    left the warm tier): otherwise it stays taken from the system."""
    import torch

    if torch.cuda.is_available():
        empty_host_cache = getattr(torch.accelerator, "empty_host_cache", None) or getattr(
            torch._C, "_host_emptyCache", None
        )
        if empty_host_cache is not None:
            empty_host_cache()


def _move(modules: Iterable[Any], move: Any) -> None:
    import torch

    with torch.no_grad():
        for module in modules:
            for tensors in _tensor_slots(module):
                for name, tensor in list(tensors.items()):
                    if tensor is None:
                        continue
                    moved = move(tensor.data if isinstance(tensor, torch.nn.Parameter) else tensor)
                    if isinstance(tensor, torch.nn.Parameter):
                        tensor.data = moved
                    else:
                        tensors[name] = moved
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # the copies were queued; the memory is only free (or ready) after them


def _tensor_slots(module: Any) -> Iterable[dict[str, Any]]:
    """Each submodule's parameter and buffer dictionaries (shared weights are moved once: a moved
    parameter's ``.data`` is already on the target, and moving it again is a no-op)."""
    for submodule in module.modules():
        yield submodule._parameters
        yield submodule._buffers
