"""One benchmark figure beside the raw library's, and its target: what each benchmark script
writes with ``--json FILE`` and ``bench/run.py`` gathers into one table."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class Row:
    name: str  # what was measured, and on what
    unit: str
    raw: float | None  # the raw library doing the same work in the same run (None: no raw side)
    app: float | None
    higher_is_better: bool = True
    # The target, on the ratio app / raw (or, without a raw side, on the app's figure); None: reported only.
    minimum: float | None = None
    maximum: float | None = None

    @property
    def ratio(self) -> float | None:
        if self.raw is None or self.app is None or self.raw == 0:
            return None
        return self.app / self.raw

    @property
    def judged(self) -> float | None:
        return self.ratio if self.raw is not None else self.app

    @property
    def target(self) -> str:
        what = "ratio" if self.raw is not None else self.unit
        if self.minimum is not None:
            return f"{what} >= {self.minimum:g}"
        if self.maximum is not None:
            return f"{what} <= {self.maximum:g}"
        return ""

    @property
    def passed(self) -> bool | None:
        """True or False against the target; None when there is none."""
        if self.minimum is None and self.maximum is None:
            return None
        value = self.judged
        if value is None:
            return False
        return (self.minimum is None or value >= self.minimum) and (self.maximum is None or value <= self.maximum)


def write_rows(path: Path | None, rows: list[Row]) -> None:
    if path is not None:
        path.write_text(json.dumps([asdict(row) for row in rows], indent=1), encoding="utf-8")


def read_rows(path: Path) -> list[Row]:
    return [Row(**entry) for entry in json.loads(path.read_text(encoding="utf-8"))]
