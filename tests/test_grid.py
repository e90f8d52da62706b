from __future__ import annotations

import json

import pytest
import yaml
from PIL import Image
from tinyrun import tiny_config

from crossmodal.cli import main


def write_recipe(workdir, path):
    cfg = tiny_config(workdir, "train.epochs=3").to_dict()
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow
def test_grid_trains_evaluates_resumes_and_survives_a_failing_cell(workdir, tmp_path, capsys):
    recipe = write_recipe(workdir, tmp_path / "tiny.yaml")
    out = tmp_path / "grid"
    argv = [
        "eval-grid",
        "--config",
        str(recipe),
        "--losses",
        "dcmh,dpsh",
        "--bits",
        "8,12,16",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| dcmh" in printed and "| dpsh" in printed
    results = json.loads((out / "results.json").read_text())
    assert len(results) == 6
    failed = [c for c in results if "error" in c]
    assert {(c["method"], c["bits"]) for c in failed} == {("dcmh", 12), ("dpsh", 12)}
    assert all("multiple of 8" in c["error"] for c in failed)
    ok = [c for c in results if "error" not in c]
    assert all(set(c["metrics"]) == {"i2t", "t2i", "i2i", "t2t"} for c in ok)
    assert all(c["train_time_s"] > 0 for c in ok)
    for png in ("map_vs_bits.png", "pr_i2t_16bits.png"):
        with Image.open(out / png) as img:
            assert img.size[0] > 100
    # re-running skips finished cells: their records are unchanged
    before = json.loads((out / "cells.json").read_text())
    assert main(argv) == 0
    after = json.loads((out / "cells.json").read_text())
    for key, cell in before.items():
        if "error" not in cell:
            assert after[key] == cell


def test_grid_refuses_unknown_losses_and_bad_bits(capsys):
    assert main(["eval-grid", "--losses", "dcmh,nope"]) == 2
    assert "unknown loss(es) nope" in capsys.readouterr().err
    assert main(["eval-grid", "--bits", "16,x"]) == 2
    assert "--bits" in capsys.readouterr().err
