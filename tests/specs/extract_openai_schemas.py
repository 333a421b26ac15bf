"""Extract the component schemas the API tests validate against from OpenAI's
published OpenAPI description (MIT licence, see openai-openapi.LICENSE beside this file).

Usage: python tests/specs/extract_openai_schemas.py PATH/TO/openai-openapi.json
Writes tests/specs/openai-schemas.json: the named schemas and everything they reference.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ROOTS = [
    "CreateChatCompletionResponse",
    "CreateChatCompletionStreamResponse",
    "ImagesResponse",
    "ListModelsResponse",
    "CreateTranscriptionResponseJson",
    "CreateTranscriptionResponseVerboseJson",
    "CreateTranslationResponseJson",
    "ErrorResponse",
]


def references(node: Any) -> set[str]:
    found: set[str] = set()
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/components/schemas/"):
            found.add(ref.rsplit("/", 1)[1])
        for value in node.values():
            found |= references(value)
    elif isinstance(node, list):
        for value in node:
            found |= references(value)
    return found


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text(encoding="utf-8"))
    schemas = spec["components"]["schemas"]
    wanted, pending = set(), list(ROOTS)
    while pending:
        name = pending.pop()
        if name not in wanted:
            wanted.add(name)
            pending.extend(references(schemas[name]) - wanted)
    out = {
        "info": {"source": "openai-openapi.json", "version": spec["info"]["version"]},
        "components": {"schemas": {name: schemas[name] for name in sorted(wanted)}},
    }
    target = Path(__file__).with_name("openai-schemas.json")
    target.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    print(f"wrote {len(wanted)} schemas to {target}")


if __name__ == "__main__":
    main()
