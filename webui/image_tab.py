"""The Text-to-image tab: Stable Diffusion with LoRAs, a progress bar, cancel and a gallery."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gradio as gr

from generator import ImageRequest, ImageService
from settings import ImageSettings
from stable_diffusion.metadata import read_png_parameters
from stable_diffusion.request import SAMPLER_NAMES
from webui.common import as_gradio_error


@dataclass(frozen=True)
class ImageTab:
    notice: gr.Markdown
    prompt: gr.Textbox
    negative: gr.Textbox
    width: gr.Slider
    height: gr.Slider
    steps: gr.Slider
    guidance: gr.Slider
    seed: gr.Number
    count: gr.Slider
    scheduler: gr.Dropdown
    lora: gr.Dropdown
    generate: gr.Button
    cancel: gr.Button
    gallery: gr.Gallery
    info: gr.Markdown
    restore: gr.File

    @property
    def parameters(self) -> list[Any]:
        """The components a generation reads, in ImageRequest's order."""
        return [
            self.prompt,
            self.negative,
            self.width,
            self.height,
            self.steps,
            self.guidance,
            self.seed,
            self.count,
            self.scheduler,
        ]


def build_image_tab(images: ImageService, settings: ImageSettings) -> ImageTab:
    defaults = settings.defaults
    missing = images.availability()
    notice = gr.Markdown(f"⚠️ {missing}" if missing else "", visible=bool(missing), elem_id="image-notice")
    with gr.Row():
        with gr.Column(scale=3):
            prompt = gr.Textbox(
                label="Prompt",
                lines=3,
                placeholder="a lighthouse at dusk, oil painting  <lora:name:0.8> adds a LoRA",
                elem_id="image-prompt",
            )
            negative = gr.Textbox(label="Negative prompt", value=defaults.negative_prompt, lines=2)
            with gr.Row():
                generate = gr.Button("Generate", variant="primary", elem_id="image-generate")
                cancel = gr.Button("Cancel", elem_id="image-cancel")
            with gr.Accordion("Settings", open=True):
                with gr.Row():
                    width = gr.Slider(settings.min_size, settings.max_size, defaults.width, step=8, label="Width")
                    height = gr.Slider(settings.min_size, settings.max_size, defaults.height, step=8, label="Height")
                with gr.Row():
                    steps = gr.Slider(1, settings.max_steps, defaults.steps, step=1, label="Steps")
                    guidance = gr.Slider(0, 30, defaults.guidance, step=0.5, label="Guidance (CFG)")
                with gr.Row():
                    seed = gr.Number(defaults.seed, precision=0, label="Seed (-1: random)")
                    count = gr.Slider(1, settings.max_images, 1, step=1, label="Images")
                    scheduler = gr.Dropdown(
                        [(label, name) for name, label in SAMPLER_NAMES.items()],
                        value=defaults.scheduler,
                        label="Sampler",
                    )
                lora = gr.Dropdown(
                    images.list_loras(),
                    value=None,
                    label="Add a LoRA (inserts <lora:name:1> into the prompt; edit the weight there)",
                    elem_id="image-lora",
                )
            restore = gr.File(
                label="Drop a PNG made here (or by AUTOMATIC1111) to restore its settings",
                file_types=[".png"],
                elem_id="image-restore",
            )
        with gr.Column(scale=4):
            gallery = gr.Gallery(label="Images", columns=2, height=520, elem_id="image-gallery")
            info = gr.Markdown(elem_id="image-info")
    return ImageTab(
        notice, prompt, negative, width, height, steps, guidance, seed, count, scheduler, lora, generate, cancel,
        gallery, info, restore,
    )  # fmt: skip


def describe_result(result: Any) -> str:
    lines = [
        f"**{len(result.images)} image(s)** from {result.model} in {result.seconds:.1f} s"
        + (" — cancelled" if result.cancelled else "")
    ]
    lines += [f"- seed {item.seed}: `{item.path}`" for item in result.images if item.path]
    lines += [f"- ℹ️ {notice}" for notice in result.notices]
    return "\n".join(lines)


def wire_image_tab(tab: ImageTab, images: ImageService, after: Callable[[Any], None]) -> None:
    running: dict[str, threading.Event] = {}  # one cancel switch per browser session

    def generate(
        prompt: str,
        negative: str,
        width: float,
        height: float,
        steps: float,
        guidance: float,
        seed: float,
        count: float,
        scheduler: str,
        request: gr.Request,
        progress: gr.Progress = gr.Progress(),  # noqa: B008 - Gradio's way to ask for a progress bar
    ) -> tuple[list[tuple[Any, str]], str]:
        cancel = threading.Event()
        session = request.session_hash or ""
        running[session] = cancel
        try:
            result = images.generate(
                ImageRequest(
                    prompt=prompt,
                    negative_prompt=negative,
                    width=int(width),
                    height=int(height),
                    steps=int(steps),
                    guidance=float(guidance),
                    seed=int(seed) if seed is not None else -1,
                    num_images=int(count),
                    scheduler=scheduler,
                ),
                progress=lambda step, total: progress((step, total), desc="Denoising", unit="steps"),
                cancel=cancel,
            )
        except Exception as error:
            raise as_gradio_error(error) from None
        finally:
            if running.get(session) is cancel:
                del running[session]
        gallery = [(item.image, f"seed {item.seed}") for item in result.images]
        return gallery, describe_result(result)

    def cancel_generation(request: gr.Request) -> None:
        switch = running.get(request.session_hash or "")
        if switch is not None:
            switch.set()

    def add_lora(name: str | None, prompt: str) -> tuple[Any, Any]:
        if not name:
            return gr.skip(), gr.skip()
        return f"{prompt.rstrip()} <lora:{name}:1>".strip(), gr.update(value=None)

    def restore(path: str | None) -> list[Any]:
        if not path:
            return [gr.skip()] * len(tab.parameters)
        try:
            found = read_png_parameters(path)
        except Exception as error:
            raise as_gradio_error(error) from None
        names = ["prompt", "negative_prompt", "width", "height", "steps", "guidance", "seed", "num_images", "scheduler"]
        return [found[name] if name in found else gr.skip() for name in names]

    clicked = tab.generate.click(
        generate, tab.parameters, [tab.gallery, tab.info], api_name="generate", concurrency_limit=1
    )
    after(clicked)
    tab.cancel.click(cancel_generation, None, None, api_visibility="private", queue=False)
    tab.lora.change(add_lora, [tab.lora, tab.prompt], [tab.prompt, tab.lora], api_visibility="private")
    tab.restore.upload(restore, tab.restore, tab.parameters, api_visibility="private")
