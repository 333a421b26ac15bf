"""The OpenAI-compatible /v1 routes: models, chat completions (routed like the Chat tab with
model "auto"), image generations, and audio (``api.audio``).

Every route that runs a model watches its client: when the client goes away, the request's
cancel signal is set, so it leaves the model manager's queue or stops generating.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from fastapi.responses import StreamingResponse
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool

from api.audio import add_audio_routes
from api.audit import note
from api.auth import require_api_key
from api.errors import ApiError
from api.protocol import (
    ChatCompletionRequest,
    ImageGenerationRequest,
    completion_body,
    echo,
    grammar_for,
    image_request_of,
    parse_messages,
    png_bytes,
    sampling_overrides,
)
from api.streaming import PieceRelay, stream_events
from assistant.dispatch import Answer, Assistant, PendingDrawing
from errors import AppError, BadInputError
from generator import ImageRequest
from model_manager import CatalogEntry
from services import Services
from settings import ServerSettings
from text_generation.stream import Message, TextStream

DISCONNECT_POLL_S = 0.25
ALL_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS")


def openai_router(
    services: Services, server: ServerSettings, outputs_dir: Path, assistant: Assistant | None
) -> APIRouter:
    router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key(server))])

    @router.get("/models")
    def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card(entry, services) for entry in answering_models(services)]}

    @router.post("/images/generations")
    async def images_generations(body: ImageGenerationRequest, request: Request) -> dict[str, Any]:
        images = services.images
        if body.model not in (None, "auto", images.model_path.stem, images.model_path.name):
            message = f"unknown image model '{echo(body.model)}'; GET /v1/models lists them"
            raise ApiError(404, message, "model_not_found")
        note(request, model=body.model or images.model_path.stem, route="image", prompt=body.prompt)
        return await draw(image_request_of(body), body.prompt, body.response_format, request)

    async def draw(image_request: ImageRequest, prompt: str, response_format: str, request: Request) -> dict[str, Any]:
        """Generate, watching the client; answer in OpenAI's ImagesResponse shape."""
        cancel = threading.Event()
        try:
            async with cancel_on_disconnect(request, cancel):
                result = await run_in_threadpool(lambda: services.images.generate(image_request, cancel=cancel))
        finally:
            cancel.set()  # done, or abandoned (the server shutting down): stop between steps
        data = []
        for item in result.images:
            entry: dict[str, Any] = {"revised_prompt": prompt, "seed": item.seed}
            if response_format == "url" and item.path is not None:
                entry["url"] = f"{request.base_url}outputs/{outputs_name(item.path, outputs_dir)}"
            else:  # the saved file carries the parameters text; an in-memory image does not
                data_bytes = item.path.read_bytes() if item.path is not None else png_bytes(item.image)
                entry["b64_json"] = base64.b64encode(data_bytes).decode("ascii")
            data.append(entry)
        return {"created": int(time.time()), "data": data, "output_format": "png"}

    @router.post("/images/edits")
    async def images_edits(
        request: Request,
        prompt: Annotated[str, Form()],
        image: Annotated[list[UploadFile] | None, File()] = None,
        image_list: Annotated[list[UploadFile] | None, File(alias="image[]")] = None,
        mask: Annotated[UploadFile | None, File()] = None,
        model: Annotated[str | None, Form()] = None,
        n: Annotated[int, Form()] = 1,
        size: Annotated[str | None, Form()] = None,
        response_format: Annotated[str, Form()] = "b64_json",
        strength: Annotated[float | None, Form()] = None,
        negative_prompt: Annotated[str | None, Form()] = None,
        steps: Annotated[int | None, Form()] = None,
        seed: Annotated[int | None, Form()] = None,
    ) -> dict[str, Any]:
        """OpenAI's image edit: a mask's transparent area (or the image's own) is repainted; without
        either, the whole picture is redrawn from itself (img2img)."""
        images = services.images
        if model not in (None, "auto", images.model_path.stem, images.model_path.name):
            raise ApiError(404, f"unknown image model '{echo(model)}'; GET /v1/models lists them", "model_not_found")
        uploads = [*(image or []), *(image_list or [])]
        if len(uploads) != 1:
            raise BadInputError("send exactly one image to edit (multipart field 'image')")
        picture_bytes = await uploads[0].read()
        mask_bytes = await mask.read() if mask is not None else None
        note(request, model=model or images.model_path.stem, route="image", prompt=prompt)
        body = ImageGenerationRequest(
            prompt=prompt, n=n, size=size, response_format=response_format, negative_prompt=negative_prompt,
            steps=steps, seed=seed,
        )  # fmt: skip
        base = image_request_of(body)
        start = await run_in_threadpool(images.read_picture, picture_bytes)
        painted = await run_in_threadpool(images.read_mask_for, start, mask_bytes) if mask_bytes else None
        if painted is None:  # the picture's own transparency, when it has some, marks the area
            painted = await run_in_threadpool(images.read_transparent_area, picture_bytes)
        edit = dataclasses.replace(base, init_image=start, mask=painted, strength=strength)
        return await draw(edit, prompt, response_format, request)

    @router.post("/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        if body.n not in (None, 1):
            raise ApiError(400, "only n=1 is supported", "invalid_request", "invalid_request_error")
        messages, images = parse_messages(body.messages)
        cancel = threading.Event()
        note(request, model=body.model, prompt=messages[-1]["content"] if messages else None)

        def begin() -> TextStream:  # routing may ask the chat model and decode an image: not on the event loop
            if assistant is not None and body.model == "auto" and routable(messages, images):
                answer = routed_answer(assistant, body, messages, images, cancel)
                note(request, route=answer.decision.route)
                return answer_stream(answer, f"{request.base_url}outputs/", outputs_dir)
            note(request, route="vision" if images else "chat")
            return direct_stream(services, body, messages, images, cancel)

        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        streaming = False
        try:
            async with cancel_on_disconnect(request, cancel):
                stream = await run_in_threadpool(begin)
                if not body.stream:
                    text = await run_in_threadpool(stream.text)
                    return completion_body(completion_id, stream, text)
                relay = PieceRelay(stream, cancel)
                first = await relay.next()  # the model loads now, so a failure is an HTTP status
                streaming = True
        finally:
            if not streaming:  # done, failed or abandoned: stop generating, release the model
                cancel.set()
        include_usage = bool((body.stream_options or {}).get("include_usage"))
        events = stream_events(relay, stream, cancel, completion_id, first, include_usage)
        return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    add_audio_routes(router, services)

    # Last: any other path under /v1, with any method, gets OpenAI's error body (not the UI's 404).
    @router.api_route("/{path:path}", methods=list(ALL_METHODS), include_in_schema=False)
    def unknown_endpoint(path: str, request: Request) -> None:
        allowed = sorted(
            method
            for route in router.routes
            if isinstance(route, APIRoute) and route.path == request.url.path and route.endpoint is not unknown_endpoint
            for method in route.methods
        )
        if allowed:
            raise ApiError(
                405,
                f"{request.method} is not allowed on {request.url.path}; use {', '.join(allowed)}",
                "method_not_allowed",
                headers={"Allow": ", ".join(allowed)},
            )
        raise ApiError(
            404, f"there is no endpoint /v1/{echo(path)}; the API's endpoints are listed at /api/docs", "not_found"
        )

    return router


def routed_answer(
    assistant: Assistant,
    body: ChatCompletionRequest,
    messages: list[Message],
    images: list[str],
    cancel: threading.Event,
) -> Answer:
    """Model "auto": the last user message answered the way the Chat tab answers it."""
    return assistant.answer(
        messages[-1]["content"],
        image=images[0] if images else None,
        history=messages[:-1],
        overrides=sampling_overrides(body),
        grammar=grammar_for(body.response_format),
        cancel=cancel,
    )


def answer_stream(answer: Answer, outputs_url: str, outputs_dir: Path) -> TextStream:
    """The answer as chat text: the reply, a Markdown image for a drawing, or the hint alone."""
    if answer.drawing is not None:
        return drawing_stream(answer.drawing, outputs_url, outputs_dir)
    if answer.text is not None:
        return answer.text
    return fixed_stream(answer.decision.hint or "", "assistant")


def routable(messages: list[Message], images: list[str]) -> bool:
    """Whether model "auto" routes the request: a last user message with text or an image (an empty
    message goes on to the chat service, which refuses it with a 400)."""
    last = messages[-1] if messages else None
    return last is not None and last["role"] == "user" and bool(last["content"].strip() or images)


@contextlib.asynccontextmanager
async def cancel_on_disconnect(request: Request, cancel: threading.Event) -> AsyncIterator[None]:
    """Set ``cancel`` if the client disconnects while the body of the ``async with`` runs."""

    async def watch() -> None:
        while not cancel.is_set():
            if await request.is_disconnected():
                cancel.set()
                return
            await asyncio.sleep(DISCONNECT_POLL_S)

    watcher = asyncio.create_task(watch())
    try:
        yield
    finally:
        watcher.cancel()


def answering_models(services: Services) -> list[CatalogEntry]:
    """The models that can answer now (their files are present), the default chat model first.
    The full inventory, missing models and where to put them, is the CLI's `models` command."""
    present = [entry for entry in services.catalog() if entry.present]
    try:
        default = services.chat.resolve_model().name
    except AppError:  # no chat model at all: the others still answer
        default = None
    present.sort(key=lambda entry: entry.name != default)  # stable: the catalog's order otherwise
    auto = CatalogEntry("auto", "assistant", "", True)
    return [*present[:1], auto, *present[1:]] if default else [auto, *present]


def model_card(entry: CatalogEntry, services: Services) -> dict[str, Any]:
    """One /v1/models entry: OpenAI's fields, plus what is loaded (never a filesystem path)."""
    file_name = Path(entry.path).name if entry.path else None
    loaded = next(
        (m for m in services.manager.status().resident if m.kind == entry.capability and m.name == file_name),
        None,
    )
    return {
        "id": entry.name,
        "object": "model",
        "created": 0,
        "owned_by": "local",
        "capability": entry.capability,
        "resident": loaded is not None,
        "size_bytes": loaded.size_bytes if loaded else None,
        "load_seconds": loaded.load_seconds if loaded else None,
    }


def outputs_name(path: Path, outputs_dir: Path) -> str:
    """A saved image's place under /outputs/: day/name."""
    return path.resolve().relative_to(outputs_dir.resolve()).as_posix()


def fixed_stream(text: str, model_name: str) -> TextStream:
    def pieces(stream: TextStream) -> Iterator[str]:
        stream.model_name = model_name
        stream.finish_reason = "stop"
        yield text

    return TextStream(pieces)


def drawing_stream(drawing: PendingDrawing, outputs_url: str, outputs_dir: Path) -> TextStream:
    """A drawing request answered in chat: the picture as a Markdown image linking to the saved PNG."""

    def pieces(stream: TextStream) -> Iterator[str]:
        done = drawing.draw()
        result = done.result
        stream.model_name = result.model
        stream.finish_reason = "cancelled" if result.cancelled else "stop"
        for item in result.images:
            if item.path is not None:
                yield f"![{done.prompt.prompt}]({outputs_url}{outputs_name(item.path, outputs_dir)})\n\n"
        yield f"Prompt used: {done.prompt.prompt} (seed {', '.join(str(i.seed) for i in result.images)})"

    return TextStream(pieces)


def direct_stream(
    services: Services,
    body: ChatCompletionRequest,
    messages: list[Message],
    images: list[str],
    cancel: threading.Event,
) -> TextStream:
    """A model asked for by name (or "auto" without the assistant): an image goes to the vision
    model, text to the chat model."""
    chat_names = services.chat.model_names()
    vision_name = services.vision.model_name
    if body.model not in ("auto", "chat", vision_name, *chat_names):
        raise ApiError(404, f"unknown model '{echo(body.model)}'; GET /v1/models lists them", "model_not_found")
    overrides = sampling_overrides(body)
    if images or body.model == vision_name:
        if not images:
            raise BadInputError(f"{vision_name} answers questions about an image: add an image_url part")
        if grammar_for(body.response_format) is not None:
            raise BadInputError("response_format is supported for text chat only, not for questions about images")
        services.vision.require_installed()
        params = services.vision.defaults.override(**overrides)
        return services.vision.stream(images[0], messages, params, cancel=cancel)
    model = None if body.model in ("auto", "chat") else body.model
    params = services.chat.defaults.override(**overrides)
    return services.chat.stream(messages, params, cancel=cancel, model=model, grammar=grammar_for(body.response_format))
