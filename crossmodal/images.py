"""Safe image decoding shared by datasets, the engine and the app."""

from __future__ import annotations

import io
import os
import re
import struct
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

# Images above this many pixels are refused before decoding (decompression bombs).
MAX_PIXELS = 64_000_000
# Images larger than this on their longest side are downscaled right after decoding.
MAX_SIDE = 1024
# The longest side of the thumbnails a run keeps of images held inline by a dataset.
THUMB_SIDE = 256
# Single-channel modes of more than 8 bits: 16-bit integer layouts, 32-bit integer, 32-bit float.
DEEP_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
WHITE = (255, 255, 255, 255)


class ImageDecodeError(ValueError):
    """An input could not be read as an image; the message says why."""


def open_image(
    source: str | os.PathLike[str] | bytes | Image.Image,
    max_pixels: int = MAX_PIXELS,
    max_side: int = MAX_SIDE,
) -> Image.Image:
    """Decode ``source`` to an RGB image, honouring EXIF rotation.

    Every form of transparency (an alpha channel, a transparent palette entry, a
    transparent colour key in an L or RGB image) is composited on white; animations give
    their first frame; 16-bit, 32-bit integer and float greyscale images are scaled to
    0..255 (``deep_to_8bit``); CMYK, palette and greyscale images are converted; the result
    is downscaled so that its longest side is at most ``max_side``.

    Raises:
        ImageDecodeError: the file is missing, empty, truncated, not an image, larger than
            ``max_pixels``, or of a kind that cannot be shown as RGB (the message names it).
    """
    img, name = _open(source, max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img.seek(0)
            img.load()
            img = ImageOps.exif_transpose(img)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(f"image is truncated or corrupt: {name}: {exc}") from None
    img = _converted(img, name)
    if max(img.size) > max_side:
        img.thumbnail((max_side, max_side), Image.Resampling.BILINEAR)
    return img


def check_header(source: str | os.PathLike[str] | bytes, max_pixels: int = MAX_PIXELS) -> None:
    """Read the header of ``source`` and verify its structure (``Image.verify``), decoding no
    pixel; the dataset builders' quick check. Sizes are checked from the header, in the same
    words as ``open_image``.

    Raises:
        ImageDecodeError: an empty, unreadable, unknown, oversized or structurally broken image.
    """
    img, name = _open(source, max_pixels)
    try:
        img.verify()
    except Exception as exc:  # Pillow's plugins raise many types for a broken structure
        why = f"{type(exc).__name__}: {exc}"
        raise ImageDecodeError(f"image is truncated or corrupt: {name}: {why}") from None
    finally:
        img.close()


def check_decodes(source: str | os.PathLike[str] | bytes, max_pixels: int = MAX_PIXELS) -> None:
    """Decode every pixel of ``source`` once, without converting it; the dataset builders' check.

    Unlike ``Image.verify``, which reads the chunk structure only, this finds an image cut
    short inside its pixel data (a JPEG truncated to 60 % of its bytes verifies). JPEGs are
    decoded at 1/8 scale, which still reads their whole entropy-coded data. Images of a mode
    other than RGB and L are also converted as ``open_image`` converts them, so that what
    it would refuse (a float image with negative values, a 32-bit image beyond 16-bit
    values, a mode with no RGB form) is refused here too.

    Raises:
        ImageDecodeError: as ``open_image``, for a file that ``open_image`` would refuse.
    """
    img, name = _open(source, max_pixels)
    try:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                if img.format == "JPEG":
                    img.draft(img.mode, (max(1, img.width // 8), max(1, img.height // 8)))
                img.load()
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning) as exc:
            raise ImageDecodeError(f"image is truncated or corrupt: {name}: {exc}") from None
        if img.mode not in ("RGB", "L"):
            _converted(img, name)
    finally:
        img.close()


def _open(source: str | os.PathLike[str] | bytes | Image.Image, max_pixels: int) -> tuple[Image.Image, str]:
    """The lazily opened image and a name for messages; refuses what cannot be opened or is too big."""
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
            img = read_header(data)
        except Image.DecompressionBombError as exc:  # a plugin's own check (a GIF frame beyond its screen)
            pixels = re.search(r"\((\d+) pixels\)", str(exc))
            size = f"{int(pixels.group(1)):,} pixels" if pixels else "more pixels than allowed"
            raise ImageDecodeError(f"image too large: {size}, limit {max_pixels:,}: {name}") from None
        except (OSError, SyntaxError, ValueError) as exc:  # a header cut short (e.g. a JPEG)
            raise ImageDecodeError(f"image is truncated or corrupt: {name}: {exc}") from None
        if img is None:
            if _looks_like_svg(data):
                raise ImageDecodeError(
                    f"SVG (vector) images are not supported: {name}; upload a PNG or JPEG"
                ) from None
            raise ImageDecodeError(f"not a readable image (unknown format): {name}") from None
    w, h = img.size
    if w * h > max_pixels:
        raise ImageDecodeError(f"image too large: {w}x{h} = {w * h:,} pixels, limit {max_pixels:,}: {name}")
    return img, name


def read_header(data: bytes) -> Image.Image | None:
    """``data`` opened lazily (its header read, no pixel decoded), or None when no format plugin
    takes it: ``Image.open`` without Pillow's own size check, so that ours (``max_pixels``, lower)
    says what is wrong in our words, for any size, and Pillow never warns.

    The registered plugins are tried as ``Image.open`` tries them: the common ones first, then
    every one; a plugin that refuses the header (``SyntaxError`` and kin) passes it on.

    Raises:
        OSError, ValueError: a header that a plugin took but could not read (cut short).
    """
    prefix = data[:16]
    tried: set[str] = set()
    for load_plugins in (Image.preinit, Image.init):
        load_plugins()
        for fmt in [f for f in Image.ID if f not in tried]:
            tried.add(fmt)
            factory, accept = Image.OPEN[fmt]
            taken = accept is None or accept(prefix)
            if not taken or isinstance(taken, str):  # a str: a format Pillow knows but cannot open
                continue
            try:
                return factory(io.BytesIO(data), "")
            except (SyntaxError, IndexError, TypeError, struct.error):
                continue
    return None


def thumbnail_bytes(data: bytes) -> bytes:
    """A PNG of at most ``THUMB_SIDE`` px a side, on white: ``data`` itself when it already is one.

    Raises:
        ImageDecodeError: ``data`` is not a readable image.
    """
    try:  # an opaque PNG small enough is kept as it is (OpenMoji's renders): one decode, no encode
        img = read_header(data)  # no Pillow size check or warning: open_image says it in our words
        if img is not None and img.format == "PNG" and max(img.size) <= THUMB_SIDE:
            img.load()  # decodes fully: a corrupt image falls through to open_image, which says why
            alpha = img.getchannel("A").getextrema() if img.mode == "RGBA" else None
            if img.mode in ("RGB", "L") or alpha == (255, 255):
                return data
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        pass
    buf = io.BytesIO()
    open_image(data, max_side=THUMB_SIDE).save(buf, format="PNG")
    return buf.getvalue()


def _converted(img: Image.Image, name: str) -> Image.Image:
    """``_to_rgb(img)``, its refusals as ``ImageDecodeError`` naming ``name``."""
    try:
        return _to_rgb(img)
    except ImageDecodeError as exc:
        raise ImageDecodeError(f"{exc}: {name}") from None
    except (OSError, ValueError) as exc:
        raise ImageDecodeError(f"images of mode {img.mode} cannot be shown as RGB: {name}: {exc}") from None


def _looks_like_svg(data: bytes) -> bool:
    head = data[:1024].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    return head.startswith(b"<svg") or (head.startswith(b"<?xml") and b"<svg" in data[:4096].lower())


def deep_to_8bit(img: Image.Image) -> Image.Image:
    """A greyscale image of more than 8 bits (``DEEP_MODES``) as ``L``, or ``LA`` when it has a
    transparent grey value.

    Integers in 0..65535 (every 16-bit layout, and ``I`` images of 16-bit data such as
    16-bit PNGs) keep their top 8 bits, except ``I`` (32-bit) images whose values all lie
    in 0..255, which are 8-bit data stored wide and are taken as they are. Floats are taken
    as 0..1 when none exceeds 1, as 0..255 when none exceeds 255, else as 0..65535.

    Raises:
        ImageDecodeError: values outside those ranges (negative, beyond 65535, NaN or
            infinite); the message names the mode and the range found.
    """
    arr = np.asarray(img)
    if arr.size and not np.isfinite(arr).all():
        raise ImageDecodeError(f"{img.mode} image holds NaN or infinite values")
    low, high = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    if low < 0 or high > 65535:
        raise ImageDecodeError(
            f"{img.mode} image with values {low:g}..{high:g}: only 0..65535 "
            "(or 0..1 and 0..255 for floats) can be shown"
        )
    if img.mode == "F" and high <= 255:
        scaled = np.rint(arr * 255.0) if high <= 1 else np.rint(arr)
    elif img.mode == "I" and high <= 255:  # 32-bit integers holding 8-bit values: as they are,
        scaled = arr  # never black (a 16-bit PNG that dark would be near black anyway)
    else:
        scaled = np.rint(arr) // 256 if img.mode == "F" else arr.astype(np.int64) >> 8
    grey = Image.fromarray(scaled.astype(np.uint8), mode="L")
    key = img.info.get("transparency")
    if isinstance(key, int | float) and not isinstance(key, bool):
        alpha = Image.fromarray(np.where(arr == key, 0, 255).astype(np.uint8), mode="L")
        return Image.merge("LA", (grey, alpha))
    return grey


def _has_transparency(img: Image.Image) -> bool:
    if hasattr(img, "has_transparency_data"):  # Pillow >= 10.1
        return bool(img.has_transparency_data)
    return img.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in img.info


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in DEEP_MODES:
        img = deep_to_8bit(img)
    if _has_transparency(img):
        rgba = img.convert("RGBA")  # applies a palette's alpha and a colour key of L, RGB, P
        return Image.alpha_composite(Image.new("RGBA", rgba.size, WHITE), rgba).convert("RGB")
    return img.convert("RGB")


def image_array(
    img: Image.Image, size: int, mean: tuple[float, ...], std: tuple[float, ...]
) -> np.ndarray:
    """An image tower's input: RGB, resized (bilinear) to ``size`` square, scaled to 0..1 and
    normalised per channel, as ``float32 [3, size, size]``.

    The torch towers (``ImageTower.preprocess``) and the exported encoders share it, so that
    both see the same pixels.
    """
    img = img.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    arr = np.asarray(img, dtype=np.float32) / 255.0
    arr = (arr - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))
