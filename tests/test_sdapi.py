"""AUTOMATIC1111's API subset (/sdapi/v1) driven with plain HTTP, the way its clients call it,
against the running app with a tiny random-weight Stable Diffusion 1.5 and a LoRA."""

from __future__ import annotations

import base64
import io
import json
import threading
import time

import httpx
from PIL import Image

from tests.conftest import RunningApp

SMALL = {"width": 64, "height": 64, "steps": 2, "cfg_scale": 7}


def post(app: RunningApp, path: str, body: dict, timeout: float = 120) -> httpx.Response:
    return httpx.post(f"{app.url}/sdapi/v1/{path}", json=body, timeout=timeout)


def test_the_lists_name_this_servers_models_loras_and_samplers(running_app: RunningApp) -> None:
    models = httpx.get(f"{running_app.url}/sdapi/v1/sd-models").json()
    assert [m["model_name"] for m in models] == ["tiny-sd15"]
    assert set(models[0]) >= {"title", "model_name", "hash", "sha256", "filename", "config"}
    assert "/" not in models[0]["filename"], "no server folder is revealed"
    loras = httpx.get(f"{running_app.url}/sdapi/v1/loras").json()
    assert [(lora["name"], lora["alias"]) for lora in loras] == [("film-grain", "film-grain")]
    samplers = [s["name"] for s in httpx.get(f"{running_app.url}/sdapi/v1/samplers").json()]
    assert {"Euler a", "Euler", "DPM++ 2M Karras", "DDIM"} == set(samplers)
    options = httpx.get(f"{running_app.url}/sdapi/v1/options").json()
    assert options["sd_model_checkpoint"] == "tiny-sd15"


def test_txt2img_answers_as_automatic1111_does(running_app: RunningApp) -> None:
    body = {"prompt": "a red barn <lora:film-grain:0.5>", "negative_prompt": "blurry", "seed": 7,
            "sampler_name": "Euler", "batch_size": 2, **SMALL}  # fmt: skip
    answer = post(running_app, "txt2img", body)
    assert answer.status_code == 200, answer.text
    data = answer.json()
    assert set(data) == {"images", "parameters", "info"} and data["parameters"]["prompt"] == body["prompt"]
    pictures = [Image.open(io.BytesIO(base64.b64decode(b64))) for b64 in data["images"]]
    assert [p.size for p in pictures] == [(64, 64), (64, 64)]
    assert "Steps: 2" in pictures[0].info["parameters"]  # the PNG carries A1111's parameters text
    info = json.loads(data["info"])
    assert info["all_seeds"] == [7, 8] and info["seed"] == 7 and info["sampler_name"] == "Euler"
    assert "Lora hashes" in info["infotexts"][0] or "film-grain" in info["infotexts"][0]
    again = post(running_app, "txt2img", {**body, "batch_size": 1}).json()
    assert again["images"][0] == data["images"][0], "same seed, same picture"
    newer = post(running_app, "txt2img", {**body, "batch_size": 1, "sampler_name": "DPM++ 2M", "scheduler": "Karras"})
    assert json.loads(newer.json()["info"])["sampler_name"] == "DPM++ 2M Karras"


def test_progress_and_interrupt_reach_a_running_job(running_app: RunningApp) -> None:
    answers: list[httpx.Response] = []
    body = {"prompt": "a lighthouse", "seed": 1, "sampler_name": "Euler", **SMALL, "steps": 150, "width": 128,
            "height": 128}  # fmt: skip
    worker = threading.Thread(target=lambda: answers.append(post(running_app, "txt2img", body, timeout=300)))
    worker.start()
    deadline = time.monotonic() + 120
    state = {}
    while time.monotonic() < deadline:
        state = httpx.get(f"{running_app.url}/sdapi/v1/progress").json()
        if state["state"]["sampling_step"] >= 2:
            break
        time.sleep(0.1)
    assert state["state"]["sampling_steps"] == 150 and 0 < state["progress"] < 1, state
    assert httpx.post(f"{running_app.url}/sdapi/v1/interrupt").status_code == 200
    worker.join(timeout=60)
    info = json.loads(answers[0].json()["info"])
    assert info["interrupted"] is True
    assert httpx.get(f"{running_app.url}/sdapi/v1/progress").json()["progress"] == 0.0  # nothing runs now


def test_bad_requests_get_automatic1111_error_bodies(running_app: RunningApp) -> None:
    cases = [
        ({"prompt": "x", "sampler_name": "Heun", **SMALL}, 400, "unknown sampler 'Heun'"),
        ({"prompt": "x", "enable_hr": True, **SMALL}, 400, "hires fix"),
        ({"prompt": "x", **SMALL, "width": 1000}, 400, "width"),
        ({"prompt": "x", **SMALL, "batch_size": 0}, 400, "batch_size"),
        ({"prompt": "x", **SMALL, "override_settings": {"sd_model_checkpoint": "nope"}}, 404, "No image model named"),
    ]
    for body, status, words in cases:
        answer = post(running_app, "txt2img", body)
        assert answer.status_code == status, (body, answer.text)
        error = answer.json()
        assert set(error) >= {"error", "detail"} and words.lower() in error["detail"].lower(), error


def test_options_switch_the_checkpoint_by_its_title(running_app: RunningApp) -> None:
    assert post(running_app, "options", {"sd_model_checkpoint": "tiny-sd15 [0123abcd]"}).status_code == 200
    refused = post(running_app, "options", {"sd_model_checkpoint": "absent.safetensors [99]"})
    assert refused.status_code == 404 and "Installed: tiny-sd15" in refused.json()["detail"]
    assert httpx.get(f"{running_app.url}/sdapi/v1/options").json()["sd_model_checkpoint"] == "tiny-sd15"
