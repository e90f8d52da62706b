"""``prepare_run`` (make run / make demo): every step in one process, finished steps skipped."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image
from tinyrun import TINY_OVERRIDES

from crossmodal.images import ImageDecodeError
from crossmodal.indexing import THUMB_SIDE, thumbnail_bytes
from crossmodal.prepare import prepare_run
from crossmodal.run import RunError


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
    assert any(s.startswith(" " * 10) or "hash" in s for s in said)  # the mAP table
    manifest = json.loads((run / "manifest.json").read_text())
    assert {"index", "eval"} <= set(manifest) and "model.safetensors" in manifest["files"]
    stamp = (run / "manifest.json").stat().st_mtime_ns

    again: list[str] = []
    assert prepare_run(None, overrides(workdir, "prep"), progress=False, say=again.append) == run
    steps = [s for s in again if s.startswith("[")]
    assert all("skipped" in s for s in steps[1:]), steps
    assert (run / "manifest.json").stat().st_mtime_ns == stamp  # nothing rewritten
    table = next(s for s in again if "hash" in s)
    assert table == next(s for s in said if "hash" in s)  # the stored table is printed again

    changed: list[str] = []
    prepare_run(None, [*overrides(workdir, "prep"), "train.lr=0.02"], progress=False, say=changed.append)
    note = next(s for s in changed if s.startswith("[2/4]"))
    assert "skipped" in note and "train.lr" in note and "delete it to retrain" in note


def test_prepare_refuses_a_run_of_another_version(workdir):
    run = prepare_run(None, overrides(workdir, "prep_old"), progress=False, say=lambda s: None)
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["format_version"] = -1
    (run / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RunError, match="run format -1"):
        prepare_run(None, overrides(workdir, "prep_old"), progress=False, say=lambda s: None)


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


def test_an_interrupted_training_resumes_from_its_checkpoint(workdir):
    from crossmodal.config import load_config
    from crossmodal.pipeline import train_run

    cfg = load_config(None, [*overrides(workdir, "prep_resume"), "train.epochs=6", "train.checkpoint_every=3"])
    run = train_run(cfg, progress=False)
    state = json.loads((run / "checkpoint" / "state.json").read_text())
    assert state["epoch"] == 6
    # as if killed after the checkpoint, before the model and manifest were written
    (run / "model.safetensors").unlink()
    (run / "manifest.json").unlink()
    said: list[str] = []
    prepare_run(None, [*overrides(workdir, "prep_resume"), "train.epochs=6", "train.checkpoint_every=3"],
                progress=False, say=said.append)  # fmt: skip
    step = next(s for s in said if s.startswith("[2/4]"))
    assert "resumed" in step
    assert json.loads((run / "manifest.json").read_text())["best_val_map"] == state["best_score"]
