"""The audit log: one JSON line per request that uses or reveals something, written by the real
server; prompts only when asked for, never a key; rotated by size."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from api.audit import audit_writer
from settings import AuditSettings
from tests.conftest import RunningApp, start_app, stop_app, write_config

KEY = "audit-test-key-0042"
PROMPT = "Tell me about the quokka 9137."


def audit_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def make_app(folder: Path, log_prompts: bool) -> RunningApp:
    config = write_config(
        folder,
        server={"api_key": KEY},
        chat={"context_size": 1024},
        audit={"path": "audit/audit.jsonl", "log_prompts": log_prompts},
    )
    return start_app(config, folder / "app.log")


@pytest.fixture(scope="module")
def audited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningApp, Path]]:
    folder = tmp_path_factory.mktemp("audited")
    app = make_app(folder, log_prompts=False)
    yield app, folder / "audit" / "audit.jsonl"
    stop_app(app)


def chat(app: RunningApp, key: str) -> httpx.Response:
    body = {"model": "auto", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 4}
    return httpx.post(
        f"{app.url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60
    )


def test_each_call_is_one_line_with_who_what_and_how_it_went(audited: tuple[RunningApp, Path]) -> None:
    app, log = audited
    assert chat(app, KEY).status_code == 200
    assert chat(app, "wrong-key").status_code == 401
    httpx.get(f"{app.url}/health")  # monitoring is not audited
    lines = [line for line in audit_lines(log) if line["endpoint"] == "/v1/chat/completions"]
    answered, refused = lines[-2], lines[-1]
    assert answered["status"] == 200 and answered["authenticated"] is True
    assert (answered["model"], answered["route"]) == ("auto", "chat")
    assert answered["client"] == "127.0.0.1" and answered["method"] == "POST"
    assert answered["bytes_in"] > len(PROMPT) and answered["bytes_out"] > 0 and answered["seconds"] >= 0
    assert refused["status"] == 401 and refused["authenticated"] is False
    assert not any(line["endpoint"] == "/health" for line in audit_lines(log))


def test_no_secret_and_no_prompt_is_written_by_default(audited: tuple[RunningApp, Path]) -> None:
    app, log = audited
    chat(app, KEY)
    httpx.post(f"{app.url}/login", data={"username": "me", "password": KEY}, timeout=60)
    # A call's line is written once its response has gone out: give the server a moment to write it.
    deadline = time.monotonic() + 10
    while not any(line["endpoint"] == "/login" for line in audit_lines(log)):
        assert time.monotonic() < deadline, "the login was not written to the audit log"
        time.sleep(0.1)
    text = log.read_text(encoding="utf-8")
    assert KEY not in text and "quokka" not in text
    assert all("prompt" not in line for line in audit_lines(log))


def test_prompts_are_written_only_when_asked_for(tmp_path: Path) -> None:
    app = make_app(tmp_path, log_prompts=True)
    try:
        assert chat(app, KEY).status_code == 200
    finally:
        stop_app(app)
    line = next(line for line in audit_lines(tmp_path / "audit" / "audit.jsonl") if line.get("prompt"))
    assert line["prompt"] == PROMPT and KEY not in json.dumps(line)


def test_the_log_is_rotated_by_size(tmp_path: Path) -> None:
    settings = AuditSettings(path=tmp_path / "audit.jsonl", max_mb=0.001, backups=3)  # about 1 KB a file
    writer = audit_writer(settings)
    for number in range(200):
        writer.info(json.dumps({"line": number, "padding": "x" * 40}))
    files = sorted(path.name for path in tmp_path.iterdir())
    assert files == ["audit.jsonl", "audit.jsonl.1", "audit.jsonl.2", "audit.jsonl.3"]
    assert all(path.stat().st_size <= 1100 for path in tmp_path.iterdir())
    assert json.loads((tmp_path / "audit.jsonl").read_text().splitlines()[-1])["line"] == 199
