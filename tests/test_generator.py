"""generator.py through its real code paths, on tiny random SD 1.5 and SDXL models (CPU).

The pictures mean nothing; what is checked is loading (folder and single file),
determinism, progress and cancel, LoRAs, schedulers, saving and reading the
parameters, errors, and sharing one model manager with the real chat model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_diffusion import (
    TinyModel,
    build_inpainting,
    build_sd15,
    build_sdxl,
    write_diffusers_lora,
    write_kohya_lora,
)

import generator
from chat import ChatService
from errors import BadInputError, ModelLoadError, ModelMissingError
from generator import ImageRequest, ImageService
from model_manager import ModelManager
from settings import ChatSettings, ImageDefaults, ImageSettings
from stable_diffusion.lora import parse_prompt_loras
from stable_diffusion.metadata import parse_parameters, read_png_parameters, request_from_parameters
from stable_diffusion.models import detect_family, model_hash
from stable_diffusion.pipeline import LoadedImageModel
from text_generation.stream import GenerationParams

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "a photo of a cat"


@dataclass(frozen=True)
class Tiny:
    sd15: TinyModel
    sdxl: TinyModel
    lora_dir: Path


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("tiny-diffusion")
    sd15, sdxl = build_sd15(root / "sd15"), build_sdxl(root / "sdxl")
    loras = root / "lora"
    loras.mkdir()
    write_diffusers_lora(sd15, loras / "film-grain.safetensors", text_encoders=True)
    write_kohya_lora(sd15, loras / "kohya-style.safetensors")
    write_diffusers_lora(sdxl, loras / "xl-style.safetensors", text_encoders=True)
    write_diffusers_lora(sdxl, loras / "xl-unet-only.safetensors")
    shutil.copy(sd15.single_file, loras / "whole-model.safetensors")  # a checkpoint in the wrong folder
    return Tiny(sd15, sdxl, loras)


def make_service(
    tiny: Tiny, model: Path, tmp_path: Path, manager: ModelManager | None = None, **settings: object
) -> ImageService:
    options: dict = {
        "model": str(model),
        "lora_dir": str(tiny.lora_dir),
        "outputs_dir": tmp_path / "outputs",
        "min_size": 64,
        "max_size": 256,
        "max_images": 4,
        "defaults": ImageDefaults(width=64, height=64, steps=3, scheduler="euler"),
        **settings,
    }
    return ImageService(
        manager or ModelManager(keep_alive_s=-1),
        ImageSettings(**options),
        tmp_path / "models",
        device="cpu",
        config_dirs={"sd15": tiny.sd15.config, "sdxl": tiny.sdxl.config},
    )


@pytest.fixture
def sd15(tiny: Tiny, tmp_path: Path) -> ImageService:
    return make_service(tiny, tiny.sd15.folder, tmp_path)


def pixels(service: ImageService, request: ImageRequest) -> np.ndarray:
    result = service.generate(request, save=False)
    return np.asarray(result.images[0].image, dtype=np.int16)


def load_count(service: ImageService) -> int:
    return sum(service._manager.status().load_counts.values())


@contextlib.contextmanager
def loaded_pipeline(service: ImageService) -> Iterator[LoadedImageModel]:
    with service._manager.acquire(service.load_spec(service.resolve_model())) as loaded:
        yield loaded


# ----------------------------------------------------------------------------
# The shipped config folders
# ----------------------------------------------------------------------------


def test_shipped_configs_describe_the_published_architectures() -> None:
    import diffusers
    from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def parameters(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    configs = ROOT / "configs"
    expected = {  # parameter counts of the released weights
        "sd15": {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480},
        "sdxl": {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840},
    }
    for family, counts in expected.items():
        folder = configs / family
        index = DiffusionPipeline.load_config(folder)
        with torch.device("meta"):  # shapes only, no memory
            models = {
                "unet": UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet")),
                "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae")),
                "text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder")),
            }
            if family == "sdxl":
                config = CLIPTextConfig.from_pretrained(folder / "text_encoder_2")
                models["text_encoder_2"] = CLIPTextModelWithProjection(config)
        assert {name: parameters(m) for name, m in models.items()} == counts
        assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    sdxl_unet = UNet2DConditionModel.load_config(configs / "sdxl" / "unet")
    assert sdxl_unet["cross_attention_dim"] == 2048 and sdxl_unet["addition_embed_type"] == "text_time"
    assert AutoencoderKL.load_config(configs / "sdxl" / "vae")["scaling_factor"] == 0.13025
    assert AutoencoderKL.load_config(configs / "sd15" / "vae")["scaling_factor"] == 0.18215
    for family, scheduler in (("sd15", "PNDMScheduler"), ("sdxl", "EulerDiscreteScheduler")):
        cls = getattr(diffusers, scheduler)
        assert type(cls.from_pretrained(configs / family, subfolder="scheduler")) is cls


def test_shipped_clip_tokenizers_give_clips_ids() -> None:
    from transformers import CLIPTokenizer

    from configs.build_clip_tokenizer import clip_vocab

    configs = ROOT / "configs"
    for folder in ("sd15/tokenizer", "sdxl/tokenizer", "sdxl/tokenizer_2"):
        tokenizer = CLIPTokenizer.from_pretrained(configs / folder)
        assert tokenizer(PROMPT).input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
        assert len(tokenizer) == 49408 and tokenizer.model_max_length == 77
    assert CLIPTokenizer.from_pretrained(configs / "sdxl/tokenizer_2").pad_token == "!"
    # vocab.json is exactly what the merges imply, in CLIP's order.
    tokenizer_dir = configs / "sd15" / "tokenizer"
    merges = [tuple(line.split()) for line in tokenizer_dir.joinpath("merges.txt").read_text().splitlines()[1:]]
    vocab = json.loads(tokenizer_dir.joinpath("vocab.json").read_text(encoding="utf-8"))
    assert list(vocab) == clip_vocab(merges) and list(vocab.values()) == list(range(49408))


# ----------------------------------------------------------------------------
# Loading and family detection
# ----------------------------------------------------------------------------


def test_family_is_detected_from_the_weights(tiny: Tiny, tmp_path: Path) -> None:
    assert detect_family(tiny.sd15.folder) == "sd15"
    assert detect_family(tiny.sd15.single_file) == "sd15"
    assert detect_family(tiny.sdxl.folder) == "sdxl"
    assert detect_family(tiny.sdxl.single_file) == "sdxl"
    turbo = tmp_path / "tiny-sdxl-turbo.safetensors"
    turbo.symlink_to(tiny.sdxl.single_file)
    assert detect_family(turbo) == "sdxl_turbo"
    with pytest.raises(ModelLoadError, match="LoRA"):
        detect_family(tiny.lora_dir / "film-grain.safetensors")
    pickle = tmp_path / "model.ckpt"
    pickle.write_bytes(b"PK")
    with pytest.raises(ModelLoadError, match=r"model\.ckpt.*\.safetensors"):
        detect_family(pickle)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_single_file_and_folder_give_the_same_picture(tiny: Tiny, tmp_path: Path, family: str) -> None:
    model: TinyModel = getattr(tiny, family)
    request = ImageRequest(PROMPT, seed=7)
    from_folder = make_service(tiny, model.folder, tmp_path / "folder")
    from_file = make_service(tiny, model.single_file, tmp_path / "file")
    assert from_folder.resolve_model().family == from_file.resolve_model().family == family
    assert from_file.load_spec(from_file.resolve_model()).option("config") == str(model.config)
    first = pixels(from_folder, request)
    assert first.shape == (64, 64, 3)
    np.testing.assert_array_equal(first, pixels(from_file, request))


@pytest.mark.parametrize(("family", "width"), [("sd15", 768), ("sdxl", 2048)])
def test_a_single_file_is_read_against_the_shipped_config_folders(
    tiny: Tiny, tmp_path: Path, family: str, width: int
) -> None:
    """Without config folders given (as the app runs), a single file is described by configs/."""
    model: TinyModel = getattr(tiny, family)
    service = ImageService(
        ModelManager(keep_alive_s=-1),
        ImageSettings(model=str(model.single_file), outputs_dir=tmp_path / "outputs"),
        tmp_path / "models",
        device="cpu",
    )
    resolved = service.resolve_model()
    assert resolved.config == ROOT / "configs" / ("sd15" if family == "sd15" else "sdxl")
    assert resolved.cross_attention_dim == width, "the published architecture's text width"


def test_family_setting_overrides_detection(tiny: Tiny, tmp_path: Path) -> None:
    service = make_service(tiny, tiny.sdxl.folder, tmp_path, family="sdxl_turbo")
    result = service.generate(ImageRequest(PROMPT, guidance=5.0, seed=1), save=False)
    assert result.family == "sdxl_turbo"
    assert "Steps: 1," in result.images[0].parameters and "CFG scale: 0.0" in result.images[0].parameters
    assert any("guidance" in notice for notice in result.notices)
    with pytest.raises(BadInputError, match="1 to 4 steps"):
        service.generate(ImageRequest(PROMPT, steps=8))
    with loaded_pipeline(service) as loaded:
        assert loaded.pipe.scheduler.config.timestep_spacing == "trailing"


# ----------------------------------------------------------------------------
# Generating
# ----------------------------------------------------------------------------


def test_a_fixed_seed_reproduces_the_picture_and_another_seed_changes_it(sd15: ImageService) -> None:
    first = pixels(sd15, ImageRequest(PROMPT, seed=42))
    np.testing.assert_array_equal(first, pixels(sd15, ImageRequest(PROMPT, seed=42)))
    assert np.abs(first - pixels(sd15, ImageRequest(PROMPT, seed=43))).max() > 0
    random_seed = sd15.generate(ImageRequest(PROMPT, seed=-1), save=False).images[0].seed
    assert random_seed >= 0
    assert load_count(sd15) == 1


def test_progress_is_reported_once_per_step(sd15: ImageService) -> None:
    calls: list[tuple[int, int]] = []
    sd15.generate(ImageRequest(PROMPT, steps=4, num_images=2), progress=lambda s, t: calls.append((s, t)), save=False)
    assert calls == [(step, 8) for step in range(1, 9)]


def test_cancel_stops_between_steps_and_keeps_finished_images(sd15: ImageService) -> None:
    cancel = threading.Event()
    steps: list[int] = []

    def progress(step: int, total: int) -> None:
        steps.append(step)
        if step == 7:  # the third step of the second image
            cancel.set()

    result = sd15.generate(ImageRequest(PROMPT, steps=5, num_images=3, seed=3), progress=progress, cancel=cancel)
    assert result.cancelled
    assert steps[-1] == 7, "no step ran after the cancel"
    assert [image.seed for image in result.images] == [3]
    assert all(not m.in_use for m in sd15._manager.status().resident)
    already = sd15.generate(ImageRequest(PROMPT), cancel=cancel)
    assert already.cancelled and already.images == ()


def test_several_images_get_consecutive_seeds(sd15: ImageService) -> None:
    result = sd15.generate(ImageRequest(PROMPT, seed=100, num_images=3), save=False)
    assert [image.seed for image in result.images] == [100, 101, 102]
    single = pixels(sd15, ImageRequest(PROMPT, seed=101))
    np.testing.assert_array_equal(np.asarray(result.images[1].image, dtype=np.int16), single)


@pytest.mark.parametrize("scheduler", ["euler_a", "dpmpp_2m_karras", "ddim", "euler"])
def test_every_scheduler_generates_without_reloading(sd15: ImageService, scheduler: str) -> None:
    from diffusers import (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        EulerAncestralDiscreteScheduler,
        EulerDiscreteScheduler,
    )

    classes = {
        "euler_a": EulerAncestralDiscreteScheduler,
        "dpmpp_2m_karras": DPMSolverMultistepScheduler,
        "ddim": DDIMScheduler,
        "euler": EulerDiscreteScheduler,
    }
    other = "ddim" if scheduler != "ddim" else "euler"
    sd15.generate(ImageRequest(PROMPT, scheduler=other), save=False)
    result = sd15.generate(ImageRequest(PROMPT, scheduler=scheduler, seed=5), save=False)
    assert np.asarray(result.images[0].image).std() > 0
    with loaded_pipeline(sd15) as loaded:
        assert type(loaded.pipe.scheduler) is classes[scheduler]
        assert loaded.pipe.scheduler.config.steps_offset == 1  # the model's own settings carried over
        if scheduler == "dpmpp_2m_karras":
            assert loaded.pipe.scheduler.config.use_karras_sigmas
    assert load_count(sd15) == 1


def test_large_images_decode_with_vae_tiling(tiny: Tiny, tmp_path: Path) -> None:
    service = make_service(tiny, tiny.sd15.folder, tmp_path, vae_tiling_above_pixels=64 * 64)
    service.generate(ImageRequest(PROMPT, width=64, height=64), save=False)
    with loaded_pipeline(service) as loaded:
        assert not loaded.tiling and not loaded.pipe.vae.use_tiling
    result = service.generate(ImageRequest(PROMPT, width=128, height=64), save=False)
    assert result.images[0].image.size == (128, 64)
    with loaded_pipeline(service) as loaded:
        assert loaded.tiling and loaded.pipe.vae.use_tiling


# ----------------------------------------------------------------------------
# LoRA
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("lora", ["film-grain", "kohya-style"])
def test_a_lora_changes_the_picture_and_removing_it_restores_the_base(sd15: ImageService, lora: str) -> None:
    base = pixels(sd15, ImageRequest(PROMPT, seed=9))
    styled = pixels(sd15, ImageRequest(f"{PROMPT} <lora:{lora}:1>", seed=9))
    assert np.abs(styled - base).max() > 10
    half = pixels(sd15, ImageRequest(PROMPT, seed=9, loras=((lora, 0.5),)))
    assert np.abs(half - base).max() > 0 and np.abs(half - styled).max() > 0
    np.testing.assert_array_equal(pixels(sd15, ImageRequest(f"{PROMPT} <lora:{lora}:0>", seed=9)), base)
    np.testing.assert_array_equal(pixels(sd15, ImageRequest(PROMPT, seed=9)), base)
    with loaded_pipeline(sd15) as loaded:
        assert loaded.adapters == {}
    assert load_count(sd15) == 1, "LoRAs adapt the loaded pipeline; the base model never reloads"


def test_switching_between_loras_keeps_the_base_model_and_each_result(sd15: ImageService) -> None:
    def draw(prompt: str) -> np.ndarray:
        return pixels(sd15, ImageRequest(prompt, seed=11))

    first = draw(f"{PROMPT} <lora:film-grain:0.8>")
    both = draw(f"{PROMPT} <lora:film-grain:0.8> <lora:kohya-style:0.6>")
    second = draw(f"{PROMPT} <lora:kohya-style:0.6>")
    assert np.abs(both - first).max() > 0 and np.abs(both - second).max() > 0
    with loaded_pipeline(sd15) as loaded:
        assert len(loaded.adapters) == 1, "the adapter no longer asked for was deleted"
    np.testing.assert_array_equal(draw(f"{PROMPT} <lora:film-grain:0.8>"), first)
    assert load_count(sd15) == 1


def test_a_lora_file_replaced_on_disk_is_loaded_again(tiny: Tiny, tmp_path: Path) -> None:
    loras = tmp_path / "lora"
    loras.mkdir()
    write_diffusers_lora(tiny.sd15, loras / "mine.safetensors", seed=5)
    service = make_service(tiny, tiny.sd15.folder, tmp_path, lora_dir=str(loras))
    first = pixels(service, ImageRequest(f"{PROMPT} <lora:mine>", seed=4))
    write_diffusers_lora(tiny.sd15, loras / "mine.safetensors", seed=6)
    assert np.abs(pixels(service, ImageRequest(f"{PROMPT} <lora:mine>", seed=4)) - first).max() > 0
    assert load_count(service) == 1


def test_an_sdxl_lora_applies_to_sdxl(tiny: Tiny, tmp_path: Path) -> None:
    service = make_service(tiny, tiny.sdxl.folder, tmp_path)
    base = pixels(service, ImageRequest(PROMPT, seed=2))
    styled = pixels(service, ImageRequest(f"<lora:xl-style:1> {PROMPT}", seed=2))
    assert np.abs(styled - base).max() > 0
    with pytest.raises(BadInputError, match=r"LoRA .film-grain. was made for .* is SDXL; choose a LoRA made for SDXL"):
        service.generate(ImageRequest(f"{PROMPT} <lora:film-grain>"))


def test_prompt_lora_tags_are_parsed() -> None:
    assert parse_prompt_loras("a cat <lora:film-grain:0.8>, <lora:style> at dusk <LORA:x:-1.5>") == (
        "a cat , at dusk",
        [("film-grain", 0.8), ("style", 1.0), ("x", -1.5)],
    )
    assert parse_prompt_loras("plain prompt") == ("plain prompt", [])
    for malformed in ("a <lora:>", "a <lora:name:heavy>", "a <lora:name:0.5", "a <lora:a:1:2>", "<lora:x:99>"):
        with pytest.raises(BadInputError, match="LoRA"):
            parse_prompt_loras(malformed)


def test_an_unknown_lora_is_refused_listing_the_available_ones(sd15: ImageService) -> None:
    with pytest.raises(BadInputError, match=r"no LoRA named 'nope'.*film-grain, kohya-style"):
        sd15.generate(ImageRequest(f"{PROMPT} <lora:nope>"))
    with pytest.raises(BadInputError, match=r"no LoRA named '\.\./film-grain'"):
        sd15.generate(ImageRequest(PROMPT, loras=(("../film-grain", 1.0),)))
    assert sd15.list_loras() == ["film-grain", "kohya-style", "whole-model", "xl-style", "xl-unet-only"]


@pytest.mark.parametrize("lora", ["xl-style", "xl-unet-only"])
def test_an_sdxl_lora_on_sd15_is_refused(sd15: ImageService, lora: str) -> None:
    with pytest.raises(BadInputError, match=rf"LoRA '{lora}' was made for .*Stable Diffusion 1\.5"):
        sd15.generate(ImageRequest(f"{PROMPT} <lora:{lora}:0.7>"))
    assert sd15._manager.status().resident == (), "refused before anything loaded"


def test_a_file_that_is_not_a_lora_is_refused(sd15: ImageService, tiny: Tiny) -> None:
    with pytest.raises(BadInputError, match=r"whole-model\.safetensors .* is not a LoRA"):
        sd15.generate(ImageRequest(f"{PROMPT} <lora:whole-model>"))
    broken = tiny.lora_dir / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    try:
        with pytest.raises(BadInputError, match=r"'broken'.*not a readable \.safetensors"):
            sd15.generate(ImageRequest(f"{PROMPT} <lora:broken>"))
    finally:
        broken.unlink()


# ----------------------------------------------------------------------------
# Saving and the parameters text
# ----------------------------------------------------------------------------


def test_images_are_saved_with_parameters_that_read_back(
    sd15: ImageService, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hashed: list[Path] = []
    monkeypatch.setattr(generator, "model_hash", lambda path: hashed.append(path) or "0123456789")
    request = ImageRequest(
        f"{PROMPT} <lora:film-grain:0.8>",
        negative_prompt="blurry, low quality",
        width=72,
        height=64,
        steps=4,
        guidance=6.5,
        seed=1234,
        num_images=2,
        scheduler="dpmpp_2m_karras",
        loras=(("kohya-style", 0.5),),
    )
    before = date.today().isoformat()
    result = sd15.generate(request)
    days = {before, date.today().isoformat()}
    paths = [image.path for image in result.images]
    assert all(p is not None and p.parent.parent == tmp_path / "outputs" and p.parent.name in days for p in paths)
    assert [p.name for p in paths] == ["00001-1234.png", "00002-1235.png"]  # type: ignore[union-attr]
    text = result.images[0].parameters
    lines = text.split("\n")
    assert lines[0] == f"{PROMPT} <lora:film-grain:0.8> <lora:kohya-style:0.5>"
    assert lines[1] == "Negative prompt: blurry, low quality"
    assert lines[2].startswith(
        "Steps: 4, Sampler: DPM++ 2M Karras, CFG scale: 6.5, Seed: 1234, Size: 72x64, Model hash: "
    )
    assert ', Model: tiny-sd15, Lora hashes: "film-grain: ' in lines[2]
    assert hashed == [sd15.model_path], "the model is hashed once per loaded model, not per image"
    assert b"tEXtparameters\x00" in paths[0].read_bytes()  # type: ignore[union-attr]  # as A1111 writes it
    with Image.open(paths[0]) as image:  # type: ignore[arg-type]
        assert read_png_parameters(image)["seed"] == 1234
    restored = read_png_parameters(paths[1])  # type: ignore[arg-type]
    assert restored == {
        **parse_parameters(result.images[1].parameters),
        "prompt": f"{PROMPT} <lora:film-grain:0.8> <lora:kohya-style:0.5>",
        "negative_prompt": "blurry, low quality",
        "steps": 4,
        "scheduler": "dpmpp_2m_karras",
        "sampler": "DPM++ 2M Karras",
        "guidance": 6.5,
        "seed": 1235,
        "width": 72,
        "height": 64,
        "model": "tiny-sd15",
        "loras": (("film-grain", 0.8), ("kohya-style", 0.5)),
    }
    assert set(restored["lora_hashes"]) == {"film-grain", "kohya-style"}
    assert restored["model_hash"] == "0123456789"
    # The restored request draws the same picture and writes the same parameters.
    again = sd15.generate(request_from_parameters(restored), save=False).images[0]
    np.testing.assert_array_equal(np.asarray(again.image), np.asarray(result.images[1].image))
    assert again.parameters == result.images[1].parameters


def test_automatic1111_parameters_are_understood() -> None:
    text = (
        "masterpiece, a castle <lora:detail:0.6>\nat night\n"
        "Negative prompt: lowres, bad anatomy\n"
        "Steps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 3405691582, Size: 512x768, "
        'Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Lora hashes: "detail: 0123456789ab", Version: v1.10.1'
    )
    parsed = parse_parameters(text)
    assert parsed["prompt"] == "masterpiece, a castle <lora:detail:0.6>\nat night"
    assert parsed["loras"] == (("detail", 0.6),)
    assert parsed["negative_prompt"] == "lowres, bad anatomy"
    assert (parsed["steps"], parsed["scheduler"], parsed["guidance"]) == (30, "dpmpp_2m_karras", 7.0)
    assert (parsed["seed"], parsed["width"], parsed["height"]) == (3405691582, 512, 768)
    assert parsed["model"] == "v1-5-pruned-emaonly" and parsed["lora_hashes"] == {"detail": "0123456789ab"}
    unknown = parse_parameters("a dog\nSteps: 20, Sampler: UniPC, CFG scale: 5, Seed: 1, Size: 512x512")
    assert unknown["sampler"] == "UniPC" and "scheduler" not in unknown


def test_hashes_follow_automatic1111(tiny: Tiny, tmp_path: Path) -> None:
    import hashlib

    checkpoint = tiny.sd15.single_file
    assert generator.model_hash(checkpoint) == hashlib.sha256(checkpoint.read_bytes()).hexdigest()[:10]
    lora = (tiny.lora_dir / "film-grain.safetensors").read_bytes()
    header_end = 8 + int.from_bytes(lora[:8], "little")
    digest = hashlib.sha256(lora[header_end:]).hexdigest()[:12]
    assert generator.lora_hash(tiny.lora_dir / "film-grain.safetensors") == digest
    # A folder as downloaded from a hub: only the weights the pipeline loads count.
    folder = tmp_path / "sd"
    for name in ("unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors",
                 "unet/diffusion_pytorch_model.non_ema.bin", "vae/diffusion_pytorch_model.fp16.safetensors",
                 "text_encoder/model.safetensors", "safety_checker/model.safetensors"):  # fmt: skip
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(name.encode())
    assert [p.relative_to(folder).as_posix() for p in generator.folder_weight_files(folder)] == [
        "text_encoder/model.safetensors",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.fp16.safetensors",
    ]


def test_precision_follows_the_device(tiny: Tiny, tmp_path: Path) -> None:
    cpu = make_service(tiny, tiny.sd15.single_file, tmp_path)
    spec = cpu.load_spec(cpu.resolve_model())
    assert (spec.device, spec.option("dtype"), spec.option("family")) == ("cpu", "float32", "sd15")
    gpu = ImageService(ModelManager(), ImageSettings(model=str(tiny.sd15.folder)), tmp_path,
                       device="cuda")  # fmt: skip
    assert gpu.load_spec(gpu.resolve_model()).option("dtype") == "float16"
    assert ImageService(ModelManager(), ImageSettings(), tmp_path).device in ("cpu", "cuda")


def test_a_png_without_parameters_is_refused(tmp_path: Path) -> None:
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    with pytest.raises(BadInputError, match="no generation parameters"):
        read_png_parameters(plain)
    with pytest.raises(BadInputError, match="not a readable image"):
        read_png_parameters(b"not an image")


def test_images_saved_before_a_failure_stay_saved(sd15: ImageService, tmp_path: Path) -> None:
    def progress(step: int, total: int) -> None:
        if step == 5:  # during the second image
            raise RuntimeError("the display went away")

    with pytest.raises(RuntimeError, match="display"):
        sd15.generate(ImageRequest(PROMPT, steps=3, num_images=3, seed=20), progress=progress)
    saved = sorted((tmp_path / "outputs").glob("*/*.png"))
    assert [p.name for p in saved] == ["00001-20.png"]
    assert read_png_parameters(saved[0])["seed"] == 20
    assert all(not m.in_use for m in sd15._manager.status().resident)


# ----------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "request_, problem",
    [
        (ImageRequest(PROMPT, width=100), r"width 100 is not a multiple of 8; use 96 or 104"),
        (ImageRequest(PROMPT, height=60), r"height 60 is not a multiple of 8"),
        (ImageRequest(PROMPT, width=512), r"width must be between 64 and 256 .*image\.max_size.*got 512"),
        (ImageRequest(PROMPT, height=56), r"height must be between 64 and 256"),
        (ImageRequest(PROMPT, steps=0), r"steps must be between 1 and 150 \(image\.max_steps.*got 0"),
        (ImageRequest(PROMPT, steps=500), r"steps must be between 1 and 150.*got 500"),
        (ImageRequest("   "), r"prompt is empty"),
        (ImageRequest("<lora:film-grain>"), r"prompt is empty"),
        (ImageRequest("x" * 2001), r"prompt is 2,001 characters; the limit is 2,000"),
        (ImageRequest(PROMPT, negative_prompt="y" * 5000), r"negative prompt is 5,000 characters"),
        (ImageRequest(PROMPT, num_images=5), r"number of images must be between 1 and 4 \(image\.max_images"),
        (ImageRequest(PROMPT, num_images=0), r"number of images must be between 1 and 4"),
        (ImageRequest(PROMPT, guidance=50), r"guidance must be a number between 0 and 30"),
        (ImageRequest(PROMPT, width="64"), r"width must be a whole number of pixels, got '64'"),  # type: ignore[arg-type]
        (ImageRequest(PROMPT, scheduler="plms"), r"unknown scheduler 'plms'; choose one of euler_a, dpmpp_2m_karras"),
        (ImageRequest(PROMPT, seed=-2), r"seed must be -1 \(random\)"),
        (ImageRequest(PROMPT, seed=1.5), r"seed must be -1 \(random\) or a whole number"),  # type: ignore[arg-type]
    ],
)
def test_bad_requests_are_refused_before_loading(sd15: ImageService, request_: ImageRequest, problem: str) -> None:
    with pytest.raises(BadInputError, match=problem):
        sd15.generate(request_)
    assert sd15._manager.status().resident == ()


def test_a_corrupt_checkpoint_is_refused_naming_the_file(tiny: Tiny, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"<html>404 not found</html>" * 10)
    with pytest.raises(ModelLoadError, match=r"garbage\.safetensors is not a readable \.safetensors checkpoint"):
        make_service(tiny, garbage, tmp_path).generate(ImageRequest(PROMPT))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(tiny.sd15.single_file.read_bytes()[:300_000])
    with pytest.raises(ModelLoadError, match=r"truncated\.safetensors .*truncated"):
        make_service(tiny, truncated, tmp_path).generate(ImageRequest(PROMPT))
    # With the family forced, detection is skipped: the load itself must fail cleanly.
    service = make_service(tiny, truncated, tmp_path, family="sd15")
    with pytest.raises(ModelLoadError, match=r"truncated\.safetensors"):
        service.generate(ImageRequest(PROMPT))
    assert service._manager.status().resident == ()


@pytest.mark.parametrize(
    "prefix, part", [("first_stage_model.", "VAE"), ("model.diffusion_model.", "UNet"), ("cond_stage_model.", "text")]
)
def test_a_checkpoint_missing_a_part_is_refused(tiny: Tiny, tmp_path: Path, prefix: str, part: str) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(tiny.sd15.single_file)
    partial = tmp_path / "partial.safetensors"
    save_file({k: v for k, v in state.items() if not k.startswith(prefix)}, partial)
    service = make_service(tiny, partial, tmp_path, family="sd15")
    with pytest.raises(ModelLoadError, match=rf"partial\.safetensors has no weights for the {part}"):
        service.generate(ImageRequest(PROMPT))


def test_a_missing_model_says_what_to_place_where(tiny: Tiny, tmp_path: Path) -> None:
    service = make_service(tiny, Path("stable-diffusion-v1-5"), tmp_path)
    message = service.availability()
    assert message is not None
    assert str(tmp_path / "models" / "stable-diffusion-v1-5") in message and "image.model" in message
    with pytest.raises(ModelMissingError, match="stable-diffusion-v1-5"):
        service.generate(ImageRequest(PROMPT))
    assert make_service(tiny, tiny.sd15.folder, tmp_path).availability() is None


# ----------------------------------------------------------------------------
# Sharing the manager with chat
# ----------------------------------------------------------------------------


def test_chat_and_image_models_take_turns_on_one_manager(tiny: Tiny, tmp_path: Path, embedded_model: Path) -> None:
    manager = ModelManager(policy="one_at_a_time", keep_alive_s=-1)
    chat = ChatService(manager, ChatSettings(context_size=512), embedded_model)
    images = make_service(tiny, tiny.sd15.folder, tmp_path, manager=manager)
    greedy = GenerationParams(temperature=0.0, max_tokens=8, seed=1)

    def resident() -> list[str]:
        return [model.kind for model in manager.status().resident]

    assert chat.complete([{"role": "user", "content": "Say hi."}], greedy).strip()
    assert resident() == ["chat"]
    assert images.generate(ImageRequest(PROMPT), save=False).images
    assert resident() == ["image"]
    assert chat.complete([{"role": "user", "content": "Say hi."}], greedy).strip()
    assert resident() == ["chat"]
    actions = [(record.action, record.label.split(":")[0]) for record in manager.status().history]
    assert actions == [
        ("load", "chat"),
        ("unload", "chat"),
        ("load", "image"),
        ("unload", "image"),
        ("load", "chat"),
    ]
    manager.close()


def test_the_models_page_picks_another_checkpoint_for_the_next_request(tiny: Tiny, tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    shutil.copytree(tiny.sd15.folder, models / "first-sd15")
    shutil.copy(tiny.sd15.single_file, models / "second.safetensors")
    shutil.copytree(tiny.lora_dir, models / "lora")  # LoRAs are not checkpoints
    manager = ModelManager(keep_alive_s=-1)
    service = make_service(tiny, Path("first-sd15"), tmp_path, manager, lora_dir="lora")
    assert set(service.installed_models()) == {"first-sd15", "second"}
    request = ImageRequest(prompt=PROMPT, seed=3, steps=2)
    service.generate(request, save=False)
    assert [m.label for m in manager.status().resident] == ["image:first-sd15"]
    service.select_model("second")
    assert service.selected_name == "second"
    assert [m.label for m in manager.status().resident] == ["image:first-sd15"], "nothing loads when picked"
    result = service.generate(request, save=False)
    assert result.model == "second"
    # Through the model manager: the first checkpoint made room for the second.
    assert [m.label for m in manager.status().resident] == ["image:second.safetensors"]
    with pytest.raises(ModelMissingError, match="Installed: first-sd15, second"):
        service.select_model("film-grain")


# -- AUTOMATIC1111's prompt weights and long prompts ---------------------------------------------------


def test_a_weighted_word_pulls_its_embedding_further_from_the_empty_prompt(sd15: ImageService) -> None:
    from stable_diffusion.prompt_weights import encode

    with loaded_pipeline(sd15) as loaded:
        pipe = loaded.pipe
        plain = encode(pipe, "sd15", "a cat", "", "cpu")["prompt_embeds"]
        heavy = encode(pipe, "sd15", "a (cat:1.5)", "", "cpu")["prompt_embeds"]
        light = encode(pipe, "sd15", "a (cat:0.5)", "", "cpu")["prompt_embeds"]
        empty = encode(pipe, "sd15", "", "", "cpu")["prompt_embeds"]
        cat = len(pipe.tokenizer("a").input_ids) - 1  # [start, a, cat, end …]: the cat token's place
    distance = {
        name: float((e[0, cat] - empty[0, cat]).norm())
        for name, e in (("plain", plain), ("heavy", heavy), ("light", light))
    }
    assert distance["heavy"] > distance["plain"] > distance["light"], distance
    assert torch.equal(plain[0, :cat], heavy[0, :cat]), "the words before it are as they were"


def test_a_long_prompt_is_not_cut_at_77_tokens(sd15: ImageService) -> None:
    opening = ", ".join(["a quiet harbour at dawn with boats"] * 22)  # several 75-token chunks
    with loaded_pipeline(sd15) as loaded:
        assert len(loaded.pipe.tokenizer(opening).input_ids) > 150
    request = ImageRequest(prompt=f"{opening}, red", seed=5, steps=2)
    red = pixels(sd15, request)
    blue = pixels(sd15, dataclasses.replace(request, prompt=f"{opening}, blue"))
    assert np.abs(red - blue).max() > 0, "the last word changed the picture: it was read"
    with loaded_pipeline(sd15) as loaded:  # the plain pipeline cuts at 77 tokens: there the words are lost
        kwargs = {"num_inference_steps": 2, "output_type": "np", "width": 64, "height": 64}
        cut_red = loaded.pipe(f"{opening}, red", generator=torch.Generator().manual_seed(5), **kwargs).images
        cut_blue = loaded.pipe(f"{opening}, blue", generator=torch.Generator().manual_seed(5), **kwargs).images
        assert np.array_equal(cut_red, cut_blue)


def test_weights_break_and_loras_together_on_sdxl(tiny: Tiny, tmp_path: Path) -> None:
    service = make_service(tiny, tiny.sdxl.folder, tmp_path)
    request = ImageRequest(prompt="a (lighthouse:1.4) BREAK [fog] <lora:xl-style:1>", seed=3, steps=2)
    styled = pixels(service, request)
    assert styled.shape == (64, 64, 3)
    plain = pixels(service, dataclasses.replace(request, prompt="a (lighthouse:1.4) BREAK [fog]"))
    assert np.abs(styled - plain).max() > 0, "the LoRA tag still works beside the weights"
    weighted_again = pixels(service, dataclasses.replace(request, prompt="a (lighthouse:1.4) BREAK [fog]"))
    assert np.array_equal(plain, weighted_again)


def test_an_absurd_weight_is_refused_before_any_work(sd15: ImageService) -> None:
    before = load_count(sd15)
    with pytest.raises(BadInputError, match=r"weight 1e\+06 on 'cat' is out of range"):
        sd15.generate(ImageRequest(prompt="a (cat:1000000)"), save=False)
    assert load_count(sd15) == before


# -- img2img and inpainting ----------------------------------------------------------------------------


def a_picture(width: int = 64, height: int = 64) -> Image.Image:
    gradient = np.linspace(0, 255, width * height * 3).reshape(height, width, 3).astype(np.uint8)
    return Image.fromarray(gradient)


def test_img2img_starts_from_the_picture_and_strength_decides_how_far_it_goes(sd15: ImageService) -> None:
    start = np.asarray(a_picture(), dtype=np.int16)
    counted: list[tuple[int, int]] = []
    request = ImageRequest(prompt=PROMPT, seed=2, steps=10, init_image=a_picture(), strength=0.3)
    near = sd15.generate(request, save=False, progress=lambda step, total: counted.append((step, total)))
    far = pixels(sd15, dataclasses.replace(request, strength=1.0))
    near_pixels = np.asarray(near.images[0].image, dtype=np.int16)
    assert np.abs(near_pixels - start).mean() < np.abs(far - start).mean()
    assert counted[-1] == (3, 3) and near.steps_run == 3, "img2img at 0.3 runs 3 of the 10 steps"
    assert "Denoising strength: 0.3" in near.images[0].parameters


def test_inpainting_runs_on_the_loaded_components_and_uses_the_mask(sd15: ImageService) -> None:
    from generator import _pipeline_like

    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))  # repaint the left half
    request = ImageRequest(prompt=PROMPT, seed=4, steps=4, init_image=a_picture(), mask=mask, strength=1.0)
    painted = sd15.generate(request, save=False)
    with loaded_pipeline(sd15) as loaded:
        assert _pipeline_like(loaded.pipe, "inpainting").unet is loaded.pipe.unet, "the same weights"
    assert painted.images[0].image.size == (64, 64) and "Mask blur: 4" in painted.images[0].parameters
    unmasked = pixels(sd15, dataclasses.replace(request, mask=None))
    assert np.abs(np.asarray(painted.images[0].image, dtype=np.int16) - unmasked).max() > 0, "the mask was used"
    assert load_count(sd15) == 1, "txt2img, img2img and inpainting share one loaded model"


def test_img2img_requests_are_checked_before_any_work(sd15: ImageService) -> None:
    before = load_count(sd15)
    nothing = Image.new("L", (64, 64), 0)
    cases = [
        (ImageRequest(prompt=PROMPT, mask=nothing), "a mask needs the picture"),
        (ImageRequest(prompt=PROMPT, init_image=a_picture(), mask=nothing), "marks nothing to repaint"),
        (ImageRequest(prompt=PROMPT, init_image=a_picture(), mask=Image.new("L", (32, 32), 255)), "mask is 32x32 but"),
        (ImageRequest(prompt=PROMPT, init_image=a_picture(), strength=0), "denoising strength"),
        (ImageRequest(prompt=PROMPT, init_image=a_picture(), strength=1.5), "denoising strength"),
        (ImageRequest(prompt=PROMPT, init_image=a_picture(), resize_mode="zoom"), "resize mode"),
        (ImageRequest(prompt=PROMPT, init_image=a_picture(1000, 64)), "width"),
    ]
    for request, words in cases:
        with pytest.raises(BadInputError, match=words):
            sd15.generate(request, save=False)
    assert load_count(sd15) == before


def test_a_picture_meets_the_size_by_stretching_or_by_cropping() -> None:
    from stable_diffusion.request import fit_image

    wide = Image.new("RGB", (128, 64), (255, 0, 0))
    wide.paste((0, 0, 255), (0, 0, 32, 64))  # a blue stripe at the left edge
    assert fit_image(wide, 64, 64, "resize").getpixel((2, 32))[2] > 200  # squeezed in: the stripe stays
    assert fit_image(wide, 64, 64, "crop").getpixel((2, 32))[0] > 200  # cropped away: red at the edge


def test_hires_fix_upscales_then_redraws_and_says_so_in_the_parameters(sd15: ImageService) -> None:
    counted: list[tuple[int, int]] = []
    request = ImageRequest(prompt=PROMPT, seed=6, steps=4, hires_scale=2, hires_strength=0.5)
    result = sd15.generate(request, save=False, progress=lambda step, total: counted.append((step, total)))
    image = result.images[0]
    assert image.image.size == (128, 128)
    assert counted[-1] == (6, 6) and result.steps_run == 6, "4 steps, then 2 of 4 at strength 0.5"
    assert "Size: 64x64" in image.parameters and "Hires upscale: 2" in image.parameters
    assert "Hires steps: 4" in image.parameters and "Denoising strength: 0.5" in image.parameters
    plain_upscale = np.asarray(
        sd15.generate(dataclasses.replace(request, hires_scale=None), save=False)
        .images[0]
        .image.resize((128, 128), Image.Resampling.LANCZOS),
        dtype=np.int16,
    )
    assert np.abs(np.asarray(image.image, dtype=np.int16) - plain_upscale).max() > 0, "the second pass redrew it"
    with pytest.raises(BadInputError, match="hires fix makes the image 512x512"):
        sd15.generate(dataclasses.replace(request, width=256, height=256), save=False)
    with pytest.raises(BadInputError, match="scale must be from 1"):
        sd15.generate(dataclasses.replace(request, hires_scale=9), save=False)


def test_inpainting_keeps_the_unmasked_pixels_exactly(sd15: ImageService) -> None:
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))
    request = ImageRequest(prompt=PROMPT, seed=4, steps=3, init_image=a_picture(), mask=mask, mask_blur=0)
    painted = pixels(sd15, request)
    original = np.asarray(a_picture(), dtype=np.int16)
    assert np.array_equal(painted[:, 32:], original[:, 32:]), "black keeps: not even a VAE round trip"
    assert np.abs(painted[:, :32] - original[:, :32]).mean() > 1, "white repaints"


def test_only_masked_inpainting_redraws_the_masks_area_from_its_surroundings_alone(sd15: ImageService) -> None:
    from stable_diffusion.metadata import parse_parameters

    picture = a_picture(128, 128)
    elsewhere = picture.copy()
    elsewhere.paste((255, 0, 255), (96, 96, 128, 128))  # a change far from the mask and its padding
    mask = Image.new("L", (128, 128), 0)
    mask.paste(255, (8, 8, 24, 24))
    request = ImageRequest(
        prompt=PROMPT, seed=5, steps=3, init_image=picture, mask=mask, mask_blur=0, strength=0.9,
        inpaint_area="only_masked", inpaint_padding=8,
    )  # fmt: skip
    only = sd15.generate(request, save=False).images[0]
    only_pixels = np.asarray(only.image, dtype=np.int16)
    original = np.asarray(picture, dtype=np.int16)
    assert np.array_equal(only_pixels[40:, :], original[40:, :]), "outside the mask nothing changes"
    assert np.abs(only_pixels[8:24, 8:24] - original[8:24, 8:24]).mean() > 1
    # Only the crop around the mask is drawn: a change outside it leaves the repainted area as it was,
    # where redrawing the whole picture sees the change.
    moved = pixels(sd15, dataclasses.replace(request, init_image=elsewhere))
    assert np.array_equal(moved[8:24, 8:24], only_pixels[8:24, 8:24])
    whole = dataclasses.replace(request, inpaint_area="whole")
    assert not np.array_equal(
        pixels(sd15, whole)[8:24, 8:24], pixels(sd15, dataclasses.replace(whole, init_image=elsewhere))[8:24, 8:24]
    )
    assert "Inpaint area: Only masked, Masked area padding: 8" in only.parameters
    read = parse_parameters(only.parameters)
    assert read["inpaint_area"] == "only_masked" and read["inpaint_padding"] == 8
    for wrong, words in [({"inpaint_area": "edges"}, "inpaint area"), ({"inpaint_padding": 999}, "padding")]:
        with pytest.raises(BadInputError, match=words):
            sd15.generate(dataclasses.replace(request, **wrong), save=False)


def test_hires_fix_can_upscale_the_latents_instead_of_the_picture(sd15: ImageService) -> None:
    request = ImageRequest(prompt=PROMPT, seed=6, steps=4, hires_scale=2, hires_strength=0.6)
    latent = sd15.generate(dataclasses.replace(request, hires_upscaler="Latent"), save=False).images[0]
    assert latent.image.size == (128, 128) and "Hires upscaler: Latent" in latent.parameters
    lanczos = pixels(sd15, request)
    assert np.abs(np.asarray(latent.image, dtype=np.int16) - lanczos).max() > 0, "another upscaler, another start"
    nearest = pixels(sd15, dataclasses.replace(request, hires_upscaler="Latent (nearest-exact)"))
    assert not np.array_equal(nearest, np.asarray(latent.image, dtype=np.int16))
    with pytest.raises(BadInputError, match="unknown hires upscaler 'R-ESRGAN 4x\\+'; choose one of Latent"):
        sd15.generate(dataclasses.replace(request, hires_upscaler="R-ESRGAN 4x+"), save=False)


def test_sdxl_does_img2img_inpainting_of_the_masked_area_and_a_latent_hires_fix(tiny: Tiny, tmp_path: Path) -> None:
    service = make_service(tiny, tiny.sdxl.folder, tmp_path)
    start = a_picture()
    moved = pixels(service, ImageRequest(prompt=PROMPT, seed=2, steps=4, init_image=start, strength=0.5))
    assert moved.shape == (64, 64, 3) and np.abs(moved - np.asarray(start, dtype=np.int16)).mean() > 0
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (4, 4, 20, 20))
    inpaint = ImageRequest(
        prompt=PROMPT, seed=2, steps=3, init_image=start, mask=mask, mask_blur=0, inpaint_area="only_masked",
        inpaint_padding=4,
    )  # fmt: skip
    painted = pixels(service, inpaint)
    assert np.array_equal(painted[32:], np.asarray(start, dtype=np.int16)[32:])
    assert np.abs(painted[4:20, 4:20] - np.asarray(start, dtype=np.int16)[4:20, 4:20]).mean() > 0
    hires = ImageRequest(prompt=PROMPT, seed=2, steps=2, hires_scale=1.5, hires_upscaler="Latent (bicubic)")
    assert pixels(service, hires).shape == (96, 96, 3)
    assert load_count(service) == 1, "every workflow ran on the one loaded SDXL model"


# -- dedicated inpainting checkpoints (a UNet that reads 9 channels: latents, mask, masked picture) ---------


@pytest.fixture(scope="session")
def inpainting_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, TinyModel]:
    root = tmp_path_factory.mktemp("tiny-inpainting")
    return {family: build_inpainting(root / family, family) for family in ("sd15", "sdxl")}


def a_mask(box: tuple[int, int, int, int] = (0, 0, 32, 64), size: int = 64) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    mask.paste(255, box)
    return mask


def test_masked_requests_go_to_the_inpainting_checkpoint_and_the_rest_to_the_selected_model(
    tiny: Tiny, inpainting_models: dict[str, TinyModel], tmp_path: Path
) -> None:
    dedicated = inpainting_models["sd15"].folder
    service = make_service(tiny, tiny.sd15.folder, tmp_path, inpainting_model=str(dedicated))
    request = ImageRequest(prompt=PROMPT, seed=3, steps=3, init_image=a_picture(), mask=a_mask(), mask_blur=0)
    painted = service.generate(request, save=False)
    assert painted.model == "tiny-sd15-inpainting" and "Model: tiny-sd15-inpainting" in painted.images[0].parameters
    with service._manager.acquire(service.load_spec(service.resolve_model(dedicated))) as loaded:
        assert loaded.inpainting and loaded.pipe.unet.config.in_channels == 9
    result = np.asarray(painted.images[0].image, dtype=np.int16)
    original = np.asarray(a_picture(), dtype=np.int16)
    assert np.array_equal(result[:, 32:], original[:, 32:]) and np.abs(result[:, :32] - original[:, :32]).mean() > 1
    other_mask = pixels(service, dataclasses.replace(request, mask=a_mask((0, 0, 64, 32))))
    assert not np.array_equal(other_mask, result), "the UNet reads the mask"
    plain = service.generate(ImageRequest(prompt=PROMPT, seed=3, steps=2), save=False)
    assert plain.model == "tiny-sd15", "text-to-image stays with the selected model"
    base_inpainting = make_service(tiny, tiny.sd15.folder, tmp_path).generate(request, save=False)
    assert not np.array_equal(np.asarray(base_inpainting.images[0].image, dtype=np.int16), result)


def test_an_inpainting_checkpoint_that_is_not_there_leaves_inpainting_to_the_selected_model(
    tiny: Tiny, tmp_path: Path
) -> None:
    service = make_service(tiny, tiny.sd15.folder, tmp_path, inpainting_model="sd-v1-5-inpainting")
    request = ImageRequest(prompt=PROMPT, seed=3, steps=2, init_image=a_picture(), mask=a_mask())
    result = service.generate(request, save=False)
    assert result.model == "tiny-sd15"
    assert any("sd-v1-5-inpainting (image.inpainting_model) is not there" in notice for notice in result.notices)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_an_inpainting_checkpoint_picked_as_the_model_makes_every_kind_of_picture(
    tiny: Tiny, inpainting_models: dict[str, TinyModel], tmp_path: Path, family: str
) -> None:
    model = inpainting_models[family]
    service = make_service(tiny, model.single_file, tmp_path)  # the single file: its UNet is read with 9 channels
    assert service.resolve_model().inpainting
    drawn = pixels(service, ImageRequest(prompt=PROMPT, seed=1, steps=2))
    assert drawn.shape == (64, 64, 3) and drawn.std() > 0
    near = pixels(service, ImageRequest(prompt=PROMPT, seed=1, steps=4, init_image=a_picture(), strength=0.25))
    far = pixels(service, ImageRequest(prompt=PROMPT, seed=1, steps=4, init_image=a_picture(), strength=1.0))
    start = np.asarray(a_picture(), dtype=np.int16)
    assert np.abs(near - start).mean() < np.abs(far - start).mean(), "img2img starts from the picture"
    hires = ImageRequest(prompt=PROMPT, seed=1, steps=2, hires_scale=1.5)
    assert pixels(service, hires).shape == (96, 96, 3)
    with pytest.raises(BadInputError, match="inpainting checkpoint: its hires fix works on the picture"):
        service.generate(dataclasses.replace(hires, hires_upscaler="Latent"), save=False)
    folder = make_service(tiny, model.folder, tmp_path)
    assert np.array_equal(pixels(folder, ImageRequest(prompt=PROMPT, seed=1, steps=2)), drawn), "file = folder"


def test_a_checkpoint_listed_in_the_manifest_is_not_read_again_for_its_hash(tiny: Tiny, tmp_path: Path) -> None:
    import json

    models = tmp_path / "models"
    models.mkdir()
    checkpoint = models / "listed.safetensors"
    shutil.copy(tiny.sd15.single_file, checkpoint)
    size = checkpoint.stat().st_size
    listed = {"files": {"listed.safetensors": {"size": size, "sha256": "0123456789" + "a" * 54}}}
    (models / "manifest.json").write_text(json.dumps(listed), encoding="utf-8")
    service = make_service(tiny, checkpoint, tmp_path)
    request = ImageRequest(PROMPT, seed=3)
    assert "Model hash: 0123456789," in service.generate(request, save=False).images[0].parameters
    listed["files"]["listed.safetensors"]["size"] = size + 1  # the file changed since: read it
    (models / "manifest.json").write_text(json.dumps(listed), encoding="utf-8")
    fresh = make_service(tiny, checkpoint, tmp_path)  # the same folder, a new service: nothing cached
    parameters = fresh.generate(request, save=False).images[0].parameters
    assert f"Model hash: {model_hash(checkpoint)}," in parameters
