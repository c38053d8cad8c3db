"""Bad and unusual images: a clear ImageError, or a correct conversion to RGB — never a crash."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from minigpt4.errors import ImageError
from minigpt4.images import load_image


def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR claiming width×height, with a tiny (wrong) data chunk."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 10))
        + chunk(b"IEND", b"")
    )


def test_empty_file_is_refused():
    with pytest.raises(ImageError, match="empty"):
        load_image(b"")


def test_truncated_file_is_refused():
    data = _png_bytes(Image.new("RGB", (64, 64), (10, 200, 30)))
    with pytest.raises(ImageError, match="corrupt or truncated"):
        load_image(data[: len(data) // 2])


def test_garbage_is_refused():
    with pytest.raises(ImageError, match="not an image"):
        load_image(b"this is certainly not a picture" * 10)


def test_huge_header_is_refused_before_decoding():
    with pytest.raises(ImageError, match="too many pixels"):
        load_image(_png_header_only(20000, 20000), max_pixels=40_000_000)


def test_image_over_our_limit_names_its_size():
    with pytest.raises(ImageError, match="5000×5000"):
        load_image(_png_header_only(5000, 5000), max_pixels=1_000_000)


def test_image_over_twice_pils_limit_reports_our_limit():
    # 20000×20000 = 400M pixels: PIL itself refuses it (over 2 × its 178,956,970) before we see the size.
    with pytest.raises(ImageError, match=r"too many pixels \(400,000,000\); the limit is 40,000,000") as err:
        load_image(_png_header_only(20000, 20000), max_pixels=40_000_000)
    assert "178956970" not in str(err.value) and "178,956,970" not in str(err.value)


@pytest.mark.parametrize("size", [(39_000_000, 1), (1, 100_000), (5001, 100)])
def test_extreme_aspect_ratios_are_refused_before_decoding(size):
    with pytest.raises(ImageError, match=rf"{size[0]}×{size[1]}: one side is more than 50 times the other"):
        load_image(_png_header_only(*size), max_pixels=40_000_000)


def test_a_long_but_reasonable_image_is_accepted():
    assert load_image(_png_bytes(Image.new("RGB", (1000, 20), (1, 2, 3)))).size == (1000, 20)


def test_missing_path_is_refused(tmp_path):
    with pytest.raises(ImageError, match="not found"):
        load_image(tmp_path / "nope.jpg")


def test_cmyk_becomes_rgb():
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red in CMYK
    buf = io.BytesIO()
    cmyk.save(buf, format="JPEG")
    out = load_image(buf.getvalue())
    assert out.mode == "RGB"
    r, g, b = out.getpixel((8, 8))
    assert r > 200 and g < 60 and b < 60


def test_16_bit_greyscale_is_scaled_not_clipped():
    values = np.full((8, 8), 32768, dtype=np.uint16)  # mid grey in 16 bits
    out = load_image(_png_bytes(Image.fromarray(values, mode="I;16")))
    assert out.mode == "RGB"
    assert 120 <= out.getpixel((4, 4))[0] <= 135


def test_palette_with_transparency_goes_over_white():
    image = Image.new("P", (8, 8), 0)
    image.putpalette([0, 0, 0] * 256)
    image.info["transparency"] = 0
    out = load_image(_png_bytes(image))
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (255, 255, 255)


def test_animated_gif_gives_first_frame():
    frames = [Image.new("RGB", (10, 10), c) for c in [(255, 0, 0), (0, 0, 255)]]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    out = load_image(buf.getvalue())
    r, g, b = out.getpixel((5, 5))
    assert r > 200 and b < 50


def test_pil_image_and_path_and_bytes_agree(photo):
    from_path = load_image(photo)
    assert np.array_equal(np.asarray(from_path), np.asarray(load_image(photo.read_bytes())))
    assert np.array_equal(np.asarray(from_path), np.asarray(load_image(Image.open(photo))))
