"""A run's exported query encoders: ONNX files, and what reading them without torch needs.

``crossmodal export`` (``crossmodal.jobs.export``) writes into the run folder:

    text_encoder.onnx    the text tower's inputs -> continuous codes ``[B, bits]`` (tower, hash
                         head and output activation: the model's output before the sign)
    image_encoder.onnx   preprocessed images ``float32 [B, 3, S, S]`` -> continuous codes
    tokenizer.json       a transformer tower's tokenizer, in the format of ``tokenizers``
    encoders.json        ``EncoderSpec``: code length, activation, bit weights, how texts become
                         the text encoder's inputs, image size, mean and std, the checksums of
                         the model files the encoders were exported from, and the export check
    *.int8.onnx          with ``--int8``: dynamically quantised copies (never used by default)

Bag-of-words towers read the run's own ``vocab.json``. ``OnnxEncoders`` runs these files
with ``onnxruntime``, ``tokenizers`` and numpy, importing no torch: resizing and normalising
images is ``crossmodal.images.image_array``, the same function the torch towers call, and
queries are checked by the same functions of ``crossmodal.text`` with the same messages.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from crossmodal.images import image_array
from crossmodal.text import (
    NO_WORD_LIST_MESSAGE,
    BowVocabulary,
    QueryError,
    check_query,
    normalize_text,
    read_vocab_query,
    split_tokens,
    unknown_query_words,
)

ENCODERS_FILE = "encoders.json"
TEXT_ENCODER = "text_encoder.onnx"
IMAGE_ENCODER = "image_encoder.onnx"
TOKENIZER_FILE = "tokenizer.json"
INT8_SUFFIX = ".int8.onnx"
ENCODERS_FORMAT_VERSION = 1
# every file an export may write (int8 copies and the tokenizer only for some)
EXPORT_FILES = (TEXT_ENCODER, IMAGE_ENCODER, TEXT_ENCODER.removesuffix(".onnx") + INT8_SUFFIX,
                IMAGE_ENCODER.removesuffix(".onnx") + INT8_SUFFIX, TOKENIZER_FILE, ENCODERS_FILE)  # fmt: skip
PRECISIONS = ("fp32", "int8")
# How texts become the text encoder's inputs: a ``tokenizers`` tokenizer (transformer towers),
# bag-of-words rows (bow_mlp), word ids (textcnn).
TEXT_KINDS = ("tokenizer", "bow", "ids")
# The model files the encoders come from: a change to either makes them stale.
SOURCE_FILES = ("model.safetensors", "model.json")


class EncoderFileError(ValueError):
    """An exported encoder file is missing, unreadable or of another format."""


def int8_name(name: str) -> str:
    """``text_encoder.onnx`` -> ``text_encoder.int8.onnx``."""
    return name.removesuffix(".onnx") + INT8_SUFFIX


@dataclass
class TextInputSpec:
    """How texts become the text encoder's inputs.

    Attributes:
        kind: one of ``TEXT_KINDS``.
        inputs: the encoder's input names, in order.
        tokenizer: the ``tokenizers`` file (kind ``tokenizer``).
        vocab: the ``BowVocabulary`` file (kinds ``bow`` and ``ids``; None: the tower has no
            word list, and typed text is refused as by the torch tower).
        max_length: tokens (``tokenizer``) or words (``ids``) kept per text.
        unk_id, special_ids, pad_id, pad_type_id: the tokenizer's unknown, special and padding ids.
        binary: bag-of-words rows hold word presence (else counts).
    """

    kind: str
    inputs: list[str]
    tokenizer: str | None = None
    vocab: str | None = None
    max_length: int | None = None
    unk_id: int | None = None
    special_ids: list[int] = field(default_factory=list)
    pad_id: int = 0
    pad_type_id: int = 0
    binary: bool = True


@dataclass
class ImageInputSpec:
    """The image encoder's input: ``image_size`` square, normalised with ``mean`` and ``std``."""

    image_size: int
    mean: list[float]
    std: list[float]


@dataclass
class EncoderSpec:
    """``encoders.json``: everything besides the ONNX files that encoding queries needs.

    Attributes:
        bits: code length.
        activation: the model's output activation (inside the ONNX graphs; recorded).
        bit_weights: learned per-bit ranking weights (DRSCH), or None.
        text, image: how inputs are prepared.
        files: ``{"text": ..., "image": ..., "text_int8": ..., "image_int8": ...}`` file names
            (the int8 ones absent without ``--int8``).
        source: ``{file: sha256}`` of the model files exported (``SOURCE_FILES``).
        check: the export check's report (``crossmodal.jobs.export``).
        exporter: versions and options of the export.
    """

    bits: int
    activation: str
    bit_weights: list[float] | None
    text: TextInputSpec
    image: ImageInputSpec
    files: dict[str, str]
    source: dict[str, str]
    check: dict[str, Any] = field(default_factory=dict)
    exporter: dict[str, Any] = field(default_factory=dict)
    format_version: int = ENCODERS_FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> EncoderSpec:
        """Read what ``to_json`` wrote.

        Raises:
            EncoderFileError: not JSON, another format version, or missing or malformed keys.
        """
        try:
            raw = json.loads(text)
            if raw.get("format_version") != ENCODERS_FORMAT_VERSION:
                raise EncoderFileError(f"format version {raw.get('format_version')}, this crossmodal "
                                       f"reads {ENCODERS_FORMAT_VERSION}")  # fmt: skip
            text, image = TextInputSpec(**raw["text"]), ImageInputSpec(**raw["image"])
            spec = cls(**{**raw, "text": text, "image": image})
        except EncoderFileError:
            raise
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise EncoderFileError(f"{ENCODERS_FILE} is malformed: {exc}") from None
        if spec.text.kind not in TEXT_KINDS or not {"text", "image"} <= set(spec.files):
            raise EncoderFileError(f"{ENCODERS_FILE} is malformed: text kind {spec.text.kind!r}, "
                                   f"files {sorted(spec.files)}")  # fmt: skip
        return spec

    def encoder_files(self, precision: str = "fp32") -> tuple[str, str]:
        """``(text, image)`` ONNX file names of ``precision``.

        Raises:
            EncoderFileError: ``precision`` is unknown, or int8 encoders were not exported.
        """
        if precision not in PRECISIONS:
            raise EncoderFileError(f"unknown precision {precision!r}; known: {', '.join(PRECISIONS)}")
        if precision == "fp32":
            return self.files["text"], self.files["image"]
        if "text_int8" not in self.files or "image_int8" not in self.files:
            raise EncoderFileError("no int8 encoders were exported (crossmodal export --int8 writes them)")
        return self.files["text_int8"], self.files["image_int8"]

    def input_files(self) -> list[str]:
        """The files besides the ONNX ones that the text input reads."""
        return [f for f in (self.text.tokenizer, self.text.vocab) if f]


def read_spec(folder: str | os.PathLike[str]) -> EncoderSpec:
    """The ``encoders.json`` of ``folder``.

    Raises:
        EncoderFileError: missing, unreadable or malformed.
    """
    path = Path(folder) / ENCODERS_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise EncoderFileError(f"cannot read {path}: {exc}") from None
    return EncoderSpec.from_json(text)


# -- text inputs ------------------------------------------------------------------------------------
class TokenizerText:
    """Texts through a ``tokenizers`` tokenizer as the transformer towers tokenize them: NFKC,
    truncated to ``max_length`` tokens with the special tokens, right-padded to the longest."""

    def __init__(self, spec: TextInputSpec, tokenizer: Any) -> None:
        self.spec = spec
        self.tokenizer = tokenizer
        tokenizer.no_padding()  # padded here, in one thread (encode_batch would use every core)
        tokenizer.no_truncation()
        if spec.max_length:
            tokenizer.enable_truncation(spec.max_length)

    def __call__(self, texts: list[str]) -> dict[str, np.ndarray]:
        encodings = [self.tokenizer.encode(normalize_text(t)) for t in texts]
        width = max([1, *(len(e.ids) for e in encodings)])
        columns = {"input_ids": ("ids", self.spec.pad_id), "attention_mask": ("attention_mask", 0),
                   "token_type_ids": ("type_ids", self.spec.pad_type_id)}  # fmt: skip
        out = {}
        for name in self.spec.inputs:
            attr, pad = columns[name]
            arr = np.full((len(texts), width), pad, dtype=np.int64)
            for row, enc in enumerate(encodings):
                values = getattr(enc, attr)
                arr[row, : len(values)] = values
            out[name] = arr
        return out

    def read_query(self, text: str) -> tuple[list[str], list[str]]:
        text = normalize_text(text)
        enc = self.tokenizer.encode(text, add_special_tokens=False)
        return split_tokens(text, enc.ids, enc.tokens, enc.offsets, self.spec.unk_id, self.spec.special_ids)


class VocabText:
    """Texts through a ``BowVocabulary``: bag-of-words rows (``bow``) or word ids (``ids``)."""

    def __init__(self, spec: TextInputSpec, vocab: BowVocabulary | None) -> None:
        self.spec, self.vocab = spec, vocab

    def __call__(self, texts: list[str]) -> dict[str, np.ndarray]:
        if self.vocab is None:
            raise QueryError(NO_WORD_LIST_MESSAGE)
        if self.spec.kind == "bow":
            return {self.spec.inputs[0]: self.vocab.encode_bow(list(texts), binary=self.spec.binary)}
        return {self.spec.inputs[0]: self.vocab.encode_ids(list(texts), int(self.spec.max_length or 1))}

    def read_query(self, text: str) -> tuple[list[str], list[str]]:
        return read_vocab_query(self.vocab, text)


def load_text_input(spec: TextInputSpec, locate: Callable[[str], Path]) -> TokenizerText | VocabText:
    """The text input ``spec`` describes, reading its files where ``locate(name)`` says.

    Raises:
        EncoderFileError: a file is missing or unreadable.
        ImportError: ``tokenizers`` is not installed (kind ``tokenizer``).
    """
    if spec.kind == "tokenizer":
        try:
            from tokenizers import Tokenizer
        except ImportError as exc:
            raise ImportError("exported transformer text encoders need the package tokenizers "
                              "(pip install tokenizers)") from exc  # fmt: skip
        path = locate(str(spec.tokenizer))
        try:
            return TokenizerText(spec, Tokenizer.from_file(str(path)))
        except Exception as exc:  # tokenizers raises its own exception type for bad files
            raise EncoderFileError(f"cannot read the tokenizer {path}: {exc}") from None
    vocab = None
    if spec.vocab:
        path = locate(spec.vocab)
        try:
            vocab = BowVocabulary.from_json(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise EncoderFileError(f"cannot read the vocabulary {path}: {exc}") from None
    return VocabText(spec, vocab)


# -- the encoders ---------------------------------------------------------------------------------------
def session_options(threads: int | None) -> Any:
    """onnxruntime options for one query at a time: ``threads`` intra-op threads (None: its
    default), one inter-op thread, and no spinning of idle threads (cores are shared)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = int(threads)
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # errors only: the ONNX files' own warnings are not the user's
    return options


def open_session(path: Path, threads: int | None) -> Any:
    """An onnxruntime CPU session of the ONNX file ``path``.

    Raises:
        ImportError: onnxruntime is not installed.
        EncoderFileError: the file is missing or not a model onnxruntime can run.
    """
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise ImportError("exported encoders need the package onnxruntime (pip install onnxruntime)") from exc
    if not path.is_file():
        raise EncoderFileError(f"{path} is missing")
    try:
        return ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's own error types (Fail, InvalidGraph, ...)
        raise EncoderFileError(f"{path} is not a model onnxruntime can run: {exc}") from None


class OnnxEncoders:
    """A run's exported query encoders, run by onnxruntime: texts and images -> continuous codes.

    encoders = OnnxEncoders.load("runs/openmoji")
    encoders.encode_texts(["cat"])  # float32 [1, bits]
    """

    backend = "onnx"

    def __init__(self, spec: EncoderSpec, text_session: Any, image_session: Any,
                 text_input: TokenizerText | VocabText, files: Sequence[str]) -> None:  # fmt: skip
        self.spec = spec
        self.bits = int(spec.bits)
        self.bit_weights = None if spec.bit_weights is None else np.asarray(spec.bit_weights, np.float64)
        self.text_session, self.image_session, self.text_input = text_session, image_session, text_input
        self.files = tuple(files)  # the files read, for the caller's checksum check
        # an exporter may drop an input the graph does not use (a constant token type, say)
        self._text_names = {i.name for i in text_session.get_inputs()}
        self._image_name = image_session.get_inputs()[0].name

    @classmethod
    def load(
        cls,
        folder: str | os.PathLike[str],
        threads: int | None = 1,
        precision: str = "fp32",
        fallback: str | os.PathLike[str] | None = None,
    ) -> OnnxEncoders:
        """Open the exported encoders in ``folder`` (a run folder, or an export's staging folder).

        Args:
            threads: intra-op threads of each onnxruntime session (one query is fastest on one).
            precision: ``"fp32"``, or ``"int8"`` for the quantised copies of ``--int8``.
            fallback: where files missing from ``folder`` are read (the run folder of a staging
                folder, which holds only the new files).

        Raises:
            EncoderFileError: a file is missing, unreadable or of another format.
            ImportError: onnxruntime (or tokenizers, for a transformer text tower) is missing.
        """
        folder = Path(folder)

        def locate(name: str) -> Path:
            return folder / name if fallback is None or (folder / name).exists() else Path(fallback) / name

        spec = read_spec(folder)
        text_file, image_file = spec.encoder_files(precision)
        text_input = load_text_input(spec.text, locate)
        text_session = open_session(locate(text_file), threads)
        image_session = open_session(locate(image_file), threads)
        files = (ENCODERS_FILE, text_file, image_file, *spec.input_files())
        return cls(spec, text_session, image_session, text_input, files)

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """Continuous codes ``float32 [n, bits]`` of ``texts`` (not checked: see ``check_query``)."""
        if not texts:
            return np.zeros((0, self.bits), np.float32)
        feeds = {k: v for k, v in self.text_input(list(texts)).items() if k in self._text_names}
        return self.text_session.run(None, feeds)[0].astype(np.float32, copy=False)

    def encode_images(self, images: list[Image.Image]) -> np.ndarray:
        """Continuous codes ``float32 [n, bits]`` of decoded images (``crossmodal.images.open_image``)."""
        if not images:
            return np.zeros((0, self.bits), np.float32)
        im = self.spec.image
        pixels = np.stack([image_array(img, im.image_size, tuple(im.mean), tuple(im.std)) for img in images])
        return self.image_session.run(None, {self._image_name: pixels})[0].astype(np.float32, copy=False)

    def check_query(self, text: str) -> None:
        """``QueryError`` for a query the text tower cannot encode (``crossmodal.text.check_query``)."""
        check_query(text, self.text_input.read_query)

    def unknown_words(self, text: str) -> list[str]:
        """Words of a usable query that the text tower cannot represent (it answers from the others)."""
        return unknown_query_words(text, self.text_input.read_query)
