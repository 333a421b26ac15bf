"""Fetching the real models on a connected machine, into the layout config.yaml expects, with
huggingface_hub: only the files each model needs, resumable, one line per file; then the
manifest that the offline machine checks them against.

This is the only code in the app that uses the network, and only when a user runs
``main.py models download``. The rest of the app stays offline (``offline.py``).
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from errors import BadInputError
from model_files.manifest import build_manifest, read_manifest, write_manifest


@dataclass(frozen=True)
class Source:
    """One model to fetch: which repository files, and where they go under the models folder."""

    name: str
    repo: str
    patterns: tuple[str, ...]  # files to fetch (fnmatch patterns on the repository's paths)
    folder: str = ""  # under the models folder; "" is the folder itself
    flatten: bool = False  # put every file directly in ``folder`` (voices sit in subfolders upstream)
    revision: str = "main"
    note: str = ""


SOURCES: dict[str, Source] = {
    source.name: source
    for source in (
        Source("chat", "TheBloke/Mistral-7B-Instruct-v0.2-GGUF", ("mistral-7b-instruct-v0.2.Q4_K_M.gguf",),
               note="Mistral-7B-Instruct v0.2, Q4_K_M GGUF, 4.4 GB"),
        Source("vision", "llava-hf/llava-1.5-7b-hf", ("*.json", "*.safetensors", "tokenizer.model"),
               folder="llava-1.5-7b-hf", note="LLaVA-1.5-7B, transformers layout, 14 GB"),
        Source("sd15", "stable-diffusion-v1-5/stable-diffusion-v1-5",
               ("model_index.json", "*/config.json", "scheduler/*", "tokenizer/*", "feature_extractor/*",
                "text_encoder/model.safetensors", "unet/diffusion_pytorch_model.safetensors",
                "vae/diffusion_pytorch_model.safetensors"),
               folder="stable-diffusion-v1-5", note="Stable Diffusion 1.5, diffusers layout, 5.2 GB"),
        Source("sd15-inpainting", "stable-diffusion-v1-5/stable-diffusion-inpainting",
               ("model_index.json", "*/config.json", "scheduler/*", "tokenizer/*", "feature_extractor/*",
                "text_encoder/model.safetensors", "unet/diffusion_pytorch_model.safetensors",
                "vae/diffusion_pytorch_model.safetensors"),
               folder="stable-diffusion-inpainting",
               note="Stable Diffusion 1.5 inpainting (set image.inpainting_model to use it), diffusers layout, 4.3 GB"),
        Source("sdxl", "stabilityai/stable-diffusion-xl-base-1.0", ("sd_xl_base_1.0.safetensors",),
               note="SDXL base 1.0, one checkpoint, 6.9 GB"),
        Source("sdxl-turbo", "stabilityai/sdxl-turbo", ("sd_xl_turbo_1.0_fp16.safetensors",),
               note="SDXL-Turbo, one fp16 checkpoint, 6.9 GB"),
        Source("whisper", "Systran/faster-whisper-small", ("*",), folder="faster-whisper-small",
               note="Whisper small (multilingual), CTranslate2, 0.5 GB"),
        Source("voice", "rhasspy/piper-voices", ("en/en_US/joe/medium/en_US-joe-medium.onnx*",), folder="voices",
               flatten=True, revision="main", note="Piper en_US-joe-medium, 63 MB"),
    )
}  # fmt: skip
PROFILES: dict[str, tuple[str, ...]] = {
    # A 24 GB card: every module, SD 1.5 and SDXL-Turbo for images.
    "24gb": ("chat", "vision", "sd15", "sdxl-turbo", "whisper", "voice"),
    # An 8 GB card: chat, vision in 4-bit, SD 1.5, speech.
    "8gb": ("chat", "vision", "sd15", "whisper", "voice"),
}
OFFLINE = (
    "no network: 'models download' runs on a connected machine; carry the models here with "
    "'main.py models pack' and 'main.py models unpack' (see README)"
)

Say = Callable[[str], None]


def lora_source(spec: str) -> Source:
    """``REPO:FILE`` (a LoRA .safetensors in a repository) as a source for the lora folder."""
    repo, _, file = spec.partition(":")
    if not repo or "/" not in repo or not file.endswith(".safetensors"):
        raise BadInputError(f"'{spec[:80]}' is not REPO:FILE.safetensors, e.g. someone/styles:olymp_V4.safetensors")
    return Source(f"lora {file}", repo, (file,), folder="lora", flatten=True, note="LoRA")


def chosen_sources(names: list[str], profile: str, loras: list[str]) -> list[Source]:
    if profile not in PROFILES:
        raise BadInputError(f"unknown profile '{profile}'; use {' or '.join(PROFILES)}")
    wanted: list[str] = []
    for name in names:
        if name == "all":
            wanted += PROFILES[profile]
        elif name in SOURCES:
            wanted.append(name)
        else:
            raise BadInputError(f"no model called '{name[:40]}'; use all or one of: {', '.join(SOURCES)}")
    unique = list(dict.fromkeys(wanted))
    return [SOURCES[name] for name in unique] + [lora_source(spec) for spec in loras]


def download(folder: Path, sources: list[Source], say: Say, endpoint: str | None = None) -> dict[str, Any]:
    """Fetch ``sources`` into ``folder`` and update its manifest. Raises BadInputError(OFFLINE) without network."""
    with _online_hub() as hub:
        fetched = _fetch(hub, folder, sources, say, endpoint)
    say("writing the manifest (SHA-256 of every file) …")
    try:
        earlier = {name: (e.get("source"), e.get("revision")) for name, e in read_manifest(folder)["files"].items()}
    except BadInputError:
        earlier = {}
    manifest = build_manifest(folder, {**earlier, **fetched})  # type: ignore[arg-type]
    write_manifest(folder, manifest)
    return manifest


def _fetch(hub: Any, folder: Path, sources: list[Source], say: Say, endpoint: str | None) -> dict[str, tuple[str, str]]:
    """Each source's files into place; returns {file: (repository, revision)}."""
    api = hub.HfApi(endpoint=endpoint)
    folder.mkdir(parents=True, exist_ok=True)
    fetched: dict[str, tuple[str, str]] = {}
    for source in sources:
        say(f"{source.name}: {source.repo} ({source.note})")
        try:
            info = api.model_info(source.repo, revision=source.revision)
        except Exception as error:
            raise _failure(hub, error, source) from None
        files = sorted(
            s.rfilename for s in info.siblings or [] if any(fnmatch.fnmatch(s.rfilename, p) for p in source.patterns)
        )
        if not files:
            raise BadInputError(f"{source.repo} has no files matching {', '.join(source.patterns)}")
        target = folder / source.folder
        for file in files:
            name = PurePosixPath(file).name if source.flatten else file
            say(f"  {file} -> {(target / name).relative_to(folder)}")
            try:
                local = hub.hf_hub_download(
                    source.repo, file, revision=info.sha, local_dir=target / ".download", endpoint=endpoint
                )
            except Exception as error:
                raise _failure(hub, error, source) from None
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            os.replace(local, target / name)
            fetched[(target / name).relative_to(folder).as_posix()] = (source.repo, str(info.sha))
        shutil.rmtree(target / ".download", ignore_errors=True)
    return fetched


@contextlib.contextmanager
def _online_hub() -> Iterator[Any]:
    """huggingface_hub with the network allowed while the download runs; offline again after it, so
    nothing else in the process (the app runs offline) ever reaches out."""
    import huggingface_hub
    from huggingface_hub import constants

    before_flag, before_env = constants.HF_HUB_OFFLINE, os.environ.get("HF_HUB_OFFLINE")
    constants.HF_HUB_OFFLINE = False
    os.environ["HF_HUB_OFFLINE"] = "0"
    try:
        yield huggingface_hub
    finally:
        constants.HF_HUB_OFFLINE = before_flag
        if before_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = before_env


def _failure(hub: Any, error: Exception, source: Source) -> BadInputError:
    """A failed request in one line: no network, a missing repository or file, or what the hub said."""
    errors = hub.errors
    if isinstance(error, errors.RepositoryNotFoundError | errors.RevisionNotFoundError):
        return BadInputError(f"{source.repo} (revision {source.revision}) was not found on the hub")
    if isinstance(error, errors.EntryNotFoundError) and not isinstance(error, errors.LocalEntryNotFoundError):
        return BadInputError(f"a file of {source.repo} was not found on the hub ({str(error)[:200]})")
    # huggingface_hub's HTTP client raises its own transport errors: known by name, whichever module.
    transport = any(kind.__name__ in ("TransportError", "ConnectionError") for kind in type(error).__mro__)
    if transport or isinstance(error, errors.OfflineModeIsEnabled | errors.LocalEntryNotFoundError):
        return BadInputError(OFFLINE)
    return BadInputError(f"downloading {source.repo} failed: {type(error).__name__}: {str(error)[:200]}")
