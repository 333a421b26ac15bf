"""The OpenAI-compatible API, driven by the official openai client against the running app."""

from __future__ import annotations

import base64
import http.client
import io
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
from PIL import Image

from tests.conftest import ENDLESS, ROOT, RunningApp, start_app, stop_app, write_config
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


def test_models_lists_the_models_that_can_answer_the_default_first(running_app: RunningApp) -> None:
    body = httpx.get(f"{running_app.url}/v1/models").json()
    validate(body, "ListModelsResponse")
    ids = [m["id"] for m in body["data"]]
    # The configured Mistral file is absent: the embedded model answers, so it comes first.
    assert ids[0] == "SmolLM2-135M-Instruct" and body["data"][0]["capability"] == "chat"
    assert "auto" in ids and "mistral-7b-instruct-v0.2.Q4_K_M" not in ids
    listed = client_for(running_app).models.list()
    assert [m.id for m in listed.data] == ids
    # A generic client that takes the first model gets an answer, not a 404.
    reply = client_for(running_app).chat.completions.create(model=ids[0], messages=ask("hi"), max_tokens=4)
    assert reply.choices[0].message.content is not None


def test_no_response_reveals_where_the_server_keeps_its_files(running_app: RunningApp) -> None:
    models = httpx.get(f"{running_app.url}/v1/models").text
    status = httpx.get(f"{running_app.url}/api/status").text
    missing = httpx.post(
        f"{running_app.url}/v1/chat/completions",
        json={"model": "mistral-7b-instruct-v0.2.Q4_K_M", "messages": ask("hi")},
    )
    assert missing.status_code == 404 and "mistral-7b-instruct-v0.2.Q4_K_M.gguf" in missing.text
    for text in (models, status, missing.text):
        assert str(ROOT) not in text and "/tmp/" not in text and "site-packages" not in text, text


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
    # Streamed: the first piece at once, the rest in batches (not one chunk at the end).
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) >= 2
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
    assert len(resident) == 1 and not resident[0]["in_use"] and resident[0]["state"] == "ready"


def wait_until_idle(app: RunningApp, timeout_s: float, key: str | None = None) -> bool:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        resident = httpx.get(f"{app.url}/api/status", headers=headers).json()["resident"]
        if not any(m["in_use"] for m in resident):
            return True
        time.sleep(0.1)
    return False


def long_reply_body(stream: bool) -> dict:
    return {"messages": ask("Count."), "max_tokens": 4000, "stream": stream, "response_format": ENDLESS}


def chat_in_use(app: RunningApp, key: str | None = None) -> bool:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    resident = httpx.get(f"{app.url}/api/status", headers=headers).json()["resident"]
    return any(m["in_use"] for m in resident if m["kind"] == "chat")


def test_a_client_that_disconnects_mid_stream_stops_generation(running_app: RunningApp) -> None:
    with httpx.stream("POST", f"{running_app.url}/v1/chat/completions", json=long_reply_body(True), timeout=60) as r:
        lines = r.iter_lines()
        for _ in range(5):
            next(lines)
        assert chat_in_use(running_app)
    # The forced reply takes tens of seconds; released within three means generation stopped.
    assert wait_until_idle(running_app, timeout_s=3.0)


def test_a_client_that_disconnects_from_a_non_streamed_request_stops_generation(running_app: RunningApp) -> None:
    client_for(running_app).chat.completions.create(model="auto", messages=ask("hi"), max_tokens=1)  # loaded
    with pytest.raises(httpx.ReadTimeout):  # the client gives up after two seconds and closes the connection
        httpx.post(f"{running_app.url}/v1/chat/completions", json=long_reply_body(False), timeout=2.0)
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
    assert httpx.get(f"{guarded_app.url}/api/status").status_code == 401
    assert httpx.get(f"{guarded_app.url}/config").status_code == 401  # the browser UI asks for the key too
    login = httpx.post(f"{guarded_app.url}/login", data={"username": "me", "password": "s3cret"})
    assert login.status_code == 200 and login.json() == {"success": True}


def test_the_audio_routes_and_the_realtime_socket_need_the_key(guarded_app: RunningApp) -> None:
    import asyncio

    import websockets

    speech = httpx.post(f"{guarded_app.url}/v1/audio/speech", json={"input": "hi", "voice": "alloy"})
    assert speech.status_code == 401
    heard = httpx.post(f"{guarded_app.url}/v1/audio/transcriptions", files={"file": ("a.wav", b"RIFF")})
    assert heard.status_code == 401
    url = guarded_app.url.replace("http://", "ws://") + "/v1/realtime"

    async def connect(headers: dict[str, str]) -> str:
        try:
            async with websockets.connect(url, additional_headers=headers) as socket:
                return json.loads(await socket.recv())["type"]
        except websockets.exceptions.InvalidStatus as refused:  # the handshake itself is refused
            return f"refused {refused.response.status_code}"

    assert asyncio.run(connect({})) == "refused 403"
    assert asyncio.run(connect({"Authorization": "Bearer wrong"})) == "refused 403"
    assert asyncio.run(connect({"Authorization": "Bearer s3cret"})) == "session.created"


def test_automatic1111_clients_sign_in_with_basic_auth(guarded_app: RunningApp) -> None:
    models = f"{guarded_app.url}/sdapi/v1/sd-models"
    assert httpx.get(models).status_code == 401
    assert httpx.get(models, auth=("anyone", "wrong")).status_code == 401
    assert httpx.get(models, auth=("anyone", "s3cret")).status_code == 200  # --api-auth user:key
    assert httpx.get(f"{guarded_app.url}/v1/models", auth=("me", "s3cret")).status_code == 200


def test_busy_model_gives_503_with_retry_after(guarded_app: RunningApp) -> None:
    client = client_for(guarded_app, "s3cret")
    stream = client.chat.completions.create(
        model="other", messages=ask("Count."), max_tokens=4000, stream=True, response_format=ENDLESS
    )
    next(iter(stream))  # "other" is now loaded and in use for tens of seconds
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=ask("hi"), max_tokens=4)
    stream.close()
    assert caught.value.status_code == 503
    assert caught.value.response.headers["retry-after"].isdigit()
    validate(caught.value.response.json(), "ErrorResponse")
    assert wait_until_idle(guarded_app, timeout_s=5.0, key="s3cret")
    # Once the first request is gone, the other model loads (one at a time) and answers.
    response = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=ask("hi"), max_tokens=4)
    assert response.choices[0].message.content is not None


# -- vision and image generation, on tiny random-weight models ---------------------------


def data_uri(image: Image.Image, kind: str = "PNG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=kind)
    return f"data:image/{kind.lower()};base64,{base64.b64encode(buffer.getvalue()).decode()}"


def picture_message(url: str, question: str = "What is in this image?") -> list[dict]:
    return [
        {
            "role": "user",
            "content": [{"type": "text", "text": question}, {"type": "image_url", "image_url": {"url": url}}],
        }
    ]


def test_models_lists_vision_and_image_models(running_app: RunningApp) -> None:
    by_id = {m["id"]: m for m in httpx.get(f"{running_app.url}/v1/models").json()["data"]}
    assert by_id["tiny-llava"]["capability"] == "vision"
    assert by_id["tiny-sd15"]["capability"] == "image"


def test_a_chat_request_with_an_image_goes_to_the_vision_model(running_app: RunningApp) -> None:
    client = client_for(running_app)
    url = data_uri(Image.new("RGB", (40, 30), (200, 40, 40)))
    response = client.chat.completions.create(model="auto", messages=picture_message(url), max_tokens=8, seed=1)
    validate(response.model_dump(exclude_unset=True), "CreateChatCompletionResponse")
    assert response.model == "tiny-llava"
    assert response.usage.completion_tokens > 0
    chunks = list(
        client.chat.completions.create(model="auto", messages=picture_message(url), max_tokens=8, stream=True)
    )
    assert chunks and all(c.model == "tiny-llava" for c in chunks)


def test_bad_images_in_chat_requests_get_clear_errors(running_app: RunningApp) -> None:
    create = client_for(running_app).chat.completions.create
    error = expect_error(400, create, model="auto", messages=picture_message("data:image/png;base64,bm90IGFuIGltYWdl"))
    assert "image" in error["message"].lower()
    error = expect_error(400, create, model="tiny-llava", messages=ask("no picture here"))
    assert "image_url" in error["message"]


def test_images_generate_returns_pngs_that_decode(running_app: RunningApp) -> None:
    client = client_for(running_app)
    response = client.images.generate(prompt="a red square", n=2, size="64x64", extra_body={"seed": 7, "steps": 2})
    validate(response.model_dump(exclude_unset=True), "ImagesResponse")
    assert len(response.data) == 2
    seeds = [item.model_extra["seed"] for item in response.data]
    assert seeds == [7, 8]
    for item in response.data:
        image = Image.open(io.BytesIO(base64.b64decode(item.b64_json)))
        assert image.format == "PNG" and image.size == (64, 64)


def test_images_generate_with_a_url_serves_the_saved_png(running_app: RunningApp) -> None:
    response = client_for(running_app).images.generate(
        prompt="a lighthouse <lora:film-grain:0.8>", size="64x64", response_format="url", extra_body={"steps": 2}
    )
    fetched = httpx.get(response.data[0].url)
    assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/png"
    parameters = Image.open(io.BytesIO(fetched.content)).text["parameters"]
    assert "a lighthouse" in parameters and "film-grain" in parameters


@pytest.mark.parametrize(
    "raw_path",
    [
        "/outputs/../config.yaml",
        "/outputs/..%2fconfig.yaml",
        "/outputs/%2e%2e/config.yaml",
        "/outputs/%2e%2e/%2e%2e/main.py",
        "/outputs/..%2f..%2fetc/passwd",
        "/outputs/x/..%2f..%2f..%2fconfig.yaml",
    ],
)
def test_outputs_never_serve_a_file_outside_the_outputs_folder(running_app: RunningApp, raw_path: str) -> None:
    # http.client sends the path as written: httpx and browsers would remove the ".." first.
    host, port = running_app.url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    connection.request("GET", raw_path)
    response = connection.getresponse()
    body = response.read()
    connection.close()
    assert response.status in (400, 404), (raw_path, response.status)
    assert b"models_dir" not in body and b"import" not in body and b"root:" not in body


def test_bad_image_requests_get_clear_errors(running_app: RunningApp) -> None:
    generate = client_for(running_app).images.generate
    error = expect_error(400, generate, prompt="x", size="65x64")
    assert "multiple of 8" in error["message"]
    error = expect_error(400, generate, prompt="x", size="64x64", extra_body={"steps": 500})
    assert "steps" in error["message"]
    error = expect_error(400, generate, prompt="x <lora:nope:1>", size="64x64")
    assert "film-grain" in error["message"]  # the unknown name is answered with the available ones
    expect_error(404, generate, prompt="x", model="dall-e-3")


def test_the_manager_swaps_models_one_at_a_time(running_app: RunningApp) -> None:
    client = client_for(running_app)
    client.chat.completions.create(model="auto", messages=ask("hi"), max_tokens=4)
    url = data_uri(Image.new("RGB", (32, 32), (0, 90, 200)))
    client.chat.completions.create(model="auto", messages=picture_message(url), max_tokens=4)
    client.images.generate(prompt="a tree", size="64x64", extra_body={"steps": 1})
    client.chat.completions.create(model="auto", messages=ask("hi again"), max_tokens=4)
    status = httpx.get(f"{running_app.url}/api/status").json()
    assert len(status["resident"]) == 1 and status["resident"][0]["kind"] == "chat"
    recent = [(r["action"], r["label"].split(":")[0]) for r in status["history"][-7:]]
    assert (
        recent
        == [
            ("load", "chat"),
            ("unload", "chat"),
            ("load", "vision"),
            ("unload", "vision"),
            ("load", "image"),
            ("unload", "image"),
            ("load", "chat"),
        ][-len(recent) :]
    )
    assert all(r["seconds"] >= 0 for r in status["history"])


def test_model_auto_draws_when_asked_and_links_the_picture(running_app: RunningApp) -> None:
    response = client_for(running_app).chat.completions.create(
        model="auto", messages=ask("/draw a small red boat"), max_tokens=32
    )
    validate(response.model_dump(exclude_unset=True), "CreateChatCompletionResponse")
    content = response.choices[0].message.content
    assert response.model == "tiny-sd15"
    url = content[content.index("](") + 2 : content.index(")", content.index("]("))]
    fetched = httpx.get(url)
    assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/png"
    assert "Prompt used:" in content


def test_model_auto_answers_a_bare_command_with_a_hint(running_app: RunningApp) -> None:
    response = client_for(running_app).chat.completions.create(model="auto", messages=ask("/draw"), max_tokens=8)
    assert "/draw" in response.choices[0].message.content


def test_a_request_waiting_too_long_for_the_same_busy_model_gets_503(guarded_app: RunningApp) -> None:
    client = client_for(guarded_app, "s3cret")
    stream = client.chat.completions.create(
        model="other", messages=ask("Count."), max_tokens=4000, stream=True, response_format=ENDLESS
    )
    next(iter(stream))  # "other" is generating; the server waits wait_timeout_s (1 s) for it
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model="other", messages=ask("hi"), max_tokens=4)
    stream.close()
    assert caught.value.status_code == 503 and "not free within 1 s" in caught.value.message
    assert wait_until_idle(guarded_app, timeout_s=5.0, key="s3cret")


def load_counts(app: RunningApp) -> dict[str, int]:
    return httpx.get(f"{app.url}/api/status").json()["load_counts"]


def test_a_request_whose_client_leaves_while_it_waits_never_loads_its_model(running_app: RunningApp) -> None:
    with httpx.stream("POST", f"{running_app.url}/v1/chat/completions", json=long_reply_body(True), timeout=60) as r:
        lines = r.iter_lines()  # kept: dropping the iterator would close the connection
        next(lines)  # the chat model is loaded and busy for tens of seconds
        assert chat_in_use(running_app)
        before = load_counts(running_app)
        # A drawing needs the chat model unloaded first (one at a time): it waits, then its client leaves.
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(
                f"{running_app.url}/v1/images/generations",
                json={"prompt": "a tree", "size": "64x64", "steps": 1},
                timeout=1.5,
            )
        time.sleep(1.0)  # time for the server to notice
        status = httpx.get(f"{running_app.url}/api/status").json()
        assert status["waiting"] == 0  # it left the queue
        assert chat_in_use(running_app), "the chat reply should still be running"
    assert wait_until_idle(running_app, timeout_s=3.0)
    time.sleep(0.5)
    status = httpx.get(f"{running_app.url}/api/status").json()
    assert load_counts(running_app) == before  # nothing loaded for the request that left
    assert [m["kind"] for m in status["resident"]] == ["chat"]  # and the chat model was not evicted for it


@pytest.fixture(scope="module")
def small_budget_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningApp]:
    folder = tmp_path_factory.mktemp("small-budget")
    config = write_config(folder, manager={"cpu_memory_budget_gb": 0.01})
    app = start_app(config, folder / "app.log")
    yield app
    stop_app(app)


def test_a_model_that_can_never_fit_is_a_400_with_the_numbers(small_budget_app: RunningApp) -> None:
    error = expect_error(
        400, client_for(small_budget_app).chat.completions.create, model="auto", messages=ask("hi"), max_tokens=4
    )
    assert error["code"] == "model_too_large"
    assert "GiB" in error["message"] and "cpu_memory_budget_gb" in error["message"]
