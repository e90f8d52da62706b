"""Tests for the OpenMoji builder, on small slices built into tmp_path."""

from __future__ import annotations

import json

import numpy as np
import pytest

from crossmodal.data import create_dataset, list_datasets
from crossmodal.data import openmoji as om
from crossmodal.data.records import CrossModalDataset

WAVE = ["1F44B"] + [f"1F44B-{tone}" for tone in ("1F3FB", "1F3FC", "1F3FD", "1F3FE", "1F3FF")]
HEALTH = [
    "1F9D1-200D-2695-FE0F",
    "1F468-200D-2695-FE0F",
    "1F469-200D-2695-FE0F",
    "1F469-1F3FD-200D-2695-FE0F",
]
NAMED = ["🐱", "1F63A", "1F436", "1F600", "263A", "1F1E9-1F1EA"] + WAVE + HEALTH  # 263A: FE0F left off
PRIVATE = "E000"  # an OpenMoji extra in the private use area
INCLUDE = NAMED + [PRIVATE]
SIZE = 48


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[CrossModalDataset, object]:
    out = tmp_path_factory.mktemp("openmoji") / "om"
    return om.build_openmoji(out_dir=out, size=SIZE, include=INCLUDE), out


def _row(ds: CrossModalDataset, key: str) -> dict:
    return ds.table[ds.ids.index(key)]


def _labels(ds: CrossModalDataset, key: str) -> set[str]:
    return {ds.info.label_names[j] for j in np.flatnonzero(_row(ds, key)["labels"])}


def test_registered() -> None:
    assert "openmoji" in list_datasets()


def test_counts_and_stats(built) -> None:
    ds, _ = built
    assert len(ds) == len(NAMED)
    assert "263A-FE0F" in ds.ids and "1F431" in ds.ids
    s = ds.info.stats
    assert s["n_items"] == len(NAMED)
    assert s["left_out"] == 1 and s["left_out_by_reason"] == {"private_use": 1}
    assert s["left_out_ids"]["private_use"] == [PRIVATE]
    assert s["render_failures"] == {}
    assert s["n_labels"] == len(ds.info.label_names) == ds.labels_matrix().shape[1]
    assert ds.labels_matrix().any(0).all()  # no empty label columns
    assert s["mean_labels_per_item"] == pytest.approx(ds.labels_matrix().sum(1).mean(), abs=1e-3)
    assert 0.0 < s["relevant_fraction"] < 1.0
    assert s["unicode_groups"]["Animals & Nature"] == 2
    assert ds.info.protocol["n_query"] >= 1
    assert ds.info.protocol["n_query"] + ds.info.protocol["n_train"] == len(ds)


def test_captions_hold_unicode_name_and_aliases(built) -> None:
    ds, _ = built
    assert _row(ds, "1F431")["captions"] == ["cat face", "cat"]
    assert _row(ds, "1F44B-1F3FD")["captions"][0] == "waving hand: medium skin tone"
    assert "flag: Germany" in _row(ds, "1F1E9-1F1EA")["captions"]


def test_known_labels(built) -> None:
    ds, _ = built
    assert {"subgroup:animal-mammal", "word:cat", "word:face"} <= _labels(ds, "1F431")
    assert {"subgroup:cat-face", "word:cat"} <= _labels(ds, "1F63A")
    assert {"subgroup:country-flag", "word:flag"} == _labels(ds, "1F1E9-1F1EA")
    assert "word:hand" in _labels(ds, "1F44B-1F3FF")
    assert not any("skin" in n or "tone" in n or n == "word:woman" for n in ds.info.label_names)


def test_variants_share_a_group(built) -> None:
    ds, _ = built
    assert {_row(ds, k)["group"] for k in WAVE} == {"1F44B"}
    assert len({_row(ds, k)["group"] for k in HEALTH}) == 1
    assert _row(ds, "1F431")["group"] != _row(ds, "1F63A")["group"]


def test_images_are_rgb_coloured_on_white(built) -> None:
    ds, _ = built
    for i in range(len(ds)):
        img = np.asarray(ds.load_image(i))
        assert img.shape == (SIZE, SIZE, 3)
        assert (img[0, 0] == 255).all()  # white background in the corner
        assert (img.min(-1) < 200).mean() > 0.05, ds.ids[i]  # a drawing, not a blank square
        spread = img.max(-1).astype(int) - img.min(-1).astype(int)
        assert (spread > 40).mean() > 0.02, ds.ids[i]  # in colour, not grey


def test_second_call_loads_from_cache(built, monkeypatch: pytest.MonkeyPatch) -> None:
    ds, out = built
    mtime = (out / "info.json").stat().st_mtime_ns

    def no_render(*args, **kwargs):
        raise AssertionError("rendered again although a matching build exists")

    monkeypatch.setattr(om, "render_all", no_render)
    again = create_dataset("openmoji", out_dir=out, size=SIZE, include=list(reversed(INCLUDE)))
    assert again.ids == ds.ids
    assert (out / "info.json").stat().st_mtime_ns == mtime


def test_changed_options_or_force_rebuild(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "om"
    first = om.build_openmoji(out_dir=out, size=24, include=["1F431"])
    calls = []
    real = om.render_all
    monkeypatch.setattr(om, "render_all", lambda *a, **k: calls.append(1) or real(*a, **k))
    om.build_openmoji(out_dir=out, size=24, include=["1F431"], force=True)
    other = om.build_openmoji(out_dir=out, size=32, include=["1F431"])
    assert len(calls) == 2
    assert first.info.source["size"] == 24 and other.info.source["size"] == 32
    assert json.loads((out / "info.json").read_text())["source"]["size"] == 32
    assert other.load_image(0).size == (32, 32)


def test_render_failure_is_counted_and_skipped(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = om.render_svg

    def flaky(path: str, size: int, renderer: str = "resvg-py") -> bytes:
        if path.endswith("1F600.svg"):
            raise ValueError("broken svg")
        return real(path, size, renderer)

    monkeypatch.setattr(om, "render_svg", flaky)
    ds = om.build_openmoji(out_dir=tmp_path / "om", size=24, include=["1F600", "1F431"])
    assert ds.ids == ["1F431"]
    assert list(ds.info.stats["render_failures"]) == ["1F600"]
    assert "broken svg" in ds.info.stats["render_failures"]["1F600"]
    assert "render failures: 1 (1F600)" in om.summary(ds)


def test_broken_svg_file_gives_an_error_not_a_crash(tmp_path) -> None:
    bad = tmp_path / "bad.svg"
    bad.write_text("<svg this is not xml")
    pngs, errors = om.render_all([("bad", str(bad))], 16, om._renderer_name(), workers=1)
    assert pngs == {} and list(errors) == ["bad"]


def test_interrupted_build_leaves_nothing_that_looks_built(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(om.datasets.Dataset, "save_to_disk", boom)
    with pytest.raises(KeyboardInterrupt):
        om.build_openmoji(out_dir=tmp_path / "om", size=16, include=["1F431"])
    assert not (tmp_path / "om").exists()


def test_limit_and_empty_selection(tmp_path) -> None:
    ds = om.build_openmoji(out_dir=tmp_path / "lim", size=16, limit=3)
    assert ds.ids == ["1F600", "1F603", "1F604"]  # CLDR order
    cli_style = create_dataset("openmoji", out_dir=tmp_path / "cli", size=16, include="1F436,🐱")
    assert sorted(cli_style.ids) == ["1F431", "1F436"]
    with pytest.raises(ValueError, match="no emoji selected"):
        om.build_openmoji(out_dir=tmp_path / "none", size=16, include=[PRIVATE])


def test_summary_mentions_the_numbers(built) -> None:
    ds, _ = built
    text = om.summary(ds)
    assert f"{len(NAMED)} items" in text and "left out" in text and "private_use 1" in text


def test_default_out_dir(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.delenv("CROSSMODAL_DATA_DIR", raising=False)
    monkeypatch.setenv("CROSSMODAL_HOME", str(tmp_path / "home"))
    assert om.default_out_dir(128) == tmp_path / "home" / "data" / "openmoji-128"
    monkeypatch.setenv("CROSSMODAL_DATA_DIR", str(tmp_path))
    assert om.default_out_dir(64, limit=10) == tmp_path / "openmoji-64-limit10"


@pytest.mark.parametrize(
    ("key", "base"),
    [
        ("1F44B-1F3FB", "1F44B"),
        ("1F469-1F3FD-200D-2695-FE0F", "1F9D1-200D-2695"),
        ("1F3C3-200D-2642-FE0F", "1F3C3"),
        ("1F3C3-1F3FF-200D-2640-FE0F-200D-27A1-FE0F", "1F3C3"),
        ("1F46B-1F3FB", "1F9D1-200D-1F91D-200D-1F9D1"),
        ("1F469-200D-1F469-200D-1F467", "1F9D1-200D-1F9D1-200D-1F9D2"),
        ("2640-FE0F", "2640"),  # the female sign alone is its own emoji
        ("1F431", "1F431"),
    ],
)
def test_base_key(key: str, base: str) -> None:
    assert om.base_key(key) == base


def test_name_tokens() -> None:
    assert om.name_tokens("woman health worker: medium-dark skin tone") == ["health", "worker"]
    assert om.name_tokens("flag: Saint Kitts & Nevis") == ["flag"]
    assert om.name_tokens("cat face") == ["cat", "face"]
    assert om.name_tokens("man: red hair") == ["red", "hair"]


def test_parse_emoji_test_and_vocabulary(tmp_path) -> None:
    text = (
        "# group: Animals & Nature\n# subgroup: animal-mammal\n"
        "1F431 ; fully-qualified # 🐱 E0.6 cat face\n"
        "1F408 ; fully-qualified # 🐈 E0.7 cat\n"
        "1F408-200D-2B1B ; fully-qualified # 🐈‍⬛ E13.0 black cat\n"
        "# subgroup: cat-face\n263A ; unqualified # ☺ E0.6 smiling face\n"
    )
    path = tmp_path / "emoji-test.txt"
    path.write_text(text, encoding="utf-8")
    entries = om.parse_emoji_test(path)
    assert [e.key for e in entries] == ["1F431", "1F408", "1F408-200D-2B1B", "263A"]
    assert entries[2].name == "black cat" and entries[3].status == "unqualified"
    assert entries[0].char == "🐱"
    subgroups, words = om.label_vocabulary(entries)
    assert subgroups == ["animal-mammal"]  # only fully-qualified entries count
    assert words == []  # "cat" names every group: too common for MAX_WORD_FRACTION
    names = {"a": ["cat face"], "b": ["cat"], "c": ["black cat"], "d": ["dog face"]}
    assert om.select_words(names, min_groups=3, max_fraction=1.0) == ["cat"]
    assert om.select_words(names, min_groups=2, max_fraction=0.5) == ["face"]


def test_relevant_fraction_by_hand() -> None:
    labels = np.array([[1, 0], [1, 1], [0, 1], [0, 0]], dtype=np.uint8)
    # sharing pairs (ordered, i != j): (0,1), (1,0), (1,2), (2,1) -> 4 of 12
    assert om.relevant_fraction(labels, chunk=3) == pytest.approx(4 / 12)


def test_default_protocol() -> None:
    assert om.default_protocol(3944) == {"n_query": 394, "n_train": 3550}
    assert om.default_protocol(100_000)["n_query"] == om.MAX_QUERIES
    assert om.default_protocol(5) == {"n_query": 1, "n_train": 4}
