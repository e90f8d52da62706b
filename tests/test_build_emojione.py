"""scripts/build_emojione.py on a handful of generated PNGs named by code point (not the package)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from crossmodal.data import open_dataset
from crossmodal.data.openmoji import _captions, emoji_test_path, label_vocabulary, parse_emoji_test

ROOT = Path(__file__).resolve().parents[1]

# file name -> (fully-qualified Unicode key, subgroup), as the EmojiOne package names its files
MATCHED = {
    "1F600.png": ("1F600", "face-smiling"),  # exact
    "2764.png": ("2764-FE0F", "heart"),  # U+FE0F left out of the file name
    "0023-20E3.png": ("0023-FE0F-20E3", "keycap"),  # U+FE0F inside the sequence
    "1F468-1F468-1F466.png": ("1F468-200D-1F468-200D-1F466", "family"),  # ZWJ left out
    "1f63a.png": ("1F63A", "cat-face"),  # lower case
    "1F44B-1F3FD.png": ("1F44B-1F3FD", "hand-fingers-open"),  # skin tone
}
SKIPPED = {
    "1F3FB.png": "component",  # a skin-tone swatch
    "E000.png": "private_use",
    "1F600-1F431.png": "not_in_unicode",
    "sprite.png": "not_a_code_point_name",
}


@pytest.fixture(scope="module")
def build():
    spec = importlib.util.spec_from_file_location("build_emojione", ROOT / "scripts" / "build_emojione.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


@pytest.fixture
def pngs(tmp_path) -> Path:
    """Small transparent PNGs with a coloured disc, palette mode like the real ones."""
    folder = tmp_path / "png"
    folder.mkdir()
    for k, name in enumerate([*MATCHED, *SKIPPED]):
        im = Image.new("RGBA", (16, 16), (0, 0, 0, 0))
        ImageDraw.Draw(im).ellipse((3, 3, 12, 12), fill=(40 * k % 256, 90, 200, 255))
        (im.convert("P") if k % 2 else im).save(folder / name)
    return folder


def test_builds_an_imagefolder_with_unicode_names_and_openmoji_labels(
    build, pngs, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("CROSSMODAL_DATA_DIR", str(tmp_path / "data"))
    out = tmp_path / "emojione"
    assert build.main([str(pngs), str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {len(MATCHED)} images" in printed and f"skipped {len(SKIPPED)}" in printed

    summary = json.loads((out / "emojione_build.json").read_text())
    assert summary["skipped_by_reason"] == {reason: 1 for reason in SKIPPED.values()}
    assert summary["subgroups"] == len(MATCHED)

    ds = open_dataset("imagefolder", {"root": str(out)})
    entries = {e.key: e for e in parse_emoji_test(emoji_test_path())}
    subgroups, _ = label_vocabulary(list(entries.values()))
    assert len(ds) == len(MATCHED)
    assert set(ds.info.label_names) == {f"subgroup:{s}" for _, s in MATCHED.values()}
    assert set(ds.info.label_names) <= {f"subgroup:{s}" for s in subgroups}  # OpenMoji's names
    labels = ds.labels_matrix()
    for i, item_id in enumerate(ds.ids):
        key, subgroup = MATCHED[next(n for n in MATCHED if n.upper() == Path(item_id).name.upper())]
        assert ds.captions(i) == _captions(entries[key])
        assert [ds.info.label_names[j] for j in np.flatnonzero(labels[i])] == [f"subgroup:{subgroup}"]
        image = ds.load_image(i)
        assert image.mode == "RGB" and image.getpixel((0, 0)) == (255, 255, 255)  # opaque on white
    heart = ds.ids.index("images/2764.png")
    assert ds.captions(heart)[0] == "red heart"


def test_refuses_a_non_empty_output_and_resizes(build, pngs, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert build.main([str(pngs), str(out)]) == 2
    assert build.main([str(pngs), str(out), "--overwrite", "--size", "32"]) == 0
    assert (out / "keep.txt").read_text() == "mine"
    with Image.open(out / "images" / "1F600.png") as im:
        assert im.size == (32, 32)


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb")
def test_reads_the_pngs_out_of_a_deb(build, pngs, tmp_path):
    """A package laid out like ruby-gemojione's: the gem's assets/png inside a .deb."""
    pkg = tmp_path / "pkg"
    shutil.copytree(pngs, pkg / "usr/share/rubygems-integration/all/gems/gemojione-3.3.0/assets/png")
    (pkg / "DEBIAN").mkdir()
    (pkg / "DEBIAN" / "control").write_text(
        "Package: ruby-gemojione\nVersion: 3.3.0-1\nArchitecture: all\nMaintainer: t <t@t>\nDescription: t\n"
    )
    deb = tmp_path / "ruby-gemojione_3.3.0-1_all.deb"
    subprocess.run(
        ["dpkg-deb", "--build", "--root-owner-group", str(pkg), str(deb)], check=True, capture_output=True
    )
    out = tmp_path / "from_deb"
    assert build.main([str(deb), str(out)]) == 0
    assert len((out / "metadata.jsonl").read_text().splitlines()) == len(MATCHED)
    with pytest.raises(SystemExit, match="neither a .deb file nor a folder"):
        build.main([str(tmp_path / "nothing.deb"), str(tmp_path / "x")])
