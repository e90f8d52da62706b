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


def precision_key(metrics: Mapping[str, Mapping[str, Any]], k: int = 100) -> str | None:
    """The precision@k key to report: ``p@{k}`` when present, else the first ``p@...`` found."""
    keys = [key for m in metrics.values() for key in m if key.startswith("p@") and not key.endswith("_tie")]
    if f"p@{k}" in keys:
        return f"p@{k}"
    return keys[0] if keys else None


def direction_columns(directions: Sequence[str], p_key: str | None,
                      tie: bool = False) -> list[tuple[str, str]]:
    """Columns ``("i2t/map", "i2t mAP"), ("i2t/p@100", "i2t P@100"), ...`` for ``flatten_metrics`` rows."""
    suffix = "_tie" if tie else ""
    cols = []
    for d in directions:
        cols.append((f"{d}/map{suffix}", f"{d} mAP"))
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
    "over all orderings of tied items. P@k: precision of the top k."
)


def _main_tables(rows: list[dict[str, Any]], lead: list[tuple[str, str]], dirs: Sequence[str],
                 p_key: str | None, extra: tuple[str, str] | None = None) -> list[str]:
    """The stable table (plus ``extra`` column) and the tie-aware table."""
    stable = [*lead, *direction_columns(dirs, p_key), *([extra] if extra else [])]
    tie = [*lead, *direction_columns(dirs, p_key, tie=True)]
    return [markdown_table(rows, stable), "\nTie-aware:\n", markdown_table(rows, tie)]


def _is_direction_dict(metrics: Mapping[str, Any]) -> bool:
    return bool(metrics) and all(k in DIRECTIONS for k in metrics)


def write_run_report(metrics: Mapping[str, Any], out_dir: str | os.PathLike[str], title: str = "Evaluation",
                     name: str = "run") -> Path:
    """Write ``metrics.json``, ``report.md`` and ``pr_<direction>.png`` into ``out_dir``.

    Args:
        metrics: an ``evaluate_directions`` result ``{direction: {...}}`` (one row named
            ``name``), or ``{row_name: {direction: {...}}}`` for several rows (methods,
            float upper bound...).
        out_dir: folder to write (created).
        title: heading of ``report.md``.
        name: the row name when ``metrics`` holds one result.

    Returns:
        The path of ``report.md``.
    """
    rows_in = {name: metrics} if _is_direction_dict(metrics) else dict(metrics)
    for label, m in rows_in.items():
        if not isinstance(m, Mapping) or not _is_direction_dict(m):
            raise ValueError(f"row {label!r} is not a {{direction: metrics}} dict (directions: {DIRECTIONS})")
    out = Path(out_dir)
    write_json_atomic(out / "metrics.json", to_jsonable(metrics))
    dirs = sorted({d for m in rows_in.values() for d in m}, key=_direction_order)
    p_key = precision_key({f"{r}/{d}": m[d] for r, m in rows_in.items() for d in m})
    rows = [{"run": r, **flatten_metrics(m)} for r, m in rows_in.items()]
    text = [f"# {title}\n", DEFINITIONS + "\n", *_main_tables(rows, [("run", "run")], dirs, p_key)]
    for label, m in rows_in.items():
        keys = sorted({k for d in m.values() for k, v in d.items() if isinstance(v, (int, float))})
        per_direction = [{"direction": d, **m[d]} for d in dirs if d in m]
        text += [f"\n## {label}: all metrics\n", markdown_table(per_direction, ["direction", *keys])]
    for d in dirs:
        curves = {r: c for r, m in rows_in.items() if d in m and (c := _pr_curve(m[d])) is not None}
        if curves:
            plot_pr_curves(curves, out / f"pr_{d}.png", title=f"PR by Hamming radius, {DIRECTION_TITLES[d]}")
            text.append(f"\n![PR {d}](pr_{d}.png)\n")
    write_text_atomic(out / "report.md", "\n".join(text))
    logger.info("wrote report to %s", out / "report.md")
    return out / "report.md"


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
    p_key = precision_key({f"{i}/{d}": m for i, c in enumerate(with_metrics)
                           for d, m in c["metrics"].items()})
    rows = [{"method": c["method"], "bits": int(c["bits"]), "train_time_s": _seconds(c.get("train_time_s")),
             "error": c.get("error"), **flatten_metrics(c.get("metrics") or {})} for c in cells]
    lead = [("method", "method"), ("bits", "bits")]
    tables = _main_tables(rows, lead, dirs, p_key, ("train_time_s", "train s"))
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
