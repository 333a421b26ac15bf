"""What an image request may ask for, and its check against the limits in config.yaml.

``plan_request`` refuses a request that is out of bounds (with what to change)
and completes the rest with the defaults from image.defaults, giving the exact
``Plan`` that generation runs and the parameters text records.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageFilter

from errors import BadInputError
from settings import ImageSettings
from stable_diffusion.lora import lora_tags, merge_loras, parse_prompt_loras

# The schedulers offered, by the names AUTOMATIC1111 writes into its "parameters" text.
SAMPLER_NAMES: dict[str, str] = {
    "euler_a": "Euler a",
    "dpmpp_2m_karras": "DPM++ 2M Karras",
    "ddim": "DDIM",
    "euler": "Euler",
}
SCHEDULERS = tuple(SAMPLER_NAMES)

MAX_PROMPT_CHARS = 2000
TURBO_MAX_STEPS = 4
TURBO_DEFAULT_STEPS = 1
MAX_SEED = 2**64 - 1
DEFAULT_STRENGTH = 0.75  # img2img's usual denoising strength
DEFAULT_MASK_BLUR = 4
DEFAULT_HIRES_STRENGTH = 0.5
DEFAULT_INPAINT_PADDING = 32  # pixels kept around the mask when only the masked area is redrawn
MAX_INPAINT_PADDING = 256
# Hires fix upscalers by AUTOMATIC1111's names: latents interpolated by torch (the mode), or the
# decoded picture resampled by Pillow.
HIRES_UPSCALERS: dict[str, tuple[str, str]] = {
    "Latent": ("latent", "bilinear"),
    "Latent (bicubic)": ("latent", "bicubic"),
    "Latent (nearest)": ("latent", "nearest"),
    "Latent (nearest-exact)": ("latent", "nearest-exact"),
    "Lanczos": ("image", "lanczos"),
    "Nearest": ("image", "nearest"),
}
DEFAULT_HIRES_UPSCALER = "Lanczos"
INPAINT_AREAS = ("whole", "only_masked")


@dataclass(frozen=True)
class ImageRequest:
    """What to draw. None means the default from config.yaml (image.defaults)."""

    prompt: str
    negative_prompt: str | None = None
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    guidance: float | None = None
    seed: int | None = None  # -1: random
    num_images: int | None = None
    scheduler: str | None = None  # one of SCHEDULERS
    loras: tuple[tuple[str, float], ...] = ()  # added to <lora:name:weight> tags in the prompt
    init_image: Image.Image | None = None  # img2img: start from this picture (checked RGB, see media.images)
    mask: Image.Image | None = None  # inpainting: white repaints, black keeps (needs init_image)
    strength: float | None = None  # denoising strength, 0–1: how far from init_image the result may go
    mask_blur: int | None = None  # pixels of blur on the mask's edge
    inpaint_area: str = "whole"  # "whole": redraw the picture at its size; "only_masked": the mask's area, enlarged
    inpaint_padding: int | None = None  # "only_masked": pixels of context kept around the mask (default 32)
    resize_mode: str = "resize"  # how init_image meets width×height: "resize" (stretch) or "crop" (fill, then crop)
    hires_scale: float | None = None  # hires fix: upscale the result by this much (e.g. 2), then redraw it
    hires_strength: float | None = None  # the second pass's denoising strength (default 0.5)
    hires_steps: int | None = None  # the second pass's steps (default: the first pass's)
    hires_upscaler: str | None = None  # one of HIRES_UPSCALERS (default Lanczos)


@dataclass(frozen=True)
class Plan:
    """A request checked and completed with the defaults: exactly what will run."""

    prompt: str  # without <lora:...> tags: what the text encoder reads
    shown_prompt: str  # with the tags: what the parameters text records
    negative_prompt: str
    width: int
    height: int
    steps: int
    guidance: float
    seed: int
    num_images: int
    scheduler: str
    loras: tuple[tuple[str, float], ...]
    notices: tuple[str, ...]
    init_image: Image.Image | None = None  # at width×height
    mask: Image.Image | None = None  # "L", at width×height, blurred
    strength: float = 1.0
    mask_blur: int = 0
    inpaint_padding: int | None = None  # set: only the mask's area (with this margin) is redrawn, enlarged
    hires_scale: float = 1.0  # 1: no hires fix
    hires_strength: float = 0.5
    hires_steps: int = 0
    hires_width: int = 0
    hires_height: int = 0
    hires_upscaler: str = DEFAULT_HIRES_UPSCALER

    @property
    def first_pass_steps(self) -> int:
        """Denoising steps the first pass runs: img2img skips the first (1 - strength) of them."""
        return self.steps if self.init_image is None else max(1, int(self.steps * self.strength))

    @property
    def steps_run(self) -> int:
        """Denoising steps each image really runs, both passes of a hires fix together."""
        second = max(1, int(self.hires_steps * self.hires_strength)) if self.hires_scale > 1 else 0
        return self.first_pass_steps + second


def plan_request(request: ImageRequest, family: str, settings: ImageSettings) -> Plan:
    """Check the request against the limits and complete it with the defaults. Raises BadInputError."""
    defaults = settings.defaults
    prompt, tagged = parse_prompt_loras(_check_text("prompt", request.prompt))
    if not prompt:
        raise BadInputError("the prompt is empty; describe the image you want")
    negative = _check_text("negative prompt", _or(request.negative_prompt, defaults.negative_prompt))
    start = request.init_image
    if request.mask is not None and start is None:
        raise BadInputError("a mask needs the picture it belongs to: send the image to repaint with it")
    if request.mask is not None and start is not None and request.mask.size != start.size:
        (mask_w, mask_h), (width_w, height_h) = request.mask.size, start.size
        raise BadInputError(
            f"the mask is {mask_w}x{mask_h} but the picture is {width_w}x{height_h}; make the mask the same size"
        )
    own = (start.width // 8 * 8, start.height // 8 * 8) if start is not None else (defaults.width, defaults.height)
    width = _check_size(settings, "width", _or(request.width, own[0]))
    height = _check_size(settings, "height", _or(request.height, own[1]))
    turbo = family == "sdxl_turbo"
    steps = _or(request.steps, TURBO_DEFAULT_STEPS if turbo else defaults.steps)
    _check_range("steps", steps, 1, settings.max_steps, "image.max_steps")
    num_images = _or(request.num_images, 1)
    _check_range("the number of images", num_images, 1, settings.max_images, "image.max_images")
    guidance = _or(request.guidance, 0.0 if turbo else defaults.guidance)
    if not isinstance(guidance, int | float) or not 0 <= guidance <= 30:
        raise BadInputError(f"guidance must be a number between 0 and 30 (7 is typical), got {guidance!r}")
    scheduler = _or(request.scheduler, defaults.scheduler)
    if scheduler not in SAMPLER_NAMES:
        raise BadInputError(f"unknown scheduler '{scheduler}'; choose one of {', '.join(SCHEDULERS)}")
    seed = _or(request.seed, defaults.seed)
    if not _is_whole(seed) or not -1 <= seed <= MAX_SEED - num_images:
        raise BadInputError(f"seed must be -1 (random) or a whole number from 0 to {MAX_SEED - num_images}")
    if seed == -1:
        seed = random.randrange(2**32)
    notices: list[str] = []
    if turbo:
        guidance = _turbo_guidance(guidance, notices)
        if steps > TURBO_MAX_STEPS:
            raise BadInputError(
                f"SDXL-Turbo makes an image in 1 to {TURBO_MAX_STEPS} steps; {steps} steps were asked "
                "(leave steps empty for 1)"
            )
    strength = _or(request.strength, DEFAULT_STRENGTH if start is not None else 1.0)
    if not isinstance(strength, int | float) or not 0 < strength <= 1:
        raise BadInputError(f"denoising strength must be above 0 and at most 1 (0.75 is typical), got {strength!r}")
    mask_blur = _or(request.mask_blur, DEFAULT_MASK_BLUR)
    _check_range("mask blur", mask_blur, 0, 64, "a pixel count")
    if request.resize_mode not in ("resize", "crop"):
        raise BadInputError(f"resize mode must be resize or crop, not '{request.resize_mode}'")
    init_image = fit_image(start, width, height, request.resize_mode) if start is not None else None
    mask = None
    if request.mask is not None:
        mask = fit_image(request.mask.convert("L"), width, height, request.resize_mode)
        if mask.getextrema()[1] < 128:
            raise BadInputError("the mask marks nothing to repaint: paint the area to change white (or transparent)")
        if mask_blur:
            mask = mask.filter(ImageFilter.GaussianBlur(mask_blur))
    padding = _check_inpaint_area(request)
    hires = _check_hires(request, settings, width, height, steps)
    loras = merge_loras(tagged, request.loras)
    # The parameters text keeps the prompt as typed; LoRAs given apart from it are written in as tags.
    shown = f"{prompt} {lora_tags(loras)}" if request.loras else request.prompt.strip()
    return Plan(
        prompt=prompt,
        shown_prompt=shown,
        negative_prompt=negative,
        width=width,
        height=height,
        steps=steps,
        guidance=float(guidance),
        seed=seed,
        num_images=num_images,
        scheduler=scheduler,
        loras=loras,
        notices=tuple(notices),
        init_image=init_image,
        mask=mask,
        strength=float(strength),
        mask_blur=mask_blur if mask is not None else 0,
        inpaint_padding=padding if mask is not None else None,
        **hires,
    )


def _check_inpaint_area(request: ImageRequest) -> int | None:
    """The margin kept around the mask when only its area is redrawn; None for the whole picture."""
    if request.inpaint_area not in INPAINT_AREAS:
        raise BadInputError(f"the inpaint area must be whole or only_masked, not '{request.inpaint_area}'")
    if request.inpaint_area == "whole":
        return None
    padding = _or(request.inpaint_padding, DEFAULT_INPAINT_PADDING)
    _check_range("the masked area padding", padding, 0, MAX_INPAINT_PADDING, "pixels")
    return padding


def _check_hires(request: ImageRequest, settings: ImageSettings, width: int, height: int, steps: int) -> dict[str, Any]:
    scale = _or(request.hires_scale, 1.0)
    if not isinstance(scale, int | float) or not 1 <= scale <= 4:
        raise BadInputError(f"the hires fix scale must be from 1 (off) to 4, e.g. 2; got {scale!r}")
    if scale == 1:
        return {}
    strength = _or(request.hires_strength, DEFAULT_HIRES_STRENGTH)
    if not isinstance(strength, int | float) or not 0 < strength <= 1:
        raise BadInputError(f"the hires fix denoising strength must be above 0 and at most 1; got {strength!r}")
    hires_steps = _or(request.hires_steps, steps)
    _check_range("hires steps", hires_steps, 1, settings.max_steps, "image.max_steps")
    upscaler = _or(request.hires_upscaler, DEFAULT_HIRES_UPSCALER)
    if upscaler not in HIRES_UPSCALERS:
        known = ", ".join(HIRES_UPSCALERS)
        raise BadInputError(f"unknown hires upscaler '{str(upscaler)[:80]}'; choose one of {known}")
    size = {"hires_width": round(width * scale / 8) * 8, "hires_height": round(height * scale / 8) * 8}
    if max(size.values()) > settings.max_size:
        raise BadInputError(
            f"the hires fix makes the image {size['hires_width']}x{size['hires_height']}; the largest side allowed "
            f"is {settings.max_size} (image.max_size): choose a smaller scale or size"
        )
    chosen = {"hires_strength": float(strength), "hires_steps": hires_steps, "hires_upscaler": upscaler}
    return {"hires_scale": float(scale), **chosen, **size}


def fit_image(image: Image.Image, width: int, height: int, mode: str) -> Image.Image:
    """``image`` at width×height: stretched ("resize"), or scaled to cover and centre-cropped ("crop")."""
    if image.size == (width, height):
        return image.copy()
    if mode == "resize":
        return image.resize((width, height), Image.Resampling.LANCZOS)
    scale = max(width / image.width, height / image.height)
    covered = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.LANCZOS)
    left, top = (covered.width - width) // 2, (covered.height - height) // 2
    return covered.crop((left, top, left + width, top + height))


def _check_size(settings: ImageSettings, name: str, value: int) -> int:
    low, high = settings.min_size, settings.max_size
    if not _is_whole(value):
        raise BadInputError(f"{name} must be a whole number of pixels, got {value!r}")
    if value % 8:
        lower = max(low, value - value % 8)
        raise BadInputError(f"{name} {value} is not a multiple of 8; use {lower} or {lower + 8}")
    _check_range(name, value, low, high, "image.min_size / image.max_size")
    return value


def _turbo_guidance(guidance: float, notices: list[str]) -> float:
    if guidance > 0:
        notices.append(f"SDXL-Turbo works without guidance: the guidance {guidance:g} was set to 0.")
    return 0.0


# ----------------------------------------------------------------------------
# Small checks
# ----------------------------------------------------------------------------


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


def _check_text(name: str, text: str) -> str:
    if not isinstance(text, str):
        raise BadInputError(f"the {name} must be text")
    if len(text) > MAX_PROMPT_CHARS:
        raise BadInputError(
            f"the {name} is {len(text):,} characters; the limit is {MAX_PROMPT_CHARS:,}. Shorten it "
            "(the text encoder reads only the first 77 tokens anyway)"
        )
    return text


def _is_whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_range(name: str, value: int, low: int, high: int, setting: str) -> None:
    if not _is_whole(value):
        raise BadInputError(f"{name} must be a whole number, got {value!r}")
    if not low <= value <= high:
        raise BadInputError(f"{name} must be between {low} and {high} ({setting} in config.yaml), got {value}")
