"""The benchmark table's verdicts (bench/rows.py, bench/run.py): a figure passes or misses its
target on the ratio to the raw library, lower-is-better figures included, and the runner's table
says so. The benchmarks themselves are timing runs, not tests: `make bench`."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from rows import Row, read_rows, write_rows
from run import table


def test_a_throughput_ratio_passes_at_its_minimum_and_misses_below() -> None:
    assert Row("chat", "tokens/s", 100.0, 97.0, minimum=0.97).passed is True
    assert Row("chat", "tokens/s", 100.0, 96.9, minimum=0.97).passed is False
    assert Row("chat", "tokens/s", 100.0, None, minimum=0.97).passed is False, "no figure is a miss"


def test_a_time_ratio_passes_at_its_maximum_and_misses_above() -> None:
    assert Row("image", "s", 0.200, 0.204, False, maximum=1.02).passed is True
    assert Row("image", "s", 0.200, 0.205, False, maximum=1.02).passed is False
    assert Row("load", "s", 0.2, 0.5, False).passed is None, "no target: reported only"
    assert Row("same", "same", None, 1.0, minimum=1).passed is True
    assert Row("same", "same", None, 0.0, minimum=1).passed is False


def test_rows_round_trip_and_the_table_shows_each_verdict(tmp_path: Path) -> None:
    rows = [
        Row("vision tokens/s", "tokens/s", 242.2, 237.7, minimum=0.97),
        Row("API streaming", "tokens/s", 100.0, 90.0, minimum=0.97),
        Row("swap: chat warm load", "s", 0.02, 0.1, False),
    ]
    write_rows(tmp_path / "rows.json", rows)
    assert read_rows(tmp_path / "rows.json") == rows
    lines = table(rows).splitlines()
    assert lines[2].endswith("PASS") and "0.981" in lines[2] and "ratio >= 0.97" in lines[2]
    assert lines[3].endswith("MISS") and lines[4].endswith("(reported)")
