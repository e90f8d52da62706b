"""The export job: a run's query encoders as ONNX files, checked against the torch model.

``export_run`` writes the files ``crossmodal.runs.exported`` describes (the text and image
encoders, a transformer tower's tokenizer, ``encoders.json``) into the run folder through
``RunUpdate``, under the run's lock. Before anything is listed, the new encoders, run as the
torch-free engine runs them (``OnnxEncoders``: the tokenizer or vocabulary, numpy image
preprocessing, onnxruntime), encode the run's own texts (the store's captions) and images
(the store's images), and their codes are compared with the torch model's on the same inputs
(``compare_codes``). For fp32 every bit must agree, except where the torch value before the
sign is within ``CHECK_TOLERANCE`` of zero, where float rounding decides the sign (those
values are counted); otherwise nothing is written and ``ExportCheckError`` says what differs.

``int8=True`` adds dynamically quantised copies (onnxruntime's ``quantize_dynamic``, matrix
products only: ``quantize``); their agreement is reported beside fp32 and never required, and
the engine uses them only when asked (``RetrievalEngine.load(..., precision="int8")``).

The exporter is torch's TorchScript-based one (``dynamo=False``): it traces the towers
in a few seconds and needs no package beyond ``onnx``. ``exporter="dynamo"`` uses the
``torch.export``-based one (it needs ``onnxscript``); on the default run both give codes
equal to torch's.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from crossmodal.codes import sign
from crossmodal.images import ImageDecodeError, open_image
from crossmodal.models.hasher import TwoTowerHasher
from crossmodal.models.image import ImageTower
from crossmodal.models.text import VOCAB_FILE, BowMLPTower, HFTextTower, TextCNNTower
from crossmodal.runs.exported import (
    ENCODERS_FILE,
    EXPORT_FILES,
    IMAGE_ENCODER,
    TEXT_ENCODER,
    TOKENIZER_FILE,
    EncoderSpec,
    ImageInputSpec,
    OnnxEncoders,
    TextInputSpec,
    int8_name,
)
from crossmodal.runs.folder import RunError, RunUpdate, check_run, lock_run, recover_run, verify_files
from crossmodal.runs.model import MODEL_SPEC, WEIGHTS, load_model, read_spec
from crossmodal.store import MetadataStore

log = logging.getLogger(__name__)

CHECK_TOLERANCE = 1e-5
OPSET = 17
EXPORTERS = ("torchscript", "dynamo")
CHECK_BATCH = 64
QUANTIZED_OPS = ["MatMul", "Gemm"]
TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
# two texts of different lengths: the traced graph must keep the attention mask of padded batches
TRACE_TEXTS = ["a photo", "a photo of a red heart beside a small cat"]


class ExportError(RunError):
    """A run's model cannot be exported, or its exported encoders disagree with it."""


class ExportCheckError(ExportError):
    """The exported fp32 encoders give other codes than the torch model; ``report`` says where."""

    def __init__(self, message: str, report: dict[str, Any]) -> None:
        super().__init__(message)
        self.report = report


def export_run(
    run_dir: str | os.PathLike[str],
    int8: bool = False,
    check_limit: int | None = None,
    exporter: str = "torchscript",
    command: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Export the query encoders of a trained, indexed run and list them in its manifest.

    Args:
        int8: also write dynamically quantised int8 copies (reported, never the default).
        check_limit: check at most this many texts and as many images, spread over the store
            (None: all of them).
        exporter: ``"torchscript"`` (default) or ``"dynamo"``.
        command: the command line recorded in the run's lock and journal.

    Returns:
        ``{"files": {name: bytes}, "check": report, "seconds": float}``; the report as
        ``check_export`` gives it.

    Raises:
        RunError: the run is untrained, unindexed or damaged.
        ExportError: a tower that cannot be exported (the message says which and why).
        ExportCheckError: the fp32 encoders disagree with the torch model (nothing is written).
        RunBusyError: another process is writing the run.
    """
    if exporter not in EXPORTERS:
        raise ValueError(f"unknown exporter {exporter!r}; known: {', '.join(EXPORTERS)}")
    run_dir = Path(run_dir)
    default = f"crossmodal export --run {run_dir}" + (" --int8" if int8 else "")
    with lock_run(run_dir, command or default):
        recover_run(run_dir)
        return _export(run_dir, int8, check_limit, exporter, progress)


def _export(
    run_dir: Path, int8: bool, check_limit: int | None, exporter: str, progress: bool
) -> dict[str, Any]:
    started = time.perf_counter()
    manifest = check_run(run_dir, need=(WEIGHTS, MODEL_SPEC, "store.sqlite"))
    tower_files = tuple(read_spec(run_dir).tower_files)
    verify_files(run_dir, manifest, (WEIGHTS, MODEL_SPEC, *tower_files, "store.sqlite"))
    model = load_model(run_dir)
    model.image_tower = model.image_tower.for_inference()  # what the torch engine encodes with
    text_input, tokenizer_json = text_input_spec(model, tower_files)
    image_input = image_input_spec(model.image_tower)
    files = {"text": TEXT_ENCODER, "image": IMAGE_ENCODER}
    if int8:
        files.update(text_int8=int8_name(TEXT_ENCODER), image_int8=int8_name(IMAGE_ENCODER))
    weights = None if model.bit_weights is None else [float(w) for w in model.bit_weights.tolist()]
    spec = EncoderSpec(
        bits=model.bits, activation=model.activation, bit_weights=weights, text=text_input, image=image_input,
        files=files, source={name: manifest["files"][name] for name in (WEIGHTS, MODEL_SPEC)},
        exporter={"exporter": exporter, "opset": OPSET if exporter == "torchscript" else None,
                  "torch": torch.__version__},
    )  # fmt: skip
    store = MetadataStore.open(run_dir / "store.sqlite")
    try:
        texts, images = run_texts(store, check_limit), run_images(run_dir, store, check_limit)
    finally:
        store.close()
    with RunUpdate(run_dir) as update:
        export_text(model, text_input, update.path(TEXT_ENCODER), exporter)
        export_image(model, image_input, update.path(IMAGE_ENCODER), exporter)
        if tokenizer_json is not None:
            update.path(TOKENIZER_FILE).write_text(tokenizer_json, encoding="utf-8")
        if int8:
            for name in (TEXT_ENCODER, IMAGE_ENCODER):
                quantize(update.path(name), update.path(int8_name(name)))
        update.path(ENCODERS_FILE).write_text(spec.to_json(), encoding="utf-8")
        report = check_export(
            model, update.path(ENCODERS_FILE).parent, run_dir, texts, images, int8, progress
        )
        spec.check = report
        update.path(ENCODERS_FILE).write_text(spec.to_json(), encoding="utf-8")
        staged = {
            name: update.path(name).stat().st_size for name in EXPORT_FILES if update.path(name).exists()
        }
        update.forget(*[n for n in EXPORT_FILES if n in manifest["files"] and n not in staged])
        update.commit()
    seconds = round(time.perf_counter() - started, 2)
    log.info("exported %s in %.1f s", ", ".join(staged), seconds)
    return {"files": staged, "check": report, "seconds": seconds}


# -- what the loader needs ----------------------------------------------------------------------------
def text_input_spec(model: TwoTowerHasher, tower_files: tuple[str, ...]) -> tuple[TextInputSpec, str | None]:
    """How texts become the text encoder's inputs, and a transformer tower's tokenizer file.

    Raises:
        ExportError: a tower kind that has no torch-free input (named), or a slow tokenizer.
    """
    tower = model.text_tower
    if isinstance(tower, HFTextTower):
        return _tokenizer_input(tower)
    vocab = VOCAB_FILE if getattr(tower, "vocab", None) is not None and VOCAB_FILE in tower_files else None
    if isinstance(tower, BowMLPTower):
        return TextInputSpec(kind="bow", inputs=["bow"], vocab=vocab, binary=bool(tower.binary)), None
    if isinstance(tower, TextCNNTower):
        spec = TextInputSpec(kind="ids", inputs=["input_ids"], vocab=vocab, max_length=int(tower.max_len))
        return spec, None
    raise ExportError(f"text tower {type(tower).__name__} cannot be exported: only transformer (hf:, "
                      "minilm), bow_mlp and textcnn towers have inputs prepared without torch")  # fmt: skip


def _tokenizer_input(tower: HFTextTower) -> tuple[TextInputSpec, str]:
    from tokenizers import Tokenizer

    tok = tower.tokenizer
    if not getattr(tok, "is_fast", False):
        raise ExportError(f"the tokenizer of {tower.model_name} is a slow (Python) one; only fast tokenizers "
                          "can be saved for the tokenizers package")  # fmt: skip
    names = list(tower.tokenize(["a"]).keys())
    if not set(names) <= set(TOKEN_INPUTS) or "input_ids" not in names:
        raise ExportError(f"the tokenizer of {tower.model_name} gives inputs {names}; "
                          f"exported encoders take {', '.join(TOKEN_INPUTS)}")  # fmt: skip
    backend = Tokenizer.from_str(tok.backend_tokenizer.to_str())
    backend.no_padding()  # the loader pads, as the tower's tokenizer does: to the longest text
    backend.enable_truncation(int(tower.max_length))
    spec = TextInputSpec(
        kind="tokenizer",
        inputs=names,
        tokenizer=TOKENIZER_FILE,
        max_length=int(tower.max_length),
        unk_id=tok.unk_token_id,
        special_ids=[int(i) for i in tok.all_special_ids],
        pad_id=int(tok.pad_token_id or 0),
        pad_type_id=int(getattr(tok, "pad_token_type_id", 0) or 0),
    )
    return spec, backend.to_str()  # fmt: skip


def image_input_spec(tower: ImageTower) -> ImageInputSpec:
    """The image encoder's input size and normalisation.

    Raises:
        ExportError: the tower prepares images its own way (its ``preprocess`` is overridden).
    """
    if getattr(type(tower), "preprocess", None) is not ImageTower.preprocess:
        raise ExportError(f"image tower {type(tower).__name__} prepares images its own way; only towers "
                          "using ImageTower.preprocess (resize and normalise) can be exported")  # fmt: skip
    return ImageInputSpec(image_size=int(tower.image_size), mean=[float(v) for v in tower.mean],
                      std=[float(v) for v in tower.std])  # fmt: skip


# -- writing the ONNX files ---------------------------------------------------------------------------
class TextEncoder(nn.Module):
    """The text tower, head and activation, taking the tower's inputs in a fixed order."""

    def __init__(self, model: TwoTowerHasher, names: list[str]) -> None:
        super().__init__()
        self.model, self.names = model, list(names)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(dict(zip(self.names, inputs)))


class ImageEncoder(nn.Module):
    """The image tower, head and activation: ``[B, 3, S, S]`` -> continuous codes ``[B, bits]``."""

    def __init__(self, model: TwoTowerHasher) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels)


def trace_inputs(model: TwoTowerHasher, spec: TextInputSpec) -> tuple[torch.Tensor, ...]:
    """Example inputs of two texts of different lengths (a padded batch) for the exporter."""
    tower = model.text_tower
    if spec.kind == "bow" and getattr(tower, "vocab", None) is None:
        return (torch.zeros(2, int(tower.vocab_size or 1)),)
    batch = tower.tokenize(TRACE_TEXTS)
    if spec.kind == "tokenizer" and bool(batch["attention_mask"].all()):
        raise ExportError("the example texts tokenize to one length; the exporter needs a padded batch")
    return tuple(batch[name] for name in spec.inputs)


def export_text(model: TwoTowerHasher, spec: TextInputSpec, path: Path, exporter: str) -> None:
    """Write the text encoder: inputs ``spec.inputs`` -> ``codes [B, bits]``."""
    args = trace_inputs(model, spec)
    dynamic = {
        name: ({0: "batch"} if spec.kind == "bow" else {0: "batch", 1: "length"}) for name in spec.inputs
    }
    _onnx_export(TextEncoder(model, spec.inputs), args, path, spec.inputs, dynamic, exporter)


def export_image(model: TwoTowerHasher, spec: ImageInputSpec, path: Path, exporter: str) -> None:
    """Write the image encoder: ``pixels [B, 3, S, S]`` -> ``codes [B, bits]``."""
    pixels = torch.zeros(2, 3, spec.image_size, spec.image_size)
    _onnx_export(ImageEncoder(model), (pixels,), path, ["pixels"], {"pixels": {0: "batch"}}, exporter)


def _onnx_export(module: nn.Module, args: tuple[torch.Tensor, ...], path: Path, names: list[str],
                 dynamic: dict[str, dict[int, str]], exporter: str) -> None:  # fmt: skip
    module.eval()
    with torch.no_grad(), warnings.catch_warnings():
        # The tracer warns of every Python branch it fixes (shapes the example shares with any batch)
        # and the exporter of its own steps; the check after the export is what vouches for the graph.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*TorchScript-based ONNX")
        for category in (DeprecationWarning, UserWarning):
            warnings.filterwarnings("ignore", category=category, module=r"torch\.onnx")
        if exporter == "dynamo":
            shapes: Any = tuple({axis: torch.export.Dim.AUTO for axis in dynamic[name]} for name in names)
            if isinstance(module, TextEncoder):  # torch.export sees its ``*inputs`` as one tuple
                shapes = (shapes,)
            # its own opset: converting its graph down to OPSET can fail
            torch.onnx.export(module, args, str(path), input_names=names, output_names=["codes"],
                              dynamic_shapes=shapes, dynamo=True, external_data=False,
                              verbose=False)  # fmt: skip
        else:
            torch.onnx.export(module, args, str(path), input_names=names, output_names=["codes"],
                              dynamic_axes={**dynamic, "codes": {0: "batch"}}, opset_version=OPSET,
                              dynamo=False)  # fmt: skip


def quantize(src: Path, dst: Path) -> None:
    """Dynamic int8 quantisation (onnxruntime) of the matrix products of ``src``, written to ``dst``.

    Convolutions stay in float: quantised (ConvInteger), EfficientNet-Lite0's flipped a fifth of
    the bits of the default run's image codes and ran ten times slower than in float; with its
    head alone quantised, 94 % of the codes stay identical.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quiet = _DropWarnings("onnxruntime")  # it warns on the root logger of every tensor it skips
    logging.getLogger().addFilter(quiet)
    try:
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=QUANTIZED_OPS)
    finally:
        logging.getLogger().removeFilter(quiet)


class _DropWarnings(logging.Filter):
    """Drops records below ERROR logged from files of ``package``."""

    def __init__(self, package: str) -> None:
        super().__init__()
        self.package = package

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or self.package not in record.pathname


# -- the check -------------------------------------------------------------------------------------------
def spread(n: int, limit: int | None) -> np.ndarray:
    """Positions of at most ``limit`` of ``n`` things, spread evenly (all when ``limit`` is None)."""
    if limit is None or limit >= n:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, max(int(limit), 1)).round().astype(np.int64))


def run_texts(store: MetadataStore, limit: int | None) -> list[str]:
    """The store's captions (at most ``limit``, spread over it)."""
    texts = [t["caption"] for t in store.get_texts(range(store.max_text_id() + 1), missing="none") if t]
    return [texts[i] for i in spread(len(texts), limit)]


def run_images(run_dir: Path, store: MetadataStore, limit: int | None) -> list[Path]:
    """The paths of the store's images (at most ``limit``, spread over it)."""
    paths = [Path(i["image_path"]) for i in store.get_items(store.item_ids(), missing="none")
             if i and i["image_path"]]  # fmt: skip
    return [paths[i] if paths[i].is_absolute() else run_dir / paths[i] for i in spread(len(paths), limit)]


def compare_codes(ref: np.ndarray, got: np.ndarray, tolerance: float = CHECK_TOLERANCE) -> dict[str, Any]:
    """How far codes ``got`` are from the reference ``ref``, both continuous ``float [n, bits]``.

    Returns:
        ``codes`` compared, ``bits`` compared, ``identical_codes`` (every sign equal),
        ``differing_bits``, ``near_zero`` (reference values within ``tolerance`` of zero, whose
        sign float rounding decides), ``differing_beyond`` (differing bits whose reference value
        is farther from zero: a real disagreement), ``max_abs_diff``.
    """
    assert ref.shape == got.shape and ref.ndim == 2, (ref.shape, got.shape)
    differ = sign(ref) != sign(got)  # [n, bits]
    near = np.abs(ref) <= tolerance
    return {
        "codes": int(ref.shape[0]), "bits": int(ref.size),
        "identical_codes": int((~differ.any(axis=1)).sum()),
        "differing_bits": int(differ.sum()), "near_zero": int(near.sum()),
        "differing_beyond": int((differ & ~near).sum()),
        "max_abs_diff": float(np.abs(ref.astype(np.float64) - got).max()) if ref.size else 0.0,
    }  # fmt: skip


def torch_codes(model: TwoTowerHasher, inputs: list[Any], modality: str) -> np.ndarray:
    """Continuous codes ``float32 [n, bits]`` of the torch model, as the torch engine encodes them."""
    with torch.no_grad():
        if modality == "text":
            return model.encode_text(model.text_tower.tokenize(inputs)).float().numpy()
        x = torch.stack([model.image_tower.preprocess(img) for img in inputs])
        return model.encode_image(x).float().numpy()


def _decoded(paths: list[Path]) -> tuple[list[Image.Image], int]:
    images, unreadable = [], 0
    for path in paths:
        try:
            images.append(open_image(path))
        except ImageDecodeError:
            unreadable += 1
    return images, unreadable


def check_export(model: TwoTowerHasher, staged: Path, run_dir: Path, texts: list[str],
                 image_paths: list[Path], int8: bool, progress: bool = False) -> dict[str, Any]:  # fmt: skip
    """Compare the staged encoders' codes with the torch model's on ``texts`` and the images at
    ``image_paths``, in batches of ``CHECK_BATCH`` (the same batches for both).

    Raises:
        ExportCheckError: an fp32 bit differs beyond ``CHECK_TOLERANCE`` of zero.
    """
    if getattr(model.text_tower, "vocab", True) is None:  # a tower without words reads no text
        texts = []
    precisions = ("fp32", "int8") if int8 else ("fp32",)
    encoders = {p: OnnxEncoders.load(staged, threads=None, precision=p, fallback=run_dir) for p in precisions}
    codes: dict[str, dict[str, list[np.ndarray]]] = {
        p: {"text": [], "image": []} for p in ("torch", *precisions)
    }
    report: dict[str, Any] = {"tolerance": CHECK_TOLERANCE, "unreadable_images": 0}
    chunks = [("text", texts[s : s + CHECK_BATCH]) for s in range(0, len(texts), CHECK_BATCH)]
    chunks += [("image", image_paths[s : s + CHECK_BATCH]) for s in range(0, len(image_paths), CHECK_BATCH)]
    for modality, chunk in tqdm(chunks, desc="export check", disable=not progress):
        if modality == "image":
            chunk, unreadable = _decoded(chunk)
            report["unreadable_images"] += unreadable
        if not chunk:
            continue
        codes["torch"][modality].append(torch_codes(model, chunk, modality))
        for p in precisions:
            encode = encoders[p].encode_texts if modality == "text" else encoders[p].encode_images
            codes[p][modality].append(encode(chunk))
    for p in precisions:
        ref = {m: _joined(codes["torch"][m], model.bits) for m in ("text", "image")}
        report[p] = {m: compare_codes(ref[m], _joined(codes[p][m], model.bits)) for m in ref}
    beyond = {m: r["differing_beyond"] for m, r in report["fp32"].items() if r["differing_beyond"]}
    if beyond:
        raise ExportCheckError(
            "the exported encoders disagree with the torch model: "
            + "; ".join(f"{n} {m} bits differ beyond {CHECK_TOLERANCE:g} of zero" for m, n in beyond.items())
            + "; nothing was written", report)  # fmt: skip
    return report


def _joined(parts: list[np.ndarray], bits: int) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros((0, bits), np.float32)


def describe_check(report: dict[str, Any]) -> list[str]:
    """One line per precision and modality of an export check, for the command line."""
    lines = []
    for precision in ("fp32", "int8"):
        for modality, r in report.get(precision, {}).items():
            lines.append(
                f"{precision} {modality}s: {r['identical_codes']}/{r['codes']} codes identical, "
                f"{r['differing_bits']} of {r['bits']} bits differ ({r['differing_beyond']} beyond "
                f"{report['tolerance']:g} of zero; {r['near_zero']} values within it), "
                f"max |difference| {r['max_abs_diff']:.2g}"
            )
    if report.get("unreadable_images"):
        lines.append(f"{report['unreadable_images']} images of the store could not be read (not checked)")
    return lines
