"""Grammars that constrain a text model's output (llama.cpp GBNF), e.g. to JSON matching a schema."""

from __future__ import annotations

import json
from typing import Any

from errors import BadInputError


def json_grammar(schema: dict[str, Any] | None) -> str:
    """A GBNF grammar for JSON output: any JSON object, or one matching ``schema``."""
    from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

    if schema is None:
        return JSON_GBNF
    try:
        return json_schema_to_gbnf(json.dumps(schema))
    except Exception as error:
        raise BadInputError(f"the JSON schema cannot be turned into a grammar: {error}") from None


def compile_grammar(grammar: str) -> Any:
    from llama_cpp import LlamaGrammar

    try:
        return LlamaGrammar.from_string(grammar, verbose=False)
    except Exception as error:
        raise BadInputError(f"the output grammar is not valid GBNF: {error}") from None
