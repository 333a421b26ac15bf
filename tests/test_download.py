"""`main.py models download` against a model hub on loopback (tests/fake_hub.py) through the real
huggingface_hub download code: only the files asked for, in the layout config.yaml expects, a cut
connection resumed, the manifest written, and a clear refusal without network."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from errors import BadInputError
from model_files.download import PROFILES, SOURCES, Source, chosen_sources, download
from model_files.manifest import read_manifest, verify
from tests.conftest import ROOT, write_config
from tests.fake_hub import COMMIT, FakeHub

GGUF = os.urandom(24 * 2**20)  # over huggingface_hub's 10 MB read size, so a cut leaves a part to resume
REPOS = {
    "someone/chat-GGUF": {"chat.Q4_K_M.gguf": GGUF, "chat.Q8_0.gguf": b"not wanted" * 1000, "README.md": b"# chat"},
    "someone/voices": {"en/en_US/x/medium/x.onnx": b"onnx" * 5000, "en/en_US/x/medium/x.onnx.json": b"{}"},
    "someone/styles": {"olymp_V4.safetensors": b"lora" * 3000},
}
CHAT = Source("chat", "someone/chat-GGUF", ("chat.Q4_K_M.gguf",))
VOICE = Source("voice", "someone/voices", ("en/en_US/x/medium/x.onnx*",), folder="voices", flatten=True)


@pytest.fixture
def hub() -> Iterator[tuple[FakeHub, str]]:
    fake = FakeHub({repo: dict(files) for repo, files in REPOS.items()})
    url = fake.start()
    yield fake, url
    fake.stop()


def test_only_the_wanted_files_land_where_config_expects_them_with_a_manifest(hub, tmp_path: Path) -> None:
    fake, url = hub
    lines: list[str] = []
    models = tmp_path / "models"
    download(models, [CHAT, VOICE, *chosen_sources([], "24gb", ["someone/styles:olymp_V4.safetensors"])],
             lines.append, endpoint=url)  # fmt: skip
    assert (models / "chat.Q4_K_M.gguf").read_bytes() == GGUF
    assert not (models / "chat.Q8_0.gguf").exists() and not (models / "README.md").exists()
    assert (models / "voices" / "x.onnx").is_file() and (models / "voices" / "x.onnx.json").is_file()
    assert (models / "lora" / "olymp_V4.safetensors").is_file()
    assert not [p for p in models.rglob("*") if ".download" in p.parts], "no download leftovers"
    manifest = read_manifest(models)
    entry = manifest["files"]["chat.Q4_K_M.gguf"]
    assert entry["sha256"] == hashlib.sha256(GGUF).hexdigest() and entry["size"] == len(GGUF)
    assert (entry["source"], entry["revision"]) == ("someone/chat-GGUF", COMMIT)
    assert verify(models, manifest, full=True).ok
    assert "  chat.Q4_K_M.gguf -> chat.Q4_K_M.gguf" in lines, "a clear line per file"
    fetched = [path for method, path, _ in fake.requests if method == "GET" and "/resolve/" in path]
    assert not [path for path in fetched if "Q8_0" in path or "README" in path], "nothing else was fetched"


def test_a_cut_connection_is_resumed_not_restarted(hub, tmp_path: Path) -> None:
    fake, url = hub
    fake.cut_once.add("chat.Q4_K_M.gguf")
    models = tmp_path / "models"
    try:
        download(models, [CHAT], lambda line: None, endpoint=url)
    except BadInputError:  # the cut surfaced: a second run picks up where it stopped
        download(models, [CHAT], lambda line: None, endpoint=url)
    assert (models / "chat.Q4_K_M.gguf").read_bytes() == GGUF
    ranges = [r for method, path, r in fake.requests if method == "GET" and path.endswith("chat.Q4_K_M.gguf") and r]
    assert ranges and int(ranges[-1].split("=")[1].rstrip("-")) > 0, f"the rest was asked for: {fake.requests}"


def test_unknown_repository_and_names_are_refused_by_name(hub, tmp_path: Path) -> None:
    _, url = hub
    with pytest.raises(BadInputError, match=r"someone/absent .*was not found"):
        download(tmp_path, [Source("x", "someone/absent", ("*",))], lambda line: None, endpoint=url)
    with pytest.raises(BadInputError, match="no model called 'mistral'"):
        chosen_sources(["mistral"], "24gb", [])
    with pytest.raises(BadInputError, match="unknown profile"):
        chosen_sources(["all"], "4gb", [])
    with pytest.raises(BadInputError, match="REPO:FILE"):
        chosen_sources([], "24gb", ["no-colon.safetensors"])


def test_all_means_the_profiles_models_and_the_layout_matches_the_default_config() -> None:
    from settings import Settings

    assert [s.name for s in chosen_sources(["all"], "8gb", [])] == list(PROFILES["8gb"])
    defaults = Settings()
    assert SOURCES["chat"].patterns == (defaults.chat.model,)
    assert SOURCES["vision"].folder == defaults.vision.model
    assert SOURCES["sd15"].folder == defaults.image.model
    assert SOURCES["sd15-inpainting"].patterns == SOURCES["sd15"].patterns, "the same diffusers layout"
    assert SOURCES["whisper"].folder == defaults.speech.transcription_model
    assert SOURCES["voice"].folder == defaults.speech.voices_dir
    assert SOURCES["voice"].patterns[0].split("/")[-1].startswith(defaults.speech.voice)


def test_without_network_download_says_so_in_one_line_and_exits_non_zero(tmp_path: Path) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # nothing listens here once the socket is closed
    config = write_config(tmp_path)
    result = subprocess.run(
        [sys.executable, str(ROOT / "main.py"), "--config", str(config), "models", "download", "chat"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{port}"},
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: no network: 'models download' runs on a connected machine; carry the models here with "
        "'main.py models pack' and 'main.py models unpack' (see README)"
    ]


def test_the_process_is_offline_again_after_a_download(hub, tmp_path: Path) -> None:
    from huggingface_hub import constants

    _, url = hub
    assert constants.HF_HUB_OFFLINE and os.environ["HF_HUB_OFFLINE"] == "1"
    download(tmp_path, [CHAT], lambda line: None, endpoint=url)
    assert constants.HF_HUB_OFFLINE and os.environ["HF_HUB_OFFLINE"] == "1", "the rest of the app stays offline"
    with pytest.raises(BadInputError):
        download(tmp_path, [Source("x", "someone/absent", ("*",))], lambda line: None, endpoint=url)
    assert constants.HF_HUB_OFFLINE and os.environ["HF_HUB_OFFLINE"] == "1"
