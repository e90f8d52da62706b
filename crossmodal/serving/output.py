"""Search results as text for people and for scripts: a table that fits a terminal, JSON, paths.

    table(result, width=100)   # ids whole; captions cut with an ellipsis to fit ``width``
    table(result, wide=True)   # nothing cut
    as_json(result, k=10)      # one JSON object: query, direction, k, hits
    paths(result)              # image paths of image hits, item keys of text hits

Widths are display widths: a wide character (CJK, most emoji) takes two terminal columns,
a combining mark none.
"""

from __future__ import annotations

import os
import unicodedata
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from crossmodal.serving.engine import Hit, SearchResult

ELLIPSIS = "…"
MIN_CAPTION_WIDTH = 20  # a terminal narrower than the ids still shows this much of each caption


def char_width(ch: str) -> int:
    """Terminal columns of one character: 0 for combining marks and controls, 2 for wide ones."""
    if unicodedata.combining(ch) or unicodedata.category(ch) in ("Mn", "Me", "Cf", "Cc"):
        return 0
    return 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1


def display_width(text: str) -> int:
    """Terminal columns ``text`` takes."""
    return sum(char_width(ch) for ch in text)


def clip(text: str, width: int) -> str:
    """``text`` cut to at most ``width`` columns, ending in an ellipsis when cut."""
    if display_width(text) <= width:
        return text
    out, used = [], 0
    for ch in text:
        w = char_width(ch)
        if used + w > width - 1:
            break
        out.append(ch)
        used += w
    return "".join(out) + ELLIPSIS


def pad(text: str, width: int) -> str:
    """``text`` followed by spaces up to ``width`` columns (never cut)."""
    return text + " " * max(0, width - display_width(text))


def printable(text: str) -> str:
    """``text`` with control characters as backslash escapes (``\\n``, ``\\t``, ``\\x1b``), as
    ``ls -b`` shows names: one hit stays one line, and no escape sequence reaches the terminal."""
    if not any(unicodedata.category(ch) == "Cc" for ch in text):
        return text
    return "".join(ch.encode("unicode_escape").decode("ascii") if unicodedata.category(ch) == "Cc"
                   else ch for ch in text)  # fmt: skip


def image_file(hit: Hit) -> str | None:
    """The hit's image file, or None when its item has none or the file is gone since it was added."""
    return hit.image_path if hit.image_path and os.path.isfile(hit.image_path) else None


def _distance(hit: Hit) -> int | float:
    return int(hit.distance) if float(hit.distance).is_integer() else round(float(hit.distance), 4)


def _caption(hit: Hit, text_hits: bool) -> str:
    return hit.caption if text_hits else " | ".join(hit.captions)


def table(result: SearchResult, width: int = 100, wide: bool = False) -> str:
    """The result as a table: a header line, then rank, distance, id and caption(s) per hit.

    Ids are never cut (they are what ``crossmodal index --remove`` takes); the id column is as
    wide as the longest. Captions are cut with an ellipsis to fit ``width`` columns, but keep
    at least ``MIN_CAPTION_WIDTH``; ``wide`` cuts nothing.
    """
    text_hits = result.direction.endswith("t")
    stages = ", ".join(f"{k} {v:.1f}" for k, v in result.timings_ms.items())
    id_width = max([2, *(display_width(printable(h.key)) for h in result.hits)])
    caption_width = max(MIN_CAPTION_WIDTH, width - (4 + 2 + 4 + 2 + id_width + 2))
    head = "caption" if text_hits else "captions"
    lines = [f"{result.direction}  query: {result.query!r}  code: {result.code_hex}  "
             f"({result.total_ms:.1f} ms: {stages})",
             f"{'rank':>4}  {'dist':>4}  {pad('id', id_width)}  {head}"]  # fmt: skip
    for h in result.hits:
        caption = printable(_caption(h, text_hits))
        caption = caption if wide else clip(caption, caption_width)
        lines.append(f"{h.rank:>4}  {h.distance:>4g}  {pad(printable(h.key), id_width)}  {caption}".rstrip())
    if not result.hits:
        lines.append("(no results)")
    return "\n".join(lines)


def as_json(result: SearchResult, k: int, ignored: list[str] = ()) -> dict[str, Any]:
    """The result as one JSON-ready object.

    Keys: ``query``, ``direction`` (``t2i``, ``i2t``, ``i2i``, ``t2t``), ``k``, ``code`` (hex),
    ``ms``, ``ignored`` (query words the model does not know) and ``hits``, each with ``rank``,
    ``id`` (the item's key), ``item_id``, ``distance``, ``caption`` (a text hit's caption, an
    image hit's first caption), ``captions`` (all of the item's), ``labels`` and
    ``image_path`` (absolute, or null when the item has no image file or it is gone).
    """
    text_hits = result.direction.endswith("t")
    hits = [{"rank": h.rank, "id": h.key, "item_id": h.item_id, "distance": _distance(h),
             "caption": h.caption if text_hits else (h.captions[0] if h.captions else ""),
             "captions": list(h.captions), "labels": list(h.labels),
             "image_path": image_file(h)} for h in result.hits]  # fmt: skip
    return {"query": result.query, "direction": result.direction, "k": int(k), "code": result.code_hex,
            "ms": round(result.total_ms, 2), "ignored": list(ignored), "hits": hits}  # fmt: skip


def paths(result: SearchResult) -> tuple[list[str], list[str]]:
    """One line per hit for scripts: the image path of image hits, the item key of text hits,
    control characters escaped (``printable``; ``--json`` gives names exactly).

    Returns:
        The lines, and the keys of image hits left out because their item has no image file
        (or it is gone).
    """
    if result.direction.endswith("t"):
        return [printable(h.key) for h in result.hits], []
    files = [(h, image_file(h)) for h in result.hits]
    return [printable(f) for _, f in files if f], [printable(h.key) for h, f in files if not f]
