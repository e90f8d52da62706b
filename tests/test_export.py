"""ONNX export of a run's query encoders, and serving it without torch.

Every exported run is served twice, by the exported encoders (``backend="onnx"``) and by the
torch model (``backend="torch"``), and the two engines must give the same codes, the same hits
and the same messages on the same queries, bad ones included.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import faiss
import numpy as np
import pytest
from PIL import Image

from crossmodal.codes import pack_codes
from crossmodal.images import ImageDecodeError
from crossmodal.runs.exported import ENCODERS_FILE, EXPORT_FILES, IMAGE_ENCODER, TEXT_ENCODER, int8_name
from crossmodal.runs.folder import RunError, RunUpdate, read_manifest
from crossmodal.serving import RetrievalEngine
from crossmodal.text import EMPTY_QUERY_MESSAGE, QueryError

ROOT = Path(__file__).resolve().parents[1]
GOOD_TEXTS = ["red", "a blue star", "green circle zebra", "Yellow SQUARE!", "cre\u0300me red"]
# empty, blank, zero-width and format characters, no word at all, only unknown words, a non-string
BAD_TEXTS = ["", "   \n", "\u200b", "\u200b \ufeff\u00ad", "!!!", "zebra", "zebra 🍎", 42]
NOT_LOADED = ("torch", "transformers", "datasets", "crossmodal.fit", "crossmodal.losses", "crossmodal.jobs",
              "crossmodal.data", "crossmodal.models", "crossmodal.runs.model",
              "crossmodal.runs.encode")  # fmt: skip


def export_copy(run: Path, dest: Path, **options) -> tuple[Path, dict]:
    """A copy of ``run`` (without its checkpoint) in ``dest``, exported."""
    from crossmodal.jobs.export import export_run

    copy = dest / run.name
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("checkpoint"))
    return copy, export_run(copy, progress=False, **options)


def trained_copy(workdir: Path, dest: Path, name: str, *overrides: str, **options) -> tuple[Path, dict]:
    """A tiny run trained with ``overrides``, indexed and exported."""
    from tinyrun import tiny_config

    from crossmodal.jobs.index import index_run
    from crossmodal.jobs.train import train_run

    run = train_run(tiny_config(workdir, f"name={name}", "train.epochs=4", *overrides), progress=False)
    index_run(run, progress=False)
    return export_copy(run, dest, **options)


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory) -> tuple[Path, dict]:
    """The tiny run (bag-of-words text tower), exported with int8 copies: read only."""
    return export_copy(tiny_run, tmp_path_factory.mktemp("exported"), int8=True)


@pytest.fixture(scope="module")
def engines(exported):
    """``(onnx, torch)`` engines on the exported tiny run."""
    run, _ = exported
    pair = RetrievalEngine.load(run, backend="onnx"), RetrievalEngine.load(run, backend="torch")
    yield pair
    for engine in pair:
        engine.close()


def store_images(run: Path, n: int) -> list[Path]:
    images = sorted((run / "images").glob("*.png"))
    assert len(images) >= n
    return images[:: max(1, len(images) // n)][:n]


def hits(result) -> list[tuple[int, float, int | None]]:
    return [(h.item_id, h.distance, h.text_id) for h in result.hits]


def error_of(call, *args) -> str:
    """The error ``call(*args)`` raises for a bad query, or its hits when the query is accepted."""
    try:
        return f"answered: {hits(call(*args))}"
    except (QueryError, ImageDecodeError) as exc:
        return f"{type(exc).__name__}: {exc}"


def assert_same_answers(onnx: RetrievalEngine, torch_: RetrievalEngine, texts, images, k: int = 8) -> None:
    """Both engines give the same codes (every sign, values within 1e-5), hits and messages."""
    from crossmodal.jobs.export import compare_codes

    assert onnx.backend == "onnx" and torch_.backend == "torch"
    for encode, queries in (("encode_texts", texts), ("encode_images", images)):
        a = getattr(onnx, encode)(queries, binarize=False)
        b = getattr(torch_, encode)(queries, binarize=False)
        np.testing.assert_allclose(a, b, atol=1e-5)
        assert compare_codes(b, a)["differing_bits"] == 0
        np.testing.assert_array_equal(pack_codes(a), getattr(onnx, encode)(queries))
    for method, queries in (("search_text", texts), ("similar_texts", texts),
                            ("search_image", images), ("similar_images", images)):  # fmt: skip
        for query in queries:
            a, b = getattr(onnx, method)(query, k), getattr(torch_, method)(query, k)
            assert hits(a) == hits(b) and a.code_hex == b.code_hex, (method, query)
    for batch in ("search_text_batch", "search_image_batch"):
        queries = texts if batch == "search_text_batch" else images
        a, b = getattr(onnx, batch)(queries, k), getattr(torch_, batch)(queries, k)
        assert [hits(r) for r in a] == [hits(r) for r in b]
    for query in BAD_TEXTS:
        for method in ("search_text", "similar_texts"):
            message = error_of(getattr(onnx, method), query, k)
            assert message == error_of(getattr(torch_, method), query, k)
            assert query == "!!!" or message.startswith("QueryError: "), (query, message)
    for query in [*texts, *(q for q in BAD_TEXTS if isinstance(q, str))]:
        assert onnx.ignored_words(query) == torch_.ignored_words(query)
    for bad in (b"", b"not an image", b"<svg xmlns='http://www.w3.org/2000/svg'/>"):
        message = error_of(onnx.search_image, bad, k)
        assert message == error_of(torch_.search_image, bad, k) and message.startswith("ImageDecodeError: ")


# -- the check ------------------------------------------------------------------------------------------
def test_compare_codes_counts_near_zero_values_apart():
    from crossmodal.jobs.export import compare_codes

    ref = np.array([[0.5, -0.2, 3e-6, -1.0], [0.1, 0.2, 0.3, -4e-6]], dtype=np.float32)
    got = np.array([[0.5, -0.2, -1e-6, 1.0], [0.1, 0.2, 0.3, 2e-6]], dtype=np.float32)
    report = compare_codes(ref, got)
    assert report["codes"] == 2 and report["bits"] == 8
    assert report["identical_codes"] == 0  # each row has a flipped sign
    assert report["differing_bits"] == 3 and report["near_zero"] == 2
    assert report["differing_beyond"] == 1  # -1.0 -> 1.0
    assert report["max_abs_diff"] == pytest.approx(2.0)
    same = compare_codes(ref, ref)
    assert same["identical_codes"] == 2 and same["differing_bits"] == same["differing_beyond"] == 0


def test_export_writes_listed_files_and_reports_agreement(exported):
    run, info = exported
    manifest = read_manifest(run)
    names = [TEXT_ENCODER, IMAGE_ENCODER, int8_name(TEXT_ENCODER), int8_name(IMAGE_ENCODER), ENCODERS_FILE]
    for name in names:
        assert name in manifest["files"] and name in info["files"] and (run / name).is_file()
    spec = json.loads((run / ENCODERS_FILE).read_text(encoding="utf-8"))
    assert spec["bits"] == 16 and spec["activation"] == "identity" and spec["bit_weights"] is None
    assert spec["text"]["kind"] == "bow" and spec["text"]["vocab"] == "vocab.json"
    assert spec["image"] == {"image_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3}
    assert spec["source"]["model.safetensors"] == manifest["files"]["model.safetensors"]
    check = info["check"]
    assert check == spec["check"] and check["tolerance"] == 1e-5
    for modality, n in (("text", manifest["index"]["texts"]), ("image", manifest["index"]["items"])):
        fp32 = check["fp32"][modality]  # every text and image of the store
        assert fp32["codes"] == n and fp32["bits"] == 16 * n
        assert fp32["differing_beyond"] == 0  # every bit agrees but where torch's value is within 1e-5 of 0
        assert fp32["identical_codes"] >= n - fp32["near_zero"]
        assert isinstance(fp32["near_zero"], int) and fp32["max_abs_diff"] < 1e-5
        assert check["int8"][modality]["codes"] == n  # reported, never required


def test_export_refuses_encoders_that_disagree_and_writes_nothing(tiny_run_copy, monkeypatch):
    import crossmodal.jobs.export as export

    before = read_manifest(tiny_run_copy)
    real = export.torch_codes
    monkeypatch.setattr(export, "torch_codes", lambda *a: real(*a) + 0.5)  # far from any rounding
    with pytest.raises(export.ExportCheckError, match="disagree with the torch model") as err:
        export.export_run(tiny_run_copy, progress=False)
    assert err.value.report["fp32"]["text"]["differing_beyond"] > 0
    assert read_manifest(tiny_run_copy) == before
    assert not (tiny_run_copy / ENCODERS_FILE).exists() and not list(tiny_run_copy.glob(".staging-*"))


def test_export_command_prints_the_check(tiny_run_copy, capsys):
    from crossmodal.cli import main

    assert main(["export", "--run", str(tiny_run_copy), "--check-limit", "10"]) == 0
    out = capsys.readouterr().out
    assert f"exported {tiny_run_copy}" in out and TEXT_ENCODER in out
    assert "fp32 texts: " in out and "fp32 images: " in out and "0 beyond 1e-05 of zero" in out
    check = json.loads((tiny_run_copy / ENCODERS_FILE).read_text(encoding="utf-8"))["check"]
    assert check["fp32"]["text"]["codes"] == 10 and "int8" not in check
    assert main(["search", "--run", str(tiny_run_copy), "--text", "red zebra", "-k", "2"]) == 0
    assert "ignored, not in the model's vocabulary: zebra" in capsys.readouterr().err


def test_an_untrained_or_unindexed_run_is_refused(tmp_path, tiny_run_copy):
    from crossmodal.jobs.export import export_run

    with pytest.raises(RunError, match="not found"):
        export_run(tmp_path / "nothing", progress=False)
    with RunUpdate(tiny_run_copy) as update:
        update.forget("store.sqlite")
        update.commit()
    with pytest.raises(RunError, match="crossmodal index --run"):
        export_run(tiny_run_copy, progress=False)


# -- both engines -------------------------------------------------------------------------------------
def test_both_engines_answer_alike(engines, exported):
    run, _ = exported
    paths = store_images(run, 6)
    images = [*paths, Image.open(paths[0]).convert("L"), paths[1].read_bytes()]
    assert_same_answers(*engines, GOOD_TEXTS, images)


def test_a_run_with_exported_encoders_is_served_by_them(exported, engines):
    run, _ = exported
    engine = RetrievalEngine.load(run)
    try:
        assert engine.backend == "onnx" and engine.model is None and engine.describe()["encoders"] == "onnx"
    finally:
        engine.close()
    assert engines[1].model is not None  # the torch engine still exposes its model


def test_int8_encoders_only_when_asked_for(exported, engines):
    run, _ = exported
    engine = RetrievalEngine.load(run, precision="int8")
    try:
        assert engine.encoders.files[1] == int8_name(TEXT_ENCODER)
        assert engine.encode_texts(["red"], binarize=False).shape == (1, 16)
        assert len(engine.search_text("red", 3).hits) == 3
    finally:
        engine.close()
    assert engines[0].encoders.files[1] == TEXT_ENCODER
    with pytest.raises(ValueError, match="needs exported encoders"):
        RetrievalEngine.load(run, backend="torch", precision="int8")


@pytest.mark.parametrize(
    ("name", "overrides"),
    [
        ("drsch", ["loss.name=drsch"]),  # tanh output and learned bit weights
        ("dnnh", ["loss.name=dnnh", "model.head=dne"]),  # piecewise threshold on sigmoid
        ("textcnn", ["model.text_tower=textcnn", "model.text_options={n_filters: 16, embed_dim: 16}"]),
    ],
)
def test_activations_bit_weights_and_towers_are_exported(name, overrides, workdir, tmp_path):
    run, info = trained_copy(workdir, tmp_path, f"tiny_export_{name}", *overrides)
    assert all(r["differing_beyond"] == 0 for r in info["check"]["fp32"].values())
    onnx, torch_ = RetrievalEngine.load(run, backend="onnx"), RetrievalEngine.load(run, backend="torch")
    try:
        assert onnx.encoders.spec.activation == torch_.model.activation
        if name == "drsch":
            assert onnx.bit_weights is not None and onnx.describe()["weighted"]
            np.testing.assert_array_equal(onnx.bit_weights, torch_.bit_weights)
        assert_same_answers(onnx, torch_, GOOD_TEXTS, store_images(run, 4))
    finally:
        onnx.close()
        torch_.close()


BERT_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "green", "blue", "yellow",
              "square", "circle", "star", "cr", "##eme", "!"]  # fmt: skip


def tiny_bert(folder: Path) -> Path:
    """A one-layer BERT with 64 features and its fast tokenizer, saved in ``folder``."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(BERT_VOCAB) + "\n", encoding="utf-8")
    try:  # transformers 5 takes the word list as ``vocab``, 4 as ``vocab_file``
        tokenizer = BertTokenizerFast(vocab=str(folder / "vocab.txt"))
    except TypeError:
        tokenizer = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"))
    tokenizer.save_pretrained(folder)
    config = BertConfig(vocab_size=len(BERT_VOCAB), hidden_size=64, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=32, max_position_embeddings=32)  # fmt: skip
    BertModel(config).save_pretrained(folder)
    return folder


def test_a_transformer_tower_is_served_by_its_tokenizer(workdir, tmp_path):
    bert = tiny_bert(tmp_path / "bert")
    run, info = trained_copy(workdir, tmp_path, "tiny_export_bert", f"model.text_tower=hf:{bert}",
                             "model.text_options={local_files_only: true, max_length: 8}")  # fmt: skip
    assert (run / "tokenizer.json").is_file() and "tokenizer.json" in read_manifest(run)["files"]
    assert all(r["differing_beyond"] == 0 for r in info["check"]["fp32"].values())
    onnx, torch_ = RetrievalEngine.load(run, backend="onnx"), RetrievalEngine.load(run, backend="torch")
    try:
        texts = [*GOOD_TEXTS, "red " * 20, "a red 🍎 star zebra"]  # truncated at 8 tokens; unknown words
        assert_same_answers(onnx, torch_, texts, store_images(run, 4))
        assert onnx.ignored_words("a red 🍎 star zebra") == ["🍎", "zebra"]
        assert onnx.ignored_words("cre\u0300me") == []  # NFKC before the tokenizer, as the tower does
        with pytest.raises(QueryError, match=f"^{EMPTY_QUERY_MESSAGE}$"):
            onnx.search_text("\u200b", 3)
    finally:
        onnx.close()
        torch_.close()


def test_retraining_drops_the_exported_encoders(workdir, tmp_path):
    from tinyrun import tiny_config

    from crossmodal.jobs.index import index_run
    from crossmodal.jobs.train import train_run

    run, _ = trained_copy(workdir, tmp_path, "tiny_export_retrain")
    cfg = tiny_config(workdir, "name=tiny_export_retrain", "train.epochs=4", f"runs_dir={run.parent}")
    assert train_run(cfg, progress=False) == run
    index_run(run, progress=False)
    assert not any(name in read_manifest(run)["files"] or (run / name).exists() for name in EXPORT_FILES)
    engine = RetrievalEngine.load(run)
    try:
        assert engine.backend == "torch"
    finally:
        engine.close()


# -- loading --------------------------------------------------------------------------------------------
def test_encoders_of_another_model_are_refused(exported, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(exported[0], run)
    spec = json.loads((run / ENCODERS_FILE).read_text(encoding="utf-8"))
    spec["source"]["model.safetensors"] = "0" * 64
    with RunUpdate(run) as update:
        update.path(ENCODERS_FILE).write_text(json.dumps(spec), encoding="utf-8")
        update.commit()
    with pytest.raises(RunError, match="made from another model.safetensors.*crossmodal export --run"):
        RetrievalEngine.load(run)
    RetrievalEngine.load(run, backend="torch").close()


def test_a_damaged_encoder_file_is_named(exported, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(exported[0], run)
    (run / TEXT_ENCODER).write_bytes(b"not onnx")
    with pytest.raises(RunError, match=f"{TEXT_ENCODER}.*(crossmodal export|differs from the checksum)"):
        RetrievalEngine.load(run)


def test_a_run_without_exported_encoders_is_served_by_torch(tiny_run):
    engine = RetrievalEngine.load(tiny_run)
    try:
        assert engine.backend == "torch" and engine.model is not None
    finally:
        engine.close()
    with pytest.raises(RunError, match="no exported encoders; create them with: crossmodal export"):
        RetrievalEngine.load(tiny_run, backend="onnx")


# -- threads ----------------------------------------------------------------------------------------------
def test_threads_are_set_on_purpose(exported):
    run, _ = exported
    engine = RetrievalEngine.load(run, encoder_threads=1, faiss_threads=1, faiss_batch_threads=2,
                                  query_batch_size=500)  # fmt: skip
    try:
        for session in (engine.encoders.text_session, engine.encoders.image_session):
            assert session.get_session_options().intra_op_num_threads == 1
        inner = faiss.downcast_IndexBinary(engine.indexes["image"].faiss_index.index)
        assert inner.query_batch_size == 500
        seen = {}

        def worker() -> None:  # an app answers from worker threads: OpenMP settings are per thread
            engine.search_text("red", 3)
            seen["single"] = faiss.omp_get_max_threads()
            engine.search_text_batch(["red", "blue"], 3)
            seen["batch"] = faiss.omp_get_max_threads()

        thread = threading.Thread(target=worker)
        thread.start()
        thread.join()
        assert seen == {"single": 1, "batch": 2}
    finally:
        engine.close()


# -- no torch on the query path ---------------------------------------------------------------------------
def test_serving_an_exported_run_imports_no_torch(exported):
    run, _ = exported
    image = store_images(run, 1)[0]
    code = f"""
import sys
from crossmodal.cli import main
assert main(["search", "--run", {str(run)!r}, "--text", "red", "-k", "3"]) == 0
assert main(["search", "--run", {str(run)!r}, "--image", {str(image)!r}, "-k", "3"]) == 0
import crossmodal.app as app
engine = app.load_engine({str(run)!r})
for tab, query in zip(app.TABS, ["red", {str(image)!r}, {str(image)!r}, "blue star"]):
    assert not isinstance(app.run_search(engine, tab, query, 3), str)
assert "none of the query" in app.run_search(engine, app.TABS[0], "zebra", 3)
print("LOADED", sorted(m for m in sys.modules if m.split(".")[0] in {NOT_LOADED[:3]!r}
                       or m.startswith({NOT_LOADED[3:]!r})))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "LOADED []"


@pytest.mark.slow  # imports gradio in a fresh interpreter: seconds
def test_the_app_of_an_exported_run_imports_no_torch(exported):
    run, _ = exported
    code = f"""
import sys
import crossmodal.app as app
demo = app.build_app(app.load_engine({str(run)!r}))
print("LOADED", sorted(m for m in sys.modules if m.split(".")[0] in {NOT_LOADED[:3]!r}
                       or m.startswith({NOT_LOADED[3:]!r})))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "LOADED []"


@pytest.mark.slow  # torch.export traces the towers: seconds
def test_the_dynamo_exporter_gives_the_same_codes(tiny_run_copy):
    from crossmodal.jobs.export import export_run

    info = export_run(tiny_run_copy, exporter="dynamo", progress=False)
    assert all(r["differing_beyond"] == 0 for r in info["check"]["fp32"].values())
    spec = json.loads((tiny_run_copy / ENCODERS_FILE).read_text(encoding="utf-8"))
    assert spec["exporter"]["exporter"] == "dynamo"
