"""The warm tier: an evicted model parked in CPU RAM comes back without a load from disk.

The manager's side runs on fake devices (a "cuda" probe whose memory the fake park moves to the
"cpu" probe); the services' side runs the real vision and image services on tiny models on the CPU,
where parking keeps the model where it is and the manager's bookkeeping is the same.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from generator import ImageRequest
from main import build_services
from model_manager import GIB, DeviceBudget, LoadedModel, Loader, LoadSpec, ModelManager, warm_tier_budget
from model_memory.warm_tier import RAM_RESERVE_BYTES, ParkedModel, WarmTier
from settings import load_settings
from tests.conftest import TINY_SECTIONS, write_config
from tests.test_model_manager import FakeClock, FakeLoader, FakeModel, FakeProbe
from text_generation.stream import GenerationParams
from vision import park_vision_model


class ParkingLoader(FakeLoader):
    """The fake loader, with a park that moves a model's memory from its device to RAM and back."""

    def __init__(self, probes: dict[str, FakeProbe], sizes: dict[str, int]) -> None:
        super().__init__(probes, sizes)
        self.parks: list[str] = []
        self.unparks: list[str] = []
        self.park_result: dict[str, str] = {}  # name -> "refuse" (return None) or "fail" (raise)
        self.unpark_fails: set[str] = set()
        self.parked_objects: set[int] = set()

    def park(self, model: FakeModel, spec: LoadSpec) -> FakeModel | None:
        name = Path(spec.path).stem
        outcome = self.park_result.get(name)
        if outcome == "refuse":
            return None
        if outcome == "fail":
            raise RuntimeError("pinned memory could not be allocated")
        self.parks.append(name)
        if spec.budget_device != "cpu":
            self.probes[spec.budget_device].add(-self.size(spec))
            self.probes["cpu"].add(self.size(spec))
        self.parked_objects.add(id(model))
        return model

    def unpark(self, model: FakeModel, spec: LoadSpec) -> FakeModel:
        name = Path(spec.path).stem
        if name in self.unpark_fails:
            raise RuntimeError("CUDA out of memory while copying back")
        self.unparks.append(name)
        if spec.budget_device != "cpu":
            self.probes["cpu"].add(-self.size(spec))
            self.probes[spec.budget_device].add(self.size(spec))
        self.parked_objects.discard(id(model))
        return model

    def load(self, spec: LoadSpec) -> LoadedModel:
        loaded = super().load(spec)
        close = loaded.close
        assert close is not None

        def close_where_it_is() -> None:
            if id(loaded.model) in self.parked_objects and spec.budget_device != "cpu":
                self.probes["cpu"].add(-self.size(spec))  # a parked model's memory is in RAM
                self.probes[spec.budget_device].add(self.size(spec))
            close()

        return LoadedModel(loaded.model, loaded.reported_bytes, close_where_it_is)

    def as_loader(self) -> Loader:
        return Loader(load=self.load, estimate_bytes=self.estimate_bytes, park=self.park, unpark=self.unpark)


class Machine:
    """A manager with a CPU and a 24 GiB "cuda" device, one_at_a_time, a warm tier and free RAM
    that a test can change."""

    def __init__(self, tier_gib: float, *, keep_alive_s: float = 300.0, free_ram_gib: float = 64.0) -> None:
        self.cpu = FakeProbe("cpu")
        self.cuda = FakeProbe("cuda")
        self.clock = FakeClock()
        self.ram_total = int(free_ram_gib * GIB)  # free RAM is this less what the parked models hold
        sizes = {name: 4 * GIB for name in "abcd"}
        self.loader = ParkingLoader({"cpu": self.cpu, "cuda": self.cuda}, sizes)
        self.manager = ModelManager(
            policy="one_at_a_time",
            devices={"cpu": DeviceBudget(self.cpu, 64 * GIB), "cuda": DeviceBudget(self.cuda, 24 * GIB)},
            keep_alive_s=keep_alive_s,
            wait_timeout_s=10.0,
            warm_tier_bytes=int(tier_gib * GIB),
            available_ram=lambda: self.ram_total - self.cpu.used,
            clock=self.clock,
        )
        self.manager.register_loader("image", self.loader.as_loader())

    def use(self, name: str, device: str = "cuda") -> FakeModel:
        with self.manager.acquire(gpu(name, device)) as model:
            return model

    def actions(self, name: str) -> list[str]:
        return [r.action for r in self.manager.status().history if r.label == f"image:{name}.bin"]

    def parked(self) -> list[str]:
        return [p.name for p in self.manager.status().parked]


def gpu(name: str, device: str = "cuda") -> LoadSpec:
    return LoadSpec.of("image", f"/models/{name}.bin", device=device)


def test_an_evicted_model_is_parked_and_comes_back_without_a_load_from_disk() -> None:
    machine = Machine(tier_gib=16)
    first = machine.use("a")
    machine.use("b")
    assert machine.parked() == ["a.bin"]
    assert machine.cuda.used == 4 * GIB, "a's device memory must be given back when it is parked"
    again = machine.use("a")
    assert again is first, "the parked model itself must come back"
    assert machine.loader.loads[gpu("a")] == 1, "a must not load from disk twice"
    assert machine.actions("a") == ["load", "park", "unpark"]
    assert machine.loader.unparks == ["a"] and machine.parked() == ["b.bin"]
    assert machine.cuda.peak == 4 * GIB, "parking must not let two models share the device under one_at_a_time"


def test_without_a_warm_tier_the_evicted_model_is_unloaded_and_loads_again() -> None:
    machine = Machine(tier_gib=0)
    first = machine.use("a")
    machine.use("b")
    again = machine.use("a")
    assert again is not first and first.closed
    assert machine.loader.loads[gpu("a")] == 2 and machine.loader.parks == []
    assert machine.actions("a") == ["load", "unload", "load"]


def test_a_full_tier_drops_its_oldest_model_to_park_the_next() -> None:
    machine = Machine(tier_gib=8)
    for name in "abc":
        machine.use(name)
    assert machine.parked() == ["a.bin", "b.bin"]
    machine.use("d")  # c is parked: a, the oldest, has to go
    assert machine.parked() == ["b.bin", "c.bin"]
    assert machine.actions("a") == ["load", "park", "unload"]
    assert gpu("a") not in machine.loader.live, "a dropped from the tier must be closed"
    assert machine.manager.status().warm_tier_budget_bytes == 8 * GIB


def test_a_model_larger_than_the_tier_is_unloaded() -> None:
    machine = Machine(tier_gib=3)
    machine.use("a")
    machine.use("b")
    assert machine.parked() == [] and machine.actions("a") == ["load", "unload"]


def test_a_model_is_not_parked_when_free_ram_would_fall_below_the_reserve() -> None:
    machine = Machine(tier_gib=16, free_ram_gib=5)  # 4 GiB more would leave 1 GiB, under the reserve
    machine.use("a")
    machine.use("b")
    assert machine.parked() == [] and machine.actions("a") == ["load", "unload"]
    assert RAM_RESERVE_BYTES == 2 * GIB


def test_a_load_from_disk_takes_ram_back_from_parked_models_first() -> None:
    machine = Machine(tier_gib=16)
    machine.use("a")
    machine.use("b")
    machine.use("c")
    assert machine.parked() == ["a.bin", "b.bin"] and machine.cpu.used == 8 * GIB
    machine.ram_total = 11 * GIB  # something else took RAM: 3 GiB are free
    machine.use("d")
    # Parking c (4 GiB, keeping 2 free) needs a's RAM; loading d from disk (4 GiB) then needs b's.
    assert machine.actions("a")[-1] == "unload" and machine.actions("b")[-1] == "unload"
    assert machine.parked() == ["c.bin"]
    assert machine.ram_total - machine.cpu.used == 7 * GIB


def test_a_model_that_cannot_be_moved_is_unloaded_and_reloaded() -> None:
    machine = Machine(tier_gib=16)
    machine.loader.park_result["a"] = "refuse"  # what a 4-bit model's park answers
    machine.use("a")
    machine.use("b")
    machine.use("a")
    assert machine.actions("a") == ["load", "unload", "load"]


def test_a_park_that_fails_unloads_the_model_and_the_manager_goes_on() -> None:
    machine = Machine(tier_gib=16)
    machine.loader.park_result["a"] = "fail"
    machine.use("a")
    machine.use("b")
    assert machine.actions("a") == ["load", "unload"] and machine.parked() == []
    assert machine.use("a") is not None and machine.loader.loads[gpu("a")] == 2


def test_a_move_back_that_fails_loads_the_model_from_disk() -> None:
    machine = Machine(tier_gib=16)
    machine.loader.unpark_fails.add("a")
    first = machine.use("a")
    machine.use("b")
    again = machine.use("a")
    assert again is not first and first.closed, "the half-moved model must be dropped"
    assert machine.actions("a") == ["load", "park", "unload", "load"]
    assert machine.loader.violations == []


def test_the_keep_alive_parks_an_idle_model_and_later_drops_it() -> None:
    machine = Machine(tier_gib=16, keep_alive_s=60)
    machine.use("a")
    machine.clock.advance(61)
    assert machine.manager.unload_idle() == ["image:a.bin"]
    assert machine.parked() == ["a.bin"] and machine.cuda.used == 0
    machine.clock.advance(30)
    machine.manager.unload_idle()
    assert machine.parked() == ["a.bin"], "a parked model stays for the keep-alive"
    machine.clock.advance(31)
    machine.manager.unload_idle()
    assert machine.parked() == [] and machine.actions("a") == ["load", "park", "unload"]


def test_unloading_by_hand_frees_the_model_instead_of_parking_it() -> None:
    machine = Machine(tier_gib=16)
    machine.use("a")
    machine.use("b")
    assert machine.manager.unload("image:b.bin") and machine.actions("b") == ["load", "unload"]
    assert machine.manager.unload("image:a.bin"), "a parked model can be unloaded by its label"
    assert machine.parked() == []
    machine.use("c")
    machine.use("d")
    machine.manager.unload_all()
    assert machine.parked() == [] and machine.loader.live == {}


def test_with_keep_alive_zero_nothing_is_parked() -> None:
    machine = Machine(tier_gib=16, keep_alive_s=0)
    machine.use("a")
    assert machine.parked() == [] and machine.actions("a") == ["load", "unload"]


def test_a_cpu_model_parks_where_it_is_without_asking_for_new_ram() -> None:
    # 10 GiB in all: a (4 GiB) in RAM leaves 6 free, enough for b's load and the reserve, but not for
    # another 4 GiB copy of a and the reserve; a CPU model is parked as it is, so it needs none.
    machine = Machine(tier_gib=16, free_ram_gib=10)
    first = machine.use("a", device="cpu")
    machine.use("b", device="cpu")
    assert machine.parked() == ["a.bin"]
    assert machine.use("a", device="cpu") is first
    assert machine.actions("a") == ["load", "park", "unpark"]


def test_requests_waiting_during_a_park_are_served_in_order() -> None:
    machine = Machine(tier_gib=16)
    machine.use("a")
    order: list[str] = []
    workers = [threading.Thread(target=lambda n=n: order.append(machine.use(n).spec.path)) for n in "bab"]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(10)
    assert sorted(order) == ["/models/a.bin", "/models/b.bin", "/models/b.bin"]
    assert machine.loader.loads[gpu("a")] == 1 and machine.loader.loads[gpu("b")] == 1
    assert machine.loader.violations == []


def test_the_tier_bookkeeping_refuses_what_cannot_fit_and_takes_nothing_out() -> None:
    tier = WarmTier(8 * GIB, lambda: 100 * GIB)
    tier.put(ParkedModel("x", object(), None, 6 * GIB, True, 0.0))
    assert tier.make_room(9 * GIB, new_ram=True) is None
    assert "x" in tier, "a refusal must leave the parked models alone"
    dropped = tier.make_room(4 * GIB, new_ram=True)
    assert dropped is not None and [p.key for p in dropped] == ["x"]


def test_the_automatic_budget_is_off_without_a_gpu() -> None:
    cpu_only = {"cpu": DeviceBudget(FakeProbe("cpu"), GIB)}
    with_gpu = cpu_only | {"cuda": DeviceBudget(FakeProbe("cuda"), GIB)}
    assert warm_tier_budget("auto", cpu_only) == 0
    assert warm_tier_budget("auto", with_gpu) > 0
    assert warm_tier_budget(2.5, cpu_only) == int(2.5 * GIB)


def test_a_quantised_vision_model_cannot_be_parked() -> None:
    loaded = object()
    assert park_vision_model(loaded, LoadSpec.of("vision", "/m", device="cuda", precision="4bit")) is None  # type: ignore[arg-type]
    assert park_vision_model(loaded, LoadSpec.of("vision", "/m", device="cpu", precision="fp32")) is loaded  # type: ignore[arg-type]


# -- the real services ------------------------------------------------------------------------------


@pytest.fixture()
def services(tmp_path: Path, tiny_models: Path) -> Any:
    config = write_config(tmp_path, tiny_models, manager={"warm_tier_gb": 2}, **TINY_SECTIONS)
    services = build_services(load_settings(config))
    yield services
    services.manager.close()


def test_image_then_vision_then_image_moves_the_parked_pipeline_back(services: Any) -> None:
    request = ImageRequest("a lighthouse at dusk", seed=11)
    first = services.images.generate(request, save=False).images[0].image
    picture = Image.new("RGB", (64, 64), (200, 40, 40))
    answer = "".join(
        services.vision.stream(
            picture, [{"role": "user", "content": "What is it?"}], GenerationParams(max_tokens=4, temperature=0)
        )
    )
    assert answer
    second = services.images.generate(request, save=False).images[0].image
    assert np.array_equal(np.asarray(first), np.asarray(second)), "the parked pipeline must draw the same pixels"
    image_label = services.images.load_spec(services.images.resolve_model()).label
    actions = [r.action for r in services.manager.status().history if r.label == image_label]
    assert actions == ["load", "park", "unpark"]
    assert [p.kind for p in services.manager.status().parked] == ["vision"]


def test_the_status_panel_lists_parked_models() -> None:
    from webui.common import format_status

    machine = Machine(tier_gib=16)
    machine.use("a")
    machine.use("b")
    text = format_status(machine.manager.status())
    assert "Parked in RAM" in text and "image:a.bin (4.00 GiB)" in text and "of 16.00 GiB" in text


def test_the_arena_packs_tensors_of_any_dtype_into_shared_blocks() -> None:
    import torch

    from model_memory.torch_parking import PinnedArena

    arena = PinnedArena(pin=False, block_bytes=4096)  # pinning needs CUDA; the packing is the same
    sources = [
        torch.arange(10, dtype=torch.float16),
        torch.arange(7, dtype=torch.float32).reshape(7, 1),
        torch.tensor([True, False, True]),
        torch.arange(300, dtype=torch.int64).reshape(3, 100),  # 2400 bytes: the first block still holds it
        torch.arange(1000, dtype=torch.float32),  # 4000 bytes: starts a second block
        torch.arange(2000, dtype=torch.float32),  # larger than a block: its own allocation
        torch.empty(0, 3),
    ]
    copies = []
    for source in sources:
        copy = arena.empty_like(source)
        copy.copy_(source)
        copies.append(copy)
    for source, copy in zip(sources, copies, strict=True):
        assert copy.dtype == source.dtype and copy.shape == source.shape and torch.equal(copy, source)
    assert (
        copies[0].untyped_storage().data_ptr()
        == copies[1].untyped_storage().data_ptr()
        == copies[2].untyped_storage().data_ptr()
    )
    assert copies[1].data_ptr() % 64 == 0 and copies[2].data_ptr() % 64 == 0
    assert copies[3].untyped_storage().data_ptr() == copies[0].untyped_storage().data_ptr()
    assert copies[4].untyped_storage().data_ptr() != copies[0].untyped_storage().data_ptr()
    assert arena.allocated_bytes == 2 * 4096 + 8000, "two blocks and the one large tensor"


def test_parking_a_model_on_the_cpu_leaves_it_alone() -> None:
    import torch

    from model_memory.torch_parking import park_modules, unpark_modules

    layer = torch.nn.Linear(4, 4)
    address = layer.weight.data_ptr()
    assert park_modules([layer]) == 0
    unpark_modules([layer], "cpu")
    assert layer.weight.data_ptr() == address
