"""The HTTP server: an OpenAI-compatible API with the Gradio UI mounted at "/".

One process and one port serve the browser UI and the JSON endpoints, over the
same model manager and services. Typed errors become OpenAI-shaped error bodies
with the matching status here, at the edge.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hmac
import io
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import gradio as gr
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict
from starlette.concurrency import run_in_threadpool

from assistant import Assistant
from chat import json_grammar
from errors import (
    AppError,
    BadInputError,
    BusyError,
    ModelLoadError,
    ModelMissingError,
    ModelTooLargeError,
    OutOfMemoryError,
    TooLargeError,
)
from generator import ImageRequest
from router import RouteDecision
from services import Services
from settings import ServerSettings
from text_generation import Message, TextStream

RETRY_AFTER_S = 5
log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------
# Errors in OpenAI's shape
# ----------------------------------------------------------------------------


class ApiError(Exception):
    """An error with its HTTP status, already worded for the client."""

    def __init__(self, status: int, message: str, code: str, error_type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.error_type = error_type


def error_body(message: str, error_type: str, code: str | None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def api_error_for(error: AppError) -> ApiError:
    """Map the services' typed errors to HTTP statuses."""
    message = str(error)
    if isinstance(error, TooLargeError):
        return ApiError(413, message, "request_too_large")
    if isinstance(error, BadInputError):
        return ApiError(400, message, "invalid_request")
    if isinstance(error, ModelMissingError):
        return ApiError(404, message, "model_not_found")
    if isinstance(error, BusyError | OutOfMemoryError | ModelTooLargeError):
        return ApiError(503, message, "model_unavailable", "server_error")
    if isinstance(error, ModelLoadError):
        return ApiError(500, message, "model_load_failed", "server_error")
    return ApiError(500, message, "internal_error", "server_error")


def error_response(error: ApiError) -> JSONResponse:
    headers = {"Retry-After": str(RETRY_AFTER_S)} if error.status == 503 else None
    return JSONResponse(error_body(str(error), error.error_type, error.code), error.status, headers=headers)


# ----------------------------------------------------------------------------
# Requests
# ----------------------------------------------------------------------------


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # clients send fields we do not use (user, n=1, ...)

    model: str = "auto"
    messages: list[dict[str, Any]]
    stream: bool = False
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = None
    response_format: dict[str, Any] | None = None
    stream_options: dict[str, Any] | None = None


class ImageGenerationRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # quality, style, user: accepted and ignored

    prompt: str
    model: str | None = None
    n: int = 1
    size: str | None = None  # "WIDTHxHEIGHT" or "auto"
    response_format: str = "b64_json"  # or "url": a link to the saved PNG on this server
    negative_prompt: str | None = None
    steps: int | None = None
    guidance: float | None = None
    seed: int | None = None
    scheduler: str | None = None
    loras: dict[str, float] | list[dict[str, Any]] | None = None


def image_request_of(body: ImageGenerationRequest) -> ImageRequest:
    width = height = None
    if body.size and body.size != "auto":
        width_text, _, height_text = body.size.lower().partition("x")
        if not (width_text.isdigit() and height_text.isdigit()):
            raise BadInputError(f"size must look like 512x512, got '{body.size}'")
        width, height = int(width_text), int(height_text)
    if body.response_format not in ("b64_json", "url"):
        raise BadInputError(f"response_format must be b64_json or url, got '{body.response_format}'")
    return ImageRequest(
        prompt=body.prompt,
        negative_prompt=body.negative_prompt,
        width=width,
        height=height,
        steps=body.steps,
        guidance=body.guidance,
        seed=body.seed,
        num_images=body.n,
        scheduler=body.scheduler,
        loras=loras_of(body.loras),
    )


def loras_of(value: dict[str, float] | list[dict[str, Any]] | None) -> tuple[tuple[str, float], ...]:
    """LoRAs as {"name": weight} or [{"name": ..., "weight": ...}]."""
    if not value:
        return ()
    if isinstance(value, dict):
        return tuple((str(name), float(weight)) for name, weight in value.items())
    try:
        return tuple((str(item["name"]), float(item.get("weight", 1.0))) for item in value)
    except (KeyError, TypeError, ValueError):
        raise BadInputError('loras must be {"name": weight} or a list of {"name": ..., "weight": ...}') from None


def png_bytes(image: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def parse_messages(raw: list[dict[str, Any]]) -> tuple[list[Message], list[str]]:
    """OpenAI messages → plain text messages and the image URLs they carry."""
    messages: list[Message] = []
    images: list[str] = []
    for position, message in enumerate(raw, start=1):
        role = message.get("role")
        if role == "developer":
            role = "system"
        if role not in ("system", "user", "assistant"):
            raise BadInputError(f"message {position}: role '{role}' is not supported (use system, user, assistant)")
        content = message.get("content")
        if content is None:
            content = ""
        if isinstance(content, list):
            texts = []
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text":
                    texts.append(str(part.get("text", "")))
                elif kind == "image_url":
                    images.append(image_url_of(part, position))
                else:
                    raise BadInputError(f"message {position}: content part type '{kind}' is not supported")
            content = "\n".join(texts)
        if not isinstance(content, str):
            raise BadInputError(f"message {position}: content must be a string or a list of parts")
        messages.append({"role": role, "content": content})
    return messages, images


def image_url_of(part: dict[str, Any], position: int) -> str:
    value = part.get("image_url")
    url = value.get("url") if isinstance(value, dict) else value
    if not isinstance(url, str) or not url:
        raise BadInputError(f"message {position}: image_url needs a url")
    if not url.startswith("data:"):
        raise BadInputError(
            f"message {position}: only base64 data: URIs are accepted for images; this server is offline "
            "and does not fetch URLs"
        )
    return url


def grammar_for(response_format: dict[str, Any] | None) -> str | None:
    if not response_format:
        return None
    kind = response_format.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return json_grammar(None)
    if kind == "json_schema":
        schema = (response_format.get("json_schema") or {}).get("schema")
        if not isinstance(schema, dict):
            raise BadInputError("response_format.json_schema.schema must be a JSON schema object")
        return json_grammar(schema)
    raise BadInputError(f"response_format type '{kind}' is not supported (text, json_object, json_schema)")


# ----------------------------------------------------------------------------
# Streaming a blocking iterator into server-sent events
# ----------------------------------------------------------------------------

_DONE = object()


class PieceRelay:
    """Runs a TextStream in a worker thread and hands its pieces to the event loop.

    Setting ``cancel`` (done when the client goes away) stops generation at the next
    token; the worker then closes the stream, which releases the model.
    """

    def __init__(self, stream: TextStream, cancel: threading.Event) -> None:
        self._stream = stream
        self._cancel = cancel
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        threading.Thread(target=self._produce, name="api-stream", daemon=True).start()

    def _produce(self) -> None:
        try:
            for piece in self._stream:
                self._send(piece)
            self._send(_DONE)
        except BaseException as error:
            self._send(error)
        finally:
            self._stream.close()

    def _send(self, item: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the event loop has closed: the client is long gone
            self._cancel.set()

    async def next(self) -> str | None:
        """The next text: every piece already waiting, joined (fewer events when the client
        lags behind the model); None at the end; raises what the stream raised."""
        item = await self._queue.get()
        if item is _DONE:
            return None
        if isinstance(item, BaseException):
            raise item
        pieces = [item]
        while not self._queue.empty():
            following = self._queue.get_nowait()
            if following is _DONE or isinstance(following, BaseException):
                self._queue.put_nowait(following)  # the queue is empty now: it is next in line again
                break
            pieces.append(following)
        return "".join(pieces)


def sse(data: dict[str, Any] | str) -> str:
    import json

    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


# ----------------------------------------------------------------------------
# The app
# ----------------------------------------------------------------------------


def create_app(
    services: Services,
    server: ServerSettings,
    outputs_dir: Path,
    demo: gr.Blocks | None = None,
    assistant: Assistant | None = None,
) -> FastAPI:
    app = FastAPI(title="Enclave", docs_url="/api/docs", redoc_url=None)
    max_body = int(server.max_request_mb * 2**20)

    @app.exception_handler(ApiError)
    async def on_api_error(_: Request, error: ApiError) -> JSONResponse:
        return error_response(error)

    @app.exception_handler(AppError)
    async def on_app_error(_: Request, error: AppError) -> JSONResponse:
        return error_response(api_error_for(error))

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(_: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = f"invalid request: '{where}': {first.get('msg', 'bad value')}" if where else "invalid request body"
        return error_response(ApiError(400, message, "invalid_request"))

    @app.middleware("http")
    async def limit_body_size(request: Request, call_next: Callable[..., Any]) -> Any:
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > max_body:
            message = f"the request is {int(length) / 2**20:.1f} MB; the limit is {server.max_request_mb:g} MB"
            return error_response(ApiError(413, message + " (server.max_request_mb)", "request_too_large"))
        return await call_next(request)

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.exception_handler(Exception)
    async def on_unexpected_error(_: Request, error: Exception) -> JSONResponse:
        log.error("unexpected error while serving a request", exc_info=error)
        message = f"unexpected error ({type(error).__name__}: {error}); the server keeps running, its log has details"
        return error_response(ApiError(500, message, "internal_error", "server_error"))

    @app.get("/api/status", dependencies=[Depends(require_api_key(server))])
    def status() -> dict[str, Any]:
        return dataclasses.asdict(services.manager.status())

    @app.get("/outputs/{day}/{name}", dependencies=[Depends(require_api_key(server))])
    def output_file(day: str, name: str) -> FileResponse:
        """A generated PNG, so API clients and chat links can show it."""
        folder = outputs_dir.resolve()
        path = (folder / day / name).resolve()
        if not path.is_relative_to(folder) or path.suffix != ".png" or not path.is_file():
            raise ApiError(404, f"no generated image {day}/{name}", "not_found")
        return FileResponse(path, media_type="image/png")

    app.include_router(openai_router(services, server, outputs_dir, assistant))
    if demo is not None:
        # Generated images live in outputs_dir; the chat shows them inline.
        app = gr.mount_gradio_app(
            app,
            demo,
            path="/",
            footer_links=["settings"],
            allowed_paths=[str(outputs_dir)],
            # With an API key the browser UI asks for it too (any user name, the key as password).
            auth=(lambda _user, password: key_matches(password, server.api_key)) if server.api_key else None,
        )
    return app


def key_matches(given: str, key: str | None) -> bool:
    return key is not None and hmac.compare_digest(given.encode(), key.encode())


def require_api_key(server: ServerSettings) -> Callable[[Request], None]:
    def check(request: Request) -> None:
        if not server.api_key:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not key_matches(token.strip(), server.api_key):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", "invalid_api_key")

    return check


def openai_router(
    services: Services, server: ServerSettings, outputs_dir: Path, assistant: Assistant | None
) -> APIRouter:
    router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key(server))])

    @router.get("/models")
    def list_models() -> dict[str, Any]:
        resident = {m.path: m for m in services.manager.status().resident}
        data = []
        for entry in services.catalog():
            loaded = resident.get(entry.path)
            data.append(
                {
                    "id": entry.name,
                    "object": "model",
                    "created": 0,
                    "owned_by": "local",
                    "capability": entry.capability,
                    "present": entry.present,
                    "resident": loaded is not None,
                    "size_bytes": loaded.size_bytes if loaded else None,
                    "load_seconds": loaded.load_seconds if loaded else None,
                    "path": entry.path,
                }
            )
        return {"object": "list", "data": data}

    @router.post("/images/generations")
    async def images_generations(body: ImageGenerationRequest, request: Request) -> dict[str, Any]:
        images = services.images
        if body.model not in (None, "auto", images.model_path.stem, images.model_path.name):
            raise ApiError(404, f"unknown image model '{body.model}'; GET /v1/models lists them", "model_not_found")
        result = await run_in_threadpool(images.generate, image_request_of(body))
        data = []
        for item in result.images:
            entry: dict[str, Any] = {"revised_prompt": body.prompt, "seed": item.seed}
            if body.response_format == "url" and item.path is not None:
                entry["url"] = f"{request.base_url}outputs/{outputs_name(item.path, outputs_dir)}"
            else:  # the saved file carries the parameters text; an in-memory image does not
                data_bytes = item.path.read_bytes() if item.path is not None else png_bytes(item.image)
                entry["b64_json"] = base64.b64encode(data_bytes).decode("ascii")
            data.append(entry)
        return {"created": int(time.time()), "data": data, "output_format": "png"}

    @router.post("/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        if body.n not in (None, 1):
            raise ApiError(400, "only n=1 is supported", "invalid_request", "invalid_request_error")
        messages, images = parse_messages(body.messages)
        cancel = threading.Event()

        def begin() -> TextStream:  # routing may ask the chat model and decode an image: not on the event loop
            decision = route_auto(assistant, body, messages, images)
            if decision is None:
                return start_text_stream(services, body, messages, images, cancel)
            if decision.route == "image":
                return drawing_stream(assistant, decision, f"{request.base_url}outputs/", outputs_dir, cancel)
            if decision.hint and not decision.prompt.strip() and decision.route != "vision":
                return fixed_stream(decision.hint, "assistant")
            messages[-1] = {"role": "user", "content": decision.prompt}  # a command prefix stripped
            routed_images = images if decision.route == "vision" else []
            return start_text_stream(services, body, messages, routed_images, cancel)

        stream = await run_in_threadpool(begin)
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            relay = PieceRelay(stream, cancel)
            try:
                first = await relay.next()  # load the model now, so a failure is an HTTP status
            except BaseException:
                cancel.set()
                raise
            events = stream_events(relay, stream, cancel, completion_id, first, include_usage)
            return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            text = await run_in_threadpool(stream.text)
        finally:
            cancel.set()
        return completion_body(completion_id, stream, text)

    return router


def route_auto(
    assistant: Assistant | None, body: ChatCompletionRequest, messages: list[Message], images: list[str]
) -> RouteDecision | None:
    """With model "auto", route the last user message the way the Chat tab does."""
    if assistant is None or body.model != "auto" or not messages or messages[-1]["role"] != "user":
        return None
    if not messages[-1]["content"].strip():
        return None  # the chat service refuses an empty message with a 400
    return assistant.decide(messages[-1]["content"], has_image=bool(images))


def outputs_name(path: Path, outputs_dir: Path) -> str:
    """A saved image's place under /outputs/: day/name."""
    return path.resolve().relative_to(outputs_dir.resolve()).as_posix()


def fixed_stream(text: str, model_name: str) -> TextStream:
    def pieces(stream: TextStream) -> Iterator[str]:
        stream.model_name = model_name
        stream.finish_reason = "stop"
        yield text

    return TextStream(pieces)


def drawing_stream(
    assistant: Assistant, decision: RouteDecision, outputs_url: str, outputs_dir: Path, cancel: threading.Event
) -> TextStream:
    """A drawing request answered in chat: the picture as a Markdown image linking to the saved PNG."""

    def pieces(stream: TextStream) -> Iterator[str]:
        prompt = assistant.image_prompt(decision)
        result = assistant.draw(prompt, cancel=cancel)
        stream.model_name = result.model
        stream.finish_reason = "stop"
        for item in result.images:
            if item.path is not None:
                yield f"![{prompt.prompt}]({outputs_url}{outputs_name(item.path, outputs_dir)})\n\n"
        yield f"Prompt used: {prompt.prompt} (seed {', '.join(str(i.seed) for i in result.images)})"

    return TextStream(pieces)


def start_text_stream(
    services: Services,
    body: ChatCompletionRequest,
    messages: list[Message],
    images: list[str],
    cancel: threading.Event,
) -> TextStream:
    """Route the request: an image goes to the vision model, text to the chat model."""
    chat_names = services.chat.model_names()
    vision_name = services.vision.model_name
    if body.model not in ("auto", "chat", vision_name, *chat_names):
        raise ApiError(404, f"unknown model '{body.model}'; GET /v1/models lists them", "model_not_found")
    overrides = {
        "temperature": body.temperature,
        "top_p": body.top_p,
        "max_tokens": body.max_completion_tokens or body.max_tokens,
        "seed": body.seed,
        "stop": body.stop,
    }
    if images or body.model == vision_name:
        if not images:
            raise BadInputError(f"{vision_name} answers questions about an image: add an image_url part")
        if len(images) > 1:
            raise BadInputError("send one image per conversation; the vision model looks at one image at a time")
        if body.response_format and body.response_format.get("type") not in (None, "text"):
            raise BadInputError("response_format is supported for text chat only, not for questions about images")
        services.vision.require_installed()
        params = services.vision.defaults.override(**overrides)
        return services.vision.stream(images[0], messages, params, cancel=cancel)
    model = None if body.model in ("auto", "chat") else body.model
    params = services.chat.defaults.override(**overrides)
    return services.chat.stream(messages, params, cancel=cancel, model=model, grammar=grammar_for(body.response_format))


def finish_reason_of(stream: TextStream) -> str:
    return "length" if stream.finish_reason == "length" else "stop"


def usage_of(stream: TextStream) -> dict[str, int]:
    return {
        "prompt_tokens": stream.prompt_tokens,
        "completion_tokens": stream.completion_tokens,
        "total_tokens": stream.prompt_tokens + stream.completion_tokens,
    }


def completion_body(completion_id: str, stream: TextStream, text: str) -> dict[str, Any]:
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": stream.model_name,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "finish_reason": finish_reason_of(stream),
                "logprobs": None,
            }
        ],
        "usage": usage_of(stream),
        "seed": stream.seed,
    }


async def stream_events(
    relay: PieceRelay,
    stream: TextStream,
    cancel: threading.Event,
    completion_id: str,
    first: str | None,
    include_usage: bool,
) -> AsyncIterator[str]:
    created = int(time.time())

    def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": stream.model_name,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
        }
        if include_usage:
            body["usage"] = None
        return body

    try:
        yield sse(chunk({"role": "assistant", "content": ""}))
        piece = first
        while piece is not None:
            yield sse(chunk({"content": piece}))
            piece = await relay.next()
        yield sse(chunk({}, finish_reason_of(stream)))
        if include_usage:
            yield sse({**chunk({}), "choices": [], "usage": usage_of(stream)})
        yield sse("[DONE]")
    except Exception as error:  # after the first piece: report inside the stream, headers are gone
        if not isinstance(error, AppError):
            log.error("unexpected error while streaming", exc_info=error)
        failure = api_error_for(error if isinstance(error, AppError) else AppError(f"unexpected error: {error}"))
        yield sse(error_body(str(failure), failure.error_type, failure.code))
    finally:
        cancel.set()  # the client left or the reply ended: stop generating, release the model
