"""AUTOMATIC1111's "parameters" text, and the PNG files that carry it.

Every image is saved as a PNG with a "parameters" text chunk written the way
AUTOMATIC1111 writes it; ``read_png_parameters`` reads it back from our PNGs or
A1111's, and ``request_from_parameters`` turns it into a request again.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import fields
from io import BytesIO
from pathlib import Path
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from errors import BadInputError
from stable_diffusion.lora import parse_prompt_loras
from stable_diffusion.models import ImageModel
from stable_diffusion.request import SAMPLER_NAMES, ImageRequest, Plan


# ----------------------------------------------------------------------------
# The parameters text (AUTOMATIC1111's "infotext")
# ----------------------------------------------------------------------------
def format_parameters(
    plan: Plan, seed: int, model: ImageModel, model_hash_text: str, lora_hashes: Mapping[str, str]
) -> str:
    """The text A1111 stores in a PNG's "parameters" chunk, field names and order as A1111 writes them."""
    values: dict[str, Any] = {
        "Steps": plan.steps,
        "Sampler": SAMPLER_NAMES[plan.scheduler],
        "CFG scale": float(plan.guidance),
        "Seed": seed,
        "Size": f"{plan.width}x{plan.height}",
        "Model hash": model_hash_text,
        "Model": model.name,
    }
    if plan.hires_scale > 1:
        values["Size"] = f"{plan.width}x{plan.height}"
        values["Denoising strength"] = plan.hires_strength
        values["Hires upscale"] = f"{plan.hires_scale:g}"
        values["Hires steps"] = plan.hires_steps
        values["Hires upscaler"] = plan.hires_upscaler
    if plan.init_image is not None:
        values["Denoising strength"] = plan.strength
    if plan.mask is not None:
        values["Mask blur"] = plan.mask_blur
    if plan.inpaint_padding is not None:
        values["Inpaint area"] = "Only masked"
        values["Masked area padding"] = plan.inpaint_padding
    if lora_hashes:
        values["Lora hashes"] = ", ".join(f"{name}: {value}" for name, value in lora_hashes.items())
    lines = [plan.shown_prompt]
    if plan.negative_prompt:
        lines.append(f"Negative prompt: {plan.negative_prompt}")
    lines.append(", ".join(f"{key}: {_quote(str(value))}" for key, value in values.items()))
    return "\n".join(lines)


def _quote(text: str) -> str:
    """A1111 quotes a value holding a comma, colon or newline as a JSON string."""
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


_PARAMETER = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_SCHEDULER_BY_SAMPLER = {sampler.lower(): name for name, sampler in SAMPLER_NAMES.items()}


def parse_parameters(text: str) -> dict[str, Any]:
    """AUTOMATIC1111 "parameters" text as a request-like dict (only the fields found).

    Keys: prompt (as written, <lora:...> tags included: generate reads them), negative_prompt,
    steps, scheduler (when the sampler is one of ours), sampler (as written), guidance, seed,
    width, height, model, model_hash, loras (the prompt's tags as (name, weight) pairs),
    lora_hashes, and for img2img, inpainting and the hires fix strength, mask_blur, inpaint_area,
    inpaint_padding, hires_scale, hires_strength, hires_steps and hires_upscaler (as written).
    """
    lines = text.strip().split("\n")
    values: dict[str, str] = {}
    if lines and len(_PARAMETER.findall(lines[-1])) >= 3:
        values = {key.strip(): _unquote(value.strip()) for key, value in _PARAMETER.findall(lines.pop())}
    prompt_lines: list[str] = []
    negative_lines: list[str] = []
    for line in lines:
        if negative_lines or line.startswith("Negative prompt:"):
            negative_lines.append(line.removeprefix("Negative prompt:").strip() if not negative_lines else line)
        else:
            prompt_lines.append(line)
    result: dict[str, Any] = {"prompt": "\n".join(prompt_lines).strip()}
    try:
        result["loras"] = tuple(parse_prompt_loras(result["prompt"])[1])
    except BadInputError:  # a foreign tag we cannot read: the prompt keeps it as written
        result["loras"] = ()
    result["negative_prompt"] = "\n".join(negative_lines).strip()
    result.update(_typed_parameters(values))
    return result


def _unquote(value: str) -> str:
    if value.startswith('"') and value.endswith('"'):
        with contextlib.suppress(json.JSONDecodeError):
            return str(json.loads(value))
    return value


def _typed_parameters(values: Mapping[str, str]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    converters: dict[str, tuple[str, Callable[[str], Any]]] = {
        "Steps": ("steps", int),
        "CFG scale": ("guidance", float),
        "Seed": ("seed", int),
        "Model": ("model", str),
        "Model hash": ("model_hash", str),
        "Denoising strength": ("strength", float),
        "Mask blur": ("mask_blur", int),
        "Hires upscale": ("hires_scale", float),
        "Hires steps": ("hires_steps", int),
        "Hires upscaler": ("hires_upscaler", str),
        "Masked area padding": ("inpaint_padding", int),
    }
    for key, (name, convert) in converters.items():
        if key in values:
            with contextlib.suppress(ValueError):
                result[name] = convert(values[key])
    if "hires_scale" in result and "strength" in result:  # A1111 writes the hires pass's strength there
        result["hires_strength"] = result.pop("strength")
    if values.get("Inpaint area") == "Only masked":
        result["inpaint_area"] = "only_masked"
    if "Size" in values:
        width, _, height = values["Size"].partition("x")
        with contextlib.suppress(ValueError):
            result["width"], result["height"] = int(width), int(height)
    if "Sampler" in values:
        sampler = values["Sampler"]
        result["sampler"] = sampler
        if values.get("Schedule type", "").lower() == "karras" and not sampler.lower().endswith("karras"):
            sampler += " Karras"  # A1111 1.9+ writes the schedule apart: "DPM++ 2M" + "Schedule type: Karras"
        if sampler.lower() in _SCHEDULER_BY_SAMPLER:
            result["scheduler"] = _SCHEDULER_BY_SAMPLER[sampler.lower()]
    if "Lora hashes" in values:
        pairs = (item.partition(":") for item in values["Lora hashes"].split(","))
        result["lora_hashes"] = {name.strip(): value.strip() for name, _, value in pairs if name.strip()}
    return result


def read_png_parameters(source: str | Path | bytes | Image.Image) -> dict[str, Any]:
    """The generation parameters stored in a PNG (ours or AUTOMATIC1111's), as parse_parameters gives them."""
    if isinstance(source, Image.Image):
        return _parameters_of(source)
    try:
        with Image.open(BytesIO(source) if isinstance(source, bytes) else Path(source)) as image:
            return _parameters_of(image)
    except (OSError, Image.DecompressionBombError) as error:
        raise BadInputError(f"the file is not a readable image ({error})") from None


def _parameters_of(image: Image.Image) -> dict[str, Any]:
    text = image.info.get("parameters")
    if not isinstance(text, str) or not text.strip():
        raise BadInputError("this image carries no generation parameters (it was not made by Enclave or A1111)")
    return parse_parameters(text)


def request_from_parameters(parameters: Mapping[str, Any]) -> ImageRequest:
    """An ImageRequest from read_png_parameters' dict (fields it lacks stay at the defaults).

    The LoRAs come with the prompt's tags, so ``loras`` is not passed again.
    """
    names = {f.name for f in fields(ImageRequest)} - {"loras"}
    return ImageRequest(**{key: value for key, value in parameters.items() if key in names})


# ----------------------------------------------------------------------------
# Saving
# ----------------------------------------------------------------------------


PARTIAL_SUFFIX = ".part"


def save_png(image: Image.Image, parameters: str, folder: Path, seed: int) -> Path:
    """Save as ``folder/NNNNN-<seed>.png`` with the parameters text; never overwrites.

    Atomic: the PNG is written and flushed to a hidden ``.part`` file first, then linked under its
    name (a link fails if the name exists, so two requests never take the same one). A crash at
    any moment leaves a complete PNG or none; ``remove_partial_files`` sweeps what a crash left.
    """
    folder.mkdir(parents=True, exist_ok=True)
    info = PngInfo()
    info.add_text("parameters", parameters)
    prefix = f".{os.getpid()}-"  # whose it is: the sweep leaves files of running processes alone
    with tempfile.NamedTemporaryFile(dir=folder, prefix=prefix, suffix=PARTIAL_SUFFIX, delete=False) as staged:
        try:
            image.save(staged, format="PNG", pnginfo=info)
            staged.flush()
            os.fsync(staged.fileno())
        except BaseException:
            Path(staged.name).unlink(missing_ok=True)
            raise
    try:
        numbers = [int(p.name[:5]) for p in folder.glob("*.png") if p.name[:5].isdigit()]
        number = max(numbers, default=0) + 1
        while True:
            path = folder / f"{number:05d}-{seed}.png"
            try:
                os.link(staged.name, path)
            except FileExistsError:
                number += 1
                continue
            return path
    finally:
        Path(staged.name).unlink(missing_ok=True)


def remove_partial_files(outputs_dir: Path) -> int:
    """Remove the ``.part`` files that crashed processes left under ``outputs_dir``."""
    removed = 0
    for leftover in outputs_dir.glob(f"*/.*{PARTIAL_SUFFIX}"):
        writer = leftover.name[1:].split("-", 1)[0]
        if writer.isdigit() and _is_running(int(writer)):
            continue  # still being written
        leftover.unlink(missing_ok=True)
        removed += 1
    return removed


def _is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
