"""Report tables (markdown, JSON) and plots (PR curves, mAP vs bits) for evaluation results.

Inputs are the dicts of ``crossmodal.evaluate``: ``evaluate_directions`` returns
``{direction: {"map": ..., "p@100": ..., "pr_radius": {...}, ...}}``. A grid of runs is a
list of cells ``{"method": str, "bits": int, "metrics": {direction: {...}},
"train_time_s": float, ...}`` (extra keys are kept in ``results.json``).

Plots use matplotlib's object API with the Agg canvas (no pyplot state, no display), and
every file is written atomically.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from crossmodal.evaluate import DIRECTIONS
from crossmodal.io import atomic_path, write_json_atomic, write_text_atomic

logger = logging.getLogger(__name__)

DIRECTION_TITLES = {"i2t": "image -> text", "t2i": "text -> image", "i2i": "image -> image",
                    "t2t": "text -> text"}
METRIC_LABELS = {"map": "mAP", "map_tie": "mAP (tie-aware)"}
MISSING = "-"


# ----------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------
def _cell(value: Any, floatfmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING
    if isinstance(value, (float, np.floating)):
        return format(float(value), floatfmt)
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str | tuple[str, str]],
                   floatfmt: str = ".4f") -> str:
    """A GitHub-flavoured markdown table.

    Args:
        rows: one mapping per row; a missing key shows as ``-``.
        columns: keys, or ``(key, header)`` pairs to print another header.
        floatfmt: format spec for floats.

    Returns:
        The table text, ending with a newline.
    """
    cols = [(c, c) if isinstance(c, str) else (c[0], c[1]) for c in columns]
    if not cols:
        raise ValueError("markdown_table needs at least one column")
    lines = ["| " + " | ".join(_cell(h, floatfmt) for _, h in cols) + " |",
             "|" + "|".join("---" for _ in cols) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(k), floatfmt) for k, _ in cols) + " |")
    return "\n".join(lines) + "\n"


def metric_key(metrics: Mapping[str, Mapping[str, Any]], prefix: str, k: int = 100) -> str | None:
    """The ``{prefix}{k}`` key to report (``p@100``, ``ndcg@100``) when present, else the first
    ``{prefix}...`` key found (without ``_tie``), else None."""
    keys = [key for m in metrics.values() for key in m if key.startswith(prefix) and not key.endswith("_tie")]
    if f"{prefix}{k}" in keys:
        return f"{prefix}{k}"
    return keys[0] if keys else None


def precision_key(metrics: Mapping[str, Mapping[str, Any]], k: int = 100) -> str | None:
    """The precision@k key to report: ``p@{k}`` when present, else the first ``p@...`` found."""
    return metric_key(metrics, "p@", k)


def ndcg_key(metrics: Mapping[str, Mapping[str, Any]], k: int = 100) -> str | None:
    """The NDCG@k key to report: ``ndcg@{k}`` when present, else the first ``ndcg@...`` found."""
    return metric_key(metrics, "ndcg@", k)


def direction_columns(directions: Sequence[str], p_key: str | None, tie: bool = False,
                      ndcg: str | None = None) -> list[tuple[str, str]]:
    """Columns ``("i2t/map", "i2t mAP"), ("i2t/ndcg@100", "i2t NDCG@100"), ("i2t/p@100", "i2t P@100")...``
    for ``flatten_metrics`` rows (the NDCG column only with ``ndcg``, the key to show)."""
    suffix = "_tie" if tie else ""
    cols = []
    for d in directions:
        cols.append((f"{d}/map{suffix}", f"{d} mAP"))
        if ndcg:
            cols.append((f"{d}/{ndcg}{suffix}", f"{d} {ndcg.upper()}"))
        if p_key:
            cols.append((f"{d}/{p_key}{suffix}", f"{d} {p_key.upper()}"))
    return cols


def flatten_metrics(metrics: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """``{direction: {key: value}}`` -> ``{"direction/key": value}`` for the scalar values."""
    return {f"{d}/{k}": v for d, m in metrics.items() for k, v in m.items()
            if isinstance(v, (int, float, np.integer, np.floating))}


def to_jsonable(obj: Any) -> Any:
    """Numpy arrays and scalars (also nested in dicts and lists) as plain JSON types."""
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


# ----------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------
def _new_figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="tight")
    FigureCanvasAgg(fig)
    return fig


def _save_png(fig: Any, path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def plot_pr_curves(curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
                   path: str | os.PathLike[str], title: str = "precision-recall") -> Path:
    """One PR figure: a line per name. ``curves``: ``{name: (precision, recall)}``; PNG at ``path``."""
    if not curves:
        raise ValueError("plot_pr_curves needs at least one curve")
    fig = _new_figure(5.0, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    for name, (precision, recall) in curves.items():
        p, r = np.asarray(precision, dtype=float), np.asarray(recall, dtype=float)
        if p.shape != r.shape:
            raise ValueError(f"curve {name!r}: precision {p.shape} and recall {r.shape} differ in length")
        ax.plot(r, p, marker=".", label=str(name))
    ax.set(xlabel="recall", ylabel="precision", title=title, xlim=(0, 1.02), ylim=(0, 1.02))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    return _save_png(fig, path)


def plot_map_vs_bits(results: Sequence[Mapping[str, Any]], path: str | os.PathLike[str], metric: str = "map",
                     directions: Sequence[str] | None = None) -> Path:
    """mAP (or ``metric``) against code length, a line per method, a panel per direction.

    Args:
        results: grid cells ``{"method", "bits", "metrics": {direction: {...}}}``.
        path: the PNG to write.
        metric: the key plotted (``"map"``, ``"map_tie"``, ``"p@100"``...).
        directions: panels (default: every direction present).
    """
    cells = [c for c in results if "metrics" in c]
    dirs = list(directions or sorted({d for c in cells for d in c["metrics"]}, key=_direction_order))
    if not cells or not dirs:
        raise ValueError("plot_map_vs_bits needs results with metrics")
    fig = _new_figure(4.0 * min(len(dirs), 2), 3.2 * math.ceil(len(dirs) / 2))
    for i, d in enumerate(dirs):
        ax = fig.add_subplot(math.ceil(len(dirs) / 2), min(len(dirs), 2), i + 1)
        for method in dict.fromkeys(c["method"] for c in cells):
            pts = sorted((int(c["bits"]), c["metrics"][d].get(metric)) for c in cells
                         if c["method"] == method and d in c["metrics"])
            pts = [(b, v) for b, v in pts if v is not None]
            if pts:
                ax.plot([b for b, _ in pts], [v for _, v in pts], marker="o", label=method)
        ax.set(xlabel="bits", ylabel=METRIC_LABELS.get(metric, metric), title=DIRECTION_TITLES.get(d, d))
        ax.set_xticks(sorted({int(c["bits"]) for c in cells}))
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    return _save_png(fig, path)


def _direction_order(d: str) -> int:
    return DIRECTIONS.index(d) if d in DIRECTIONS else len(DIRECTIONS)


def _pr_curve(metrics: Mapping[str, Any]) -> tuple[list[float], list[float]] | None:
    pr = metrics.get("pr_radius")
    return None if not pr else (pr["precision"], pr["recall"])


# ----------------------------------------------------------------------------------------
# Reports
# ----------------------------------------------------------------------------------------
DEFINITIONS = (
    "mAP: mAP over the whole database, ties in Hamming distance broken by database order "
    "(DCMH protocol; queries without a relevant item count 0). Tie-aware: the expected value "
    "over all orderings of tied items. NDCG@k: graded by the number of shared labels. "
    "P@k: precision of the top k. PR by Hamming radius: precision and recall of the items within "
    "each radius, averaged over queries (the pooled all-pairs curve of DCMH's reference code is "
    "pr_radius_pooled in metrics.json)."
)
SECTIONS = ("keyword", "codes")  # metrics.json keys beside its {row: {direction: metrics}} rows


def _main_tables(rows: list[dict[str, Any]], lead: list[tuple[str, str]], dirs: Sequence[str],
                 p_key: str | None, extra: tuple[str, str] | list[tuple[str, str]] | None = None,
                 ndcg: str | None = None) -> list[str]:
    """The stable table (plus the ``extra`` column or columns) and the tie-aware table."""
    extras = [extra] if isinstance(extra, tuple) else list(extra or [])
    stable = [*lead, *direction_columns(dirs, p_key, ndcg=ndcg), *extras]
    tie = [*lead, *direction_columns(dirs, p_key, tie=True, ndcg=ndcg)]
    return [markdown_table(rows, stable), "\nTie-aware:\n", markdown_table(rows, tie)]


def _is_direction_dict(metrics: Any) -> bool:
    return (isinstance(metrics, Mapping) and bool(metrics) and all(k in DIRECTIONS for k in metrics)
            and all(isinstance(v, Mapping) for v in metrics.values()))  # fmt: skip


def metric_rows(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The ``{row: {direction: metrics}}`` rows of a ``metrics.json``, without its other sections
    (``keyword``, ``codes``) or anything else that is not a row of directions."""
    return {name: m for name, m in metrics.items() if _is_direction_dict(m)}


def write_run_report(metrics: Mapping[str, Any], out_dir: str | os.PathLike[str], title: str = "Evaluation",
                     name: str = "run", *, keyword: Mapping[str, Any] | None = None,
                     codes: Mapping[str, Any] | None = None,
                     transfers: Mapping[str, Mapping[str, Any]] | None = None, plots: bool = True) -> Path:
    """Write ``metrics.json``, ``report.md`` and ``pr_<direction>.png`` into ``out_dir``.

    Args:
        metrics: an ``evaluate_directions`` result ``{direction: {...}}`` (one row named
            ``name``), or ``{row_name: {direction: {...}}}`` for several rows (methods,
            float upper bound...).
        out_dir: folder to write (created).
        title: heading of ``report.md``.
        name: the row name when ``metrics`` holds one result.
        keyword: keyword precision (``keyword_markdown``), saved as the ``keyword`` section.
        codes: database code statistics (``codes_markdown``), saved as the ``codes`` section.
        transfers: ``{dataset: result}`` of transfer evaluations, shown (``transfer_markdown``)
            but saved by their caller.
        plots: draw the PR figures; False leaves those on disk as they are.

    Returns:
        The path of ``report.md``.
    """
    rows_in = {name: metrics} if _is_direction_dict(metrics) else dict(metrics)
    for label, m in rows_in.items():
        if not _is_direction_dict(m):
            raise ValueError(f"row {label!r} is not a {{direction: metrics}} dict (directions: {DIRECTIONS})")
    sections = {key: value for key, value in (("keyword", keyword), ("codes", codes)) if value is not None}
    if set(sections) & set(rows_in):
        raise ValueError(f"row names {sorted(set(sections) & set(rows_in))} are reserved for report sections")
    out = Path(out_dir)
    write_json_atomic(out / "metrics.json", to_jsonable({**rows_in, **sections} if sections else metrics))
    dirs = sorted({d for m in rows_in.values() for d in m}, key=_direction_order)
    flat = {f"{r}/{d}": m[d] for r, m in rows_in.items() for d in m}
    rows = [{"run": r, **flatten_metrics(m)} for r, m in rows_in.items()]
    text = [f"# {title}\n", DEFINITIONS + "\n",
            *_main_tables(rows, [("run", "run")], dirs, precision_key(flat), ndcg=ndcg_key(flat))]
    if keyword is not None:
        text += keyword_markdown(keyword)
    if codes is not None:
        text += codes_markdown(codes)
    for result in (transfers or {}).values():
        text += transfer_markdown(result)
    for label, m in rows_in.items():
        keys = sorted({k for d in m.values() for k, v in d.items() if isinstance(v, (int, float))})
        per_direction = [{"direction": d, **m[d]} for d in dirs if d in m]
        text += [f"\n## {label}: all metrics\n", markdown_table(per_direction, ["direction", *keys])]
    for d in dirs:
        curves = {r: c for r, m in rows_in.items() if d in m and (c := _pr_curve(m[d])) is not None}
        if curves:
            if plots:
                title_d = f"PR by Hamming radius, {DIRECTION_TITLES[d]}"
                plot_pr_curves(curves, out / f"pr_{d}.png", title=title_d)
            text.append(f"\n![PR {d}](pr_{d}.png)\n")
    write_text_atomic(out / "report.md", "\n".join(text))
    logger.info("wrote report to %s", out / "report.md")
    return out / "report.md"


def _percent(value: Any) -> str | None:
    return None if value is None else f"{100 * float(value):.1f} %"


def keyword_markdown(keyword: Mapping[str, Any], max_words: int = 240) -> list[str]:
    """The keyword section: P@k of typed concept words on the database and query splits, and a
    table per word, worst first (the worst and best ``max_words`` in all when there are more).

    ``keyword``: ``{"k", "n_words", "refused", "database": {...}, "query": {...}, "words": [...]}``
    as ``crossmodal.jobs.eval`` writes it; ``database``/``query`` hold ``keyword_precision``'s
    means, each word ``{"word", "n_relevant_db", "p@k_db", "n_relevant_query", "p@k_query", "top"}``.
    """
    k = int(keyword["k"])
    p = f"p@{k}"
    text = [f"\n## Keyword precision@{k} (text -> image)\n",
            f"Each of the {keyword['n_words']} concept words (label names that are one word) is typed as "
            "a text query and ranks the images by Hamming distance, ties by database order; an image is "
            "relevant when one of its captions holds the word as a whole word. Means over the words with "
            f"at least one relevant image; best possible: the mean of min(relevant, {k}) / {k}. The app's "
            "index may order tied images otherwise; tie-aware: the expectation over all tie orders.\n"]
    splits = [{"split": label, "items": s["n_db"], "words": s["n_words"], p: s[p], "tie": s[f"{p}_tie"],
               "ceiling": s["ceiling"]}
              for key, label in (("database", "database split (what the app searches)"),
                                 ("query", "query split (never trained on)"))
              if (s := keyword.get(key))]  # fmt: skip
    columns = [("split", "images searched"), ("items", "images"), ("words", "words judged"),
               (p, f"P@{k}"), ("tie", f"P@{k} tie-aware"), ("ceiling", "best possible")]
    text.append(markdown_table(splits, columns))
    zero = keyword.get("zero_shot")
    if isinstance(zero, Mapping) and zero.get("database"):
        rows = [{"split": label, p: s[p], "tie": s[f"{p}_tie"], "ceiling": s["ceiling"]}
                for key, label in (("database", "database split"), ("query", "query split"))
                if (s := zero.get(key))]  # fmt: skip
        columns = [("split", "images searched"), (p, f"P@{k}"), ("tie", f"P@{k} tie-aware"),
                   ("ceiling", "best possible")]
        text += ["\nThe same words against the zero-shot ITQ codes (the dual encoder's own embeddings, "
                 "no training; eval row 'zero-shot ITQ'):\n", markdown_table(rows, columns)]
    if keyword.get("refused"):
        refused = ", ".join(keyword["refused"])
        text.append(f"\nWords the text model refuses as queries (not counted): {refused}.\n")
    words = sorted(keyword.get("words", []),
                   key=lambda w: (w.get(f"{p}_db") is None, w.get(f"{p}_db") or 0.0, w["word"]))
    if len(words) > max_words:
        best = max_words // 3
        gap = {"word": f"... {len(words) - max_words} more words (all in metrics.json) ..."}
        words = [*words[: max_words - best], gap, *words[-best:]]
    rows = [{**w, "top": "; ".join(w.get("top", []))} for w in words]
    text += ["\nPer word, worst first:\n", markdown_table(rows, [
        ("word", "word"), ("n_relevant_db", "relevant (database)"), (f"{p}_db", f"P@{k} database"),
        ("n_relevant_query", "relevant (query split)"), (f"{p}_query", f"P@{k} query split"),
        ("top", "top 3 (database), first caption each")], floatfmt=".2f")]
    return text


def codes_markdown(codes: Mapping[str, Any]) -> list[str]:
    """The codes section: distinct codes, largest group and bit entropy per modality, and the
    own-image rank (``code_statistics`` and ``self_rank`` of ``crossmodal.evaluate``)."""
    text = ["\n## Database codes\n",
            f"The {codes.get('bits', '?')}-bit codes of the {codes.get('n_db', '?')} database items. Largest "
            "group: the most items sharing one code. Bit entropy: of the fraction of +1 per bit, in bits "
            "(1.0: each bit is +1 for half the items), the mean over bits and the lowest.\n"]
    stats = [{"codes": m, **codes[m]} for m in ("image", "text") if isinstance(codes.get(m), Mapping)]
    text.append(markdown_table(stats, [
        ("codes", "codes"), ("n_items", "items"), ("n_distinct", "distinct codes"),
        ("largest_group", "largest group"), ("bit_entropy", "mean bit entropy"),
        ("bit_entropy_min", "lowest bit entropy")], floatfmt=".3f"))
    own = codes.get("own_image_rank")
    if isinstance(own, Mapping):
        text.append("\nOwn-image rank: each database image as an image -> image query against the database "
                    "images; where does the image itself come? Stable: ties by database order; tie-aware: "
                    "the expectation over orders of the tied items. Averaged over the database the two "
                    "agree: the t images sharing a code fill ranks 1..t either way.\n")
        rows = [{"ranking": label, "first": _percent(own.get(f"top1{sfx}")),
                 "top10": _percent(own.get(f"top10{sfx}")), "mean": own.get(f"mean_rank{sfx}")}
                for label, sfx in (("stable", ""), ("tie-aware", "_tie"))]  # fmt: skip
        text.append(markdown_table(rows, [("ranking", "ranking"), ("first", "own image first"),
                                          ("top10", "own image in the top 10"), ("mean", "mean rank")],
                                   floatfmt=".1f"))
    return text


def transfer_markdown(result: Mapping[str, Any]) -> list[str]:
    """A transfer section: the run's model on another dataset whose labels match by name, beside
    the run's in-domain figures (``crossmodal.jobs.eval.transfer_run`` writes ``result``)."""
    matched = list(result.get("matched_labels", []))
    shown = ", ".join(matched[:8]) + (f" and {len(matched) - 8} more" if len(matched) > 8 else "")
    text = [f"\n## Transfer to {result['dataset']}\n",
            f"The run's model on {result['dataset']}, split by that dataset's default protocol (seed 0): "
            f"{result['n_query']} queries ({result.get('n_query_unmatched', 0)} without a matched label left "
            f"out), {result['n_db']} database items. Relevant: shares one of the {len(matched)} labels both "
            f"datasets name alike ({shown}). In-domain, matched labels: the run's own query split and "
            "database with that same relevance; the ratio divides the transfer mAP by it.\n"]
    parts = {"in-domain, all labels": result.get("in_domain"),
             "in-domain, matched labels": result.get("in_domain_matched"),
             f"transfer: {result['dataset']}": result.get("transfer")}
    parts = {k: v for k, v in parts.items() if v}
    dirs = sorted({d for m in parts.values() for d in m}, key=_direction_order)
    flat = {f"{r}/{d}": m[d] for r, m in parts.items() for d in m}
    rows = [{"evaluation": r, **flatten_metrics(m)} for r, m in parts.items()]
    ratio = {f"{d}/map": v for d, v in (result.get("ratio") or {}).items()}
    rows.append({"evaluation": "ratio transfer / in-domain (matched)", **ratio})
    columns = [("evaluation", "evaluation"), *direction_columns(dirs, None, ndcg=ndcg_key(flat))]
    text.append(markdown_table(rows, columns))
    return text


def grid_report(results: Sequence[Mapping[str, Any]], out_dir: str | os.PathLike[str],
                title: str = "Method x bits grid") -> Path:
    """One report for a grid of runs: ``results.json``, ``report.md`` and plots.

    Args:
        results: cells ``{"method": str, "bits": int, "metrics": {direction: {...}},
            "train_time_s": float}`` (a failed cell may carry ``"error"`` and no metrics).
        out_dir: folder to write (created).
        title: heading of ``report.md``.

    Returns:
        The path of ``report.md``. Also written: ``map_vs_bits.png``,
        ``map_tie_vs_bits.png`` and ``pr_<direction>_<bits>bits.png`` (a curve per method).
    """
    for i, cell in enumerate(results):
        missing = {"method", "bits"} - set(cell)
        if missing:
            raise ValueError(f"grid cell {i} lacks {sorted(missing)}; cells need method, bits and metrics")
    out = Path(out_dir)
    write_json_atomic(out / "results.json", to_jsonable(list(results)))
    method_order = {m: i for i, m in enumerate(dict.fromkeys(c["method"] for c in results))}
    cells = sorted(results, key=lambda c: (method_order[c["method"]], int(c["bits"])))
    with_metrics = [c for c in cells if c.get("metrics")]
    dirs = sorted({d for c in with_metrics for d in c["metrics"]}, key=_direction_order)
    flat = {f"{i}/{d}": m for i, c in enumerate(with_metrics) for d, m in c["metrics"].items()}
    p_key, n_key = precision_key(flat), ndcg_key(flat)
    rows = [{"method": c["method"], "bits": int(c["bits"]), "train_time_s": _seconds(c.get("train_time_s")),
             "error": c.get("error"), **flatten_metrics(c.get("metrics") or {}),
             **{f"keyword_{s}": v for s, v in (c.get("keyword_p@10") or {}).items()}}
            for c in cells]  # fmt: skip
    lead = [("method", "method"), ("bits", "bits")]
    extra = [("train_time_s", "train s")]
    if any(r.get("keyword_database") is not None for r in rows):
        keyword = [("keyword_database", "keyword P@10"), ("keyword_query", "keyword P@10 (query split)")]
        extra = [*keyword, *extra]
    tables = _main_tables(rows, lead, dirs, p_key, extra, ndcg=n_key)
    text = [f"# {title}\n", DEFINITIONS + "\n", *tables]
    failed = [r for r in rows if r.get("error")]
    if failed:
        text += ["\nFailed cells:\n", markdown_table(failed, ["method", "bits", "error"])]
    if with_metrics:
        for metric in ("map", "map_tie"):
            plot_map_vs_bits(with_metrics, out / f"{metric}_vs_bits.png", metric=metric, directions=dirs)
            text.append(f"\n![{metric} vs bits]({metric}_vs_bits.png)\n")
        text += _grid_pr_plots(with_metrics, dirs, out)
    write_text_atomic(out / "report.md", "\n".join(text))
    logger.info("wrote grid report (%d cells) to %s", len(results), out / "report.md")
    return out / "report.md"


def _seconds(value: Any) -> str | None:
    return None if value is None else f"{float(value):.1f}"


def _grid_pr_plots(cells: Sequence[Mapping[str, Any]], dirs: Sequence[str], out: Path) -> list[str]:
    lines = []
    for bits in sorted({int(c["bits"]) for c in cells}):
        for d in dirs:
            curves = {str(c["method"]): curve for c in cells if int(c["bits"]) == bits and d in c["metrics"]
                      and (curve := _pr_curve(c["metrics"][d])) is not None}
            if curves:
                name = f"pr_{d}_{bits}bits.png"
                title = f"PR by Hamming radius, {DIRECTION_TITLES[d]}, {bits} bits"
                plot_pr_curves(curves, out / name, title=title)
                lines.append(f"\n![PR {d} {bits} bits]({name})\n")
    return lines
