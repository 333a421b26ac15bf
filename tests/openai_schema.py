"""Validate our responses against OpenAI's published component schemas."""

from __future__ import annotations

import copy
import json
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema

SCHEMAS = Path(__file__).parent / "specs" / "openai-schemas.json"


def _allow_null(node: Any) -> Any:
    """OpenAPI 3.0's `nullable: true` means "or null" in JSON Schema."""
    if isinstance(node, list):
        return [_allow_null(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: _allow_null(value) for key, value in node.items()}
    if node.pop("nullable", False):
        return {"anyOf": [node, {"type": "null"}]}
    return node


@cache
def _document() -> dict[str, Any]:
    return _allow_null(json.loads(SCHEMAS.read_text(encoding="utf-8")))


def validate(instance: Any, schema_name: str) -> None:
    """Raise jsonschema.ValidationError when ``instance`` does not fit the named schema."""
    document = copy.copy(_document())
    schema = {"$ref": f"#/components/schemas/{schema_name}", "components": document["components"]}
    jsonschema.validate(instance, schema, cls=jsonschema.Draft202012Validator)
