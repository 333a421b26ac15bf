"""images.load_image: every way an image can arrive, and every way it can be wrong."""

from __future__ import annotations

import base64
import io
import struct
import time
import zlib
from pathlib import Path

import pytest
from PIL import Image

from errors import BadInputError, TooLargeError
from media.images import load_image

LIMITS = {"max_pixels": 4_000_000, "refuse_pixels": 100_000_000}
RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def encoded(image: Image.Image, format: str = "PNG", **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def noisy(size: tuple[int, int] = (64, 64)) -> Image.Image:
    """Random pixels: they compress badly, so a truncated file really lacks pixel data."""
    return Image.frombytes("RGB", size, bytes((i * 7919) % 251 for i in range(size[0] * size[1] * 3)))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares ``width``×``height`` 1-bit pixels but holds almost no data: cheap to make,
    and anything that decoded it before checking the size would allocate gigabytes or fail as truncated."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")
    )


def load(source: object, **limits: int) -> Image.Image:
    return load_image(source, **{**LIMITS, **limits})  # type: ignore[arg-type]


# ----------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data, problem",
    [
        (b"", "the file is empty"),
        (b"hello, this is plain text and not a picture", r"not an image PIL can read \(formats: PNG, JPEG"),
        (encoded(noisy(), "PPM"), "not an image PIL can read"),  # a real image, in a format we do not open
        (encoded(noisy(), "PNG")[:600], "truncated or corrupt"),
        (encoded(noisy(), "JPEG", quality=95)[:900], "truncated or corrupt"),
        (encoded(noisy(), "PNG")[:20], "truncated or corrupt|not an image"),
    ],
    ids=["empty", "text", "unsupported-format", "truncated-png", "truncated-jpeg", "header-cut"],
)
def test_bad_bytes_are_refused_naming_the_problem(data: bytes, problem: str) -> None:
    with pytest.raises(BadInputError, match=problem):
        load(data)


def test_bad_files_are_refused_naming_the_problem(tmp_path: Path) -> None:
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(BadInputError, match=r"the file is empty: .*empty\.png"):
        load(empty)
    text = tmp_path / "notes.png"
    text.write_text("not an image", encoding="utf-8")
    with pytest.raises(BadInputError, match="not an image PIL can read"):
        load(str(text))
    with pytest.raises(BadInputError, match=r"no image file at .*absent\.png"):
        load(tmp_path / "absent.png")
    with pytest.raises(BadInputError, match="is a folder"):
        load(tmp_path)
    with pytest.raises(BadInputError, match="must be a file path, bytes"):
        load(12345)


def test_a_huge_image_is_refused_from_its_header_quickly() -> None:
    bomb = png_header_only(20_000, 20_000)
    assert len(bomb) < 200
    started = time.perf_counter()
    with pytest.raises(
        BadInputError, match=r"400,000,000 pixels; the limit is 100,000,000 \(vision\.refuse_image_pixels"
    ):
        load(bomb)
    assert time.perf_counter() - started < 0.5


def test_an_image_above_our_limit_but_below_pils_is_refused_before_decoding() -> None:
    # PIL would open it; our check must refuse it before the (missing) pixels are read.
    with pytest.raises(TooLargeError, match=r"5,000×4,000 = 20,000,000 pixels; the limit is 10,000,000"):
        load(png_header_only(5_000, 4_000), refuse_pixels=10_000_000)


def test_pils_global_limit_is_left_alone() -> None:
    before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(BadInputError):
        load(png_header_only(20_000, 20_000))
    assert before == Image.MAX_IMAGE_PIXELS


@pytest.mark.parametrize(
    "url", ["http://example.com/cat.png", "https://example.com/cat.png", "HTTPS://EXAMPLE.COM/A.JPG"]
)
def test_urls_are_refused_because_the_app_is_offline(url: str) -> None:
    with pytest.raises(BadInputError, match="offline"):
        load(url)


def test_other_url_schemes_are_refused() -> None:
    with pytest.raises(BadInputError, match="ftp:// addresses are not supported"):
        load("ftp://example.com/cat.png")


@pytest.mark.parametrize(
    "uri, problem",
    [
        ("data:image/png;base64,@@@not-base64@@@", "not hold valid base64"),
        ("data:text/plain;base64,aGVsbG8=", "holds text/plain, not an image"),
        ("data:image/png,rawdata", "only base64"),
        ("data:image/png;base64", "malformed"),
        ("data:image/png;base64,", "the file is empty"),
        ("data:image/png;base64," + base64.b64encode(b"plain text").decode(), "not an image"),
    ],
)
def test_bad_data_uris_are_refused(uri: str, problem: str) -> None:
    with pytest.raises(BadInputError, match=problem):
        load(uri)


# ----------------------------------------------------------------------------
# Good input, normalised
# ----------------------------------------------------------------------------


def test_every_kind_of_source_gives_the_same_rgb_image(tmp_path: Path) -> None:
    original = noisy((40, 30))
    data = encoded(original)
    path = tmp_path / "picture.png"
    path.write_bytes(data)
    uri = "data:image/png;base64," + base64.b64encode(data).decode()
    sources: list[object] = [data, path, str(path), uri, original]
    for source in sources:
        image = load(source)
        assert image.mode == "RGB" and image.size == (40, 30)
        assert image.tobytes() == original.tobytes()


def test_a_data_uri_with_line_breaks_is_accepted() -> None:
    data = encoded(noisy((20, 10)))
    text = base64.b64encode(data).decode()
    uri = "data:image/png;base64," + "\n".join(text[i : i + 76] for i in range(0, len(text), 76))
    assert load(uri).size == (20, 10)


def test_exif_orientation_is_applied() -> None:
    image = Image.new("RGB", (40, 20), BLUE)
    image.paste(RED, (0, 0, 20, 20))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    upright = load(encoded(image, "JPEG", exif=exif, quality=95))
    assert upright.size == (20, 40)
    top, bottom = upright.getpixel((10, 5)), upright.getpixel((10, 35))
    assert top[0] > 200 and top[2] < 60, "the red left half must be on top after turning clockwise"
    assert bottom[2] > 200 and bottom[0] < 60


@pytest.mark.parametrize(
    "image, expected",
    [
        (Image.new("RGBA", (8, 8), (255, 0, 0, 0)), WHITE),  # fully transparent: white
        (Image.new("RGBA", (8, 8), (255, 0, 0, 255)), RED),
        (Image.new("LA", (8, 8), (0, 0)), WHITE),
        (Image.new("L", (8, 8), 100), (100, 100, 100)),
        (Image.new("1", (8, 8), 1), WHITE),
        (Image.new("CMYK", (8, 8), (0, 255, 255, 0)), RED),
        (Image.new("I;16", (8, 8), 65535), WHITE),  # 16-bit: scaled, not clipped
        (Image.new("P", (8, 8), 0), (0, 0, 0)),
    ],
    ids=["rgba-clear", "rgba-opaque", "la", "l", "1-bit", "cmyk", "i16", "palette"],
)
def test_every_mode_becomes_rgb(image: Image.Image, expected: tuple[int, int, int]) -> None:
    result = load(image)
    assert result.mode == "RGB"
    assert result.getpixel((4, 4)) == expected


def test_sixteen_bit_grey_keeps_its_shades() -> None:
    image = Image.new("I;16", (2, 1))
    image.putpixel((0, 0), 65535)
    image.putpixel((1, 0), 32768)
    shade = load(encoded(image)).getpixel((1, 0))
    assert 120 <= shade[0] <= 135, "mid-grey must stay mid-grey, not clip to white"


def test_transparent_palette_gif_is_flattened_on_white() -> None:
    image = Image.new("P", (8, 8), 1)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.putpixel((0, 0), 0)
    result = load(encoded(image, "GIF", transparency=0))
    assert result.getpixel((0, 0)) == WHITE
    assert result.getpixel((4, 4)) == RED


def test_half_transparent_pixels_are_blended_on_white() -> None:
    red, green, blue = load(Image.new("RGBA", (4, 4), (255, 0, 0, 128))).getpixel((1, 1))
    assert red == 255 and 120 <= green <= 135 and green == blue


def test_animated_gif_uses_its_first_frame() -> None:
    frames = [Image.new("RGB", (16, 16), colour) for colour in (RED, (0, 255, 0), BLUE)]
    data = encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    with Image.open(io.BytesIO(data)) as check:
        assert check.n_frames == 3
    assert load(data).getpixel((8, 8)) == RED


def test_the_first_frame_is_used_even_when_the_caller_moved_on() -> None:
    frames = [Image.new("RGB", (16, 16), colour) for colour in (RED, BLUE)]
    opened = Image.open(io.BytesIO(encoded(frames[0], "GIF", save_all=True, append_images=frames[1:])))
    opened.seek(1)
    assert load(opened).getpixel((8, 8)) == RED


def test_large_images_are_downscaled_keeping_the_aspect_ratio() -> None:
    result = load(noisy((400, 100)), max_pixels=10_000)
    assert result.size == (200, 50)
    small = load(noisy((50, 50)), max_pixels=10_000)
    assert small.size == (50, 50)


def test_large_jpegs_are_decoded_at_reduced_scale() -> None:
    photo = encoded(noisy((2000, 1000)), "JPEG")
    result = load(photo, max_pixels=20_000)
    assert result.width * result.height <= 20_000
    assert result.size == (200, 100)


def test_the_callers_image_is_not_changed() -> None:
    original = Image.new("RGBA", (300, 300), (255, 0, 0, 0))
    result = load(original, max_pixels=10_000)
    assert result.mode == "RGB" and result.size == (100, 100)
    assert original.mode == "RGBA" and original.size == (300, 300)
    assert original.getpixel((0, 0)) == (255, 0, 0, 0)


def test_an_empty_pil_image_is_refused() -> None:
    with pytest.raises(BadInputError, match="empty"):
        load(Image.new("RGB", (0, 0)))
