"""Reading user images safely: any common format in, one RGB `PIL.Image` out, or an `ImageError`."""

from __future__ import annotations

import io
import re
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from minigpt4.errors import ImageError

ImageSource = Image.Image | str | Path | bytes

DEFAULT_MAX_PIXELS = 40_000_000
# Longer side : shorter side. A 39,000,000×1 strip passes any pixel limit but resizing it to the
# vision model's square input costs gigabytes and seconds; the widest panoramas people take are
# about 10:1, scanned receipts about 1:20.
MAX_ASPECT_RATIO = 50


def load_image(src: ImageSource, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open `src` (a PIL image, a path or the file's bytes) as an RGB image.

    The pixel count and the aspect ratio (at most `MAX_ASPECT_RATIO`:1) are checked from the header,
    before any pixel is decoded, so a small file that claims 20000×20000 pixels is refused without
    using the memory. CMYK, 16-bit, palette and
    transparent images are converted to RGB (transparency over white); an animated image gives its
    first frame; EXIF rotation is applied.
    """
    if isinstance(src, Image.Image):
        _check_size(src.size, max_pixels)
        return _to_rgb(src)
    if isinstance(src, (str, Path)):
        path = Path(src)
        if not path.is_file():
            raise ImageError(f"image file not found: {path}")
        data = path.read_bytes()
    elif isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
    else:
        raise ImageError(f"unsupported image source of type {type(src).__name__}")
    if not data:
        raise ImageError("the image file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            _check_size(image.size, max_pixels)
            image.seek(0)
            image.load()
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # PIL refuses before we see the size; its message names its own limit, not ours.
        found = re.search(r"\((\d+) pixels\)", str(exc))
        count = f" ({int(found.group(1)):,})" if found else ""
        raise ImageError(f"the image has too many pixels{count}; the limit is {max_pixels:,}") from exc
    except UnidentifiedImageError as exc:
        raise ImageError("the file is not an image that can be read (unknown or corrupt format)") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(f"the image is corrupt or truncated ({exc})") from exc
    return _to_rgb(image)


def _check_size(size: tuple[int, int], max_pixels: int) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise ImageError(f"the image has no pixels ({width}×{height})")
    if width * height > max_pixels:
        raise ImageError(
            f"the image has too many pixels: {width}×{height} = {width * height:,}; the limit is {max_pixels:,}"
        )
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise ImageError(
            f"the image is {width}×{height}: one side is more than {MAX_ASPECT_RATIO} times the other, "
            "too thin to show anything at the model's square input"
        )


def _to_rgb(image: Image.Image) -> Image.Image:
    image = ImageOps.exif_transpose(image)
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16/32-bit greyscale: scale to 8 bits instead of clipping everything above 255 to white.
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") else max(float(values.max()), 1.0)
        image = Image.fromarray(np.clip(values * (255.0 / top), 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        return background
    return image.convert("RGB")


JPEG_QUALITY = 92


def jpeg_bytes(image: Image.Image, quality: int = JPEG_QUALITY) -> bytes:
    """`image` encoded as a JPEG file's bytes (how generated data sets store their images)."""
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()
