"""The models folder as one archive to carry to an offline machine, or as parts of a chosen size
(for media with a file size limit), and back.

An archive is a plain tar (weights do not compress) holding the manifest first, then every file
it lists. Unpacking extracts into a hidden staging folder beside the models, checks every file's
SHA-256 against the archive's manifest, and only then moves files into place: a damaged archive
changes nothing, and a good file is never replaced by a bad one.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import tarfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from errors import BadInputError
from model_files.manifest import (
    MANIFEST_NAME,
    Progress,
    read_manifest,
    sha256_of,
    verify,
    write_manifest,
)

PART_SUFFIX = re.compile(r"\.(\d{3})$")


class _PartWriter(io.RawIOBase):
    """A write-only stream that fills ``DEST`` or, with a part size, ``DEST.001``, ``DEST.002`` …"""

    def __init__(self, dest: Path, part_bytes: int | None) -> None:
        self._dest, self._part_bytes = dest, part_bytes
        self.paths: list[Path] = []
        self._handle: io.BufferedWriter | None = None
        self._room = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        written = 0
        while written < len(view):
            if self._handle is None or (self._part_bytes and self._room == 0):
                self._next_part()
            assert self._handle is not None
            take = len(view) - written if not self._part_bytes else min(self._room, len(view) - written)
            self._handle.write(view[written : written + take])
            written += take
            self._room -= take
        return written

    def _next_part(self) -> None:
        if self._handle is not None:
            self._handle.close()
        path = (
            self._dest if not self._part_bytes else self._dest.with_name(f"{self._dest.name}.{len(self.paths) + 1:03d}")
        )
        self.paths.append(path)
        self._handle = path.open("wb")
        self._room = self._part_bytes or 0

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        super().close()


class _PartReader(io.RawIOBase):
    """The parts of an archive read as one stream."""

    def __init__(self, paths: list[Path]) -> None:
        self._paths = list(paths)
        self._handle: io.BufferedReader | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while True:
            if self._handle is None:
                if not self._paths:
                    return 0
                self._handle = self._paths.pop(0).open("rb")
            count = self._handle.readinto(buffer)
            if count:
                return count
            self._handle.close()
            self._handle = None

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
        super().close()


def archive_parts(archive: Path) -> list[Path]:
    """``ARCHIVE`` itself, or its parts ``ARCHIVE.001`` … (given as the archive or as its first part)."""
    if PART_SUFFIX.search(archive.name):
        archive = archive.with_name(PART_SUFFIX.sub("", archive.name))
    if archive.is_file():
        return [archive]
    parts = []
    while (part := archive.with_name(f"{archive.name}.{len(parts) + 1:03d}")).is_file():
        parts.append(part)
    if not parts:
        raise BadInputError(f"there is no archive {archive} (nor its parts {archive.name}.001 …)")
    return parts


def pack(folder: Path, dest: Path, part_bytes: int | None = None, progress: Progress | None = None) -> list[Path]:
    """The models folder and its manifest as one archive (or parts); checked against the manifest first."""
    manifest = read_manifest(folder)
    report = verify(folder, manifest)
    if not report.ok:
        raise BadInputError(
            "the models folder does not match its manifest, so it is not packed:\n  " + "\n  ".join(report.lines())
            + "\nFix the files, or write a new manifest with 'main.py models manifest' if they are right."
        )  # fmt: skip
    if part_bytes is not None and part_bytes < 2**20:
        raise BadInputError("a part must be at least 1 MB (e.g. --part-size 4000M for FAT32 media)")
    total = sum(entry["size"] for entry in manifest["files"].values())
    done = 0
    writer = _PartWriter(dest, part_bytes)
    try:
        with tarfile.open(fileobj=writer, mode="w|", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[arg-type]
            tar.add(folder / MANIFEST_NAME, arcname=MANIFEST_NAME)
            for name, entry in sorted(manifest["files"].items()):
                tar.add(folder / name, arcname=name, recursive=False)
                done += entry["size"]
                if progress is not None:
                    progress(done, total)
    except BaseException:
        writer.close()
        for path in writer.paths:
            path.unlink(missing_ok=True)
        raise
    writer.close()
    return writer.paths


@dataclass
class Unpacked:
    installed: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)


def _safe_member(member: tarfile.TarInfo) -> PurePosixPath:
    name = PurePosixPath(member.name)
    unsafe = name.is_absolute() or ".." in name.parts or any(part.startswith(".") for part in name.parts)
    if unsafe or not member.isfile():
        raise BadInputError(
            f"the archive holds '{member.name[:120]}', which is not a plain file inside the models folder; "
            "nothing was unpacked"
        )
    return name


def unpack(archive: Path, folder: Path, progress: Progress | None = None) -> Unpacked:
    """Extract into a staging folder, check every file, then move them into ``folder``."""
    parts = archive_parts(archive)
    folder.mkdir(parents=True, exist_ok=True)
    staging = folder / f".unpack-{uuid.uuid4().hex[:12]}"
    staging.mkdir()
    try:
        reader = _PartReader(parts)
        try:
            with tarfile.open(fileobj=reader, mode="r|") as tar:  # type: ignore[arg-type]
                for member in tar:
                    _safe_member(member)
                    tar.extract(member, staging, filter="data")
        except tarfile.TarError as error:
            raise BadInputError(f"the archive is damaged or incomplete ({error}); nothing was unpacked") from None
        finally:
            reader.close()
        manifest = read_manifest(staging)
        report = verify(staging, manifest, full=True, progress=progress)
        if not report.ok:
            raise BadInputError(
                "the archive's files do not match its manifest, so nothing was unpacked:\n  "
                + "\n  ".join(report.lines())
            )
        result = Unpacked()
        for name, entry in sorted(manifest["files"].items()):
            target = folder / name
            if target.is_file() and target.stat().st_size == entry["size"] and sha256_of(target) == entry["sha256"]:
                result.unchanged.append(name)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / name, target)  # the staged copy is checked: it replaces whatever was there
            result.installed.append(name)
        _merge_manifest(folder, manifest)
        return result
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _merge_manifest(folder: Path, unpacked: dict[str, Any]) -> None:
    try:
        current = read_manifest(folder)
    except BadInputError:  # none yet (or damaged): the archive's is the truth for its files
        current = {"files": {}}
    current["files"].update(unpacked["files"])
    current["created"] = unpacked.get("created", current.get("created"))
    write_manifest(folder, current)
