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
        assert response.status_code == 404
        assert response.json() == {"error": f"no image of item '{missing}' here"}, "only the error"
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


def test_head_of_an_item_image_is_its_get_without_the_body(api):
    """Reported by a new user: HEAD answered 405."""
    client, _ = api
    url = client.get("/api/search", params={"text": "red", "k": 1}).json()["hits"][0]["image_url"]
    got, head = client.get(url), client.head(url)
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-type"] == "image/png"
    assert head.headers["content-length"] == got.headers["content-length"] == str(len(got.content))
    missing = client.head("/api/items/999999/image")
    assert missing.status_code == 404 and missing.content == b""


def test_a_blank_k_means_the_default(api):
    """Reported by a new user: ``?k=`` answered "k must be a positive integer, got ''"."""
    from crossmodal.serving.http import DEFAULT_K

    client, engine = api
    _, _, image = first_item_with_caption(engine, "a blue circle")
    files = {"image": ("mine.png", png_bytes(image), "image/png")}
    answers = [
        client.get("/api/search", params={"text": "red", "k": ""}),
        client.get("/api/search?text=red&k=%20"),
        client.post("/api/search", json={"text": "red", "k": ""}),
        client.post("/api/search", json={"text": "red", "k": None}),
        client.post("/api/search", files={"text": (None, "red"), "k": (None, "")}),
        client.post("/api/search", files=files, data={"k": ""}),
    ]
    for response in answers:
        assert response.status_code == 200, response.text[:300]
        assert len(response.json()["hits"]) == DEFAULT_K


@pytest.mark.parametrize(
    ("request_kwargs", "message"),
    [
        # text and an image together: the text was dropped without a word
        ({"files": {"image": ("x.png", "IMAGE", "image/png")}, "data": {"text": "cat"}},
         "send text or an image, not both"),
        ({"json": {"text": "cat", "image": "x.png"}}, "send text or an image, not both"),
        ({"json": {"image": "x.png"}},
         "send an image as a multipart upload (curl -F image=@photo.png), not in JSON"),
        # fields of the wrong type or name: "Type one or more keywords first."
        ({"json": {"text": 5}}, "text must be a string, got int"),
        ({"json": {"text": ["cat", "dog"]}}, "text must be a string, got list"),
        ({"json": {"text": "cat", "target": ["images"]}}, "target must be a string, got list"),
        ({"json": {"text": "cat", "q": "dog"}}, "unknown field 'q' (fields: text, image, k, target)"),
        ({"content": b'{"text": "cat", "text": "dog"}', "headers": {"content-type": "application/json"}},
         "text given twice"),
        ({"files": {"image": (None, "notafile")}},
         "the image field must be a file upload (curl -F image=@photo.png)"),
        ({"files": {"file": ("photo.png", "IMAGE", "image/png")}},
         "unknown field 'file' (fields: text, image, k, target)"),
        ({"files": {"text": ("notes.txt", b"cat", "text/plain")}},
         "text must be a plain form field, not a file"),
        ({"files": [("text", (None, "cat")), ("text", (None, "dog"))]}, "text given twice"),
        ({"files": {"k": (None, "3")}}, "send text (-F text=red) or an image (-F image=@photo.png)"),
    ],
    ids=["form_text_and_image", "json_text_and_image", "json_image", "json_text_int", "json_text_list",
         "json_target_list", "json_unknown_key", "json_key_twice", "form_image_not_a_file",
         "form_unknown_field", "form_text_a_file", "form_text_twice", "form_neither"],
)  # fmt: skip
def test_a_post_with_misnamed_mistyped_or_extra_fields_is_refused_by_name(api, request_kwargs, message):
    """Reported by a new user: each of these was answered "Type one or more keywords first." or
    searched with one of the fields dropped."""
    client, engine = api
    kwargs = dict(request_kwargs)
    if "IMAGE" in str(kwargs.get("files")):  # a real image where the case sends one
        _, _, image = first_item_with_caption(engine, "a blue circle")
        files = kwargs["files"].items()
        kwargs["files"] = {key: (name, png_bytes(image), kind) for key, (name, _, kind) in files}
    response = client.post("/api/search", **kwargs)
    assert response.status_code == 400, response.text[:300]
    assert response.json()["error"] == message and response.json()["hits"] == []


@pytest.mark.parametrize(
    ("query", "message"),
    [("text=cat&text=dog", "text given twice"), ("text=cat&k=2&k=3", "k given twice"),
     ("text=cat&q=dog", "unknown parameter 'q' (parameters: text, k, target)"),
     ("image=x.png", "unknown parameter 'image' (parameters: text, k, target)")],
    ids=["text_twice", "k_twice", "unknown", "image_in_a_get"],
)  # fmt: skip
def test_a_get_with_a_repeated_or_unknown_parameter_is_refused_by_name(api, query, message):
    """Reported by a new user: ``?text=cat&text=dog`` searched for "dog" alone."""
    client, _ = api
    response = client.get(f"/api/search?{query}")
    assert response.status_code == 400 and response.json()["error"] == message


def test_api_searches_share_the_apps_cap_on_searches_at_once(api, monkeypatch):
    """Reported by a new user: four 8000 x 8000 uploads decoded at once took the server to 1.7 GB.
    With a search slowed down, API requests and app events sent together never run more than the
    app's queue allows (``CONCURRENCY``) at once; the rest wait, and all are answered."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from gradio_client import Client

    from crossmodal.app import CONCURRENCY

    client, engine = api
    lock, running, most = threading.Lock(), [0], [0]
    search = engine.search_text

    def counted(query, k=10):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        try:
            threading.Event().wait(0.2)  # long enough for the others to pile up
            return search(query, k=k)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(engine, "search_text", counted)
    app = Client(str(client.base_url), verbose=False)
    with ThreadPoolExecutor(8) as pool:
        api_calls = [pool.submit(client.get, "/api/search", params={"text": "red", "k": 2}) for _ in range(6)]
        app_calls = [pool.submit(app.predict, "red", 2, api_name="/text_to_images") for _ in range(2)]
        assert all(f.result().status_code == 200 for f in api_calls)
        assert all(f.result()[-1]["error"] is None for f in app_calls)
    assert 1 <= most[0] <= CONCURRENCY
