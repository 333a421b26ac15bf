"""Stable Diffusion model files on disk, read without loading them.

Which family a model is (SD 1.5, SDXL, SDXL-Turbo) from its key names, which
weight files a diffusers folder loads, the config folders shipped for single-file
checkpoints, what the weights will take in memory, and AUTOMATIC1111's model hash.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from errors import ModelLoadError

Family = Literal["sd15", "sdxl", "sdxl_turbo"]
FAMILY_NAMES: dict[str, str] = {"sd15": "Stable Diffusion 1.5", "sdxl": "SDXL", "sdxl_turbo": "SDXL-Turbo"}
CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"  # shipped at the top: no weights, only configs
SHIPPED_CONFIGS: dict[str, Path] = {"sd15": CONFIGS_DIR / "sd15", "sdxl": CONFIGS_DIR / "sdxl"}
PIPELINE_COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "vae")


# ----------------------------------------------------------------------------
# The model: family and shapes
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageModel:
    path: Path
    name: str
    family: Family
    cross_attention_dim: int  # width of the text features the UNet reads: 768 SD 1.5, 2048 SDXL
    config: Path | None  # the diffusers config folder a single-file checkpoint loads against
    inpainting: bool = False  # a dedicated inpainting checkpoint: its UNet also reads the mask and the picture


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
        keys = header_tensors(read_safetensors_header(path)).keys()
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


INPAINTING_UNET_CHANNELS = 9  # 4 latent + 1 mask + 4 masked-picture latent channels
_FIRST_UNET_LAYER = "model.diffusion_model.input_blocks.0.0.weight"  # its shape: (width, in_channels, 3, 3)


def is_inpainting_model(path: Path) -> bool:
    """Whether the UNet takes the mask and the picture besides the latents (a dedicated inpainting
    checkpoint such as sd-v1-5-inpainting), read from its config or the checkpoint's header."""
    try:
        if path.is_dir():
            config = json.loads((path / "unet" / "config.json").read_text(encoding="utf-8"))
            channels = int(config.get("in_channels", 4))
        else:
            shape = header_tensors(read_safetensors_header(path)).get(_FIRST_UNET_LAYER, {}).get("shape", [])
            channels = int(shape[1]) if len(shape) == 4 else 4
    except (OSError, ValueError, KeyError, TypeError):
        return False  # loading will say what is wrong with the files
    return channels == INPAINTING_UNET_CHANNELS


def read_cross_attention_dim(config_root: Path) -> int:
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
            header = header_tensors(read_safetensors_header(file))
        except ValueError:
            total += file.stat().st_size  # the load will say what is wrong with it
            continue
        total += sum(_numel(t["shape"]) * bytes_per_value for t in header.values())
    return total


# ----------------------------------------------------------------------------
# Weight files and their headers
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
        end = max((int(entry["data_offsets"][1]) for entry in header_tensors(header).values()), default=0)
        shapes_ok = all(isinstance(entry["shape"], list) for entry in header_tensors(header).values())
    except (AttributeError, KeyError, TypeError, IndexError, ValueError):
        shapes_ok = False
    if not shapes_ok:
        raise ValueError("its header is not a table of tensors")
    if 8 + length + end > size:
        raise ValueError(f"it is truncated: {size:,} bytes where the header describes {8 + length + end:,}")
    return header


def header_tensors(header: Mapping[str, Any]) -> dict[str, Any]:
    """A .safetensors header's tensor entries, without its "__metadata__"."""
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


def folder_variant(folder: Path) -> str | None:
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
