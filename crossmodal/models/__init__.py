"""Image and text towers, each built by name from a registry.

``create_image_tower("efficientnet_lite0")`` and ``create_text_tower("minilm")`` return
``nn.Module`` towers mapping a batch to ``[B, feature_dim]``; ``crossmodal.models.hasher``
puts a hash head on each. ``clip:<model>`` names the image or text half of a CLIP-family
model (``crossmodal.models.clip``), by hub id or folder. Heavy libraries (torchvision,
transformers) load only when a tower that needs them is built.
"""

from __future__ import annotations

from crossmodal.models import clip  # noqa: F401  (registers the clip: towers)
from crossmodal.models.image import (
    IMAGE_TOWERS,
    ImageTower,
    create_image_tower,
    list_image_towers,
    register_image_tower,
)
from crossmodal.models.text import (
    TEXT_TOWERS,
    TextTower,
    create_text_tower,
    list_text_towers,
    register_text_tower,
)

__all__ = [
    "IMAGE_TOWERS",
    "TEXT_TOWERS",
    "ImageTower",
    "TextTower",
    "create_image_tower",
    "create_text_tower",
    "list_image_towers",
    "list_text_towers",
    "register_image_tower",
    "register_text_tower",
]
