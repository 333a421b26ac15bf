"""Image generation with Stable Diffusion 1.5, SDXL and SDXL-Turbo through diffusers.

The service finds the configured model (a diffusers folder or one .safetensors
checkpoint, loaded offline against the config folders shipped in configs/),
tells its family from the weights, checks each request up front, borrows the
pipeline from the model manager, applies the request's LoRAs and scheduler to
the loaded pipeline (neither reloads the base model), and generates the images
one seed at a time, reporting each step and stopping between steps on cancel.
Every image is saved as a PNG carrying AUTOMATIC1111-style "parameters" text,
which ``read_png_parameters`` turns back into a request.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import random
import re
import struct
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import datetime
from io import BytesIO
from pathlib import Path
from typing import Any, Literal

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from errors import AppError, BadInputError, ModelLoadError, ModelMissingError, OutOfMemoryError
from model_manager import GIB, LoadedModel, Loader, LoadSpec, ModelManager
from settings import ImageSettings

log = logging.getLogger(__name__)

Family = Literal["sd15", "sdxl", "sdxl_turbo"]
FAMILY_NAMES: dict[str, str] = {"sd15": "Stable Diffusion 1.5", "sdxl": "SDXL", "sdxl_turbo": "SDXL-Turbo"}
CONFIGS_DIR = Path(__file__).resolve().parent / "configs"
SHIPPED_CONFIGS: dict[str, Path] = {"sd15": CONFIGS_DIR / "sd15", "sdxl": CONFIGS_DIR / "sdxl"}

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
MAX_LORA_WEIGHT = 10.0
MAX_SEED = 2**64 - 1
# Activations and scratch memory beyond the weights, for the manager's estimate.
WORKING_BYTES: dict[str, int] = {"sd15": GIB, "sdxl": 2 * GIB, "sdxl_turbo": 2 * GIB}
LORA_KEY_MARKERS = ("lora_down", "lora_up", "lora_A", "lora_B", "lora.down", "lora.up", "lora_linear_layer")
SDXL_LORA_MARKERS = ("lora_te2_", "text_encoder_2.", "add_embedding", "label_emb")
FAMILY_BY_CROSS_ATTENTION = {768: "Stable Diffusion 1.5", 1024: "Stable Diffusion 2", 2048: "SDXL"}
PIPELINE_COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "vae")
COMPONENT_NAMES = {
    "UNet2DConditionModel": "UNet",
    "AutoencoderKL": "VAE",
    "CLIPTextModel": "text encoder",
    "CLIPTextModelWithProjection": "second text encoder",
}


# ----------------------------------------------------------------------------
# Requests and results
# ----------------------------------------------------------------------------


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


@dataclass(frozen=True)
class _Plan:
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


# ----------------------------------------------------------------------------
# <lora:name:weight> tags
# ----------------------------------------------------------------------------

_LORA_TAG = re.compile(r"<lora:([^<>]*)>", re.IGNORECASE)
_LORA_OPENING = re.compile(r"<lora:", re.IGNORECASE)


def parse_prompt_loras(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """Split AUTOMATIC1111's ``<lora:name:weight>`` tags (weight optional, 1.0) off the prompt.

    Returns the prompt without the tags and the (name, weight) pairs in order.
    A tag that cannot be read is refused rather than silently sent to the text encoder.
    """
    loras: list[tuple[str, float]] = []
    for match in _LORA_TAG.finditer(prompt):
        loras.append(_parse_lora_tag(match.group(0), match.group(1)))
    remainder = _LORA_TAG.sub(" ", prompt)
    leftover = _LORA_OPENING.search(remainder)
    if leftover:
        fragment = remainder[leftover.start() : leftover.start() + 40]
        raise BadInputError(f"the LoRA tag '{fragment}' is not closed; write it as <lora:name:weight>")
    return _tidy_spaces(remainder), loras


def _parse_lora_tag(tag: str, body: str) -> tuple[str, float]:
    parts = [part.strip() for part in body.split(":")]
    name = parts[0]
    if not name or len(parts) > 2:
        raise BadInputError(f"the LoRA tag {tag} is malformed; write it as <lora:name:weight>, e.g. <lora:name:0.8>")
    if len(parts) == 1 or not parts[1]:
        return name, 1.0
    try:
        weight = float(parts[1])
    except ValueError:
        raise BadInputError(f"the LoRA weight in {tag} is not a number; write e.g. <lora:{name}:0.8>") from None
    return name, _check_lora_weight(name, weight)


def _check_lora_weight(name: str, weight: float) -> float:
    if not math.isfinite(weight) or abs(weight) > MAX_LORA_WEIGHT:
        raise BadInputError(f"the weight of LoRA '{name}' is {weight}; use a number between -10 and 10 (usually 0-1)")
    return float(weight)


def _tidy_spaces(text: str) -> str:
    lines = [re.sub(r"[ \t]{2,}", " ", line).strip() for line in text.split("\n")]
    return "\n".join(lines).strip()


def _lora_tags(loras: Sequence[tuple[str, float]]) -> str:
    return " ".join(f"<lora:{name}:{weight:g}>" for name, weight in loras)


# ----------------------------------------------------------------------------
# Reading weight files without loading them
# ----------------------------------------------------------------------------


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a .safetensors file: tensor names, dtypes and shapes. Raises ValueError."""
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise ValueError("the file is too short to be a .safetensors file")
        (length,) = struct.unpack("<Q", prefix)
        size = path.stat().st_size
        if length > min(size - 8, 100 * 2**20):
            raise ValueError("its header length is impossible: the file is corrupt or not .safetensors")
        try:
            header = json.loads(handle.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"its header is not valid JSON ({error})") from None
    try:
        end = max((int(entry["data_offsets"][1]) for entry in _tensors(header).values()), default=0)
        shapes_ok = all(isinstance(entry["shape"], list) for entry in _tensors(header).values())
    except (AttributeError, KeyError, TypeError, IndexError, ValueError):
        shapes_ok = False
    if not shapes_ok:
        raise ValueError("its header is not a table of tensors")
    if 8 + length + end > size:
        raise ValueError(f"it is truncated: {size:,} bytes where the header describes {8 + length + end:,}")
    return header


def _tensors(header: Mapping[str, Any]) -> dict[str, Any]:
    return {name: entry for name, entry in header.items() if name != "__metadata__"}


def _numel(shape: Sequence[int]) -> int:
    return math.prod(shape) if shape else 1


def folder_weight_files(folder: Path) -> list[Path]:
    """The weight files the pipeline loads from a diffusers folder (no safety checker, no extra variants)."""
    files: list[Path] = []
    for component in PIPELINE_COMPONENTS:
        weights = _component_weights(folder / component)
        plain = [w for w in weights if not _is_variant(w)]
        fp16 = [w for w in weights if ".fp16" in w.name]
        files += plain or fp16 or weights
    return files


def _component_weights(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))


def _is_variant(path: Path) -> bool:
    """diffusers names variants name.<variant>.ext (fp16, non_ema, ...); plain weights have one dot."""
    return path.name.count(".") > 1


def _folder_variant(folder: Path) -> str | None:
    """The variant to ask for: "fp16" when the UNet only comes as fp16 weights (….fp16.safetensors)."""
    weights = _component_weights(folder / "unet")
    if any(not _is_variant(w) for w in weights):
        return None
    return "fp16" if any(".fp16" in w.name for w in weights) else None


def file_sha256(paths: Sequence[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(2**20), b""):
                digest.update(block)
    return digest.hexdigest()


def model_hash(path: Path) -> str:
    """AUTOMATIC1111's "Model hash": the first 10 hex digits of the checkpoint's sha256.

    For a diffusers folder (which A1111 does not load) it is the sha256 over its weight files in order.
    """
    files = folder_weight_files(path) if path.is_dir() else [path]
    return file_sha256(files)[:10]


def lora_hash(path: Path) -> str:
    """AUTOMATIC1111's LoRA hash: sha256 of a .safetensors file past its header ("addnet" hash), 12 hex digits."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        handle.seek(8 + length)
        for block in iter(lambda: handle.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


# ----------------------------------------------------------------------------
# The model on disk
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageModel:
    path: Path
    name: str
    family: Family
    cross_attention_dim: int  # width of the text features the UNet reads: 768 SD 1.5, 2048 SDXL
    config: Path | None  # the diffusers config folder a single-file checkpoint loads against


def detect_family(path: Path) -> Family:
    """SD 1.5 or SDXL from the weights (key names), SDXL-Turbo when "turbo" is in the name."""
    base = _folder_family(path) if path.is_dir() else _checkpoint_family(path)
    if base == "sdxl" and "turbo" in path.name.lower():
        return "sdxl_turbo"
    return base


def _folder_family(folder: Path) -> Family:
    index = folder / "model_index.json"
    if not index.is_file():
        raise ModelLoadError(
            f"{folder} is not a diffusers model folder (it has no model_index.json); point image.model at "
            "a Stable Diffusion folder saved by diffusers or at a single .safetensors checkpoint"
        )
    try:
        components = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ModelLoadError(f"{index} cannot be read ({error}); download the model folder again") from None
    if "text_encoder_2" in components or (folder / "text_encoder_2").is_dir():
        return "sdxl"
    if "text_encoder" in components:
        return "sd15"
    raise ModelLoadError(f"{folder} is not a Stable Diffusion 1.5 or SDXL model (no text encoder in model_index.json)")


def _checkpoint_family(path: Path) -> Family:
    if path.suffix.lower() != ".safetensors":
        raise ModelLoadError(
            f"{path.name} is not a .safetensors checkpoint; only .safetensors files are loaded "
            "(.ckpt/.pt files can run code when opened): use the .safetensors download of the model"
        )
    try:
        keys = _tensors(read_safetensors_header(path)).keys()
    except (OSError, ValueError) as error:
        raise ModelLoadError(
            f"{path} is not a readable .safetensors checkpoint: {error}. Download it again or fix image.model"
        ) from None
    if any(k.startswith("conditioner.embedders.1.") for k in keys):
        return "sdxl"
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        raise ModelLoadError(f"{path.name} is a Stable Diffusion 2 checkpoint; only SD 1.5 and SDXL are supported")
    if any(k.startswith("cond_stage_model.") for k in keys):
        return "sd15"
    raise ModelLoadError(
        f"{path.name} does not look like a Stable Diffusion 1.5 or SDXL checkpoint (no text encoder weights); "
        "is it a LoRA or a VAE? Put LoRAs in the LoRA folder and point image.model at a full model"
    )


def _cross_attention_dim(config_root: Path) -> int:
    config = json.loads((config_root / "unet" / "config.json").read_text(encoding="utf-8"))
    return int(config["cross_attention_dim"])


def estimate_weight_bytes(path: Path, bytes_per_value: int) -> int:
    """Bytes the weights take once loaded at the given precision, from the file headers."""
    files = folder_weight_files(path) if path.is_dir() else [path]
    total = 0
    for file in files:
        if file.suffix != ".safetensors":
            total += file.stat().st_size
            continue
        try:
            header = _tensors(read_safetensors_header(file))
        except ValueError:
            total += file.stat().st_size  # the load will say what is wrong with it
            continue
        total += sum(_numel(t["shape"]) * bytes_per_value for t in header.values())
    return total


# ----------------------------------------------------------------------------
# LoRA files
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class LoraFile:
    name: str
    path: Path
    fingerprint: tuple[int, int]  # size and modification time: a changed file is loaded again
    sdxl_markers: bool  # keys only SDXL LoRAs have (second text encoder, added embeddings)
    cross_attention_dims: frozenset[int]  # input widths of its cross-attention key/value layers

    @property
    def adapter(self) -> str:
        """A peft adapter name for it (no dots; distinct for distinct file names)."""
        digest = hashlib.sha1(self.name.encode("utf-8")).hexdigest()[:8]
        return f"{re.sub(r'[^0-9A-Za-z_]', '_', self.name)[:40]}_{digest}"


def inspect_lora(name: str, path: Path) -> LoraFile:
    """Read a LoRA's header and refuse files that are not LoRAs."""
    try:
        header = _tensors(read_safetensors_header(path))
    except (OSError, ValueError) as error:
        raise BadInputError(f"LoRA '{name}' ({path}) is not a readable .safetensors file: {error}") from None
    keys = list(header)
    if not any(marker in key for key in keys for marker in LORA_KEY_MARKERS):
        example = keys[0] if keys else "nothing"
        raise BadInputError(
            f"{path.name} in the LoRA folder is not a LoRA (it holds {len(keys)} tensors such as '{example}', "
            "not lora_down/lora_up or lora_A/lora_B weights); if it is a full model, move it to the models "
            "folder and set image.model"
        )
    dims = frozenset(
        int(header[key]["shape"][1])
        for key in keys
        if "attn2" in key
        and any(p in key for p in ("to_k", "to_v"))
        and any(d in key for d in ("lora_down", "lora_A", "lora.down"))
        and len(header[key]["shape"]) == 2
    )
    stat = path.stat()
    markers = any(marker in key for key in keys for marker in SDXL_LORA_MARKERS)
    return LoraFile(name, path, (stat.st_size, stat.st_mtime_ns), markers, dims)


def check_lora_fits(lora: LoraFile, model: ImageModel) -> None:
    """Refuse a LoRA made for another family before it is loaded into the pipeline."""
    model_family = FAMILY_NAMES[model.family]
    if lora.sdxl_markers and model.family == "sd15":
        raise BadInputError(
            f"LoRA '{lora.name}' was made for SDXL and the loaded model {model.name} is {model_family}; "
            "choose an SD 1.5 LoRA or an SDXL model"
        )
    if lora.cross_attention_dims and model.cross_attention_dim not in lora.cross_attention_dims:
        width = max(lora.cross_attention_dims)
        made_for = FAMILY_BY_CROSS_ATTENTION.get(width, f"a model with {width}-wide text features")
        raise BadInputError(
            f"LoRA '{lora.name}' was made for {made_for} and the loaded model {model.name} is {model_family}; "
            f"choose a LoRA made for {model_family}"
        )


# ----------------------------------------------------------------------------
# The loaded pipeline
# ----------------------------------------------------------------------------


@dataclass(eq=False)
class LoadedImageModel:
    """A pipeline in memory, with what was applied to it since it loaded."""

    pipe: Any  # StableDiffusionPipeline or StableDiffusionXLPipeline
    family: Family
    base_scheduler_config: Mapping[str, Any]
    lock: threading.Lock = field(default_factory=threading.Lock)  # one generation at a time
    scheduler_name: str | None = None
    adapters: dict[str, tuple[int, int]] = field(default_factory=dict)  # adapter -> file fingerprint
    tiling: bool = False
    model_hash: str | None = None  # computed on first use, once per loaded model


def _pipeline_class(family: str) -> Any:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionPipeline if family == "sd15" else StableDiffusionXLPipeline


def load_image_pipeline(spec: LoadSpec) -> LoadedModel:
    """The manager's loader for kind "image": a diffusers pipeline on the spec's device."""
    import torch

    _quiet_diffusers()
    path = Path(spec.path)
    family: Family = spec.option("family")
    options: dict[str, Any] = {"dtype": getattr(torch, spec.option("dtype")), "local_files_only": True}
    if family == "sd15":
        options |= {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    else:
        options |= {"add_watermarker": False}
    cls = _pipeline_class(family)
    try:
        if path.is_dir():
            pipe = cls.from_pretrained(path, variant=_folder_variant(path), **options)
        else:
            pipe = cls.from_single_file(str(path), config=spec.option("config"), **options)
        _check_all_weights_loaded(pipe, path)
        pipe.to(spec.option("device"))
    except (MemoryError, torch.OutOfMemoryError, AppError):
        raise
    except Exception as error:
        missing = re.search(r"Failed to load (\w+)\. Weights for this component appear to be missing", str(error))
        if missing:
            raise _missing_part(path, COMPONENT_NAMES.get(missing.group(1), missing.group(1))) from error
        raise ModelLoadError(
            f"{path} could not be loaded as a {FAMILY_NAMES[family]} model ({type(error).__name__}: {error}); "
            "the file may be damaged or of another kind: download it again, or set image.family in config.yaml"
        ) from error
    pipe.set_progress_bar_config(disable=True)
    loaded = LoadedImageModel(pipe=pipe, family=family, base_scheduler_config=dict(pipe.scheduler.config))
    return LoadedModel(model=loaded, reported_bytes=_parameter_bytes(pipe))


class _EmptyFloat32ListFilter(logging.Filter):
    """diffusers warns about "modules that should be kept in float32: []" on every cast, even with none."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "kept in float32: []" not in record.getMessage()


def _quiet_diffusers() -> None:
    """No progress bars on the terminal, and no warning that names nothing."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    modeling = logging.getLogger("diffusers.models.modeling_utils")
    if not any(isinstance(f, _EmptyFloat32ListFilter) for f in modeling.filters):
        modeling.addFilter(_EmptyFloat32ListFilter())


def _pipeline_modules(pipe: Any) -> Iterator[tuple[str, Any]]:
    for name in PIPELINE_COMPONENTS:
        module = getattr(pipe, name, None)
        if module is not None:
            yield name, module


def _check_all_weights_loaded(pipe: Any, path: Path) -> None:
    """A part the checkpoint lacks can load empty ("meta" tensors): refuse it by name."""
    for name, module in _pipeline_modules(pipe):
        if any(p.is_meta for p in module.parameters()):
            raise _missing_part(path, COMPONENT_NAMES.get(type(module).__name__, name))


def _missing_part(path: Path, part: str) -> ModelLoadError:
    return ModelLoadError(
        f"{path.name} has no weights for the {part}: it is incomplete or not a full Stable Diffusion "
        "checkpoint (some files ship without a VAE or text encoder); download the full model"
    )


def _parameter_bytes(pipe: Any) -> int:
    return sum(p.numel() * p.element_size() for _, m in _pipeline_modules(pipe) for p in m.parameters())


def make_scheduler(name: str, base_config: Mapping[str, Any], family: str) -> Any:
    """A scheduler by its A1111 name, from the model's own scheduler settings (betas, offsets)."""
    from diffusers import (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        EulerAncestralDiscreteScheduler,
        EulerDiscreteScheduler,
    )

    # SDXL-Turbo was distilled for few steps from t=999: "trailing" spacing reaches it, "leading" does not.
    overrides: dict[str, Any] = {"timestep_spacing": "trailing"} if family == "sdxl_turbo" else {}
    if name == "euler_a":
        return EulerAncestralDiscreteScheduler.from_config(base_config, **overrides)
    if name == "euler":
        return EulerDiscreteScheduler.from_config(base_config, **overrides)
    if name == "ddim":
        return DDIMScheduler.from_config(base_config, **overrides)
    if name == "dpmpp_2m_karras":
        return DPMSolverMultistepScheduler.from_config(
            base_config, algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=True, **overrides
        )
    raise BadInputError(f"unknown scheduler '{name}'; choose one of {', '.join(SCHEDULERS)}")


# ----------------------------------------------------------------------------
# The parameters text (AUTOMATIC1111's "infotext")
# ----------------------------------------------------------------------------


def format_parameters(
    plan: _Plan, seed: int, model: ImageModel, model_hash_text: str, lora_hashes: Mapping[str, str]
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
    width, height, model, model_hash, loras (the prompt's tags as (name, weight) pairs) and
    lora_hashes.
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
    }
    for key, (name, convert) in converters.items():
        if key in values:
            with contextlib.suppress(ValueError):
                result[name] = convert(values[key])
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


def save_png(image: Image.Image, parameters: str, folder: Path, seed: int) -> Path:
    """Save as ``folder/NNNNN-<seed>.png`` with the parameters text; never overwrites."""
    folder.mkdir(parents=True, exist_ok=True)
    info = PngInfo()
    info.add_text("parameters", parameters)
    numbers = [int(p.name[:5]) for p in folder.glob("*.png") if p.name[:5].isdigit()]
    number = max(numbers, default=0) + 1
    while True:
        path = folder / f"{number:05d}-{seed}.png"
        try:
            handle = path.open("xb")  # exclusive: two requests never write the same file
        except FileExistsError:
            number += 1
            continue
        with handle:
            image.save(handle, format="PNG", pnginfo=info)
        return path


class _Cancelled(Exception):
    """Raised from the step callback to stop the pipeline between steps."""


# ----------------------------------------------------------------------------
# The service
# ----------------------------------------------------------------------------


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
        self._model_cache: tuple[tuple[Path, int, int], ImageModel] | None = None
        self._lora_cache: dict[Path, tuple[LoraFile, str]] = {}
        self._cache_lock = threading.Lock()
        manager.register_loader("image", Loader(load=load_image_pipeline, estimate_bytes=self._estimate_bytes))

    # -- where things are -------------------------------------------------

    @property
    def device(self) -> str:
        if self._device is None:
            import torch

            self._device = "cuda" if torch.cuda.is_available() else "cpu"
        return self._device

    @property
    def model_path(self) -> Path:
        path = Path(self._settings.model).expanduser()
        return path if path.is_absolute() else self._models_dir / path

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

    def resolve_model(self) -> ImageModel:
        """The configured model, its family and shapes (cached until the file changes)."""
        message = self.availability()
        if message is not None:
            raise ModelMissingError(message)
        path = self.model_path
        stat = path.stat()
        key = (path, stat.st_size, stat.st_mtime_ns)
        with self._cache_lock:
            if self._model_cache is not None and self._model_cache[0] == key:
                return self._model_cache[1]
        family = detect_family(path) if self._settings.family == "auto" else self._settings.family
        config = None if path.is_dir() else self._config_dirs["sd15" if family == "sd15" else "sdxl"]
        try:
            dim = _cross_attention_dim(config or path)
        except (OSError, ValueError, KeyError) as error:
            raise ModelLoadError(f"{path} has no readable unet/config.json ({error}); download it again") from None
        model = ImageModel(path, path.stem if path.is_file() else path.name, family, dim, config)
        log.info("image model %s is %s", model.name, FAMILY_NAMES[family])
        with self._cache_lock:
            self._model_cache = (key, model)
        return model

    def load_spec(self, model: ImageModel) -> LoadSpec:
        """Everything that changes the weights in memory. LoRAs are not in it: they adapt the loaded pipeline."""
        dtype = "float16" if self.device.startswith("cuda") else "float32"
        options: dict[str, Any] = {"family": model.family, "dtype": dtype, "device": self.device}
        if model.config is not None:
            options["config"] = str(model.config)
        return LoadSpec.of("image", model.path, **options)

    def _estimate_bytes(self, spec: LoadSpec) -> int:
        path = Path(spec.path)
        if not path.exists():
            raise ModelMissingError(self.availability() or f"{path} does not exist")
        bytes_per_value = 2 if spec.option("dtype") == "float16" else 4
        return estimate_weight_bytes(path, bytes_per_value) + WORKING_BYTES[spec.option("family")]

    # -- checking a request ---------------------------------------------------

    def _plan(self, request: ImageRequest, family: str) -> _Plan:
        """Check the request against the limits and complete it with the defaults. Raises BadInputError."""
        defaults = self._settings.defaults
        prompt, tagged = parse_prompt_loras(_check_text("prompt", request.prompt))
        if not prompt:
            raise BadInputError("the prompt is empty; describe the image you want")
        negative = _check_text("negative prompt", _or(request.negative_prompt, defaults.negative_prompt))
        width = self._check_size("width", _or(request.width, defaults.width))
        height = self._check_size("height", _or(request.height, defaults.height))
        turbo = family == "sdxl_turbo"
        steps = _or(request.steps, TURBO_DEFAULT_STEPS if turbo else defaults.steps)
        _check_range("steps", steps, 1, self._settings.max_steps, "image.max_steps")
        num_images = _or(request.num_images, 1)
        _check_range("the number of images", num_images, 1, self._settings.max_images, "image.max_images")
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
            guidance = self._turbo_guidance(guidance, notices)
            if steps > TURBO_MAX_STEPS:
                raise BadInputError(
                    f"SDXL-Turbo makes an image in 1 to {TURBO_MAX_STEPS} steps; {steps} steps were asked "
                    "(leave steps empty for 1)"
                )
        loras = _merge_loras(tagged, request.loras)
        # The parameters text keeps the prompt as typed; LoRAs given apart from it are written in as tags.
        shown = f"{prompt} {_lora_tags(loras)}" if request.loras else request.prompt.strip()
        return _Plan(
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
        )

    def _check_size(self, name: str, value: int) -> int:
        low, high = self._settings.min_size, self._settings.max_size
        if not _is_whole(value):
            raise BadInputError(f"{name} must be a whole number of pixels, got {value!r}")
        if value % 8:
            lower = max(low, value - value % 8)
            raise BadInputError(f"{name} {value} is not a multiple of 8; use {lower} or {lower + 8}")
        _check_range(name, value, low, high, "image.min_size / image.max_size")
        return value

    @staticmethod
    def _turbo_guidance(guidance: float, notices: list[str]) -> float:
        if guidance > 0:
            notices.append(f"SDXL-Turbo works without guidance: the guidance {guidance:g} was set to 0.")
        return 0.0

    def _loras_for(self, plan: _Plan, model: ImageModel) -> list[tuple[LoraFile, float, str]]:
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
        model = self.resolve_model()
        plan = self._plan(request, model.family)
        loras = self._loras_for(plan, model)
        images: list[GeneratedImage] = []
        cancelled = False
        with self._manager.acquire(self.load_spec(model)) as loaded, loaded.lock:
            self._prepare(loaded, plan, loras)
            model_hash_text = self._model_hash(loaded, model)
            lora_hashes = {lora.name: digest for lora, _, digest in loras}
            total = plan.steps * plan.num_images
            for index in range(plan.num_images):
                seed = plan.seed + index
                if cancel is not None and cancel.is_set():
                    cancelled = True
                    break
                try:
                    image = self._run(loaded, plan, seed, index * plan.steps, total, progress, cancel)
                except _Cancelled:
                    cancelled = True
                    break
                parameters = format_parameters(plan, seed, model, model_hash_text, lora_hashes)
                path = self._save(image, parameters, seed) if save else None
                images.append(GeneratedImage(image, seed, path, parameters))
        seconds = time.perf_counter() - started
        return GenerationResult(tuple(images), cancelled, model.name, model.family, seconds, plan.notices)

    def _prepare(self, loaded: LoadedImageModel, plan: _Plan, loras: list[tuple[LoraFile, float, str]]) -> None:
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

    @staticmethod
    def _model_hash(loaded: LoadedImageModel, model: ImageModel) -> str:
        if loaded.model_hash is None:
            loaded.model_hash = model_hash(model.path)
        return loaded.model_hash

    def _run(
        self,
        loaded: LoadedImageModel,
        plan: _Plan,
        seed: int,
        done: int,
        total: int,
        progress: Callable[[int, int], None] | None,
        cancel: threading.Event | None,
    ) -> Image.Image:
        import torch

        def on_step_end(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            if progress is not None:
                progress(done + min(step + 1, plan.steps), total)
            if cancel is not None and cancel.is_set():
                raise _Cancelled
            return tensors

        # Noise from a CPU generator: the same seed gives the same picture on any device.
        generator = torch.Generator("cpu").manual_seed(seed)
        try:
            output = loaded.pipe(
                prompt=plan.prompt,
                negative_prompt=plan.negative_prompt or None,
                width=plan.width,
                height=plan.height,
                num_inference_steps=plan.steps,
                guidance_scale=plan.guidance,
                generator=generator,
                callback_on_step_end=on_step_end,
                output_type="pil",
            )
        except torch.OutOfMemoryError as error:
            raise OutOfMemoryError(
                f"the {self.device} ran out of memory making a {plan.width}x{plan.height} image; "
                "choose a smaller size, or unload other models"
            ) from error
        return output.images[0]

    def _save(self, image: Image.Image, parameters: str, seed: int) -> Path:
        folder = self._settings.outputs_dir / datetime.now().strftime("%Y-%m-%d")
        try:
            return save_png(image, parameters, folder, seed)
        except OSError as error:
            raise AppError(
                f"the image could not be saved in {folder} ({error}); free some disk space or change "
                "image.outputs_dir in config.yaml"
            ) from error


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


def _merge_loras(
    tagged: Sequence[tuple[str, float]], explicit: Sequence[tuple[str, float]]
) -> tuple[tuple[str, float], ...]:
    """Prompt tags, then the request's own list; a name given twice keeps its last weight."""
    merged: dict[str, float] = {}
    for name, weight in [*tagged, *explicit]:
        merged[str(name)] = _check_lora_weight(str(name), float(weight))
    return tuple(merged.items())
