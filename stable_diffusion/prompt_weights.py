"""AUTOMATIC1111's prompt syntax, and prompts longer than CLIP's 77 tokens.

``(word)`` multiplies the attention paid to it by 1.1, ``[word]`` divides it by 1.1 (both nest),
``(word:1.3)`` sets the factor, ``\\(`` and ``\\)`` are literal brackets, and ``BREAK`` starts a new
75-token chunk. ``parse`` turns a prompt into chunks of (text, weight) fragments. ``encode`` turns
them into the text embeddings a diffusers pipeline takes, through compel's embeddings providers
(made for this: weighting, and long prompts split into 75-token chunks); the Stable Diffusion 1.5
and SDXL text encoders both, with SDXL's pooled embedding.
"""

from __future__ import annotations

import re
from typing import Any

from errors import BadInputError

Fragment = tuple[str, float]
BREAK = re.compile(r"\s*\bBREAK\b\s*")
# One token of the syntax: an escape, a bracket, a closing ":weight)", or plain text. The weight's
# pieces ([+-]?, digits, spaces) are different characters, so matching never backtracks far.
TOKEN = re.compile(r"\\[()\[\]\\]|\\|\(|\[|:\s*([+-]?[\d.]+)\s*\)|\)|\]|[^\\()\[\]:]+|:")
ROUND, SQUARE = 1.1, 1 / 1.1
MAX_WEIGHT = 10.0
MAX_CHUNKS = 12  # 900 tokens of prompt: far beyond any real one, and a bound on the encoder's work


def parse(prompt: str) -> list[list[Fragment]]:
    """Chunks (split at BREAK) of fragments with their weights; neighbours of one weight merged."""
    pieces: list[list[Any]] = []  # [text, weight]; a BREAK is [None, 0]
    opened: list[tuple[str, int]] = []  # ("(" or "[", where its text starts in pieces)

    def scale(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= factor

    def close(kind: str, factor: float) -> bool:
        for position in range(len(opened) - 1, -1, -1):
            if opened[position][0] == kind:
                scale(opened.pop(position)[1], factor)
                return True
        return False

    for match in TOKEN.finditer(prompt):
        text, weight = match.group(0), match.group(1)
        if text.startswith("\\") and len(text) == 2:
            pieces.append([text[1], 1.0])
        elif text in ("(", "["):
            opened.append((text, len(pieces)))
        elif weight is not None and any(kind == "(" for kind, _ in opened):
            factor = _number(weight)
            if factor is None:  # "(word:1.2.3)": the odd number is text, the bracket still emphasises
                pieces.append([text[:-1], 1.0])
            close("(", ROUND if factor is None else factor)
        elif (text == ")" and close("(", ROUND)) or (text == "]" and close("[", SQUARE)):
            continue
        else:
            for number, part in enumerate(BREAK.split(text)):
                if number:
                    pieces.append([None, 0.0])
                pieces.append([part, 1.0])
    for kind, start in opened:  # brackets left open weigh what follows them, as in AUTOMATIC1111
        scale(start, ROUND if kind == "(" else SQUARE)
    chunks: list[list[Fragment]] = [[]]
    for text, weight in pieces:
        if text is None:
            chunks.append([])
        elif text:
            chunk = chunks[-1]
            if chunk and abs(chunk[-1][1] - weight) < 1e-9:
                chunk[-1] = (chunk[-1][0] + text, weight)
            else:
                chunk.append((text, weight))
    return [chunk for chunk in chunks if any(text.strip() for text, _ in chunk)] or [[("", 1.0)]]


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def plain_text(chunks: list[list[Fragment]]) -> str:
    return " ".join("".join(text for text, _ in chunk) for chunk in chunks)


def check_weights(chunks: list[list[Fragment]]) -> None:
    """Weights far outside what anyone means would turn the embeddings into infinities (a black image)."""
    for chunk in chunks:
        for text, weight in chunk:
            if not -MAX_WEIGHT <= weight <= MAX_WEIGHT:
                raise BadInputError(
                    f"the weight {weight:g} on '{text.strip()[:40]}' is out of range; use weights from "
                    f"-{MAX_WEIGHT:g} to {MAX_WEIGHT:g}, e.g. (word:1.3)"
                )


def needs_encoding(chunks: list[list[Fragment]], tokens: int) -> bool:
    """Whether the plain pipeline would get it wrong: weights, BREAK, or more than 75 tokens."""
    weighted = any(abs(weight - 1.0) > 1e-9 for chunk in chunks for _, weight in chunk)
    return weighted or len(chunks) > 1 or tokens > 75


def encode(pipe: Any, family: str, prompt: str, negative: str, device: str) -> dict[str, Any]:
    """The pipeline's prompt_embeds (and SDXL's pooled embeddings) for a prompt and a negative prompt."""
    import torch
    from compel import Compel, ReturnedEmbeddingsType

    if family == "sd15":
        compel = Compel(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, truncate_long_prompts=False,
                        device=device)  # fmt: skip
    else:
        compel = Compel(
            tokenizer=[pipe.tokenizer, pipe.tokenizer_2],
            text_encoder=[pipe.text_encoder, pipe.text_encoder_2],
            returned_embeddings_type=ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED,
            requires_pooled=[False, True],
            truncate_long_prompts=False,
            device=device,
        )
    provider = compel.conditioning_provider

    def embeddings(text: str) -> Any:
        chunks = parse(text)[:MAX_CHUNKS]
        with torch.no_grad():
            parts = [
                provider.get_embeddings_for_weighted_prompt_fragments(
                    [[fragment for fragment, _ in chunk]], [[weight for _, weight in chunk]], device=device
                )
                for chunk in chunks
            ]
        return torch.cat(parts, dim=1), plain_text(chunks)

    positive, positive_text = embeddings(prompt)
    negative_embeds, negative_text = embeddings(negative)
    # Guidance compares the two token by token: the shorter gets empty chunks until they match.
    empty, _ = embeddings("")
    while positive.shape[1] < negative_embeds.shape[1]:
        positive = torch.cat([positive, empty[:, : negative_embeds.shape[1] - positive.shape[1]]], dim=1)
    while negative_embeds.shape[1] < positive.shape[1]:
        negative_embeds = torch.cat([negative_embeds, empty[:, : positive.shape[1] - negative_embeds.shape[1]]], dim=1)
    found: dict[str, Any] = {"prompt_embeds": positive, "negative_prompt_embeds": negative_embeds}
    if family != "sd15":
        with torch.no_grad():
            found["pooled_prompt_embeds"] = provider.get_pooled_embeddings([positive_text], device=device)
            found["negative_pooled_prompt_embeds"] = provider.get_pooled_embeddings([negative_text], device=device)
    return found
