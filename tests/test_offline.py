"""Offline, proven: the real app, exercised through every module and every kind of UI input,
attempts no connection beyond loopback and looks up no host name.

The server process loads tests/netwatch/sitecustomize.py, which records every connect and every
name lookup Python makes (the CI run adds a network namespace with only loopback, which also
catches what native code would try)."""

from __future__ import annotations

import base64
import ipaddress
import json
import shutil
from pathlib import Path

import httpx
import openai
from gradio_client import Client, handle_file
from PIL import Image

from tests.conftest import ROOT, TINY_SECTIONS, start_app, stop_app, write_config


def is_loopback(host: object) -> bool:
    text = str(host).strip("[]")
    if text == "localhost":
        return True
    try:
        return ipaddress.ip_address(text).is_loopback
    except ValueError:
        return False


def exercise(url: str, picture: Path) -> None:
    """Every module through the API, and every input type of the UI through Gradio's own client."""
    api = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
    api.models.list()
    ask = [{"role": "user", "content": "Say hi."}]
    api.chat.completions.create(model="auto", messages=ask, max_tokens=4)
    for _ in api.chat.completions.create(model="auto", messages=ask, max_tokens=4, stream=True):
        pass
    uri = "data:image/png;base64," + base64.b64encode(picture.read_bytes()).decode()
    looking = [{"role": "user", "content": [{"type": "text", "text": "What is it?"}, {"type": "image_url",
                "image_url": {"url": uri}}]}]  # fmt: skip
    api.chat.completions.create(model="auto", messages=looking, max_tokens=4)
    api.images.generate(prompt="a tree", size="64x64", extra_body={"steps": 1})
    api.chat.completions.create(model="auto", messages=[{"role": "user", "content": "/draw a boat"}], max_tokens=4)
    for path in ("/", "/config", "/health", "/api/status", "/gradio_api/info"):
        httpx.get(f"{url}{path}", timeout=30)

    ui = Client(url, verbose=False)
    ui.predict({"text": "Hello", "files": []}, [], "", 0.0, 1.0, 4, 1.0, 1, api_name="/chat")
    attached = {"text": "What is in this picture?", "files": [handle_file(str(picture))]}
    ui.predict(attached, [], "", 0.0, 1.0, 4, 1.0, 1, api_name="/chat")
    ui.predict(handle_file(str(picture)), "What is it?", [], api_name="/describe")
    text_to_image = ("a tree", "", 64, 64, 1, 7.0, 1, 1, "euler")
    no_start_picture_no_hires = (None, 0.75, 4, "resize", False, 2, 0.5, 2, "Lanczos", "whole", 32)
    ui.predict(*text_to_image, *no_start_picture_no_hires, api_name="/generate")
    start = {"background": handle_file(str(picture)), "layers": [], "composite": None}
    img2img_hires = (start, 0.75, 4, "resize", True, 2, 0.5, 1, "Latent", "whole", 32)
    ui.predict(*text_to_image, *img2img_hires, api_name="/generate")


def test_the_app_connects_to_nothing_beyond_loopback_and_looks_up_no_name(tmp_path: Path, tiny_models: Path) -> None:
    record = tmp_path / "network.jsonl"
    models = tmp_path / "models-copy"
    shutil.copytree(tiny_models, models)
    config = write_config(tmp_path, models, chat={"context_size": 1024, "defaults": {"max_tokens": 8}}, **TINY_SECTIONS)
    picture = tmp_path / "green.png"
    Image.new("RGB", (40, 40), (20, 160, 40)).save(picture)
    watch = {"PYTHONPATH": str(ROOT / "tests" / "netwatch"), "NETWATCH_LOG": str(record)}
    app = start_app(config, tmp_path / "app.log", extra_env=watch)
    try:
        exercise(app.url, picture)
    finally:
        stop_app(app)
    attempts = [json.loads(line) for line in record.read_text().splitlines()]
    assert attempts and attempts[0]["kind"] == "loaded", "the recorder was not loaded in the server"
    outward = [a for a in attempts if a["kind"] == "connect" and not is_loopback(eval(a["target"])[0])]
    lookups = [a for a in attempts if a["kind"] == "lookup" and eval(a["target"]) is not None]
    named = [a for a in lookups if not is_loopback(eval(a["target"]))]
    assert outward == [], f"connections beyond loopback: {outward}"
    assert named == [], f"host names looked up: {named}"
    calls = len(attempts) - 1
    print(f"\n{calls} network calls recorded in the server, none beyond loopback; no host name looked up")


def test_the_recorder_sees_an_outward_attempt(tmp_path: Path) -> None:
    """The check above can fail: the same recorder, in a process that does try to go out."""
    import subprocess
    import sys

    record = tmp_path / "network.jsonl"
    code = (
        "import socket\ntry:\n    socket.create_connection(('example.invalid', 80), timeout=0.5)\n"
        "except OSError:\n    pass\n"
    )
    env = {"PYTHONPATH": str(ROOT / "tests" / "netwatch"), "NETWATCH_LOG": str(record), "PATH": "/usr/bin:/bin"}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=30)
    assert "example.invalid" in record.read_text()
