"""The crossmodal Gradio app: type keywords and see images, upload an image and read captions.

    crossmodal serve --run runs/openmoji [--host 127.0.0.1] [--port 7860] [--k 12]
    crossmodal serve --config configs/openmoji.yaml   # prepare the recipe's run first (make demo)

(``python app.py ...`` at the repository root takes the same arguments.) A thin caller of
``crossmodal.serving``: four tabs (text -> images, image -> captions, image -> images, text ->
texts) and an "About this run" panel, over a ``LiveEngine`` that loads the run again when it
changes (``crossmodal index --add`` while the app runs).

Scripts have two ways in, both answering with the same JSON (``crossmodal.serving.http``):
``gradio_client`` endpoints ``/text_to_images``, ``/image_to_captions``, ``/image_to_images`` and
``/text_to_texts``, each returning the same five values (results HTML, table, status, details, the
JSON result), and ``/about``; and plain HTTP routes on the same server (``GET``/``POST
/api/search``, ``/api/about``, ``/api/items/{id}/image``).
"""

from __future__ import annotations

import argparse
import html
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import gradio as gr

    from crossmodal.serving import Hit, RetrievalEngine, SearchResult
    from crossmodal.serving.http import Answer, SearchSlots
    from crossmodal.serving.live import LiveEngine

log = logging.getLogger("crossmodal.app")

DEFAULT_K = 12  # as crossmodal.serving.http (not imported here: --help stays light)
MAX_K = 100
MAX_FILE_SIZE = "10mb"
CONCURRENCY = 2  # the demo machine has two cores; torch holds a lock per engine anyway
PREFERRED_EXAMPLES = ("cat", "red heart", "flag", "smiling face", "dog", "sun", "car", "tree")
N_EXAMPLES = 4
QUERY_LINES = 3  # the keyword box grows to this many lines, then scrolls
SYSTEM_FONTS = ["ui-sans-serif", "system-ui", "sans-serif"]  # no web fonts: the app must work offline
PROG = "crossmodal serve"  # how error messages name the command
TRAIN_HINT = "Build a run first: crossmodal prepare --config configs/openmoji.yaml (or simply: make demo)."
CSS = """
.cm-grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(132px, 1fr)); gap: 10px; }
.cm-card { margin: 0; display: flex; flex-direction: column; min-width: 0;
  border: 1px solid var(--border-color-primary); border-radius: 8px; padding: 6px; }
.cm-card a { display: block; }
.cm-card img { display: block; width: 100%; aspect-ratio: 1 / 1; object-fit: contain; }
.cm-card figcaption { margin-top: 6px; font-size: var(--text-sm); line-height: 1.35;
  overflow-wrap: anywhere; }
.cm-meta { color: var(--body-text-color-subdued); }
.cm-caption { display: block; }
/* table headers break between words only; a table wider than the screen scrolls sideways whole */
.cm-table th .header { white-space: nowrap; word-break: normal; overflow-wrap: normal; }
@media (max-width: 640px) {  /* every tab stays in sight: the tabs that do not fit wrap below */
  .tab-wrapper { flex-wrap: wrap; height: auto !important; }
  .tab-wrapper .overflow-menu { flex-basis: 100%; }
  .tab-wrapper .overflow-menu > button { display: none; }
  .tab-wrapper .overflow-dropdown { display: flex !important; flex-wrap: wrap; position: static;
    box-shadow: none; border: 0; padding: 0; min-width: 0; background: none; }
}
"""


@dataclass(frozen=True)
class Tab:
    """One search direction: its title, endpoint name and ``crossmodal.serving.http`` direction."""

    title: str
    api_name: str
    direction: str  # a key of crossmodal.serving.http.DIRECTIONS

    @property
    def source(self) -> str:
        return "text" if self.direction[0] == "t" else "image"

    @property
    def target(self) -> str:
        return "image" if self.direction[-1] == "i" else "text"


TABS = (
    Tab("Text -> Images", "text_to_images", "t2i"),
    Tab("Image -> Captions", "image_to_captions", "i2t"),
    Tab("Image -> Images", "image_to_images", "i2i"),
    Tab("Text -> Texts", "text_to_texts", "t2t"),
)
TABLE_HEADERS = ["rank", "distance", "caption", "item", "item id"]


# -- searching -------------------------------------------------------------------------------------
def image_query(value: Any) -> tuple[Any, str | None]:
    """``(image, file name)`` of an image query: a Gradio file payload (``{"path", "orig_name"}``),
    a path, or bytes / a PIL image (no name)."""
    if isinstance(value, dict):
        path = value.get("path")
        return path, Path(value.get("orig_name") or path or "image").name
    if isinstance(value, str | os.PathLike) and str(value):
        return value, Path(value).name
    return value, None


def is_upload(value: Any, roots: list[Path]) -> bool:
    """Whether an image query from a web request names a file the app may read: one in Gradio's
    upload folder or in the run's image folders (the examples), never another server file."""
    from gradio.utils import get_upload_folder

    path, _ = image_query(value)
    if not isinstance(path, str | os.PathLike) or not str(path):
        return False
    resolved = Path(path).resolve()
    if any(resolved.is_relative_to(root) for root in [Path(get_upload_folder()).resolve(), *roots]):
        return True
    log.warning("refused an image payload outside the upload folder: %s", path)
    return False


def search(engine: RetrievalEngine, tab: Tab, query: Any, k: Any) -> Answer | str:
    """Search for ``tab``; a one-line message instead of an answer for bad input.

    ``query`` is a text, or an image (``image_query``); uploads are named by their file name.
    """
    from crossmodal.serving.http import INTERNAL_ERROR, RequestError, answer

    name = None
    if tab.source == "image":
        query, name = image_query(query)
    try:
        return answer(engine, tab.direction, query, k, name=name)
    except RequestError as exc:
        return str(exc)
    except Exception:  # the app must stay up and never show a traceback
        log.exception("%s failed", tab.api_name)
        return INTERNAL_ERROR


def run_search(engine: RetrievalEngine, tab: Tab, query: Any, k: Any) -> SearchResult | str:
    """``search`` without the notices: the engine's result, or the message for bad input."""
    ans = search(engine, tab, query, k)
    return ans if isinstance(ans, str) else ans.result


def web_search(engine: RetrievalEngine, tab: Tab, query: Any, k: Any) -> Answer | str:
    """``search`` for a query that came over the network: an image must be an upload."""
    from crossmodal.serving.http import IMAGE_FIRST

    if tab.source == "image" and query is not None and not is_upload(query, engine.image_roots()):
        return IMAGE_FIRST
    return search(engine, tab, query, k)


def format_distance(d: float) -> str:
    return str(int(d)) if float(d).is_integer() else f"{d:.2f}"


def hit_caption(hit: Hit) -> str:
    """The caption a hit shows: the matching caption of a text hit, else the item's first."""
    return hit.caption or (hit.captions[0] if hit.captions else "")


def cards_html(hits: list[Hit]) -> str:
    """The results as cards: the image (a link to the full-size file), then rank, distance, item
    key and id, and the whole caption under it; every caption of the item on hover."""
    cards = []
    for h in hits:
        url = f"api/items/{h.item_id}/image"
        caption, everything = html.escape(hit_caption(h)), html.escape(" | ".join(h.captions))
        picture = ""
        if h.image_path:
            picture = (f'<a href="{url}" target="_blank" rel="noopener" title="open the full-size image">'
                       f'<img src="{url}" alt="{caption}" loading="lazy"></a>')  # fmt: skip
        cards.append(
            f'<figure class="cm-card" data-item-id="{h.item_id}">{picture}<figcaption>'
            f'<span class="cm-meta">#{h.rank} · d={format_distance(h.distance)} · id {h.item_id}</span> '
            f'<code class="cm-key">{html.escape(h.key)}</code>'
            f'<span class="cm-caption" title="{everything}">{caption}</span></figcaption></figure>'
        )
    return f'<div class="cm-grid">{"".join(cards)}</div>' if cards else ""


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def status_line(tab: Tab, ans: Answer) -> str:
    """What was found and how fast, then one line per notice (ignored words, a cut query)."""
    result = ans.result
    what = plural(len(result.hits), "image" if tab.target == "image" else "caption")
    parts = " · ".join(f"{name} {ms:.1f}" for name, ms in result.timings_ms.items())
    lines = [f"**{what}** in **{result.total_ms:.1f} ms** ({parts} ms)"]
    lines += [f"ℹ️ {html.escape(n)}" for n in ans.notices]
    return "  \n".join(lines)


def details_text(engine: RetrievalEngine, tab: Tab, ans: Answer) -> str:
    info = engine.describe()
    target = "items" if tab.target == "image" else "texts"
    return (
        f"query code ({info['bits']} bits, hex): `{ans.result.code_hex}`  \n"
        f"index: **{info['index']}** over {info[target]} {target}"
        f"{' (weighted Hamming re-ranking)' if info['weighted'] else ''}"
    )


# -- the app ---------------------------------------------------------------------------------------
def example_queries(engine: RetrievalEngine, n: int = N_EXAMPLES) -> list[str]:
    """A few keywords that occur in the run and that the model knows.

    Preferred words (when a label or a caption contains them) come first, then label names,
    then captions.
    """
    labels = engine.label_names()
    captions = engine.sample_captions(2000)
    corpus = " | ".join([*labels, *captions]).lower()
    preferred = [q for q in PREFERRED_EXAMPLES if q in corpus]
    found: list[str] = []
    for q in dict.fromkeys([*preferred, *labels, *captions[:50]]):
        if len(found) == n:
            break
        if q.strip() and usable_query(engine, q):
            found.append(q)
    return found


def usable_query(engine: RetrievalEngine, query: str) -> bool:
    """Whether the text tower encodes every word of ``query``."""
    from crossmodal.text import QueryError

    try:
        engine.encode_texts([query])
    except QueryError:
        return False
    return not engine.ignored_words(query)


def example_images(engine: RetrievalEngine, roots: list[Path], n: int = N_EXAMPLES) -> list[str]:
    """A few database images spread over the store."""
    paths = [p for p in engine.sample_image_paths(8 * n) if servable(p, roots)]
    step = max(1, len(paths) // n)
    return paths[::step][:n]


def about_markdown(engine: RetrievalEngine) -> str:
    """The "About this run" panel: what was trained, the index, and mAP if evaluated."""
    d = engine.describe()
    lines = [
        f"**run** `{Path(d['run']).name}` · **dataset** {d['dataset']} · "
        f"**model** {d['image_tower']} + {d['text_tower']}, loss {d['loss']} · "
        f"**codes** {d['bits']} bits · **index** {d['index']}: {d['items']} images, {d['texts']} texts",
    ]
    table = map_table(engine.metrics())
    lines.append(table or "Not evaluated yet: run `crossmodal eval --run <run>` for the mAP table.")
    return "\n\n".join(lines)


def map_table(metrics: dict[str, Any] | None) -> str:
    """A markdown table of mAP per row and direction (``RetrievalEngine.metrics()``); "" if None."""
    from crossmodal.report import direction_columns, flatten_metrics, markdown_table

    if not metrics:
        return ""
    dirs = [d for d in ("i2t", "t2i", "i2i", "t2t") if any(d in m for m in metrics.values())]
    rows = [{"method": name, **flatten_metrics(m)} for name, m in metrics.items()]
    return "mAP@all on the query split:\n\n" + markdown_table(
        rows, [("method", "codes"), *direction_columns(dirs, None)]
    )


def servable(path: str, roots: list[Path]) -> bool:
    """Whether ``path`` is a file inside one of the folders the app may serve."""
    if not path:
        return False
    p = Path(path).resolve()
    return p.is_file() and any(p.is_relative_to(root) for root in roots)


class TabView:
    """The components of one tab and the functions that fill and clear them; its searches take
    one of ``slots`` each (the cap shared with the HTTP API)."""

    def __init__(self, live: LiveEngine, tab: Tab, k: int, slots: SearchSlots) -> None:
        self.live, self.tab, self.k, self.slots = live, tab, k, slots

    def build(self, examples: list[Any]) -> None:
        """Lay out the tab: query row, clickable examples, then the results."""
        import gradio as gr

        self._inputs(examples)
        self._outputs()
        if examples:
            gr.Examples([[e] for e in examples], inputs=[self.query], outputs=self.outputs(),
                        fn=lambda q: self.search(q, self.k), run_on_click=True, cache_examples=False,
                        api_visibility="private", label="Examples (click to search)")  # fmt: skip
        self.status.render()
        if self.tab.target == "text":  # captions: the table first, then the item of each
            self.table.render()
            self.cards.render()
        else:
            self.cards.render()
            with gr.Accordion("The results as a table (to copy)", open=False):
                self.table.render()
        with gr.Accordion("Query code and index", open=False):
            self.details.render()
        self.json.render()

    def _inputs(self, examples: list[Any]) -> None:
        import gradio as gr

        name = self.tab.api_name
        with gr.Row():
            if self.tab.source == "text":
                hint = "e.g. " + ", ".join(examples[:2]) if examples else "keywords"
                self.query = gr.Textbox(label="Keywords", placeholder=hint, scale=4, lines=1,
                                        max_lines=QUERY_LINES, elem_id=f"{name}_query")  # fmt: skip
            else:
                self.query = gr.Image(label="Query image", type="filepath", sources=["upload", "clipboard"],
                                      height=220, scale=2, elem_id=f"{name}_query")  # fmt: skip
            with gr.Column(scale=1, min_width=160):
                self.slider = gr.Slider(1, MAX_K, value=self.k, step=1, label="k (results)")
                self.button = gr.Button("Search", variant="primary", elem_id=f"{name}_button")

    def _outputs(self) -> None:
        """The result components, made unrendered so that the examples can sit above them."""
        import gradio as gr

        name, hidden = self.tab.api_name, {"render": False}
        self.status = gr.Markdown(elem_id=f"{name}_status", **hidden)
        label = "Matching captions" if self.tab.target == "text" else "Images"
        self.table = gr.Dataframe(headers=TABLE_HEADERS, label=label, interactive=False, wrap=True,
                                  elem_id=f"{name}_table", elem_classes=["cm-table"], **hidden)  # fmt: skip
        self.cards = gr.HTML(elem_id=f"{name}_results", **hidden)
        self.details = gr.Markdown(**hidden)
        self.json = gr.JSON(label="Result (JSON)", visible=False, **hidden)

    def outputs(self) -> list[gr.components.Component]:
        """The same five for every tab, so every endpoint returns ``(results, table, status,
        details, result)``."""
        return [self.cards, self.table, self.status, self.details, self.json]

    def search(self, query: Any, k: Any) -> tuple[Any, ...]:
        """The event handler: one value per output component; bad input clears the results."""
        from crossmodal.serving.http import answer_json

        engine = self.live.get()
        with self.slots:
            ans = web_search(engine, self.tab, query, k)
        if isinstance(ans, str):
            return self._message(ans)
        hits = ans.result.hits
        rows = [[h.rank, format_distance(h.distance), hit_caption(h), h.key, h.item_id] for h in hits]
        return (cards_html(hits), rows, status_line(self.tab, ans), details_text(engine, self.tab, ans),
                answer_json(ans, engine.describe()))  # fmt: skip

    def _message(self, message: str) -> tuple[Any, ...]:
        import gradio as gr

        from crossmodal.serving.http import error_json

        gr.Warning(message)
        return "", [], f"⚠️ {html.escape(message)}", "", error_json(message)

    def cleared(self) -> tuple[Any, ...]:
        """Empty results and status (a cleared query, an upload the server refused)."""
        return "", [], "", "", None

    def wire(self) -> None:
        """Search on the button and on Enter / upload; clear the results when the query is cleared
        (the keyword box emptied, the image removed)."""
        import gradio as gr

        triggers = [self.button.click]
        triggers.append(self.query.submit if self.tab.source == "text" else self.query.upload)
        # preprocess=False: the engine decodes uploads itself (safely), so an unreadable
        # file becomes a message instead of a Gradio preprocessing error
        gr.on(triggers, self.search, inputs=[self.query, self.slider], outputs=self.outputs(),
              api_name=self.tab.api_name, preprocess=False)  # fmt: skip
        # a refused upload (too large) empties the query image too
        clearing = [self.query.change] if self.tab.source == "text" else [self.query.clear, self.query.change]
        gr.on(clearing, self.clear_if_empty, inputs=[self.query], outputs=self.outputs(),
              api_visibility="private", queue=False, preprocess=False, show_progress="hidden",
              trigger_mode="always_last")  # fmt: skip

    def clear_if_empty(self, query: Any) -> tuple[Any, ...]:
        """Empty results when the query is gone (no image, a blank keyword box); else leave them
        to the search."""
        import gradio as gr

        gone = not query or (isinstance(query, str) and not query.strip())
        return self.cleared() if gone else tuple(gr.skip() for _ in self.outputs())


def build_app(engine: RetrievalEngine | LiveEngine, k: int = DEFAULT_K, slots: SearchSlots | None = None
              ) -> gr.Blocks:  # fmt: skip
    """The Gradio Blocks for ``engine``: four search tabs and an "About this run" panel.

    Args:
        slots: the cap on searches at once, to share with the HTTP API (default: ``CONCURRENCY``).
    """
    import gradio as gr

    from crossmodal.serving.http import SearchSlots, about_json

    live = as_live(engine)
    slots = slots or SearchSlots(CONCURRENCY)
    first = live.get()
    roots = first.image_roots()
    texts, images = example_queries(first), example_images(first, roots)
    describe = first.describe()
    with gr.Blocks(title=f"crossmodal: {describe['dataset']}", analytics_enabled=False) as demo:
        gr.Markdown(
            f"# crossmodal · {describe['dataset']}\nCross-modal retrieval on {describe['bits']}-bit hash "
            "codes: type keywords to find images, or upload an image to read captions."
        )
        with gr.Accordion("About this run", open=False):
            about = gr.Markdown(about_markdown(first), elem_id="about")
        for tab in TABS:
            with gr.Tab(tab.title, id=tab.api_name):
                view = TabView(live, tab, k, slots)
                view.build(texts if tab.source == "text" else images)
                view.wire()

        def about_run() -> dict:
            """What the run is: dataset, towers, loss, code length, index kind and size."""
            return {**about_json(live.get()), "examples": texts}

        gr.api(about_run, api_name="about")
        demo.load(lambda: about_markdown(live.get()), outputs=about, api_visibility="private", queue=False)
    return demo


def as_live(engine: RetrievalEngine | LiveEngine) -> LiveEngine:
    """``engine`` as a ``LiveEngine`` (one that follows changes of its run)."""
    from crossmodal.serving.live import LiveEngine

    return engine if isinstance(engine, LiveEngine) else LiveEngine(engine)


def serve(engine: RetrievalEngine | LiveEngine, host: str = "127.0.0.1", port: int | None = 7860,
          k: int = DEFAULT_K, prevent_thread_lock: bool = False) -> tuple[gr.Blocks, str]:  # fmt: skip
    """Build, queue and launch the app on ``host:port``, with the HTTP API on the same server; the
    two share one cap of ``CONCURRENCY`` searches at once.

    Returns:
        The running Blocks (``.close()`` stops it) and its local URL.
    """
    import gradio as gr

    from crossmodal.serving.http import SearchSlots, api_routes

    live = as_live(engine)
    slots = SearchSlots(CONCURRENCY)
    demo = build_app(live, k=k, slots=slots)
    demo.queue(default_concurrency_limit=CONCURRENCY, max_size=64)
    theme = gr.themes.Default(font=SYSTEM_FONTS, font_mono=["ui-monospace", "monospace"])
    _, url, _ = demo.launch(
        server_name=host, server_port=port, share=False, prevent_thread_lock=prevent_thread_lock,
        allowed_paths=[str(p) for p in live.get().image_roots()], max_file_size=MAX_FILE_SIZE,
        show_error=False, enable_monitoring=False, mcp_server=False, ssr_mode=False, quiet=True,
        theme=theme, css=CSS, footer_links=["api"], app_kwargs={"routes": api_routes(live.get, slots)},
    )  # fmt: skip
    return demo, url


def add_args(p: argparse.ArgumentParser) -> None:
    """The options of ``crossmodal serve`` (and ``python app.py``)."""
    what = p.add_mutually_exclusive_group()
    what.add_argument("--run", default=None, help="run folder (default: runs/openmoji)")
    what.add_argument(
        "--config",
        help="a recipe: build, train, index and evaluate its run first (each step skipped when done), "
        "then serve it in the same process (what make demo does)",
    )
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="override a recipe setting (with --config)",
    )  # fmt: skip
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    p.add_argument("--port", type=int, default=7860, help="port (default: %(default)s)")
    p.add_argument("--k", type=int, default=DEFAULT_K, help="results per query (default: %(default)s)")


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exit with code 2 and a usage message for options that do not go together."""
    if args.overrides and not args.config:
        p.error("--set changes a recipe: use it with --config")
    if not 1 <= args.k <= MAX_K:
        p.error(f"--k must be between 1 and {MAX_K}, got {args.k}")


def parse_args(argv: list[str] | None, prog: str = "crossmodal serve") -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description="Serve a crossmodal run as a Gradio app.")
    add_args(p)
    args = p.parse_args(argv)
    check_args(p, args)
    return args


def load_engine(run: str) -> RetrievalEngine:
    """Open the run, or exit with code 2 and one line that says what is wrong and what to run."""
    from crossmodal.runs.folder import RunError
    from crossmodal.serving import RetrievalEngine
    from crossmodal.store import StoreError

    try:
        return RetrievalEngine.load(run)
    except (RunError, StoreError, OSError, ValueError) as exc:
        log.debug("loading %s failed", run, exc_info=True)
        sys.stderr.write(f"{PROG}: cannot open run {run}: {open_error(run, str(exc))}\n")
        raise SystemExit(2) from None


def open_error(run: str, message: str) -> str:
    """The reason a run did not open, in words, with one hint: a folder that is no run at all
    gets the way to build one; a damaged run keeps the loader's own advice (what to re-run)."""
    folder = Path(run)
    if not folder.is_dir():
        return f"there is no run folder there. {TRAIN_HINT}"
    if not (folder / "manifest.json").exists():
        return f"the folder is not a trained run (it has no manifest.json). {TRAIN_HINT}"
    return message  # the loaders' messages are in words already (FAISS' own: crossmodal.index)


def prepare(config: str, overrides: list[str]) -> Path:
    """Prepare the recipe's run (``crossmodal.prepare``), or exit with code 2 and why."""
    from crossmodal.config import ConfigError
    from crossmodal.index import IndexFileError
    from crossmodal.jobs.prepare import prepare_run
    from crossmodal.registry import UnknownNameError
    from crossmodal.runs.folder import RunError
    from crossmodal.store import StoreError

    try:
        return prepare_run(config, overrides)
    except (ConfigError, UnknownNameError, RunError, FileNotFoundError, ValueError, IndexFileError,
            StoreError) as exc:  # fmt: skip
        sys.stderr.write(f"{PROG}: cannot prepare {config}: {exc}\n")
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        sys.stderr.write("interrupted; the next run continues from the last finished step or checkpoint\n")
        raise SystemExit(130) from None


def main(argv: list[str] | None = None, prog: str = "crossmodal serve") -> None:
    """Entry point of ``python app.py --run runs/openmoji``."""
    global PROG
    PROG = prog
    run_app(parse_args(argv, prog))


def run_app(args: argparse.Namespace) -> None:
    """Prepare (with ``--config``) or open the run, serve it, and block until Ctrl+C."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)  # the app's own messages; the pipeline logs warnings only
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle torch/FAISS threads sleep (see cli.main)
    started = time.perf_counter()
    run = args.run or "runs/openmoji"
    if args.config:
        run = str(prepare(args.config, args.overrides))
    engine = load_engine(run)
    demo, url = serve(engine, host=args.host, port=args.port, k=args.k, prevent_thread_lock=True)
    print(f"crossmodal app for {run}: {url} (up {time.perf_counter() - started:.1f} s after start; "
          "Ctrl+C stops it)", flush=True)  # fmt: skip
    demo.block_thread()


if __name__ == "__main__":
    main()
