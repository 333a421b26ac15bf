"""Loading a Stable Diffusion model into a diffusers pipeline, and its schedulers.

``load_image_pipeline`` is the model manager's loader for kind "image": it loads
a diffusers folder or a single .safetensors checkpoint offline, refuses one with
parts missing, and puts it on the device. ``make_scheduler`` builds a scheduler
by its AUTOMATIC1111 name from the model's own scheduler settings.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from errors import AppError, BadInputError, ModelLoadError
from model_manager import LoadedModel, LoadSpec
from model_memory.torch_parking import park_modules, release_pinned_memory, unpark_modules
from stable_diffusion.models import (
    FAMILY_NAMES,
    INPAINTING_UNET_CHANNELS,
    PIPELINE_COMPONENTS,
    Family,
    folder_variant,
)
from stable_diffusion.request import SCHEDULERS

COMPONENT_NAMES = {
    "UNet2DConditionModel": "UNet",
    "AutoencoderKL": "VAE",
    "CLIPTextModel": "text encoder",
    "CLIPTextModelWithProjection": "second text encoder",
}


@dataclass(eq=False)
class LoadedImageModel:
    """A pipeline in memory, with what was applied to it since it loaded."""

    pipe: Any  # StableDiffusionPipeline or StableDiffusionXLPipeline
    family: Family
    base_scheduler_config: Mapping[str, Any]
    scheduler_name: str | None = None
    adapters: dict[str, tuple[int, int]] = field(default_factory=dict)  # adapter -> file fingerprint
    tiling: bool = False

    @property
    def inpainting(self) -> bool:
        """A dedicated inpainting UNet: every picture is made through the inpainting pipeline."""
        return int(self.pipe.unet.config.in_channels) == INPAINTING_UNET_CHANNELS


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
            pipe = cls.from_pretrained(path, variant=folder_variant(path), **options)
        else:
            if spec.option("inpainting"):  # the config folder describes the base model's 4-channel UNet
                options["unet"] = _inpainting_unet(path, spec.option("config"), options["dtype"])
            pipe = cls.from_single_file(str(path), config=spec.option("config"), **options)
        _check_all_weights_loaded(pipe, path)
        pipe.to(spec.device)
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
    # Closing after a stay in the warm tier gives the pinned RAM back.
    return LoadedModel(model=loaded, reported_bytes=_parameter_bytes(pipe), close=release_pinned_memory)


def park_image_pipeline(loaded: LoadedImageModel, spec: LoadSpec) -> LoadedImageModel:
    """The warm tier: the pipeline's weights (LoRA layers included) into CPU RAM, in place, so the
    pipelines made from it for img2img and inpainting, and the prompt encoder, stay valid."""
    if spec.device != "cpu":
        park_modules(module for _, module in _pipeline_modules(loaded.pipe))
    return loaded


def unpark_image_pipeline(loaded: LoadedImageModel, spec: LoadSpec) -> LoadedImageModel:
    if spec.device != "cpu":
        unpark_modules((module for _, module in _pipeline_modules(loaded.pipe)), spec.device)
    return loaded


def _inpainting_unet(path: Path, config: str, dtype: Any) -> Any:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_single_file(
        str(path),
        config=config,
        subfolder="unet",
        in_channels=INPAINTING_UNET_CHANNELS,
        torch_dtype=dtype,
        local_files_only=True,
    )


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
