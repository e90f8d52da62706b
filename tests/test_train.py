from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tinyrun import tiny_config

from crossmodal.cli import main
from crossmodal.config import ConfigError
from crossmodal.data import open_dataset
from crossmodal.registry import UnknownNameError
from crossmodal.runs.model import load_model


def test_training_beats_random_ranking(tiny_run):
    log = json.loads((tiny_run / "train_log.json").read_text())
    dataset = open_dataset("tiny_colours")
    labels = dataset.labels_matrix().astype(float)
    random_map = float(((labels @ labels.T) > 0).mean())  # ~ precision of a random ranking
    assert log["best_val_map"] > random_map + 0.3, (log["best_val_map"], random_map)
    assert log["history"][0]["epoch"] == 1
    assert {"image/inter", "image/intra", "image/quant", "image/balance", "text/inter"} <= set(
        log["history"][0]
    )


def test_run_folder_contents(tiny_run):
    for name in ("config.yaml", "model.safetensors", "vocab.json", "splits.json", "manifest.json"):
        assert (tiny_run / name).exists(), name
    manifest = json.loads((tiny_run / "manifest.json").read_text())
    assert manifest["bits"] == 16
    assert manifest["frozen"] == {"image": True, "text": False}
    # frozen pretrained towers are rebuilt from their packages, not copied into the run
    from safetensors import safe_open

    with safe_open(str(tiny_run / "model.safetensors"), "pt") as fh:
        keys = list(fh.keys())
    assert not any(k.startswith("image_tower.") for k in keys)
    assert any(k.startswith("text_tower.") for k in keys)
    assert any(k.startswith("image_head.") for k in keys)


def test_reloaded_model_gives_the_same_codes(tiny_run):
    model = load_model(tiny_run)
    batch = model.text_tower.tokenize(["a red square", "blue"])
    codes = model.encode_text(batch, binarize=True)
    again = load_model(tiny_run)
    assert torch.equal(codes, again.encode_text(batch, binarize=True))
    assert set(codes.unique().tolist()) <= {-1.0, 1.0}


def test_training_is_deterministic_and_resumes(workdir):
    from crossmodal.jobs.train import train_run

    a = train_run(tiny_config(workdir, "name=det_a", "train.epochs=4"), progress=False)
    b = train_run(tiny_config(workdir, "name=det_b", "train.epochs=4"), progress=False)
    la = json.loads((a / "train_log.json").read_text())["history"]
    lb = json.loads((b / "train_log.json").read_text())["history"]
    assert [r["val_map"] for r in la] == [r["val_map"] for r in lb]
    # stop after 2 epochs, then resume to 4: the same history as the straight run
    c = train_run(tiny_config(workdir, "name=det_c", "train.epochs=2"), progress=False)
    train_run(tiny_config(workdir, "name=det_c", "train.epochs=4"), resume=True, progress=False)
    lc = json.loads((c / "train_log.json").read_text())["history"]
    assert [r["epoch"] for r in lc] == [1, 2, 3, 4]
    np.testing.assert_allclose([r["val_map"] for r in lc], [r["val_map"] for r in la], atol=1e-6)


def test_resume_without_a_checkpoint_says_it_starts_at_epoch_1(workdir, caplog):
    # reported: --resume of a run stopped before its first checkpoint quietly trained from scratch
    from crossmodal.jobs.train import train_run

    run = train_run(tiny_config(workdir, "name=resume_none", "train.epochs=2"), progress=False)
    assert not (run / "checkpoint").exists()  # removed when training ends
    with caplog.at_level("WARNING", logger="crossmodal.jobs.train"):
        train_run(tiny_config(workdir, "name=resume_none", "train.epochs=2"), resume=True, progress=False)
    assert f"--resume: {run} has no checkpoint" in caplog.text and "starts at epoch 1" in caplog.text


@pytest.mark.parametrize(
    "override, error, needle",
    [
        ("model.image_tower=alexnet", UnknownNameError, "efficientnet_lite0"),
        ("model.text_tower=word2vec", UnknownNameError, "minilm"),
        ("loss.name=magic", UnknownNameError, "dcmh"),
        ("data.name=imagenet", UnknownNameError, "openmoji"),
    ],
)
def test_unknown_names_fail_before_any_work(workdir, override, error, needle):
    from crossmodal.jobs.train import train_run

    cfg = tiny_config(workdir, "name=never", override)
    with pytest.raises(error) as err:
        train_run(cfg, progress=False)
    assert needle in str(err.value)
    assert not (workdir / "runs" / "never").exists()


def test_cli_refuses_bad_code_length(capsys):
    assert main(["train", "--set", "model.bits=20"]) == 2
    assert "multiple of 8" in capsys.readouterr().err
    with pytest.raises(ConfigError):
        tiny_config(__import__("pathlib").Path("."), "model.bits=7")


def test_retraining_an_indexed_run_removes_its_stale_indexes(tiny_run, workdir, tmp_path):
    import shutil

    from crossmodal.jobs.train import train_run
    from crossmodal.runs.folder import RunError
    from crossmodal.serving import RetrievalEngine

    shutil.copytree(tiny_run, tmp_path / "tiny")
    assert (tmp_path / "tiny" / "image.index").exists() and any((tmp_path / "tiny" / "images").iterdir())
    train_run(tiny_config(workdir, f"runs_dir={tmp_path}", "train.epochs=2"), progress=False)
    manifest = json.loads((tmp_path / "tiny" / "manifest.json").read_text())
    assert "index" not in manifest and "image.index" not in manifest["files"]
    assert not (tmp_path / "tiny" / "image.index").exists()
    assert not (tmp_path / "tiny" / "images").exists()  # thumbnails by item id: maybe another dataset now
    with pytest.raises(RunError, match="crossmodal index"):
        RetrievalEngine.load(tmp_path / "tiny")


def test_training_over_a_corrupt_manifest_starts_afresh(workdir):
    from crossmodal.jobs.train import train_run
    from crossmodal.runs.state import is_trained

    cfg = tiny_config(workdir, "name=corrupt_manifest", "train.epochs=2")
    run = train_run(cfg, progress=False)
    (run / "manifest.json").write_text("{")
    assert train_run(cfg, progress=False) == run and is_trained(run)
