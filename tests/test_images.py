"""The guarded decoder on real files of every supported kind, on hostile bytes, and under a fuzzer."""

from __future__ import annotations

import io
import os
import time
from collections.abc import Callable

import numpy as np
import pytest
from hostile_images import (
    gif_with_extensions,
    gif_with_frames,
    jpeg_with_fill,
    jpeg_with_segments,
    png_bomb,
    png_text_bomb,
    png_with_chunks,
    progressive_jpeg,
    webp_with_frames,
)
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from transferkit.core.errors import ImageTooLargeError, InvalidImageError, TransferkitError
from transferkit.core.images import (
    MAX_JPEG_SCANS,
    ImageTooCostlyError,
    decode_image,
    open_image_header,
)


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def gradient(width: int = 64, height: int = 48) -> Image.Image:
    x = np.linspace(0, 255, width, dtype=np.uint8)
    y = np.linspace(0, 255, height, dtype=np.uint8)
    rgb = np.stack([np.tile(x, (height, 1)), np.tile(y[:, None], (1, width)), np.full((height, width), 90, np.uint8)],
                   axis=-1)
    return Image.fromarray(rgb, "RGB")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP", "GIF", "WEBP"])
def test_supported_formats_decode_to_rgb_uint8(fmt):
    pixels = decode_image(encode(gradient(), fmt), 32)
    assert pixels.shape == (32, 32, 3) and pixels.dtype == np.uint8
    assert pixels[..., 0].mean() > 60  # the image content survived, not a blank array


def test_without_size_keeps_original_size():
    assert decode_image(encode(gradient(64, 48), "PNG")).shape == (48, 64, 3)


def test_format_is_sniffed_from_bytes_not_name(tmp_path):
    path = tmp_path / "photo.jpg"
    path.write_bytes(encode(gradient(), "PNG"))  # a PNG named .jpg
    assert decode_image(path, 16).shape == (16, 16, 3)


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "1", "I;16", "CMYK"])
def test_any_mode_becomes_rgb(mode):
    image = gradient().convert("L").convert(mode) if mode != "CMYK" else gradient().convert("CMYK")
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    pixels = decode_image(encode(image, fmt), 24)
    assert pixels.shape == (24, 24, 3)


def test_palette_with_transparency():
    image = gradient().convert("P")
    image.info["transparency"] = 0
    assert decode_image(encode(image, "PNG", transparency=0), 8).shape == (8, 8, 3)


def test_16bit_grayscale_is_rescaled_not_clipped():
    values = np.full((10, 10), 32768, dtype=np.uint16)  # mid-gray in 16 bits
    image = Image.fromarray(values)
    assert image.mode == "I;16"
    pixels = decode_image(encode(image, "PNG"))
    assert 120 <= pixels.mean() <= 135  # clipping would give 255


def test_animated_gif_uses_first_frame():
    red, blue = Image.new("RGB", (16, 16), (255, 0, 0)), Image.new("RGB", (16, 16), (0, 0, 255))
    data = encode(red, "GIF", save_all=True, append_images=[blue], duration=100, loop=0)
    pixels = decode_image(data)
    assert pixels[..., 0].mean() > 200 and pixels[..., 2].mean() < 50


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (40, 20), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 20, 20))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    pixels = decode_image(encode(image, "JPEG", exif=exif.tobytes(), quality=95))
    assert pixels.shape == (40, 20, 3)  # width and height swapped
    assert pixels[:20].mean() > 200 and pixels[20:].mean() < 50  # white ends on top


@pytest.mark.parametrize("width,height", [(1, 1), (10000, 1)])
def test_extreme_but_valid_shapes(width, height):
    assert decode_image(encode(Image.new("RGB", (width, height), (9, 9, 9)), "PNG"), 32).shape == (32, 32, 3)


def test_large_jpeg_uses_draft_and_matches_full_decode_closely():
    big = gradient(3000, 2000)
    data = encode(big, "JPEG", quality=90)
    fast = decode_image(data, 224)
    # The decoder's own DCT scaling picks 1/8 (375x250, the smallest scale covering 224x224): exactly what the
    # guarded decoder returns, and not what a full-size decode would give.
    drafted = Image.open(io.BytesIO(data))
    drafted.draft("RGB", (224, 224))
    assert drafted.size == (375, 250)
    expected = np.asarray(drafted.convert("RGB").resize((224, 224), Image.Resampling.BILINEAR))
    assert np.array_equal(fast, expected)
    full = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize((224, 224), Image.Resampling.BILINEAR))
    assert not np.array_equal(fast, full)
    slow = np.asarray(big.resize((224, 224), Image.Resampling.BILINEAR)).astype(np.int16)
    assert np.abs(fast.astype(np.int16) - slow).mean() < 3


@pytest.mark.parametrize("data", [b"hello, I am text", b"%PDF-1.4\n%...", b"PK\x03\x04zipzipzip", bytes(range(256))])
def test_non_images_are_refused(data):
    with pytest.raises(InvalidImageError, match="not a supported image"):
        decode_image(data)


def test_empty_file():
    with pytest.raises(InvalidImageError, match="empty"):
        decode_image(b"")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_images_are_refused(fmt):
    data = encode(gradient(256, 256), fmt)
    with pytest.raises(InvalidImageError, match="corrupt or truncated"):
        decode_image(data[: len(data) // 2], 32)


def test_broken_png_chunk_is_refused():
    data = bytearray(encode(gradient(), "PNG"))
    index = data.index(b"IDAT") + 8
    data[index : index + 16] = b"\x00" * 16  # the compressed stream is garbage now
    with pytest.raises(InvalidImageError):
        decode_image(bytes(data), 32)


@pytest.mark.parametrize("side", [8000, 30000])
def test_decompression_bomb_refused_from_header(side):
    data = png_bomb(side, side)
    assert len(data) < 200
    with pytest.raises(ImageTooLargeError, match="too large"):
        decode_image(data, 32)


def test_custom_pixel_cap():
    with pytest.raises(ImageTooLargeError, match="64x48 = 3072 pixels > limit 1000"):
        decode_image(encode(gradient(), "PNG"), max_pixels=1000)


def test_unsupported_real_format_is_refused():
    with pytest.raises(InvalidImageError, match="not a supported image"):
        decode_image(encode(gradient(), "TIFF"))


def test_error_classes_carry_http_status():
    assert InvalidImageError.http_status == 400
    assert ImageTooLargeError.http_status == 413


# Golden pixels: what each awkward mode must decode to, value by value (a shape check would pass on a black image).

def test_cmyk_jpeg_golden_pixels():
    """Pure cyan, magenta, yellow and black CMYK blocks decode to their RGB complements."""
    cmyk = Image.new("CMYK", (32, 32))
    for index, ink in enumerate([(255, 0, 0, 0), (0, 255, 0, 0), (0, 0, 255, 0), (0, 0, 0, 255)]):
        cmyk.paste(ink, ((index % 2) * 16, (index // 2) * 16, (index % 2) * 16 + 16, (index // 2) * 16 + 16))
    pixels = decode_image(encode(cmyk, "JPEG", quality=100)).astype(int)
    centres = [pixels[8, 8], pixels[8, 24], pixels[24, 8], pixels[24, 24]]
    expected = [(0, 255, 255), (255, 0, 255), (255, 255, 0), (0, 0, 0)]
    for got, want in zip(centres, expected):
        assert np.abs(got - np.array(want)).max() <= 3, (got, want)


def test_16bit_png_golden_pixels():
    """Every 16-bit level v * 257 maps back to exactly v (rescaled, not clipped or truncated)."""
    levels = np.arange(256, dtype=np.uint16).reshape(16, 16)
    image = Image.fromarray(levels * 257)
    assert image.mode == "I;16"
    pixels = decode_image(encode(image, "PNG"))
    assert pixels.shape == (16, 16, 3)
    assert np.array_equal(pixels[..., 0], levels.astype(np.uint8))
    assert np.array_equal(pixels[..., 0], pixels[..., 2])  # gray stays gray


def test_palette_with_transparency_golden_pixels():
    """The transparent palette entry keeps its own colour (alpha dropped, not composited), the others theirs."""
    palette = [10, 20, 30, 200, 100, 50] + [0] * (256 * 3 - 6)
    image = Image.new("P", (4, 2))
    image.putpalette(palette)
    image.putdata([0, 0, 1, 1, 1, 1, 0, 0])
    pixels = decode_image(encode(image, "PNG", transparency=0))
    assert pixels[0, 0].tolist() == [10, 20, 30] and pixels[1, 3].tolist() == [10, 20, 30]
    assert pixels[0, 2].tolist() == [200, 100, 50] and pixels[1, 0].tolist() == [200, 100, 50]


@pytest.mark.parametrize(("orientation", "top_left", "bottom_right"), [
    (1, (255, 0, 0), (0, 0, 255)),   # as stored
    (3, (0, 0, 255), (255, 0, 0)),   # rotated 180
    (6, (255, 255, 0), (0, 255, 0)),  # rotate 90 clockwise to display: the stored left column becomes the top row
    (8, (0, 255, 0), (255, 255, 0)),  # rotate 90 counter-clockwise to display
])
def test_exif_orientation_golden_pixels(orientation, top_left, bottom_right):
    """Four coloured quadrants of a PNG with an EXIF orientation: each lands where a viewer would show it."""
    stored = Image.new("RGB", (8, 4))
    # Stored quadrants: red top-left, green top-right, yellow bottom-left, blue bottom-right.
    for colour, box in [((255, 0, 0), (0, 0, 4, 2)), ((0, 255, 0), (4, 0, 8, 2)),
                        ((255, 255, 0), (0, 2, 4, 4)), ((0, 0, 255), (4, 2, 8, 4))]:
        stored.paste(colour, box)
    exif = Image.Exif()
    exif[0x0112] = orientation
    pixels = decode_image(encode(stored, "PNG", exif=exif.tobytes()))
    assert pixels.shape == ((4, 8, 3) if orientation in (1, 3) else (8, 4, 3))
    assert pixels[0, 0].tolist() == list(top_left)
    assert pixels[-1, -1].tolist() == list(bottom_right)


def test_importing_the_decoder_installs_no_warnings_filter():
    import subprocess
    import sys

    code = ("import warnings, numpy, PIL.Image; before = list(warnings.filters); import transferkit.core.images; "
            "assert warnings.filters == before, 'warnings filters changed on import'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# Decode cost: refusals from the structure or the CPU budget, each measured in process CPU time. The bound (5 s) is
# generous on purpose (the refusals take milliseconds); without the guards these inputs cost 5 to 15 s each.

CPU_BOUND_S = 5.0


def cpu_seconds(call: Callable[[], object]) -> float:
    start = time.process_time()
    call()
    return time.process_time() - start


def refused(data: bytes, match: str, **options) -> Callable[[], None]:
    def call() -> None:
        with pytest.raises(ImageTooCostlyError, match=match) as caught:
            decode_image(data, 32, **options)
        assert caught.value.http_status == 413 and caught.value.reason == "image_too_costly"
    return call


def small(fmt: str) -> bytes:
    return encode(gradient(), fmt)


COSTLY = {
    # 50 KB, 7000x7000 declared, 5,000 empty scans: 15 s of CPU in libjpeg without the cap.
    "jpeg-empty-scans": (lambda: progressive_jpeg(7000, 7000, 5000), "more than 100 scans"),
    "jpeg-one-scan-over": (lambda: progressive_jpeg(7000, 7000, MAX_JPEG_SCANS + 1), "more than 100 scans"),
    "jpeg-segments": (lambda: jpeg_with_segments(small("JPEG"), 2_000_000), "marker segments"),
    "jpeg-fill-bytes": (lambda: jpeg_with_fill(small("JPEG"), 8_000_000), "stray bytes"),
    "png-text-chunks": (lambda: png_with_chunks(small("PNG"), 2_000_000), "more than 65536 chunks"),
    "png-empty-idat": (lambda: png_with_chunks(small("PNG"), 2_500_000, b"IDAT", b""), "more than 65536 chunks"),
    "png-unknown-chunks": (lambda: png_with_chunks(small("PNG"), 2_500_000, b"abCd", b""), "more than 65536 chunks"),
    "png-ztxt-bomb": (lambda: png_text_bomb(small("PNG"), b"zTXt"), "text or ICC chunk"),
    "png-itxt-bomb": (lambda: png_text_bomb(small("PNG"), b"iTXt"), "text or ICC chunk"),
    "png-iccp-bomb": (lambda: png_text_bomb(small("PNG"), b"iCCP"), "text or ICC chunk"),
    # 32 MB of empty GIF extensions before the first frame: 5 s of Pillow's Python without the cap.
    "gif-extensions": (lambda: gif_with_extensions(small("GIF"), 10_000_000), "extension blocks"),
}


@pytest.mark.parametrize("case", sorted(COSTLY))
def test_costly_structures_are_refused_in_milliseconds(case):
    build, match = COSTLY[case]
    data = build()
    assert cpu_seconds(refused(data, match)) < CPU_BOUND_S, case
    # The service estimates memory from the header before decoding: the same refusal, as early (the text-chunk
    # bombs in PNG chunks after the header are met by the decoder only).
    if "bomb" not in case:
        with pytest.raises(ImageTooCostlyError):
            open_image_header(data)


def test_a_jpeg_at_the_scan_cap_still_decodes_in_bounded_time():
    data = progressive_jpeg(7000, 7000, MAX_JPEG_SCANS)
    assert cpu_seconds(lambda: decode_image(data, 32)) < CPU_BOUND_S


def test_progressive_jpeg_decodes_like_pillow():
    data = encode(gradient(640, 480), "JPEG", progressive=True, quality=90)
    drafted = Image.open(io.BytesIO(data))
    drafted.draft("RGB", (64, 64))
    expected = np.asarray(drafted.convert("RGB").resize((64, 64), Image.Resampling.BILINEAR))
    assert np.array_equal(decode_image(data, 64), expected)


@pytest.mark.parametrize("build", [gif_with_frames, webp_with_frames], ids=["gif", "webp"])
def test_only_the_first_frame_of_a_long_animation_is_decoded(build):
    data = build(200_000)  # 10 to 30 MB of frames after the first
    pixels = None

    def call() -> None:
        nonlocal pixels
        pixels = decode_image(data, 16)

    assert cpu_seconds(call) < 1.0
    assert pixels[..., 0].mean() > 200 and pixels[..., 2].mean() < 50  # the red first frame


def test_decoding_stops_at_its_cpu_budget():
    noise = np.random.default_rng(0).integers(0, 256, (3000, 3000, 3), dtype=np.uint8)
    for fmt in ("PNG", "BMP", "GIF"):  # decoded from Python-fed blocks: stopped mid-decode (WebP is one C call)
        data = encode(Image.fromarray(noise).convert("P") if fmt == "GIF" else Image.fromarray(noise), fmt)
        assert decode_image(data, 32).shape == (32, 32, 3)  # the default budget is far above a 9 MP decode
        assert cpu_seconds(refused(data, "over its budget of 0.005 s of CPU", cpu_budget_s=0.005)) < 1.0, fmt


def test_costly_error_is_a_413_invalid_image():
    assert issubclass(ImageTooCostlyError, ImageTooLargeError) and issubclass(ImageTooCostlyError, InvalidImageError)
    assert ImageTooCostlyError.http_status == 413


# Fuzzing: whatever the bytes, the decoder answers pixels or a one-line TransferkitError refusal (a 4xx), never
# another exception, within its budget. TRANSFERKIT_FUZZ_EXAMPLES runs a longer campaign with random seeds; the
# suite's run is derandomized, so it is the same on every machine.

FUZZ_EXAMPLES = int(os.environ.get("TRANSFERKIT_FUZZ_EXAMPLES", "0"))
FUZZ = settings(max_examples=FUZZ_EXAMPLES or 3000, deadline=3000, database=None, derandomize=not FUZZ_EXAMPLES,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# Mutated headers may declare anything up to the cap: 1 MP keeps every example a few milliseconds (the structure
# caps and the budget do not depend on it); the budget is lowered so that an input that escapes them fails fast.
FUZZ_OPTIONS = {"max_pixels": 1_000_000, "cpu_budget_s": 1.0}


def _seeds() -> list[bytes]:
    exif = Image.Exif()
    exif[0x0112] = 6
    image = gradient(24, 16)
    return [
        encode(image, "JPEG", quality=80), encode(image, "JPEG", progressive=True, exif=exif.tobytes()),
        encode(image.convert("CMYK"), "JPEG"), encode(image, "PNG"), encode(image.convert("P"), "PNG", transparency=0),
        encode(Image.fromarray(np.arange(384, dtype=np.uint16).reshape(16, 24) * 170), "PNG"),
        encode(image, "PNG", save_all=True, append_images=[image.rotate(90)]),  # APNG
        encode(image, "GIF", save_all=True, append_images=[image.rotate(90)], duration=10),
        encode(image, "WEBP", quality=80), encode(image, "WEBP", lossless=True, exif=exif.tobytes()),
        encode(image, "WEBP", save_all=True, append_images=[image.rotate(90)], duration=10),
        encode(image, "BMP"), encode(image.convert("P"), "BMP"),
        progressive_jpeg(64, 48, 12),
    ]


SEEDS = _seeds()


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A valid seed with a few byte-level mutations: flips, overwrites, inserted and deleted runs, duplicated
    slices, truncation (what a fuzzer does to reach the parsers' corners without starting from noise)."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 6))):
        operation = draw(st.sampled_from(["flip", "set", "insert", "delete", "duplicate", "truncate"]))
        # Past the magic number, mostly: test_fuzz_random_bytes fuzzes those bytes, and a broken one ends at open.
        at = min(len(data), draw(st.integers(0, len(data))) + (0 if draw(st.integers(0, 9)) == 0 else 8))
        if operation == "flip" and at < len(data):
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif operation == "set":
            data[at:at + 4] = draw(st.sampled_from([b"\x00", b"\xff", b"\xff\xff\xff\xff", b"\x7f\xff", b"\x00\x01",
                                                    b"\xff\xda", b"\xff\xd9", b"\x80\x00\x00\x00"]))
        elif operation == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
        elif operation == "delete":
            del data[at:at + draw(st.integers(1, 64))]
        elif operation == "duplicate":
            data[at:at] = data[at:at + draw(st.integers(1, 256))] * draw(st.integers(1, 50))
        else:
            del data[at:]
    return bytes(data)


def decodes_or_refuses(data: bytes) -> None:
    try:
        open_image_header(data, FUZZ_OPTIONS["max_pixels"], cpu_budget_s=FUZZ_OPTIONS["cpu_budget_s"])
        pixels = decode_image(data, 16, **FUZZ_OPTIONS)
    except TransferkitError as exc:
        message = str(exc)
        assert message and "\n" not in message and 400 <= exc.http_status < 500, (type(exc), message)
        event(f"refused: {message.split(':')[0][:40]}")  # --hypothesis-show-statistics: how deep examples reach
        return
    event("decoded")
    assert pixels.shape == (16, 16, 3) and pixels.dtype == np.uint8


# Pillow warns about the corrupt EXIF it skips, and about headers over its own pixel threshold (ours is lower).
@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::PIL.Image.DecompressionBombWarning")
@FUZZ
@given(mutated())
def test_fuzz_mutated_images(data):
    decodes_or_refuses(data)


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::PIL.Image.DecompressionBombWarning")
@settings(FUZZ, max_examples=max(50, (FUZZ_EXAMPLES or 3000) // 3))
@given(st.one_of(st.binary(max_size=2048),
                 st.tuples(st.sampled_from([b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"BM",
                                            b"RIFF\x00\x01\x00\x00WEBPVP8 "]),
                           st.binary(max_size=2048)).map(b"".join)))
def test_fuzz_random_bytes(data):
    decodes_or_refuses(data)
