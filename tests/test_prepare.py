"""``prepare_run`` (make run / make demo): every step in one process, finished steps skipped."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image
from tinyrun import TINY_OVERRIDES

from crossmodal.images import ImageDecodeError
from crossmodal.jobs.index import THUMB_SIDE, thumbnail_bytes
from crossmodal.jobs.prepare import prepare_run
from crossmodal.runs.folder import RunError


def overrides(workdir, name):
    paths = [f"runs_dir={workdir / 'runs'}", f"train.cache_dir={workdir / 'cache'}"]
    return [*TINY_OVERRIDES, f"name={name}", *paths]


def test_prepare_runs_every_step_then_skips_them(workdir):
    said: list[str] = []
    run = prepare_run(None, overrides(workdir, "prep"), progress=False, say=said.append)
    steps = [s for s in said if s.startswith("[")]
    assert [s[:5] for s in steps] == ["[1/4]", "[2/4]", "[3/4]", "[4/4]"]
    assert [s.split(":")[0] for s in steps] == ["[1/4] data", "[2/4] train", "[3/4] index", "[4/4] eval"]
    assert "best validation mAP" in steps[1] and "images and" in steps[2] and steps[3].endswith(" s)")
    table = next(s for s in said if "i2t mAP" in s)  # the mAP table, hash row first
    assert table.splitlines()[1].startswith("hash ") and "float (cosine)" in table
    manifest = json.loads((run / "manifest.json").read_text())
    assert {"index", "eval"} <= set(manifest) and "model.safetensors" in manifest["files"]
    stamp = (run / "manifest.json").stat().st_mtime_ns

    again: list[str] = []
    assert prepare_run(None, overrides(workdir, "prep"), progress=False, say=again.append) == run
    steps = [s for s in again if s.startswith("[")]
    assert all("skipped" in s for s in steps[1:]), steps
    assert (run / "manifest.json").stat().st_mtime_ns == stamp  # nothing rewritten
    assert next(s for s in again if "i2t mAP" in s) == table  # the stored table, in the same order

    changed: list[str] = []
    prepare_run(None, [*overrides(workdir, "prep"), "train.lr=0.02"], progress=False, say=changed.append)
    note = next(s for s in changed if s.startswith("[2/4]"))
    assert "skipped" in note and "train.lr" in note and "delete it to retrain" in note


def set_format(run, version) -> None:
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["format_version"] = version
    (run / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.slow
def test_runs_of_another_format_are_refused_and_prepare_retrains_older_ones(workdir, capsys):
    from crossmodal import RUN_FORMAT_VERSION
    from crossmodal.cli import main

    recipe = overrides(workdir, "prep_old")
    run = prepare_run(None, recipe, progress=False, say=lambda s: None)
    set_format(run, RUN_FORMAT_VERSION + 1)  # a newer crossmodal's run: never written over
    with pytest.raises(RunError, match=f"run format {RUN_FORMAT_VERSION + 1}.*upgrade crossmodal"):
        prepare_run(None, recipe, progress=False, say=lambda s: None)
    set_format(run, RUN_FORMAT_VERSION - 1)  # an older one (format 1: the model needed its loss to load)
    capsys.readouterr()
    assert main(["search", "--run", str(run), "--text", "red"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"run format {RUN_FORMAT_VERSION - 1}" in err
    command = (f"crossmodal prepare --config {run / 'config.yaml'} "
               f"--set runs_dir={run.parent} --set name={run.name}")
    assert err.endswith(f"rebuild it with: {command}")
    assert main(command.split()[1:]) == 0  # the command it names rebuilds the run in place
    assert main(["search", "--run", str(run), "--text", "red"]) == 0
    set_format(run, RUN_FORMAT_VERSION - 1)
    said: list[str] = []
    prepare_run(None, recipe, progress=False, say=said.append)
    assert "retraining it" in next(s for s in said if s.startswith("[2/4]"))
    assert json.loads((run / "manifest.json").read_text())["format_version"] == RUN_FORMAT_VERSION
    assert main(["search", "--run", str(run), "--text", "red"]) == 0


def test_prepare_command_line(workdir, capsys):
    from crossmodal.cli import main
    from crossmodal.config import load_config

    recipe = workdir / "prep_cli.yaml"
    load_config(None, overrides(workdir, "prep_cli")).dump(recipe)
    assert main(["prepare", "--config", str(recipe), "--no-baselines"]) == 0
    out = capsys.readouterr().out
    assert "[4/4]" in out and "hash" in out and "CCA-ITQ" not in out
    assert main(["prepare", "--config", str(workdir / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_small_opaque_pngs_are_kept_as_they_are():
    data = png(Image.new("RGBA", (128, 128), (10, 200, 30, 255)))
    assert thumbnail_bytes(data) is data


def test_other_images_become_small_pngs_on_white():
    transparent = png(Image.new("RGBA", (64, 64), (0, 0, 0, 0)))
    out = Image.open(io.BytesIO(thumbnail_bytes(transparent)))
    assert out.format == "PNG" and out.mode == "RGB" and out.getpixel((3, 3)) == (255, 255, 255)
    buf = io.BytesIO()
    Image.new("RGB", (1000, 500), (200, 10, 10)).save(buf, format="JPEG")
    big = Image.open(io.BytesIO(thumbnail_bytes(buf.getvalue())))
    assert big.format == "PNG" and max(big.size) == THUMB_SIDE and big.size[0] == 2 * big.size[1]
    assert np.abs(np.asarray(big, dtype=int)[5, 5] - (200, 10, 10)).max() < 12


def test_a_corrupt_image_gets_no_thumbnail():
    data = png(Image.new("RGB", (64, 64), (1, 2, 3)))
    with pytest.raises(ImageDecodeError):
        thumbnail_bytes(data[: len(data) // 2])


class Interrupt(Exception):
    pass


def interrupt_at_epoch(monkeypatch, epoch: int) -> list[int]:
    """Make training raise at the start of ``epoch`` (0-based); returns the epochs run."""
    from crossmodal import fit

    original = fit._phase  # one tower's steps of one epoch
    seen: list[int] = []

    def phase(net, opt, m, e, *args):
        if e == epoch:
            raise Interrupt
        if m == "image":
            seen.append(e)
        return original(net, opt, m, e, *args)

    monkeypatch.setattr(fit, "_phase", phase)
    return seen


RESUMABLE = ["train.epochs=6", "train.checkpoint_every=3"]


def test_an_interrupted_training_resumes_from_its_checkpoint(workdir, monkeypatch):
    recipe = [*overrides(workdir, "prep_resume"), *RESUMABLE]
    with monkeypatch.context() as m:
        interrupt_at_epoch(m, 4)  # killed during epoch 5, after the checkpoint of epoch 3
        with pytest.raises(Interrupt):
            prepare_run(None, recipe, progress=False, say=lambda s: None)
    run = workdir / "runs" / "prep_resume"
    assert json.loads((run / "checkpoint" / "state.json").read_text())["epoch"] == 3
    seen = interrupt_at_epoch(monkeypatch, -1)
    said: list[str] = []
    prepare_run(None, recipe, progress=False, say=said.append)
    assert "resumed" in next(s for s in said if s.startswith("[2/4]"))
    assert seen == [3, 4, 5]  # only the epochs after the checkpoint
    log = json.loads((run / "train_log.json").read_text())
    assert [h["epoch"] for h in log["history"]] == [1, 2, 3, 4, 5, 6]
    assert not (run / "checkpoint").exists()  # removed once the run is complete


def test_a_finished_training_keeps_its_checkpoint_only_when_asked(workdir):
    """The checkpoint is a third of a run's size and of no use once training has finished,
    unless it is to be resumed for more epochs."""
    from crossmodal.config import load_config
    from crossmodal.jobs.train import checkpoint_state, train_run

    kept = train_run(load_config(None, [*overrides(workdir, "keep"), "train.epochs=2",
                                        "train.keep_checkpoint=true"]), progress=False)  # fmt: skip
    assert checkpoint_state(kept)["epoch"] == 2
    longer = load_config(None, [*overrides(workdir, "keep"), "train.epochs=3", "train.keep_checkpoint=true"])
    train_run(longer, resume=True, progress=False)  # a kept checkpoint resumes for more epochs
    log = json.loads((kept / "train_log.json").read_text())
    assert [h["epoch"] for h in log["history"]] == [1, 2, 3]


def test_a_checkpoint_of_another_recipe_is_not_resumed(workdir, monkeypatch):
    from crossmodal.config import load_config
    from crossmodal.jobs.train import train_run

    recipe = [*overrides(workdir, "prep_other"), *RESUMABLE]
    with monkeypatch.context() as m:
        interrupt_at_epoch(m, 4)
        with pytest.raises(Interrupt):  # recipe A stops after its epoch-3 checkpoint
            prepare_run(None, recipe, progress=False, say=lambda s: None)
    with monkeypatch.context() as m:
        interrupt_at_epoch(m, 1)
        with pytest.raises(Interrupt):  # recipe B (another lr) starts, and stops before a checkpoint
            prepare_run(None, [*recipe, "train.lr=0.02"], progress=False, say=lambda s: None)
    run = workdir / "runs" / "prep_other"
    assert not (run / "checkpoint").exists()  # B removed A's checkpoint when it started afresh
    seen = interrupt_at_epoch(monkeypatch, -1)
    said: list[str] = []
    kept = [*recipe, "train.lr=0.02", "train.keep_checkpoint=true"]
    prepare_run(None, kept, progress=False, say=said.append)
    assert "resumed" not in next(s for s in said if s.startswith("[2/4]")) and seen == list(range(6))

    # the command line's --resume refuses another recipe's (kept) checkpoint, naming the difference
    cfg = load_config(None, [*recipe, "train.lr=0.05"])
    with pytest.raises(RunError, match="another recipe.*train.lr"):
        train_run(cfg, resume=True, progress=False)


def test_an_incomplete_checkpoint_is_not_resumed(workdir, monkeypatch):
    from crossmodal.jobs.train import checkpoint_state

    recipe = [*overrides(workdir, "prep_torn"), *RESUMABLE]
    with monkeypatch.context() as m:
        interrupt_at_epoch(m, 4)
        with pytest.raises(Interrupt):
            prepare_run(None, recipe, progress=False, say=lambda s: None)
    run = workdir / "runs" / "prep_torn"
    assert checkpoint_state(run) is not None
    meta = json.loads((run / "checkpoint" / "state.json").read_text())
    meta["epoch"] = 6  # as if killed between writing the checkpoint's two files
    (run / "checkpoint" / "state.json").write_text(json.dumps(meta))
    assert checkpoint_state(run) is None
    seen = interrupt_at_epoch(monkeypatch, -1)
    said: list[str] = []
    prepare_run(None, recipe, progress=False, say=said.append)
    assert "resumed" not in next(s for s in said if s.startswith("[2/4]")) and seen == list(range(6))


def test_an_interrupted_retraining_leaves_an_untrained_run(workdir, monkeypatch):
    from crossmodal.jobs.prepare import is_trained
    from crossmodal.serving import RetrievalEngine

    recipe = overrides(workdir, "prep_retrain")
    run = prepare_run(None, recipe, progress=False, say=lambda s: None)
    assert is_trained(run)
    from crossmodal.config import load_config
    from crossmodal.jobs.train import train_run

    with monkeypatch.context() as m:
        interrupt_at_epoch(m, 1)
        with pytest.raises(Interrupt):  # crossmodal train over the trained run, killed early
            train_run(load_config(None, [*recipe, "train.epochs=3"]), progress=False)
    assert not is_trained(run)  # never the old weights beside the new config and splits
    with pytest.raises(RunError, match=f"create it with: crossmodal prepare --config {run / 'config.yaml'}"):
        RetrievalEngine.load(run)


def test_a_recipe_with_another_index_kind_is_reindexed(workdir):
    recipe = overrides(workdir, "prep_kind")
    run = prepare_run(None, recipe, progress=False, say=lambda s: None)
    assert json.loads((run / "manifest.json").read_text())["index"]["kind"] == "flat"
    said: list[str] = []
    prepare_run(None, [*recipe, "index.kind=hnsw"], progress=False, say=said.append)
    step = next(s for s in said if s.startswith("[3/4]"))
    assert "skipped" not in step and "(hnsw)" in step
    assert "skipped" in next(s for s in said if s.startswith("[2/4]"))  # no retraining for it
    assert json.loads((run / "manifest.json").read_text())["index"]["kind"] == "hnsw"


def unlist_model(run) -> None:
    """The state a retraining left before its fix: the manifest no longer lists the weights,
    but the file is still on disk."""
    manifest = json.loads((run / "manifest.json").read_text())
    del manifest["files"]["model.safetensors"]
    (run / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.slow
def test_every_is_it_done_check_agrees_on_an_unlisted_model(workdir, tmp_path, capsys):
    import yaml

    from crossmodal.cli import main
    from crossmodal.config import load_config
    from crossmodal.jobs.grid import run_cell
    from crossmodal.runs.folder import invalidate_products
    from crossmodal.runs.state import is_evaluated, is_indexed, is_trained

    recipe = tmp_path / "unlisted.yaml"
    recipe.write_text(yaml.safe_dump(load_config(None, overrides(workdir, "unlisted")).to_dict()))
    run = prepare_run(recipe, progress=False, say=lambda s: None)
    assert is_trained(run) and is_indexed(run) and is_evaluated(run)
    unlist_model(run)
    assert (run / "model.safetensors").exists()
    assert not is_trained(run) and not is_indexed(run) and not is_evaluated(run)
    assert main(["train", "--config", str(recipe), "--if-missing"]) == 0  # trains: not "already trained"
    assert "trained run:" in capsys.readouterr().out and is_trained(run)
    assert main(["index", "--run", str(run), "--if-missing"]) == 0
    assert "indexed" in capsys.readouterr().out and is_indexed(run)

    # the grid: a cell whose model is unlisted is trained again, then evaluated (it used to
    # skip training and fail in eval)
    out = tmp_path / "grid"
    cell = run_cell(str(recipe), "dcmh", 16, out, [])
    cell_run = out / "runs" / "unlisted-dcmh-16"
    unlist_model(cell_run)
    again = run_cell(str(recipe), "dcmh", 16, out, [])
    assert again["metrics"]["i2t"]["map"] == pytest.approx(cell["metrics"]["i2t"]["map"])
    assert is_trained(cell_run)

    # invalidating a trained run: the manifest first, then the files; every check agrees
    invalidate_products(run, model=True)
    assert not (run / "model.safetensors").exists() and not (run / "image.index").exists()
    assert not is_trained(run) and (run / "config.yaml").exists() and (run / "splits.json").exists()
