"""The OpenAI-compatible API, driven by the official openai client against the running app."""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest

from tests.conftest import RunningApp, start_app, stop_app, write_config
from tests.openai_schema import validate

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}


def client_for(app: RunningApp, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{app.url}/v1", api_key=key, max_retries=0, timeout=120)


def ask(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_models_lists_every_configured_model(running_app: RunningApp) -> None:
    body = httpx.get(f"{running_app.url}/v1/models").json()
    validate(body, "ListModelsResponse")
    by_id = {m["id"]: m for m in body["data"]}
    assert by_id["SmolLM2-135M-Instruct"]["present"] is True
    assert by_id["SmolLM2-135M-Instruct"]["capability"] == "chat"
    assert by_id["mistral-7b-instruct-v0.2.Q4_K_M"]["present"] is False
    listed = client_for(running_app).models.list()
    assert {m.id for m in listed.data} == set(by_id)


def test_chat_completion_not_streamed(running_app: RunningApp) -> None:
    response = client_for(running_app).chat.completions.create(
        model="auto", messages=ask("What is the capital of France? Answer in one word."), temperature=0, max_tokens=16
    )
    validate(response.model_dump(exclude_unset=True), "CreateChatCompletionResponse")
    assert "paris" in response.choices[0].message.content.lower()
    assert response.usage.prompt_tokens > 0 and response.usage.completion_tokens > 0
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens
    assert response.model == "SmolLM2-135M-Instruct"


def test_chat_completion_raw_body_fits_the_schema(running_app: RunningApp) -> None:
    body = httpx.post(
        f"{running_app.url}/v1/chat/completions",
        json={"model": "SmolLM2-135M-Instruct", "messages": ask("Hi"), "max_tokens": 8, "seed": 3},
        timeout=60,
    ).json()
    validate(body, "CreateChatCompletionResponse")
    assert body["choices"][0]["finish_reason"] in ("stop", "length")


def test_chat_completion_streamed(running_app: RunningApp) -> None:
    chunks = list(
        client_for(running_app).chat.completions.create(
            model="auto",
            messages=ask("Count from one to five."),
            max_tokens=24,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    for chunk in chunks:
        validate(chunk.model_dump(exclude_unset=True), "CreateChatCompletionStreamResponse")
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip()
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 2
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_raw_stream_is_server_sent_events_ending_with_done(running_app: RunningApp) -> None:
    with httpx.stream(
        "POST",
        f"{running_app.url}/v1/chat/completions",
        json={"messages": ask("Hi"), "max_tokens": 8, "stream": True},
        timeout=60,
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        validate(json.loads(line.removeprefix("data: ")), "CreateChatCompletionStreamResponse")


def test_json_schema_response_format_always_parses(running_app: RunningApp) -> None:
    client = client_for(running_app)
    for seed in range(3):
        response = client.chat.completions.create(
            model="auto",
            messages=ask("Describe a person as JSON with a name and an age."),
            max_tokens=60,
            seed=seed,
            temperature=0.8,
            response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}},
        )
        person = json.loads(response.choices[0].message.content)
        jsonschema.validate(person, SCHEMA)


def test_parts_content_and_developer_role_are_accepted(running_app: RunningApp) -> None:
    response = client_for(running_app).chat.completions.create(
        model="auto",
        messages=[
            {"role": "developer", "content": "Answer briefly."},
            {"role": "user", "content": [{"type": "text", "text": "Say hello."}]},
        ],
        max_tokens=8,
    )
    assert response.choices[0].message.content.strip()


def expect_error(status: int, call, *args, **kwargs) -> dict:
    with pytest.raises(openai.APIStatusError) as caught:
        call(*args, **kwargs)
    assert caught.value.status_code == status, caught.value.message
    body = caught.value.response.json()
    validate(body, "ErrorResponse")
    return body["error"]


def test_errors_have_openai_shape_and_status(running_app: RunningApp) -> None:
    create = client_for(running_app).chat.completions.create
    error = expect_error(404, create, model="no-such-model", messages=ask("hi"))
    assert "no-such-model" in error["message"] and error["code"] == "model_not_found"
    error = expect_error(404, create, model="mistral-7b-instruct-v0.2.Q4_K_M", messages=ask("hi"))
    assert "place the GGUF" in error["message"]
    error = expect_error(400, create, model="auto", messages=ask("   "))
    assert "empty" in error["message"]
    expect_error(400, create, model="auto", messages=[{"role": "tool", "content": "x"}])
    expect_error(400, create, model="auto", messages=ask("hi"), temperature=7)
    expect_error(413, create, model="auto", messages=ask("x" * 200_000))
    remote = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}]
    error = expect_error(400, create, model="auto", messages=remote)
    assert "offline" in error["message"]
    response = httpx.post(f"{running_app.url}/v1/chat/completions", json={"messages": "nope"})
    assert response.status_code == 400
    validate(response.json(), "ErrorResponse")


def test_body_over_the_size_limit_is_refused_with_413(running_app: RunningApp) -> None:
    huge = "x" * (33 * 2**20)
    response = httpx.post(
        f"{running_app.url}/v1/chat/completions",
        content=json.dumps({"messages": ask(huge)}),
        headers={"content-type": "application/json"},
        timeout=60,
    )
    assert response.status_code == 413
    assert "max_request_mb" in response.json()["error"]["message"]


def test_eight_concurrent_chats_are_all_answered(running_app: RunningApp) -> None:
    client = client_for(running_app)
    answers: dict[int, str] = {}
    errors: list[BaseException] = []

    def ask_number(number: int) -> None:
        try:
            response = client.chat.completions.create(
                model="auto", messages=ask(f"Repeat the number {number}."), max_tokens=12, stream=number % 2 == 0
            )
            if number % 2 == 0:
                answers[number] = "".join(c.choices[0].delta.content or "" for c in response if c.choices)
            else:
                answers[number] = response.choices[0].message.content
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=ask_number, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=180)
    assert not errors, errors
    assert sorted(answers) == list(range(8)) and all(a.strip() for a in answers.values())
    resident = httpx.get(f"{running_app.url}/api/status").json()["resident"]
    assert len(resident) == 1 and resident[0]["refs"] == 0 and resident[0]["state"] == "ready"


def wait_until_idle(app: RunningApp, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        resident = httpx.get(f"{app.url}/api/status").json()["resident"]
        if all(m["refs"] == 0 for m in resident):
            return True
        time.sleep(0.1)
    return False


def test_a_client_that_disconnects_mid_stream_stops_generation(running_app: RunningApp) -> None:
    with httpx.stream(
        "POST",
        f"{running_app.url}/v1/chat/completions",
        json={"messages": ask("Write a very long story about the sea."), "max_tokens": 1500, "stream": True},
        timeout=60,
    ) as response:
        lines = response.iter_lines()
        for _ in range(5):
            next(lines)
        in_use = httpx.get(f"{running_app.url}/api/status").json()["resident"][0]["refs"]
    assert in_use == 1
    # 1500 tokens take over ten seconds here; released within three means generation stopped.
    assert wait_until_idle(running_app, timeout_s=3.0)


# -- a second app: an API key, two chat models and a short wait for busy models --------------


@pytest.fixture(scope="module")
def guarded_app(tmp_path_factory: pytest.TempPathFactory, embedded_model: Path) -> Iterator[RunningApp]:
    folder = tmp_path_factory.mktemp("guarded")
    config = write_config(
        folder,
        server={"api_key": "s3cret"},
        manager={"wait_timeout_s": 1},
        chat={"model": "other.gguf", "context_size": 2048},
    )
    shutil.copy(embedded_model, folder / "models" / "other.gguf")
    app = start_app(config, folder / "app.log")
    yield app
    stop_app(app)


def test_api_key_is_required_when_configured(guarded_app: RunningApp) -> None:
    error = expect_error(401, client_for(guarded_app, "wrong").models.list)
    assert "API key" in error["message"]
    response = httpx.get(f"{guarded_app.url}/v1/models")
    assert response.status_code == 401
    assert {m.id for m in client_for(guarded_app, "s3cret").models.list().data} >= {"other"}
    assert httpx.get(f"{guarded_app.url}/health").status_code == 200  # health stays open for monitoring


def test_busy_model_gives_503_with_retry_after(guarded_app: RunningApp) -> None:
    client = client_for(guarded_app, "s3cret")
    stream = client.chat.completions.create(
        model="other", messages=ask("Write a very long story."), max_tokens=1500, stream=True
    )
    next(iter(stream))  # "other" is now loaded and in use
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=ask("hi"), max_tokens=4)
    stream.close()
    assert caught.value.status_code == 503
    assert caught.value.response.headers["retry-after"].isdigit()
    validate(caught.value.response.json(), "ErrorResponse")
    assert wait_until_idle(guarded_app, timeout_s=5.0)
    # Once the first request is gone, the other model loads (one at a time) and answers.
    response = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=ask("hi"), max_tokens=4)
    assert response.choices[0].message.content is not None
