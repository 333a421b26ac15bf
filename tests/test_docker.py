"""The container files, checked without a Docker engine: the Dockerfile passes hadolint and keeps
its promises (multi-stage, non-root, models read-only, health check), and the compose file names
the right volumes, the loopback port, the GPU reservation, the key from an env file and /health."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import ROOT

DOCKERFILE = (ROOT / "Dockerfile").read_text(encoding="utf-8")


def stages() -> dict[str, str]:
    """Each FROM … AS name stage's text (the last, unnamed stage as "final")."""
    found: dict[str, str] = {}
    pieces = re.split(r"^FROM ", DOCKERFILE, flags=re.MULTILINE)[1:]
    for piece in pieces:
        header = piece.splitlines()[0]
        name = header.split(" AS ")[1].strip() if " AS " in header else "final"
        found[name] = piece
    return found


def test_the_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    result = subprocess.run([hadolint, "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_image_runs_as_a_user_without_compilers_and_is_checked_by_its_health() -> None:
    final = stages()["final"]
    assert "USER 1000:1000" in final and "useradd --create-home --uid 1000 enclave" in final
    assert "COPY --from=build /opt/venv /opt/venv" in final
    for runtime in ("runtime-cuda", "runtime-cpu", "final"):
        assert "build-essential" not in stages()[runtime] and "cmake" not in stages()[runtime]
    assert "ENCLAVE_MODELS_DIR=/models" in final and "ENCLAVE_DATA_DIR=/data" in final
    assert "HEALTHCHECK" in final and "/health" in final
    # llama.cpp is compiled with CUDA in the CUDA build, for the CPU without -march=native in the other
    assert "-DGGML_CUDA=on" in stages()["build-cuda-base"] and "GGML_NATIVE=OFF" in stages()["build-cpu-base"]
    assert "download.pytorch.org/whl/cpu" in stages()["build-cpu-base"]


def test_compose_serves_on_loopback_with_the_gpu_models_read_only_and_a_health_check() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text(encoding="utf-8"))
    service = compose["services"]["enclave"]
    assert service["ports"] == ["127.0.0.1:7860:7860"]
    volumes = service["volumes"]
    assert "./models:/models:ro" in volumes
    assert {v.split(":")[1] for v in volumes} == {"/models", "/app/outputs", "/data", "/app/logs"}
    assert "enclave-data" in compose["volumes"]
    assert service["env_file"] == ".env"
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    health = service["healthcheck"]
    assert health["test"][0] == "CMD" and "http://127.0.0.1:7860/health" in health["test"][-1]
    # What the health check runs works: the command is valid Python that reaches /health.
    compile(health["test"][-1], "healthcheck", "exec")


def test_the_env_example_names_the_key_and_the_app_refuses_to_listen_beyond_loopback_without_it(
    tmp_path: Path,
) -> None:
    from errors import ConfigError
    from settings import load_settings

    example = (ROOT / "docker" / "env.example").read_text(encoding="utf-8")
    assert "ENCLAVE_API_KEY=" in example
    environment = {"ENCLAVE_HOST": "0.0.0.0", "ENCLAVE_MODELS_DIR": "/models"}  # the image's own settings
    try:
        load_settings(ROOT / "config.yaml", environment)
        refused = None
    except ConfigError as error:
        refused = str(error)
    assert refused is not None and "no API key is set" in refused
    settings = load_settings(ROOT / "config.yaml", {**environment, "ENCLAVE_API_KEY": "k" * 24})
    assert settings.models_dir == Path("/models")
