"""Decoding image files into RGB arrays, safely.

Every image, whether read from a folder, a Keras array or an upload, goes through `to_rgb` and
`resize`, so training and inference see identical pixels.
"""

from __future__ import annotations

import io
import stat
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

try:  # libjpeg-turbo without Pillow's Python-side JPEG parsing; Pillow alone works too
    import simplejpeg
except ImportError:  # pragma: no cover - a platform without its wheel
    simplejpeg = None

#: File name endings treated as images; anything else in a class folder is ignored.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})

#: Images with more pixels than this are refused before decoding. Pillow's own
#: decompression-bomb check (at open, above 89 million pixels) would only warn up to twice that;
#: the warning is silenced because such an image is refused here with a reason anyway.
MAX_PIXELS = 64_000_000
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
#: Where Pillow finds a JPEG's orientation: EXIF, or an XMP packet's tiff:Orientation.
ORIENTATION_SOURCES = ("exif", "xmp", "XML:com.adobe.xmp")
ORIENTATION_MARKERS = (b"Exif\x00\x00", b"http://ns.adobe.com/xap/1.0/")
#: Files up to this size are read in one call and decoded from memory.
SMALL_FILE_BYTES = 1 << 20

RESAMPLING = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


class BadImage(Exception):
    """An image that cannot be used; the message is the reason shown in reports."""


def is_image_file(path: Path) -> bool:
    """True for files whose name ends in a known image suffix (case-insensitive)."""
    return path.suffix.lower() in IMAGE_SUFFIXES


def to_rgb(image: Image.Image) -> Image.Image:
    """Apply EXIF rotation and convert any mode (grey, palette, CMYK, alpha, 16-bit) to 8-bit RGB."""
    if image.format != "JPEG" or any(key in image.info for key in ORIENTATION_SOURCES):
        image = ImageOps.exif_transpose(image)  # (a JPEG without them has no orientation)
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        # 16-bit modes are out of 65535 however dark the picture; plain "I" may hold either.
        peak = 65535.0 if image.mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
        if image.mode == "F":
            peak = max(float(values.max(initial=0)), 1.0)
        image = Image.fromarray(np.clip(values * (255.0 / peak), 0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image if image.mode == "RGB" else image.convert("RGB")


class UnsupportedImage(BadImage):
    """Bytes that no decoder recognises as an image (as opposed to a damaged image)."""


def read_pixels(path: Path) -> np.ndarray:
    """An image file as RGB uint8 pixels (H×W×3), or raise BadImage with the reason.

    Pillow's pixels; small plain JPEGs are decoded faster (see `_plain_jpeg`).
    """
    data = _read_small_file(path)
    return np.asarray(_decode(path)) if data is None else pixels_of_bytes(data)


def pixels_of_bytes(data: bytes) -> np.ndarray:
    """An encoded image in memory (an upload) as RGB uint8 pixels, or raise BadImage."""
    if not data:
        raise BadImage("empty file (0 bytes)")
    pixels = _plain_jpeg(data)
    return pixels if pixels is not None else np.asarray(_decode(io.BytesIO(data)))


def _plain_jpeg(data: bytes) -> np.ndarray | None:
    """Pillow's pixels of a plain JPEG, decoded by libjpeg-turbo (simplejpeg) without Pillow's
    Python-side header parsing, six times faster on small images.

    Both run libjpeg-turbo with the same settings (accurate integer IDCT, smooth chroma
    upsampling; tests compare them). None, so that Pillow decodes it, for anything else: other
    formats, EXIF or XMP (either may rotate the image), colour spaces other than YCbCr and grey, images
    over MAX_PIXELS, and any decoding warning (Pillow then gives the reason).
    """
    if simplejpeg is None or not data.startswith(b"\xff\xd8") or any(
            marker in data for marker in ORIENTATION_MARKERS):
        return None
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        if colorspace not in ("YCbCr", "Gray") or width * height > MAX_PIXELS:
            return None
        return simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True)
    except ValueError:
        return None


def _read_small_file(path: Path) -> bytes | None:
    """The bytes of a regular file up to SMALL_FILE_BYTES (None for a larger one), or BadImage."""
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):  # a FIFO or device would block or never end
            raise BadImage("not a regular file")
        if info.st_size == 0:
            raise BadImage("empty file (0 bytes)")
        return path.read_bytes() if info.st_size <= SMALL_FILE_BYTES else None
    except PermissionError:
        raise BadImage("cannot be read (permission denied)") from None
    except OSError as error:
        raise BadImage(f"cannot be read ({error.strerror or error})") from None


def _decode(source: Path | BinaryIO) -> Image.Image:
    """Fully decode `source` with Pillow as RGB, turning every failure into BadImage."""
    try:
        with Image.open(source) as image:
            width, height = image.size
            if width * height > MAX_PIXELS:
                raise BadImage(
                    f"too large to decode safely ({width}x{height} pixels, limit {MAX_PIXELS:,})"
                )
            image.load()
            return to_rgb(image)
    except BadImage:
        raise
    except Image.DecompressionBombError as error:
        raise BadImage(f"too large to decode safely ({error})") from None
    except UnidentifiedImageError:
        raise UnsupportedImage("not an image file Pillow can read") from None
    except PermissionError:
        raise BadImage("cannot be read (permission denied)") from None
    except (OSError, ValueError, SyntaxError) as error:
        text = str(error) or type(error).__name__
        if "truncated" in text.lower():
            raise BadImage("truncated image file") from None
        raise BadImage(f"cannot be decoded ({text})") from None


def resize(image: Image.Image, size: int, interpolation: str = "bilinear") -> np.ndarray:
    """Squash an RGB image to size x size pixels; returns a uint8 array of shape (size, size, 3)."""
    if image.size != (size, size):
        image = image.resize((size, size), RESAMPLING[interpolation])
    return np.asarray(image, dtype=np.uint8)
