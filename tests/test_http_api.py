"""The plain HTTP JSON API beside the Gradio app, by real requests to a live app on the tiny run."""

from __future__ import annotations

import io
from pathlib import Path

import httpx
import pytest
from PIL import Image
from test_app import first_item_with_caption, free_port, load_app_module

HIT_KEYS = {"rank", "item_id", "key", "distance", "captions", "labels", "text_id", "caption", "image_url"}


@pytest.fixture(scope="module")
def api(tiny_run):
    """``(httpx client on the app's URL, engine)`` of the app on the tiny run."""
    from crossmodal.serving import RetrievalEngine

    engine = RetrievalEngine.load(tiny_run)
    demo, url = load_app_module().serve(engine, port=free_port(), prevent_thread_lock=True)
    try:
        with httpx.Client(base_url=url, timeout=30) as client:
            yield client, engine
    finally:
        demo.close()
        engine.close()


def png_bytes(path: Path) -> bytes:
    return path.read_bytes()


def test_get_text_search_answers_with_the_apps_json(api):
    from crossmodal.serving.http import answer, answer_json

    client, engine = api
    response = client.get("/api/search", params={"text": "a red square", "k": 5})
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    body = response.json()
    reference = answer_json(answer(engine, "t2i", "a red square", 5), engine.describe())
    assert set(body) == set(reference) and body["direction"] == "t2i" and body["error"] is None
    assert [h["item_id"] for h in body["hits"]] == [h["item_id"] for h in reference["hits"]]
    assert all(set(h) == HIT_KEYS and "red" in h["labels"] for h in body["hits"])
    assert "image_path" not in response.text, "no server paths"


def test_targets_and_post_forms(api):
    client, engine = api
    _, _, image = first_item_with_caption(engine, "a blue circle")
    texts = client.get("/api/search", params={"text": "green", "k": 3, "target": "texts"}).json()
    assert texts["direction"] == "t2t" and all("green" in h["caption"] for h in texts["hits"])
    body = client.post("/api/search", json={"text": "green", "k": 2, "target": "texts"}).json()
    assert body["direction"] == "t2t" and len(body["hits"]) == 2
    files = {"image": ("mine.png", png_bytes(image), "image/png")}
    captions = client.post("/api/search", files=files, data={"k": "4"}).json()
    assert captions["direction"] == "i2t" and captions["query"] == "mine.png" and len(captions["hits"]) == 4
    assert all("blue" in h["caption"] for h in captions["hits"])
    images = client.post("/api/search", files=files, data={"k": "4", "target": "images"}).json()
    assert images["direction"] == "i2i" and images["hits"][0]["distance"] == 0
    assert all(h["caption"] for h in images["hits"]), "image hits carry their item's caption"


def test_item_images_and_about(api):
    client, engine = api
    hit = client.get("/api/search", params={"text": "red", "k": 1}).json()["hits"][0]
    response = client.get(hit["image_url"])
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(response.content)).size == (32, 32)
    for missing in ("999999", "abc"):
        response = client.get(f"/api/items/{missing}/image")
        assert response.status_code == 404 and "no image of item" in response.json()["error"]
    response = client.get("/api/items/..%2F..%2Fmanifest.json/image")
    assert response.status_code == 404 and "bits" not in response.text
    about = client.get("/api/about").json()
    assert about["items"] == engine.indexes["image"].ntotal and about["run"] == Path(engine.run_dir).name


@pytest.mark.parametrize(
    ("request_kwargs", "status", "message"),
    [
        ({"method": "GET", "params": {"text": "red", "k": "abc"}}, 400,
         "k must be a positive integer, got 'abc'"),
        ({"method": "GET", "params": {"text": "red", "k": "0"}}, 400,
         "k must be a positive integer, got '0'"),
        ({"method": "GET", "params": {"k": "3"}}, 400, "Type one or more keywords first."),
        ({"method": "GET", "params": {"text": "猫"}}, 400,
         "none of the query's words are in the model's vocabulary: 猫; try other keywords"),
        ({"method": "POST", "json": {"text": "🐱 ❤️"}}, 400,
         "the query '🐱 ❤️' has no words (letters or digits); type a few words"),
        ({"method": "GET", "params": {"text": "red", "target": "sounds"}}, 400, "target must be one of"),
        ({"method": "POST", "content": b"{not json", "headers": {"content-type": "application/json"}}, 400,
         "the body is not valid JSON"),
        ({"method": "POST", "json": ["red"]}, 400, "the JSON body must be an object"),
        ({"method": "POST", "content": b"red", "headers": {"content-type": "text/plain"}}, 400,
         "send a JSON body or a multipart form"),
        ({"method": "POST", "files": {"image": ("e.png", b"", "image/png")}}, 400,
         "image is empty (0 bytes): e.png"),
        ({"method": "POST", "files": {"image": ("notes.txt", b"hello", "text/plain")}}, 400,
         "not a readable image (unknown format): notes.txt"),
        ({"method": "POST", "files": {"image": ("big.png", b"\0" * 11_000_000, "image/png")}}, 413,
         "larger than 10 MB"),
    ],
    ids=["k_text", "k_zero", "no_text", "unknown_script", "emoji_only", "bad_target", "bad_json", "json_list",
         "plain_text", "empty_image", "not_an_image", "too_large"],
)  # fmt: skip
def test_bad_input_gets_4xx_and_one_line(api, request_kwargs, status, message):
    client, _ = api
    kwargs = dict(request_kwargs)
    response = client.request(kwargs.pop("method"), "/api/search", **kwargs)
    assert response.status_code == status, response.text[:300]
    body = response.json()
    assert message in body["error"] and "\n" not in body["error"] and body["hits"] == []
    assert "Traceback" not in response.text and "/tmp" not in body["error"]
    assert client.get("/api/search", params={"text": "red", "k": 1}).status_code == 200, "still up"


def test_a_long_query_and_unknown_words_come_with_notices(api):
    client, _ = api
    body = client.get("/api/search", params={"text": "red zzzqx", "k": 2}).json()
    assert body["ignored_words"] == ["zzzqx"] and body["notices"] == [
        "Ignored, not in the model's vocabulary: zzzqx"
    ]
    body = client.get("/api/search", params={"text": "red", "k": 500}).json()
    assert len(body["hits"]) == 96 and "showing the best 100" in body["notices"][0]


@pytest.mark.parametrize("side", [11_000, 20_000])
def test_an_oversized_upload_gets_our_message_at_any_size(api, side):
    """Reported by a new user: 11,000 px got our message, 20,000 px Pillow's "decompression bomb"."""
    from test_bad_inputs import one_colour_png

    client, _ = api
    files = {"image": (f"huge{side}.png", one_colour_png(side, side), "image/png")}
    response = client.post("/api/search", files=files)
    assert response.status_code == 400
    assert response.json()["error"] == (
        f"image too large: {side}x{side} = {side * side:,} pixels, limit 64,000,000: huge{side}.png"
    )
