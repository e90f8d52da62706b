from __future__ import annotations

import json

from PIL import Image

from crossmodal.cli import main


def test_eval_writes_report_and_beats_baselines_of_chance(tiny_run_copy, capsys):
    run = tiny_run_copy  # eval writes into the run folder: a private copy, not the shared tiny_run
    assert main(["eval", "--run", str(run)]) == 0
    out = capsys.readouterr().out
    assert "hash" in out and "float (cosine)" in out and "CCA-ITQ" not in out  # text tower is not frozen
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert set(metrics) == {"hash", "float (cosine)"}
    assert set(metrics["hash"]) == {"i2t", "t2i", "i2i", "t2t"}
    for direction, m in metrics["hash"].items():
        assert 0.0 <= m["map"] <= 1.0
        assert m["map"] > 0.5, (direction, m["map"])  # random ranking gives about 0.42 here
        assert "map_tie" in m and "p@100" in m
    report = (run / "eval" / "report.md").read_text()
    assert "| hash" in report
    with Image.open(run / "eval" / "pr_i2t.png") as img:
        assert img.size[0] > 100
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["eval"]["map"]["hash"]["i2t"] == round(metrics["hash"]["i2t"]["map"], 4)
    # --if-missing reuses the saved metrics
    assert main(["eval", "--run", str(run), "--if-missing"]) == 0
    assert "hash" in capsys.readouterr().out
