"""Tiny random Stable Diffusion 1.5 and SDXL models, for tests and the benchmark.

Each builder writes, under a folder of its own:
  - ``diffusers/``: the pipeline as a diffusers folder (what ``from_pretrained`` reads);
  - ``<name>.safetensors``: the same weights as one checkpoint in the original (LDM/SGM)
    layout, the way checkpoints are shared, for ``from_single_file``;
  - ``config/``: the diffusers folder without its weights: the ``config=`` a single-file
    load of these tiny shapes needs (the shipped configs/ describe the real shapes).
And LoRA files in the diffusers (peft) and kohya layouts. The weights are random, so the
pictures mean nothing; the code paths are the real ones. Each model is about 1 MB.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from configs.build_clip_tokenizer import write_clip_tokenizer

# A handful of merges over the byte-level alphabet: enough to exercise BPE, tiny vocabulary.
TINY_MERGES = [("c", "a"), ("ca", "t</w>"), ("o", "f</w>"), ("p", "h"), ("t", "o</w>"), ("ph", "o"), ("pho", "to</w>")]
TINY_VOCAB_SIZE = 256 * 2 + len(TINY_MERGES) + 2
SCHEDULER = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "timestep_spacing": "leading",
}
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
RESNET_TO_LDM = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}


def _quiet() -> None:
    """No progress bars from diffusers and transformers while building."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


@dataclass(frozen=True)
class TinyModel:
    family: str  # "sd15" or "sdxl"
    folder: Path  # diffusers folder
    single_file: Path  # original-layout checkpoint
    config: Path  # the diffusers folder without weights, for from_single_file(config=...)


# ----------------------------------------------------------------------------
# Components
# ----------------------------------------------------------------------------


def _text_config(hidden_size: int = 32, *, hidden_act: str = "quick_gelu") -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=TINY_VOCAB_SIZE,
        hidden_size=hidden_size,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=hidden_size,
        hidden_act=hidden_act,
        bos_token_id=TINY_VOCAB_SIZE - 2,
        eos_token_id=TINY_VOCAB_SIZE - 1,
        pad_token_id=TINY_VOCAB_SIZE - 1,
    )


def _vae(scaling_factor: float, *, force_upcast: bool = False) -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(8, 8, 16, 16),  # four levels: a latent 8x smaller than the image, as in SD
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=64,
        scaling_factor=scaling_factor,
        force_upcast=force_upcast,
    )


def _tokenizer(folder: Path, pad_token: str = "<|endoftext|>") -> Any:
    from transformers import CLIPTokenizer

    write_clip_tokenizer(folder, TINY_MERGES, pad_token=pad_token)
    return CLIPTokenizer.from_pretrained(folder)


def _unet(**shape: Any) -> Any:
    """Two levels of 8 and 16 channels; ``shape`` gives the family's attention layout."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, norm_num_groups=4, **shape
    )


def _sd15_pipeline(scratch: Path, in_channels: int = 4) -> Any:
    from diffusers import EulerDiscreteScheduler, StableDiffusionInpaintPipeline, StableDiffusionPipeline
    from transformers import CLIPTextModel

    # 9 input channels: a dedicated inpainting UNet (latents, mask, masked picture), saved as such.
    cls = StableDiffusionPipeline if in_channels == 4 else StableDiffusionInpaintPipeline
    return cls(
        unet=_unet(
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=2,
            in_channels=in_channels,
        ),
        vae=_vae(0.18215),
        text_encoder=CLIPTextModel(_text_config()),
        tokenizer=_tokenizer(scratch / "tokenizer"),
        scheduler=EulerDiscreteScheduler(**SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _sdxl_pipeline(scratch: Path, in_channels: int = 4) -> Any:
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLInpaintPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    unet = _unet(
        in_channels=in_channels,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        cross_attention_dim=32 + 48,  # the two text encoders' widths side by side, as SDXL's 768 + 1280
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=48 + 6 * 8,  # pooled text + six size/crop numbers
    )
    cls = StableDiffusionXLPipeline if in_channels == 4 else StableDiffusionXLInpaintPipeline
    return cls(
        unet=unet,
        vae=_vae(0.13025, force_upcast=True),
        text_encoder=CLIPTextModel(_text_config()),
        # A width unlike the first encoder's: single-file loading tells the two apart by it.
        text_encoder_2=CLIPTextModelWithProjection(_text_config(48, hidden_act="gelu")),
        tokenizer=_tokenizer(scratch / "tokenizer"),
        tokenizer_2=_tokenizer(scratch / "tokenizer_2", pad_token="!"),
        scheduler=EulerDiscreteScheduler(**SCHEDULER),
        add_watermarker=False,
    )


# ----------------------------------------------------------------------------
# Building and saving
# ----------------------------------------------------------------------------


def build_sd15(root: Path, name: str = "tiny-sd15", seed: int = 0) -> TinyModel:
    _quiet()
    torch.manual_seed(seed)
    return _save(_sd15_pipeline(root / "scratch"), root, name, "sd15")


def build_sdxl(root: Path, name: str = "tiny-sdxl", seed: int = 0) -> TinyModel:
    _quiet()
    torch.manual_seed(seed)
    return _save(_sdxl_pipeline(root / "scratch"), root, name, "sdxl")


def build_inpainting(root: Path, family: str, seed: int = 0) -> TinyModel:
    """A tiny dedicated inpainting checkpoint of ``family`` (its UNet reads 9 channels)."""
    _quiet()
    torch.manual_seed(seed)
    make = _sd15_pipeline if family == "sd15" else _sdxl_pipeline
    return _save(make(root / "scratch", in_channels=9), root, f"tiny-{family}-inpainting", family)


def _save(pipe: Any, root: Path, name: str, family: str) -> TinyModel:
    from safetensors.torch import save_file

    folder = root / "diffusers" / name
    pipe.save_pretrained(folder)
    config = root / "config" / name
    shutil.copytree(folder, config, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    single_file = root / f"{name}.safetensors"
    save_file(original_layout(pipe, family), single_file)
    shutil.rmtree(root / "scratch", ignore_errors=True)
    return TinyModel(family=family, folder=folder, single_file=single_file, config=config)


# ----------------------------------------------------------------------------
# The original checkpoint layout (the inverse of diffusers' single-file conversion)
# ----------------------------------------------------------------------------


def original_layout(pipe: Any, family: str) -> dict[str, torch.Tensor]:
    """The pipeline's weights under the key names of the original SD 1.5 / SDXL checkpoints."""
    state: dict[str, torch.Tensor] = {}
    unet = pipe.unet
    state.update(_prefixed("model.diffusion_model.", _rename(unet.state_dict(), _unet_prefixes(unet.config))))
    vae = pipe.vae
    state.update(_prefixed("first_stage_model.", _vae_to_ldm(vae.state_dict(), len(vae.config.block_out_channels))))
    if family == "sd15":
        state.update(_prefixed("cond_stage_model.transformer.", _with_text_model(pipe.text_encoder.state_dict())))
    else:
        state.update(
            _prefixed("conditioner.embedders.0.transformer.", _with_text_model(pipe.text_encoder.state_dict()))
        )
        state.update(_prefixed("conditioner.embedders.1.model.", _open_clip_layout(pipe.text_encoder_2.state_dict())))
    return {key: value.detach().contiguous() for key, value in state.items()}


def _prefixed(prefix: str, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {prefix + key: value for key, value in state.items()}


def _rename(state: Mapping[str, torch.Tensor], prefixes: Iterable[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """Swap the first matching diffusers prefix for its original one; resnets rename their layers too."""
    table = list(prefixes)
    renamed = {}
    for key, value in state.items():
        for new, old in table:
            if key.startswith(new):
                rest = key[len(new) :]
                if ".resnets." in new:
                    layer, _, tail = rest.partition(".")
                    rest = f"{RESNET_TO_LDM.get(layer, layer)}.{tail}"
                key = old + rest
                break
        renamed[key] = value
    return renamed


def _unet_prefixes(config: Any) -> list[tuple[str, str]]:
    """diffusers UNet prefixes and their LDM counterparts (input_blocks / middle_block / output_blocks)."""
    per_level = config.layers_per_block
    pairs = [
        ("time_embedding.linear_1.", "time_embed.0."),
        ("time_embedding.linear_2.", "time_embed.2."),
        ("add_embedding.linear_1.", "label_emb.0.0."),
        ("add_embedding.linear_2.", "label_emb.0.2."),
        ("conv_in.", "input_blocks.0.0."),
        ("conv_norm_out.", "out.0."),
        ("conv_out.", "out.2."),
        ("mid_block.resnets.0.", "middle_block.0."),
        ("mid_block.attentions.0.", "middle_block.1."),
        ("mid_block.resnets.1.", "middle_block.2."),
    ]
    for level, up_type in enumerate(config.up_block_types):
        for j in range(per_level):
            block = 1 + level * (per_level + 1) + j
            pairs.append((f"down_blocks.{level}.resnets.{j}.", f"input_blocks.{block}.0."))
            pairs.append((f"down_blocks.{level}.attentions.{j}.", f"input_blocks.{block}.1."))
        pairs.append(
            (f"down_blocks.{level}.downsamplers.0.conv.", f"input_blocks.{(level + 1) * (per_level + 1)}.0.op.")
        )
        for j in range(per_level + 1):
            block = level * (per_level + 1) + j
            pairs.append((f"up_blocks.{level}.resnets.{j}.", f"output_blocks.{block}.0."))
            pairs.append((f"up_blocks.{level}.attentions.{j}.", f"output_blocks.{block}.1."))
        last = level * (per_level + 1) + per_level
        pairs.append(
            (f"up_blocks.{level}.upsamplers.0.", f"output_blocks.{last}.{2 if 'CrossAttn' in up_type else 1}.")
        )
    return pairs


def _vae_to_ldm(state: Mapping[str, torch.Tensor], levels: int) -> dict[str, torch.Tensor]:
    pairs = [("encoder.conv_norm_out.", "encoder.norm_out."), ("decoder.conv_norm_out.", "decoder.norm_out.")]
    for part in ("encoder", "decoder"):
        pairs += [(f"{part}.mid_block.resnets.{j}.", f"{part}.mid.block_{j + 1}.") for j in range(2)]
        pairs.append((f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1."))
    for level in range(levels):
        pairs.append((f"encoder.down_blocks.{level}.resnets.", f"encoder.down.{level}.block."))
        pairs.append((f"encoder.down_blocks.{level}.downsamplers.0.", f"encoder.down.{level}.downsample."))
        original = levels - 1 - level  # the decoder's levels count the other way
        pairs.append((f"decoder.up_blocks.{level}.resnets.", f"decoder.up.{original}.block."))
        pairs.append((f"decoder.up_blocks.{level}.upsamplers.0.", f"decoder.up.{original}.upsample."))
    attention = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    renamed = {}
    for key, value in state.items():
        for new, old in pairs:
            if key.startswith(new):
                key = old + key[len(new) :]
                break
        key = key.replace("conv_shortcut", "nin_shortcut")
        if ".attn_1." in key:
            head, _, tail = key.partition(".attn_1.")
            layer, _, kind = tail.rpartition(".")
            key = f"{head}.attn_1.{attention[layer]}.{kind}"
            if value.ndim == 2:
                value = value[:, :, None, None]  # the original stores these as 1x1 convolutions
        renamed[key] = value
    return renamed


def _with_text_model(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers 5 saves CLIPTextModel without the ``text_model.`` prefix the originals carry."""
    return {key if key.startswith("text_model.") else f"text_model.{key}": value for key, value in state.items()}


def _open_clip_layout(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SDXL's second text encoder as OpenCLIP stores it: fused q/k/v, transposed projection."""
    state = _with_text_model({k: v for k, v in state.items() if k != "text_projection.weight"}) | {
        "text_projection.weight": state["text_projection.weight"]
    }
    out = {
        "token_embedding.weight": state["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": state["text_model.embeddings.position_embedding.weight"],
        "ln_final.weight": state["text_model.final_layer_norm.weight"],
        "ln_final.bias": state["text_model.final_layer_norm.bias"],
        "text_projection": state["text_projection.weight"].T,
    }
    renames = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    layers = {int(key.split(".")[3]) for key in state if key.startswith("text_model.encoder.layers.")}
    for layer in sorted(layers):
        src, dst = f"text_model.encoder.layers.{layer}.", f"transformer.resblocks.{layer}."
        for kind in ("weight", "bias"):
            fused = [state[f"{src}self_attn.{p}_proj.{kind}"] for p in "qkv"]
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat(fused)
            out[f"{dst}attn.out_proj.{kind}"] = state[f"{src}self_attn.out_proj.{kind}"]
            for new, old in renames.items():
                out[f"{dst}{old}.{kind}"] = state[f"{src}{new}.{kind}"]
    return out


# ----------------------------------------------------------------------------
# LoRA files
# ----------------------------------------------------------------------------


def write_diffusers_lora(model: TinyModel, path: Path, *, seed: int = 1, text_encoders: bool = False) -> Path:
    """A LoRA on the UNet's attention (and the text encoders'), saved with save_lora_weights."""
    pipe = _load_pipeline(model)
    layers = _random_lora(pipe, seed, text_encoders)
    names = {"unet": "unet_lora_layers", "text_encoder": "text_encoder_lora_layers"}
    names["text_encoder_2"] = "text_encoder_2_lora_layers"
    pipe.save_lora_weights(
        path.parent, weight_name=path.name, **{names[c]: state for c, state in layers.items()}, safe_serialization=True
    )
    return path


def write_kohya_lora(model: TinyModel, path: Path, *, seed: int = 2) -> Path:
    """The same kind of LoRA under kohya-ss key names (lora_unet_…lora_down/lora_up/alpha), SD 1.5 naming."""
    from safetensors.torch import save_file

    pipe = _load_pipeline(model)
    layers = _random_lora(pipe, seed, text_encoders=False)
    state: dict[str, torch.Tensor] = {}
    for key, value in layers["unet"].items():
        module, _, kind = key.rpartition(".lora_")
        name = "lora_unet_" + module.replace(".", "_")
        direction = "lora_down" if kind.startswith("A") else "lora_up"
        state[f"{name}.{direction}.weight"] = value.contiguous()
        state[f"{name}.alpha"] = torch.tensor(float(value.shape[0] if direction == "lora_down" else value.shape[1]))
    save_file(state, path)
    return path


def _load_pipeline(model: TinyModel) -> Any:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionPipeline if model.family == "sd15" else StableDiffusionXLPipeline
    return cls.from_pretrained(model.folder, local_files_only=True)


def _random_lora(pipe: Any, seed: int, text_encoders: bool) -> dict[str, dict[str, torch.Tensor]]:
    """Rank-4 adapters with random B matrices (peft starts B at zero: no effect until trained)."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    components = ["unet"]
    if text_encoders:
        components += [name for name in ("text_encoder", "text_encoder_2") if getattr(pipe, name, None) is not None]
    layers = {}
    for component in components:
        module = getattr(pipe, component)
        targets = LORA_TARGETS if component == "unet" else ["q_proj", "k_proj", "v_proj", "out_proj"]
        module.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights="gaussian"))
        with torch.no_grad():
            for name, parameter in module.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(0.0, 0.5)
        layers[component] = get_peft_model_state_dict(module)
    return layers
