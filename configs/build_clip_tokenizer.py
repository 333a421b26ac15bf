"""Write the CLIP BPE tokenizer files that the shipped config folders need.

CLIP's vocabulary is not stored anywhere in this repository's dependencies as
vocab.json/merges.txt, but the merges it is built from ship inside the
open_clip_torch wheel on PyPI (``open_clip/bpe_simple_vocab_16e6.txt.gz``).
The vocabulary follows from them exactly as OpenAI's ``simple_tokenizer.py``
builds it: the 256 byte characters, the same with ``</w>``, the first 48,894
merges joined, then ``<|startoftext|>`` and ``<|endoftext|>`` (49,408 tokens).

Usage:
    python configs/build_clip_tokenizer.py [--source FILE]

FILE is ``bpe_simple_vocab_16e6.txt.gz`` or an open_clip_torch wheel; without it,
``pip download --no-deps open_clip_torch`` fetches the wheel into a temporary folder.
It writes configs/sd15/tokenizer/ and links configs/sdxl/tokenizer{,_2}/ to the same
vocabulary (SDXL's second tokenizer only pads with "!" instead of "<|endoftext|>").
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

CONFIGS = Path(__file__).resolve().parent
BPE_IN_WHEEL = "open_clip/bpe_simple_vocab_16e6.txt.gz"
CLIP_MERGES = 49152 - 256 - 2  # the merges CLIP uses, as in OpenAI's simple_tokenizer.py
START, END = "<|startoftext|>", "<|endoftext|>"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (CLIP uses the same)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(code) for code in codes), strict=True))


def clip_vocab(merges: Sequence[tuple[str, str]]) -> list[str]:
    """The tokens in id order: byte characters, the same ending a word, the merges, start and end."""
    characters = list(bytes_to_unicode().values())
    return [*characters, *(c + "</w>" for c in characters), *("".join(m) for m in merges), START, END]


def write_clip_tokenizer(
    folder: Path,
    merges: Sequence[tuple[str, str]],
    *,
    pad_token: str = END,
    link_vocabulary_to: Path | None = None,
) -> None:
    """A CLIPTokenizer folder: vocab.json, merges.txt and the token settings.

    With ``link_vocabulary_to`` (a folder already written), vocab.json and merges.txt
    are relative links to its files instead of copies.
    """
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("vocab.json", "merges.txt"):
        (folder / name).unlink(missing_ok=True)
    if link_vocabulary_to is None:
        vocab = {token: index for index, token in enumerate(clip_vocab(merges))}
        text = json.dumps(vocab, ensure_ascii=False, separators=(",", ":"))
        (folder / "vocab.json").write_text(text + "\n", encoding="utf-8")
        lines = ["#version: 0.2", *(f"{a} {b}" for a, b in merges)]
        (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    else:
        for name in ("vocab.json", "merges.txt"):
            (folder / name).symlink_to(os.path.relpath(link_vocabulary_to / name, folder))
    special = {"bos_token": START, "eos_token": END, "unk_token": END, "pad_token": pad_token}
    settings = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "do_lower_case": True,
        "add_prefix_space": False,
        "errors": "replace",
        **special,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")


def read_clip_merges(source: Path) -> list[tuple[str, str]]:
    """CLIP's merges from the gzip file, or from the open_clip_torch wheel holding it."""
    if source.suffix == ".whl":
        with zipfile.ZipFile(source) as wheel:
            data = gzip.decompress(wheel.read(BPE_IN_WHEEL))
    else:
        data = gzip.decompress(source.read_bytes())
    lines = data.decode("utf-8").split("\n")[1 : CLIP_MERGES + 1]  # the first line is a version header
    merges = [tuple(line.split()) for line in lines]
    if len(merges) != CLIP_MERGES or any(len(m) != 2 for m in merges):
        raise SystemExit(f"{source} does not hold CLIP's {CLIP_MERGES} BPE merges")
    return merges  # type: ignore[return-value]


def download_wheel(folder: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "open_clip_torch", "-d", str(folder)]
    subprocess.run(command, check=True)
    return next(folder.glob("open_clip_torch-*.whl"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, help="bpe_simple_vocab_16e6.txt.gz or an open_clip_torch wheel")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        merges = read_clip_merges(args.source or download_wheel(Path(scratch)))
    sd15 = CONFIGS / "sd15" / "tokenizer"
    write_clip_tokenizer(sd15, merges)
    write_clip_tokenizer(CONFIGS / "sdxl" / "tokenizer", merges, link_vocabulary_to=sd15)
    write_clip_tokenizer(CONFIGS / "sdxl" / "tokenizer_2", merges, pad_token="!", link_vocabulary_to=sd15)
    print(f"wrote {len(clip_vocab(merges))} tokens to {sd15} (linked from configs/sdxl)")


if __name__ == "__main__":
    main()
