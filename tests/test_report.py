"""Report tables, JSON and PNG plots."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from crossmodal.evaluate import evaluate_directions
from crossmodal.report import (
    grid_report,
    markdown_table,
    plot_map_vs_bits,
    plot_pr_curves,
    write_run_report,
)


def _metrics(seed: int, bits: int = 8) -> dict:
    rng = np.random.default_rng(seed)
    codes = {k: rng.choice([-1, 1], size=(n, bits)).astype(np.int8)
             for k, n in (("query_image", 10), ("query_text", 10), ("db_image", 60), ("db_text", 60))}
    labels_q = (rng.random((10, 4)) < 0.4).astype(np.uint8)
    labels_db = (rng.random((60, 4)) < 0.4).astype(np.uint8)
    return evaluate_directions(codes, query_labels=labels_q, db_labels=labels_db, ks=(10, 100))


def _assert_png(path) -> None:
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100


def test_markdown_table():
    text = markdown_table([{"a": 1, "b": 0.123456}, {"a": "x|y"}], ["a", ("b", "B value")])
    assert text.splitlines() == ["| a | B value |", "|---|---|", "| 1 | 0.1235 |", "| x\\|y | - |"]
    with pytest.raises(ValueError):
        markdown_table([], [])


def test_write_run_report(tmp_path):
    metrics = _metrics(0)
    report = write_run_report(metrics, tmp_path / "eval", title="tiny")
    text = report.read_text()
    assert text.startswith("# tiny")
    header = next(line for line in text.splitlines() if line.startswith("| run"))
    assert header == ("| run | i2t mAP | i2t P@100 | t2i mAP | t2i P@100 | i2i mAP | i2i P@100 "
                      "| t2t mAP | t2t P@100 |")
    assert f"{metrics['i2t']['map']:.4f}" in text and f"{metrics['t2t']['map_tie']:.4f}" in text
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert saved["i2t"]["map"] == pytest.approx(metrics["i2t"]["map"])
    for d in ("i2t", "t2i", "i2i", "t2t"):
        _assert_png(tmp_path / "eval" / f"pr_{d}.png")
    assert not list((tmp_path / "eval").glob(".*.tmp"))  # atomic writes leave no temp file


def test_write_run_report_several_rows(tmp_path):
    report = write_run_report({"hash": _metrics(0), "float": _metrics(1)}, tmp_path)
    rows = [line for line in report.read_text().splitlines() if line.startswith(("| hash", "| float"))]
    assert len(rows) == 4  # stable and tie-aware tables
    with pytest.raises(ValueError, match="direction"):
        write_run_report({"hash": {"bogus": {}}}, tmp_path)


def test_plots_open_as_images(tmp_path):
    path = plot_pr_curves({"a": ([1.0, 0.5, 0.3], [0.1, 0.5, 1.0]), "b": ([0.9, 0.4], [0.2, 1.0])},
                          tmp_path / "pr.png")
    _assert_png(path)
    cells = [{"method": m, "bits": b, "metrics": _metrics(b + len(m), b)}
             for m in ("lsh", "cca_itq") for b in (8, 16)]
    _assert_png(plot_map_vs_bits(cells, tmp_path / "map.png"))
    with pytest.raises(ValueError, match="differ in length"):
        plot_pr_curves({"a": ([1.0], [0.1, 0.2])}, tmp_path / "bad.png")


def test_grid_report(tmp_path):
    cells = [{"method": m, "bits": b, "train_time_s": 0.5 * b, "metrics": _metrics(b, b)}
             for m in ("lsh", "cca_itq") for b in (8, 16)]
    cells.append({"method": "dcmh", "bits": 8, "error": "out of memory"})
    report = grid_report(cells, tmp_path / "grid")
    text = report.read_text()
    header = next(line for line in text.splitlines() if line.startswith("| method"))
    assert header.endswith("| t2t mAP | t2t P@100 | train s |")
    body = [line for line in text.splitlines() if line.startswith("| lsh | 16 |")]
    assert f"{cells[1]['metrics']['i2t']['map']:.4f}" in body[0] and body[0].endswith("| 8.0 |")
    assert "out of memory" in text
    saved = json.loads((tmp_path / "grid" / "results.json").read_text())
    assert len(saved) == 5 and saved[0]["method"] == "lsh"
    lsh_first = [line.split(" | ")[0] for line in text.splitlines() if line.startswith(("| lsh", "| cca"))]
    assert lsh_first[:4] == ["| lsh"] * 2 + ["| cca_itq"] * 2  # methods keep their input order
    for name in ("map_vs_bits.png", "map_tie_vs_bits.png", "pr_i2t_8bits.png", "pr_t2t_16bits.png"):
        _assert_png(tmp_path / "grid" / name)
