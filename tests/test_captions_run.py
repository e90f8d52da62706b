"""A captions-only dataset (no labels): relevance is "same image", one text entry per caption."""

from __future__ import annotations

import json

from tinyrun import tiny_config

from crossmodal.jobs.eval import eval_run
from crossmodal.jobs.index import index_run
from crossmodal.jobs.train import train_run
from crossmodal.serving import RetrievalEngine


def test_captions_only_run_trains_indexes_and_evaluates(workdir):
    cfg = tiny_config(workdir, "name=tiny_caps", "data.options={captions_only: true}", "train.epochs=15")
    run = train_run(cfg, progress=False)
    log = json.loads((run / "train_log.json").read_text())
    # val items are their own database, one relevant item each: a random ranking gives
    # H(n) / n, about 0.2 for the tiny split; a trained model ranks the own item near the top
    assert log["best_val_map"] > 0.4
    info = index_run(run, progress=False)
    assert info["text_units"] == "caption"
    assert info["texts"] == 2 * info["items"]  # every item has two captions
    rows = eval_run(run)
    assert set(rows["hash"]) == {"i2t", "t2i"}
    # 16 queries, one relevant item each: random ranking gives mAP H(16) / 16 = 0.21. Items of
    # one colour and shape are near-identical here, so even a good model confuses twins.
    cross = (rows["hash"]["t2i"]["map"] + rows["hash"]["i2t"]["map"]) / 2
    assert cross > 0.28, rows["hash"]
    engine = RetrievalEngine.load(run)
    result = engine.search_image(sorted((run / "images").glob("*.png"))[0], 4)
    assert all(h.caption and h.text_id is not None for h in result.hits)
    assert {h.item_id for h in result.hits} <= set(range(96))
    engine.close()
