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
from stable_diffusion.request import (
    DEFAULT_HIRES_UPSCALER,
    DEFAULT_INPAINT_PADDING,
    HIRES_UPSCALERS,
    MAX_INPAINT_PADDING,
    SAMPLER_NAMES,
)
from webui.common import MODEL_EVENT_CONCURRENCY, sentence, session_switch, user_message
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
    bounds: tuple[Bounds, ...]  # of width, height, steps, guidance, seed, count, and the five below
    start: gr.ImageEditor  # img2img: the picture; inpainting: what is painted on it
    strength: gr.Number
    mask_blur: gr.Number
    resize_mode: gr.Radio
    hires: gr.Checkbox
    hires_scale: gr.Number
    hires_strength: gr.Number
    hires_steps: gr.Number
    hires_upscaler: gr.Dropdown
    inpaint_area: gr.Radio
    inpaint_padding: gr.Number
    send_to_start: gr.Button
    selected: gr.State  # the gallery picture last clicked

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
        extra = [
            self.strength,
            self.mask_blur,
            self.hires_scale,
            self.hires_strength,
            self.hires_steps,
            self.inpaint_padding,
        ]
        return list(zip(self.bounds, [*fields, *extra], strict=True))

    @property
    def picture_settings(self) -> list[Any]:
        """What a generation reads besides ImageRequest's basics: the start picture and the hires fix."""
        return [
            self.start,
            self.strength,
            self.mask_blur,
            self.resize_mode,
            self.hires,
            self.hires_scale,
            self.hires_strength,
            self.hires_steps,
            self.hires_upscaler,
            self.inpaint_area,
            self.inpaint_padding,
        ]


def image_bounds(settings: ImageSettings) -> tuple[Bounds, ...]:
    size = (settings.min_size, settings.max_size)
    return (
        Bounds("Width", *size, integer=True, multiple_of=8),
        Bounds("Height", *size, integer=True, multiple_of=8),
        Bounds("Steps", 1, settings.max_steps, integer=True),
        Bounds("Guidance (CFG)", 0, 30),
        Bounds("Seed (-1: random)", 0, 2**32 - 1, integer=True, special=-1),
        Bounds("Images", 1, settings.max_images, integer=True),
        Bounds("Denoising strength", 0.01, 1),
        Bounds("Mask blur", 0, 64, integer=True),
        Bounds("Hires scale", 1, 4),
        Bounds("Hires denoising strength", 0.01, 1),
        Bounds("Hires steps", 1, settings.max_steps, integer=True),
        Bounds("Masked area padding", 0, MAX_INPAINT_PADDING, integer=True),
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
            # PNG, not the default WebP: a picture sent on to img2img keeps its exact pixels
            gallery = gr.Gallery(label="Images", columns=2, height="auto", format="png", elem_id="image-gallery")
            send_to_start = gr.Button(
                "Send the picture clicked to img2img / inpaint", size="sm", elem_id="image-send-to-start"
            )
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
        with gr.Row():
            hires = gr.Checkbox(label="Hires fix (upscale, then redraw)", value=False, elem_id="image-hires")
            hires_scale = number_field(bounds[8], 2, elem_id="image-hires-scale")
            hires_strength = number_field(bounds[9], 0.5, elem_id="image-hires-strength")
            hires_steps = number_field(bounds[10], defaults.steps, elem_id="image-hires-steps")
            hires_upscaler = gr.Dropdown(
                list(HIRES_UPSCALERS), value=DEFAULT_HIRES_UPSCALER, label="Upscaler", elem_id="image-hires-upscaler"
            )
        field_problems = gr.Markdown(visible=False, elem_id="image-field-problems", elem_classes=["field-problems"])
    with gr.Accordion("Start from a picture: img2img, or paint over it to inpaint", open=False, elem_id="image-start"):
        start = gr.ImageEditor(
            type="pil",
            sources=["upload", "clipboard"],
            brush=gr.Brush(colors=["#ffffff"], default_size=32, color_mode="fixed"),
            label="Picture (paint the area to repaint; leave it unpainted to redraw the whole picture)",
            elem_id="image-start-editor",
        )
        with gr.Row():
            strength = number_field(bounds[6], 0.75, elem_id="image-strength")
            mask_blur = number_field(bounds[7], 4, elem_id="image-mask-blur")
            resize_mode = gr.Radio(
                [("Stretch to the size", "resize"), ("Crop to the size", "crop")], value="resize", label="Fit"
            )
        with gr.Row():
            inpaint_area = gr.Radio(
                [("Whole picture", "whole"), ("Only masked (more detail)", "only_masked")],
                value="whole",
                label="Inpaint area",
                elem_id="image-inpaint-area",
            )
            inpaint_padding = number_field(bounds[11], DEFAULT_INPAINT_PADDING, elem_id="image-inpaint-padding")
    restore = gr.File(
        label="Drop a PNG made here (or by AUTOMATIC1111) to restore its settings",
        file_types=[".png"],
        elem_id="image-restore",
    )
    restore_note = gr.Markdown(elem_id="image-restore-note")
    return ImageTab(
        notice, prompt, negative, width, height, steps, guidance, seed, count, scheduler, lora, generate, cancel,
        gallery, info, restore, restore_note, field_problems, bounds, start, strength, mask_blur, resize_mode,
        hires, hires_scale, hires_strength, hires_steps, hires_upscaler, inpaint_area, inpaint_padding, send_to_start,
        gr.State(None),
    )  # fmt: skip


def start_and_mask(images: ImageService, value: dict[str, Any] | None) -> tuple[Any, Any]:
    """The editor's picture (checked like any upload) and, when something is painted on it, the mask."""
    from PIL import ImageChops

    if not value or value.get("background") is None:
        return None, None
    picture = images.read_picture(value["background"])
    painted = None
    for layer in value.get("layers") or []:
        if layer is not None and "A" in layer.getbands():
            alpha = layer.getchannel("A")
            painted = alpha if painted is None else ImageChops.lighter(painted, alpha)
    if painted is None or painted.getextrema()[1] == 0:
        return picture, None
    return picture, images.read_mask(painted.resize(picture.size))


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
        start: dict[str, Any] | None,
        strength: float,
        mask_blur: float,
        resize_mode: str,
        hires: bool,
        hires_scale: float,
        hires_strength: float,
        hires_steps: float,
        hires_upscaler: str,
        inpaint_area: str,
        inpaint_padding: float,
        request: gr.Request,
        progress: gr.Progress = gr.Progress(),  # noqa: B008 - Gradio's way to ask for a progress bar
    ) -> tuple[Any, str]:
        values = (width, height, steps, guidance, seed, count, strength, mask_blur, hires_scale, hires_strength,
                  hires_steps, inpaint_padding)  # fmt: skip
        found = problems(list(zip(tab.bounds, values, strict=True)))
        if found:  # refused as typed: nothing is changed behind the user's back
            return gr.skip(), problems_text(found)
        try:
            picture, mask = start_and_mask(images, start)
        except Exception as error:  # a picture that cannot be used: said beside the gallery
            return gr.skip(), f"⚠️ {user_message(error)}"
        with session_switch(running, request) as cancel:
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
                        init_image=picture,
                        mask=mask,
                        strength=float(strength) if picture is not None else None,
                        mask_blur=int(mask_blur),
                        resize_mode=resize_mode or "resize",
                        hires_scale=float(hires_scale) if hires else None,
                        hires_strength=float(hires_strength) if hires else None,
                        hires_steps=int(hires_steps) if hires else None,
                        hires_upscaler=hires_upscaler if hires else None,
                        inpaint_area=inpaint_area or "whole",
                        inpaint_padding=int(inpaint_padding),
                    ),
                    progress=lambda step, total: progress((step, total), desc="Denoising", unit="steps"),
                    cancel=cancel,
                )
            except Exception as error:  # shown beside the gallery; the settings stay as they are
                return gr.skip(), f"⚠️ {user_message(error)}"
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

    restored_fields = [*tab.parameters, tab.strength, tab.mask_blur, tab.hires, tab.hires_scale, tab.hires_strength,
                       tab.hires_steps, tab.hires_upscaler, tab.inpaint_area, tab.inpaint_padding]  # fmt: skip

    def restore(path: str | None) -> list[Any]:
        unchanged = [gr.skip()] * len(restored_fields)
        if not path:
            return [*unchanged, ""]
        try:
            found = read_png_parameters(path)
        except Exception as error:  # a PNG without settings: say so beside the drop zone, change nothing
            return [*unchanged, f"⚠️ {user_message(error)}"]
        found["hires"] = "hires_scale" in found
        if found.get("hires_upscaler") not in HIRES_UPSCALERS:  # e.g. an ESRGAN model this app does not have
            found.pop("hires_upscaler", None)
        if "mask_blur" in found:  # an inpainting PNG says "Only masked", or nothing for the whole picture
            found.setdefault("inpaint_area", "whole")
        names = ["prompt", "negative_prompt", "width", "height", "steps", "guidance", "seed", "num_images", "scheduler",
                 "strength", "mask_blur", "hires", "hires_scale", "hires_strength", "hires_steps", "hires_upscaler",
                 "inpaint_area", "inpaint_padding"]  # fmt: skip
        restored = [found[name] if name in found else gr.skip() for name in names]
        count = sum(name in found for name in names) - 1
        return [*restored, sentence(f"restored {count} settings from the PNG.")]

    def remember(selected: gr.SelectData) -> str | None:
        value = selected.value or {}
        image = value.get("image") if isinstance(value, dict) else None
        return image.get("path") if isinstance(image, dict) else None

    def send_to_start(path: str | None) -> tuple[Any, str]:
        if not path:
            return gr.skip(), "⚠️ Click a picture in the gallery first; then send it."
        return path, "The picture is in *Start from a picture*: paint over it to inpaint, or just generate."

    clicked = tab.generate.click(
        generate,
        [*tab.parameters, *tab.picture_settings],
        [tab.gallery, tab.info],
        api_name="generate",
        concurrency_limit=MODEL_EVENT_CONCURRENCY,
    )
    tab.gallery.select(remember, None, tab.selected, api_visibility="private", show_progress="hidden")
    tab.send_to_start.click(send_to_start, tab.selected, [tab.start, tab.info], api_visibility="private")
    after(clicked)
    tab.cancel.click(cancel_generation, None, None, api_visibility="private", queue=False)
    tab.lora.change(add_lora, [tab.lora, tab.prompt], [tab.prompt, tab.lora], api_visibility="private")
    tab.restore.upload(restore, tab.restore, [*restored_fields, tab.restore_note], api_visibility="private")
    watch_fields(tab.numbers, tab.field_problems)
