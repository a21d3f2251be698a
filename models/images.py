"""Safe image decoding: bytes or a path in, one normalised RGB PIL image out, or an `ImageRejected`.

The indexer, the trainer and the server all decode images through `load_image`, so an image gets
the same pixels (and so the same embedding) wherever it enters the system.
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# Only raster formats with pure-Python/libimaging decoders. EPS/PDF/PSD/SVG pull in other decoders
# or subprocesses and are refused by never being offered to Pillow.
ALLOWED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
IMAGE_SUFFIXES: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
)
logger = logging.getLogger(__name__)
DEFAULT_MAX_PIXELS = 40_000_000  # about 6300x6300; well past any photo we embed at 224 px
DEFAULT_MAX_BYTES = 32 * 1024 * 1024
BACKGROUND = (255, 255, 255)  # transparent pixels are composited onto white, never black


class ImageRejected(ValueError):
    """An input that is not a usable image. `reason` is a short machine-readable code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class ImageLimits:
    """Bounds checked before any pixel is decoded."""

    max_pixels: int = DEFAULT_MAX_PIXELS
    max_bytes: int = DEFAULT_MAX_BYTES

    def __post_init__(self) -> None:
        # a bound below 1 rejects every image: a mistake, never a setting
        for name, value in (("max_pixels", self.max_pixels), ("max_bytes", self.max_bytes)):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}: it would reject every image")


def _open(fp: BinaryIO, limits: ImageLimits) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # Pillow only *warns* between 1x and 2x MAX_IMAGE_PIXELS; we treat that as a bomb too.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(fp, formats=ALLOWED_FORMATS)
    except Image.DecompressionBombError as exc:
        raise ImageRejected("too_large", f"image has too many pixels: {exc}") from None
    except Image.DecompressionBombWarning as exc:
        raise ImageRejected("too_large", f"image has too many pixels: {exc}") from None
    except UnidentifiedImageError:
        raise ImageRejected(
            "unsupported_format", f"not an image in an accepted format ({', '.join(ALLOWED_FORMATS)})"
        ) from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageRejected("invalid_image", f"cannot read image header: {exc}") from None
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageRejected("invalid_image", "image has zero width or height")
    if width * height > limits.max_pixels:
        raise ImageRejected(
            "too_large", f"image is {width}x{height} pixels, over the limit of {limits.max_pixels:,}"
        )
    return image


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any mode to RGB: alpha composited on white, 16-bit scaled rather than clipped."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: convert("L") would clip everything above 255 to white.
        extrema: Any = image.getextrema()  # (min, max) for single-band images
        lo, hi = int(extrema[0]), int(extrema[1])
        scale = 255.0 / max(1, hi - lo)
        image = image.point(lambda v: (v - lo) * scale).convert("L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("LA", "La", "PA"):
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "RGBa"):
        background = Image.new("RGB", image.size, BACKGROUND)
        background.paste(image, mask=image.getchannel("A"))
        return background
    if image.mode != "RGB":
        image = image.convert("RGB")  # L, 1, CMYK, YCbCr, F ...
    return image


EXIF_ORIENTATION = 0x0112


def normalize_image(image: Image.Image) -> Image.Image:
    """An image as the indexer and the server see it: EXIF orientation applied, RGB (alpha composited
    on white, 16-bit scaled). One already so, such as what `load_image` returns, comes back as it is;
    the caller's image is never changed. `encode_images` applies it: an RGBA stamp opened with
    `Image.open` and embedded as it was (its transparent pixels black to open_clip's RGB conversion)
    scored cosine 0.52 against the same stamp as served."""
    if image.mode == "RGB" and image.getexif().get(EXIF_ORIENTATION, 1) == 1:
        return image
    image = ImageOps.exif_transpose(image) or image
    return _to_rgb(image)


def decode_image(data: bytes | BinaryIO, limits: ImageLimits = ImageLimits()) -> Image.Image:
    """Decode bytes (or a binary file object) to an RGB image.

    EXIF orientation is applied, animated images give their first frame, and transparency is
    composited onto white. Raises `ImageRejected` with reason `empty`, `too_large`,
    `unsupported_format`, `invalid_image` or `truncated`; never any other exception for bad input.
    """
    if isinstance(data, str | os.PathLike):
        # PIL would open the path itself, past the byte cap that `load_image` checks first
        raise TypeError(f"decode_image takes bytes or a binary file, not a path ({data!s:.100}): "
                        "use load_image(path)")
    if isinstance(data, bytes | bytearray):
        if len(data) == 0:
            raise ImageRejected("empty", "file is empty (0 bytes)")
        if len(data) > limits.max_bytes:
            raise ImageRejected("too_large", f"file is {len(data):,} bytes, over {limits.max_bytes:,}")
        fp: BinaryIO = io.BytesIO(data)
    else:
        fp = data
    image = _open(fp, limits)
    try:
        image.seek(0)  # first frame of an animation
        if image.format == "JPEG":
            # Decode huge JPEGs at reduced scale: we never need more than a few hundred pixels.
            image.draft("RGB", (1024, 1024))
        image.load()
        return normalize_image(image)
    except Image.DecompressionBombError as exc:
        raise ImageRejected("too_large", str(exc)) from None
    except (OSError, SyntaxError) as exc:
        text = str(exc)
        reason = "truncated" if "truncated" in text or "broken data stream" in text else "invalid_image"
        raise ImageRejected(reason, f"cannot decode image: {text}") from None
    except (ValueError, TypeError, IndexError, KeyError, ZeroDivisionError, MemoryError) as exc:
        # Malformed metadata (PNG text chunks, EXIF) surfaces as these in Pillow.
        raise ImageRejected("invalid_image", f"cannot decode image: {exc}") from None


def load_image(path: str | os.PathLike[str], limits: ImageLimits = ImageLimits()) -> Image.Image:
    """Read and decode an image file; see `decode_image`. Unreadable files raise `ImageRejected`."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size == 0:
            raise ImageRejected("empty", "file is empty (0 bytes)")
        if size > limits.max_bytes:
            raise ImageRejected("too_large", f"file is {size:,} bytes, over {limits.max_bytes:,}")
        with path.open("rb") as fp:
            return decode_image(fp, limits)
    except ImageRejected:
        raise
    except OSError as exc:
        raise ImageRejected("unreadable", f"cannot read file: {exc.strerror or exc}") from None


# Truncated files are errors, never silently half-grey images.
ImageFile.LOAD_TRUNCATED_IMAGES = False


def image_files(folder: Path) -> list[Path]:
    """The image files under `folder` (recursive, by suffix), sorted. Hidden ones (a name starting
    with "." anywhere below `folder`) are left out and counted in the log: macOS's `._photo.jpg`
    resource forks, `.thumbnails/` caches and a USB drive's `.Trash-1000/` are not a user's images.
    Folders are not followed through links (a link to a folder above would loop)."""
    found, hidden = [], []
    for path in folder.rglob("*"):
        # a broken link is kept: reading it fails, so it is reported, not silently missing
        if path.suffix.lower() not in IMAGE_SUFFIXES or not (path.is_file() or path.is_symlink()):
            continue
        if any(part.startswith(".") for part in path.relative_to(folder).parts):
            hidden.append(path)
        else:
            found.append(path)
    if hidden:
        logger.info("left out %d hidden image file(s) under %s (a name starting with '.'; e.g. %s)",
                    len(hidden), folder, min(hidden).relative_to(folder))
    return sorted(found)
