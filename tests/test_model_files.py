"""The models folder's manifest, verify, and pack/unpack for carrying it to an offline machine."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from errors import BadInputError
from model_files.archive import archive_parts, pack, unpack
from model_files.manifest import MANIFEST_NAME, build_manifest, read_manifest, verify, write_manifest
from tests.conftest import ROOT, write_config

MB = 2**20


def fill(folder: Path) -> dict[str, bytes]:
    """A small models folder: a GGUF, a diffusers folder with a nested file, a LoRA."""
    files = {
        "chat.gguf": os.urandom(int(1.5 * MB)),
        "sd/unet/diffusion_pytorch_model.safetensors": os.urandom(MB + 123),
        "sd/model_index.json": b'{"_class_name": "StableDiffusionPipeline"}',
        "lora/style.safetensors": os.urandom(300_000),
    }
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    write_manifest(folder, build_manifest(folder, {"chat.gguf": ("someone/chat-GGUF", "abc123")}))
    return files


def flip_a_byte(path: Path, at: int = 1000) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture
def models(tmp_path: Path) -> Path:
    folder = tmp_path / "models"
    folder.mkdir()
    fill(folder)
    return folder


def test_the_manifest_lists_every_file_with_size_and_sha256(models: Path) -> None:
    import hashlib

    manifest = read_manifest(models)
    assert set(manifest["files"]) == {
        "chat.gguf",
        "sd/unet/diffusion_pytorch_model.safetensors",
        "sd/model_index.json",
        "lora/style.safetensors",
    }
    entry = manifest["files"]["chat.gguf"]
    data = (models / "chat.gguf").read_bytes()
    assert entry == {
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "source": "someone/chat-GGUF",
        "revision": "abc123",
    }
    assert verify(models, manifest, full=True).ok


def test_verify_finds_a_flipped_byte_a_truncated_file_a_missing_and_an_extra_one(models: Path) -> None:
    manifest = read_manifest(models)
    flip_a_byte(models / "chat.gguf")
    assert verify(models, manifest).ok, "a flipped byte keeps the size: only --full sees it"
    full = verify(models, manifest, full=True)
    assert full.altered == [("chat.gguf", "its SHA-256 differs from the manifest's")]
    unet = models / "sd/unet/diffusion_pytorch_model.safetensors"
    unet.write_bytes(unet.read_bytes()[:1000])  # a copy that stopped early
    (models / "lora/style.safetensors").unlink()
    (models / "stray.bin").write_bytes(b"x")
    report = verify(models, manifest)
    assert report.missing == ["lora/style.safetensors"]
    assert report.altered == [
        ("sd/unet/diffusion_pytorch_model.safetensors", f"1,000 bytes, the manifest says {MB + 123:,}")
    ]
    assert report.extra == ["stray.bin"] and not report.ok


def test_pack_and_unpack_in_parts_round_trip(models: Path, tmp_path: Path) -> None:
    files = {p.relative_to(models).as_posix(): p.read_bytes() for p in models.rglob("*") if p.is_file()}
    (tmp_path / "carry").mkdir()
    parts = pack(models, tmp_path / "carry" / "models.tar", part_bytes=MB)
    assert len(parts) >= 3 and all(p.stat().st_size <= MB for p in parts)
    assert archive_parts(parts[0]) == parts
    target = tmp_path / "offline" / "models"
    result = unpack(parts[0], target)
    assert sorted(result.installed) == sorted(name for name in files if name != MANIFEST_NAME)
    for name, data in files.items():
        assert (target / name).read_bytes() == data or name == MANIFEST_NAME
    assert verify(target, read_manifest(target), full=True).ok
    assert not [p for p in target.iterdir() if p.name.startswith(".unpack")], "no staging folder is left"
    again = unpack(parts[0], target)  # a second time: everything is already in place
    assert again.installed == [] and len(again.unchanged) == 4


def test_a_damaged_archive_changes_nothing_and_never_replaces_a_good_file(models: Path, tmp_path: Path) -> None:
    archive = tmp_path / "models.tar"
    pack(models, archive)
    target = tmp_path / "offline"
    target.mkdir()
    good = (models / "chat.gguf").read_bytes()
    (target / "chat.gguf").write_bytes(good)
    # Flip a byte inside the GGUF's data in the archive (the header and manifest stay readable).
    data = bytearray(archive.read_bytes())
    data[data.index(good[:64]) + 5000] ^= 0x01
    archive.write_bytes(bytes(data))
    with pytest.raises(BadInputError, match=r"(?s)do not match its manifest.*altered  chat\.gguf"):
        unpack(archive, target)
    assert (target / "chat.gguf").read_bytes() == good, "the good file stayed"
    assert sorted(p.name for p in target.iterdir()) == ["chat.gguf"], "nothing else was put in place"


def test_a_truncated_archive_is_refused(models: Path, tmp_path: Path) -> None:
    archive = tmp_path / "models.tar"
    pack(models, archive)
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(BadInputError, match=r"damaged or incomplete|do not match"):
        unpack(archive, tmp_path / "offline")
    assert not (tmp_path / "offline" / "chat.gguf").exists()


@pytest.mark.parametrize("name", ["../escaped.bin", "/tmp/absolute.bin", ".hidden/x.bin"])
def test_an_archive_naming_a_path_outside_is_refused(tmp_path: Path, name: str) -> None:
    archive = tmp_path / "evil.tar"
    with tarfile.open(archive, "w") as tar:
        info = tarfile.TarInfo(name)
        info.size = 3
        tar.addfile(info, io.BytesIO(b"bad"))
    target = tmp_path / "deep" / "models"
    with pytest.raises(BadInputError, match="not a plain file inside the models folder"):
        unpack(archive, target)
    assert not (tmp_path / "deep" / "escaped.bin").exists() and not Path("/tmp/absolute.bin").exists()


def test_a_folder_that_does_not_match_its_manifest_is_not_packed(models: Path, tmp_path: Path) -> None:
    (models / "lora/style.safetensors").unlink()
    with pytest.raises(BadInputError, match=r"missing  lora/style\.safetensors"):
        pack(models, tmp_path / "models.tar")
    assert not (tmp_path / "models.tar").exists()


def test_the_cli_writes_checks_packs_and_unpacks(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    models = tmp_path / "models"
    fill(models)
    (models / MANIFEST_NAME).unlink()

    def run(*words: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, str(ROOT / "main.py"), "--config", str(config), "models", *words],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )

    missing = run("verify")
    assert missing.returncode == 1 and missing.stderr.startswith("error: there is no manifest.json")
    assert run("manifest").returncode == 0
    assert run("verify", "--full").stdout.strip().endswith("4 files match the manifest (sizes and SHA-256)")
    flip_a_byte(models / "chat.gguf")
    broken = run("verify", "--full")
    assert broken.returncode == 1 and "altered  chat.gguf (its SHA-256 differs" in broken.stdout
    flip_a_byte(models / "chat.gguf")  # flipped back
    packed = run("pack", str(tmp_path / "carry.tar"), "--part-size", "1M")
    assert packed.returncode == 0, packed.stderr
    assert packed.stdout.split() == [
        str(tmp_path / f"carry.tar.{n:03d}") for n in range(1, len(packed.stdout.split()) + 1)
    ]
    other = tmp_path / "other"
    other.mkdir()
    other_config = write_config(other)
    unpacked = subprocess.run(
        [sys.executable, str(ROOT / "main.py"), "--config", str(other_config), "models", "unpack",
         str(tmp_path / "carry.tar.001")],
        capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert unpacked.returncode == 0, unpacked.stderr
    assert "installed 4 files, 0 already in place" in unpacked.stdout
    assert (other / "models" / "chat.gguf").read_bytes() == (models / "chat.gguf").read_bytes()
    assert run("pack", str(tmp_path / "x.tar"), "--part-size", "lots").stderr.startswith("error: 'lots' is not a size")
