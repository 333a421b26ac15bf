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
        ({"prompt": "x", "enable_hr": True, "hr_scale": 9, **SMALL}, 400, "hires fix scale"),
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


def png_b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def test_img2img_and_inpainting_as_automatic1111_clients_send_them(running_app: RunningApp) -> None:
    start = Image.new("RGB", (96, 64), (200, 40, 40))
    mask = Image.new("L", (96, 64), 0)
    mask.paste(255, (0, 0, 48, 64))
    body = {"prompt": "a red barn", "seed": 3, "sampler_name": "Euler", **SMALL, "steps": 4,
            "init_images": [png_b64(start)], "denoising_strength": 0.5, "resize_mode": 1}  # fmt: skip
    redrawn = post(running_app, "img2img", body)
    assert redrawn.status_code == 200, redrawn.text
    picture = Image.open(io.BytesIO(base64.b64decode(redrawn.json()["images"][0])))
    assert picture.size == (64, 64) and "Denoising strength: 0.5" in picture.info["parameters"]
    assert "init_images" not in redrawn.json()["parameters"], "the pictures are not echoed back"
    painted = post(running_app, "img2img", {**body, "mask": f"data:image/png;base64,{png_b64(mask)}", "mask_blur": 2})
    assert painted.status_code == 200, painted.text
    parameters = Image.open(io.BytesIO(base64.b64decode(painted.json()["images"][0]))).info["parameters"]
    assert "Mask blur: 2" in parameters
    assert "Inpaint area: Only masked, Masked area padding: 0" in parameters, "A1111's defaults"
    whole = post(running_app, "img2img", {**body, "mask": png_b64(mask), "inpaint_full_res": False})
    assert "Inpaint area" not in Image.open(io.BytesIO(base64.b64decode(whole.json()["images"][0]))).info["parameters"]
    small_mask = png_b64(Image.new("L", (32, 32), 255))
    cases = [
        ({"init_images": []}, "one picture"),
        ({"init_images": ["%%%"]}, "base64"),
        ({"resize_mode": 3}, "resize mode"),
        ({"mask": small_mask}, "mask is 32x32 but the picture is 96x64"),
        ({"denoising_strength": 1.5}, "Denoising strength must be above 0"),
    ]
    for bad, words in cases:
        refused = post(running_app, "img2img", {**body, **bad})
        assert refused.status_code == 400 and words in refused.json()["detail"], refused.text


def test_openai_image_edits_repaint_the_transparent_area(running_app: RunningApp, tmp_path) -> None:
    from openai import OpenAI

    from tests.openai_schema import validate

    client = OpenAI(base_url=f"{running_app.url}/v1", api_key="unused")
    picture = tmp_path / "picture.png"
    Image.new("RGB", (64, 64), (20, 120, 200)).save(picture)
    hole = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    hole.paste((0, 0, 0, 0), (16, 16, 48, 48))  # transparent: repaint here
    mask = tmp_path / "mask.png"
    hole.save(mask)
    with picture.open("rb") as image_file, mask.open("rb") as mask_file:
        edited = client.images.edit(image=image_file, mask=mask_file, prompt="a red door", n=1, size="64x64",
                                    extra_body={"steps": 3, "seed": 9})  # fmt: skip
    validate(edited.model_dump(exclude_none=True), "ImagesResponse")
    result = Image.open(io.BytesIO(base64.b64decode(edited.data[0].b64_json)))
    assert result.size == (64, 64) and "Mask blur: 4" in result.info["parameters"]
    with picture.open("rb") as image_file:  # no mask and an opaque picture: the whole picture is redrawn
        redrawn = client.images.edit(image=image_file, prompt="a red door", extra_body={"steps": 3, "strength": 0.5})
    info = Image.open(io.BytesIO(base64.b64decode(redrawn.data[0].b64_json))).info["parameters"]
    assert "Denoising strength: 0.5" in info and "Mask blur" not in info


def test_txt2img_with_the_hires_fix(running_app: RunningApp) -> None:
    body = {"prompt": "a lighthouse", "seed": 2, "sampler_name": "Euler", **SMALL, "enable_hr": True,
            "hr_scale": 2, "denoising_strength": 0.5, "hr_upscaler": "Latent", "hr_second_pass_steps": 2}  # fmt: skip
    answer = post(running_app, "txt2img", body)
    assert answer.status_code == 200, answer.text
    picture = Image.open(io.BytesIO(base64.b64decode(answer.json()["images"][0])))
    assert picture.size == (128, 128)
    assert "Hires upscale: 2" in picture.info["parameters"] and "Hires upscaler: Latent" in picture.info["parameters"]
    lanczos = post(running_app, "txt2img", {**body, "hr_upscaler": "Lanczos"}).json()["images"][0]
    assert lanczos != answer.json()["images"][0], "the upscaler asked for is the one used"
    refused = post(running_app, "txt2img", {**body, "hr_upscaler": "R-ESRGAN 4x+"})
    assert refused.status_code == 400 and "Unknown upscaler 'R-ESRGAN 4x+'" in refused.json()["detail"]
    upscalers = {u["name"] for u in httpx.get(f"{running_app.url}/sdapi/v1/upscalers").json()}
    latent = {m["name"] for m in httpx.get(f"{running_app.url}/sdapi/v1/latent-upscale-modes").json()}
    assert "Lanczos" in upscalers and "Latent" in latent and not upscalers & latent
