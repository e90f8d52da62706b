"""A captions-only dataset (no labels): relevance is "same image", one text entry per caption."""

from __future__ import annotations

import json

from tinyrun import tiny_config

from crossmodal.engine import RetrievalEngine
from crossmodal.eval_run import eval_run
from crossmodal.indexing import index_run
from crossmodal.pipeline import train_run


def test_captions_only_run_trains_indexes_and_evaluates(workdir):
    cfg = tiny_config(workdir, "name=tiny_caps", "data.options={captions_only: true}", "train.epochs=15")
    run = train_run(cfg, progress=False)
    log = json.loads((run / "train_log.json").read_text())
    assert log["best_val_map"] > 0.0  # val items are their own database: relevance is reachable
    info = index_run(run, progress=False)
    assert info["text_units"] == "caption"
    assert info["texts"] == 2 * info["items"]  # every item has two captions
    rows = eval_run(run)
    assert set(rows["hash"]) == {"i2t", "t2i"}
    # 16 queries, one relevant item each: random ranking gives mAP about 0.2
    assert rows["hash"]["t2i"]["map"] > 0.0
    engine = RetrievalEngine.load(run)
    result = engine.search_image(sorted((run / "images").glob("*.png"))[0], 4)
    assert all(h.caption and h.text_id is not None for h in result.hits)
    assert {h.item_id for h in result.hits} <= set(range(96))
    engine.close()
