"""Image generation overhead: generator.py against a plain diffusers pipeline call, in one run.

Both sides use the same weights, scheduler, steps, size, seed and device; each image is
timed alone, after a warm-up, alternating which side goes first. Prints seconds per image
and the overhead of generator.py (target <= 2%), and checks both drew the same pixels.

Without --model it builds the tiny random SD 1.5 from tests/tiny_diffusion.py: those numbers
measure the service's overhead only; absolute times only mean something on a GPU with real
weights. Usage: python bench/generate.py [--model FOLDER_OR_FILE.safetensors] [--runs N]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # tiny_diffusion

import offline  # noqa: F401, I001 - keep libraries offline

import argparse
import dataclasses
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from generator import ImageRequest, ImageService
from stable_diffusion.request import SCHEDULERS
from model_manager import GIB, ModelManager, detect_devices
from stable_diffusion.models import ImageModel
from stable_diffusion.pipeline import make_scheduler
from settings import ImageDefaults, ImageSettings

from PIL.PngImagePlugin import PngInfo
from rows import Row, write_rows

PROMPT = "a lighthouse on a cliff at dusk, oil painting"


def timed(run: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    image = run()
    return time.perf_counter() - started, image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="diffusers folder or .safetensors (default: tiny random SD 1.5)")
    parser.add_argument("--config", type=Path, help="config folder for a single-file model (default: configs/)")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=None, help="default: 20 (tiny model 20, SDXL-Turbo 1)")
    parser.add_argument("--size", type=int, default=None, help="width and height (default: 512, tiny 128)")
    parser.add_argument("--scheduler", choices=SCHEDULERS, default="euler_a")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", type=Path, help="also write the figures here (for bench/run.py)")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as scratch:
        model, config_dirs, tiny = args.model, None, args.model is None
        if tiny:
            from tiny_diffusion import build_sd15

            built = build_sd15(Path(scratch))
            model, config_dirs = built.folder, {"sd15": built.config, "sdxl": built.config}
        elif args.config is not None:
            config_dirs = {"sd15": args.config, "sdxl": args.config}
        size = args.size or (128 if tiny else 512)
        settings = ImageSettings(
            model=str(Path(model).resolve()),
            outputs_dir=Path(scratch) / "outputs",
            min_size=64,
            max_size=max(size, 2048),
            defaults=ImageDefaults(width=size, height=size, scheduler=args.scheduler, seed=1),
        )
        manager = ModelManager(devices=detect_devices(24 * GIB), keep_alive_s=-1)
        service = ImageService(manager, settings, Path(scratch), config_dirs=config_dirs)
        bench(service, manager, args, size, tiny)
        manager.close()


def plain_pipeline(model: ImageModel, device: str) -> Any:
    """The same weights loaded the way the diffusers documentation shows, without the service."""
    import torch
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    options: dict[str, Any] = {"dtype": torch.float16 if device == "cuda" else torch.float32, "local_files_only": True}
    if model.family == "sd15":
        cls = StableDiffusionPipeline
        options |= {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    else:
        cls = StableDiffusionXLPipeline
        options |= {"add_watermarker": False}
    if model.path.is_dir():
        pipe = cls.from_pretrained(model.path, **options)
    else:
        pipe = cls.from_single_file(str(model.path), config=str(model.config), **options)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def bench(service: ImageService, manager: ModelManager, args: argparse.Namespace, size: int, tiny: bool) -> None:
    import torch

    resolved = service.resolve_model()
    steps = args.steps or (1 if resolved.family == "sdxl_turbo" else 20)
    guidance = 0.0 if resolved.family == "sdxl_turbo" else 7.0
    request = ImageRequest(PROMPT, steps=steps, guidance=guidance, seed=1)
    # Both sides run on the app's compute thread: torch work on a second thread would slow both.
    compute = manager.compute_thread(service.load_spec(resolved))
    started = time.perf_counter()
    pipe = compute.call(lambda: plain_pipeline(resolved, service.device))
    raw_load = time.perf_counter() - started
    pipe.scheduler = make_scheduler(args.scheduler, pipe.scheduler.config, resolved.family)
    saved = Path(tempfile.mkdtemp())

    def plain() -> Any:  # and the PNG the app always writes, with its parameters text
        generator = torch.Generator("cpu").manual_seed(1)
        image = pipe(
            prompt=PROMPT,
            width=size,
            height=size,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=generator,
            output_type="pil",
        ).images[0]
        info = PngInfo()
        info.add_text("parameters", PROMPT)
        image.save(saved / "plain.png", pnginfo=info)
        return image

    def ours() -> Any:
        return service.generate(request).images[0].image

    sides: dict[str, Callable[[], Any]] = {"diffusers": plain, "generator.py": ours}
    times: dict[str, list[float]] = {name: [] for name in sides}
    last: dict[str, Any] = {}
    for _ in range(args.warmup):
        for run in sides.values():
            compute.call(run)
    for index in range(args.runs):
        order = list(sides.items())
        if index % 2:
            order.reverse()  # alternate who goes first so drift hits both sides alike
        for name, run in order:
            seconds, last[name] = timed(lambda run=run: compute.call(run))
            times[name].append(seconds)
    ours_load = manager.status().resident[0].load_seconds
    same = np.array_equal(np.asarray(last["diffusers"]), np.asarray(last["generator.py"]))
    raw_s, ours_s = statistics.median(times["diffusers"]), statistics.median(times["generator.py"])
    label = "tiny random SD 1.5 (measures overhead only)" if tiny else f"{resolved.name} ({resolved.family})"
    print(f"model: {label}  device: {service.device}  torch threads: {torch.get_num_threads()}")
    print(f"{size}x{size}, {steps} steps, {args.scheduler}, {args.runs} runs after {args.warmup} warm-up")
    print(f"{'':18}{'diffusers':>12}{'generator.py':>14}{'ratio':>9}")
    print(f"{'load (s)':18}{raw_load:12.3f}{ours_load:14.3f}{ours_load / raw_load:9.3f}")
    print(f"{'s/image (median)':18}{raw_s:12.4f}{ours_s:14.4f}{ours_s / raw_s:9.3f}")
    for label_, pick in (("s/image (fastest)", min), ("s/image (slowest)", max)):
        raw_t, ours_t = pick(times["diffusers"]), pick(times["generator.py"])
        print(f"{label_:18}{raw_t:12.4f}{ours_t:14.4f}{ours_t / raw_t:9.3f}")
    best = min(times["generator.py"]) / min(times["diffusers"])
    print(f"overhead (target <= 2%): median {100 * (ours_s / raw_s - 1):+.2f}%, fastest run {100 * (best - 1):+.2f}%")
    print(f"same pixels from both: {'yes' if same else 'NO'}")
    rows = [
        Row(
            f"image s/image +PNG ({resolved.name}, {size}px, {steps} steps)",
            "s",
            raw_s,
            ours_s,
            False,
            None,
            1.02,
        ),
        Row("image: same pixels as diffusers (1 = yes)", "same", None, float(same), minimum=1),
    ]
    rows += workflows(service, pipe, args, size, steps, guidance)
    write_rows(args.json, rows)
    if tiny or service.device == "cpu":
        print("note: absolute times only count on a GPU with real weights; the tiny model measures overhead only")


def workflows(
    service: ImageService, pipe: Any, args: argparse.Namespace, size: int, steps: int, guidance: float
) -> list[Row]:
    """img2img, inpainting and the hires fix: generator.py against diffusers' own pipelines built with
    from_pipe on the same weights, doing the same work at the same seed."""
    import torch
    from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting
    from PIL import Image

    start = service.generate(ImageRequest(PROMPT, steps=steps, guidance=guidance, seed=7), save=False).images[0].image
    mask = Image.new("L", (size, size), 0)
    mask.paste(255, (0, 0, size // 2, size))
    image2image, inpainting = AutoPipelineForImage2Image.from_pipe(pipe), AutoPipelineForInpainting.from_pipe(pipe)
    for derived in (image2image, inpainting):
        derived.set_progress_bar_config(disable=True)
    common = {"prompt": PROMPT, "num_inference_steps": steps, "guidance_scale": guidance, "output_type": "pil"}

    def seeded() -> Any:
        return torch.Generator("cpu").manual_seed(1)

    def plain_hires() -> Any:
        first = pipe(width=size, height=size, generator=seeded(), **common).images[0]
        bigger = first.resize((size * 2, size * 2), Image.Resampling.LANCZOS)
        return image2image(image=bigger, strength=0.5, generator=seeded(), **common).images[0]

    def plain_inpainting() -> Any:  # the unmasked area pasted back, as generator.py does
        image = inpainting(
            image=start, mask_image=mask, strength=1.0, width=size, height=size, generator=seeded(), **common
        ).images[0]
        return inpainting.image_processor.apply_overlay(mask, start, image)

    def plain_latent_hires() -> Any:
        latents = pipe(width=size, height=size, generator=seeded(), **{**common, "output_type": "latent"}).images
        bigger = torch.nn.functional.interpolate(latents, size=(size * 2 // 8, size * 2 // 8), mode="bilinear")
        return image2image(image=bigger, strength=0.5, generator=seeded(), **common).images[0]

    small_mask = Image.new("L", (size, size), 0)
    small_mask.paste(255, (size // 8, size // 8, size // 4, size // 4))
    base = ImageRequest(PROMPT, steps=steps, guidance=guidance, seed=1)
    masked = dataclasses.replace(base, init_image=start, mask=mask, strength=1.0, mask_blur=0)
    cases: dict[str, tuple[Callable[[], Any], ImageRequest]] = {
        "img2img 0.6": (
            lambda: image2image(image=start, strength=0.6, generator=seeded(), **common).images[0],
            ImageRequest(PROMPT, steps=steps, guidance=guidance, seed=1, init_image=start, strength=0.6),
        ),
        "inpainting": (plain_inpainting, masked),
        "only masked": (
            lambda: inpainting(
                image=start,
                mask_image=small_mask,
                strength=1.0,
                width=size,
                height=size,
                padding_mask_crop=32,
                generator=seeded(),
                **common,
            ).images[0],
            dataclasses.replace(masked, mask=small_mask, inpaint_area="only_masked", inpaint_padding=32),
        ),
        "hires fix 2x": (plain_hires, dataclasses.replace(base, hires_scale=2, hires_strength=0.5)),
        "hires latent 2x": (
            plain_latent_hires,
            dataclasses.replace(base, hires_scale=2, hires_strength=0.5, hires_upscaler="Latent"),
        ),
    }
    print(f"{'':18}{'diffusers':>12}{'generator.py':>14}{'ratio':>9}  same pixels")
    rows: list[Row] = []
    for name, (plain, request) in cases.items():
        sides: dict[str, Callable[[], Any]] = {
            "diffusers": plain,
            "generator.py": lambda request=request: service.generate(request, save=False).images[0].image,
        }
        times: dict[str, list[float]] = {side: [] for side in sides}
        last: dict[str, Any] = {}
        compute = service._manager.compute_thread(service.load_spec(service.resolve_model()))
        for run in sides.values():
            compute.call(run)  # warm
        for index in range(max(3, args.runs // 2)):
            order = list(sides.items())
            if index % 2:
                order.reverse()
            for side, run in order:
                seconds, last[side] = timed(lambda run=run, compute=compute: compute.call(run))
                times[side].append(seconds)
        raw, ours = statistics.median(times["diffusers"]), statistics.median(times["generator.py"])
        same = np.array_equal(np.asarray(last["diffusers"]), np.asarray(last["generator.py"]))
        print(f"{name + ' (s)':18}{raw:12.4f}{ours:14.4f}{ours / raw:9.3f}  {'yes' if same else 'NO'}")
        rows.append(
            Row(
                f"image {name} s/image",
                "s",
                raw,
                ours,
                False,
                maximum=1.03,
            )
        )
        rows.append(Row(f"image {name}: same pixels (1 = yes)", "same", None, float(same), minimum=1))
    return rows


if __name__ == "__main__":
    main()
