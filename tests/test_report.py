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
    metric_rows,
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
    assert header == ("| run | i2t mAP | i2t NDCG@100 | i2t P@100 | t2i mAP | t2i NDCG@100 | t2i P@100 "
                      "| i2i mAP | i2i NDCG@100 | i2i P@100 | t2t mAP | t2t NDCG@100 | t2t P@100 |")
    hash_row = next(line for line in text.splitlines() if line.startswith("| run |"))
    assert hash_row  # the NDCG cell sits next to mAP
    first = text.splitlines()[text.splitlines().index(header) + 2]
    assert first.split(" | ")[1:3] == [f"{metrics['i2t']['map']:.4f}", f"{metrics['i2t']['ndcg@100']:.4f}"]
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
    assert header.endswith("| t2t mAP | t2t NDCG@100 | t2t P@100 | train s |")
    body = [line for line in text.splitlines() if line.startswith("| lsh | 16 |")]
    assert f"{cells[1]['metrics']['i2t']['map']:.4f}" in body[0] and body[0].endswith("| 8.0 |")
    assert "out of memory" in text
    saved = json.loads((tmp_path / "grid" / "results.json").read_text())
    assert len(saved) == 5 and saved[0]["method"] == "lsh"
    lsh_first = [line.split(" | ")[0] for line in text.splitlines() if line.startswith(("| lsh", "| cca"))]
    assert lsh_first[:4] == ["| lsh"] * 2 + ["| cca_itq"] * 2  # methods keep their input order
    for name in ("map_vs_bits.png", "map_tie_vs_bits.png", "pr_i2t_8bits.png", "pr_t2t_16bits.png"):
        _assert_png(tmp_path / "grid" / name)


KEYWORD = {
    "k": 10, "direction": "t2i", "n_words": 3, "refused": ["zebra"],
    "database": {"p@10": 0.2, "p@10_tie": 0.15, "ceiling": 0.9, "n_words": 3, "n_words_no_relevant": 0,
                 "n_db": 60},
    "query": {"p@10": 0.1, "p@10_tie": 0.1, "ceiling": 0.3, "n_words": 2, "n_words_no_relevant": 1,
              "n_db": 10},
    "words": [
        {"word": "cat", "n_relevant_db": 12, "p@10_db": 0.5, "n_relevant_query": 2, "p@10_query": 0.1,
         "top": ["cat face", "tiger", "camel"]},
        {"word": "dog", "n_relevant_db": 4, "p@10_db": 0.0, "n_relevant_query": 0, "p@10_query": None,
         "top": ["bison", "a | pipe", "ox"]},
        {"word": "red", "n_relevant_db": 9, "p@10_db": 0.1, "n_relevant_query": 1, "p@10_query": 0.2,
         "top": ["red heart", "apple", "tomato"]},
    ],
}  # fmt: skip
CODES = {
    "n_db": 60, "bits": 8,
    "image": {"n_items": 60, "bits": 8, "n_distinct": 21, "largest_group": 9, "bit_entropy": 0.93,
              "bit_entropy_min": 0.5},
    "text": {"n_items": 60, "bits": 8, "n_distinct": 30, "largest_group": 5, "bit_entropy": 0.97,
             "bit_entropy_min": 0.8},
    "own_image_rank": {"n_items": 60, "top1": 0.35, "top1_tie": 0.35, "top10": 0.8, "top10_tie": 0.8,
                       "mean_rank": 3.2, "mean_rank_tie": 3.2, "median_rank": 2.0},
}  # fmt: skip


def test_run_report_sections_are_saved_and_shown(tmp_path):
    rows = {"hash": _metrics(0), "float (cosine)": _metrics(1)}
    transfer = {"dataset": "emojione", "matched_labels": ["subgroup:cat-face", "subgroup:heart"],
                "n_query": 8, "n_query_unmatched": 2, "n_db": 30, "in_domain": rows["hash"],
                "in_domain_matched": _metrics(2), "transfer": _metrics(3),
                "ratio": {"i2t": 0.5, "t2i": 0.25, "i2i": 1.0, "t2t": None}}  # fmt: skip
    report = write_run_report(rows, tmp_path, title="t", keyword=KEYWORD, codes=CODES,
                              transfers={"emojione": transfer})
    text = report.read_text()
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert set(saved) == {"hash", "float (cosine)", "keyword", "codes"}
    assert metric_rows(saved) == json.loads(json.dumps(rows))  # sections are not rows
    # keyword: both means, the words worst first, a pipe in a caption escaped
    assert "| database split (what the app searches) | 60 | 3 | 0.2000 | 0.1500 | 0.9000 |" in text
    words = [line.split(" | ")[0] for line in text.splitlines()
             if line.startswith(("| cat", "| dog", "| red"))]  # fmt: skip
    assert words == ["| dog", "| red", "| cat"]
    assert "| dog | 4 | 0.00 | 0 | - | bison; a \\| pipe; ox |" in text and "zebra" in text
    # codes: distinct codes and own-image rank
    assert "| image | 60 | 21 | 9 | 0.930 | 0.500 |" in text
    assert "| stable | 35.0 % | 80.0 % | 3.2 |" in text
    # transfer: its three rows and the ratio row
    section = text.split("## Transfer to emojione")[1].split("\n## ")[0]
    assert "2 labels both datasets name alike (subgroup:cat-face, subgroup:heart)" in section
    ratio = next(line for line in section.splitlines() if line.startswith("| ratio"))
    assert ratio.startswith("| ratio transfer / in-domain (matched) | 0.5000 | - | 0.2500 |")
    assert f"| transfer: emojione | {transfer['transfer']['i2t']['map']:.4f} |" in section
    with pytest.raises(ValueError, match="reserved"):
        write_run_report({"keyword": _metrics(0)}, tmp_path, keyword=KEYWORD)


def test_long_keyword_tables_keep_the_worst_and_best_words(tmp_path):
    words = [{"word": f"w{i:03d}", "n_relevant_db": 5, "p@10_db": i / 400, "n_relevant_query": 0,
              "p@10_query": None, "top": []} for i in range(400)]  # fmt: skip
    report = write_run_report(_metrics(0), tmp_path, keyword={**KEYWORD, "words": words})
    shown = [line for line in report.read_text().splitlines() if line[:4] in {"| w0", "| w1", "| w2", "| w3"}]
    assert len(shown) == 240 and shown[0].startswith("| w000 ") and shown[-1].startswith("| w399 ")
    assert "160 more words (all in metrics.json)" in report.read_text()


def test_metric_rows_skips_sections():
    rows = {"hash": {"i2t": {"map": 0.5}}, "keyword": {"k": 10, "database": {"p@10": 0.1}},
            "codes": {"image": {"n_distinct": 3}, "text": {"n_distinct": 4}}, "bogus": {"i2t": 0.5}}
    assert metric_rows(rows) == {"hash": {"i2t": {"map": 0.5}}}
