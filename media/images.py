"""Turn what a user hands us (a path, bytes, a data: URI, a PIL image) into a safe RGB image.

The size is read from the header and checked before any pixel is decoded, so a
decompression bomb is refused in milliseconds. Then: the first frame of an
animation, the EXIF orientation applied, transparency flattened on white, any
mode turned into RGB, and large images downscaled (keeping the aspect ratio).
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import re
import struct
from pathlib import Path
from typing import IO

from PIL import Image, ImageOps, UnidentifiedImageError

from errors import BadInputError, TooLargeError

ImageSource = str | Path | bytes | Image.Image

# Formats a user's photo or screenshot comes in. Others (EPS runs Ghostscript) are not opened at all.
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")  # JPEG covers MPO (phone photos)
FORMATS_TEXT = "PNG, JPEG, WebP, GIF, BMP, TIFF"
LIMIT_KEY = "vision.refuse_image_pixels"
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError)
URL = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
DATA_URI = re.compile(r"^data:([^,;]*)((?:;[^,;]*)*),(.*)$", re.DOTALL)
WHITE = (255, 255, 255)


def load_image(source: ImageSource, *, max_pixels: int, refuse_pixels: int) -> Image.Image:
    """An RGB image of at most ``max_pixels`` pixels, or BadInputError saying what is wrong."""
    if isinstance(source, Image.Image):
        return _normalise(source, max_pixels, refuse_pixels)
    with _open(_as_file(source), refuse_pixels) as opened:
        return _normalise(opened, max_pixels, refuse_pixels)


def load_mask(source: ImageSource, *, max_pixels: int, refuse_pixels: int) -> Image.Image:
    """An inpainting mask as "L", white where to repaint. A mask with transparency marks the area to
    repaint as transparent (OpenAI's images/edits convention); one without is read as grey levels."""
    if isinstance(source, Image.Image):
        return _mask_of(source, max_pixels, refuse_pixels)
    with _open(_as_file(source), refuse_pixels) as opened:
        return _mask_of(opened, max_pixels, refuse_pixels)


def transparent_area(source: ImageSource, *, max_pixels: int, refuse_pixels: int) -> Image.Image | None:
    """The picture's own transparent area as a mask (white where transparent), or None when it has none."""
    opened = source if isinstance(source, Image.Image) else _open(_as_file(source), refuse_pixels)
    if "A" not in opened.getbands() and "transparency" not in opened.info:
        return None
    mask = _mask_of(opened, max_pixels, refuse_pixels)
    return mask if mask.getextrema()[1] > 0 else None


def _mask_of(image: Image.Image, max_pixels: int, refuse_pixels: int) -> Image.Image:
    width, height = image.size
    if width * height > refuse_pixels:
        raise _too_large(width * height, refuse_pixels, (width, height))
    try:
        image.load()
        transparent = "A" in image.getbands() or "transparency" in image.info
        mask = ImageOps.invert(image.convert("RGBA").getchannel("A")) if transparent else image.convert("L")
    except DECODE_ERRORS:
        raise BadInputError("the mask is truncated or corrupt; its pixels could not be read") from None
    if width * height > max_pixels:
        scale = math.sqrt(max_pixels / (width * height))
        mask = mask.resize((max(1, int(width * scale)), max(1, int(height * scale))))
    return mask


# ----------------------------------------------------------------------------
# Where the bytes come from
# ----------------------------------------------------------------------------


def _as_file(source: str | Path | bytes) -> IO[bytes] | Path:
    if isinstance(source, bytes | bytearray):
        return _non_empty(bytes(source))
    if isinstance(source, str):
        if source.startswith("data:"):
            return _non_empty(_decode_data_uri(source))
        scheme = URL.match(source)
        if scheme:
            raise _url_refused(scheme.group(1).lower())
    if not isinstance(source, str | Path):
        raise BadInputError(
            f"an image must be a file path, bytes, a data: URI or a PIL image, not {type(source).__name__}"
        )
    return _existing_file(Path(source))


def _non_empty(data: bytes) -> IO[bytes]:
    if not data:
        raise BadInputError("the file is empty: it holds no image")
    return io.BytesIO(data)


def _decode_data_uri(uri: str) -> bytes:
    match = DATA_URI.match(uri)
    if match is None:
        raise BadInputError("the data: URI is malformed; expected data:image/png;base64,<data>")
    media_type, parameters, payload = match.groups()
    if media_type and not media_type.lower().startswith("image/"):
        raise BadInputError(f"the data: URI holds {media_type}, not an image")
    if ";base64" not in parameters.lower():
        raise BadInputError("only base64 data: URIs are accepted (data:image/png;base64,<data>)")
    try:
        return base64.b64decode(re.sub(r"\s+", "", payload), validate=True)
    except (binascii.Error, ValueError):
        raise BadInputError("the data: URI does not hold valid base64") from None


def _url_refused(scheme: str) -> BadInputError:
    if scheme in ("http", "https"):
        return BadInputError(
            "image URLs are not fetched: Enclave works offline. "
            "Download the image and pass the file, or send it as a data: URI"
        )
    return BadInputError(f"{scheme}:// addresses are not supported; pass a local file path or a data: URI")


def _existing_file(path: Path) -> Path:
    shown = str(path) if len(str(path)) <= 200 else str(path)[:200] + "…"
    try:
        if path.is_dir():
            raise BadInputError(f"{shown} is a folder, not an image file")
        size = path.stat().st_size
    except OSError:
        raise BadInputError(f"there is no image file at {shown}") from None
    if size == 0:
        raise BadInputError(f"the file is empty: {shown} holds no image")
    return path


# ----------------------------------------------------------------------------
# Opening (header only) and normalising
# ----------------------------------------------------------------------------


def _open(file: IO[bytes] | Path, refuse_pixels: int) -> Image.Image:
    """Read the header only; PIL decodes pixels later, after our size check."""
    try:
        return Image.open(file, formats=FORMATS)
    except UnidentifiedImageError:
        raise BadInputError(f"the file is not an image PIL can read (formats: {FORMATS_TEXT})") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise _too_large(_pixels_in(error), refuse_pixels) from None
    except DECODE_ERRORS:
        raise BadInputError("the image is truncated or corrupt; its header could not be read") from None


def _normalise(image: Image.Image, max_pixels: int, refuse_pixels: int) -> Image.Image:
    width, height = image.size
    if width * height == 0:
        raise BadInputError("the image is empty (0 pixels)")
    if width * height > refuse_pixels:
        raise _too_large(width * height, refuse_pixels, (width, height))
    try:
        if getattr(image, "is_animated", False):
            image.seek(0)  # an animation is described by its first frame
        _draft(image, max_pixels)
        image.load()
        upright = ImageOps.exif_transpose(image) or image
        return _downscale(_to_rgb(upright), max_pixels)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise _too_large(_pixels_in(error), refuse_pixels) from None
    except DECODE_ERRORS:
        raise BadInputError("the image is truncated or corrupt: its pixels could not be decoded") from None


def _draft(image: Image.Image, max_pixels: int) -> None:
    """Let JPEG decode a large photo at a reduced scale right away (far less memory and time)."""
    if image.format in ("JPEG", "MPO") and image.width * image.height > max_pixels:
        image.draft("RGB", _fitted_size(image.size, max_pixels))


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # 16-bit and float images: bring the range into 8 bits instead of clipping to white.
        high = image.getextrema()[1]
        scale = 255 / high if isinstance(high, int | float) and high > 255 else 1
        image = image.convert("F").point(lambda value: value * scale).convert("L")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        flat = Image.new("RGB", rgba.size, WHITE)
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat
    return image if image.mode == "RGB" else image.convert("RGB")


def _downscale(image: Image.Image, max_pixels: int) -> Image.Image:
    if image.width * image.height <= max_pixels:
        return image
    return image.resize(_fitted_size(image.size, max_pixels), Image.Resampling.LANCZOS, reducing_gap=3.0)


def _fitted_size(size: tuple[int, int], max_pixels: int) -> tuple[int, int]:
    width, height = size
    scale = math.sqrt(max_pixels / (width * height))
    return max(1, math.floor(width * scale)), max(1, math.floor(height * scale))


def _pixels_in(error: Exception) -> int | None:
    """PIL's bomb error names the pixel count in its message ('Image size (N pixels) exceeds …')."""
    match = re.search(r"\((\d+) pixels\)", str(error))
    return int(match.group(1)) if match else None


def _too_large(pixels: int | None, limit: int, size: tuple[int, int] | None = None) -> TooLargeError:
    dimensions = f"{size[0]:,}×{size[1]:,} = " if size else ""
    amount = f"{dimensions}{pixels:,} pixels" if pixels is not None else "too many pixels"
    pil_ceiling = 2 * (Image.MAX_IMAGE_PIXELS or limit)  # PIL refuses above this whatever we allow
    source = f"{LIMIT_KEY} in config.yaml" if limit <= pil_ceiling else "PIL's decompression-bomb limit"
    return TooLargeError(
        f"the image is {amount}; the limit is {min(limit, pil_ceiling):,} ({source}). "
        "Use a smaller image: the limit protects against decompression bombs"
    )
