"""Augmented views of an image, for a feature cache that teaches the heads a drawing style
does not matter.

``augment_view(img, rng)`` draws one view: a change of colour (saturation, brightness,
contrast, greyscale), of stroke width (a 3x3 minimum or maximum filter: dark lines on a
light ground grow or thin), a blur, and a small rotation and scale on a white ground.
The same item, view number and seed always give the same view (``view_rng``), so a
cache of K views per item is a pure function of the dataset and its settings.
Everything is done with Pillow's ``ImageOps``, ``ImageFilter`` and ``ImageEnhance``.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

WHITE = (255, 255, 255)


def view_rng(seed: int, item: int, view: int) -> np.random.Generator:
    """The generator of view ``view`` (1-based; 0 is the clean image) of item position ``item``."""
    return np.random.default_rng([seed, item, view])


def augment_view(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """One augmented view of an RGB image on a light ground; same size, RGB.

    Each change is drawn independently, in this order: rotation within +-15 degrees and
    scale 0.75-1.15 about the centre (always; uncovered corners white), stroke width
    (p = 0.5: thicker or thinner), Gaussian blur (p = 0.3, radius 0.3-1.2 px of a 128 px
    image), greyscale (p = 0.2) or saturation jitter, then mild brightness and contrast
    jitter (always).
    """
    img = img.convert("RGB")
    size = img.size
    scale = max(size) / 128.0  # the pixel-sized changes are drawn for a 128 px image
    # geometry first, on the clean white ground, so the colour changes below treat the
    # filled corners like the rest of the ground
    angle, zoom = rng.uniform(-15.0, 15.0), rng.uniform(0.75, 1.15)
    img = img.rotate(angle, resample=Image.Resampling.BILINEAR, fillcolor=WHITE)
    w, h = max(1, round(size[0] * zoom)), max(1, round(size[1] * zoom))
    img = img.resize((w, h), Image.Resampling.BILINEAR)
    if zoom >= 1.0:  # crop the centre back to the size
        left, top = (w - size[0]) // 2, (h - size[1]) // 2
        img = img.crop((left, top, left + size[0], top + size[1]))
    else:
        canvas = Image.new("RGB", size, WHITE)
        canvas.paste(img, ((size[0] - w) // 2, (size[1] - h) // 2))
        img = canvas
    if rng.random() < 0.5:
        thicker = rng.random() < 0.5
        width = 3 if scale < 2 else 5
        img = img.filter(ImageFilter.MinFilter(width) if thicker else ImageFilter.MaxFilter(width))
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.2) * scale))
    if rng.random() < 0.2:
        img = ImageOps.grayscale(img).convert("RGB")
    else:
        img = ImageEnhance.Color(img).enhance(rng.uniform(0.4, 1.6))
    img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.85, 1.15))
    return ImageEnhance.Contrast(img).enhance(rng.uniform(0.7, 1.3))
