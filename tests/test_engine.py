from __future__ import annotations

import json

import numpy as np
import pytest

from crossmodal.cli import main
from crossmodal.data import open_dataset
from crossmodal.images import ImageDecodeError
from crossmodal.runs.encode import open_run_data
from crossmodal.runs.folder import RunError
from crossmodal.serving import RetrievalEngine
from crossmodal.text import QueryError


def test_all_four_directions_answer(engine, tiny_run):
    dataset = open_dataset("tiny_colours")
    db = open_run_data(tiny_run).splits["database"]
    img = dataset.load_image(int(db[0]))
    for result, text_hits in (
        (engine.search_text("red", 5), False),
        (engine.search_image(img, 5), True),
        (engine.similar_images(img, 5), False),
        (engine.similar_texts("a blue star", 5), True),
    ):
        assert len(result.hits) == 5
        assert [h.rank for h in result.hits] == [1, 2, 3, 4, 5]
        dists = [h.distance for h in result.hits]
        assert dists == sorted(dists)
        assert all(0 <= d <= 16 for d in dists)
        assert (result.hits[0].text_id is not None) == text_hits
        assert len(result.code_hex) == 4  # 16 bits
        assert set(result.timings_ms) == {"encode", "search", "lookup"}


def test_text_query_finds_items_of_that_colour(engine):
    result = engine.search_text("red", 10)
    colours = [h.captions[0].split()[1] for h in result.hits]
    assert colours.count("red") >= 8, colours


def test_own_caption_ranks_own_image_near_the_top(engine, tiny_run):
    dataset = open_dataset("tiny_colours")
    db = open_run_data(tiny_run).splits["database"]
    ranks = []
    for i in db[:12]:
        caption = dataset.captions(int(i))[0]
        hits = engine.search_text(caption, len(db)).hits
        ids = [h.item_id for h in hits]
        ranks.append(ids.index(int(i)) if int(i) in ids else len(db))
    # items of one colour and shape are near-duplicates: the own image is among its ~6 twins
    assert np.median(ranks) < len(db) / 4, ranks


def test_image_query_returns_captions_of_its_colour(engine, tiny_run):
    dataset = open_dataset("tiny_colours")
    db = open_run_data(tiny_run).splits["database"]
    i = int(db[3])
    colour = dataset.captions(i)[1]
    result = engine.search_image(dataset.load_image(i), 5)
    assert sum(colour in h.caption for h in result.hits) >= 4
    assert result.hits[0].image_path.endswith(".png")


def test_batch_equals_single(engine):
    batch = engine.search_text_batch(["red", "green square"], 5)
    for query, result in zip(["red", "green square"], batch):
        single = engine.search_text(query, 5)
        assert [h.item_id for h in result.hits] == [h.item_id for h in single.hits]


@pytest.mark.parametrize("query", ["", "   \n\t"])
def test_empty_text_is_refused(engine, query):
    with pytest.raises(QueryError, match="empty"):
        engine.search_text(query, 5)


def test_out_of_vocabulary_words_are_named(engine):
    with pytest.raises(QueryError) as err:
        engine.search_text("zebra xylophone", 5)
    assert "zebra" in str(err.value) and "xylophone" in str(err.value)


def test_bad_k_and_bad_image(engine, tmp_path):
    with pytest.raises(ValueError, match="k must be a positive integer"):
        engine.search_text("red", 0)
    assert len(engine.search_text("red", 10_000).hits) == engine.indexes["image"].ntotal
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    with pytest.raises(ImageDecodeError, match="not a readable image"):
        engine.search_image(bad, 5)


def test_run_of_another_version_or_code_length_is_refused(tiny_run, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(tiny_run, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, "format_version": 999}))
    with pytest.raises(RunError, match="run format 999"):
        RetrievalEngine.load(copy)
    (copy / "manifest.json").write_text(json.dumps({**manifest, "bits": 32}))
    with pytest.raises(RunError, match="16 bits, manifest.json 32 bits"):
        RetrievalEngine.load(copy)
    with pytest.raises(RunError, match="not a trained run|not found"):
        RetrievalEngine.load(tmp_path / "nothing")


def test_cli_search_prints_a_table(tiny_run, capsys):
    assert main(["search", "--run", str(tiny_run), "--text", "yellow", "-k", "3"]) == 0
    out = capsys.readouterr().out
    assert "t2i" in out and "yellow" in out
    assert len([line for line in out.splitlines() if line.strip().startswith(("1 ", "2 ", "3 "))]) == 3
    assert main(["search", "--run", str(tiny_run), "--text", "  "]) == 2
    assert "empty" in capsys.readouterr().err


def test_a_run_with_bit_weights_ranks_by_weighted_hamming(workdir):
    from tinyrun import tiny_config

    from crossmodal.codes import unpack_codes, weighted_hamming
    from crossmodal.jobs.index import index_run
    from crossmodal.jobs.train import train_run

    run = train_run(
        tiny_config(workdir, "name=tiny_drsch", "loss.name=drsch", "train.epochs=4"), progress=False
    )
    index_run(run, progress=False)
    engine = RetrievalEngine.load(run)
    try:
        assert engine.bit_weights is not None and engine.describe()["weighted"]
        result = engine.search_text("a green circle", 8)
        index = engine.indexes["image"]
        ids = index.ids()
        q = unpack_codes(engine.encode_texts(["a green circle"]), 16)
        db = unpack_codes(index.reconstruct(ids), 16)
        d = weighted_hamming(q, db, engine.bit_weights)[0]
        expected = np.sort(d)[:8]
        np.testing.assert_allclose([h.distance for h in result.hits], expected, rtol=1e-6)
        # within a weighted tie, the continuous query code decides, then the id
        score = db.astype(np.float64) @ engine.encode_texts(["a green circle"], binarize=False)[0]
        keys = [(d[i], -score[i], i) for i in np.searchsorted(ids, [h.item_id for h in result.hits])]
        assert all(a[0] < b[0] + 1e-9 for a, b in zip(keys, keys[1:]))
        ties = [(a, b) for a, b in zip(keys, keys[1:]) if abs(a[0] - b[0]) < 1e-9]
        assert ties and all(a[1] < b[1] or (np.isclose(a[1], b[1]) and a[2] < b[2]) for a, b in ties), ties
    finally:
        engine.close()
