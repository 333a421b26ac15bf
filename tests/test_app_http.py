"""The running app over HTTP on loopback: real server, real Gradio queue, real SmolLM2."""

from __future__ import annotations

import threading

import httpx
from gradio_client import Client

from tests.conftest import RunningApp, start_app, stop_app, write_config


def said(text: str) -> dict:
    """The chat input's value: text and attached files."""
    return {"text": text, "files": []}


def roles(history: list[dict]) -> list[str]:
    """Who spoke, with route notes (assistant messages with a title) marked as "note"."""
    return ["note" if (m.get("metadata") or {}).get("title") else m["role"] for m in history]


def reply_text(history: list[dict]) -> str:
    content = history[-1]["content"]
    return content if isinstance(content, str) else "".join(part.get("text", "") for part in content)


def test_health_and_status_endpoints(running_app: RunningApp) -> None:
    assert httpx.get(f"{running_app.url}/health").json() == {"status": "ok"}
    status = httpx.get(f"{running_app.url}/api/status").json()
    import torch

    assert status["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert "cpu" in [device["name"] for device in status["devices"]]
    assert status["policy"] == "one_at_a_time"


def test_chat_streams_through_the_running_app(running_app: RunningApp) -> None:
    client = Client(running_app.url, verbose=False)
    job = client.submit(
        said("Hello! Who are you?"), [], "You are a helpful assistant.", 0.0, 1.0, 32, 1.0, 1, api_name="/chat"
    )
    updates = list(job)
    assert len(updates) > 2, "the reply should stream in several updates"
    _, history = job.outputs()[-1]
    assert roles(history) == ["user", "note", "assistant"]
    assert history[1]["metadata"]["title"].startswith("→ chat model")
    assert reply_text(history).strip()
    # The resident model and its load time now show in the status endpoint.
    resident = httpx.get(f"{running_app.url}/api/status").json()["resident"]
    assert len(resident) == 1 and resident[0]["kind"] == "chat" and resident[0]["load_seconds"] > 0


def test_follow_up_keeps_the_conversation(running_app: RunningApp) -> None:
    client = Client(running_app.url, verbose=False)
    _, first = client.predict(said("My name is Ada."), [], "", 0.0, 1.0, 16, 1.0, 1, api_name="/chat")
    _, second = client.predict(said("What did I just tell you?"), first, "", 0.0, 1.0, 16, 1.0, 1, api_name="/chat")
    assert roles(second) == ["user", "note", "assistant", "user", "note", "assistant"]
    assert reply_text(second).strip()


def test_empty_message_is_not_sent(running_app: RunningApp) -> None:
    client = Client(running_app.url, verbose=False)
    _, history = client.predict(said("   "), [], "", 0.0, 1.0, 16, 1.0, 1, api_name="/chat")
    assert history == []


def test_huge_message_gets_a_clear_error_in_the_conversation_and_the_app_keeps_running(
    running_app: RunningApp,
) -> None:
    client = Client(running_app.url, verbose=False)
    _, history = client.predict(said("x" * 200_000), [], "", 0.0, 1.0, 16, 1.0, 1, api_name="/chat")
    # The conversation shows why, marked so it is never sent to a model.
    assert len(history) == 1 and history[0]["metadata"]["log"] == "error"
    assert "200,000 characters; the limit is" in reply_text(history)
    assert reply_text(history).startswith("⚠️ The message")
    _, history = client.predict(said("Say hi."), history, "", 0.0, 1.0, 8, 1.0, 1, api_name="/chat")
    assert roles(history) == ["user", "note", "assistant"], "the earlier error is gone once the user tries again"
    assert reply_text(history).strip()


def test_concurrent_chats_are_all_answered(running_app: RunningApp) -> None:
    answers: list[str] = []
    errors: list[BaseException] = []

    def ask(number: int) -> None:
        try:
            client = Client(running_app.url, verbose=False)
            _, history = client.predict(
                said(f"Say the number {number}."), [], "", 0.0, 1.0, 8, 1.0, 1, api_name="/chat"
            )
            answers.append(reply_text(history))
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=ask, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors
    assert len(answers) == 4 and all(a.strip() for a in answers)


def test_a_typo_in_config_stops_start_up_naming_the_key(tmp_path) -> None:
    config = write_config(tmp_path, chat={"contxt_size": 2048})
    try:
        app = start_app(config, tmp_path / "app.log", timeout_s=30)
    except RuntimeError as error:
        message = str(error)
    else:
        stop_app(app)
        message = ""
    assert "chat.contxt_size" in message and "context_size" in message
    assert "Traceback" not in message
