"""Model files and the page cache: dropping them from it for a cold read, reading them into it,
and the read bandwidth either way (the floor a model load is compared with)."""

from __future__ import annotations

import os
import time
from pathlib import Path


def files_of(path: Path) -> list[Path]:
    return [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]


def size_of(path: Path) -> int:
    return sum(f.stat().st_size for f in files_of(path))


def flush_to_disk(path: Path) -> None:
    """fsync every file: only clean pages can be dropped from the page cache for a cold read."""
    for file in files_of(path):
        with file.open("rb+") as handle:
            os.fsync(handle.fileno())


def drop_from_page_cache(path: Path) -> None:
    for file in files_of(path):
        with file.open("rb") as handle:
            os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def read_all(path: Path) -> int:
    total = 0
    for file in files_of(path):
        with file.open("rb", buffering=0) as handle:
            while chunk := handle.read(16 << 20):
                total += len(chunk)
    return total


def read_bandwidth(path: Path, cold: bool) -> float:
    """Bytes per second reading ``path``'s files, from disk (cold) or from the page cache."""
    if cold:
        drop_from_page_cache(path)
    else:
        read_all(path)
    started = time.perf_counter()
    size = read_all(path)
    return size / (time.perf_counter() - started)
