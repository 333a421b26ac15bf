"""The headless CLI, run as a subprocess the way a user runs it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT, write_config


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
