"""CLIP-family towers: ``clip:<model>`` image and text towers on ``transformers``.

``<model>`` is a Hugging Face hub id (``openai/clip-vit-base-patch32``) or a local folder
written by ``save_pretrained``; the code path is the same and only the source differs. A
hub model is downloaded once into the Hugging Face cache when a config names it, and read
from there afterwards (``HF_HUB_OFFLINE=1`` forbids the download). A model that is neither a
folder nor in the cache, where the hub cannot be reached, raises ``ModelUnavailableError``
naming the model and ``HF_HUB_OFFLINE``.

Both towers return the model's projected embeddings (the space in which CLIP aligns images
with texts), L2-normalised, so that a frozen image tower and a frozen text tower of the same
model already form a zero-shot cross-modal retrieval model. The image tower prepares images
with the model's own image processor (for CLIP: bicubic resize of the shorter side, centre
crop, CLIP's mean and std), the text tower tokenizes with the model's own tokenizer,
truncated to the model's context (77 tokens for CLIP).

CLIP models (``model_type`` ``clip``) load only the half a tower needs
(``CLIPVisionModelWithProjection``, ``CLIPTextModelWithProjection``); other dual encoders
(SigLIP, ALIGN...) load through ``AutoModel`` and answer through its
``get_image_features`` / ``get_text_features``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from crossmodal.models.image import IMAGE_TOWERS, ImageTower
from crossmodal.models.text import TEXT_TOWERS, HFTextTower

logger = logging.getLogger(__name__)

CLIP_PREFIX = "clip:"
DEFAULT_CONTEXT = 77  # CLIP's text context, in tokens
# model_type -> (image class, its output, text class, its output): models that load one half alone
HALF_MODELS = {
    "clip": ("CLIPVisionModelWithProjection", "image_embeds", "CLIPTextModelWithProjection", "text_embeds"),
}
# modality -> (position in a HALF_MODELS entry, sub-config key)
MODALITY_KEYS = {"image": (0, "vision_config"), "text": (2, "text_config")}


# Texts about nothing in particular: their mean embedding stands in for a collection's text mean
# when it has no caption at all (the zero-shot path centres text queries by the text mean).
NEUTRAL_SUBJECTS = (
    "a person", "two people", "a child", "a dog", "a cat", "a bird", "a horse", "a flower", "a tree",
    "a garden", "a beach", "the sea", "a lake", "a river", "a mountain", "the sky", "a sunset", "a forest",
    "a street", "a building", "a house", "a room", "a kitchen", "a table", "food", "a meal", "a car",
    "a bicycle", "a train", "a boat", "a plane", "a city at night", "a field", "snow", "a park",
    "a market", "a concert", "a sports game", "a book", "a computer", "a phone", "a toy", "a painting",
    "a sign", "a bridge", "a road", "a church", "an animal",
)  # fmt: skip
NEUTRAL_TEXTS = tuple(f"a photo of {s}" for s in NEUTRAL_SUBJECTS)


class ModelUnavailableError(FileNotFoundError):
    """A ``clip:`` model is neither a local folder nor in the Hugging Face cache, and cannot be downloaded."""


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` forbids downloads (as huggingface_hub reads it)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def model_source(model: str) -> str:
    """The folder ``model`` names (resolved), or ``model`` itself as a hub id.

    Raises:
        ModelUnavailableError: ``model`` is written as a path (``/``, ``./``, ``~``...) and no
            such folder exists.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        return str(path.resolve())
    if model.startswith(("/", "./", "../", "~", "\\")) or (len(model) > 1 and model[1] == ":"):
        raise ModelUnavailableError(f"{CLIP_PREFIX}{model}: no model folder at {path}")
    return model


def unavailable_message(model: str, exc: BaseException) -> str:
    """What to tell a user whose model could not be loaded (``exc``: the loader's error)."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if Path(model).expanduser().is_dir():
        return (f"{CLIP_PREFIX}{model}: the folder does not hold a model saved with save_pretrained "
                f"({first})")  # fmt: skip
    from huggingface_hub import constants

    why = ("HF_HUB_OFFLINE=1 forbids downloading it" if hub_offline() else
           "the Hugging Face hub could not be reached (HF_HUB_OFFLINE=1 fails at once instead of retrying)")
    return (
        f"{CLIP_PREFIX}{model}: the model is not a local folder and not in the Hugging Face cache "
        f"({constants.HF_HUB_CACHE}), and {why}. Download it once where the hub is reachable, with "
        f"HF_HUB_OFFLINE unset (any crossmodal command that names it, or `hf download {model}`), then "
        f"copy that cache folder here or name a local copy as {CLIP_PREFIX}/path/to/folder ({first})"
    )


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Load without transformers' progress bars and load reports (a CLIP checkpoint holds both
    halves, so loading one half reports the other's weights as unexpected)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _load(model: str, loader: Any, **kwargs: Any) -> Any:
    """``loader.from_pretrained(source of model)``; a missing model raises ``ModelUnavailableError``."""
    source = model_source(model)
    try:
        with quiet_transformers():
            return loader.from_pretrained(source, **kwargs)
    except OSError as exc:
        raise ModelUnavailableError(unavailable_message(model, exc)) from None
    except ValueError as exc:  # a folder without a config transformers recognises
        if not Path(source).is_dir():
            raise
        raise ModelUnavailableError(unavailable_message(model, exc)) from None


def load_config(model: str) -> Any:
    """The model's configuration (the first file read, so a missing model fails here, once)."""
    from transformers import AutoConfig

    return _load(model, AutoConfig)


def load_encoder(model: str, config: Any, modality: str, pretrained: bool) -> tuple[nn.Module, str | None]:
    """The network of one modality, and the name of its embedding output (None: the model's
    ``get_image_features`` / ``get_text_features`` give it).

    CLIP loads only that half (the checkpoint's other half is left unread); other model
    types load whole through ``AutoModel``. Without ``pretrained`` the weights are random.
    """
    import transformers

    position, sub_key = MODALITY_KEYS[modality]
    family = HALF_MODELS.get(getattr(config, "model_type", ""))
    if family is not None:
        cls, output = getattr(transformers, family[position]), family[position + 1]
        if pretrained:
            return _load(model, cls), output
        sub = getattr(config, sub_key, None) or config
        return cls._from_config(sub), output
    if pretrained:
        return _load(model, transformers.AutoModel), None
    return transformers.AutoModel.from_config(config), None


def encoder_blocks(encoder: nn.Module) -> list[nn.Module]:
    """An encoder's blocks, input to output: the parameters registered before its transformer
    layers (embeddings, first norm), each layer, then those after them (final norm)."""
    lists = [m for m in encoder.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    layers = list(max(lists, key=len)) if lists else []
    in_layers = {id(p) for layer in layers for p in layer.parameters()}
    before: list[nn.Parameter] = []
    after: list[nn.Parameter] = []
    seen = False
    for p in encoder.parameters():
        if id(p) in in_layers:
            seen = True
        else:
            (after if seen else before).append(p)
    head = [nn.ParameterList(before)] if before else []
    return [*head, *layers, *([nn.ParameterList(after)] if after else [])]


def _embedding(out: Any, name: str | None) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if name is not None:
        return getattr(out, name)
    return out.pooler_output  # transformers 5: get_*_features return outputs with the projected pooler


class CLIPImageTower(ImageTower):
    """A dual encoder's image half: images ``[B, 3, S, S]`` -> projected embeddings ``[B, d]``."""

    #: the tower's outputs share one space with a text tower of the same model (zero-shot retrieval)
    zero_shot = True

    def __init__(self, model: str, pretrained: bool = True, weights: str | None = None,
                 image_size: int | None = None) -> None:  # fmt: skip
        super().__init__()
        from transformers import AutoImageProcessor

        if weights is not None:
            raise ValueError(f"{CLIP_PREFIX}{model} takes its weights from the model itself; "
                             "model.image_weights must be null (a fine-tuned tower is saved with the run)")
        config = load_config(model)
        self.model_name = str(model)
        self.processor = _load(model, AutoImageProcessor)
        self.encoder, self._output = load_encoder(model, config, "image", pretrained)
        self.pretrained = pretrained
        crop = getattr(self.processor, "crop_size", None) or getattr(self.processor, "size", None) or {}
        side = _side(crop)
        self.image_size = side or int(getattr(getattr(config, "vision_config", config), "image_size", 224))
        if image_size is not None and int(image_size) != self.image_size:
            logger.info("%s%s: images are prepared at the model's own %d pixels (model.image_size %s is "
                        "for other towers)", CLIP_PREFIX, model, self.image_size, image_size)  # fmt: skip
        self.mean = tuple(float(v) for v in self.processor.image_mean)
        self.std = tuple(float(v) for v in self.processor.image_std)
        with torch.no_grad():
            was = self.encoder.training
            self.feature_dim = int(self._embed(torch.zeros(1, 3, self.image_size, self.image_size)).shape[-1])
            self.encoder.train(was)

    def preprocess(self, img: Image.Image) -> torch.Tensor:
        """The model's image processor on one RGB image -> ``[3, S, S]`` float."""
        return self.processor(images=img.convert("RGB"), return_tensors="pt")["pixel_values"][0]

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        if self._output is not None:
            return _embedding(self.encoder(pixel_values=x), self._output)
        return _embedding(self.encoder.get_image_features(pixel_values=x), None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 3, S, S]`` (from ``preprocess``) -> L2-normalised embeddings ``[B, d]``."""
        return F.normalize(self._embed(x).float(), dim=-1)

    def blocks(self) -> list[nn.Module]:
        part = getattr(self.encoder, "vision_model", self.encoder)
        return encoder_blocks(part) + _projection(self.encoder, "visual_projection")


class CLIPTextTower(HFTextTower):
    """A dual encoder's text half: token batches -> projected embeddings ``[B, d]``.

    Tokenizing, reading and checking queries are those of ``HFTextTower`` (the model's own
    tokenizer); the embedding is the model's pooled and projected text output.
    """

    zero_shot = True

    def __init__(self, model: str, pretrained: bool = True, max_length: int | None = None,
                 normalize: bool = True) -> None:  # fmt: skip
        nn.Module.__init__(self)
        from transformers import AutoTokenizer

        config = load_config(model)
        self.model_name = str(model)
        self.tokenizer = _load(model, AutoTokenizer)
        self.encoder, self._output = load_encoder(model, config, "text", pretrained)
        self.pretrained = pretrained
        self.normalize = normalize
        text_config = getattr(config, "text_config", None) or config
        context = int(getattr(text_config, "max_position_embeddings", DEFAULT_CONTEXT) or DEFAULT_CONTEXT)
        self.max_length = min(int(max_length), context) if max_length else context
        with torch.no_grad():
            was = self.encoder.training
            self.feature_dim = int(self.forward(**self.tokenize(["a"])).shape[-1])
            self.encoder.train(was)

    def forward(self, **batch: torch.Tensor) -> torch.Tensor:
        """Token batch from ``tokenize`` -> embeddings ``[B, d]`` (L2-normalised unless not ``normalize``)."""
        if "bow" in batch:
            raise ValueError(f"{CLIP_PREFIX}{self.model_name} reads text, and this dataset gives its text as "
                             "bag-of-words vectors only: use its captions (data/README.md, CLIP recipes)")
        inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}
        if self._output is not None:
            emb = _embedding(self.encoder(**inputs), self._output)
        else:
            emb = _embedding(self.encoder.get_text_features(**inputs), None)
        return F.normalize(emb.float(), dim=-1) if self.normalize else emb.float()

    def blocks(self) -> list[nn.Module]:
        part = getattr(self.encoder, "text_model", self.encoder)
        return encoder_blocks(part) + _projection(self.encoder, "text_projection")


def _projection(encoder: nn.Module, name: str) -> list[nn.Module]:
    """The projection layer of a CLIP half when it sits outside the part ``encoder_blocks`` split."""
    layer = getattr(encoder, name, None)
    return [layer] if isinstance(layer, nn.Module) and layer is not encoder else []


def _side(size: Any) -> int | None:
    """The square side a processor's ``crop_size`` / ``size`` gives (dict or SizeDict), if any."""
    get = size.get if isinstance(size, dict) else (lambda k, d=None: getattr(size, k, d))
    for key in ("height", "shortest_edge", "width"):
        value = get(key, None)
        if value:
            return int(value)
    return None


@IMAGE_TOWERS.register_prefix(CLIP_PREFIX)
def _clip_image(model: str, pretrained: bool = True, weights: str | None = None,
                image_size: int | None = None) -> ImageTower:  # fmt: skip
    return CLIPImageTower(model, pretrained=pretrained, weights=weights, image_size=image_size)


@TEXT_TOWERS.register_prefix(CLIP_PREFIX)
def _clip_text(model: str, pretrained: bool = True, max_length: int | None = None,
               normalize: bool = True) -> HFTextTower:  # fmt: skip
    return CLIPTextTower(model, pretrained=pretrained, max_length=max_length, normalize=normalize)
