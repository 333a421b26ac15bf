"""LoRAs: AUTOMATIC1111's <lora:name:weight> prompt tags, and the LoRA files they name.

A tag is split off the prompt before the text encoder reads it; a LoRA file is
checked from its header (is it a LoRA, and made for this model's family?) before
it is loaded into the pipeline, and hashed as AUTOMATIC1111 does.
"""

from __future__ import annotations

import hashlib
import math
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from errors import BadInputError
from stable_diffusion.models import FAMILY_NAMES, ImageModel, header_tensors, read_safetensors_header

MAX_LORA_WEIGHT = 10.0
LORA_KEY_MARKERS = ("lora_down", "lora_up", "lora_A", "lora_B", "lora.down", "lora.up", "lora_linear_layer")
SDXL_LORA_MARKERS = ("lora_te2_", "text_encoder_2.", "add_embedding", "label_emb")
FAMILY_BY_CROSS_ATTENTION = {768: "Stable Diffusion 1.5", 1024: "Stable Diffusion 2", 2048: "SDXL"}


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


def lora_tags(loras: Sequence[tuple[str, float]]) -> str:
    """The pairs written back as tags, as the parameters text records LoRAs given apart from the prompt."""
    return " ".join(f"<lora:{name}:{weight:g}>" for name, weight in loras)


def merge_loras(
    tagged: Sequence[tuple[str, float]], explicit: Sequence[tuple[str, float]]
) -> tuple[tuple[str, float], ...]:
    """Prompt tags, then the request's own list; a name given twice keeps its last weight."""
    merged: dict[str, float] = {}
    for name, weight in [*tagged, *explicit]:
        merged[str(name)] = _check_lora_weight(str(name), float(weight))
    return tuple(merged.items())


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
        header = header_tensors(read_safetensors_header(path))
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


def lora_hash(path: Path) -> str:
    """AUTOMATIC1111's LoRA hash: sha256 of a .safetensors file past its header ("addnet" hash), 12 hex digits."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        handle.seek(8 + length)
        for block in iter(lambda: handle.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]
