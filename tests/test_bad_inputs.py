"""A battery of bad inputs: images, text, run folders, dataset files and configs.

Every case asserts its exact outcome: a result (with the pixels or hits checked) or an
error whose message names the problem. Images go through ``open_image``, the
``imagefolder`` loader, ``RetrievalEngine.search_image`` and the app (its search handler,
and over HTTP as a real upload); run folders are damaged copies of the ``tiny_run``.
"""

from __future__ import annotations

import functools
import importlib
import io
import json
import shutil
import socket
import sqlite3
import struct
import sys
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from crossmodal.config import ConfigError, load_config
from crossmodal.data import create_dataset
from crossmodal.images import ImageDecodeError, open_image
from crossmodal.runs.folder import RunError
from crossmodal.serving import RetrievalEngine, SearchResult
from crossmodal.text import QueryError

ROOT = Path(__file__).resolve().parents[1]
RED, GREEN, BLUE = (220, 30, 30), (30, 180, 60), (40, 60, 220)


# -- image makers --------------------------------------------------------------------------------
def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


@functools.cache
def one_colour_png(width: int, height: int) -> bytes:
    """A complete 1-bit PNG of ``width x height`` black pixels, compressed to a few KB (a bomb)."""
    row = bytes(1 + (width + 7) // 8)  # filter byte + packed bits
    comp = zlib.compressobj(9)
    block = row * 200
    body = [comp.compress(block) for _ in range(height // 200)]
    body += [comp.compress(row * (height % 200)), comp.flush()]
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", b"".join(body))
        + _png_chunk(b"IEND", b"")
    )


def noisy_jpeg() -> bytes:
    rng = np.random.default_rng(0)
    return encode(Image.fromarray(rng.integers(0, 255, (128, 128, 3), dtype=np.uint8)), "JPEG")


def palette_png() -> bytes:
    img = Image.new("P", (20, 20), 0)
    img.putpalette([255, 0, 0, 30, 180, 60] + [0] * 762)
    img.paste(1, (0, 0, 10, 20))  # left half green (index 1); right half index 0, transparent
    return encode(img, "PNG", transparency=0)


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (20, 20), c) for c in (RED, BLUE, GREEN)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def exif_rotated_jpeg() -> bytes:
    """40 x 20 stored, a black block top-left; EXIF orientation 6 (display rotated 90 deg clockwise)."""
    img = Image.new("RGB", (40, 20), (255, 255, 255))
    img.paste((0, 0, 0), (0, 0, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(img, "JPEG", exif=exif.tobytes(), quality=95)


def check_cmyk(a: np.ndarray) -> None:
    assert a.shape == (30, 40, 3) and np.abs(a[5, 5].astype(int) - (255, 0, 0)).max() < 8, a[5, 5]


def check_16bit(a: np.ndarray) -> None:  # 16-bit values 0..65535 scale to 8-bit 0..255
    assert a.shape == (10, 10, 3) and tuple(a[0, 0]) == (0, 0, 0) and tuple(a[9, 9]) == (195, 195, 195)


def check_palette(a: np.ndarray) -> None:  # transparent on white
    assert tuple(a[5, 2]) == (30, 180, 60) and tuple(a[5, 15]) == (255, 255, 255)


def check_rgba(a: np.ndarray) -> None:  # half-transparent red over white
    assert np.abs(a[0, 0].astype(int) - (255, 127, 127)).max() <= 1, a[0, 0]


def check_exif(a: np.ndarray) -> None:
    assert a.shape == (40, 20, 3), "the EXIF rotation must swap width and height"
    assert a[3, 16].max() < 40 and a[3, 3].min() > 215 and a[36, 3].min() > 215, "the block must be top-right"


def rgb_colour_key_png() -> bytes:
    """Black with a red left half; black is the transparent colour (PNG tRNS on an RGB image)."""
    img = Image.new("RGB", (20, 10), (0, 0, 0))
    img.paste(RED, (0, 0, 10, 10))
    return encode(img, "PNG", transparency=(0, 0, 0))


def check_colour_key(a: np.ndarray) -> None:  # the keyed colour is transparent: white, not black
    assert tuple(a[5, 2]) == RED and tuple(a[5, 15]) == (255, 255, 255), a[5, 15]


def sixteen_bit_png() -> bytes:
    arr = np.zeros((10, 10), np.uint16)
    arr[9, 9] = 50_000
    return encode(Image.fromarray(arr), "PNG")


# name -> (file name, bytes, expected): expected is a message part (refused) or a pixel check
IMAGE_CASES: dict[str, tuple[str, Callable[[], bytes], str | Callable[[np.ndarray], None]]] = {
    "zero_bytes": ("empty.png", lambda: b"", "image is empty (0 bytes)"),
    "truncated_jpeg_header": (
        "cut.jpg",
        lambda: encode(Image.new("RGB", (64, 64), RED), "JPEG")[:300],
        "truncated or corrupt",
    ),
    "truncated_jpeg_data": ("cut2.jpg", lambda: noisy_jpeg()[:8000], "truncated or corrupt"),
    # reported against hashing repos' loaders: a JPEG cut to 60 % of its bytes passed Image.verify()
    "truncated_jpeg_60pct": (
        "cut60.jpg",
        lambda: noisy_jpeg()[: len(noisy_jpeg()) * 6 // 10],
        "truncated or corrupt",
    ),
    "truncated_png": (
        "cut.png",
        lambda: encode(Image.new("RGB", (64, 64), RED), "PNG")[:60],
        "truncated or corrupt",
    ),
    "text_named_jpg": ("notes.jpg", lambda: b"just some text, not a picture\n", "not a readable image"),
    # reported by a new user: past Pillow's own limits its text and warnings came out instead of ours
    "bomb_30000px": ("bomb.png", lambda: one_colour_png(30_000, 30_000),
                     "image too large: 30000x30000 = 900,000,000 pixels, limit 64,000,000"),
    "huge_20000px": ("huge.png", lambda: one_colour_png(20_000, 20_000),
                     "image too large: 20000x20000 = 400,000,000 pixels, limit 64,000,000"),
    "huge_11000px": ("huge11k.png", lambda: one_colour_png(11_000, 11_000),
                     "image too large: 11000x11000 = 121,000,000 pixels, limit 64,000,000"),
    "over_limit_9000px": ("big.png", lambda: one_colour_png(9_000, 9_000), "9000x9000 = 81,000,000 pixels"),
    "svg": (
        "logo.svg",
        lambda: b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"/>',
        "SVG (vector) images are not supported",
    ),
    "cmyk_jpeg": (
        "cmyk.jpg",
        lambda: encode(Image.new("CMYK", (40, 30), (0, 255, 255, 0)), "JPEG"),
        check_cmyk,
    ),
    "png_16bit": ("deep.png", sixteen_bit_png, check_16bit),
    # reported against hashing repos' loaders: a big-endian 16-bit TIFF was refused as "truncated or corrupt"
    "tiff_16bit_big_endian": (
        "g.tif",
        lambda: encode(Image.fromarray(np.full((8, 8), 30000, ">u2")), "TIFF"),
        lambda a: np.testing.assert_equal(a, 117),
    ),
    # reported against hashing repos' loaders: an RGB PNG with transparency=(0, 0, 0) came out black
    "rgb_colour_key": ("key.png", rgb_colour_key_png, check_colour_key),
    "palette_transparency": ("pal.png", palette_png, check_palette),
    "grayscale": (
        "gray.png",
        lambda: encode(Image.new("L", (8, 8), 77), "PNG"),
        lambda a: np.testing.assert_equal(a, 77),
    ),
    "rgba": ("rgba.png", lambda: encode(Image.new("RGBA", (8, 8), (255, 0, 0, 128)), "PNG"), check_rgba),
    "animated_gif": (
        "anim.gif",
        animated_gif,
        lambda a: np.testing.assert_array_less(np.abs(a.astype(int) - RED), 12),
    ),
    "exif_rotated": ("rotated.jpg", exif_rotated_jpeg, check_exif),
}
REFUSED = [k for k, (_, _, exp) in IMAGE_CASES.items() if isinstance(exp, str)]
DECODED = [k for k in IMAGE_CASES if k not in REFUSED]


def write_case(folder: Path, case: str) -> Path:
    name, make, _ = IMAGE_CASES[case]
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(make())
    return path


@pytest.fixture(scope="module")
def app_module():
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return importlib.import_module("crossmodal.app")


# -- images ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(IMAGE_CASES))
def test_open_image(case, tmp_path):
    path = write_case(tmp_path, case)
    expected = IMAGE_CASES[case][2]
    if isinstance(expected, str):
        with pytest.raises(ImageDecodeError) as err:
            open_image(path)
        assert expected in str(err.value) and path.name in str(err.value)
    else:
        img = open_image(path)
        assert img.mode == "RGB"
        expected(np.asarray(img))


@pytest.mark.parametrize("case", ["over_limit_9000px", "huge_11000px", "huge_20000px", "bomb_30000px"])
def test_an_image_over_the_limit_is_refused_from_its_header_in_our_words(case, tmp_path, recwarn):
    """One message with our limit at any size, and no Pillow warning in the log (a new user's
    server printed DecompressionBombWarning for every 11,000 px upload)."""
    import warnings

    from crossmodal.data.captions import check_image
    from crossmodal.images import check_decodes, check_header
    from crossmodal.jobs.index import thumbnail_bytes

    def dataset_check(mode):
        def read(p):
            why = check_image(p, mode)
            if why:
                raise ImageDecodeError(why)
        return read

    path = write_case(tmp_path, case)
    warnings.simplefilter("always")
    readers = (open_image, check_decodes, check_header, lambda p: open_image(p.read_bytes()),
               lambda p: thumbnail_bytes(p.read_bytes()),
               *(dataset_check(mode) for mode in ("header", "decode", "full")))
    for read in readers:
        with pytest.raises(ImageDecodeError) as err:
            read(path)
        assert str(err.value).startswith("image too large: ") and "limit 64,000,000" in str(err.value)
        assert "Pillow" not in str(err.value) and "decompression bomb" not in str(err.value)
    assert [str(w.message) for w in recwarn] == []


@pytest.mark.parametrize("case", list(IMAGE_CASES))
def test_engine_and_app_handler(case, tmp_path, engine, app_module):
    """``search_image`` answers or raises ``ImageDecodeError``; the app's handler turns that into text."""
    path = write_case(tmp_path, case)
    expected = IMAGE_CASES[case][2]
    tab = next(t for t in app_module.TABS if t.api_name == "image_to_captions")
    answer = app_module.run_search(engine, tab, {"path": str(path)}, 3)
    if isinstance(expected, str):
        with pytest.raises(ImageDecodeError, match="image"):
            engine.search_image(path, k=3)
        assert isinstance(answer, str) and expected in answer
        assert "Traceback" not in answer and "internal error" not in answer
    else:
        result = engine.search_image(path, k=3)
        assert len(result.hits) == 3 and result.direction == "i2t"
        assert isinstance(answer, SearchResult) and len(answer.hits) == 3


def test_imagefolder_loader_keeps_good_images_and_reports_bad_ones(tmp_path, caplog):
    root = tmp_path / "folder"
    lines = []
    for case in IMAGE_CASES:
        path = write_case(root, case)
        lines.append(json.dumps({"file_name": path.name, "text": f"case {case}"}))
    Image.new("RGB", (8, 8), RED).save(tmp_path / "outside.png")
    Image.new("RGB", (8, 8), RED).save(root / "ok.png")
    lines += [
        json.dumps({"file_name": "../outside.png", "text": "escapes the folder"}),
        json.dumps({"file_name": "missing.png", "text": "no such image"}),
        '{"file_name": "ok.png", "text": broken json',
    ]
    raw = "\n".join(lines).encode() + b'\n{"file_name": "ok.png", "text": "bad \xff\xfe bytes"}\n'
    raw += json.dumps({"file_name": "ok.png", "text": "a red square"}).encode() + b"\n"
    (root / "metadata.jsonl").write_bytes(raw)
    ds = create_dataset("imagefolder", root=root, check_images="full", cache_dir=str(tmp_path / "c"))
    assert sorted(ds.ids) == sorted([IMAGE_CASES[c][0] for c in DECODED] + ["ok.png"])
    assert ds.captions(ds.ids.index("ok.png")) == ["a red square"]
    stats = ds.info.stats
    assert sorted(stats["failed_images"]) == sorted(IMAGE_CASES[c][0] for c in REFUSED)
    reasons = " | ".join(stats["undecodable_images"])
    for case in REFUSED:
        assert IMAGE_CASES[case][2] in reasons, case
    n_lines = len(IMAGE_CASES) + 3
    assert stats["bad_lines"] == [
        f"metadata.jsonl line {n_lines}: invalid JSON (Expecting value)",
        f"metadata.jsonl line {n_lines + 1}: not valid UTF-8",
    ]
    assert stats["n_unsafe_paths"] == 1 and "'../outside.png' points outside" in stats["unsafe_paths"][0]
    assert stats["n_missing_images"] == 1 and "missing.png" in stats["missing_images"][0]
    check_exif(np.asarray(ds.load_image(ds.ids.index("rotated.jpg"))))


def test_csv_metadata_with_invalid_utf8_reports_the_line(tmp_path):
    root = tmp_path / "csv"
    for name in ("a.png", "b.png", "c.png"):
        write_case(root, "grayscale").rename(root / name)
    (root / "metadata.csv").write_bytes(b"file_name,text\na.png,first\nb.png,caf\xe9 latin-1\nc.png,third\n")
    ds = create_dataset("imagefolder", root=root, cache_dir=str(tmp_path / "c"))
    assert ds.ids == ["a.png", "c.png"] and ds.captions(1) == ["third"]
    assert ds.info.stats["bad_lines"] == ["metadata.csv line 3: not valid UTF-8"]


def test_header_check_refuses_oversized_images_too(tmp_path):
    """The fast default check must not let through what ``open_image`` refuses by size."""
    root = tmp_path / "folder"
    for case in ("over_limit_9000px", "bomb_30000px", "svg", "zero_bytes", "grayscale"):
        write_case(root, case)
    names = [
        IMAGE_CASES[c][0] for c in ("over_limit_9000px", "bomb_30000px", "svg", "zero_bytes", "grayscale")
    ]
    (root / "metadata.jsonl").write_text(
        "".join(json.dumps({"file_name": n, "text": n}) + "\n" for n in names)
    )
    ds = create_dataset("imagefolder", root=root, cache_dir=str(tmp_path / "c"))
    assert ds.ids == ["gray.png"]
    assert "9000x9000" in " ".join(ds.info.stats["undecodable_images"])


# -- text ------------------------------------------------------------------------------------------
TEXT_CASES = {
    "empty": ("", "the text query is empty"),
    "whitespace": (" \t\n  ", "the text query is empty"),
    "control_only": ("\x00\x07\x1b", "the text query is empty"),
    # reported against transformer retrieval demos: a zero-width space was answered with arbitrary hits
    "zero_width_space": ("\u200b", "the text query is empty"),
    "punctuation_only": ("?!", "has no words"),
    "emoji_only": ("🍎 ❤️", "has no words"),
    "non_latin": ("красный 赤い", "none of the query's words are in the model's vocabulary: красный, 赤い;"),
    "all_oov": ("zebra xylophone zebra", "vocabulary: zebra, xylophone"),
    "oov_10000_chars": ("qqq " * 2500, "vocabulary: qqq"),
    "not_a_string": (None, "a text query must be a string"),
}


@pytest.mark.parametrize("case", list(TEXT_CASES))
def test_unusable_text_is_refused_by_name(case, engine, app_module):
    query, message = TEXT_CASES[case]
    for method in (engine.search_text, engine.similar_texts):
        with pytest.raises(QueryError) as err:
            method(query, k=5)
        assert message in str(err.value)
        assert len(str(err.value)) < 400  # a long query does not make a long message
    answer = app_module.run_search(engine, app_module.TABS[0], query, 5)
    blank = ("empty", "whitespace", "not_a_string", "control_only", "zero_width_space")
    expected = "Type one or more keywords" if case in blank else message
    assert isinstance(answer, str) and expected in answer


@pytest.mark.parametrize(
    ("query", "message"),
    [("猫", "none of the query's words are in the model's vocabulary: 猫; try other keywords"),
     ("🐱 ❤️", "the query '🐱 ❤️' has no words (letters or digits); type a few words"),
     (" ", "the text query is empty; type a few words")],
    ids=["cjk", "emoji", "blank"],
)  # fmt: skip
def test_cli_search_says_the_same_as_the_engine(query, message, tiny_run, capsys):
    """Reported by a new user: "猫" was called an empty query; the CLI prints the engine's message."""
    from crossmodal.cli import main

    assert main(["search", "--run", str(tiny_run), "--text", query]) == 2
    assert capsys.readouterr().err.strip() == f"crossmodal search: {message}"


@pytest.mark.parametrize(
    "query",
    ["red", "red " * 2500, "\x00red\x07 \x1b\u200b\t", "🍎 red ❤️", "RED!!!", "red zebra"],
    ids=["plain", "10000_chars", "control_chars", "emoji_and_word", "case_punct", "one_oov"],
)
def test_usable_text_answers_like_its_known_words(query, engine, app_module):
    reference = [h.item_id for h in engine.search_text("red", k=10).hits]
    result = engine.search_text(query, k=10)
    assert [h.item_id for h in result.hits] == reference
    assert all("red" in h.labels for h in result.hits[:5])
    assert engine.ignored_words(query) == (["zebra"] if "zebra" in query else [])


@pytest.mark.parametrize("k", [0, -3, 2.5, "5", True, None])
def test_bad_k_is_refused_by_the_engine(k, engine):
    with pytest.raises(ValueError, match="k must be a positive integer"):
        engine.search_text("red", k=k)


@pytest.mark.parametrize(
    ("k", "message"),
    [(0, "k must be a positive integer, got 0"), ("many", "k must be a positive integer, got 'many'"),
     (None, "k must be a positive integer, got None")],
)
def test_bad_k_in_the_app_gives_a_message(k, message, engine, app_module):
    answer = app_module.run_search(engine, app_module.TABS[0], "red", k)
    assert isinstance(answer, str) and message in answer


def test_k_larger_than_the_database_is_clipped(engine):
    n_items, n_texts = engine.indexes["image"].ntotal, engine.indexes["text"].ntotal
    assert len(engine.search_text("red", k=10**6).hits) == n_items
    assert len(engine.similar_texts("red", k=n_texts + 1).hits) == n_texts
    hits = engine.similar_images(Image.new("RGB", (16, 16), RED), k=10**9).hits
    assert len(hits) == n_items and [h.rank for h in hits] == list(range(1, n_items + 1))
    assert len({h.item_id for h in hits}) == n_items


# -- run folders -----------------------------------------------------------------------------------
def damaged_copy(tiny_run: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("images", "checkpoint", "eval"))
    return run


def _edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _garble_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[4:24] = b"\xff" * 20  # after the magic bytes: same size, nothing parses
    path.write_bytes(bytes(data))


def _other_code_length_index(run: Path) -> None:
    from crossmodal.index import create_index

    index = create_index("flat", 32)
    index.add(np.zeros((80, 4), np.uint8), np.arange(80))
    index.save(run / "image.index")


def _drop_store_rows(run: Path) -> None:
    with sqlite3.connect(run / "store.sqlite") as con:
        con.execute("DELETE FROM texts WHERE item_id IN (SELECT item_id FROM items LIMIT 5)")
        con.execute("DELETE FROM items WHERE item_id IN (SELECT item_id FROM items LIMIT 5)")
    con.close()


def _edit_store_caption(run: Path) -> None:
    with sqlite3.connect(run / "store.sqlite") as con:
        con.execute("UPDATE texts SET caption = 'tampered' WHERE text_id = (SELECT MIN(text_id) FROM texts)")
    con.close()


def _foreign_weights(run: Path) -> None:
    import torch
    from safetensors.torch import save_file

    save_file({"image_head.weight": torch.zeros(3, 3)}, str(run / "model.safetensors"))


RUN_CASES = {
    "other_format_version": (lambda r: _edit_json(r / "manifest.json", format_version=999), "run format 999"),
    "manifest_other_bits": (lambda r: _edit_json(r / "manifest.json", bits=32), "16 bits, manifest.json 32"),
    "spec_other_bits": (lambda r: _edit_json(r / "model.json", bits=32), "model.json says 32 bits"),
    "index_other_bits": (_other_code_length_index, "holds 32-bit codes, expected 16 bits"),
    "spec_other_text_tower": (
        lambda r: _edit_json(r / "model.json", text_tower={"name": "textcnn", "options": {}}),
        "model.safetensors does not fit the model in model.json",
    ),
    "spec_unknown_image_tower": (
        lambda r: _edit_json(r / "model.json", image_tower={"name": "nonesuch"}),
        "model.json names a model this crossmodal cannot build: unknown image tower 'nonesuch'",
    ),
    "spec_corrupt": (lambda r: (r / "model.json").write_text("{"), "model.json is unreadable"),
    "weights_of_another_model": (_foreign_weights, "model.safetensors does not fit the model in model.json"),
    "zero_byte_index": (lambda r: (r / "text.index").write_bytes(b""), "text.index is empty (0 bytes)"),
    "truncated_index": (lambda r: _truncate(r / "image.index"), "truncated or overwritten"),
    "truncated_index_no_sidecar": (
        lambda r: (_truncate(r / "image.index"), (r / "image.index.json").unlink()),
        "cannot read FAISS binary index",
    ),
    "garbled_index_header": (
        lambda r: _garble_header(r / "image.index"),
        "image.index: the file is damaged (its contents do not parse as a FAISS index",
    ),
    "store_missing_ids": (_drop_store_rows, "store.sqlite holds 91 items but image.index 96"),
    "store_edited": (_edit_store_caption, "store.sqlite differs from the checksum in manifest.json"),
    "store_zero_bytes": (lambda r: (r / "store.sqlite").write_bytes(b""), "not a crossmodal metadata store"),
    "store_missing": (lambda r: (r / "store.sqlite").unlink(), "has no store.sqlite; create it with"),
    "manifest_corrupt": (
        lambda r: (r / "manifest.json").write_text('{"bits": 1'),
        "manifest.json is corrupt",
    ),
    "vocab_edited": (
        lambda r: (r / "vocab.json").write_text((r / "vocab.json").read_text().replace("red", "rot")),
        "vocab.json differs from the checksum",
    ),
}


@pytest.mark.parametrize("case", list(RUN_CASES))
def test_damaged_or_foreign_run_is_refused(case, tiny_run, tmp_path):
    run = damaged_copy(tiny_run, tmp_path)
    RetrievalEngine.load(run).close()  # the undamaged copy loads
    damage, message = RUN_CASES[case]
    damage(run)
    with pytest.raises(RunError) as err:
        RetrievalEngine.load(run)
    assert message in str(err.value), str(err.value)
    assert str(run) in str(err.value)
    assert "faiss::" not in str(err.value) and ".cpp" not in str(err.value)  # no C++ assertion text


# -- dataset files ---------------------------------------------------------------------------------
def write_mat(path: Path, **arrays) -> None:
    from scipy.io import savemat

    path.parent.mkdir(parents=True, exist_ok=True)
    savemat(path, arrays)


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        (
            {"YAll": np.zeros((4, 5)), "LAll": np.zeros((4, 3))},
            "mirflickr25k.mat: looked for key IAll or images or I, found keys ['LAll', 'YAll']",
        ),
        (
            {"IAll": np.zeros((4, 8, 8, 3)), "YAll": np.zeros((4, 5)), "LAll": np.zeros((5, 3))},
            "share no common length, so the item axis is unknown: IAll(4, 8, 8, 3), YAll(4, 5), LAll(5, 3)",
        ),
        (
            {"IAll": np.zeros((4, 8)), "YAll": np.zeros((4, 5)), "LAll": np.zeros((4, 3))},
            "image array 'IAll' in",
        ),
    ],
    ids=["missing_images_key", "labels_of_another_length", "images_not_4d"],
)
def test_mat_with_missing_or_misshapen_keys(arrays, message, tmp_path):
    from crossmodal.data.mat import MatFormatError

    write_mat(tmp_path / "mirflickr25k.mat", **arrays)
    with pytest.raises(MatFormatError) as err:
        create_dataset("mirflickr25k", root=tmp_path, cache_dir=str(tmp_path / "c"))
    assert message in str(err.value)
    if "IAll'" in message:
        assert "has shape (4, 8); expected 4 axes" in str(err.value)


def test_captions_pointing_to_missing_images_and_escapes(tmp_path):
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    (root / "val2017").mkdir()
    Image.new("RGB", (8, 8), BLUE).save(root / "val2017" / "1.jpg")
    captions = {
        "images": [
            {"id": 1, "file_name": "1.jpg"},
            {"id": 2, "file_name": "2.jpg"},
            {"id": 3, "file_name": "../../secret.jpg"},
        ],
        "annotations": [
            {"id": 10, "image_id": 1, "caption": "a blue tile"},
            {"id": 11, "image_id": 2, "caption": "gone"},
            {"id": 12, "image_id": 99, "caption": "orphan"},
        ],
    }
    (root / "annotations" / "captions_val2017.json").write_text(json.dumps(captions))
    ds = create_dataset("coco", root=root, labels=False, cache_dir=str(tmp_path / "c"))
    assert ds.ids == ["1"] and ds.captions(0) == ["a blue tile"]
    stats = ds.info.stats
    assert stats["n_missing_images"] == 1 and "2.jpg" in stats["missing_images"][0]
    assert stats["n_unsafe_paths"] == 1 and "secret.jpg" in stats["unsafe_paths"][0]
    assert stats["n_orphan_captions"] == 1 and "unknown image_id 99" in stats["orphan_captions"][0]


# -- configs ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["colour=red"], "unknown key(s) in config: colour"),
        (["model.colour=red", "model.shape=1"], "unknown key(s) in model: colour, shape"),
        (["train.epochs=ten"], "train.epochs must be int, got 'ten'"),
        (["model.bits=16.5"], "model.bits must be int"),
        (["model.bits=true"], "model.bits must be int, got True"),
        (["data.options=3"], "data.options must be a mapping"),
        (["model.bits=12"], "model.bits must be a positive multiple of 8 (got 12)"),
        (["model.bits=0"], "model.bits must be a positive multiple of 8 (got 0)"),
        (["train.batch_size=-1"], "train.batch_size must be positive"),
        (["train"], "must look like section.key=value"),
    ],
)
def test_bad_config_values_are_refused_by_name(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert message in str(err.value)


def test_bad_config_files(tmp_path):
    (tmp_path / "a.yaml").write_text("model:\n  bits: 16\n  towers: [a, b]\nextra:\n  x: 1\n")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) in config: extra"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "b.yaml").write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(tmp_path / "b.yaml")
    (tmp_path / "c.yaml").write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(tmp_path / "c.yaml")


# -- the app over HTTP -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def served(app_module, engine):
    from gradio_client import Client

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo, url = app_module.serve(engine, host="127.0.0.1", port=port, prevent_thread_lock=True)
    try:
        yield Client(url, verbose=False), url
    finally:
        demo.close()


@pytest.mark.slow
def test_bad_uploads_over_http_give_messages_and_the_app_stays_up(served, tmp_path):
    from gradio_client import handle_file

    client, _ = served
    for case in ("zero_bytes", "bomb_30000px", "svg"):
        path = write_case(tmp_path, case)
        *_, result = client.predict(handle_file(str(path)), 5, api_name="/image_to_captions")
        assert IMAGE_CASES[case][2] in result["error"] and result["hits"] == [], (case, result)
    path = write_case(tmp_path, "exif_rotated")
    *_, result = client.predict(handle_file(str(path)), 4, api_name="/image_to_images")
    assert result["error"] is None and len(result["hits"]) == 4
    *_, result = client.predict("красный", 5, api_name="/text_to_texts")
    assert "vocabulary: красный" in result["error"]
    *_, result = client.predict("red " * 2500, 1000, api_name="/text_to_images")
    assert result["error"] is None and len(result["hits"]) == 96  # every item is served
