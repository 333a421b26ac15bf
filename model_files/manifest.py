"""The models folder's manifest: every file with its size and SHA-256 (and where it came from), so
a folder carried to an offline machine can be checked to be complete and untouched.

``models/manifest.json`` holds ``{"files": {"<path relative to the folder>": {"size", "sha256",
"source", "revision"}}}``. Paths use forward slashes; files being written (``*.part``), the
manifest itself and hidden working folders are not part of it.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from errors import BadInputError

MANIFEST_NAME = "manifest.json"
CHUNK = 4 * 2**20
Progress = Callable[[int, int], None]  # (bytes done, bytes in all)


def model_files(folder: Path) -> Iterator[Path]:
    """Every file the manifest covers, in a stable order."""
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if any(part.startswith(".") for part in relative.parts):
            continue  # hidden: a staging folder, editor files
        if path.is_file() and not path.is_symlink() and path.name != MANIFEST_NAME and path.suffix != ".part":
            yield path


def relative_name(path: Path, folder: Path) -> str:
    return path.relative_to(folder).as_posix()


def sha256_of(path: Path, progress: Progress | None = None, done: int = 0, total: int = 0) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
            done += len(chunk)
            if progress is not None:
                progress(done, total)
    return digest.hexdigest()


def build_manifest(
    folder: Path, sources: dict[str, tuple[str, str]] | None = None, progress: Progress | None = None
) -> dict[str, Any]:
    """Sizes and hashes of every file under ``folder``; ``sources`` maps a file to (repository, revision)."""
    files = list(model_files(folder))
    total = sum(path.stat().st_size for path in files)
    done = 0
    entries: dict[str, dict[str, Any]] = {}
    for path in files:
        name = relative_name(path, folder)
        size = path.stat().st_size
        source, revision = (sources or {}).get(name, (None, None))
        entries[name] = {"size": size, "sha256": sha256_of(path, progress, done, total), "source": source,
                         "revision": revision}  # fmt: skip
        done += size
    return {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "files": entries}


def write_manifest(folder: Path, manifest: dict[str, Any]) -> Path:
    """Written beside the models, atomically: a manifest that exists is whole."""
    target = folder / MANIFEST_NAME
    partial = target.with_name(target.name + ".part")
    partial.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(partial, target)
    return target


def read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise BadInputError(
            f"there is no {MANIFEST_NAME} in {folder}; write one where the files are known to be good "
            "with 'main.py models manifest' (downloads write it themselves)"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        files = manifest["files"]
        for name, entry in files.items():
            if not isinstance(name, str) or not isinstance(entry["size"], int) or len(entry["sha256"]) != 64:
                raise ValueError(name)
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise BadInputError(f"{path} is damaged ({error}); write it again with 'main.py models manifest'") from None
    return manifest


@dataclass
class Report:
    """What differs between a folder and its manifest."""

    missing: list[str] = field(default_factory=list)
    altered: list[tuple[str, str]] = field(default_factory=list)  # (file, how)
    extra: list[str] = field(default_factory=list)
    checked: int = 0

    @property
    def ok(self) -> bool:
        return not (self.missing or self.altered or self.extra)

    def lines(self) -> list[str]:
        return (
            [f"missing  {name}" for name in self.missing]
            + [f"altered  {name} ({how})" for name, how in self.altered]
            + [f"extra    {name} (not in the manifest)" for name in self.extra]
        )


def verify(folder: Path, manifest: dict[str, Any], full: bool = False, progress: Progress | None = None) -> Report:
    """Sizes always; SHA-256 too with ``full`` (reads every byte)."""
    report = Report()
    files: dict[str, dict[str, Any]] = manifest["files"]
    present = {relative_name(path, folder): path for path in model_files(folder)}
    total = sum(entry["size"] for name, entry in files.items() if name in present) if full else 0
    done = 0
    for name, entry in sorted(files.items()):
        path = present.get(name)
        if path is None:
            report.missing.append(name)
            continue
        report.checked += 1
        size = path.stat().st_size
        if size != entry["size"]:
            report.altered.append((name, f"{size:,} bytes, the manifest says {entry['size']:,}"))
            continue
        if full:
            if sha256_of(path, progress, done, total) != entry["sha256"]:
                report.altered.append((name, "its SHA-256 differs from the manifest's"))
            done += size
    report.extra = sorted(set(present) - set(files))
    return report
