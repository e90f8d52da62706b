"""The crossmodal Gradio app: type keywords and see images, upload an image and read captions.

    crossmodal serve --run runs/openmoji [--host 127.0.0.1] [--port 7860] [--k 12]
    crossmodal serve --config configs/openmoji.yaml   # prepare the recipe's run first (make demo)

(``python app.py ...`` at the repository root takes the same arguments.) A thin caller of
the public methods of ``crossmodal.serving.RetrievalEngine``: four tabs (text -> images,
image -> captions, image -> images, text -> texts) and an "About this run" panel. Every
search event has a stable ``api_name`` so ``gradio_client`` can drive the app; each returns
its visual components plus a JSON summary of the hits (``{"error": ...}`` on bad input).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import gradio as gr

    from crossmodal.serving import Hit, RetrievalEngine, SearchResult

log = logging.getLogger("crossmodal.app")

DEFAULT_K = 12
MAX_K = 100
MAX_FILE_SIZE = "10mb"
CONCURRENCY = 2  # the demo machine has two cores; torch holds a lock per engine anyway
PREFERRED_EXAMPLES = ("cat", "red heart", "flag", "smiling face", "dog", "sun", "car", "tree")
N_EXAMPLES = 4
SYSTEM_FONTS = ["ui-sans-serif", "system-ui", "sans-serif"]  # no web fonts: the app must work offline
PROG = "crossmodal serve"  # how error messages name the command
TRAIN_HINT = (
    "Build a run first: crossmodal train --config configs/openmoji.yaml, then "
    "crossmodal index --run {run} (or simply: make demo)."
)


@dataclass(frozen=True)
class Tab:
    """One search direction: its title, endpoint name, input modality and engine method."""

    title: str
    api_name: str
    source: str  # "text" or "image"
    target: str  # what the hits are: "image" items or "text" captions
    method: str  # the RetrievalEngine method to call


TABS = (
    Tab("Text -> Images", "text_to_images", "text", "image", "search_text"),
    Tab("Image -> Captions", "image_to_captions", "image", "text", "search_image"),
    Tab("Image -> Images", "image_to_images", "image", "image", "similar_images"),
    Tab("Text -> Texts", "text_to_texts", "text", "text", "similar_texts"),
)
TABLE_HEADERS = ["rank", "distance", "caption", "item"]


# -- searching -------------------------------------------------------------------------------------
def image_source(value: Any) -> Any:
    """The uploaded image as ``open_image`` takes it: a path from a Gradio file payload, or as is."""
    if isinstance(value, dict):
        return value.get("path")
    return value


def run_search(engine: RetrievalEngine, tab: Tab, query: Any, k: Any) -> SearchResult | str:
    """Call the engine for ``tab``; a message string instead of a result for bad input."""
    from crossmodal.images import ImageDecodeError
    from crossmodal.text import QueryError, is_blank

    if tab.source == "text" and (not isinstance(query, str) or is_blank(query)):
        return "Type one or more keywords first."
    query = query.strip() if tab.source == "text" else image_source(query)
    if query is None:
        return "Upload an image first (or click one of the examples)."
    try:
        return getattr(engine, tab.method)(query, k=min(int(k), MAX_K))
    except (QueryError, ImageDecodeError, ValueError, TypeError) as exc:
        # name an upload by its file name, not by its path in the server's upload cache
        upload = tab.source == "image" and isinstance(query, str)
        return str(exc).replace(query, Path(query).name) if upload else str(exc)
    except Exception:  # the app must stay up and never show a traceback
        log.exception("%s failed", tab.api_name)
        return "The search failed with an internal error; the server log has the details."


def format_distance(d: float) -> str:
    return str(int(d)) if float(d).is_integer() else f"{d:.2f}"


def hit_caption(hit: Hit) -> str:
    """The text shown under a thumbnail: rank, Hamming distance and a caption."""
    text = hit.caption or (hit.captions[0] if hit.captions else hit.key)
    return f"#{hit.rank} · d={format_distance(hit.distance)} · {text}"


def servable(path: str, roots: list[Path]) -> bool:
    """Whether ``path`` is a file inside one of the folders the app may serve."""
    if not path:
        return False
    p = Path(path).resolve()
    return p.is_file() and any(p.is_relative_to(root) for root in roots)


def status_line(tab: Tab, result: SearchResult, ignored: list[str]) -> str:
    what = "images" if tab.target == "image" else "captions"
    parts = " · ".join(f"{name} {ms:.1f}" for name, ms in result.timings_ms.items())
    line = f"**{len(result.hits)} {what}** in **{result.total_ms:.1f} ms** ({parts} ms)"
    if ignored:
        line += f"  \nIgnored, not in the model's vocabulary: {', '.join(ignored)}"
    return line


def details_text(engine: RetrievalEngine, tab: Tab, result: SearchResult) -> str:
    info = engine.describe()
    target = "items" if tab.target == "image" else "texts"
    return (
        f"query code ({info['bits']} bits, hex): `{result.code_hex}`  \n"
        f"index: **{info['index']}** over {info[target]} {target}"
        f"{' (weighted Hamming re-ranking)' if info['weighted'] else ''}"
    )


def result_json(result: SearchResult, describe: dict[str, Any], ignored: list[str]) -> dict[str, Any]:
    """A JSON-friendly summary for API clients (no server file paths)."""
    hits = [{k: v for k, v in asdict(h).items() if k != "image_path"} for h in result.hits]
    return {
        "direction": result.direction, "query": result.query, "hits": hits,
        "code_hex": result.code_hex, "index": describe["index"], "bits": describe["bits"],
        "timings_ms": result.timings_ms, "total_ms": result.total_ms, "ignored_words": ignored,
        "error": None,
    }  # fmt: skip


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


class TabView:
    """The components of one tab and the function that fills them."""

    def __init__(self, engine: RetrievalEngine, tab: Tab, roots: list[Path], k: int) -> None:
        self.engine, self.tab, self.roots, self.k = engine, tab, roots, k

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
        if self.table is not None:
            self.table.render()
        self.gallery.render()
        with gr.Accordion("Query code and index", open=False):
            self.details.render()
        self.json.render()

    def _inputs(self, examples: list[Any]) -> None:
        import gradio as gr

        name = self.tab.api_name
        with gr.Row():
            if self.tab.source == "text":
                hint = "e.g. " + ", ".join(examples[:2]) if examples else "keywords"
                self.query = gr.Textbox(label="Keywords", placeholder=hint, scale=4, elem_id=f"{name}_query")
            else:
                self.query = gr.Image(label="Query image", type="filepath", sources=["upload", "clipboard"],
                                      height=220, scale=2, elem_id=f"{name}_query")  # fmt: skip
            with gr.Column(scale=1):
                self.slider = gr.Slider(1, MAX_K, value=self.k, step=1, label="k (results)")
                self.button = gr.Button("Search", variant="primary", elem_id=f"{name}_button")

    def _outputs(self) -> None:
        """The result components, made unrendered so that the examples can sit above them."""
        import gradio as gr

        name, hidden = self.tab.api_name, {"render": False}
        self.status = gr.Markdown(elem_id=f"{name}_status", **hidden)
        self.table = None
        if self.tab.target == "text":
            self.table = gr.Dataframe(headers=TABLE_HEADERS, label="Matching captions", interactive=False,
                                      wrap=True, elem_id=f"{name}_table", **hidden)  # fmt: skip
        label = "Images" if self.tab.target == "image" else "The item each caption belongs to"
        self.gallery = gr.Gallery(label=label, columns=6, height="auto", object_fit="contain",
                                  elem_id=f"{name}_gallery", **hidden)  # fmt: skip
        self.details = gr.Markdown(**hidden)
        self.json = gr.JSON(label="Result (JSON)", visible=False, **hidden)

    def outputs(self) -> list[gr.components.Component]:
        table = [self.table] if self.table is not None else []
        return [self.gallery, *table, self.status, self.details, self.json]

    def search(self, query: Any, k: Any) -> tuple[Any, ...]:
        """The event handler: engine call, then one value per output component."""
        result = run_search(self.engine, self.tab, query, k)
        if isinstance(result, str):
            return self._message(result)
        gallery = [(h.image_path, hit_caption(h)) for h in result.hits if servable(h.image_path, self.roots)]
        rows = [[h.rank, format_distance(h.distance), h.caption, h.key] for h in result.hits]
        table = [rows] if self.table is not None else []
        ignored = self.engine.ignored_words(query) if self.tab.source == "text" else []
        return (gallery, *table, status_line(self.tab, result, ignored),
                details_text(self.engine, self.tab, result),
                result_json(result, self.engine.describe(), ignored))  # fmt: skip

    def _message(self, message: str) -> tuple[Any, ...]:
        import gradio as gr

        gr.Warning(message)
        table = [[]] if self.table is not None else []
        return ([], *table, f"⚠️ {message}", "", {"error": message, "hits": []})

    def wire(self) -> None:
        """Search on the button and on Enter / upload, under one stable ``api_name``."""
        import gradio as gr

        triggers = [self.button.click]
        triggers.append(self.query.submit if self.tab.source == "text" else self.query.upload)
        # preprocess=False: the engine decodes uploads itself (safely), so an unreadable
        # file becomes a message instead of a Gradio preprocessing error
        gr.on(triggers, self.search, inputs=[self.query, self.slider], outputs=self.outputs(),
              api_name=self.tab.api_name, preprocess=False)  # fmt: skip


def build_app(engine: RetrievalEngine, k: int = DEFAULT_K) -> gr.Blocks:
    """The Gradio Blocks for ``engine``: four search tabs and an "About this run" panel."""
    import gradio as gr

    roots = engine.image_roots()
    texts, images = example_queries(engine), example_images(engine, roots)
    describe = engine.describe()
    with gr.Blocks(title=f"crossmodal: {describe['dataset']}", analytics_enabled=False) as demo:
        gr.Markdown(
            f"# crossmodal · {describe['dataset']}\nCross-modal retrieval on {describe['bits']}-bit hash "
            "codes: type keywords to find images, or upload an image to read captions."
        )
        with gr.Accordion("About this run", open=False):
            gr.Markdown(about_markdown(engine), elem_id="about")
        for tab in TABS:
            with gr.Tab(tab.title, id=tab.api_name):
                view = TabView(engine, tab, roots, k)
                view.build(texts if tab.source == "text" else images)
                view.wire()

        def about() -> dict:
            """What the run is: dataset, towers, loss, code length, index kind and size."""
            return {**describe, "run": Path(describe["run"]).name, "examples": texts}

        gr.api(about, api_name="about")
    return demo


def serve(engine: RetrievalEngine, host: str = "127.0.0.1", port: int | None = 7860, k: int = DEFAULT_K,
          prevent_thread_lock: bool = False) -> tuple[gr.Blocks, str]:  # fmt: skip
    """Build, queue and launch the app on ``host:port``, serving only the run's files.

    Returns:
        The running Blocks (``.close()`` stops it) and its local URL.
    """
    import gradio as gr

    demo = build_app(engine, k=k)
    demo.queue(default_concurrency_limit=CONCURRENCY, max_size=64)
    theme = gr.themes.Default(font=SYSTEM_FONTS, font_mono=["ui-monospace", "monospace"])
    _, url, _ = demo.launch(
        server_name=host, server_port=port, share=False, prevent_thread_lock=prevent_thread_lock,
        allowed_paths=[str(p) for p in engine.image_roots()], max_file_size=MAX_FILE_SIZE,
        show_error=False, enable_monitoring=False, mcp_server=False, ssr_mode=False, quiet=True,
        theme=theme, footer_links=["api"],
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
    """Open the run, or exit with code 2 and a message that says what to run."""
    from crossmodal.runs.folder import RunError
    from crossmodal.serving import RetrievalEngine
    from crossmodal.store import StoreError

    try:
        return RetrievalEngine.load(run)
    except (RunError, StoreError, OSError, ValueError) as exc:
        log.debug("loading %s failed", run, exc_info=True)
        # the error says what to run; a folder that is no run at all gets the way to make one
        is_run = Path(run).is_dir() and (Path(run) / "manifest.json").exists()
        hint = "" if is_run else TRAIN_HINT.format(run=run)
        sys.stderr.write(f"{PROG}: cannot open run {run}: {exc}\n" + (f"{hint}\n" if hint else ""))
        raise SystemExit(2) from None


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
