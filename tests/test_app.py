"""The Gradio app on the tiny run, driven end to end through ``gradio_client``."""

from __future__ import annotations

import importlib
import json
import shutil
import socket
import sys
from pathlib import Path
from typing import Any

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
    cards, table, status, details, result = client.predict("a red square", 20, api_name="/text_to_images")
    assert result["error"] is None and result["notices"] == [] and result["query"] == "a red square"
    hits = result["hits"]
    assert len(hits) == 20 and [h["rank"] for h in hits] == list(range(1, 21))
    assert all("red" in h["labels"] for h in hits[:10]), [h["labels"] for h in hits[:10]]
    assert key in [h["key"] for h in hits], f"{key} (item {item_id}) not in the top 20"
    assert all(h["caption"] == h["captions"][0] for h in hits), "image hits carry their item's caption"
    assert all(h["image_url"] == f"/api/items/{h['item_id']}/image" for h in hits)
    assert len(result["code_hex"]) == engine.bits // 4 and result["index"] == "flat"
    assert "**20 images** in" in status and result["code_hex"] in details and "flat" in details
    assert table["headers"] == ["rank", "distance", "caption", "item", "item id"]
    assert [row[4] for row in table["data"]] == [h["item_id"] for h in hits]
    first = hits[0]
    assert f'data-item-id="{first["item_id"]}"' in cards and first["key"] in cards
    assert f'href="api/items/{first["item_id"]}/image"' in cards and first["caption"] in cards


def test_image_to_captions_returns_the_images_own_caption(served):
    from gradio_client import handle_file

    client, engine, _ = served
    item_id, key, image = first_item_with_caption(engine, "a red square")
    *_, result = client.predict(handle_file(str(image)), 30, api_name="/image_to_captions")
    assert result["error"] is None and result["direction"] == "i2t"
    assert result["query"] == image.name, "an upload is named by its file name, not a server path"
    captions = [h["caption"] for h in result["hits"]]
    assert all("red" in c for c in captions[:10]), captions[:10]
    assert item_id in [h["item_id"] for h in result["hits"]], f"{key}'s own caption not in the top 30"
    assert len(captions) == 30 and all(h["text_id"] is not None for h in result["hits"])


def test_image_to_images_finds_the_image_itself(served):
    from gradio_client import handle_file

    client, engine, _ = served
    item_id, _, image = first_item_with_caption(engine, "a blue circle")
    *_, result = client.predict(handle_file(str(image)), 25, api_name="/image_to_images")
    hits = result["hits"]
    assert item_id in [h["item_id"] for h in hits] and len(hits) == 25
    assert hits[0]["distance"] == 0 and all("blue" in h["labels"] for h in hits[:10])
    assert all(h["caption"] for h in hits), "image hits carry a caption"


def test_text_to_texts_returns_matching_captions(served):
    client, _, _ = served
    *_, result = client.predict("green", 8, api_name="/text_to_texts")
    assert result["error"] is None and result["direction"] == "t2t"
    assert len(result["hits"]) == 8 and all("green" in h["caption"] for h in result["hits"]), result["hits"]


def test_every_search_endpoint_has_one_return_shape(served):
    """Each search endpoint returns the same five values, and a result with the same keys."""
    from gradio_client import handle_file

    client, engine, _ = served
    _, _, image = first_item_with_caption(engine, "a red square")
    info = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    keys = set()
    upload = handle_file(str(image))
    for name, query in [("/text_to_images", "red"), ("/image_to_captions", upload),
                        ("/image_to_images", upload), ("/text_to_texts", "red")]:  # fmt: skip
        assert len(info[name]["returns"]) == 5, info[name]["returns"]
        cards, table, status, details, result = client.predict(query, 3, api_name=name)
        assert isinstance(result, dict) and len(result["hits"]) == 3 and len(table["data"]) == 3
        assert cards.count("cm-card") == 3 and "in **" in status and result["code_hex"] in details
        keys.add(tuple(sorted(result)))
    assert len(keys) == 1, keys


def test_about_endpoint_describes_the_run(served):
    client, engine, _ = served
    about = client.predict(api_name="/about")
    assert about["bits"] == engine.bits and about["items"] == engine.indexes["image"].ntotal
    assert about["index"] == "flat" and about["examples"] and about["run"] == Path(engine.run_dir).name


@pytest.mark.parametrize(
    ("query", "expected"),
    [("", "Type one or more keywords"), ("   ", "Type one or more keywords"), ("zzzqx wvvq", "zzzqx, wvvq"),
     ("猫", "none of the query's words are in the model's vocabulary: 猫; try other keywords"),
     ("🐱 ❤️", "the query '🐱 ❤️' has no words (letters or digits); type a few words"),
     ("a" * 5000, "none of the query's words are in the model's vocabulary: " + "a" * 40 + "...; try other")],
    ids=["empty", "spaces", "unknown_words", "cjk", "emoji", "5000_letters"],
)  # fmt: skip
def test_bad_text_queries_give_a_message(served, query, expected):
    client, _, _ = served
    *_, result = client.predict(query, 5, api_name="/text_to_images")
    assert expected in result["error"] and result["hits"] == []
    assert query.strip() == "" or "empty" not in result["error"], "text in the box is never called empty"


def test_some_unknown_words_are_named_in_a_notice(served):
    client, _, _ = served
    *_, result = client.predict("red zzzqx", 5, api_name="/text_to_images")
    assert result["error"] is None and result["ignored_words"] == ["zzzqx"]
    assert result["notices"] == ["Ignored, not in the model's vocabulary: zzzqx"]


@pytest.mark.parametrize("k", ["abc", 0, -3, 2.5, True, None])
def test_a_bad_k_gives_one_line(served, k):
    client, _, _ = served
    *_, result = client.predict("red", k, api_name="/text_to_images")
    assert result["error"] == f"k must be a positive integer, got {k!r}"


def test_a_k_above_the_limit_gets_the_limit_and_a_notice(served):
    client, _, _ = served
    *_, result = client.predict("red", "1000", api_name="/text_to_images")
    assert result["error"] is None and len(result["hits"]) == 96  # every item of the tiny run
    assert result["notices"] == ["k = 1,000 is more than a search returns: showing the best 100."]


def test_the_app_and_the_http_api_share_their_limits(app_module):
    from crossmodal.serving import http

    assert (app_module.DEFAULT_K, app_module.MAX_K) == (http.DEFAULT_K, http.MAX_K)
    assert app_module.MAX_FILE_SIZE == f"{http.MAX_UPLOAD_BYTES // 2**20}mb"


def test_status_line_counts_in_words(app_module, engine):
    from crossmodal.serving.http import answer

    tab = app_module.TABS[0]
    assert app_module.status_line(tab, answer(engine, "t2i", "red", 1)).startswith("**1 image** in")
    assert app_module.status_line(tab, answer(engine, "t2i", "red", 2)).startswith("**2 images** in")
    captions = app_module.status_line(app_module.TABS[3], answer(engine, "t2t", "red", 1))
    assert captions.startswith("**1 caption** in")


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
    *_, result = client.predict(handle_file(str(huge)), 5, api_name="/image_to_images")
    assert "too large" in result["error"]
    big = httpx.post(f"{url}gradio_api/upload", files={"files": ("big.png", b"\0" * 11_000_000)})
    assert big.status_code == 413, big.text[:200]
    *_, result = client.predict("red", 3, api_name="/text_to_images")
    assert result["error"] is None and len(result["hits"]) == 3


def raw_call(url: str, api_name: str, data: list) -> tuple[str, Any]:
    """``(event, data)`` of an endpoint called through Gradio's HTTP queue API, which bypasses the
    client's own uploads: ``("complete", outputs)`` or ``("error", ...)``."""
    event = httpx.post(f"{url}gradio_api/call/{api_name}", json={"data": data}).json()["event_id"]
    lines = httpx.get(f"{url}gradio_api/call/{api_name}/{event}", timeout=30).text.splitlines()
    kind = next(line.removeprefix("event: ") for line in lines if line in ("event: complete", "event: error"))
    return kind, json.loads(lines[lines.index(f"event: {kind}") + 1].removeprefix("data: "))


def test_a_payload_naming_a_server_file_is_no_upload(served, tiny_run):
    """A file payload must be an upload: Gradio refuses other paths, and the app reads only files
    in Gradio's upload folder or the run's image folders."""
    app_module = load_app_module()
    _, engine, url = served
    secret = {"path": str(tiny_run / "model.json"), "meta": {"_type": "gradio.FileData"}}
    kind, _ = raw_call(url, "image_to_captions", [secret, 3])
    assert kind == "error"
    tab = app_module.TABS[1]
    for payload in (secret, str(tiny_run / "model.json")):
        assert not app_module.is_upload(payload, engine.image_roots())
        assert app_module.web_search(engine, tab, payload, 3).startswith("Upload an image first")
    inside = next(Path(engine.run_dir, "images").glob("*.png"))
    assert app_module.is_upload(str(inside), engine.image_roots())


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


def refusal(app_module, run: Path, capsys) -> str:
    """What ``crossmodal serve --run run`` says on stderr; it exits with code 2."""
    with pytest.raises(SystemExit) as exc:
        app_module.main(["--run", str(run)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def test_main_refuses_a_missing_run_with_one_hint(app_module, tmp_path, capsys):
    err = refusal(app_module, tmp_path / "nope", capsys)
    assert "nope: there is no run folder there. Build a run first: crossmodal prepare --config " in err
    (tmp_path / "empty").mkdir()
    err = refusal(app_module, tmp_path / "empty", capsys)
    assert "not a trained run (it has no manifest.json)" in err and err.count("crossmodal ") == 2, err


def test_main_refuses_a_damaged_run_with_one_hint_in_words(app_module, tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("images", "checkpoint", "eval"))
    (run / "store.sqlite").unlink()
    err = refusal(app_module, run, capsys)
    assert f"crossmodal index --run {run}" in err and "make demo" not in err and err.count("crossmodal ") == 2
    shutil.copy(tiny_run / "store.sqlite", run / "store.sqlite")
    index = bytearray((run / "image.index").read_bytes())
    index[4:24] = b"\xff" * 20  # the header after the magic bytes: same size, nothing parses
    (run / "image.index").write_bytes(bytes(index))
    err = refusal(app_module, run, capsys)
    assert "the file is damaged (its contents do not parse as a FAISS index" in err, err
    assert "faiss::" not in err and ".cpp" not in err and "failed" not in err, err
    assert err.strip().endswith(f"re-run: crossmodal index --run {run}")


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


def train_short_text_run(workdir: Path, name: str) -> Path:
    """A tiny run whose text tower (textcnn) reads only the first 8 words of a query."""
    from tinyrun import tiny_config

    from crossmodal.jobs.index import index_run
    from crossmodal.jobs.train import train_run

    config = tiny_config(workdir, f"name={name}", "model.text_tower=textcnn", "train.epochs=3",
                         "model.text_options={max_len: 8, embed_dim: 16, n_filters: 16}")  # fmt: skip
    run = train_run(config, progress=False)
    index_run(run, progress=False)
    return run


def test_a_query_cut_to_what_the_model_reads_says_so(workdir, capsys):
    from crossmodal.cli import main
    from crossmodal.serving import RetrievalEngine
    from crossmodal.serving.http import answer, answer_json

    run = train_short_text_run(workdir, "tiny_app_textcnn")
    assert main(["search", "--run", str(run), "--text", "red square " * 10, "-k", "2", "--paths"]) == 0
    out = capsys.readouterr()  # the command line says it too, on stderr
    assert len(out.out.splitlines()) == 2 and out.err == (
        "crossmodal search: the query is longer than the text model reads: only its first 8 of 20 words "
        "were used\n")  # fmt: skip
    engine = RetrievalEngine.load(run)
    try:
        ans = answer(engine, "t2i", "red square " * 10, 3)
        assert ans.notices == ["The query is longer than the text model reads: only its first 8 of 20 words "
                               "were used."]  # fmt: skip
        assert answer_json(ans, engine.describe())["truncated"] == {"length": 20, "read": 8, "unit": "words"}
        assert answer(engine, "t2i", "red square", 3).notices == []
    finally:
        engine.close()


def test_the_bag_of_words_model_reads_every_word(engine):
    from crossmodal.serving.http import answer

    assert answer(engine, "t2i", "red " * 500, 3).truncated is None


def test_a_running_app_sees_items_added_to_its_run(app_module, tiny_run_copy, tmp_path):
    from gradio_client import Client
    from tinyrun import image_folder

    from crossmodal.jobs.index import add_to_run
    from crossmodal.serving import RetrievalEngine

    engine = RetrievalEngine.load(tiny_run_copy)
    demo, url = app_module.serve(engine, port=free_port(), prevent_thread_lock=True)
    try:
        client = Client(url, verbose=False, download_files=False)
        before = client.predict(api_name="/about")["items"]
        *_, result = client.predict("red", 100, api_name="/text_to_images")
        assert not any(h["key"].startswith("added") for h in result["hits"])
        add_to_run(tiny_run_copy, str(image_folder(tmp_path / "more", 4, prefix="added")), progress=False)
        assert client.predict(api_name="/about")["items"] == before + 4
        *_, result = client.predict("red", 100, api_name="/text_to_images")
        hits = result["hits"]
        added = [h for h in hits if h["key"].startswith("added")]
        assert added, "the items added while the app ran are found"
        assert httpx.get(url + added[0]["image_url"].lstrip("/")).status_code == 200
        assert httpx.get(f"{url}api/about").json()["items"] == before + 4
    finally:
        demo.close()
        engine.close()


def test_the_live_engine_reloads_only_a_finished_update(tiny_run_copy, caplog):
    import os

    from crossmodal.runs.folder import JOURNAL
    from crossmodal.serving import RetrievalEngine
    from crossmodal.serving.live import LiveEngine

    def touch(path: Path) -> None:
        stat = path.stat()
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))

    manifest = tiny_run_copy / "manifest.json"
    live = LiveEngine(RetrievalEngine.load(tiny_run_copy))
    try:
        first = live.get()
        assert live.get() is first and live.reloads == 0, "an unchanged run is not loaded again"
        (tiny_run_copy / JOURNAL).write_text("{}")  # a writer is renaming its files into place
        touch(manifest)
        assert live.get() is first and live.reloads == 0
        (tiny_run_copy / JOURNAL).unlink()
        second = live.get()
        assert second is not first and live.reloads == 1 and second.describe()["items"] == 96
        (tiny_run_copy / "broken").write_bytes(b"not a database")  # writers rename files into place
        os.replace(tiny_run_copy / "broken", tiny_run_copy / "store.sqlite")
        touch(manifest)
        assert live.get() is second and live.reloads == 1, "a run that does not load leaves the last one"
        assert "cannot be loaded" in caplog.text and "still serving the run as it was" in caplog.text
        assert len(second.search_text("red", k=3).hits) == 3
    finally:
        live.close()
