"""GPU measurements in one run: swaps, peak memory and throughput of the real architectures.

Builds random-weight models of the real shapes from shipped configs (SD 1.5 and SDXL from configs/,
LLaVA-1.5-7B from bench/gpu_configs/), saves them the way the app loads them, and measures, each
beside the raw library doing the same work in the same run or beside a floor (bytes / bandwidth):
  1. host-to-device bandwidth (pinned, pageable), disk write and read bandwidth;
  2. per model: cold load (files dropped from the page cache) and warm load, the app (ModelManager and
     its service) against the raw library, alternating who goes first; unload;
  3. the warm tier: image -> vision -> image under one_at_a_time, the second image load with the tier
     on and off, against bytes / pinned host-to-device bandwidth;
  4. peak memory per model (SD 1.5 512x512 20 steps; LLaVA one 336x336 image, 64 new tokens) and the
     models resident together under vram_budget within the 24 GiB cap;
  5. throughput: s/image and tokens/s, the app against a plain pipeline call / generate on the same weights;
  6. image -> vision -> image -> vision under one_at_a_time, with the warm tier, and under vram_budget.
The process is capped at 24 GiB of GPU memory (set_per_process_memory_fraction) and the manager gets
a 24 GiB budget, so the large card behaves like the 24 GB workstation. Each step starts only if its
time allowance is left, and the figures are written after every step: a run cut short still leaves
what it measured. Random weights: the pictures and answers mean nothing; speed and memory do not
depend on the values. LLaVA runs in fp16 (bitsandbytes is not on the GPU machine).
With --device cpu --small the same code runs on test-size configs (a few minutes on two cores);
figures that need CUDA are marked so.
Usage: python bench/gpu_run.py [--device cuda|cpu] [--small] [--out DIR] [--budget-s S] [--no-sdxl]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent / "tests"))  # tiny_llava: tokenizer, chat template
sys.path.insert(2, str(Path(__file__).resolve().parent))  # rows, run.table

import offline  # noqa: F401, I001 - keep libraries offline

import argparse
import contextlib
import gc
import inspect
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import torch
from PIL import Image

from generator import ImageRequest, ImageService
from model_manager import GIB, LoadSpec, ModelManager, TransitionRecord, detect_devices
from settings import ImageDefaults, ImageSettings, VisionSettings
from text_generation.stream import GenerationParams
from vision import VisionService

from page_cache import drop_from_page_cache, flush_to_disk, read_all, read_bandwidth, size_of
from rows import Row
from run import table

ROOT = Path(__file__).resolve().parent.parent
CAP_BYTES = 24 * GIB  # the workstation card: the process cap and the manager's GPU budget
CONFIGS = ROOT / "configs"  # SD 1.5 and SDXL at their real shapes, with the real CLIP tokenizer
BENCH_CONFIGS = ROOT / "bench" / "gpu_configs"
PROMPT = "a lighthouse on a cliff at dusk, oil painting"
QUESTION = "Describe this image in detail."
STEPS = 20
NEW_TOKENS = 64
WARM_TIER_BYTES = {"cuda": 40 * GIB, "cpu": 2 * GIB}  # room for every model built here


# ----------------------------------------------------------------------------
# The run: options, clock, figures written as they come
# ----------------------------------------------------------------------------


@dataclass
class Run:
    device: str
    small: bool
    out: Path
    work: Path
    budget_s: float
    command: str
    started: float = field(default_factory=time.perf_counter)
    rows: list[Row] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    environment: dict[str, Any] = field(default_factory=dict)

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def left(self) -> float:
        return self.budget_s - self.elapsed()

    def log(self, message: str) -> None:
        print(f"[{self.elapsed():6.1f} s] {message}", flush=True)

    def note(self, message: str) -> None:
        self.notes.append(message)
        self.log(f"note: {message}")

    def add(self, name: str, unit: str, raw: float | None, app: float | None, **target: Any) -> None:
        target.setdefault("higher_is_better", unit not in ("s", "GiB"))
        self.rows.append(Row(name, unit, raw, app, **target))

    def needs_cuda(self, name: str, unit: str) -> None:
        """A figure only a GPU gives: listed, so the table shows what a GPU run adds."""
        self.rows.append(Row(f"{name} (needs CUDA)", unit, None, None))

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        results = {
            "environment": self.environment,
            "elapsed_s": round(self.elapsed(), 1),
            "figures": self.figures,
            "rows": [asdict(row) for row in self.rows],
            "notes": self.notes,
        }
        (self.out / "gpu_results.json").write_text(json.dumps(results, indent=1, default=str), encoding="utf-8")
        (self.out / "gpu_table.txt").write_text(self.report(), encoding="utf-8")

    def report(self) -> str:
        env = self.environment
        if self.cuda:
            where = f"{env.get('gpu')} ({env.get('gpu_total_gib')} GiB, capped at {CAP_BYTES / GIB:.0f} GiB)"
        else:
            where = "no GPU: the code path on the CPU"
        lines = [
            f"GPU run {env.get('date', '')}: {where}{', test-size configs' if self.small else ''}",
            f"command: {self.command}",
            f"torch {env.get('torch')}, transformers {env.get('transformers')}, diffusers {env.get('diffusers')}, "
            f"Python {env.get('python')}; {self.elapsed():.0f} s",
            "",
            table(self.rows),
        ]
        lines += ["", *[f"note: {note}" for note in self.notes]] if self.notes else []
        return "\n".join(lines)


def step(run: Run, name: str, allowance_s: float, work: Callable[[], None]) -> bool:
    """Run one step if its time allowance is left; a failure is noted and the run goes on."""
    if run.left() < allowance_s:
        run.note(f"skipped {name}: needs about {allowance_s:.0f} s, {max(0.0, run.left()):.0f} s left")
        return False
    run.log(f"{name} (allowance {allowance_s:.0f} s)")
    started = time.perf_counter()
    ok = True
    try:
        work()
    except Exception as error:
        ok = False
        traceback.print_exc()
        run.note(f"{name} failed: {type(error).__name__}: {str(error)[:300]}")
    finally:
        free_device_memory(run)
    run.figures.setdefault("step_seconds", {})[name] = round(time.perf_counter() - started, 1)
    run.log(f"{name}: {'done' if ok else 'FAILED'} in {time.perf_counter() - started:.1f} s")
    run.save()
    return ok


# ----------------------------------------------------------------------------
# Device and file helpers
# ----------------------------------------------------------------------------


def synchronise(run: Run) -> None:
    if run.cuda:
        torch.cuda.synchronize()


def free_device_memory(run: Run) -> None:
    gc.collect()
    if run.cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def timed(run: Run, work: Callable[[], Any]) -> tuple[float, Any]:
    """Seconds of ``work`` until the device is done with it, and its result."""
    synchronise(run)
    started = time.perf_counter()
    result = work()
    synchronise(run)
    return time.perf_counter() - started, result


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def device_memory(run: Run) -> dict[str, float]:
    """GiB in use: the whole device as the driver reports it, and this process's torch allocator."""
    if not run.cuda:
        return {}
    free, total = torch.cuda.mem_get_info()
    figures = {
        "device_used_gib": (total - free) / GIB,
        "torch_allocated_gib": torch.cuda.memory_allocated() / GIB,
        "torch_reserved_gib": torch.cuda.memory_reserved() / GIB,
    }
    smi = nvidia_smi("memory.used")
    if smi is not None:
        figures["nvidia_smi_used_gib"] = float(smi) / 1024
    return figures


def nvidia_smi(query: str) -> str | None:
    index = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0] or "0"
    try:
        done = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits", "-i", index],
            capture_output=True, text=True, timeout=10, check=True,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip().splitlines()[0] if done.stdout.strip() else None


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def history_since(manager: ModelManager, count: int) -> list[TransitionRecord]:
    return list(manager.status().history)[count:]


# ----------------------------------------------------------------------------
# Environment and bandwidths
# ----------------------------------------------------------------------------


def describe_environment(run: Run) -> None:
    import diffusers
    import transformers

    env = run.environment
    env |= {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": run.command,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "diffusers": diffusers.__version__,
        "cpu_cores": os.cpu_count(),
        "work_filesystem": filesystem_of(run.work),
        "small_configs": run.small,
    }
    if run.cuda:
        total = torch.cuda.mem_get_info()[1]
        env |= {
            "gpu": torch.cuda.get_device_name(),
            "gpu_total_gib": round(total / GIB, 1),
            "gpu_capability": ".".join(map(str, torch.cuda.get_device_capability())),
            "cuda": torch.version.cuda,
            "driver": nvidia_smi("driver_version"),
            "memory_cap_fraction": round(CAP_BYTES / total, 4),
        }
    for key, value in env.items():
        run.log(f"{key}: {value}")


def filesystem_of(path: Path) -> str:
    """The mount holding ``path``: a tmpfs or overlay keeps "cold" reads in RAM."""
    best = ("?", "?")
    resolved = str(path.resolve())
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) > 2 and resolved.startswith(parts[1]) and len(parts[1]) >= len(best[0]):
                best = (parts[1], parts[2])
    return f"{best[1]} at {best[0]}"


def measure_transfer(run: Run) -> None:
    """Host-to-device bandwidth from pinned and pageable memory, and device-to-host into pinned memory."""
    if not run.cuda:
        for name in ("host-to-device, pinned", "host-to-device, pageable", "device-to-host, pinned"):
            run.needs_cuda(f"bandwidth {name}", "GB/s")
        return
    size = 1 * GIB
    device = torch.empty(size, dtype=torch.uint8, device="cuda")
    pinned = torch.empty(size, dtype=torch.uint8, pin_memory=True).fill_(1)
    pageable = torch.empty(size, dtype=torch.uint8).fill_(1)  # touched: its pages exist

    def rate(copy: Callable[[], Any]) -> float:
        copy()  # warm-up
        seconds = [timed(run, copy)[0] for _ in range(5)]
        return size / statistics.median(seconds) / 1e9

    figures = {
        "h2d_pinned_gbps": rate(lambda: device.copy_(pinned, non_blocking=True)),
        "h2d_pageable_gbps": rate(lambda: device.copy_(pageable)),
        "d2h_pinned_gbps": rate(lambda: pinned.copy_(device, non_blocking=True)),
    }
    run.figures["bandwidth"] = run.figures.get("bandwidth", {}) | figures
    run.add("bandwidth host-to-device, pinned (1 GiB)", "GB/s", None, figures["h2d_pinned_gbps"])
    run.add("bandwidth host-to-device, pageable (1 GiB)", "GB/s", None, figures["h2d_pageable_gbps"])
    run.add("bandwidth device-to-host, pinned (1 GiB)", "GB/s", None, figures["d2h_pinned_gbps"])


def measure_disk(run: Run) -> None:
    """Write and read bandwidth of the disk under the work folder, with one test file."""
    size = (64 << 20) if run.small else GIB
    path = run.work / "disk-test.bin"
    block = os.urandom(16 << 20)
    started = time.perf_counter()
    with path.open("wb") as handle:
        for _ in range(size // len(block)):
            handle.write(block)
        handle.flush()
        os.fsync(handle.fileno())
    write = size / (time.perf_counter() - started)
    cold = read_bandwidth(path, cold=True)
    cache = read_bandwidth(path, cold=False)
    path.unlink()
    figures = {"disk_write_gbps": write / 1e9, "disk_read_gbps": cold / 1e9, "page_cache_read_gbps": cache / 1e9}
    run.figures["bandwidth"] = run.figures.get("bandwidth", {}) | figures
    run.log(
        f"disk: write {write / 1e9:.2f} GB/s, read {cold / 1e9:.2f} GB/s, page cache {cache / 1e9:.2f} GB/s"
        f" ({run.environment.get('work_filesystem')})"
    )
    if cold > 0.7 * cache:
        run.note("a cold read ran near page-cache speed: the page cache may not have been dropped (tmpfs, overlay?)")


def bandwidth(run: Run, name: str, default: float) -> float:
    """A measured bandwidth in bytes/s, or ``default`` GB/s when it was not measured."""
    return run.figures.get("bandwidth", {}).get(name, default) * 1e9


# ----------------------------------------------------------------------------
# Building random-weight models of the real shapes
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Built:
    name: str  # "sd15", "sdxl" or "llava"
    label: str  # for the table
    kind: str  # the manager's kind: "image" or "vision"
    folder: Path
    bytes: int


def model_dtype(run: Run) -> torch.dtype:
    return torch.float16 if run.cuda else torch.float32  # what the app loads on each device


def config_root(run: Run, family: str) -> Path:
    return BENCH_CONFIGS / "small" / family if run.small else CONFIGS / family


def build_image_model(run: Run, family: str) -> Built:
    """A diffusers folder of SD 1.5 or SDXL with random weights; the real CLIP tokenizer and scheduler."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    def read(component: str) -> dict[str, Any]:
        return json.loads((config_root(run, family) / component / "config.json").read_text(encoding="utf-8"))

    dtype = model_dtype(run)
    parts: dict[str, Any] = {
        "tokenizer": CLIPTokenizer.from_pretrained(CONFIGS / family / "tokenizer"),
        "scheduler": scheduler_for(family),
    }
    with torch.device(run.device), default_dtype(dtype):  # made where they run: fast on a GPU
        parts["unet"] = UNet2DConditionModel.from_config(read("unet"))
        parts["vae"] = AutoencoderKL.from_config(read("vae"))
        parts["text_encoder"] = CLIPTextModel._from_config(CLIPTextConfig.from_dict(read("text_encoder")), dtype=dtype)
        if family == "sdxl":
            encoder_2 = CLIPTextConfig.from_dict(read("text_encoder_2"))
            parts["text_encoder_2"] = CLIPTextModelWithProjection._from_config(encoder_2, dtype=dtype)
    if family == "sdxl":
        parts["tokenizer_2"] = CLIPTokenizer.from_pretrained(CONFIGS / family / "tokenizer_2")
        pipe = StableDiffusionXLPipeline(**parts, add_watermarker=False)
    else:
        extra = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
        pipe = StableDiffusionPipeline(**parts, **extra)
    folder = run.work / "models" / family
    pipe.save_pretrained(folder)
    del pipe, parts
    label = {"sd15": "SD1.5", "sdxl": "SDXL"}[family] + (" small" if run.small else "")
    return finish_build(run, Built(family, label, "image", folder, 0))


def scheduler_for(family: str) -> Any:
    from diffusers import EulerDiscreteScheduler, PNDMScheduler

    config = json.loads((CONFIGS / family / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8"))
    cls = PNDMScheduler if config.get("_class_name") == "PNDMScheduler" else EulerDiscreteScheduler
    return cls.from_config(config)


def llava_tokenizer(vocab_size: int) -> Any:
    """The test models' byte-level BPE with LLaVA's special tokens, filled up to the model's vocabulary
    with tokens that decode to text: the tokenizer stays small to build, yet every id the random model
    can pick decodes, as with the real one."""
    from tiny_llava import build_tokenizer, fast_tokenizer
    from tokenizers import Tokenizer

    base = build_tokenizer()
    state = json.loads(base.backend_tokenizer.to_str())
    vocab = state["model"]["vocab"]
    for token_id in range(len(vocab), vocab_size):
        vocab[f"\u0120w{token_id}"] = token_id  # "Ġ" is the byte-level space
    return fast_tokenizer(Tokenizer.from_str(json.dumps(state)))


def build_llava(run: Run) -> Built:
    """A LLaVA-1.5 folder in the transformers layout (model, processor, chat template), random weights."""
    from tiny_llava import CHAT_TEMPLATE, IMAGE_TOKEN
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    source = BENCH_CONFIGS / ("small/llava.json" if run.small else "llava-1.5-7b.json")
    data = json.loads(source.read_text(encoding="utf-8"))
    data = {k: v for k, v in data.items() if not k.startswith("_") and k != "model_type"}
    tokenizer = llava_tokenizer(data["text_config"]["vocab_size"])
    vision = data["vision_config"]
    # Token ids come from this tokenizer (the real one has <image> at 32000): they do not change the cost.
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    ids["pad_token_id"] = tokenizer.pad_token_id
    data["text_config"] |= ids
    data["image_token_index"] = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    data["pad_token_id"] = tokenizer.pad_token_id
    data["image_seq_length"] = (vision["image_size"] // vision["patch_size"]) ** 2
    config = LlavaConfig(**data)
    with torch.device(run.device):
        model = LlavaForConditionalGeneration._from_config(config, dtype=model_dtype(run)).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = None  # random weights: every answer runs its full length on both sides
    image_size = vision["image_size"]
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
        ),
        tokenizer=tokenizer,
        patch_size=vision["patch_size"],
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's class token
        chat_template=CHAT_TEMPLATE,
    )
    folder = run.work / "models" / ("llava-small" if run.small else "llava-1.5-7b")
    model.save_pretrained(folder, max_shard_size="5GB")
    processor.save_pretrained(folder)
    del model
    return finish_build(run, Built("llava", "LLaVA small" if run.small else "LLaVA-1.5-7B fp16", "vision", folder, 0))


def finish_build(run: Run, built: Built) -> Built:
    """Flush the files to disk (so a cold read can drop them) and record the size."""
    free_device_memory(run)
    started = time.perf_counter()
    flush_to_disk(built.folder)
    size = size_of(built.folder)
    run.figures.setdefault("models", {})[built.name] = {
        "folder_gib": size / GIB,
        "fsync_s": time.perf_counter() - started,
        "parameters_gib_on_disk": sum(f.stat().st_size for f in built.folder.rglob("*.safetensors")) / GIB,
    }
    run.log(f"built {built.label}: {size / 2**20:,.0f} MiB in {built.folder}")
    return Built(built.name, built.label, built.kind, built.folder, size)


# ----------------------------------------------------------------------------
# The app's side: a manager and its services, as main.py builds them
# ----------------------------------------------------------------------------


class WarmTierMissing(RuntimeError):
    pass


@contextlib.contextmanager
def managed(run: Run, policy: str = "one_at_a_time", warm_tier_bytes: int = 0) -> Iterator[ModelManager]:
    """A manager for one step, closed (its models unloaded) even when the step fails: the next step
    starts with the device empty."""
    manager = make_manager(run, policy, warm_tier_bytes)
    try:
        yield manager
    finally:
        manager.close()


def make_manager(run: Run, policy: str = "one_at_a_time", warm_tier_bytes: int = 0) -> ModelManager:
    options: dict[str, Any] = {
        "policy": policy,
        "devices": detect_devices(CAP_BYTES),
        "keep_alive_s": -1,  # nothing unloads behind the measurement's back
        "wait_timeout_s": 300.0,
    }
    if warm_tier_bytes:
        if "warm_tier_bytes" not in inspect.signature(ModelManager).parameters:
            raise WarmTierMissing("warm tier not available: ModelManager takes no warm_tier_bytes")
        options["warm_tier_bytes"] = warm_tier_bytes
    return ModelManager(**options)


def image_size(run: Run, model: Built) -> int:
    if run.small:
        return 64
    return 1024 if model.name == "sdxl" else 512


def image_service(run: Run, manager: ModelManager, model: Built, prime: bool) -> ImageService:
    size = image_size(run, model)
    settings = ImageSettings(
        model=str(model.folder),
        outputs_dir=run.work / "outputs",
        min_size=64,
        max_size=2048,
        defaults=ImageDefaults(width=size, height=size, steps=STEPS, scheduler="euler_a", seed=1),
    )
    service = ImageService(manager, settings, run.work / "models", device=run.device)
    if prime:
        prime_model_hash(run, service, model)
    return service


def prime_model_hash(run: Run, service: ImageService, model: Built) -> None:
    """The app hashes a model's weights once per service, before its first image (A1111's "Model hash"
    in the PNG text); done here, and timed, so the figures after it measure swaps and generation."""
    hashing = getattr(service, "_model_hash", None)
    if hashing is None:
        return
    seconds, _ = timed(run, lambda: hashing(service.resolve_model()))
    hashes = run.figures.setdefault("model_hash_s", {})
    if model.name not in hashes:
        run.add(f"{model.label}: hashing its weights before the first image", "s", None, seconds)
    hashes[model.name] = seconds


def vision_service(run: Run, manager: ModelManager, model: Built) -> VisionService:
    settings = VisionSettings(precision="fp16" if run.cuda else "fp32")
    return VisionService(
        manager, settings, model.folder, cuda_available=lambda: run.cuda, bitsandbytes_available=lambda: False
    )


def image_request(run: Run, model: Built) -> ImageRequest:
    size = image_size(run, model)
    return ImageRequest(PROMPT, width=size, height=size, steps=STEPS, guidance=7.0, seed=1, scheduler="euler_a")


def test_picture() -> Image.Image:
    """336x336, LLaVA-1.5's own input size: a gradient with three squares, the same pixels every run."""
    picture = Image.linear_gradient("L").resize((336, 336)).convert("RGB")
    for index, colour in enumerate([(220, 40, 40), (40, 160, 60), (40, 60, 220)]):
        picture.paste(colour, (20 + 105 * index, 120, 100 + 105 * index, 220))
    return picture


GREEDY = GenerationParams(temperature=0.0, top_p=1.0, max_tokens=NEW_TOKENS, seed=1, repeat_penalty=1.0)


def ask(vision: VisionService, picture: Image.Image) -> int:
    """One answer through the service; the number of tokens it generated."""
    stream = vision.stream(picture, [{"role": "user", "content": QUESTION}], GREEDY)
    for _ in stream:
        pass
    return stream.completion_tokens


class Module:
    """One model in one manager: its service, spec, a request through the app, and the raw library's
    load and request on the same files."""

    def __init__(self, run: Run, manager: ModelManager, model: Built, requests: bool = True) -> None:
        self.run, self.manager, self.model = run, manager, model
        if model.kind == "image":
            self.images = image_service(run, manager, model, prime=requests)
            self.spec: LoadSpec = self.images.load_spec(self.images.resolve_model())
        else:
            self.vision = vision_service(run, manager, model)
            self.spec = self.vision.load_spec()
            self.picture = test_picture()

    @property
    def compute(self) -> Any:
        return self.manager.compute_thread(self.spec)

    def request(self) -> float:
        """One request through the app: 1 (one image), or the tokens of the answer."""
        if self.model.kind == "image":
            self.images.generate(image_request(self.run, self.model), save=False)
            return 1.0
        return float(ask(self.vision, self.picture))

    def raw_load(self) -> Any:
        """The model loaded the way the libraries' documentation shows, on the device."""
        run, folder = self.run, self.model.folder
        if self.model.kind == "vision":
            from transformers import AutoProcessor, LlavaForConditionalGeneration

            model = LlavaForConditionalGeneration.from_pretrained(
                folder, local_files_only=True, device_map={"": run.device}, dtype=model_dtype(run)
            )
            return model, AutoProcessor.from_pretrained(folder, local_files_only=True)
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        options: dict[str, Any] = {"dtype": model_dtype(run), "local_files_only": True}
        if self.model.name == "sdxl":
            cls, options = StableDiffusionXLPipeline, options | {"add_watermarker": False}
        else:
            cls = StableDiffusionPipeline
            options |= {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
        pipe = cls.from_pretrained(folder, **options).to(run.device)
        pipe.set_progress_bar_config(disable=True)
        return pipe


def raw_image_call(run: Run, pipe: Any, model: Built) -> Any:
    """The plain diffusers call doing what the app's request does (same size, steps, guidance, seed)."""
    size = image_size(run, model)
    generator = torch.Generator("cpu").manual_seed(1)
    return pipe(
        prompt=PROMPT,
        width=size,
        height=size,
        num_inference_steps=STEPS,
        guidance_scale=7.0,
        generator=generator,
        output_type="pil",
    ).images[0]


def raw_generate(run: Run, model: Any, processor: Any, picture: Image.Image) -> int:
    """Plain transformers: template, preprocess, greedy generate; the number of new tokens."""
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    inputs = processor(images=picture, text=prompt, return_tensors="pt").to(model.device, dtype=model.dtype)
    output = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, repetition_penalty=1.0)
    return int(output.shape[1] - inputs["input_ids"].shape[1])


# ----------------------------------------------------------------------------
# 2. Loads: cold and warm, app against the raw library
# ----------------------------------------------------------------------------


def compare_loads(run: Run, model: Built, cold_runs: int, warm_runs: int) -> None:
    with managed(run) as manager:
        results = load_rounds(run, manager, Module(run, manager, model, requests=False), cold_runs, warm_runs)
    load_rows(run, model, results)


def load_rounds(run: Run, manager: ModelManager, module: Module, cold_runs: int, warm_runs: int) -> dict[str, Any]:
    """Load and unload times of both sides: cold rounds, then warm ones, alternating who goes first."""
    model = module.model
    results: dict[str, list[float]] = {}

    def borrow() -> None:
        with manager.acquire(module.spec):
            pass

    def app() -> tuple[float, float]:
        load, _ = timed(run, borrow)
        count = len(manager.status().history)
        unload, _ = timed(run, lambda: manager.unload(module.spec.label))
        unloads = [r for r in history_since(manager, count) if r.action == "unload"]
        return load, unloads[-1].seconds if unloads else unload

    def raw() -> tuple[float, float]:
        def here() -> tuple[float, float]:
            load, loaded = timed(run, module.raw_load)
            held = [loaded]  # the only reference left, so clearing it frees the model
            del loaded
            unload, _ = timed(run, lambda: (held.clear(), free_device_memory(run)))
            return load, unload

        return module.compute.call(here)

    round_index = 0
    for mode, runs in (("cold", cold_runs), ("warm", warm_runs)):
        if mode == "warm":
            read_all(model.folder)  # the files in the page cache
        for _ in range(runs):
            sides = [("app", app), ("raw", raw)]
            if round_index % 2:
                sides.reverse()  # alternate who goes first: drift and first-use costs hit both sides alike
            round_index += 1
            for side, load_and_unload in sides:
                if mode == "cold":
                    drop_from_page_cache(model.folder)
                load, unload = load_and_unload()
                results.setdefault(f"{side}_{mode}_load_s", []).append(load)
                results.setdefault(f"{side}_unload_s", []).append(unload)
                run.log(f"{model.label}: {side} {mode} load {load:.2f} s, unload {unload:.2f} s")
    return results


def load_rows(run: Run, model: Built, results: dict[str, list[float]]) -> None:
    figures = {name: {"median": median(values), "runs": values} for name, values in results.items()}
    run.figures.setdefault("loads", {})[model.name] = figures | {"bytes": model.bytes}
    m = {name: median(values) for name, values in results.items()}
    gib = f"{model.bytes / GIB:.1f} GiB" if model.bytes >= GIB else f"{model.bytes / 2**20:.0f} MiB"
    disk = bandwidth(run, "disk_read_gbps", 1.0)
    run.add(f"{model.label} cold load ({gib}), app vs raw library", "s", m.get("raw_cold_load_s"), m["app_cold_load_s"])
    run.add(f"{model.label} warm load, app vs raw library", "s", m.get("raw_warm_load_s"), m.get("app_warm_load_s"))
    run.add(f"{model.label} cold load (app) vs bytes/disk read", "s", model.bytes / disk, m["app_cold_load_s"])
    if run.cuda:
        pageable = bandwidth(run, "h2d_pageable_gbps", 1.0)
        run.add(f"{model.label} warm load (app) vs bytes/pageable H2D", "s", model.bytes / pageable,
                m.get("app_warm_load_s"))  # fmt: skip
    else:
        cache = bandwidth(run, "page_cache_read_gbps", 1.0)
        run.add(f"{model.label} warm load (app) vs bytes/page-cache read", "s", model.bytes / cache,
                m.get("app_warm_load_s"))  # fmt: skip
    run.add(f"{model.label} unload, app (memory back) vs raw (del+empty_cache)", "s", m.get("raw_unload_s"),
            m.get("app_unload_s"))  # fmt: skip


# ----------------------------------------------------------------------------
# 4 and 5. Peak memory, throughput, co-residency under vram_budget
# ----------------------------------------------------------------------------


def peak_and_throughput(run: Run, models: list[Built], measured: list[Built], runs: int) -> None:
    """Each model loaded in turn into one vram_budget manager (the earlier ones stay while they fit);
    for those in ``measured``, its weights and peak with requests, app against raw; then what is
    resident together."""
    with managed(run, "vram_budget") as manager:
        measure_each(run, manager, models, measured, runs)
        if len(models) > 1:
            co_residency(run, manager, models)


def measure_each(run: Run, manager: ModelManager, models: list[Built], measured: list[Built], runs: int) -> None:
    for model in models:
        module = Module(run, manager, model, requests=model in measured)
        if model not in measured:
            with manager.acquire(module.spec):
                pass
            continue
        before = torch.cuda.memory_allocated() if run.cuda else 0
        if run.cuda:
            torch.cuda.reset_peak_memory_stats()
        count = len(manager.status().history)
        with manager.acquire(module.spec) as loaded:
            pass
        figures: dict[str, Any] = {"transitions": [asdict(r) for r in history_since(manager, count)]}
        if run.cuda:
            figures["weights_gib"] = (torch.cuda.memory_allocated() - before) / GIB
        throughput(run, module, loaded, runs, figures)
        if run.cuda:
            figures["peak_gib"] = (torch.cuda.max_memory_allocated() - before) / GIB
            figures["peak_process_gib"] = torch.cuda.max_memory_allocated() / GIB
            figures |= device_memory(run)
        run.figures.setdefault("peaks", {})[model.name] = figures
        work = f"{image_size(run, model)}px {STEPS} steps" if model.kind == "image" else f"{NEW_TOKENS} new tokens"
        if run.cuda:
            run.add(f"{model.label} peak allocated ({work}), weights vs peak", "GiB", figures["weights_gib"],
                    figures["peak_gib"])  # fmt: skip
        else:
            run.needs_cuda(f"{model.label} peak allocated ({work})", "GiB")
        del loaded


def throughput(run: Run, module: Module, loaded: Any, runs: int, figures: dict[str, Any]) -> None:
    """The app's request against the raw library's call on the same weights, on the same thread."""
    model, compute = module.model, module.compute

    def raw() -> float:  # 1 image, or the tokens generated
        if model.kind == "image":
            raw_image_call(run, loaded.pipe, model)
            return 1.0
        return float(raw_generate(run, loaded.model, loaded.processor, module.picture))

    sides: dict[str, Callable[[], float]] = {"app": module.request, "raw": lambda: compute.call(raw)}
    results: dict[str, list[float]] = {"app": [], "raw": []}
    counts: dict[str, list[float]] = {"app": [], "raw": []}
    for side in sides.values():  # warm-up; the app's goes first (it sets the request's scheduler)
        timed(run, side)
    for index in range(runs):
        order = list(sides.items())
        if index % 2:
            order.reverse()
        for name, side in order:
            seconds, count = timed(run, side)
            counts[name].append(count)
            results[name].append(count / seconds if model.kind == "vision" else seconds)
    figures["throughput"] = {"runs": results, "counts": counts}
    app, raw_value = median(results["app"]), median(results["raw"])
    if model.kind == "image":
        size = image_size(run, model)
        name = f"{model.label} s/image ({size}px, {STEPS} steps, no PNG), app vs raw pipeline"
        run.add(name, "s", raw_value, app, higher_is_better=False, maximum=1.02)
    else:
        tokens = median(counts["app"])
        name = f"{model.label} tokens/s (336px image, {tokens:.0f} new tokens), app vs raw generate"
        run.add(name, "tokens/s", raw_value, app, minimum=0.97)
    run.log(f"{name}: raw {raw_value:.4g}, app {app:.4g}")


def co_residency(run: Run, manager: ModelManager, models: list[Built]) -> None:
    status = manager.status()
    resident = {r.label: r.size_bytes / GIB for r in status.resident}
    evicted = [r.label for r in status.history if r.action in ("unload", "park")]
    figures: dict[str, Any] = {"resident_gib": resident, "evicted": evicted} | device_memory(run)
    run.figures.setdefault("co_residency", []).append(figures)
    names = "+".join(m.name for m in models)
    fits = not evicted and len(resident) == len(models)
    run.add(f"co-resident under vram_budget ({names}): manager's sizes", "GiB", None, sum(resident.values()))
    if run.cuda:
        used = figures["device_used_gib"]
        run.add(f"co-resident ({names}): device used, fits 24 GiB = {'yes' if fits else 'no'}", "GiB", None, used,
                higher_is_better=False, maximum=CAP_BYTES / GIB)  # fmt: skip
    else:
        run.needs_cuda(f"co-resident ({names}): device used", "GiB")
    run.log(f"resident together: {resident}; evicted: {evicted or 'none'}")


# ----------------------------------------------------------------------------
# 3 and 6. The sequence image -> vision -> image -> vision, and the warm tier
# ----------------------------------------------------------------------------


def sequence(run: Run, name: str, policy: str, warm_tier_bytes: int, image: Built, llava: Built) -> dict[str, Any]:
    """Four requests in turn from nothing loaded (files in the page cache): the total, and each step's
    wall time and the transitions it caused."""
    with managed(run, policy, warm_tier_bytes) as manager:
        modules = {"image": Module(run, manager, image), "vision": Module(run, manager, llava)}
        steps = []
        host_before = host_memory(run)
        started = time.perf_counter()
        for kind in ("image", "vision", "image", "vision"):
            count = len(manager.status().history)
            seconds, _ = timed(run, modules[kind].request)
            records = history_since(manager, count)
            parked = sum(p.size_bytes for p in getattr(manager.status(), "parked", ())) / GIB
            steps.append({"kind": kind, "seconds": seconds, "transitions": [asdict(r) for r in records],
                          "parked_gib": parked, "host": host_memory(run)})  # fmt: skip
            summary = ", ".join(f"{r.action} {r.label} {r.seconds:.2f} s" for r in records) or "no swap"
            run.log(f"{name}: {kind} {seconds:.2f} s ({summary})")
        total = time.perf_counter() - started
    return {"total_s": total, "steps": steps, "host_before": host_before}


def host_memory(run: Run) -> dict[str, float]:
    """The process's RAM, and the pinned RAM torch's host allocator owns: it rounds each block up to a
    power of two and keeps freed blocks cached, so it can hold more than the tier counts."""
    import psutil

    figures = {"rss_gib": psutil.Process().memory_info().rss / GIB}
    if run.cuda:
        stats = torch.cuda.host_memory_stats()
        figures["pinned_owned_gib"] = stats.get("allocated_bytes.current", 0) / GIB
        figures["pinned_active_gib"] = stats.get("active_bytes.current", 0) / GIB
        figures["pinned_alloc_s"] = stats.get("host_alloc_time.total", 0) / 1e6
    return figures


def second_image_load(result: dict[str, Any]) -> dict[str, Any] | None:
    """The transition that brought the image model back at the third step (load or unpark)."""
    records = result["steps"][2]["transitions"]
    return next((r for r in records if r["action"] in ("load", "unpark") and r["label"].startswith("image:")), None)


def sequences(run: Run, image: Built, llava: Built) -> None:
    results: dict[str, Any] = {}
    configs = [
        ("one_at_a_time", "one_at_a_time", 0),
        ("one_at_a_time + warm tier", "one_at_a_time", WARM_TIER_BYTES[run.device]),
        ("vram_budget", "vram_budget", 0),
    ]
    for name, policy, warm in configs:
        try:
            results[name] = sequence(run, name, policy, warm, image, llava)
        except WarmTierMissing as error:
            run.note(str(error))
        except Exception as error:  # one policy failing leaves the others worth running
            traceback.print_exc()
            run.note(f"sequence under {name} failed: {type(error).__name__}: {str(error)[:300]}")
        run.figures["sequences"] = results
        run.save()
    swaps = "image,vision,image,vision"
    base = results.get("one_at_a_time", {}).get("total_s")
    if "vram_budget" in results:
        run.add(f"sequence {swaps}: vram_budget vs one_at_a_time", "s", base, results["vram_budget"]["total_s"],
                higher_is_better=False)  # fmt: skip
    warm = results.get("one_at_a_time + warm tier")
    if warm is None:
        run.add("warm tier: not available", "s", None, None)
        return
    run.add(f"sequence {swaps}: warm tier vs one_at_a_time", "s", base, warm["total_s"], higher_is_better=False)
    warm_tier_rows(run, image, results.get("one_at_a_time"), warm)


def warm_tier_rows(run: Run, image: Built, off: dict[str, Any] | None, on: dict[str, Any]) -> None:
    back_on = second_image_load(on)
    back_off = second_image_load(off) if off else None
    parks = [r for step in on["steps"] for r in step["transitions"] if r["action"] == "park"]
    if back_on is None or back_on["action"] != "unpark":
        run.note("warm tier on, but the image model was not moved back from RAM (no unpark record)")
    if back_on is not None:
        run.add(f"warm tier: {image.label} back at step 3, tier on vs off", "s",
                back_off["seconds"] if back_off else None, back_on["seconds"], higher_is_better=False)  # fmt: skip
    weights = run.figures.get("models", {}).get(image.name, {}).get("parameters_gib_on_disk", 0) * GIB
    if run.cuda and back_on is not None:
        floor = weights / bandwidth(run, "h2d_pinned_gbps", 1.0)
        run.add(f"warm tier: {image.label} unpark vs bytes/pinned H2D (target 1.5x)", "s", floor, back_on["seconds"],
                higher_is_better=False, maximum=1.5)  # fmt: skip
    elif not run.cuda:
        run.needs_cuda(f"warm tier: {image.label} unpark vs bytes/pinned H2D", "s")
    most_parked = max(step["parked_gib"] for step in on["steps"])
    if run.cuda:
        owned = max(step["host"]["pinned_owned_gib"] for step in on["steps"]) - on["host_before"]["pinned_owned_gib"]
        run.add("warm tier: pinned RAM torch took vs the most the tier counted", "GiB", most_parked, owned)
    else:
        run.needs_cuda("warm tier: pinned RAM torch took vs the most the tier counted", "GiB")
    for number, record in enumerate(parks, 1):
        name = record["label"].split(":", 1)[1]
        run.add(f"warm tier: park {number}, {name} into RAM ({record['bytes'] / GIB:.2f} GiB freed)", "s", None,
                record["seconds"])  # fmt: skip


# ----------------------------------------------------------------------------
# The order of the run, and each step's allowance
# ----------------------------------------------------------------------------


def estimate_s(run: Run, size_bytes: float, loads: int, fixed_s: float) -> float:
    """A step's allowance: its loads at the slower of disk and bus, plus fixed costs."""
    disk = bandwidth(run, "disk_read_gbps", 0.5)
    bus = bandwidth(run, "h2d_pageable_gbps", 2.0) if run.cuda else disk
    return loads * (size_bytes / min(disk, bus) + 2.0) + fixed_s


def build_allowance(run: Run, size_bytes: float) -> float:
    """Building writes the model and flushes it: bound by disk write speed."""
    return size_bytes / bandwidth(run, "disk_write_gbps", 0.5) * 1.5 + 30.0


SIZES = {"sd15": 2.2 * GIB, "sdxl": 7.0 * GIB, "llava": 14.2 * GIB}  # fp16 folders at the real shapes


def plan(run: Run, with_sdxl: bool) -> None:
    built: dict[str, Built] = {}
    step(run, "1. host-to-device bandwidth", 10, lambda: measure_transfer(run))
    step(run, "1. disk bandwidth", 30, lambda: measure_disk(run))

    def size(name: str) -> float:
        return built[name].bytes if name in built else (0.05 * GIB if run.small else SIZES[name])

    def build(name: str) -> None:
        built[name] = build_llava(run) if name == "llava" else build_image_model(run, name)

    step(run, "build SD1.5", build_allowance(run, size("sd15")), lambda: build("sd15"))
    step(run, "build LLaVA", build_allowance(run, size("llava")), lambda: build("llava"))
    if "sd15" in built:
        step(run, "1. disk read of the SD1.5 files", 20, lambda: measure_model_read(run, built["sd15"]))
    cap_memory(run)
    sd, llava = built.get("sd15"), built.get("llava")
    pair = [m for m in (sd, llava) if m is not None]
    runs = 3
    if pair:
        fixed = 40.0 if run.cuda else 60.0
        step(run, "4+5. peak memory, throughput, co-residency", estimate_s(run, sum(m.bytes for m in pair), 1, fixed),
             lambda: peak_and_throughput(run, pair, pair, runs))  # fmt: skip
    if sd and llava:
        allowance = estimate_s(run, 2 * (sd.bytes + llava.bytes), 3, 30.0)
        step(run, "3+6. sequences and the warm tier", allowance, lambda: sequences(run, sd, llava))
    if sd:
        step(run, "2. loads: SD1.5", estimate_s(run, sd.bytes, 12, 10.0), lambda: compare_loads(run, sd, 3, 3))
    if llava:
        llava_runs = 2 if run.left() > estimate_s(run, llava.bytes, 8, 60.0) else 1
        step(run, "2. loads: LLaVA", estimate_s(run, llava.bytes, 4 * llava_runs, 10.0),
             lambda: compare_loads(run, llava, 1, llava_runs))  # fmt: skip
    if with_sdxl:
        sdxl_steps(run, built, size("sdxl"))


def sdxl_steps(run: Run, built: dict[str, Built], size: float) -> None:
    """SDXL when time allows: build, loads, peak and s/image, then with the others under vram_budget."""
    if not step(run, "build SDXL", build_allowance(run, size) + estimate_s(run, size, 5, 40.0),
                lambda: built.__setitem__("sdxl", build_image_model(run, "sdxl"))):  # fmt: skip
        return
    sdxl = built["sdxl"]
    step(run, "4+5. SDXL peak and throughput", estimate_s(run, sdxl.bytes, 1, 30.0),
         lambda: peak_and_throughput(run, [sdxl], [sdxl], 2))  # fmt: skip
    everything = [built[name] for name in ("sd15", "llava", "sdxl") if name in built]
    step(run, "4. SD1.5, LLaVA and SDXL together under vram_budget",
         estimate_s(run, sum(m.bytes for m in everything), 1, 20.0),
         lambda: all_together(run, everything))  # fmt: skip
    step(run, "2. loads: SDXL", estimate_s(run, sdxl.bytes, 4, 10.0), lambda: compare_loads(run, sdxl, 1, 1))


def all_together(run: Run, models: list[Built]) -> None:
    """Every model asked for under vram_budget, the last one making a picture: what stays resident,
    what the manager evicts, and whether the last request still fits (the app retries once after an
    out-of-memory error, with the other models unloaded and VAE tiling on)."""
    with managed(run, "vram_budget") as manager:
        together(run, manager, models)


def together(run: Run, manager: ModelManager, models: list[Built]) -> None:
    modules = [Module(run, manager, model, requests=model is models[-1]) for model in models]
    for module in modules[:-1]:
        with manager.acquire(module.spec):
            pass
    if run.cuda:
        torch.cuda.reset_peak_memory_stats()
    last = modules[-1]
    notices: tuple[str, ...] = ()
    if last.model.kind == "image":
        seconds, result = timed(run, lambda: last.images.generate(image_request(run, last.model), save=False))
        notices = result.notices
    else:
        seconds, _ = timed(run, last.request)
    figures = {"last_request_s": seconds, "notices": list(notices)}
    if run.cuda:
        figures["peak_process_gib"] = torch.cuda.max_memory_allocated() / GIB
    run.figures.setdefault("all_together", {}).update(figures)
    for notice in notices:
        run.note(f"{last.model.label} beside the others: {notice}")
    co_residency(run, manager, models)


def measure_model_read(run: Run, model: Built) -> None:
    """Disk read bandwidth on the saved model files themselves (the floors use it)."""
    cold = read_bandwidth(model.folder, cold=True)
    cache = read_bandwidth(model.folder, cold=False)
    bandwidths = run.figures.setdefault("bandwidth", {})
    bandwidths |= {"disk_read_gbps": cold / 1e9, "page_cache_read_gbps": cache / 1e9}
    run.add(f"disk read, {model.label} files, page cache dropped", "GB/s", None, cold / 1e9)
    run.add(f"page-cache read, {model.label} files", "GB/s", None, cache / 1e9)
    if "disk_write_gbps" in bandwidths:
        run.add("disk write + fsync (1 GiB test file)", "GB/s", None, bandwidths["disk_write_gbps"])


def cap_memory(run: Run) -> None:
    """Make the large card behave like a 24 GiB one (after building: building may use more)."""
    if not run.cuda:
        return
    free_device_memory(run)
    total = torch.cuda.mem_get_info()[1]
    torch.cuda.set_per_process_memory_fraction(min(1.0, CAP_BYTES / total))
    run.log(f"GPU memory capped at {CAP_BYTES / GIB:.0f} GiB of {total / GIB:.1f} GiB; manager budget the same")


# ----------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------


def quiet_libraries() -> None:
    """No progress bars from diffusers and transformers: the log keeps to the figures."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="test-size configs (checks the code path on a CPU)")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default: $OUT, else bench/gpu-results)")
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / ".gpu-work", help="where the models are built")
    parser.add_argument("--budget-s", type=float, default=420.0, help="no step starts that would end after this")
    parser.add_argument("--no-sdxl", action="store_true", help="leave SDXL out")
    parser.add_argument("--keep", action="store_true", help="keep the built models")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device here: run with --device cpu --small")
    out = args.out or Path(os.environ.get("OUT") or ROOT / "bench" / "gpu-results")
    command = os.environ.get("GPU_COMMAND") or " ".join([Path(sys.executable).name, *sys.argv])
    run = Run(args.device, args.small, out, args.work, args.budget_s, command)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(124))  # a timeout still saves and prints the table
    shutil.rmtree(run.work, ignore_errors=True)
    run.work.mkdir(parents=True)
    if not run.cuda:
        # One torch thread: this thread builds the models and the app's compute thread runs them, each with
        # its own OpenMP team; two teams of two on two cores made a 0.2 s image take 29 s.
        torch.set_num_threads(1)
    quiet_libraries()
    try:
        describe_environment(run)
        plan(run, with_sdxl=not args.no_sdxl)
    finally:
        run.save()
        if not args.keep:
            shutil.rmtree(run.work, ignore_errors=True)
        print()
        print(run.report(), flush=True)
        print(f"\nresults: {run.out / 'gpu_results.json'} and {run.out / 'gpu_table.txt'}")


if __name__ == "__main__":
    main()
