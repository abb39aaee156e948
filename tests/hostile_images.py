"""Hostile image files for tests, built from a few bytes (shared by test_service.py, test_oip.py, test_images.py)."""

from __future__ import annotations

import io
import struct
import zlib


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_bomb(width: int, height: int) -> bytes:
    """A few hundred bytes of PNG whose header declares ``width`` x ``height`` RGB pixels (a decompression bomb)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(bytes(1000))) + \
        _chunk(b"IEND", b"")


def _segment(marker: int, payload: bytes) -> bytes:
    return struct.pack(">BBH", 0xFF, marker, len(payload) + 2) + payload


def progressive_jpeg(width: int, height: int, scans: int) -> bytes:
    """A grayscale progressive JPEG declaring ``width`` x ``height`` with ``scans`` scans and no coefficient data:
    ~10 bytes a scan, and libjpeg walks every block of the image for each one (5,000 scans over 7000x7000: 50 KB,
    about 15 s of CPU without a scan cap). The first scan is the DC scan, the others AC scans."""
    tables = (_segment(0xDB, b"\x00" + bytes([1] * 64))  # one quantisation table
              + _segment(0xC4, b"\x00" + b"\x01" + bytes(15) + b"\x00")  # DC Huffman: one 1-bit code
              + _segment(0xC4, b"\x10" + b"\x01" + bytes(15) + b"\x00"))  # AC Huffman: one 1-bit code (EOB)
    frame = _segment(0xC2, struct.pack(">BHHB", 8, height, width, 1) + b"\x01\x11\x00")
    dc_scan = _segment(0xDA, b"\x01\x01\x00\x00\x00\x00")
    ac_scan = _segment(0xDA, b"\x01\x01\x00\x01\x3f\x00")
    return b"\xff\xd8" + tables + frame + dc_scan + ac_scan * (scans - 1) + b"\xff\xd9"


def jpeg_with_segments(jpeg: bytes, count: int) -> bytes:
    """``jpeg`` with ``count`` empty COM segments after SOI (each parsed by Pillow in Python: 1M cost ~1 s)."""
    return jpeg[:2] + b"\xff\xfe\x00\x02" * count + jpeg[2:]


def jpeg_with_fill(jpeg: bytes, count: int) -> bytes:
    """``jpeg`` with ``count`` 0xFF fill bytes before its first segment (Pillow skips them one read at a time)."""
    return jpeg[:2] + b"\xff" * count + jpeg[2:]


def png_with_chunks(png: bytes, count: int, kind: bytes = b"tEXt", payload: bytes = b"k\x00v") -> bytes:
    """A valid ``png`` with ``count`` extra ``kind`` chunks before IEND (Pillow handles each one in Python)."""
    return png[:-12] + _chunk(kind, payload) * count + png[-12:]


def png_text_bomb(png: bytes, kind: bytes = b"zTXt", inflated: int = 50_000_000) -> bytes:
    """A valid ``png`` with one compressed ``kind`` chunk (zTXt, iTXt or iCCP) that inflates to ``inflated`` bytes
    (~50 KB on disk)."""
    body = zlib.compress(bytes(inflated), 9)
    payload = {b"zTXt": b"k\x00\x00", b"iCCP": b"icc\x00\x00", b"iTXt": b"k\x00\x01\x00\x00\x00"}[kind] + body
    return png[:8 + 25] + _chunk(kind, payload) + png[8 + 25:]


def _two_frames(fmt: str, side: int, **options) -> bytes:
    from PIL import Image

    red, blue = Image.new("RGB", (side, side), (255, 0, 0)), Image.new("RGB", (side, side), (0, 0, 255))
    buffer = io.BytesIO()
    red.save(buffer, fmt, save_all=True, append_images=[blue], **options)
    return buffer.getvalue()


def gif_with_frames(count: int, side: int = 64) -> bytes:
    """An animated GIF whose first frame is red, followed by ``count`` blue frames (only the first is decoded)."""
    data = _two_frames("GIF", side, duration=10, loop=0)
    second = data.index(b"\x21\xf9", data.index(b"\x2c"))  # the second frame's graphic control extension
    return data[:second] + data[second:-1] * count + b"\x3b"


def webp_with_frames(count: int, side: int = 64) -> bytes:
    """An animated WebP whose first frame is red, followed by ``count`` blue frames (only the first is decoded)."""
    data = _two_frames("WEBP", side, duration=10, lossless=True)
    first = data.index(b"ANMF")
    size = struct.unpack("<I", data[first + 4:first + 8])[0]
    second = first + 8 + size + (size & 1)
    body = data[12:second] + data[second:] * count
    return b"RIFF" + struct.pack("<I", len(body) + 4) + b"WEBP" + body


def gif_with_extensions(gif: bytes, count: int) -> bytes:
    """A valid ``gif`` with ``count`` empty comment extensions before its first frame (3 bytes each; Pillow parses
    each one in Python: 32 MB of them cost ~5 s)."""
    first = gif.index(b"\x2c")
    return gif[:first] + b"\x21\xfe\x00" * count + gif[first:]
