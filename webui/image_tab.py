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
from webui.common import MODEL_EVENT_CONCURRENCY, sentence, user_message
from webui.fields import Bounds, number_field, problems, problems_text, watch_fields


@dataclass(frozen=True)
class ImageTab:
    notice: gr.Markdown
    prompt: gr.Textbox
    negative: gr.Textbox
    width: gr.Number
    height: gr.Number
    steps: gr.Number
    guidance: gr.Number
    seed: gr.Number
    count: gr.Number
    scheduler: gr.Dropdown
    lora: gr.Dropdown
    generate: gr.Button
    cancel: gr.Button
    gallery: gr.Gallery
    info: gr.Markdown
    restore: gr.File
    restore_note: gr.Markdown
    field_problems: gr.Markdown
    bounds: tuple[Bounds, ...]  # of width, height, steps, guidance, seed, count

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

    @property
    def numbers(self) -> list[tuple[Bounds, gr.Number]]:
        fields = [self.width, self.height, self.steps, self.guidance, self.seed, self.count]
        return list(zip(self.bounds, fields, strict=True))


def image_bounds(settings: ImageSettings) -> tuple[Bounds, ...]:
    size = (settings.min_size, settings.max_size)
    return (
        Bounds("Width", *size, integer=True, multiple_of=8),
        Bounds("Height", *size, integer=True, multiple_of=8),
        Bounds("Steps", 1, settings.max_steps, integer=True),
        Bounds("Guidance (CFG)", 0, 30),
        Bounds("Seed (-1: random)", 0, 2**32 - 1, integer=True, special=-1),
        Bounds("Images", 1, settings.max_images, integer=True),
    )


def generate_button(images: ImageService) -> dict[str, Any]:
    """Generate is only offered with a model behind it; a disabled button says why."""
    missing = images.availability()
    return {
        "value": "Generate" if not missing else "Generate (no image model: see Models)",
        "interactive": not missing,
    }


def lora_choices(images: ImageService) -> dict[str, Any]:
    """The LoRA picker's choices, and where LoRAs go when there are none."""
    names = images.list_loras()
    if names:
        label = "Add a LoRA (inserts <lora:name:1> into the prompt; edit the weight there)"
    else:
        label = f"No LoRAs yet: place kohya or diffusers .safetensors files in {images.lora_dir}"
    return {"choices": names, "label": label, "interactive": bool(names)}


def build_image_tab(images: ImageService, settings: ImageSettings) -> ImageTab:
    defaults = settings.defaults
    missing = images.availability()
    bounds = image_bounds(settings)
    notice = gr.Markdown(f"⚠️ {missing}" if missing else "", visible=bool(missing), elem_id="image-notice")
    # Prompt and Generate beside the gallery (above it on a phone); the settings below both.
    with gr.Row(equal_height=False):
        with gr.Column(scale=3, min_width=300):
            prompt = gr.Textbox(
                label="Prompt",
                lines=3,
                placeholder="a lighthouse at dusk, oil painting  <lora:name:0.8> adds a LoRA",
                elem_id="image-prompt",
            )
            negative = gr.Textbox(label="Negative prompt", value=defaults.negative_prompt, lines=2)
            with gr.Row():
                generate = gr.Button(variant="primary", elem_id="image-generate", **generate_button(images))
                cancel = gr.Button("Cancel", elem_id="image-cancel")
            lora = gr.Dropdown(value=None, elem_id="image-lora", **lora_choices(images))
        with gr.Column(scale=4, min_width=300):
            gallery = gr.Gallery(label="Images", columns=2, height="auto", elem_id="image-gallery")
            info = gr.Markdown(elem_id="image-info")
    with gr.Accordion("Settings", open=True):
        with gr.Row():
            width = number_field(bounds[0], defaults.width, elem_id="image-width")
            height = number_field(bounds[1], defaults.height, elem_id="image-height")
            steps = number_field(bounds[2], defaults.steps, elem_id="image-steps")
            guidance = number_field(bounds[3], defaults.guidance, elem_id="image-guidance")
        with gr.Row():
            seed = number_field(bounds[4], defaults.seed, elem_id="image-seed")
            count = number_field(bounds[5], 1, elem_id="image-count")
            scheduler = gr.Dropdown(
                [(label, name) for name, label in SAMPLER_NAMES.items()],
                value=defaults.scheduler,
                label="Sampler",
            )
        field_problems = gr.Markdown(visible=False, elem_id="image-field-problems", elem_classes=["field-problems"])
    restore = gr.File(
        label="Drop a PNG made here (or by AUTOMATIC1111) to restore its settings",
        file_types=[".png"],
        elem_id="image-restore",
    )
    restore_note = gr.Markdown(elem_id="image-restore-note")
    return ImageTab(
        notice, prompt, negative, width, height, steps, guidance, seed, count, scheduler, lora, generate, cancel,
        gallery, info, restore, restore_note, field_problems, bounds,
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
    ) -> tuple[Any, str]:
        found = problems(list(zip(tab.bounds, (width, height, steps, guidance, seed, count), strict=True)))
        if found:  # refused as typed: nothing is changed behind the user's back
            return gr.skip(), problems_text(found)
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
                    seed=int(seed),
                    num_images=int(count),
                    scheduler=scheduler,
                ),
                progress=lambda step, total: progress((step, total), desc="Denoising", unit="steps"),
                cancel=cancel,
            )
        except Exception as error:  # shown beside the gallery; the settings stay as they are
            return gr.skip(), f"⚠️ {user_message(error)}"
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
        unchanged = [gr.skip()] * len(tab.parameters)
        if not path:
            return [*unchanged, ""]
        try:
            found = read_png_parameters(path)
        except Exception as error:  # a PNG without settings: say so beside the drop zone, change nothing
            return [*unchanged, f"⚠️ {user_message(error)}"]
        names = ["prompt", "negative_prompt", "width", "height", "steps", "guidance", "seed", "num_images", "scheduler"]
        restored = [found[name] if name in found else gr.skip() for name in names]
        return [*restored, sentence(f"restored {sum(name in found for name in names)} settings from the PNG.")]

    clicked = tab.generate.click(
        generate,
        tab.parameters,
        [tab.gallery, tab.info],
        api_name="generate",
        concurrency_limit=MODEL_EVENT_CONCURRENCY,
    )
    after(clicked)
    tab.cancel.click(cancel_generation, None, None, api_visibility="private", queue=False)
    tab.lora.change(add_lora, [tab.lora, tab.prompt], [tab.prompt, tab.lora], api_visibility="private")
    tab.restore.upload(restore, tab.restore, [*tab.parameters, tab.restore_note], api_visibility="private")
    watch_fields(tab.numbers, tab.field_problems)
