"""Moving a PyTorch model's weights off its device into CPU RAM and back, for the warm tier.

On CUDA the weights go into page-locked (pinned) memory: the copy back then runs at the bus's full
speed and without a staging copy. Parameters keep their identity (only ``.data`` changes), so what
holds a reference to them (optimisers never, but LoRA layers and hooks do) stays valid.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def park_modules(modules: Iterable[Any]) -> None:
    """Copy every parameter and buffer of ``modules`` (torch ``nn.Module``) into CPU RAM, pinned when
    CUDA is there, and free their device memory."""
    import torch

    pin = torch.cuda.is_available()

    def to_ram(tensor: Any) -> Any:
        if tensor.device.type == "cpu":
            return tensor
        parked = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=pin)
        parked.copy_(tensor, non_blocking=pin)
        return parked

    _move(modules, to_ram)


def unpark_modules(modules: Iterable[Any], device: str) -> None:
    """Copy every parameter and buffer of ``modules`` back onto ``device``."""
    import torch

    target = torch.device(device)

    def to_device(tensor: Any) -> Any:
        return tensor if tensor.device == target else tensor.to(target, non_blocking=True)

    _move(modules, to_device)


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
