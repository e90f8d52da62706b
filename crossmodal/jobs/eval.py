"""The eval job: score a trained run on its query split, beside its float upper bound and
classical baselines, and write ``eval/metrics.json`` and ``eval/report.md``.

Rows of the report:
    hash           the run's binary codes ranked by Hamming distance (weighted, if the
                   run learned bit weights)
    float (cosine) the same model's continuous outputs ranked by cosine similarity
    LSH (CCA)      random hyperplanes on CCA-aligned frozen features (when both towers
    CCA-ITQ        are frozen), fitted on the run's training split

Queries are the query split; the database is the database split and relevance is
"shares a label". For captions-only data relevance is "same item", and the query items'
texts (images) form the database of the image (text) queries: i2t and t2i only.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from crossmodal.baselines import fit_baseline
from crossmodal.codes import sign
from crossmodal.data import RELEVANCE_IMAGE
from crossmodal.evaluate import evaluate_directions, relevance_args
from crossmodal.report import write_run_report
from crossmodal.runs.encode import continuous_codes, frozen_features, open_run_data
from crossmodal.runs.folder import EVAL_FILES, RunUpdate
from crossmodal.runs.model import MODALITIES, load_model

log = logging.getLogger(__name__)


def eval_run(
    run_dir: str | os.PathLike[str],
    baselines: bool = True,
    ks: tuple[int, ...] = (100,),
    tie_aware: bool = True,
) -> dict[str, Any]:
    """Evaluate ``run_dir`` in all four directions; returns ``{row: {direction: metrics}}``.

    Raises:
        RunError: the run is untrained or damaged, or its dataset changed since training.
    """
    run_dir = Path(run_dir)
    started = time.perf_counter()
    data = open_run_data(run_dir)
    cfg, dataset, split = data.cfg, data.dataset, dict(data.splits)
    model = load_model(run_dir)
    feats = frozen_features(data, model)
    weights = None if model.bit_weights is None else model.bit_weights.numpy()
    directions = ("i2t", "t2i", "i2i", "t2t")
    if dataset.info.relevance == RELEVANCE_IMAGE:
        # "same item" relevance: each query image is matched against the query items' texts
        # (and vice versa), as in the usual Flickr30k / COCO caption protocols
        split["database"], directions = split["query"], ("i2t", "t2i")
    q = continuous_codes(model, dataset, split["query"], feats)
    db = continuous_codes(model, dataset, split["database"], feats)
    target = relevance_args(dataset.labels_matrix(), split["query"], split["database"])
    opts = {"ks": ks, "tie_aware": tie_aware, "directions": directions}

    def score(qi, qt, di, dt, **extra: Any) -> dict[str, Any]:
        arrays = {"query_image": qi, "query_text": qt, "db_image": di, "db_text": dt}
        return evaluate_directions(arrays, **target, **opts, **extra)

    signs = [sign(a) for a in (q["image"], q["text"], db["image"], db["text"])]
    rows = {"hash": score(*signs, bit_weights=weights)}
    rows["float (cosine)"] = score(q["image"], q["text"], db["image"], db["text"], metric="cosine")
    if baselines and all(feats[m] is not None for m in MODALITIES):
        train = split["train"]
        for name, label in (("lsh", "LSH (CCA)"), ("cca_itq", "CCA-ITQ")):
            base = fit_baseline(name, feats["image"][train].numpy(), feats["text"][train].numpy(), model.bits)
            enc = [base.encode_image(feats["image"][split[s]].numpy()) for s in ("query", "database")]
            txt = [base.encode_text(feats["text"][split[s]].numpy()) for s in ("query", "database")]
            rows[label] = score(enc[0], txt[0], enc[1], txt[1])
    title = (
        f"Evaluation of {run_dir.name}: {cfg.data.name}, {cfg.model.image_tower} + {cfg.model.text_tower}, "
    )
    title += f"{cfg.loss.name}, {model.bits} bits"
    summary = {r: {d: round(float(m["map"]), 4) for d, m in v.items()} for r, v in rows.items()}
    with RunUpdate(run_dir) as update:  # the report and its plots, then the manifest that lists them
        write_run_report(rows, update.path(EVAL_FILES[0]).parent, title=title)
        update.commit(eval={
            "map": summary, "seconds": round(time.perf_counter() - started, 2),
            "n_query": int(len(split["query"])), "n_db": int(len(split["database"]))})  # fmt: skip
    return rows


def summary_table(rows: dict[str, Any]) -> str:
    """A compact text table of mAP@all (and P@100) per row and direction."""
    dirs = [d for d in ("i2t", "t2i", "i2i", "t2t") if any(d in v for v in rows.values())]
    head = f"{'':<16}" + "".join(f"{d + ' mAP':>10}{d + ' P@100':>11}" for d in dirs)
    lines = [head]
    known = ["hash", "float (cosine)", "LSH (CCA)", "CCA-ITQ"]  # metrics.json stores rows sorted by name
    for name, metrics in sorted(rows.items(), key=lambda kv: known.index(kv[0]) if kv[0] in known else 99):
        cells = "".join(
            f"{metrics[d]['map']:>10.4f}{metrics[d].get('p@100', float('nan')):>11.4f}"
            for d in dirs
            if d in metrics
        )
        lines.append(f"{name:<16}{cells}")
    return "\n".join(lines)
