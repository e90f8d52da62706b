"""Search requests as the app and the plain HTTP API take them, and the HTTP JSON routes.

The Gradio app and the HTTP routes answer with the same function (``answer``) and the same
JSON (``answer_json``): one check of ``k``, one query check (the engine's), the same notices
(words the model ignores, a query cut to the tokens the text model reads), the same hit fields.

The routes, served beside the Gradio app on the same server (``crossmodal serve``):

    GET  /api/search?text=red+heart&k=5             text -> images (&target=texts: text -> texts)
    POST /api/search  -F image=@photo.png -F k=5    image -> captions (-F target=images: image -> images)
    POST /api/search  {"text": "red heart", "k": 5} the same as GET, as a JSON body
    GET  /api/about                                 what the run is
    GET  /api/items/{item_id}/image                 an item's image file (HEAD: its headers)

A request sends text or an image, never both, with the fields ``text``, ``image`` (a multipart
file upload), ``k`` (blank: the default) and ``target``, each once. Bad input gets HTTP 400 (413
for an upload over the size limit) and ``{"error": "<one line>"}`` (from ``/api/search`` with
``"hits": []`` and ``"notices": []``). At most ``CONCURRENCY`` searches run at once, shared with the app's
own (``SearchSlots``): the rest wait, so that concurrent uploads cannot decode without bound.
FastAPI (installed with Gradio, the ``[app]`` extra) is imported only by ``api_routes``.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from crossmodal.images import ImageDecodeError
from crossmodal.serving.engine import Hit, RetrievalEngine, SearchResult
from crossmodal.text import QueryError, is_blank, name_words, normalize_text, tokenize_words

log = logging.getLogger(__name__)

MAX_K = 100
DEFAULT_K = 12
MAX_UPLOAD_BYTES = 10 * 1024 * 1024  # the same limit as the app's uploads
INTERNAL_ERROR = "The search failed with an internal error; the server log has the details."
TEXT_FIRST = "Type one or more keywords first."
IMAGE_FIRST = "Upload an image first (or click one of the examples)."
NOT_BOTH = "send text or an image, not both"
SEND_ONE = "send text (-F text=red) or an image (-F image=@photo.png)"
FIELDS = ("text", "image", "k", "target")  # of a POST; a GET takes all but image
CONCURRENCY = 2  # searches at once: the app's queue runs as many (crossmodal.app.CONCURRENCY)


@dataclass(frozen=True)
class Direction:
    """A search direction: query modality, what the hits are, and the engine method."""

    source: str  # "text" or "image"
    target: str  # "image" (items) or "text" (captions)
    method: str


DIRECTIONS = {
    "t2i": Direction("text", "image", "search_text"),
    "i2t": Direction("image", "text", "search_image"),
    "i2i": Direction("image", "image", "similar_images"),
    "t2t": Direction("text", "text", "similar_texts"),
}
TARGETS = {"images": "image", "texts": "text", "captions": "text"}  # the HTTP API's ?target=


class SearchSlots:
    """At most ``n`` searches at once, for the app's event handlers and the HTTP routes together.

    A search's memory peak is decoding its image (an 8000 x 8000 upload of 76 KB decodes to
    190 MB), so one cap on searches bounds the server's memory whichever way they come in. Use
    it as a context manager around a search, in the thread that runs it.
    """

    def __init__(self, n: int = CONCURRENCY) -> None:
        if n < 1:
            raise ValueError(f"SearchSlots needs at least 1 slot, got {n}")
        self.n = n
        self._free = threading.BoundedSemaphore(n)

    def __enter__(self) -> SearchSlots:
        self._free.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self._free.release()


class RequestError(ValueError):
    """Bad input to a search; the message is one line for the user. ``status`` is the HTTP code."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Answer:
    """A search result with what the user should know about the query."""

    result: SearchResult
    query: str  # the text, or an upload's file name (never a server path)
    ignored: list[str]  # words of the query the model cannot represent
    truncated: tuple[int, int, str] | None  # (pieces in the query, pieces read, "tokens" or "words")
    capped: int | None = None  # the k asked for, when above MAX_K

    @property
    def notices(self) -> list[str]:
        """One line per thing to know: words ignored, the query cut short."""
        out = []
        if self.ignored:
            out.append(f"Ignored, not in the model's vocabulary: {name_words(self.ignored)}")
        if self.truncated:
            n, kept, unit = self.truncated
            out.append(f"The query is longer than the text model reads: only its first {kept} of {n:,} "
                       f"{unit} were used.")  # fmt: skip
        if self.capped:
            out.append(f"k = {self.capped:,} is more than a search returns: showing the best {MAX_K}.")
        return out


# -- checking a request ----------------------------------------------------------------------------
def parse_k(k: Any) -> int:
    """``k`` as a positive int: an int, an integral float, or a string of digits (the caller caps
    it at ``MAX_K``).

    Raises:
        RequestError: anything else, in the engine's words, with the value.
    """
    value: int | None = None
    if isinstance(k, int) and not isinstance(k, bool):
        value = k
    elif isinstance(k, float) and math.isfinite(k) and k.is_integer():
        value = int(k)
    elif isinstance(k, str) and k.strip().isdigit():
        value = int(k.strip())
    if value is None or value < 1:
        shown = repr(k) if len(repr(k)) <= 40 else repr(k)[:40] + "..."
        raise RequestError(f"k must be a positive integer, got {shown}")
    return value


def direction_of(source: str, target: str | None) -> str:
    """The direction key for a query modality and an HTTP ``target`` (None: the other modality).

    Raises:
        RequestError: an unknown target.
    """
    if target is None or target == "":
        return "t2i" if source == "text" else "i2t"
    if target not in TARGETS:
        raise RequestError(f"target must be one of {', '.join(TARGETS)}, got {target[:40]!r}")
    return f"{source[0]}2{TARGETS[target][0]}"


def answer(engine: RetrievalEngine, direction: str, query: Any, k: Any, name: str | None = None) -> Answer:
    """Search ``engine`` in ``direction`` (a ``DIRECTIONS`` key).

    Args:
        query: a text, or an image as a path, bytes or PIL image.
        k: results wanted (``parse_k``); more than ``MAX_K`` gets ``MAX_K`` and a notice.
        name: how to name an image query (its file name); default: the path's file name.

    Raises:
        RequestError: bad input (an empty or unreadable query, a bad ``k``, an unreadable image);
            the message names an upload by ``name``, never by its path on the server.
    """
    d = DIRECTIONS[direction]
    asked = parse_k(k)
    if d.source == "text":
        if query is None or (isinstance(query, str) and is_blank(query)):
            raise RequestError(TEXT_FIRST)
        if not isinstance(query, str):
            raise RequestError(f"text must be a string, got {type(query).__name__}")
        query = query.strip()
        label = query
    else:
        if query is None or query == "" or query == b"":
            raise RequestError(IMAGE_FIRST)
        label = name or (Path(query).name if isinstance(query, str | Path) else "<image>")
    try:
        result = getattr(engine, d.method)(query, k=min(asked, MAX_K))
    except (QueryError, ImageDecodeError, ValueError, TypeError) as exc:
        message = str(exc)
        if d.source == "image":  # the engine names a path by itself and bytes as "<image>"
            message = message.replace(str(query) if isinstance(query, str | Path) else "<image>", label)
        raise RequestError(message) from None
    ignored = engine.ignored_words(query) if d.source == "text" else []
    truncated = query_truncation(engine, query) if d.source == "text" else None
    return Answer(result, label, ignored, truncated, asked if asked > MAX_K else None)


# -- what the text model reads ----------------------------------------------------------------------
def query_truncation(engine: RetrievalEngine, text: str) -> tuple[int, int, str] | None:
    """``(pieces in text, pieces read, unit)`` when the engine's text model reads only the start
    of ``text`` (transformer towers: tokens; word-id towers: words); None when it reads it all
    (bag-of-words towers read every word)."""
    counted = _text_limit(engine)
    if counted is None:
        return None
    count, kept, unit = counted
    n = count(text)
    return (n, kept, unit) if n > kept else None


def _text_limit(engine: RetrievalEngine) -> tuple[Callable[[str], int], int, str] | None:
    """How to count a query's pieces, how many the text model keeps, and what they are."""
    text_input = getattr(engine.encoders, "text_input", None)  # exported encoders
    if text_input is not None:
        spec = text_input.spec
        if not spec.max_length or spec.kind == "bow":
            return None
        if spec.kind == "ids":
            return (lambda t: len(tokenize_words(t))), int(spec.max_length), "words"
        tok = text_input.tokenizer

        def count(text: str) -> int:
            enc = tok.encode(normalize_text(text), add_special_tokens=False)
            return len(enc.ids) + sum(len(o.ids) for o in enc.overflowing)

        return count, int(spec.max_length) - tok.num_special_tokens_to_add(False), "tokens"
    tower = getattr(engine.model, "text_tower", None)  # the torch model
    if tower is None:
        return None
    if getattr(tower, "max_len", None):  # word ids (textcnn)
        return (lambda t: len(tokenize_words(t))), int(tower.max_len), "words"
    if getattr(tower, "tokenizer", None) is not None and getattr(tower, "max_length", None):
        tok = tower.tokenizer

        def count_hf(text: str) -> int:
            return len(tok(normalize_text(text), add_special_tokens=False, verbose=False)["input_ids"])

        return count_hf, int(tower.max_length) - tok.num_special_tokens_to_add(), "tokens"
    return None


# -- JSON ----------------------------------------------------------------------------------------
def image_url(item_id: int) -> str:
    """Where the HTTP API serves an item's image, relative to the server's root."""
    return f"/api/items/{item_id}/image"


def hit_json(hit: Hit) -> dict[str, Any]:
    """A hit without the server's file path; image hits carry their item's first caption as
    ``caption``, and every hit the URL of its image (``image_url``)."""
    out = {k: v for k, v in asdict(hit).items() if k != "image_path"}
    if not out["caption"] and hit.captions:
        out["caption"] = hit.captions[0]
    out["image_url"] = image_url(hit.item_id) if hit.image_path else None
    return out


def answer_json(ans: Answer, describe: dict[str, Any]) -> dict[str, Any]:
    """The JSON answer of the app and the HTTP API (``error`` is None)."""
    r = ans.result
    truncated = None if ans.truncated is None else dict(zip(("length", "read", "unit"), ans.truncated))
    return {
        "direction": r.direction, "query": ans.query, "hits": [hit_json(h) for h in r.hits],
        "code_hex": r.code_hex, "index": describe["index"], "bits": describe["bits"],
        "timings_ms": r.timings_ms, "total_ms": r.total_ms, "ignored_words": ans.ignored,
        "truncated": truncated, "notices": ans.notices, "error": None,
    }  # fmt: skip


def error_json(message: str) -> dict[str, Any]:
    """The JSON answer to a bad search: the message, no hits."""
    return {"error": message, "hits": [], "notices": []}


def about_json(engine: RetrievalEngine) -> dict[str, Any]:
    """What the run is: dataset, towers, loss, code length, index kind and size (run by name)."""
    describe = engine.describe()
    return {**describe, "run": Path(describe["run"]).name}


def item_image(engine: RetrievalEngine, item_id: int) -> Path | None:
    """The image file of item ``item_id`` when it lies in one of the run's image folders."""
    item = engine.store.get_items([int(item_id)], missing="none")[0]
    if item is None or not item["image_path"]:
        return None
    path = Path(item["image_path"])
    path = (path if path.is_absolute() else Path(engine.run_dir) / path).resolve()
    roots = engine.image_roots()
    return path if path.is_file() and any(path.is_relative_to(r) for r in roots) else None


# -- the HTTP routes -------------------------------------------------------------------------------
def api_routes(get_engine: Callable[[], RetrievalEngine], slots: SearchSlots | None = None) -> list[Any]:
    """FastAPI routes of the HTTP API over the engine ``get_engine()`` returns at each request
    (for ``FastAPI(routes=...)``: Gradio's ``launch(app_kwargs={"routes": ...})``).

    Args:
        slots: the cap on searches at once, shared with the app's handlers (default: a cap of
            ``CONCURRENCY`` for these routes alone). Requests beyond it wait without a thread.
    """
    import anyio
    from fastapi import Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import FileResponse, JSONResponse
    from fastapi.routing import APIRoute

    slots = slots or SearchSlots()
    waiting = anyio.Semaphore(slots.n)  # threads stay free for the app while requests wait

    def respond(direction: str, query: Any, k: Any, name: str | None = None) -> JSONResponse:
        engine = get_engine()
        try:
            with slots:
                ans = answer(engine, direction, query, k, name)
            return JSONResponse(answer_json(ans, engine.describe()))
        except RequestError as exc:
            return JSONResponse(error_json(str(exc)), status_code=exc.status)
        except Exception:  # the server stays up and shows no traceback
            log.exception("HTTP search failed")
            return JSONResponse(error_json(INTERNAL_ERROR), status_code=500)

    async def search(request: Request) -> Any:
        """GET ``?text=...&k=...&target=images|texts``; POST a JSON body ``{"text", "k", "target"}``
        or a multipart form with ``image`` (or ``text``)."""
        try:
            source, query, k, target, name = read_get(request) if request.method == "GET" else (
                await read_post(request))  # fmt: skip
            direction = direction_of(source, target)
        except RequestError as exc:
            return JSONResponse(error_json(str(exc)), status_code=exc.status)
        async with waiting:
            return await run_in_threadpool(respond, direction, query, k, name)

    search.__annotations__["request"] = Request  # FastAPI reads it; not a module-level name here

    def about() -> Any:
        return JSONResponse(about_json(get_engine()))

    def image(item_id: str) -> Any:
        path = item_image(get_engine(), int(item_id)) if item_id.isdigit() else None
        if path is None:
            return JSONResponse({"error": f"no image of item {item_id[:40]!r} here"}, status_code=404)
        return FileResponse(path)

    return [
        APIRoute("/api/search", search, methods=["GET", "POST"]),
        APIRoute("/api/about", about, methods=["GET"]),
        APIRoute("/api/items/{item_id}/image", image, methods=["GET", "HEAD"]),
    ]


def check_fields(names: list[str], allowed: tuple[str, ...], what: str = "field") -> None:
    """Refuse a request field not in ``allowed``, or one given twice (never silently the last).

    Raises:
        RequestError: naming the field, and the ones there are.
    """
    seen: set[str] = set()
    for name in names:
        if name not in allowed:
            raise RequestError(f"unknown {what} {name[:40]!r} ({what}s: {', '.join(allowed)})")
        if name in seen:
            raise RequestError(f"{name} given twice")
        seen.add(name)


def k_or_default(k: Any) -> Any:
    """``k`` as sent, or ``DEFAULT_K`` when it is missing, null or blank."""
    return DEFAULT_K if k is None or isinstance(k, str) and not k.strip() else k


def read_get(request: Any) -> tuple[str, Any, Any, str | None, str | None]:
    """``(source, query, k, target, name)`` of a GET: ``?text=...&k=...&target=...``.

    Raises:
        RequestError: an unknown or repeated parameter.
    """
    params = request.query_params
    check_fields([key for key, _ in params.multi_items()], ("text", "k", "target"), "parameter")
    return "text", params.get("text"), k_or_default(params.get("k")), params.get("target"), None


async def read_post(request: Any) -> tuple[str, Any, Any, str | None, str | None]:
    """``(source, query, k, target, name)`` of a POST: a JSON body or a multipart form.

    Raises:
        RequestError: malformed JSON, an unknown or repeated field, a field of the wrong type,
            text and an image together, an upload over ``MAX_UPLOAD_BYTES`` (413).
    """
    kind = request.headers.get("content-type", "")
    if int(request.headers.get("content-length") or 0) > MAX_UPLOAD_BYTES + 64 * 1024:
        raise RequestError(f"the request is larger than {MAX_UPLOAD_BYTES // 2**20} MB", status=413)
    if kind.startswith("application/json"):
        return read_json(await request.body())
    if not kind.startswith("multipart/form-data"):
        raise RequestError("send a JSON body or a multipart form (curl -F image=@photo.png)")
    form = await request.form()
    check_fields([key for key, _ in form.multi_items()], FIELDS)
    text, upload, k, target = (form.get(name) for name in FIELDS)
    for name, value in (("text", text), ("k", k), ("target", target)):
        if value is not None and not isinstance(value, str):
            raise RequestError(f"{name} must be a plain form field, not a file")
    if upload is None:
        if text is None:
            raise RequestError(SEND_ONE)
        return "text", text, k_or_default(k), target, None
    if isinstance(upload, str):
        raise RequestError("the image field must be a file upload (curl -F image=@photo.png)")
    if text is not None and not is_blank(text):
        raise RequestError(NOT_BOTH)
    data = await upload.read(MAX_UPLOAD_BYTES + 1)
    if len(data) > MAX_UPLOAD_BYTES:
        raise RequestError(f"the image is larger than {MAX_UPLOAD_BYTES // 2**20} MB", status=413)
    name = Path(upload.filename or "image").name
    if not data:
        raise RequestError(f"image is empty (0 bytes): {name}")
    return "image", data, k_or_default(k), target, name


def read_json(body: bytes) -> tuple[str, Any, Any, str | None, str | None]:
    """``(source, query, k, target, name)`` of a JSON body ``{"text", "k", "target"}``.

    Raises:
        RequestError: not JSON, not an object, an unknown or repeated key, an image (JSON cannot
            carry one), a ``target`` that is not a string.
    """
    try:
        body = json.loads(body, object_pairs_hook=_unique_keys)
    except RequestError:
        raise
    except ValueError:
        raise RequestError("the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise RequestError('the JSON body must be an object such as {"text": "red heart", "k": 5}')
    check_fields(list(body), FIELDS)
    text, target = body.get("text"), body.get("target")
    if body.get("image") is not None:
        if isinstance(text, str) and not is_blank(text):
            raise RequestError(NOT_BOTH)
        raise RequestError("send an image as a multipart upload (curl -F image=@photo.png), not in JSON")
    if target is not None and not isinstance(target, str):
        raise RequestError(f"target must be a string, got {type(target).__name__}")
    return "text", text, k_or_default(body.get("k")), target, None


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object as a dict; a key given twice is refused (``json`` would keep the last)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise RequestError(f"{key[:40]} given twice")
        out[key] = value
    return out
