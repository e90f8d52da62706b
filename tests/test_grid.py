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
    assert "| DCMH" in printed and "| DPSH" in printed
    results = json.loads((out / "results.json").read_text())
    assert len(results) == 6
    failed = [c for c in results if "error" in c]
    assert {(c["method"], c["bits"]) for c in failed} == {("DCMH", 12), ("DPSH", 12)}
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


def test_compare_lists_a_weighted_pairs_row_beside_each_pairwise_likelihood_method():
    from crossmodal.jobs.grid import compare_methods, method_label, split_method

    assert compare_methods(["dcmh", "dsh", "dpsh", "lsh", "dhn"]) == [
        "dcmh", "dcmh+wp", "dsh", "dpsh", "dpsh+wp", "lsh", "dhn", "dhn+wp"]  # fmt: skip
    assert method_label("dpsh+wp") == "DPSH + weighted pairs"
    assert method_label("lsh") == "CCA-LSH"  # it cuts a CCA space, not the raw features
    with pytest.raises(ValueError, match="dsh has no pair weighting"):
        split_method("dsh+wp")


def test_a_cell_keeps_the_users_loss_params_wherever_the_method_takes_them(workdir, tmp_path):
    """The recipe's tuned parameters belong to its own loss; what a user sets with
    --set loss.params... reaches every method that takes that parameter."""
    from crossmodal.jobs.grid import cell_config

    recipe = tmp_path / "r.yaml"
    tuned = "loss.params={gamma: 100.0, eta: 0.01, pos_weight: balanced}"
    cfg = tiny_config(workdir, "loss.name=dcmh", tuned)
    recipe.write_text(yaml.safe_dump(cfg.to_dict()))
    user = ["loss.params.eta=0.5", "loss.params.alpha=0.2", "train.epochs=2"]

    def params(method, paper_pairs=True):
        return cell_config(str(recipe), method, 16, tmp_path, user, paper_pairs).loss.params

    assert params("dcmh") == {"gamma": 100.0, "eta": 0.5, "pos_weight": 1.0}  # the paper's pairs
    assert params("dcmh", paper_pairs=False)["pos_weight"] == "balanced"  # eval-grid: the recipe as is
    assert params("dcmh+wp") == {"gamma": 100.0, "eta": 0.5, "pos_weight": "balanced"}
    assert params("dpsh") == {"eta": 0.5, "pos_weight": 1.0}  # not DCMH's gamma
    assert params("dsh") == {"alpha": 0.2}  # dsh takes alpha, not eta
    assert cell_config(str(recipe), "dnnh", 16, tmp_path, user).model.head == "mlp_dne"
    assert cell_config(str(recipe), "dsh", 16, tmp_path, user).train.epochs == 2


@pytest.mark.slow
def test_the_validation_search_keeps_the_best_trial_and_reports_seeds(workdir, tmp_path, monkeypatch):
    from crossmodal.jobs import grid

    recipe = write_recipe(workdir, tmp_path / "tiny.yaml")
    monkeypatch.setattr(grid, "SEARCH_SPACES", {"dpsh": [{"eta": 0.1}, {"eta": 10.0}]})
    out = tmp_path / "search"
    report = grid.run_search(str(recipe), ["dpsh"], 16, out, ["train.epochs=2"], seeds=(0, 1))
    row = json.loads((out / "search_results.json").read_text())[0]
    vals = [t["val_map"] for t in row["trials"]]
    assert row["chosen"] == [{"eta": 0.1}, {"eta": 10.0}][vals.index(max(vals))]
    done = json.loads((out / "search.json").read_text())
    seeds = [c for k, c in done.items() if "|seed" in k]
    assert sorted(c["seed"] for c in seeds) == [0, 1] and all(c["loss_params"]["eta"] == row["chosen"]["eta"]
                                                              for c in seeds)  # fmt: skip
    maps = [c["metrics"]["i2t"]["map"] for c in seeds]
    assert row["map_i2t"]["mean"] == pytest.approx(sum(maps) / 2)
    assert row["map_i2t"]["std"] == pytest.approx(abs(maps[0] - maps[1]) / 2**0.5)
    text = report.read_text()
    assert "| DPSH | eta=" in text and "±" in text
    chosen = [c for k, c in done.items() if "|trial" in k and "|seed" not in k][vals.index(max(vals))]
    assert [c["run"] for c in seeds if c["seed"] == 0] == [chosen["run"]]  # the trial is the first seed's run
    grid.run_search(str(recipe), ["dpsh"], 16, out, ["train.epochs=2"], seeds=(0, 1))  # resumes: nothing new
    assert json.loads((out / "search.json").read_text()) == done
