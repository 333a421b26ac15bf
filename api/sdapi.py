"""A compatible subset of AUTOMATIC1111's HTTP API (``/sdapi/v1/...``), so the tools written for it
(SillyTavern, Krita and Photoshop plug-ins, Open WebUI's image settings, scripts) draw with this
app unchanged: txt2img, the model, LoRA and sampler lists, progress, interrupt and options (the
checkpoint is switched through the model manager). Field names and response shapes follow
AUTOMATIC1111's published API; errors come as its ``{"error", "detail"}`` bodies.
"""

from __future__ import annotations

import base64
import binascii
import json
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from PIL import ImageOps
from pydantic import ConfigDict
from starlette.concurrency import run_in_threadpool

from api.audit import note
from api.auth import require_api_key
from api.protocol import CheckedBody, echo
from errors import AppError, BadInputError, BusyError, ModelMissingError, ModelTooLargeError, TooLargeError
from generator import ImageRequest
from services import Services
from settings import ServerSettings
from stable_diffusion.request import DEFAULT_HIRES_UPSCALER, HIRES_UPSCALERS, SAMPLER_NAMES

# AUTOMATIC1111's sampler names (and its older aliases) for the schedulers this app has.
A1111_SAMPLERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "euler_a": ("Euler a", ("k_euler_a", "k_euler_ancestral")),
    "euler": ("Euler", ("k_euler",)),
    "dpmpp_2m_karras": ("DPM++ 2M Karras", ("k_dpmpp_2m_ka",)),
    "ddim": ("DDIM", ()),
}


def scheduler_for(sampler: str | None, schedule: str | None) -> str | None:
    """This app's scheduler for A1111's sampler name (newer A1111 sends "DPM++ 2M" + scheduler "Karras")."""
    if not sampler:
        return None
    wanted = sampler.strip().lower()
    if schedule and schedule.strip().lower() == "karras" and not wanted.endswith("karras"):
        wanted += " karras"
    for name, (label, aliases) in A1111_SAMPLERS.items():
        if wanted in (label.lower(), *aliases, name):
            return name
    known = ", ".join(label for label, _ in A1111_SAMPLERS.values())
    raise BadInputError(f"unknown sampler '{echo(sampler)}'; this server has: {known}")


class Txt2ImgRequest(CheckedBody):
    model_config = ConfigDict(extra="allow")  # styles, restore_faces, tiling, …: accepted, not used

    prompt: str = ""
    negative_prompt: str | None = None
    seed: int = -1
    sampler_name: str | None = None
    sampler_index: str | None = None  # the older name of sampler_name
    scheduler: str | None = None
    batch_size: int = 1
    n_iter: int = 1
    steps: int | None = None
    cfg_scale: float | None = None
    width: int | None = None
    height: int | None = None
    enable_hr: bool = False
    hr_scale: float = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = 0
    hr_denoising_strength: float | None = None  # img2img's hires strength (txt2img uses denoising_strength)
    denoising_strength: float | None = None
    send_images: bool = True
    override_settings: dict[str, Any] | None = None


class Img2ImgRequest(Txt2ImgRequest):
    init_images: list[str]  # base64 (or data: URIs)
    mask: str | None = None  # white repaints (A1111's convention)
    denoising_strength: float | None = 0.75
    mask_blur: int | None = None
    resize_mode: int = 0  # 0 just resize, 1 crop and resize
    inpainting_mask_invert: int = 0
    inpaint_full_res: bool = True  # A1111's default: redraw only the masked area ("Only masked")
    inpaint_full_res_padding: int = 0


def picture_bytes(value: str) -> bytes | str:
    """A picture as A1111's clients send it: base64, or a data: URI (kept as it is for the decoder)."""
    if value.startswith("data:"):
        return value
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise BadInputError("a picture must be base64 (or a data: URI)") from None


@dataclass
class Job:
    """The image job running through this API, for /progress and /interrupt."""

    started: float = 0.0
    step: int = 0
    steps: int = 0
    running: bool = False
    interrupted: bool = False
    kind: str = "txt2img"
    cancels: list[threading.Event] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def a1111_error(status: int, error: AppError | str) -> JSONResponse:
    kind = type(error).__name__ if isinstance(error, AppError) else "HTTPException"
    detail = str(error)
    return JSONResponse({"error": kind, "detail": detail[:1].upper() + detail[1:], "body": None, "errors": None},
                        status_code=status)  # fmt: skip


def status_of(error: AppError) -> int:
    if isinstance(error, TooLargeError):
        return 413
    if isinstance(error, ModelMissingError):
        return 404
    if isinstance(error, BusyError):
        return 503
    if isinstance(error, BadInputError | ModelTooLargeError):
        return 400
    return 500


def answered(work: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Typed errors as AUTOMATIC1111's error bodies (this API's clients read "detail")."""
    import functools

    @functools.wraps(work)
    async def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return await work(*args, **kwargs)
        except AppError as error:
            return a1111_error(status_of(error), error)

    return run


def sdapi_router(services: Services, server: ServerSettings) -> APIRouter:
    router = APIRouter(prefix="/sdapi/v1", dependencies=[Depends(require_api_key(server))])
    job = Job()
    images = services.images

    def checkpoint_title(name: str) -> str:
        path = images.installed_models().get(name)
        return path.name if path is not None else name

    def request_of(body: Txt2ImgRequest, **start: Any) -> ImageRequest:
        if body.enable_hr:
            upscaler = body.hr_upscaler or DEFAULT_HIRES_UPSCALER
            if upscaler not in HIRES_UPSCALERS:  # A1111 refuses an upscaler it does not have, too
                raise BadInputError(
                    f"unknown upscaler '{echo(upscaler)}' (hr_upscaler); this server has: {', '.join(HIRES_UPSCALERS)}"
                )
            start |= {
                "hires_upscaler": upscaler,
                "hires_scale": body.hr_scale,
                "hires_strength": body.denoising_strength if not start else body.hr_denoising_strength,
                "hires_steps": body.hr_second_pass_steps or None,
            }
        if not 1 <= body.batch_size <= 64 or not 1 <= body.n_iter <= 64:
            raise BadInputError("batch_size and n_iter must each be 1 to 64")
        checkpoint = (body.override_settings or {}).get("sd_model_checkpoint")
        if checkpoint:
            select_checkpoint(str(checkpoint))
        return ImageRequest(
            prompt=body.prompt,
            negative_prompt=body.negative_prompt,
            width=body.width,
            height=body.height,
            steps=body.steps,
            guidance=body.cfg_scale,
            seed=body.seed,
            num_images=body.batch_size * body.n_iter,
            scheduler=scheduler_for(body.sampler_name or body.sampler_index, body.scheduler),
            **start,
        )

    async def run_job(body: Txt2ImgRequest, image_request: ImageRequest, request: Request, kind: str) -> Any:
        note(request, model=images.selected_name, route="image", prompt=body.prompt)
        cancel = threading.Event()

        def progress(step: int, total: int) -> None:
            job.step, job.steps = step, total

        with job.lock:
            job.cancels.append(cancel)
            job.started, job.step, job.steps, job.running, job.interrupted = time.time(), 0, 0, True, False
            job.kind = kind
        try:
            result = await run_in_threadpool(lambda: images.generate(image_request, progress=progress, cancel=cancel))
        finally:
            with job.lock:
                job.cancels.remove(cancel)
                job.running = bool(job.cancels)
        encoded = []
        for item in result.images:
            data = item.path.read_bytes() if item.path is not None else b""
            encoded.append(base64.b64encode(data).decode("ascii"))
        seeds = [item.seed for item in result.images]
        info = {
            "prompt": body.prompt,
            "all_prompts": [body.prompt] * len(seeds),
            "negative_prompt": body.negative_prompt or "",
            "seed": seeds[0] if seeds else body.seed,
            "all_seeds": seeds,
            "subseed": -1,
            "width": result.images[0].image.width if result.images else body.width,
            "height": result.images[0].image.height if result.images else body.height,
            "sampler_name": A1111_SAMPLERS[image_request.scheduler or images.default_scheduler][0],
            "steps": body.steps,
            "cfg_scale": body.cfg_scale,
            "batch_size": body.batch_size,
            "sd_model_name": result.model,
            "infotexts": [item.parameters for item in result.images],
            "interrupted": result.cancelled,
        }
        parameters = body.model_dump(exclude={"init_images", "mask"})
        return {"images": encoded if body.send_images else [], "parameters": parameters, "info": json.dumps(info)}

    @router.post("/txt2img")
    @answered
    async def txt2img(body: Txt2ImgRequest, request: Request) -> Any:
        return await run_job(body, request_of(body), request, "txt2img")

    @router.post("/img2img")
    @answered
    async def img2img(body: Img2ImgRequest, request: Request) -> Any:
        if len(body.init_images) != 1:
            raise BadInputError("send one picture in init_images (this server draws from one at a time)")
        if body.resize_mode not in (0, 1):
            raise BadInputError("the resize mode (resize_mode) must be 0, just resize, or 1, crop and resize")
        start = await run_in_threadpool(images.read_picture, picture_bytes(body.init_images[0]))
        mask = None
        if body.mask:
            mask = await run_in_threadpool(images.read_mask_for, start, picture_bytes(body.mask))
            if body.inpainting_mask_invert:
                mask = ImageOps.invert(mask)
        image_request = request_of(
            body,
            init_image=start,
            mask=mask,
            strength=body.denoising_strength,
            mask_blur=body.mask_blur,
            inpaint_area="only_masked" if body.inpaint_full_res else "whole",
            inpaint_padding=body.inpaint_full_res_padding,
            resize_mode="crop" if body.resize_mode == 1 else "resize",
        )
        return await run_job(body, image_request, request, "img2img")

    @router.get("/progress")
    async def progress(skip_current_image: bool = False) -> dict[str, Any]:
        fraction = job.step / job.steps if job.running and job.steps else 0.0
        elapsed = time.time() - job.started if job.running else 0.0
        eta = elapsed / fraction - elapsed if fraction > 0 else 0.0
        state = {
            "skipped": False,
            "interrupted": job.interrupted,
            "job": job.kind if job.running else "",
            "job_count": len(job.cancels),
            "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.started or time.time())),
            "job_no": 0,
            "sampling_step": job.step if job.running else 0,
            "sampling_steps": job.steps if job.running else 0,
        }
        return {"progress": fraction, "eta_relative": eta, "state": state, "current_image": None, "textinfo": None}

    @router.post("/interrupt")
    async def interrupt() -> dict[str, Any]:
        with job.lock:
            for cancel in job.cancels:
                cancel.set()  # stops between denoising steps, or leaves the model manager's queue
            job.interrupted = bool(job.cancels)
        return {}

    @router.get("/sd-models")
    async def sd_models() -> list[dict[str, Any]]:
        return [
            {"title": path.name, "model_name": name, "hash": None, "sha256": None, "filename": path.name,
             "config": None}
            for name, path in images.installed_models().items()
        ]  # fmt: skip

    @router.get("/loras")
    async def loras() -> list[dict[str, Any]]:
        return [
            {"name": name, "alias": name, "path": f"{name}.safetensors", "metadata": {}} for name in images.list_loras()
        ]

    @router.get("/upscalers")
    async def upscalers() -> list[dict[str, Any]]:
        return [
            {"name": name, "model_name": None, "model_path": None, "model_url": None, "scale": 4}
            for name, (kind, _) in HIRES_UPSCALERS.items()
            if kind == "image"
        ]

    @router.get("/latent-upscale-modes")
    async def latent_upscale_modes() -> list[dict[str, Any]]:
        return [{"name": name} for name, (kind, _) in HIRES_UPSCALERS.items() if kind == "latent"]

    @router.get("/samplers")
    async def samplers() -> list[dict[str, Any]]:
        return [
            {"name": label, "aliases": list(aliases), "options": {}}
            for name, (label, aliases) in A1111_SAMPLERS.items()
            if name in SAMPLER_NAMES
        ]

    def select_checkpoint(title: str) -> None:
        """A title as A1111 writes it ("name.safetensors [hash]") or a bare name."""
        name = title.split(" [", 1)[0].strip()
        for suffix in (".safetensors", ".ckpt"):
            name = name.removesuffix(suffix)
        images.select_model(name)  # the model manager swaps it in with the next request

    @router.get("/options")
    async def options() -> dict[str, Any]:
        return {
            "sd_model_checkpoint": checkpoint_title(images.selected_name),
            "sd_checkpoint_hash": None,
            "samples_format": "png",
            "CLIP_stop_at_last_layers": 1,
            "sd_lora": "None",
        }

    @router.post("/options")
    @answered
    async def set_options(body: dict[str, Any]) -> Any:
        checkpoint = body.get("sd_model_checkpoint")
        if checkpoint is not None:
            if not isinstance(checkpoint, str):
                raise BadInputError("sd_model_checkpoint must be a model's title or name (see /sdapi/v1/sd-models)")
            select_checkpoint(checkpoint)
        return None

    return router
