"""Image generation with Stable Diffusion 1.5, SDXL and SDXL-Turbo through diffusers.

The service finds the configured model (a diffusers folder or one .safetensors
checkpoint, loaded offline against the config folders shipped in configs/),
tells its family from the weights, checks each request up front, borrows the
pipeline from the model manager, applies the request's LoRAs and scheduler to
the loaded pipeline (neither reloads the base model), and generates the images
one seed at a time, reporting each step and stopping between steps on cancel.
Every image is saved as a PNG carrying AUTOMATIC1111-style "parameters" text,
which ``image_metadata.read_png_parameters`` turns back into a request.

The parts live beside it: image_request (what a request may ask for),
sd_models (model files on disk), sd_pipeline (loading them into diffusers),
lora (prompt tags and LoRA files) and image_metadata (the parameters text, PNGs).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from PIL import Image

from errors import AppError, BadInputError, ModelLoadError, ModelMissingError, OutOfMemoryError, RequestCancelledError
from media.images import ImageSource, load_image, load_mask, transparent_area
from model_manager import GIB, Loader, LoadSpec, ModelManager
from settings import ImageSettings
from stable_diffusion.lora import LoraFile, check_lora_fits, inspect_lora, lora_hash
from stable_diffusion.metadata import format_parameters, save_png
from stable_diffusion.models import (
    FAMILY_NAMES,
    SHIPPED_CONFIGS,
    ImageModel,
    detect_family,
    estimate_weight_bytes,
    folder_weight_files,
    is_inpainting_model,
    model_hash,
    read_cross_attention_dim,
)
from stable_diffusion.pipeline import (
    LoadedImageModel,
    load_image_pipeline,
    make_scheduler,
    park_image_pipeline,
    unpark_image_pipeline,
)
from stable_diffusion.prompt_weights import check_weights, needs_encoding, plain_text
from stable_diffusion.prompt_weights import encode as encode_prompts
from stable_diffusion.prompt_weights import parse as parse_prompt
from stable_diffusion.request import HIRES_UPSCALERS, ImageRequest, Plan, plan_request

# The service's own names, and those that tests reach through this module (``generator.model_hash``).
__all__ = [
    "GeneratedImage",
    "GenerationResult",
    "ImageRequest",
    "ImageService",
    "folder_weight_files",
    "lora_hash",
    "model_hash",
]

log = logging.getLogger(__name__)

# Activations and scratch memory beyond the weights, for the manager's estimate.
WORKING_BYTES: dict[str, int] = {"sd15": GIB, "sdxl": 2 * GIB, "sdxl_turbo": 2 * GIB}


# ----------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class GeneratedImage:
    image: Image.Image
    seed: int
    path: Path | None  # where it was saved; None with save=False
    parameters: str  # AUTOMATIC1111-style text, also stored in the PNG


@dataclass(frozen=True)
class GenerationResult:
    images: tuple[GeneratedImage, ...]
    cancelled: bool
    model: str
    family: str
    seconds: float
    notices: tuple[str, ...] = ()  # adjustments the user should know about (SDXL-Turbo's guidance)
    steps_run: int = 0  # denoising steps actually run, over all images


PICTURE_REFUSE_PIXELS = 100_000_000  # a picture to start from larger than this is refused before decoding


class _Cancelled(Exception):
    """Raised from the step callback to stop the pipeline between steps."""


def _release_device_cache(device: str) -> None:
    """Hand cached, unused GPU memory back before a second try (nothing to do on the CPU)."""
    import gc

    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


class _StepCounter:
    """Counts the denoising steps that ran and passes them on to a progress callback."""

    def __init__(self, progress: Callable[[int, int], None] | None) -> None:
        self._progress = progress
        self.run = 0

    def step(self, done: int, total: int) -> None:
        self.run += 1
        if self._progress is not None:
            self._progress(done, total)


@dataclass
class _Job:
    """One generate call on a borrowed pipeline: what every image of it shares."""

    loaded: LoadedImageModel
    spec: LoadSpec
    plan: Plan
    steps: _StepCounter
    cancel: threading.Event | None
    notices: list[str]


# ----------------------------------------------------------------------------
# The service
# ----------------------------------------------------------------------------


def _pipeline_like(pipe: Any, task: str) -> Any:
    """The img2img or inpainting pipeline over ``pipe``'s own components (``from_pipe`` shares them)."""
    from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting

    kind = AutoPipelineForInpainting if task == "inpainting" else AutoPipelineForImage2Image
    derived = kind.from_pipe(pipe)
    derived.set_progress_bar_config(disable=True)  # progress goes to the caller's callback
    return derived


def _inpainting_start(picture: Image.Image | None, mask: Image.Image | None, width: int, height: int) -> dict[str, Any]:
    """The inpainting pipeline's picture and mask. An inpainting checkpoint makes every picture this
    way: img2img masks all of the picture, text-to-image an empty one (the UNet sees no picture then)."""
    if picture is None:
        picture = Image.new("RGB", (width, height))
    if mask is None:
        mask = Image.new("L", picture.size, 255)
    return {"image": picture, "mask_image": mask, "width": picture.width, "height": picture.height}


def _upscaled(first: Any, plan: Plan, mode: str) -> Any:
    """The first pass at the hires size: latents interpolated by torch, or the picture resampled."""
    if isinstance(first, Image.Image):
        resample = Image.Resampling.LANCZOS if mode == "lanczos" else Image.Resampling.NEAREST
        return first.resize((plan.hires_width, plan.hires_height), resample)
    import torch

    size = (plan.hires_height // 8, plan.hires_width // 8)  # latents are an eighth of the picture
    return torch.nn.functional.interpolate(first, size=size, mode=mode)


class ImageService:
    def __init__(
        self,
        manager: ModelManager,
        settings: ImageSettings,
        models_dir: Path,
        *,
        device: str | None = None,
        config_dirs: Mapping[str, Path] | None = None,
    ) -> None:
        self._manager = manager
        self._settings = settings
        self._models_dir = models_dir
        self._device = device
        # Config folders for single-file checkpoints, by family; tests point these at tiny shapes.
        self._config_dirs = dict(config_dirs or SHIPPED_CONFIGS)
        self._model_cache: dict[Path, tuple[tuple[int, int], ImageModel]] = {}
        self._lora_cache: dict[Path, tuple[LoraFile, str]] = {}
        self._hashes: dict[tuple[Path, int, int], str] = {}
        self._cache_lock = threading.Lock()
        self._selected: Path | None = None  # a checkpoint picked on the Models page, instead of image.model
        manager.register_loader(
            "image",
            Loader(
                load=load_image_pipeline,
                estimate_bytes=self._estimate_bytes,
                on_compute_thread=True,
                park=park_image_pipeline,
                unpark=unpark_image_pipeline,
            ),
        )

    # -- where things are -------------------------------------------------

    @property
    def device(self) -> str:
        if self._device is None:
            import torch

            self._device = "cuda" if torch.cuda.is_available() else "cpu"
        return self._device

    @property
    def model_path(self) -> Path:
        if self._selected is not None:
            return self._selected
        path = Path(self._settings.model).expanduser()
        return path if path.is_absolute() else self._models_dir / path

    def installed_models(self) -> dict[str, Path]:
        """Every checkpoint that can be picked, by name: diffusers folders (with a model_index.json)
        and single .safetensors files in the models folder, besides the configured model."""
        found: dict[str, Path] = {}
        folder = self._models_dir
        if folder.is_dir():
            for path in sorted(folder.iterdir()):
                if path.name.startswith(".") or path == self.lora_dir:
                    continue
                if (path.is_dir() and (path / "model_index.json").is_file()) or (
                    path.is_file() and path.suffix == ".safetensors"
                ):
                    found[path.stem if path.is_file() else path.name] = path
        current = self.model_path
        if current.exists():
            found.setdefault(current.stem if current.is_file() else current.name, current)
        return found

    @property
    def selected_name(self) -> str:
        path = self.model_path
        return path.stem if path.is_file() else path.name

    def select_model(self, name: str) -> None:
        """Generate with ``name`` (one of ``installed_models``) from the next request on; the model
        manager swaps it in then. LoRAs stay as they are: each request names its own."""
        choices = self.installed_models()
        if name not in choices:
            available = ", ".join(choices) or "none"
            raise ModelMissingError(f"No image model named '{name}'. Installed: {available}.")
        self._selected = choices[name]

    def read_picture(self, source: ImageSource) -> Image.Image:
        """A picture to start from (img2img, inpainting), checked as every upload is."""
        return load_image(source, max_pixels=self._settings.max_size**2, refuse_pixels=PICTURE_REFUSE_PIXELS)

    def read_mask(self, source: ImageSource) -> Image.Image:
        """An inpainting mask, white (or transparent) where to repaint."""
        return load_mask(source, max_pixels=self._settings.max_size**2, refuse_pixels=PICTURE_REFUSE_PIXELS)

    def read_mask_for(self, picture: Image.Image, source: ImageSource) -> Image.Image:
        """The mask for ``picture``: of the picture's size (both may have been scaled down alike on
        reading); a mask of another size is refused, naming both."""
        mask = self.read_mask(source)
        if mask.size != picture.size:
            if abs(mask.width / mask.height - picture.width / picture.height) > 0.01 or mask.width < picture.width:
                raise BadInputError(
                    f"the mask is {mask.width}x{mask.height} but the picture is {picture.width}x{picture.height}; "
                    "make the mask the same size"
                )
            mask = mask.resize(picture.size)  # both were scaled down on reading, by a hair differently
        return mask

    def read_transparent_area(self, source: ImageSource) -> Image.Image | None:
        """A picture's own transparent area as an inpainting mask; None when it is opaque."""
        return transparent_area(source, max_pixels=self._settings.max_size**2, refuse_pixels=PICTURE_REFUSE_PIXELS)

    @property
    def default_scheduler(self) -> str:
        return self._settings.defaults.scheduler

    @property
    def lora_dir(self) -> Path:
        path = Path(self._settings.lora_dir).expanduser()
        return path if path.is_absolute() else self._models_dir / path

    def availability(self) -> str | None:
        """None when the model is in place; else what to put where."""
        path = self.model_path
        if path.exists():
            return None
        return (
            f"Image generation needs a Stable Diffusion model at {path}: place a diffusers folder "
            "(e.g. stable-diffusion-v1-5, sdxl-turbo) or a single .safetensors checkpoint there, "
            "or set image.model in config.yaml (see README)."
        )

    def list_loras(self) -> list[str]:
        folder = self.lora_dir
        if not folder.is_dir():
            return []
        return sorted(p.stem for p in folder.glob("*.safetensors") if p.is_file())

    # -- which model --------------------------------------------------------

    @property
    def inpainting_model_path(self) -> Path | None:
        """The dedicated inpainting checkpoint set in image.inpainting_model, if any."""
        if not self._settings.inpainting_model:
            return None
        path = Path(self._settings.inpainting_model).expanduser()
        return path if path.is_absolute() else self._models_dir / path

    def resolve_model(self, path: Path | None = None) -> ImageModel:
        """The model at ``path`` (default: the selected one), its family and shapes, cached until
        the file changes."""
        if path is None:
            message = self.availability()
            if message is not None:
                raise ModelMissingError(message)
            path = self.model_path
        stat = path.stat()
        key = (stat.st_size, stat.st_mtime_ns)
        with self._cache_lock:
            cached = self._model_cache.get(path)
            if cached is not None and cached[0] == key:
                return cached[1]
        # image.family describes the configured model; a checkpoint picked later is detected.
        configured = self._settings.family != "auto" and self._selected is None and path == self.model_path
        family = self._settings.family if configured else detect_family(path)
        config = None if path.is_dir() else self._config_dirs["sd15" if family == "sd15" else "sdxl"]
        try:
            dim = read_cross_attention_dim(config or path)
        except (OSError, ValueError, KeyError) as error:
            raise ModelLoadError(f"{path} has no readable unet/config.json ({error}); download it again") from None
        name = path.stem if path.is_file() else path.name
        model = ImageModel(path, name, family, dim, config, inpainting=is_inpainting_model(path))
        log.info("image model %s is %s%s", model.name, FAMILY_NAMES[family], " (inpainting)" * model.inpainting)
        with self._cache_lock:
            self._model_cache[path] = (key, model)
        return model

    def _model_for(self, request: ImageRequest, notices: list[str]) -> ImageModel:
        """The selected model; for a request with a mask, the dedicated inpainting checkpoint when it is there."""
        dedicated = self.inpainting_model_path
        if request.mask is None or dedicated is None:
            return self.resolve_model()
        if not dedicated.exists():
            notices.append(
                f"The inpainting model {dedicated.name} (image.inpainting_model) is not there: the selected "
                "model repainted the masked area."
            )
            return self.resolve_model()
        return self.resolve_model(dedicated)

    def load_spec(self, model: ImageModel) -> LoadSpec:
        """Everything that changes the weights in memory. LoRAs are not in it: they adapt the loaded pipeline."""
        dtype = "float16" if self.device.startswith("cuda") else "float32"
        options: dict[str, Any] = {"family": model.family, "dtype": dtype}
        if model.config is not None:
            options["config"] = str(model.config)
        if model.inpainting:
            options["inpainting"] = True
        return LoadSpec.of("image", model.path, device=self.device, **options)

    def _estimate_bytes(self, spec: LoadSpec) -> int:
        path = Path(spec.path)
        if not path.exists():
            raise ModelMissingError(self.availability() or f"{path} does not exist")
        bytes_per_value = 2 if spec.option("dtype") == "float16" else 4
        return estimate_weight_bytes(path, bytes_per_value) + WORKING_BYTES[spec.option("family")]

    # -- the request's LoRAs ------------------------------------------------

    def _loras_for(self, plan: Plan, model: ImageModel) -> list[tuple[LoraFile, float, str]]:
        """Each requested LoRA's file, checked against the model, with its weight and hash."""
        if not plan.loras:
            return []
        available = self.list_loras()
        chosen = []
        for name, weight in plan.loras:
            if name not in available or Path(name).name != name:
                listed = ", ".join(available) or "none (the folder is empty or missing)"
                raise BadInputError(f"there is no LoRA named '{name}' in {self.lora_dir}; available: {listed}")
            lora, digest = self._lora_file(name, self.lora_dir / f"{name}.safetensors")
            check_lora_fits(lora, model)
            chosen.append((lora, weight, digest))
        return chosen

    def _lora_file(self, name: str, path: Path) -> tuple[LoraFile, str]:
        stat = path.stat()
        with self._cache_lock:
            cached = self._lora_cache.get(path)
        if cached is not None and cached[0].fingerprint == (stat.st_size, stat.st_mtime_ns):
            return cached
        lora = inspect_lora(name, path)
        entry = (lora, lora_hash(path))
        with self._cache_lock:
            self._lora_cache[path] = entry
        return entry

    # -- generating ---------------------------------------------------------

    def generate(
        self,
        request: ImageRequest,
        *,
        progress: Callable[[int, int], None] | None = None,
        cancel: threading.Event | None = None,
        save: bool = True,
    ) -> GenerationResult:
        """Generate ``num_images`` images with seeds seed, seed+1, ...

        ``progress(step, total)`` is called after every denoising step, counted over all
        images. Setting ``cancel`` stops between steps: the images finished so far are
        returned with ``cancelled=True``. Saved images stay saved if a later one fails.
        """
        started = time.perf_counter()
        notices: list[str] = []
        model = self._model_for(request, notices)
        plan = plan_request(request, model.family, self._settings)
        notices[:0] = plan.notices
        if model.inpainting and plan.hires_scale > 1 and HIRES_UPSCALERS[plan.hires_upscaler][0] == "latent":
            raise BadInputError(
                f"{model.name} is an inpainting checkpoint: its hires fix works on the picture, not the latents; "
                "choose the Lanczos or Nearest upscaler"
            )
        check_weights(parse_prompt(plan.prompt))  # before the model is asked for
        check_weights(parse_prompt(plan.negative_prompt or ""))
        loras = self._loras_for(plan, model)
        images: list[GeneratedImage] = []
        cancelled = False
        steps = _StepCounter(progress)
        spec = self.load_spec(model)
        try:
            with self._manager.acquire(spec, cancel=cancel) as loaded:
                job = _Job(loaded, spec, plan, steps, cancel, notices)
                compute = self._manager.compute_thread(spec)  # where the model's torch work runs
                cancelled = compute.call(lambda: self._generate_all(job, model, loras, images, save))
        except RequestCancelledError:  # stopped while waiting for the model: nothing was generated
            cancelled = True
        seconds = time.perf_counter() - started
        return GenerationResult(
            tuple(images), cancelled, model.name, model.family, seconds, tuple(notices), steps_run=steps.run
        )

    def _generate_all(
        self,
        job: _Job,
        model: ImageModel,
        loras: list[tuple[LoraFile, float, str]],
        images: list[GeneratedImage],
        save: bool,
    ) -> bool:
        """Generate the plan's images into ``images``; True when cancelled before the end."""
        plan, cancel = job.plan, job.cancel
        self._prepare(job.loaded, plan, loras)
        model_hash_text = self._model_hash(model)
        lora_hashes = {lora.name: digest for lora, _, digest in loras}
        for index in range(plan.num_images):
            seed = plan.seed + index
            if cancel is not None and cancel.is_set():
                return True
            try:
                image = self._run_or_make_room(job, seed, index * plan.steps_run)
            except _Cancelled:
                return True
            parameters = format_parameters(plan, seed, model, model_hash_text, lora_hashes)
            path = self._save(image, parameters, seed) if save else None
            images.append(GeneratedImage(image, seed, path, parameters))
        return False

    def _prepare(self, loaded: LoadedImageModel, plan: Plan, loras: list[tuple[LoraFile, float, str]]) -> None:
        """Bring the loaded pipeline to this request's LoRAs, scheduler and VAE tiling."""
        self._apply_loras(loaded, [(lora, weight) for lora, weight, _ in loras if weight != 0])
        if loaded.scheduler_name != plan.scheduler:
            loaded.pipe.scheduler = make_scheduler(plan.scheduler, loaded.base_scheduler_config, loaded.family)
            loaded.scheduler_name = plan.scheduler
        tiling = plan.width * plan.height > self._settings.vae_tiling_above_pixels
        if tiling != loaded.tiling:
            vae = loaded.pipe.vae
            vae.enable_tiling() if tiling else vae.disable_tiling()
            loaded.tiling = tiling

    def _apply_loras(self, loaded: LoadedImageModel, wanted: list[tuple[LoraFile, float]]) -> None:
        """Load the adapters not yet loaded, drop the ones no longer asked for, set the weights."""
        pipe = loaded.pipe
        if not wanted:
            if loaded.adapters:
                pipe.unload_lora_weights()  # back to the untouched base model
                loaded.adapters.clear()
            return
        fingerprints = {lora.adapter: lora.fingerprint for lora, _ in wanted}
        stale = [name for name, fp in loaded.adapters.items() if fingerprints.get(name) != fp]
        if stale:
            pipe.delete_adapters(stale)
            for name in stale:
                del loaded.adapters[name]
        for lora, _ in wanted:
            if lora.adapter not in loaded.adapters:
                self._load_adapter(loaded, lora)
        pipe.set_adapters([lora.adapter for lora, _ in wanted], [weight for _, weight in wanted])

    @staticmethod
    def _load_adapter(loaded: LoadedImageModel, lora: LoraFile) -> None:
        import torch
        from safetensors.torch import load_file

        try:
            state = load_file(lora.path)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*Already found a `peft_config`.*")
                loaded.pipe.load_lora_weights(state, adapter_name=lora.adapter)
        except (MemoryError, torch.OutOfMemoryError):
            raise
        except Exception as error:
            with contextlib.suppress(Exception):
                loaded.pipe.delete_adapters([lora.adapter])
            raise BadInputError(
                f"LoRA '{lora.name}' could not be applied to this model ({type(error).__name__}: {error}); "
                "it may be made for another model family or in a format diffusers cannot read"
            ) from error
        loaded.adapters[lora.adapter] = lora.fingerprint
        log.info("loaded LoRA %s", lora.name)

    def _model_hash(self, model: ImageModel) -> str:
        """Hashing a checkpoint reads gigabytes: once per version of the file, not once per load
        (under one_at_a_time a model reloads after every swap)."""
        stat = model.path.stat()
        key = (model.path, stat.st_size, stat.st_mtime_ns)
        with self._cache_lock:
            known = self._hashes.get(key)
        if known is None:
            known = self._hash_from_manifest(model.path, stat.st_size) or model_hash(model.path)
            with self._cache_lock:
                self._hashes[key] = known
        return known

    def _hash_from_manifest(self, path: Path, size: int) -> str | None:
        """A single-file checkpoint's hash from models/manifest.json (written by 'models download' or
        'models manifest', checked by 'models verify'), so the first picture after a start does not
        wait for gigabytes to be read. None when the manifest does not list the file at this size."""
        from model_files.manifest import read_manifest

        try:
            relative = path.resolve().relative_to(self._models_dir.resolve()).as_posix()
            entry = read_manifest(self._models_dir)["files"].get(relative)
        except (ValueError, OSError, AppError):
            return None
        if path.is_dir() or entry is None or entry["size"] != size:
            return None
        return str(entry["sha256"])[:10]

    def _run_or_make_room(self, job: _Job, seed: int, done: int) -> Image.Image:
        """One image; when the device runs out of memory, unload the other idle models, decode with
        VAE tiling, and try once more (saying so) before giving up with the fix."""
        try:
            return self._run(job, seed, done)
        except OutOfMemoryError as error:
            freed = self._manager.make_room(job.spec)
            job.loaded.pipe.vae.enable_tiling()
            job.loaded.tiling = True
            _release_device_cache(job.spec.device)
            log.warning("out of memory making an image; unloaded %s, VAE tiling on; trying once more", freed or "none")
            try:
                image = self._run(job, seed, done)
            except OutOfMemoryError:
                raise error from None
        tried = f"unloaded {', '.join(freed)} and " if freed else ""
        job.notices.append(f"The {job.spec.device} ran out of memory: {tried}turned on VAE tiling, then the image fit.")
        return image

    def _run(self, job: _Job, seed: int, done: int) -> Image.Image:
        import torch

        plan, cancel, steps = job.plan, job.cancel, job.steps
        total = plan.steps_run * plan.num_images
        loaded = job.loaded

        passed = [done]  # steps of this image counted before the running pass

        def on_step_end(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            steps.step(min(passed[0] + step + 1, done + plan.steps_run), total)
            if cancel is not None and cancel.is_set():
                raise _Cancelled
            return tensors

        # Noise from a CPU generator: the same seed gives the same picture on any device.
        generator = torch.Generator("cpu").manual_seed(seed)
        pipe, start = loaded.pipe, {"width": plan.width, "height": plan.height}
        if plan.mask is not None or loaded.inpainting:  # the loaded components: no second copy
            pipe = _pipeline_like(loaded.pipe, "inpainting")
            start |= _inpainting_start(plan.init_image, plan.mask, plan.width, plan.height) | {
                "strength": plan.strength
            }
            if plan.inpaint_padding is not None:  # only the mask's area, enlarged to the full size
                start["padding_mask_crop"] = plan.inpaint_padding
        elif plan.init_image is not None:  # img2img takes its size from the (fitted) picture
            pipe = _pipeline_like(loaded.pipe, "image2image")
            start = {"image": plan.init_image, "strength": plan.strength}
        upscaler, mode = HIRES_UPSCALERS[plan.hires_upscaler] if plan.hires_scale > 1 else ("", "")
        prompts = self._prompt_arguments(loaded, plan)  # encoded once, for both passes of a hires fix
        try:
            output = pipe(
                **prompts,
                **start,
                num_inference_steps=plan.steps,
                guidance_scale=plan.guidance,
                generator=generator,
                callback_on_step_end=on_step_end,
                output_type="latent" if upscaler == "latent" else "pil",
            )
            image = output.images[0]
            if plan.mask is not None and plan.inpaint_padding is None and upscaler != "latent":
                # What the mask keeps stays the picture's own pixels, not their trip through the VAE
                # (diffusers does this itself when it crops to the mask).
                image = pipe.image_processor.apply_overlay(plan.mask, plan.init_image, image)
            if plan.hires_scale > 1:  # hires fix: upscale, then redraw the details at the larger size
                passed[0] = done + plan.first_pass_steps
                upscaled = _upscaled(output.images[:1] if upscaler == "latent" else image, plan, mode)
                second = {"image": upscaled}
                if loaded.inpainting:  # redraws all of the picture: a mask over everything
                    second = _inpainting_start(upscaled, None, plan.hires_width, plan.hires_height)
                image = _pipeline_like(loaded.pipe, "inpainting" if loaded.inpainting else "image2image")(
                    **prompts,
                    **second,
                    strength=plan.hires_strength,
                    num_inference_steps=plan.hires_steps,
                    guidance_scale=plan.guidance,
                    generator=torch.Generator("cpu").manual_seed(seed),
                    callback_on_step_end=on_step_end,
                    output_type="pil",
                ).images[0]
        except torch.OutOfMemoryError as error:
            size = f"{plan.hires_width}x{plan.hires_height}" if plan.hires_scale > 1 else f"{plan.width}x{plan.height}"
            raise OutOfMemoryError(
                f"the {self.device} ran out of memory making a {size} image; "
                "choose a smaller size (or hires scale), or unload other models"
            ) from error
        return image

    def _prompt_arguments(self, loaded: LoadedImageModel, plan: Plan) -> dict[str, Any]:
        """The prompts as the pipeline takes them: text when CLIP reads them as they are, else
        embeddings with AUTOMATIC1111's weights, BREAKs and length (``prompt_weights``)."""
        prompt, negative = parse_prompt(plan.prompt), parse_prompt(plan.negative_prompt or "")
        tokenizer = loaded.pipe.tokenizer
        longest = max(len(tokenizer(plain_text(chunks)).input_ids) - 2 for chunks in (prompt, negative))
        if not (needs_encoding(prompt, longest) or needs_encoding(negative, longest)):
            return {"prompt": plain_text(prompt), "negative_prompt": plain_text(negative) or None}
        return encode_prompts(loaded.pipe, loaded.family, plan.prompt, plan.negative_prompt or "", self.device)

    def _save(self, image: Image.Image, parameters: str, seed: int) -> Path:
        folder = self._settings.outputs_dir / datetime.now().strftime("%Y-%m-%d")
        try:
            return save_png(image, parameters, folder, seed)
        except OSError as error:
            raise AppError(
                f"the image could not be saved in {folder} ({error}); free some disk space or change "
                "image.outputs_dir in config.yaml"
            ) from error
