"""The headless CLI, run as a subprocess the way a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import ROOT, TINY_SECTIONS, write_config


def run_cli(*args: str, stdin: str | None = None, config: Path | None = None) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, str(ROOT / "main.py")]
    if config is not None:
        command += ["--config", str(config)]
    return subprocess.run(command + list(args), input=stdin, capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_help_lists_the_commands() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    assert "serve" in result.stdout and "chat" in result.stdout


def test_chat_streams_the_answer_to_stdout(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    result = run_cli(
        "chat",
        "What is the capital of France? Answer in one word.",
        "--temperature",
        "0",
        "--max-tokens",
        "24",
        config=config,
    )
    assert result.returncode == 0, result.stderr
    assert "paris" in result.stdout.lower()
    assert "embedded SmolLM2" in result.stderr  # the fallback is said, on stderr, not mixed into the answer


def test_chat_reads_the_prompt_from_stdin(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    result = run_cli("chat", "-", "--max-tokens", "8", "--seed", "3", stdin="Say hello.", config=config)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


def test_errors_are_one_line_and_a_non_zero_exit(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    result = run_cli("chat", "", config=config)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: the message is empty")
    assert "Traceback" not in result.stderr


def test_bad_config_value_stops_with_the_key_named(tmp_path: Path) -> None:
    config = write_config(tmp_path, server={"port": "eighty"})
    result = run_cli("chat", "hi", config=config)
    assert result.returncode == 1
    assert "server.port" in result.stderr and "Traceback" not in result.stderr


def test_broken_model_file_is_named(tmp_path: Path) -> None:
    config = write_config(tmp_path, chat={"model": "broken.gguf"})
    (tmp_path / "models" / "broken.gguf").write_text("not a model")
    result = run_cli("chat", "hi", config=config)
    assert result.returncode == 1
    assert "broken.gguf is not a GGUF model file" in result.stderr


def test_models_lists_present_and_missing_models(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    result = run_cli("models", config=config)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any("MISSING" in line and "mistral-7b-instruct" in line for line in lines)
    assert any("present" in line and "SmolLM2-135M-Instruct" in line for line in lines)


def test_models_as_json(tmp_path: Path) -> None:
    result = run_cli("models", "--json", config=write_config(tmp_path))
    rows = json.loads(result.stdout)
    smol = next(row for row in rows if row["name"] == "SmolLM2-135M-Instruct")
    assert smol["present"] is True and smol["capability"] == "chat" and smol["size_bytes"] > 50_000_000


def test_chat_as_json(tmp_path: Path) -> None:
    result = run_cli("chat", "Say hi", "--json", "--max-tokens", "8", "--seed", "5", config=write_config(tmp_path))
    assert result.returncode == 0, result.stderr
    reply = json.loads(result.stdout)
    assert reply["text"].strip() and reply["seed"] == 5 and reply["usage"]["completion_tokens"] > 0


def test_unknown_chat_model_is_one_line_error(tmp_path: Path) -> None:
    result = run_cli("chat", "hi", "--model", "nope", config=write_config(tmp_path))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "error: no chat model named 'nope'; available: mistral-7b-instruct-v0.2.Q4_K_M, SmolLM2-135M-Instruct"
    )


# -- describe and generate, on tiny random-weight models ---------------------------------


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory: pytest.TempPathFactory, tiny_models: Path) -> Path:
    return write_config(tmp_path_factory.mktemp("cli"), tiny_models, **TINY_SECTIONS)


def test_describe_answers_about_an_image(tiny_config: Path, tmp_path: Path) -> None:
    picture = tmp_path / "red.png"
    Image.new("RGB", (40, 30), (200, 30, 30)).save(picture)
    result = run_cli("describe", str(picture), "What colour is it?", "--json", "--seed", "2", config=tiny_config)
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["model"] == "tiny-llava" and answer["usage"]["completion_tokens"] > 0


def test_describe_refuses_a_file_that_is_not_an_image(tiny_config: Path, tmp_path: Path) -> None:
    fake = tmp_path / "notes.png"
    fake.write_text("not a picture")
    result = run_cli("describe", str(fake), config=tiny_config)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "image" in last and "Traceback" not in result.stderr


def test_describe_without_the_vision_model_says_what_to_install(tmp_path: Path) -> None:
    result = run_cli("describe", "any.png", config=write_config(tmp_path))
    assert result.returncode == 1
    assert "llava-1.5-7b-hf" in result.stderr and "config.json" in result.stderr


def test_generate_writes_a_png_with_its_parameters(tiny_config: Path, tmp_path: Path) -> None:
    out = tmp_path / "lighthouse.png"
    result = run_cli(
        "generate", "a lighthouse", "--out", str(out), "--steps", "2", "--seed", "11", "--lora", "film-grain:0.5",
        config=tiny_config,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "2/2 steps" in result.stderr  # the progress bar
    image = Image.open(out)
    assert image.size == (64, 64)
    assert "Seed: 11" in image.text["parameters"] and "film-grain" in image.text["parameters"]


def test_generate_from_a_picture_and_a_mask(tiny_config: Path, tmp_path: Path) -> None:
    start, mask, out = tmp_path / "start.png", tmp_path / "mask.png", tmp_path / "painted.png"
    Image.new("RGB", (64, 64), (10, 200, 10)).save(start)
    painted_area = Image.new("L", (64, 64), 0)
    painted_area.paste(255, (0, 0, 32, 32))
    painted_area.save(mask)
    result = run_cli(
        "generate", "a pond", "--init-image", str(start), "--strength", "0.5", "--mask", str(mask), "--steps", "4",
        "--only-masked", "16", "--out", str(out), config=tiny_config,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "2/2 steps" in result.stderr, "half of the 4 steps at strength 0.5"
    parameters = Image.open(out).text["parameters"]
    assert "Denoising strength: 0.5" in parameters and "Mask blur: 4" in parameters
    assert "Inpaint area: Only masked, Masked area padding: 16" in parameters
    broken = run_cli("generate", "a pond", "--init-image", str(tmp_path / "absent.png"), config=tiny_config)
    assert broken.returncode == 1 and "there is no image file at" in broken.stderr.strip().splitlines()[-1]


def test_generate_with_the_hires_fix(tiny_config: Path, tmp_path: Path) -> None:
    out = tmp_path / "big.png"
    result = run_cli(
        "generate", "a pond", "--steps", "2", "--hires", "2x", "--upscaler", "Latent", "--out", str(out),
        config=tiny_config,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert Image.open(out).size == (128, 128) and "Hires upscale: 2" in Image.open(out).text["parameters"]
    assert "Hires upscaler: Latent" in Image.open(out).text["parameters"]
    wrong = run_cli("generate", "a pond", "--hires", "double", config=tiny_config)
    assert wrong.returncode == 1 and "--hires takes a scale such as 2x" in wrong.stderr


def test_generate_bad_size_is_one_line_error(tiny_config: Path, tmp_path: Path) -> None:
    result = run_cli("generate", "x", "--width", "70", config=tiny_config)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "multiple of 8" in last
