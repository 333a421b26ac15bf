"""Turning any turn sequence into one every chat template accepts.

Chat templates differ: some (Mistral-Instruct v0.2, Gemma) raise on a system turn, on two
turns of one role in a row, or on a conversation that opens with the assistant; others drop
a system turn without a word. The front ends produce all of these (an image-only turn leaves
an empty user turn, a dropped route note leaves two user turns in a row, an API client sends
what it likes), so every conversation goes through ``normalise`` once before a template
renders it: the result alternates user/assistant, starts with the user, and keeps the
system prompt, as a system turn where the template has one, else at the head of the
first user turn.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from text_generation.stream import Message

SYSTEM_ROLES = ("system", "developer")
TURN_SEPARATOR = "\n\n"
SYSTEM_PROBE = "system-role-probe-5d1c"


def normalise(system: str | None, turns: Sequence[Message], *, system_role: bool) -> list[Message]:
    """``turns`` as alternating user/assistant turns that start with the user (and end with the
    user when the last of ``turns`` is a user turn, even an empty one).

    System (or developer) turns anywhere in ``turns`` join ``system``, in order. Blank turns
    go, neighbouring turns of one role merge, leading assistant turns go. The system prompt
    becomes the first message when ``system_role``, else the head of the first user turn.
    """
    system_text, dialogue = _split_system(system, turns)
    normalised = _drop_leading_assistant(_merge_neighbours(_drop_empty(dialogue)))
    user_spoke_last = bool(dialogue) and dialogue[-1]["role"] == "user"
    if user_spoke_last and (not normalised or normalised[-1]["role"] != "user"):
        normalised.append({"role": "user", "content": dialogue[-1]["content"]})  # an empty last turn stays last
    if not system_text:
        return normalised
    if system_role:
        return [{"role": "system", "content": system_text}, *normalised]
    if not normalised:
        return [{"role": "user", "content": system_text}]
    return [_prefix(normalised[0], system_text), *normalised[1:]]


def accepts_system_role(render: Callable[[list[Message]], str]) -> bool:
    """Whether a template renders a system turn: some raise on one, others drop it silently."""
    try:
        prompt = render([{"role": "system", "content": SYSTEM_PROBE}, {"role": "user", "content": "hello"}])
    except Exception:  # a template refuses a system turn by raising whatever it raises
        return False
    return SYSTEM_PROBE in prompt


def _split_system(system: str | None, turns: Sequence[Message]) -> tuple[str, list[Message]]:
    """The system texts joined (``system`` first), and the user and assistant turns."""
    texts = [system] if system and system.strip() else []
    dialogue: list[Message] = []
    for turn in turns:
        if turn["role"] in SYSTEM_ROLES:
            if turn["content"].strip():
                texts.append(turn["content"])
        else:
            dialogue.append({"role": turn["role"], "content": turn["content"]})
    return TURN_SEPARATOR.join(texts), dialogue


def _drop_empty(turns: list[Message]) -> list[Message]:
    return [turn for turn in turns if turn["content"].strip()]


def _merge_neighbours(turns: list[Message]) -> list[Message]:
    merged: list[Message] = []
    for turn in turns:
        if merged and merged[-1]["role"] == turn["role"]:
            merged[-1] = {"role": turn["role"], "content": merged[-1]["content"] + TURN_SEPARATOR + turn["content"]}
        else:
            merged.append(dict(turn))
    return merged


def _drop_leading_assistant(turns: list[Message]) -> list[Message]:
    start = next((index for index, turn in enumerate(turns) if turn["role"] == "user"), len(turns))
    return turns[start:]


def _prefix(turn: Message, system_text: str) -> Message:
    content = f"{system_text}{TURN_SEPARATOR}{turn['content']}" if turn["content"].strip() else system_text
    return {"role": turn["role"], "content": content}
