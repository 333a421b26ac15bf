"""Number fields that refuse a value out of range instead of changing it.

Gradio's sliders pull a typed 100 up to their minimum without a word, and a Number with
``minimum``/``maximum`` answers an out-of-range value with an error cover over the field.
These fields carry no bounds of their own: the bounds live here, every change is checked,
and the problem is shown beside the fields, naming the allowed range. A request is only
sent with every value in range.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import gradio as gr


def shown(number: float) -> str:
    """A number as typed: whole numbers in full (no 2.1e+09), others as short as they go."""
    whole = math.isfinite(number) and number == int(number) and abs(number) < 1e18
    return str(int(number)) if whole else f"{number:g}"


@dataclass(frozen=True)
class Bounds:
    label: str
    low: float
    high: float
    integer: bool = False
    multiple_of: int | None = None
    special: float | None = None  # a value allowed besides the range, e.g. -1 for "random seed"

    @property
    def allowed(self) -> str:
        span = f"{shown(self.low)}–{shown(self.high)}"
        if self.multiple_of:
            span += f", a multiple of {self.multiple_of}"
        elif self.integer:
            span += ", a whole number"
        if self.special is not None:
            span += f", or {shown(self.special)}"
        return span

    def problem(self, value: Any) -> str | None:
        """None when ``value`` may be used as it is; else what is wrong and what is allowed."""
        if value is None or value == "":
            return f"{self.label} is empty; enter {self.allowed}."
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = math.nan
        if not math.isfinite(number):
            return f"{self.label} must be a number: {self.allowed}."
        if self.special is not None and number == self.special:
            return None
        fits = self.low <= number <= self.high
        whole = not (self.integer or self.multiple_of) or number == int(number)
        multiple = not self.multiple_of or (whole and int(number) % self.multiple_of == 0)
        if fits and whole and multiple:
            return None
        return f"{self.label} {shown(number)} is not used: allowed is {self.allowed}."


def number_field(bounds: Bounds, value: float, **kwargs: Any) -> gr.Number:
    """A field for ``bounds`` without Gradio's own bounds (see the module's note)."""
    step = bounds.multiple_of or (1 if bounds.integer else None)
    return gr.Number(
        value=value,
        label=bounds.label,
        info=bounds.allowed,
        precision=0 if bounds.integer or bounds.multiple_of else None,
        step=step or 0.05,
        **kwargs,
    )


def problems(checked: Sequence[tuple[Bounds, Any]]) -> list[str]:
    return [p for bounds, value in checked if (p := bounds.problem(value)) is not None]


def problems_text(found: Sequence[str]) -> str:
    return "\n".join(f"⚠️ {p}" for p in found)


def watch_fields(fields: Sequence[tuple[Bounds, gr.Number]], message: gr.Markdown) -> None:
    """Check every field whenever one changes; show what is wrong in ``message`` beside them."""
    components = [component for _, component in fields]

    def check(*values: Any) -> Any:
        found = problems([(bounds, value) for (bounds, _), value in zip(fields, values, strict=True)])
        return gr.update(value=problems_text(found), visible=bool(found))

    for component in components:
        component.change(check, components, message, show_progress="hidden", api_visibility="private", queue=False)
