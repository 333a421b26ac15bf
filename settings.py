"""Typed settings read from config.yaml, checked once at start-up.

An unknown key or a bad value stops start-up with a message that names the key
(and suggests the closest known key for a typo). A few environment variables
override paths and the listening address, for containers and service units.
"""

from __future__ import annotations

import difflib
import ipaddress
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from errors import ConfigError

ENVIRONMENT_OVERRIDES = {
    "ENCLAVE_HOST": ("server", "host"),
    "ENCLAVE_PORT": ("server", "port"),
    "ENCLAVE_MODELS_DIR": ("models_dir",),
    "ENCLAVE_DATA_DIR": ("data_dir",),
    "ENCLAVE_API_KEY": ("server", "api_key"),
}


LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
MIN_PUBLIC_KEY_CHARS = 16  # a key that guards a server others can reach


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerSettings(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(7860, ge=1, le=65535)
    api_key: str | None = None
    allow_unauthenticated_remote: bool = False
    max_request_mb: float = Field(32.0, gt=0)
    allowed_hosts: tuple[str, ...] = ()

    @property
    def is_loopback(self) -> bool:
        """Decided by parsing the address: "127.attacker.example" is a name, not loopback."""
        if self.host.lower() == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host.strip("[]")).is_loopback
        except ValueError:
            return False


class ManagerSettings(_Strict):
    policy: Literal["one_at_a_time", "vram_budget"] = "one_at_a_time"
    gpu_memory_budget_gb: float = Field(24.0, gt=0)
    cpu_memory_budget_gb: float | Literal["auto"] = "auto"
    keep_alive_s: float = 300.0
    wait_timeout_s: float = Field(600.0, gt=0)
    max_queue: int = Field(32, ge=1)
    warm_tier_gb: float | Literal["auto"] = "auto"

    @field_validator("cpu_memory_budget_gb")
    @classmethod
    def _cpu_budget_positive(cls, value: float | str) -> float | str:
        if not isinstance(value, str) and value <= 0:
            raise ValueError("must be 'auto' or a number of GB above 0")
        return value

    @field_validator("warm_tier_gb")
    @classmethod
    def _warm_tier_not_negative(cls, value: float | str) -> float | str:
        if not isinstance(value, str) and value < 0:
            raise ValueError("must be 'auto', 0 (off) or a number of GB")
        return value


class GenerationDefaults(_Strict):
    temperature: float = Field(0.7, ge=0, le=2)
    top_p: float = Field(0.95, gt=0, le=1)
    max_tokens: int = Field(512, ge=1, le=32768)
    repeat_penalty: float = Field(1.1, ge=0.5, le=2)
    seed: int = -1


class ChatSettings(_Strict):
    model: str = "mistral-7b-instruct-v0.2.Q4_K_M.gguf"
    context_size: int = Field(4096, ge=256, le=131072)
    gpu_layers: int | Literal["auto"] = "auto"
    threads: int | Literal["auto"] = "auto"
    system_prompt: str = "You are a helpful assistant."
    max_message_chars: int = Field(32000, ge=1)
    kept_prompt_mb: int = Field(1024, ge=0)  # the evaluated conversation kept over a swap; 0: off
    cpu_when_gpu_busy: bool = True  # answer on a CPU copy of the model while the GPU is busy
    parallel_requests: int = Field(1, ge=1, le=16)  # requests decoded together when several come at once
    defaults: GenerationDefaults = GenerationDefaults()

    @field_validator("threads")
    @classmethod
    def _threads_positive(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 1:
            raise ValueError("must be 'auto' or a whole number of at least 1")
        return value


class VisionGenerationDefaults(_Strict):
    temperature: float = Field(0.2, ge=0, le=2)
    top_p: float = Field(0.9, gt=0, le=1)
    max_tokens: int = Field(512, ge=1, le=4096)
    repeat_penalty: float = Field(1.0, ge=0.5, le=2)
    seed: int = -1


class VisionSettings(_Strict):
    model: str = "llava-1.5-7b-hf"
    precision: Literal["auto", "4bit", "8bit", "fp16", "bf16", "fp32"] = "auto"
    max_image_pixels: int = Field(4_000_000, ge=10_000)
    refuse_image_pixels: int = Field(100_000_000, ge=10_000, le=178_956_970)  # Pillow's own hard limit
    default_question: str = "Describe this image in detail."
    defaults: VisionGenerationDefaults = VisionGenerationDefaults()


class ImageDefaults(_Strict):
    negative_prompt: str = ""
    width: int = Field(512, ge=64)
    height: int = Field(512, ge=64)
    steps: int = Field(25, ge=1)
    guidance: float = Field(7.0, ge=0, le=30)
    scheduler: Literal["euler_a", "dpmpp_2m_karras", "ddim", "euler"] = "euler_a"
    seed: int = -1


class ImageSettings(_Strict):
    model: str = "stable-diffusion-v1-5"
    family: Literal["auto", "sd15", "sdxl", "sdxl_turbo"] = "auto"
    inpainting_model: str = ""  # used for requests with a mask when it is there
    lora_dir: str = "lora"
    outputs_dir: Path = Path("outputs")
    min_size: int = Field(256, ge=64)
    max_size: int = Field(2048, ge=64)
    max_steps: int = Field(150, ge=1)
    max_images: int = Field(8, ge=1)
    vae_tiling_above_pixels: int = Field(1024 * 1024, ge=0)
    defaults: ImageDefaults = ImageDefaults()

    @model_validator(mode="after")
    def _defaults_within_bounds(self) -> ImageSettings:
        """Defaults every request would fail on are refused at start-up instead."""
        if self.min_size > self.max_size:
            raise ValueError(f"min_size ({self.min_size}) is larger than max_size ({self.max_size})")
        for name in ("width", "height"):
            size = getattr(self.defaults, name)
            if size % 8 or not self.min_size <= size <= self.max_size:
                raise ValueError(
                    f"defaults.{name} is {size}: it must be a multiple of 8 between min_size ({self.min_size}) "
                    f"and max_size ({self.max_size})"
                )
        if self.defaults.steps > self.max_steps:
            raise ValueError(f"defaults.steps ({self.defaults.steps}) is more than max_steps ({self.max_steps})")
        return self


class SpeechSettings(_Strict):
    transcription_model: str = "faster-whisper-small"
    language: str = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    compute_type: Literal["auto", "int8", "int8_float16", "float16", "float32"] = "auto"
    vad: bool = True
    voice: str = "en_US-joe-medium"
    voices_dir: str = "voices"
    speaking_rate: float = Field(1.0, ge=0.25, le=4.0)
    max_audio_mb: float = Field(25.0, gt=0)
    max_audio_seconds: float = Field(1800.0, gt=0)
    max_speech_chars: int = Field(4096, ge=1)

    @field_validator("language")
    @classmethod
    def _language_code(cls, value: str) -> str:
        if value != "auto" and not (2 <= len(value) <= 3 and value.isalpha() and value.islower()):
            raise ValueError("must be auto or a lowercase language code such as en or de")
        return value


class AssistantSettings(_Strict):
    interpret_image_prompts: bool = True
    classify_undecided: bool = True


class AuditSettings(_Strict):
    enabled: bool = True
    path: Path = Path("logs/audit.jsonl")
    log_prompts: bool = False
    max_mb: float = Field(10.0, gt=0)
    backups: int = Field(5, ge=1)


class Settings(_Strict):
    server: ServerSettings = ServerSettings()
    models_dir: Path = Path("models")
    data_dir: Path = Path("data")
    manager: ManagerSettings = ManagerSettings()
    chat: ChatSettings = ChatSettings()
    vision: VisionSettings = VisionSettings()
    image: ImageSettings = ImageSettings()
    speech: SpeechSettings = SpeechSettings()
    assistant: AssistantSettings = AssistantSettings()
    audit: AuditSettings = AuditSettings()

    def model_path(self, name: str) -> Path:
        """A model path from config: absolute as written, else under models_dir."""
        path = Path(name).expanduser()
        return path if path.is_absolute() else self.models_dir / path


def load_settings(path: Path | None, environ: Mapping[str, str] | None = None) -> Settings:
    """Read config.yaml (or defaults when path is None), apply env overrides, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = _read_yaml(path)
    _apply_environment(raw, environ or {})
    try:
        settings = Settings.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(_describe(error, path)) from None
    require_safe_exposure(settings.server)
    base = path.parent if path is not None else None
    outputs_dir = _anchor(settings.image.outputs_dir, base)
    return settings.model_copy(
        update={
            "models_dir": _anchor(settings.models_dir, base),
            "data_dir": _anchor(settings.data_dir, base),
            "image": settings.image.model_copy(update={"outputs_dir": outputs_dir}),
            "audit": settings.audit.model_copy(update={"path": _anchor(settings.audit.path, base)}),
        }
    )


def require_safe_exposure(server: ServerSettings) -> None:
    """Refuse to serve an unauthenticated API beyond this machine unless told to."""
    if server.is_loopback:
        return
    if not server.api_key and not server.allow_unauthenticated_remote:
        raise ConfigError(
            f"server.host is {server.host}, reachable from other machines, but no API key is set: set "
            "server.api_key (or ENCLAVE_API_KEY), or server.allow_unauthenticated_remote: true to accept the risk"
        )
    if server.api_key and len(server.api_key) < MIN_PUBLIC_KEY_CHARS:
        raise ConfigError(
            f"server.api_key is {len(server.api_key)} characters long; a server reachable from other machines "
            f"needs at least {MIN_PUBLIC_KEY_CHARS} (e.g. the output of: python3 -c 'import secrets; "
            "print(secrets.token_urlsafe(24))')"
        )


def _anchor(folder: Path, base: Path | None) -> Path:
    """Relative folders are relative to the config file, not the shell's working directory."""
    folder = folder.expanduser()
    return folder if folder.is_absolute() or base is None else base / folder


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found; copy config.yaml from the project or pass --config") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {error}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of settings at the top level")
    return data


def _apply_environment(raw: dict[str, Any], environ: Mapping[str, str]) -> None:
    for variable, keys in ENVIRONMENT_OVERRIDES.items():
        if variable not in environ:
            continue
        section = raw
        for key in keys[:-1]:
            section = section.setdefault(key, {})
            if not isinstance(section, dict):
                raise ConfigError(f"'{key}' in config must be a mapping to apply {variable}")
        section[keys[-1]] = environ[variable]


def _describe(error: ValidationError, path: Path | None) -> str:
    source = str(path) if path is not None else "settings"
    problems: dict[str, str] = {}
    for item in error.errors():
        location = _settings_path(item["loc"])
        key = ".".join(str(part) for part in location)
        if item["type"] == "extra_forbidden":
            problems.setdefault(key, f"unknown key '{key}'{_suggestion(location)}")
        elif key in problems:  # a value fitting neither side of "number or 'auto'": one problem
            problems[key] = f"'{key}': must be 'auto' or a whole number (got {item.get('input')!r})"
        else:
            problems[key] = f"'{key}': {item['msg']} (got {item.get('input')!r})"
    lines = [f"{source} has {len(problems)} problem(s):", *(f"  - {p}" for p in problems.values())]
    return "\n".join(lines)


def _settings_path(location: tuple[Any, ...]) -> tuple[Any, ...]:
    """The part of pydantic's error location that names settings keys.

    For a value that may be a number or 'auto', pydantic appends the union member
    it tried ('int', "literal['auto']"): that part is not a key, so it is dropped.
    """
    model: type[BaseModel] = Settings
    path: list[Any] = []
    for part in location:
        path.append(part)
        field = model.model_fields.get(str(part))
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            break  # an unknown key or a value: nothing below it is a key
        model = annotation
    return tuple(path)


def _suggestion(location: tuple[Any, ...]) -> str:
    model: type[BaseModel] = Settings
    for part in location[:-1]:
        field = model.model_fields.get(str(part))
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return ""
        model = annotation
    known = list(model.model_fields)
    close = difflib.get_close_matches(str(location[-1]), known, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"{hint}; known keys here: {', '.join(known)}"
