"""The Gradio app on the tiny run, driven end to end through ``gradio_client``."""

from __future__ import annotations

import importlib
import json
import shutil
import socket
import sys
from pathlib import Path

import httpx
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
ENDPOINTS = {"/text_to_images", "/image_to_captions", "/image_to_images", "/text_to_texts", "/about"}


def load_app_module():
    """The app module of the package (``app.py`` at the root only launches it)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return importlib.import_module("crossmodal.app")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_module():
    return load_app_module()


@pytest.fixture(scope="module")
def served(app_module, tiny_run):
    """The app on the tiny run, on a free loopback port, with a client; closed at the end."""
    from gradio_client import Client

    from crossmodal.serving import RetrievalEngine

    engine = RetrievalEngine.load(tiny_run)
    demo, url = app_module.serve(engine, host="127.0.0.1", port=free_port(), prevent_thread_lock=True)
    try:
        yield Client(url, verbose=False), engine, url
    finally:
        demo.close()
        engine.close()


def first_item_with_caption(engine, caption: str):
    """(item_id, key) of the first database item whose captions include ``caption``."""
    ntexts = engine.store.max_text_id() + 1
    for text in engine.store.get_texts(range(ntexts), missing="none"):
        if text and caption in text["caption"]:
            item = engine.store.get_items([text["item_id"]])[0]
            return item["item_id"], item["key"], Path(tiny_path(engine, item["image_path"]))
    raise AssertionError(f"no database item has the caption {caption!r}")


def tiny_path(engine, rel: str) -> Path:
    p = Path(rel)
    return p if p.is_absolute() else Path(engine.run_dir) / p


def test_endpoints_have_stable_names(served):
    client, _, _ = served
    names = set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    assert ENDPOINTS <= names, names


def test_text_to_images_returns_the_items_of_the_caption(served):
    client, engine, _ = served
    item_id, key, _ = first_item_with_caption(engine, "a red square")
    gallery, status, details, result = client.predict("a red square", 20, api_name="/text_to_images")
    assert result["error"] is None
    hits = result["hits"]
    assert len(hits) == 20 and [h["rank"] for h in hits] == list(range(1, 21))
    assert all("red" in h["labels"] for h in hits[:10]), [h["labels"] for h in hits[:10]]
    assert key in [h["key"] for h in hits], f"{key} (item {item_id}) not in the top 20"
    assert len(gallery) == 20 and all(Path(g["image"]).is_file() for g in gallery)
    assert gallery[0]["caption"].startswith("#1 · d=")
    assert "ms" in status and "20 images" in status
    assert result["code_hex"] in details and "flat" in details
    assert len(result["code_hex"]) == engine.bits // 4


def test_image_to_captions_returns_the_images_own_caption(served):
    from gradio_client import handle_file

    client, engine, _ = served
    item_id, key, image = first_item_with_caption(engine, "a red square")
    gallery, table, status, _, result = client.predict(
        handle_file(str(image)), 30, api_name="/image_to_captions"
    )
    assert result["error"] is None and "captions" in status
    captions = [row[2] for row in table["data"]]
    assert table["headers"][:3] == ["rank", "distance", "caption"]
    assert all("red" in c for c in captions[:10]), captions[:10]
    assert item_id in [h["item_id"] for h in result["hits"]], f"{key}'s own caption not in the top 30"
    assert len(gallery) == len(captions) == 30


def test_image_to_images_finds_the_image_itself(served):
    from gradio_client import handle_file

    client, engine, _ = served
    item_id, _, image = first_item_with_caption(engine, "a blue circle")
    gallery, _, _, result = client.predict(handle_file(str(image)), 25, api_name="/image_to_images")
    hits = result["hits"]
    assert item_id in [h["item_id"] for h in hits]
    assert hits[0]["distance"] == 0 and all("blue" in h["labels"] for h in hits[:10])
    assert len(gallery) == 25


def test_text_to_texts_returns_matching_captions(served):
    client, _, _ = served
    _, table, status, _, result = client.predict("green", 8, api_name="/text_to_texts")
    assert result["error"] is None and result["direction"] == "t2t"
    assert len(table["data"]) == 8 and all("green" in row[2] for row in table["data"]), table["data"]


def test_about_endpoint_describes_the_run(served):
    client, engine, _ = served
    about = client.predict(api_name="/about")
    assert about["bits"] == engine.bits and about["items"] == engine.indexes["image"].ntotal
    assert about["index"] == "flat" and about["examples"] and about["run"] == Path(engine.run_dir).name


@pytest.mark.parametrize(
    ("query", "expected"),
    [("", "Type one or more keywords"), ("   ", "Type one or more keywords"), ("zzzqx wvvq", "zzzqx, wvvq")],
)
def test_bad_text_queries_give_a_message(served, query, expected):
    client, _, _ = served
    gallery, status, details, result = client.predict(query, 5, api_name="/text_to_images")
    assert expected in result["error"] and expected in status
    assert gallery == [] and result["hits"] == [] and details == ""


def test_bad_uploads_give_a_message_and_the_app_stays_up(served, tmp_path):
    from gradio_client import handle_file

    client, _, url = served
    text_file = tmp_path / "notes.txt"
    text_file.write_text("not an image at all\n")
    *_, result = client.predict(handle_file(str(text_file)), 5, api_name="/image_to_captions")
    assert "not a readable image" in result["error"] and "notes.txt" in result["error"]
    assert "/" not in result["error"], "the server's upload paths stay private"
    huge = tmp_path / "huge.png"  # 67 Mpixel, a few hundred KB: refused before decoding
    Image.new("L", (8200, 8200)).save(huge)
    _, _, _, result = client.predict(handle_file(str(huge)), 5, api_name="/image_to_images")
    assert "too large" in result["error"]
    big = httpx.post(f"{url}gradio_api/upload", files={"files": ("big.png", b"\0" * 11_000_000)})
    assert big.status_code == 413, big.text[:200]
    *_, result = client.predict("red", 3, api_name="/text_to_images")
    assert result["error"] is None and len(result["hits"]) == 3


def test_only_run_files_are_served(served, tmp_path):
    _, engine, url = served
    outside = tmp_path / "notes.txt"
    outside.write_text("PRIVATE-CONTENT")
    response = httpx.get(f"{url}gradio_api/file={outside}")
    assert response.status_code in (403, 404) and "PRIVATE-CONTENT" not in response.text
    inside = next(Path(engine.run_dir, "images").glob("*.png"))
    assert httpx.get(f"{url}gradio_api/file={inside.resolve()}").status_code == 200


def test_allowed_roots_and_examples(app_module, served):
    _, engine, _ = served
    assert engine.image_roots() == [(Path(engine.run_dir) / "images").resolve()]
    queries = app_module.example_queries(engine)
    assert 0 < len(queries) <= app_module.N_EXAMPLES and "cat" not in queries
    assert set(queries) <= set(engine.store.get_meta("label_names")) | {"a red square"}, queries
    images = app_module.example_images(engine, engine.image_roots())
    assert images and all(Path(p).is_file() for p in images)


def test_map_table_from_the_runs_metrics(app_module, tiny_run, tmp_path):
    from crossmodal.serving import RetrievalEngine

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("images", "checkpoint"))
    engine = RetrievalEngine.load(run)
    metrics = {"hash": {"i2t": {"map": 0.71234, "p@100": 0.5}, "t2i": {"map": 0.65, "p@100": 0.4}}}
    table = app_module.map_table(metrics)
    assert "| hash | 0.7123 | 0.6500 |" in table and "i2t mAP" in table
    assert app_module.map_table(None) == ""
    path = run / "eval" / "metrics.json"  # the engine reads it; a malformed one is no table, not an error
    path.parent.mkdir(exist_ok=True)
    path.write_text("[1, 2]")
    assert engine.metrics() is None
    path.write_text(json.dumps({"hash": {"i2t": 0.5}}))
    assert engine.metrics() is None
    path.write_text(json.dumps(metrics))
    assert engine.metrics() == metrics
    path.unlink()
    assert engine.metrics() is None
    engine.close()


def test_main_refuses_a_missing_run(app_module, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        app_module.main(["--run", str(tmp_path / "nope")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "nope" in err and "crossmodal train --config configs/openmoji.yaml" in err
    assert "Traceback" not in err


def test_main_refuses_an_unindexed_run(app_module, tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("images", "checkpoint", "eval"))
    (run / "store.sqlite").unlink()
    with pytest.raises(SystemExit) as exc:
        app_module.main(["--run", str(run)])
    assert exc.value.code == 2
    assert f"crossmodal index --run {run}" in capsys.readouterr().err


def test_main_refuses_set_without_a_recipe_and_a_bad_recipe(app_module, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        app_module.main(["--run", "runs/x", "--set", "train.epochs=3"])
    assert exc.value.code == 2 and "--set changes a recipe: use it with --config" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        app_module.main(["--config", str(tmp_path / "nope.yaml")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "cannot prepare" in err and "config file not found" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as exc:
        app_module.main(["--run", "a", "--config", "b"])
    assert exc.value.code == 2 and "not allowed with" in capsys.readouterr().err
