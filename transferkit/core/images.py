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

The pixel cap does not bound the work on its own: some format features cost CPU per *structure*, not per pixel.
Each progressive JPEG scan walks every block of the image again (5,000 empty scans over 49 MP: 50 KB of bytes, 15 s
of CPU), and Pillow parses every PNG chunk, JPEG marker segment and GIF extension block in Python (32 MB of empty
ones: 5 s and more). So the structure is counted from the bytes before anything is opened (:func:`check_structure`:
at most 100 JPEG scans, 1,024 JPEG marker segments, 64 KB of stray bytes between them, 65,536 PNG chunks, 65,536 GIF
extension blocks before the first frame), and every decode runs under a
CPU-time budget (``cpu_budget_s``, 5 s by default, ~3x the slowest legitimate 50 MP decode measured here, 1.4 s):
the image's bytes are read through a stream that compares the thread's CPU time with the budget at each read, and
Pillow reads between decoder calls, so a decode that goes over stops there (WebP is decoded in one libwebp call,
bounded by its pixel count instead). Both refusals are
:class:`ImageTooCostlyError` (413, like an oversized image). Other features are already bounded: PNG text and ICC
chunks by Pillow's ``MAX_TEXT_CHUNK`` (a bomb in one is refused, 413 too), GIF/WebP/APNG animations decode their
first frame only, and TIFF is not accepted.
"""

from __future__ import annotations

import io
import os
import re
import struct
import time
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

# Structure caps (see the module docstring). Encoders write 1 (baseline) to 10 (libjpeg's progressive script) scans,
# a few dozen marker segments and tens of PNG chunks per megabyte of IDAT at the smallest usual chunk size (8 KB):
# every cap is far above what an encoder writes and far below what costs seconds.
MAX_JPEG_SCANS = 100  # measured: each empty scan over 49 MP costs ~3 ms, so 100 cost ~0.3 s
MAX_JPEG_MARKERS = 1024
MAX_JPEG_STRAY_BYTES = 65536  # fill and junk bytes between header segments, which Pillow skips one by one
MAX_PNG_CHUNKS = 65536
MAX_GIF_BLOCKS = 65536  # extension sub-blocks before the first frame (a 64 KB XMP packet takes ~260)
DEFAULT_CPU_BUDGET_S = 5.0

# A JPEG marker: 0xFF then a code that is not a stuffed zero, a fill byte or a restart marker (those three occur
# inside entropy-coded data; anything else ends it). Found by the regex engine, so entropy data costs no Python loop.
_JPEG_MARKER = re.compile(rb"\xff[^\x00\xff\xd0-\xd7]")
_STANDALONE_MARKERS = frozenset({0x01, 0xD8})  # TEM, SOI: no length field (RSTn never match, EOI ends the walk)
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

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


class ImageTooCostlyError(ImageTooLargeError):
    """An image whose decoding would cost far more CPU than its pixel count says (too many JPEG scans or marker
    segments, too many PNG chunks, a text chunk that inflates past Pillow's cap), or whose decoding went over its
    CPU-time budget. 413 like an image over the pixel cap: the request is too expensive, not malformed."""

    reason = "image_too_costly"


class _OverBudget(Exception):
    """Raised from inside Pillow (by :meth:`_MeteredBytes.read`) to stop a decode; becomes ImageTooCostlyError."""


class _MeteredBytes(io.BytesIO):
    """The image's bytes, with a CPU-time check at each read.

    Pillow's header parsers read piece by piece and ``ImageFile.load`` feeds the decoders block by block (64 KB), all
    from Python, so each read is a point where a decode that used up its budget can be stopped. Thread CPU time, not
    wall time: a loaded machine does not refuse more. The clock is a system call, so it is read on every large read
    and every 256th small one (Pillow skips stray JPEG bytes one read at a time)."""

    def __init__(self, data: bytes, budget_s: float):
        super().__init__(data)
        self.budget_s = budget_s
        self.exceeded = False
        self._deadline = time.thread_time() + budget_s
        self._reads = 0

    def read(self, size: int | None = -1, /) -> bytes:
        self._reads += 1
        due = size is None or size < 0 or size >= 4096 or not self._reads % 256
        if self.exceeded or (due and time.thread_time() > self._deadline):
            self.exceeded = True  # sticky: a plugin that swallows the first raise meets it again at its next read
            raise _OverBudget
        return super().read(size)


def check_structure(data: bytes) -> None:
    """Refuse (ImageTooCostlyError) a JPEG or PNG whose structure alone would cost seconds of CPU to decode, from
    the bytes only: a regex walk over a JPEG's markers, one step per PNG chunk, both stopping at their cap."""
    if data.startswith(b"\xff\xd8\xff"):
        _check_jpeg(data)
    elif data.startswith(_PNG_SIGNATURE):
        _check_png(data)
    elif data.startswith((b"GIF87a", b"GIF89a")):
        _check_gif(data)


def _check_jpeg(data: bytes) -> None:
    scans = markers = stray = 0
    position = 2  # after SOI
    while match := _JPEG_MARKER.search(data, position):
        if not scans:  # up to the first scan Pillow parses in Python, skipping fill and junk a byte at a time
            stray += match.start() - position
            if stray > MAX_JPEG_STRAY_BYTES:
                raise ImageTooCostlyError(f"JPEG with more than {MAX_JPEG_STRAY_BYTES} stray bytes between its "
                                          "header segments: too costly to decode")
        code = data[match.start() + 1]
        if code == 0xD9:  # EOI: what follows (an MPO's next picture, trailing data) is not decoded
            return
        markers += 1
        if markers > MAX_JPEG_MARKERS:
            raise ImageTooCostlyError(f"JPEG with more than {MAX_JPEG_MARKERS} marker segments: too costly to decode")
        position = match.end()
        if code in _STANDALONE_MARKERS:
            continue
        if code == 0xDA:
            scans += 1
            if scans > MAX_JPEG_SCANS:  # each scan walks every block of the image again, even an empty one
                raise ImageTooCostlyError(f"JPEG with more than {MAX_JPEG_SCANS} scans: too costly to decode")
        if position + 2 > len(data):
            return
        # Skip the segment by its length (an SOS header too: the search then runs through its entropy-coded data).
        position += struct.unpack_from(">H", data, position)[0]


def _check_png(data: bytes) -> None:
    position, chunks = len(_PNG_SIGNATURE), 0
    while position + 8 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, position)
        chunks += 1
        if chunks > MAX_PNG_CHUNKS:  # Pillow handles each chunk in Python: millions of empty ones cost seconds
            raise ImageTooCostlyError(f"PNG with more than {MAX_PNG_CHUNKS} chunks: too costly to decode")
        if kind == b"IEND":
            return
        position += 12 + length


def _check_gif(data: bytes) -> None:
    if len(data) < 13:
        return
    flags = data[10]
    position = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)  # after the global colour table
    blocks = 0
    while position < len(data) and data[position] == 0x21:  # extensions before the first image (0x2C)
        position += 2
        while True:  # its sub-blocks, each a length byte and data; a zero length ends the extension
            blocks += 1
            if blocks > MAX_GIF_BLOCKS:  # Pillow reads each one in Python
                raise ImageTooCostlyError(f"GIF with more than {MAX_GIF_BLOCKS} extension blocks before its first "
                                          "frame: too costly to decode")
            size = data[position] if position < len(data) else 0
            position += size + 1
            if not size:
                break


def _cost_refusal(exc: BaseException, stream: _MeteredBytes) -> ImageTooCostlyError | None:
    """The refusal for an exception that means "too costly" (the budget, Pillow's text-chunk caps), else None."""
    if stream.exceeded or isinstance(exc, _OverBudget):
        return ImageTooCostlyError(f"image too costly to decode: over its budget of {stream.budget_s:g} s of CPU")
    if isinstance(exc, ValueError) and "MAX_TEXT" in str(exc):  # PngImagePlugin.MAX_TEXT_CHUNK / MAX_TEXT_MEMORY
        return ImageTooCostlyError("PNG text or ICC chunk too large once decompressed: too costly to decode")
    return None


def open_image_header(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, *,
                      cpu_budget_s: float = DEFAULT_CPU_BUDGET_S) -> Image.Image:
    """Open ``data`` lazily (header only), checking structure, format and pixel count, within ``cpu_budget_s``
    seconds of CPU. Raises InvalidImageError subclasses."""
    return _open(data, max_pixels, _MeteredBytes(data, cpu_budget_s))


def _open(data: bytes, max_pixels: int, stream: _MeteredBytes) -> Image.Image:
    if not data:
        raise InvalidImageError("empty file: expected a " + _FORMATS_TEXT + " image")
    check_structure(data)
    try:
        image = Image.open(stream, formats=SUPPORTED_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLargeError(_bomb_message(data, max_pixels, exc)) from None
    except UnidentifiedImageError:
        raise _cost_refusal(UnidentifiedImageError(), stream) or InvalidImageError(
            f"not a supported image: expected {_FORMATS_TEXT}") from None
    except Exception as exc:  # a broken header can raise anything from a plugin
        raise _cost_refusal(exc, stream) or InvalidImageError(
            f"corrupt image header: {type(exc).__name__}") from None
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
    cpu_budget_s: float = DEFAULT_CPU_BUDGET_S,
) -> np.ndarray:
    """Decode an image to a ``(height, width, 3)`` uint8 RGB array, resized to ``size`` (width, height) if given.

    Raises :class:`~transferkit.core.errors.InvalidImageError` (or its subclasses for unsupported formats, oversized
    images and :class:`ImageTooCostlyError` for a decode over ``cpu_budget_s`` seconds of CPU or a costly structure)
    with a one-line message for anything that is not a complete, supported image.
    """
    target = _to_size(size)
    data = _read(source)
    stream = _MeteredBytes(data, cpu_budget_s)  # one budget for the header and the pixels
    image = _open(data, max_pixels, stream)
    fmt = image.format or "image"
    try:
        pixels = _pixels(image, fmt, target)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLargeError(f"image too large: {exc}".split(", could be")[0]) from None
    except MemoryError:
        raise ImageTooLargeError("image too large to decode") from None
    except Exception as exc:  # truncated data, broken chunks, bad EXIF: whatever Pillow raises
        raise _cost_refusal(exc, stream) or InvalidImageError(
            f"corrupt or truncated {fmt} image ({type(exc).__name__})") from None
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise InvalidImageError(f"decoded {fmt} image has shape {pixels.shape}, expected (H, W, 3)")
    return pixels


def _pixels(image: Image.Image, fmt: str, target: tuple[int, int] | None) -> np.ndarray:
    """Load, orient, convert and resize an opened image (Pillow's exceptions pass through)."""
    if fmt == "JPEG" and target is not None:
        side = max(target)  # square request: EXIF may still rotate the stored image by 90 degrees
        image.draft("RGB", (side, side))
    image.seek(0)  # first frame of an animation
    image.load()
    image = ImageOps.exif_transpose(image)
    image = _to_rgb(image)
    if target is not None and image.size != target:
        image = image.resize(target, Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8)
