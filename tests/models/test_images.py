"""Safe decoding (RELIABILITY.md, checklist rows "image"): every bad input becomes an
`ImageRejected` with a reason, every odd-but-valid image becomes a sane RGB image."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.images import BACKGROUND, ImageLimits, ImageRejected, decode_image, load_image


def _encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    """A non-symmetric test picture (gradient + block) so rotations are distinguishable."""
    x = np.linspace(0, 255, 96, dtype=np.uint8)
    pixels = np.stack([np.tile(x, (64, 1)), np.tile(x[:64, None], (1, 96)), np.full((64, 96), 90, np.uint8)], -1)
    pixels[5:20, 5:30] = (250, 20, 20)
    return Image.fromarray(pixels, "RGB")


# -- "image | 0-byte, random bytes, HTML/JSON/text as image" --------------------------------------
@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty"),
        (bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)), "unsupported_format"),
        (b"<!doctype html><html><body>hello</body></html>", "unsupported_format"),
        (b'{"image": "not really"}', "unsupported_format"),
        (b"just some text\n" * 20, "unsupported_format"),
    ],
)
def test_garbage_is_rejected_with_reason(data: bytes, reason: str) -> None:
    with pytest.raises(ImageRejected) as info:
        decode_image(data)
    assert info.value.reason == reason
    assert info.value.message


# -- "image | JPEG truncated at 10/50/90%; PNG with bad CRC" ----------------------------------------
@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9])
def test_truncated_jpeg_is_rejected(photo: Image.Image, fraction: float) -> None:
    data = _encode(photo.resize((400, 300)), "JPEG", quality=95)
    with pytest.raises(ImageRejected) as info:
        decode_image(data[: int(len(data) * fraction)])
    assert info.value.reason in {"truncated", "invalid_image"}


def test_png_with_bad_crc_is_rejected(photo: Image.Image) -> None:
    data = bytearray(_encode(photo, "PNG"))
    idat = data.index(b"IDAT")
    data[idat + 10] ^= 0xFF  # corrupt the compressed pixels: the chunk CRC no longer matches
    with pytest.raises(ImageRejected):
        decode_image(bytes(data))


# -- "image | bombs: 40000x40000 1-bit PNG (< 1 MB), huge GIF screen, giant zTXt chunk" ------------
def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _bomb_png(width: int, height: int) -> bytes:
    """A 1-bit PNG header claiming width x height pixels, with a tiny (incomplete) IDAT."""
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 1024))
        + _png_chunk(b"IEND", b"")
    )


def test_pixel_bomb_refused_before_decode() -> None:
    data = _bomb_png(40_000, 40_000)
    assert len(data) < 1_000_000
    with pytest.raises(ImageRejected) as info:
        decode_image(data)
    assert info.value.reason == "too_large"


def test_pixel_limit_is_configurable(photo: Image.Image) -> None:
    data = _encode(photo, "PNG")  # 96 x 64 = 6144 pixels
    with pytest.raises(ImageRejected) as info:
        decode_image(data, ImageLimits(max_pixels=6000))
    assert info.value.reason == "too_large"
    assert decode_image(data, ImageLimits(max_pixels=6144)).size == (96, 64)


def test_huge_gif_screen_refused() -> None:
    gif = bytearray(_encode(Image.new("P", (4, 4)), "GIF"))
    gif[6:10] = struct.pack("<HH", 65535, 65535)  # logical screen 65535 x 65535
    with pytest.raises(ImageRejected) as info:
        decode_image(bytes(gif))
    assert info.value.reason in {"too_large", "invalid_image"}


def test_giant_ztxt_chunk_does_not_crash(photo: Image.Image) -> None:
    png = _encode(photo, "PNG")
    bomb = _png_chunk(b"zTXt", b"comment\x00\x00" + zlib.compress(b"A" * 50_000_000, 9))
    data = png[:33] + bomb + png[33:]  # after the IHDR chunk
    try:
        image = decode_image(data)
    except ImageRejected as exc:
        assert exc.reason == "invalid_image"
    else:
        assert image.size == (96, 64)


def test_oversized_file_refused_by_bytes() -> None:
    with pytest.raises(ImageRejected) as info:
        decode_image(b"\x89PNG" + b"\x00" * 2000, ImageLimits(max_bytes=1000))
    assert info.value.reason == "too_large"


# -- "image | EPS, PDF, PSD, SVG, ICO, JPEG 2000" -> refused without other decoders --------------
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
PDF = b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n"
SVG = (
    b'<?xml version="1.0"?><!DOCTYPE svg [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>'
    b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><text>&xxe;</text></svg>'
)


@pytest.mark.parametrize("fmt", ["EPS", "PDF", "SVG", "PSD", "ICO", "JPEG2000"])
def test_disallowed_formats_refused(fmt: str, photo: Image.Image) -> None:
    if fmt == "EPS":
        data = EPS
    elif fmt == "PDF":
        data = PDF
    elif fmt == "SVG":
        data = SVG
    elif fmt == "PSD":
        data = b"8BPS\x00\x01" + b"\x00" * 6 + struct.pack(">HIIHH", 3, 10, 10, 8, 3) + b"\x00" * 64
    elif fmt == "ICO":
        data = _encode(photo.resize((32, 32)), "ICO")
    else:
        try:
            data = _encode(photo, "JPEG2000")
        except (OSError, KeyError):
            data = b"\x00\x00\x00\x0cjP  \r\n\x87\n" + b"\x00" * 64
    with pytest.raises(ImageRejected) as info:
        decode_image(data)
    assert info.value.reason == "unsupported_format"


# -- "image | EXIF orientations 1-8 of one photo" -> same pixels after exif_transpose -------------
_UNDO = {  # orientation -> the transform that, applied to the upright photo, gives what is stored
    1: None,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_applied(photo: Image.Image, orientation: int) -> None:
    transform = _UNDO[orientation]
    stored = photo.transpose(transform) if transform is not None else photo
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _encode(stored, "PNG", exif=exif)
    decoded = np.asarray(decode_image(data), dtype=np.int16)
    assert decoded.shape == (64, 96, 3)
    assert np.abs(decoded - np.asarray(photo, dtype=np.int16)).max() == 0


# -- "image | modes L, LA, P, P+transparency, RGBA, CMYK, I;16, 1-bit; animated" ------------------
def test_modes_become_rgb(photo: Image.Image) -> None:
    cases = {
        "L": _encode(photo.convert("L"), "PNG"),
        "LA": _encode(photo.convert("LA"), "PNG"),
        "P": _encode(photo.convert("P"), "PNG"),
        "RGBA": _encode(photo.convert("RGBA"), "PNG"),
        "CMYK": _encode(photo.convert("CMYK"), "JPEG"),
        "1": _encode(photo.convert("1"), "PNG"),
        "I;16": _encode(Image.fromarray(np.asarray(photo.convert("L"), np.uint16) * 257), "PNG"),
    }
    for mode, data in cases.items():
        image = decode_image(data)
        assert image.mode == "RGB", mode
        assert image.size == (96, 64), mode


def test_sixteen_bit_is_scaled_not_clipped() -> None:
    ramp = (np.linspace(0, 65535, 256, dtype=np.float64).reshape(16, 16)).astype(np.uint16)
    image = decode_image(_encode(Image.fromarray(ramp), "PNG"))
    values = np.asarray(image)[..., 0]
    # clipping to 8 bits would turn all but the first pixel white
    assert values.min() == 0 and values.max() == 255
    assert len(np.unique(values)) > 100


def test_transparency_composited_on_background() -> None:
    rgba = Image.new("RGBA", (8, 8), (10, 200, 10, 0))  # fully transparent green
    image = decode_image(_encode(rgba, "PNG"))
    assert image.getpixel((3, 3)) == BACKGROUND
    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([0, 0, 0] * 256)
    image = decode_image(_encode(palette, "PNG", transparency=0))
    assert image.getpixel((0, 0)) == BACKGROUND


def test_animated_gives_first_frame() -> None:
    frames = [Image.new("RGB", (16, 16), color) for color in [(255, 0, 0)] + [(0, 0, 255)] * 50]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=10)
    image = decode_image(buffer.getvalue())
    red, green, blue = image.getpixel((8, 8))
    assert red > 200 and blue < 50


# -- "image | 1x1, 1x20000" -> documented answer, never an exception other than ImageRejected -----
@pytest.mark.parametrize("size", [(1, 1), (1, 20000), (20000, 1)])
def test_extreme_aspect_ratios_decode(size: tuple[int, int]) -> None:
    image = decode_image(_encode(Image.new("RGB", size, (1, 2, 3)), "PNG"))
    assert image.size == size and image.mode == "RGB"


def test_load_image_reports_unreadable_and_empty(tmp_path) -> None:
    with pytest.raises(ImageRejected) as info:
        load_image(tmp_path / "missing.png")
    assert info.value.reason == "unreadable"
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageRejected) as info:
        load_image(tmp_path / "empty.png")
    assert info.value.reason == "empty"


def test_decode_image_refuses_a_path(tmp_path: Path) -> None:
    """A path handed to decode_image went to PIL as a path, past the byte cap load_image checks."""
    path = tmp_path / "big.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    for given in (str(path), path):
        with pytest.raises(TypeError, match=r"decode_image takes bytes or a binary file, not a path .*use load_image"):
            decode_image(given)  # type: ignore[arg-type]
    with pytest.raises(ImageRejected, match="over 100"):
        load_image(path, ImageLimits(max_bytes=100))


def test_images_opened_by_hand_embed_as_served(photo: Image.Image, tiny_encoder) -> None:
    """`enc.encode_images([Image.open("bird.png")])`, the README's own one-liner, embedded a
    transparent stamp with black where the server sees white (cosine 0.52 for a real stamp with the
    default model), and a rotated photo as stored. `encode_images` now sees every image as
    `decode_image` gives it; one that already is so is passed on untouched, not copied."""
    from models.images import normalize_image

    transparent = photo.convert("RGBA")
    alpha = np.full((64, 96), 255, np.uint8)
    alpha[:, :40] = 0
    transparent.putalpha(Image.fromarray(alpha))
    exif = Image.Exif()
    exif[0x0112] = 6
    files = {
        "RGBA": _encode(transparent, "PNG"),
        "rotated": _encode(photo.transpose(Image.Transpose.ROTATE_90), "PNG", exif=exif),
        "P+transparency": _encode(transparent.convert("P"), "PNG", transparency=0),
        "I;16": _encode(Image.fromarray(np.asarray(photo.convert("L"), np.uint16) * 257), "PNG"),
    }
    for name, data in files.items():
        opened = Image.open(io.BytesIO(data))
        mode = opened.mode
        by_hand = tiny_encoder.encode_images([opened])
        assert np.array_equal(by_hand, tiny_encoder.encode_images([decode_image(data)])), name
        assert opened.mode == mode, name  # the caller's image is left as it was
    served = decode_image(files["rotated"])
    assert normalize_image(served) is served
