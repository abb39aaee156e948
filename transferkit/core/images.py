"""The guarded image decoder shared by training and serving.

Training and serving must turn the same bytes into the same pixels, so both call :func:`decode_image`. It trusts
nothing but the bytes: the format is sniffed from the content (never the file name or a Content-Type), the pixel
count is capped from the header before any pixel is decoded, pixels are fully loaded inside the guard (Pillow opens
lazily, so truncation only shows at ``load()``), EXIF orientation is applied, the first frame of an animation is used,
any mode becomes 8-bit RGB, and the image is resized to a square model input the same way every time.

Resizing squashes to the target size (no crop), with Pillow's bilinear filter, like Keras' ``load_img``. Large JPEGs
are first downscaled by the decoder itself (``Image.draft``: DCT scaling by 1/2, 1/4, 1/8) to the smallest scale that
still covers the target size, which makes a 12-megapixel photo several times cheaper to decode (Pillow's bilinear
resize then filters over the whole reduction, so no aliasing is added). Alpha is dropped (``convert("RGB")``,
as Keras does), not composited.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from transferkit.core.errors import ImageTooLargeError, InvalidImageError

SUPPORTED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "BMP", "GIF", "WEBP")
SUPPORTED_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".gif", ".webp"}
)
# 50 megapixels: above any phone camera's default output, far below a decompression bomb. Every caller's cap is
# checked from the header (open_image_header), so nothing relies on Pillow's own limit (89.5 MP warns, twice that
# raises) and no process-wide warnings filter is installed: importing this module changes nothing global.
DEFAULT_MAX_PIXELS = 50_000_000
_FORMATS_TEXT = "JPEG, PNG, BMP, GIF or WebP"

ImageSource = bytes | bytearray | memoryview | str | os.PathLike


def _read(source: ImageSource) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    return Path(source).read_bytes()


def _to_size(size: int | tuple[int, int] | None) -> tuple[int, int] | None:
    if size is None:
        return None
    if isinstance(size, int):
        return (size, size)
    return (int(size[0]), int(size[1]))


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        # 16-bit and float grayscale: Pillow's convert() would clip to 255 (a white image); rescale instead.
        values = np.asarray(image, dtype=np.float64)
        if image.mode != "F":
            values = values / 257.0
        gray = np.clip(np.rint(values), 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # avoids Pillow's palette-transparency warning
    return image.convert("RGB")


def _bomb_message(data: bytes, max_pixels: int, exc: Exception) -> str:
    """Pillow's bomb error gives only a pixel count; read the header again (nothing is decoded) for W x H."""
    limit = Image.MAX_IMAGE_PIXELS
    try:
        Image.MAX_IMAGE_PIXELS = None  # header only: our own cap is enforced by every caller
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            width, height = Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS).size
    except Exception:
        return f"image too large: {exc}".split(", could be")[0]
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    return f"image too large: {width}x{height} = {width * height} pixels > limit {max_pixels}"


def open_image_header(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open ``data`` lazily (header only), checking format and pixel count. Raises InvalidImageError subclasses."""
    if not data:
        raise InvalidImageError("empty file: expected a " + _FORMATS_TEXT + " image")
    try:
        image = Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLargeError(_bomb_message(data, max_pixels, exc)) from None
    except UnidentifiedImageError:
        raise InvalidImageError(f"not a supported image: expected {_FORMATS_TEXT}") from None
    except Exception as exc:  # a broken header can raise anything from a plugin
        raise InvalidImageError(f"corrupt image header: {type(exc).__name__}") from None
    width, height = image.size
    if width < 1 or height < 1:
        raise InvalidImageError(f"image has no pixels: {width}x{height}")
    if width * height > max_pixels:
        raise ImageTooLargeError(
            f"image too large: {width}x{height} = {width * height} pixels > limit {max_pixels}"
        )
    return image


def decode_image(
    source: ImageSource,
    size: int | tuple[int, int] | None = None,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Decode an image to a ``(height, width, 3)`` uint8 RGB array, resized to ``size`` (width, height) if given.

    Raises :class:`~transferkit.core.errors.InvalidImageError` (or its subclasses for unsupported formats and
    oversized images) with a one-line message for anything that is not a complete, supported image.
    """
    target = _to_size(size)
    image = open_image_header(_read(source), max_pixels=max_pixels)
    fmt = image.format or "image"
    try:
        if fmt == "JPEG" and target is not None:
            side = max(target)  # square request: EXIF may still rotate the stored image by 90 degrees
            image.draft("RGB", (side, side))
        image.seek(0)  # first frame of an animation
        image.load()
        image = ImageOps.exif_transpose(image)
        image = _to_rgb(image)
        if target is not None and image.size != target:
            image = image.resize(target, Image.Resampling.BILINEAR)
        pixels = np.asarray(image, dtype=np.uint8)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLargeError(f"image too large: {exc}".split(", could be")[0]) from None
    except MemoryError:
        raise ImageTooLargeError("image too large to decode") from None
    except Exception as exc:  # truncated data, broken chunks, bad EXIF: whatever Pillow raises
        raise InvalidImageError(f"corrupt or truncated {fmt} image ({type(exc).__name__})") from None
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise InvalidImageError(f"decoded {fmt} image has shape {pixels.shape}, expected (H, W, 3)")
    return pixels
