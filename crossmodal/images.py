"""Safe image decoding shared by datasets, the engine and the app."""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

# Images above this many pixels are refused before decoding (decompression bombs).
MAX_PIXELS = 64_000_000
# Images larger than this on their longest side are downscaled right after decoding.
MAX_SIDE = 1024


class ImageDecodeError(ValueError):
    """An input could not be read as an image; the message says why."""


def open_image(
    source: str | os.PathLike[str] | bytes | Image.Image,
    max_pixels: int = MAX_PIXELS,
    max_side: int = MAX_SIDE,
) -> Image.Image:
    """Decode ``source`` to an RGB image, honouring EXIF rotation.

    Transparent pixels are composited on white, animations give their first frame,
    16-bit, CMYK, palette and grayscale images are converted, and the result is
    downscaled so that its longest side is at most ``max_side``.

    Raises:
        ImageDecodeError: the file is missing, empty, truncated, not an image, or
            larger than ``max_pixels``.
    """
    name = "<image>"
    if isinstance(source, Image.Image):
        img = source
    else:
        if isinstance(source, bytes):
            data = source
        else:
            name = str(source)
            try:
                data = Path(source).read_bytes()
            except FileNotFoundError:
                raise ImageDecodeError(f"image file not found: {name}") from None
            except OSError as exc:
                raise ImageDecodeError(f"cannot read image file {name}: {exc}") from None
        if not data:
            raise ImageDecodeError(f"image is empty (0 bytes): {name}")
        try:
            img = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            if _looks_like_svg(data):
                raise ImageDecodeError(
                    f"SVG (vector) images are not supported: {name}; upload a PNG or JPEG"
                ) from None
            raise ImageDecodeError(f"not a readable image (unknown format): {name}") from None
        except Image.DecompressionBombError as exc:
            raise ImageDecodeError(f"image too large to decode safely: {name}: {exc}") from None
        except (OSError, SyntaxError, ValueError) as exc:  # a header cut short (e.g. a JPEG)
            raise ImageDecodeError(f"image is truncated or corrupt: {name}: {exc}") from None
    w, h = img.size
    if w * h > max_pixels:
        raise ImageDecodeError(f"image too large: {w}x{h} = {w * h:,} pixels, limit {max_pixels:,}: {name}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img.seek(0)
            img.load()
            img = ImageOps.exif_transpose(img)
            img = _to_rgb(img)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(f"image is truncated or corrupt: {name}: {exc}") from None
    if max(img.size) > max_side:
        img.thumbnail((max_side, max_side), Image.Resampling.BILINEAR)
    return img


def _looks_like_svg(data: bytes) -> bool:
    head = data[:1024].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    return head.startswith(b"<svg") or (head.startswith(b"<?xml") and b"<svg" in data[:4096].lower())


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        img = img.point(lambda v: v / 256).convert("L")
    if img.mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")
