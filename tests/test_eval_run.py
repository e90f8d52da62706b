from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image, ImageDraw

from crossmodal.cli import main


def test_eval_writes_report_and_beats_baselines_of_chance(tiny_run_copy, capsys):
    run = tiny_run_copy  # eval writes into the run folder: a private copy, not the shared tiny_run
    assert main(["eval", "--run", str(run)]) == 0
    out = capsys.readouterr().out
    assert "hash" in out and "float (cosine)" in out and "CCA-ITQ" not in out  # text tower is not frozen
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert set(metrics) == {"hash", "float (cosine)", "keyword", "codes"}
    assert set(metrics["hash"]) == {"i2t", "t2i", "i2i", "t2t"}
    for direction, m in metrics["hash"].items():
        assert 0.0 <= m["map"] <= 1.0
        assert m["map"] > 0.5, (direction, m["map"])  # random ranking gives about 0.42 here
        assert "map_tie" in m and "p@100" in m and "ndcg@100" in m
    report = (run / "eval" / "report.md").read_text()
    assert "| hash" in report and "i2t NDCG@100" in report
    with Image.open(run / "eval" / "pr_i2t.png") as img:
        assert img.size[0] > 100
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["eval"]["map"]["hash"]["i2t"] == round(metrics["hash"]["i2t"]["map"], 4)
    # --if-missing reuses the saved metrics
    assert main(["eval", "--run", str(run), "--if-missing"]) == 0
    again = capsys.readouterr().out
    assert "hash" in again and "keyword P@10" in again and "keyword" not in again.splitlines()[1]


def test_eval_measures_keywords_and_codes(tiny_run_copy, capsys):
    from crossmodal.serving import RetrievalEngine

    run = tiny_run_copy
    assert main(["eval", "--run", str(run), "--no-baselines"]) == 0
    out = capsys.readouterr().out
    assert "keyword P@10 (typed concept words -> images): database" in out and "own image first" in out
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    kw = metrics["keyword"]
    # the concept words are the 7 label names (colours and shapes); every one is in the BoW vocabulary
    assert sorted(w["word"] for w in kw["words"]) == sorted(
        ["red", "green", "blue", "yellow", "square", "circle", "star"])  # fmt: skip
    assert kw["refused"] == [] and kw["k"] == 10
    assert kw["database"]["n_db"] == 80 and kw["query"]["n_db"] == 16
    by_word = {w["word"]: w for w in kw["words"]}
    # captions are "a <colour> <shape>" and "<colour>": a quarter of the images per colour
    assert by_word["red"]["n_relevant_db"] + by_word["red"]["n_relevant_query"] == 24
    colours = [by_word[c]["p@10_db"] for c in ("red", "green", "blue", "yellow")]
    assert np.mean(colours) > 0.8, colours  # the pictures show their colour: typed colours find them
    assert 0.0 <= kw["database"]["p@10"] <= 1.0 and kw["query"]["ceiling"] < 1.0  # < 10 relevant each
    assert all(len(w["top"]) == 3 for w in kw["words"])
    codes = metrics["codes"]
    assert codes["n_db"] == 80 and codes["bits"] == 16
    for side in ("image", "text"):
        stats = codes[side]
        assert 1 <= stats["n_distinct"] <= 80 and stats["largest_group"] >= 80 / stats["n_distinct"]
        assert 0.0 <= stats["bit_entropy"] <= 1.0
    own = codes["own_image_rank"]
    assert 0.0 < own["top1"] <= own["top10"] <= 1.0 and own["mean_rank"] >= 1.0
    assert json.loads((run / "manifest.json").read_text())["eval"]["keyword_p@10"]["database"] == round(
        kw["database"]["p@10"], 4)  # fmt: skip
    report = (run / "eval" / "report.md").read_text()
    assert "## Keyword precision@10" in report and "## Database codes" in report and "| red |" in report
    engine = RetrievalEngine.load(run)  # the app's reader sees the rows, not the new sections
    try:
        assert set(engine.metrics() or {}) == {"hash", "float (cosine)"}
    finally:
        engine.close()


def _picture(rgb: tuple[int, int, int], size: int = 32) -> bytes:
    """A coloured disk on white: drawn unlike tiny_colours' solid noisy squares."""
    img = Image.new("RGB", (size, size), "white")
    ImageDraw.Draw(img).ellipse((4, 4, size - 4, size - 4), fill=rgb)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _image_folder(root, labels_of) -> str:
    """An image folder of 30 disks, 10 per colour, labelled by ``labels_of(colour)``."""
    colours = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220)}
    root.mkdir()
    lines = []
    for i in range(30):
        colour = list(colours)[i % 3]
        (root / f"{i:02d}.png").write_bytes(_picture(colours[colour]))
        lines.append(json.dumps({"file_name": f"{i:02d}.png", "text": f"a {colour} disk",
                                 "labels": labels_of(colour)}))  # fmt: skip
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return str(root)


def test_transfer_to_a_dataset_with_labels_of_the_same_names(tiny_run_copy, tmp_path, capsys):
    run = tiny_run_copy
    folder = _image_folder(tmp_path / "disks", lambda colour: [colour, "disk"])
    argv = ["eval", "--run", str(run), "--on", "imagefolder", "--root", folder, "-o", "check_images=full"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "transfer to imagefolder-disks: 3 labels matched by name" in out and "ratio (matched)" in out
    result = json.loads((run / "eval" / "transfer-imagefolder-disks.json").read_text())
    assert result["matched_labels"] == ["red", "green", "blue"]  # "disk" is not a label of the run
    assert result["n_query"] + result["n_query_unmatched"] == 6 and result["n_db"] == 24
    assert set(result["transfer"]) == {"i2t", "t2i", "i2i", "t2t"}
    for d in ("i2t", "t2i"):
        expected = result["transfer"][d]["map"] / result["in_domain_matched"][d]["map"]
        assert result["ratio"][d] == pytest.approx(expected) and result["ratio"][d] > 0
    assert result["in_domain"]["i2t"]["map"] == json.loads((run / "eval" / "metrics.json").read_text())[
        "hash"]["i2t"]["map"]  # fmt: skip
    manifest = json.loads((run / "manifest.json").read_text())
    assert "eval/transfer-imagefolder-disks.json" in manifest["files"] and "eval" in manifest
    report = (run / "eval" / "report.md").read_text()
    assert "## Transfer to imagefolder-disks" in report
    assert "| ratio transfer / in-domain (matched) |" in report
    runs = [line.split(" | ")[0] for line in report.splitlines() if line.startswith(("| hash", "| float"))]
    assert runs[:2] == ["| hash", "| float (cosine)"]  # rows keep their order when the report is rewritten
    # evaluating again keeps the transfer section in the report
    assert main(["eval", "--run", str(run), "--no-baselines"]) == 0
    assert "## Transfer to imagefolder-disks" in (run / "eval" / "report.md").read_text()


def test_transfer_without_a_shared_label_name_is_a_clear_error(tiny_run_copy, tmp_path, capsys):
    folder = _image_folder(tmp_path / "greek", lambda colour: ["alpha", "beta"])
    code = main(["eval", "--run", str(tiny_run_copy), "--on", "imagefolder", "--root", folder])
    assert code == 2
    err = capsys.readouterr().err
    assert "no label of imagefolder" in err and "named like a label" in err and "red" in err
    assert not list((tiny_run_copy / "eval").glob("transfer-*.json"))
    assert main(["eval", "--run", str(tiny_run_copy), "--root", folder]) == 2  # --root without --on


def test_keyword_eval_leaves_out_words_the_text_tower_refuses(tiny_run):
    from types import SimpleNamespace

    from crossmodal.jobs.eval import keyword_eval
    from crossmodal.runs.model import load_model

    captions = [["a red square"], ["a blue star"], ["red"], ["a zebra"]]

    class Stub:  # the two things keyword_eval reads of a dataset
        info = SimpleNamespace(label_names=["word:red", "word:zebra", "subgroup:face-smiling"])

        def captions_of(self, indices=None):
            return captions if indices is None else [captions[int(i)] for i in indices]

    model = load_model(tiny_run)  # the BoW vocabulary of tiny_colours has no "zebra"
    codes = np.random.default_rng(0).choice([-1, 1], (4, model.bits)).astype(np.int8)
    out = keyword_eval(model, Stub(), {"database": (np.arange(4), codes)})
    assert out["refused"] == ["zebra"] and out["n_words"] == 1 and "query" not in out
    (red,) = out["words"]
    assert red["word"] == "red" and red["n_relevant_db"] == 2 and len(red["top"]) == 3
    assert out["database"]["n_words"] == 1 and out["database"]["ceiling"] == pytest.approx(2 / 4)
    Stub.info = SimpleNamespace(label_names=["subgroup:face-smiling"])
    assert keyword_eval(model, Stub(), {"database": (np.arange(4), codes)}) is None  # no concept word
