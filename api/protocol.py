"""The OpenAI request bodies this server accepts, and turning them into the services' plain values."""

from __future__ import annotations

import io
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator

from errors import BadInputError
from generator import ImageRequest
from text_generation.grammar import json_grammar
from text_generation.stream import Message, TextStream

MAX_ECHO_CHARS = 60  # of a client's value repeated in an error message


def echo(value: object) -> str:
    """A client's value, safe to repeat in an error message: short, and valid Unicode."""
    text = str(value)
    if len(text) > MAX_ECHO_CHARS:
        text = text[:MAX_ECHO_CHARS] + "…"
    return text.encode("utf-8", "replace").decode("utf-8")


def lone_surrogate_at(value: Any, where: str = "body") -> str | None:
    """Where in a parsed JSON value a string holds a lone surrogate ("\ud800"), which is not
    Unicode text: no tokenizer, template or response encoder can take it."""
    pending: list[tuple[Any, str]] = [(value, where)]
    while pending:
        item, path = pending.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return path
        elif isinstance(item, dict):
            pending.extend((v, f"{path}.{echo(k)}") for k, v in item.items())
            pending.extend((k, f"{path} (a key)") for k in item)
        elif isinstance(item, list):
            pending.extend((v, f"{path}[{i}]") for i, v in enumerate(item))
    return None


class CheckedBody(BaseModel):
    """A request body: checked for text that is not Unicode before any field is read."""

    @model_validator(mode="before")
    @classmethod
    def _unicode_text_only(cls, data: Any) -> Any:
        where = lone_surrogate_at(data)
        if where is not None:
            raise ValueError(f"{where} holds a lone surrogate, which is not valid Unicode text; send UTF-8 text")
        return data


class ChatCompletionRequest(CheckedBody):
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


class ImageGenerationRequest(CheckedBody):
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
        if not (_is_size_number(width_text) and _is_size_number(height_text)):
            raise BadInputError(f"size must look like 512x512, got '{echo(body.size)}'")
        width, height = int(width_text), int(height_text)
    if body.response_format not in ("b64_json", "url"):
        raise BadInputError(f"response_format must be b64_json or url, got '{echo(body.response_format)}'")
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
            raise BadInputError(
                f"message {position}: role '{echo(role)}' is not supported (use system, user, assistant)"
            )
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
                    raise BadInputError(f"message {position}: content part type '{echo(kind)}' is not supported")
            content = "\n".join(texts)
        if not isinstance(content, str):
            raise BadInputError(f"message {position}: content must be a string or a list of parts")
        messages.append({"role": role, "content": content})
    if len(images) > 1:
        raise BadInputError("send one image per conversation; the vision model looks at one image at a time")
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


def _is_size_number(text: str) -> bool:
    """Plain ASCII digits, at most 5 of them: str.isdigit() also takes "²" and "٣", which int() refuses."""
    return 0 < len(text) <= 5 and text.isascii() and text.isdigit()


def grammar_for(response_format: dict[str, Any] | None) -> str | None:
    if not response_format:
        return None
    kind = response_format.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return json_grammar(None)
    if kind == "json_schema":
        wrapper = response_format.get("json_schema")
        schema = wrapper.get("schema") if isinstance(wrapper, dict) else None
        if not isinstance(schema, dict):
            raise BadInputError('response_format.json_schema must be {"name": ..., "schema": {a JSON schema object}}')
        return json_grammar(schema)
    raise BadInputError(f"response_format type '{echo(kind)}' is not supported (text, json_object, json_schema)")


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


def sampling_overrides(body: ChatCompletionRequest) -> dict[str, Any]:
    """The request's sampling values for GenerationParams.override (None keeps the default)."""
    return {
        "temperature": body.temperature,
        "top_p": body.top_p,
        "max_tokens": body.max_completion_tokens or body.max_tokens,
        "seed": body.seed,
        "stop": body.stop,
    }
