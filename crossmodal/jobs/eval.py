"""The eval job: score a trained run on its query split, beside its float upper bound and
classical baselines, measure what a user of its search sees, and write ``eval/metrics.json``
and ``eval/report.md``.

Rows of the report:
    hash           the run's binary codes ranked by Hamming distance (weighted, if the
                   run learned bit weights)
    float (cosine) the same model's continuous outputs ranked by cosine similarity
    LSH (CCA)      random hyperplanes on CCA-aligned frozen features (when both towers
    CCA-ITQ        are frozen), fitted on the run's training split

Runs whose towers are the two halves of one dual encoder (``clip:``) get three zero-shot
rows, the towers' own pretrained embeddings with no training at all, to show what training
adds and what hashing costs:
    zero-shot float (cosine)  the embeddings ranked by cosine similarity
    zero-shot LSH             random hyperplanes, each modality centred by its database mean
    zero-shot ITQ             ITQ fitted on the database images' embeddings, texts centred by
                              the mean of the database captions: the codes of a
                              ``train.mode: zeroshot`` run (``baselines.shared_itq``)

Queries are the query split; the database is the database split and relevance is
"shares a label". For captions-only data relevance is "same item", and the query items'
texts (images) form the database of the image (text) queries: i2t and t2i only.

Sections beside the rows (``metrics.json`` keys ``keyword`` and ``codes``):
    keyword  each concept word of the dataset (a label name that is one word) typed as a
             text query: precision@10 of the images whose captions hold the word, over the
             database split (what the app searches) and over the query split (never trained on);
             in runs with zero-shot rows, also of the zero-shot ITQ codes (``keyword.zero_shot``)
    codes    the database codes: distinct codes, the largest group sharing one code, mean
             per-bit entropy, and each database image's rank when its own code is the query

``transfer_run`` scores the run on another dataset whose labels match the run's by name and
writes ``eval/transfer-<dataset>.json`` and a section of the report.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crossmodal.baselines import Baseline, fit_baseline, shared_itq, shared_lsh
from crossmodal.codes import sign
from crossmodal.data import RELEVANCE_IMAGE, CrossModalDataset, open_dataset
from crossmodal.data.splits import make_splits
from crossmodal.evaluate import (
    DIRECTIONS,
    code_statistics,
    concept_words,
    evaluate_directions,
    keyword_precision,
    rank_top_k,
    relevance_args,
    self_rank,
    word_relevance,
)
from crossmodal.io import write_json_atomic
from crossmodal.models.hasher import TwoTowerHasher
from crossmodal.report import metric_rows, ndcg_key, to_jsonable, write_run_report
from crossmodal.runs.encode import (
    RunData,
    ZeroShot,
    continuous_codes,
    dataset_features,
    encode_texts,
    frozen_features,
    open_run_data,
    zero_shot_features,
)
from crossmodal.runs.folder import EVAL_FILES, RunUpdate, lock_run, read_manifest
from crossmodal.runs.model import MODALITIES, load_model
from crossmodal.runs.state import is_evaluated
from crossmodal.text import QueryError

log = logging.getLogger(__name__)

KEYWORD_K = 10  # a results page
TOP_SHOWN = 3  # captions of the top results shown per word in the report
OWN_RANK_KS = (1, 10)
TRANSFER_PREFIX = "eval/transfer-"
ZERO_SHOT_ROWS = ("zero-shot float (cosine)", "zero-shot LSH", "zero-shot ITQ")
# the report's row order (metrics.json stores rows sorted by name)
ROW_ORDER = ("hash", "float (cosine)", "LSH (CCA)", "CCA-ITQ", *ZERO_SHOT_ROWS)


def eval_run(
    run_dir: str | os.PathLike[str],
    baselines: bool = True,
    ks: tuple[int, ...] = (100,),
    tie_aware: bool = True,
) -> dict[str, Any]:
    """Evaluate ``run_dir`` in all four directions, and what its search shows a user.

    Returns:
        What ``eval/metrics.json`` holds: ``{row: {direction: metrics}}``, plus the sections
        ``codes`` and ``keyword`` (the latter only when the dataset has concept words).

    Raises:
        RunError: the run is untrained or damaged, or its dataset changed since training.
        RunBusyError: another process is writing the run.
    """
    with lock_run(run_dir, f"crossmodal eval --run {run_dir}"):
        return _eval_run(run_dir, baselines, ks, tie_aware)


def _eval_run(run_dir: str | os.PathLike[str], baselines: bool, ks: tuple[int, ...],
              tie_aware: bool) -> dict[str, Any]:  # fmt: skip
    run_dir = Path(run_dir)
    started = time.perf_counter()
    data = open_run_data(run_dir)
    model = load_model(run_dir)
    feats = frozen_features(data, model)
    split, directions = dict(data.splits), DIRECTIONS
    same_item = data.dataset.info.relevance == RELEVANCE_IMAGE
    if not data.dataset.info.bow_dim and not any(data.dataset.captions_of(split["query"])):
        log.warning("%s: no query item has a caption, so every row's text side scores empty texts and "
                    "means nothing (the image codes section still holds)", run_dir)
    if same_item:
        # "same item" relevance: each query image is matched against the query items' texts
        # (and vice versa), as in the usual Flickr30k / COCO caption protocols
        split["database"], directions = split["query"], ("i2t", "t2i")
    q = continuous_codes(model, data.dataset, split["query"], feats)
    db = continuous_codes(model, data.dataset, split["database"], feats)
    opts = {"ks": ks, "tie_aware": tie_aware, "directions": directions}
    rows = _score_rows(data, model, feats, split, q, db, opts, baselines)
    images = {"database": (split["database"], sign(db["image"]))}
    if not same_item:
        images["query"] = (split["query"], sign(q["image"]))
    keyword = keyword_eval(model, data.dataset, images, _bit_weights(model))
    zero = zero_shot_features(data, model, feats)
    if zero is not None:
        itq = _zero_shot_rows(data, zero, split, model.bits, opts, rows)
        zero_keyword = None if keyword is None or itq is None else \
            zero_shot_keyword(model, data.dataset, zero, itq, split, same_item)  # fmt: skip
        if zero_keyword is not None:
            keyword["zero_shot"] = zero_keyword
    codes = code_report(sign(db["image"]), sign(db["text"]), _bit_weights(model))
    summary = {r: {d: round(float(m["map"]), 4) for d, m in v.items()} for r, v in rows.items()}
    info = {"map": summary, "n_query": int(len(split["query"])), "n_db": int(len(split["database"]))}
    if keyword and "database" in keyword:
        info[f"keyword_p@{KEYWORD_K}"] = {s: round(keyword[s][f"p@{KEYWORD_K}"], 4)
                                          for s in ("database", "query") if s in keyword}  # fmt: skip
    with RunUpdate(run_dir) as update:  # the report and its plots, then the manifest that lists them
        write_run_report(rows, update.path(EVAL_FILES[0]).parent, title=_title(data, model), keyword=keyword,
                         codes=codes, transfers=saved_transfers(run_dir))  # fmt: skip
        update.commit(eval={**info, "seconds": round(time.perf_counter() - started, 2)})
    return {**rows, **({"keyword": keyword} if keyword is not None else {}), "codes": codes}


def _zero_shot_rows(data: RunData, zero: ZeroShot, split: dict[str, np.ndarray], bits: int,
                    opts: dict[str, Any], rows: dict[str, Any]) -> Baseline | None:  # fmt: skip
    """Add the zero-shot rows to ``rows``; returns the ITQ codes' baseline (None when it cannot be fitted)."""
    target = relevance_args(data.dataset.labels_matrix(), split["query"], split["database"])
    emb = {(s, m): zero.features[m][torch.as_tensor(split[s])].numpy() for s in ("query", "database")
           for m in MODALITIES}  # fmt: skip

    def score(hasher: Baseline | None) -> dict[str, Any]:
        arrays = {f"{'db' if s == 'database' else s}_{m}": (emb[s, m] if hasher is None else
                  (hasher.encode_image if m == "image" else hasher.encode_text)(emb[s, m]))
                  for s in ("query", "database") for m in MODALITIES}  # fmt: skip
        cosine = {"metric": "cosine"} if hasher is None else {}
        return evaluate_directions(arrays, **target, **opts, **cosine)

    seed = data.cfg.train.seed
    rows[ZERO_SHOT_ROWS[0]] = score(None)
    rows[ZERO_SHOT_ROWS[1]] = score(shared_lsh(emb["database", "image"], emb["database", "text"], bits, seed))
    captioned = np.array([bool(c) for c in data.dataset.captions_of(split["database"])], dtype=bool)
    try:  # the text mean of a zero-shot run: its database items' captions
        itq = shared_itq(emb["database", "image"], emb["database", "text"][captioned], bits, seed)
    except ValueError as exc:
        log.warning("no zero-shot ITQ row: %s", exc)
        return None
    rows[ZERO_SHOT_ROWS[2]] = score(itq)
    return itq


def zero_shot_keyword(model: TwoTowerHasher, dataset: CrossModalDataset, zero: ZeroShot, itq: Baseline,
                      split: dict[str, np.ndarray], same_item: bool) -> dict[str, Any] | None:  # fmt: skip
    """Keyword precision of the zero-shot ITQ codes, words embedded by the pretrained text tower
    (``keyword_eval``'s means per split; per-word details are left out)."""
    images = {"database": (split["database"], itq.encode_image(zero.features["image"][split["database"]]))}
    if not same_item:
        images["query"] = (split["query"], itq.encode_image(zero.features["image"][split["query"]]))

    @torch.no_grad()
    def encode(words: list[str]) -> np.ndarray:
        tower = zero.text_tower
        parts = [tower(**tower.tokenize(words[s : s + 256])).float().numpy()
                 for s in range(0, len(words), 256)]  # fmt: skip
        return itq.encode_text(np.concatenate(parts))

    out = keyword_eval(model, dataset, images, None, encode=encode)
    return None if out is None else {k: v for k, v in out.items() if k != "words"}


def _bit_weights(model: TwoTowerHasher) -> np.ndarray | None:
    return None if model.bit_weights is None else model.bit_weights.numpy()


def _title(data: RunData, model: TwoTowerHasher) -> str:
    cfg = data.cfg
    return (f"Evaluation of {data.run_dir.name}: {cfg.data.name}, {cfg.model.image_tower} + "
            f"{cfg.model.text_tower}, {cfg.loss.name}, {model.bits} bits")  # fmt: skip


def _score_rows(data: RunData, model: TwoTowerHasher, feats: dict[str, Any], split: dict[str, np.ndarray],
                q: dict[str, np.ndarray], db: dict[str, np.ndarray], opts: dict[str, Any],
                baselines: bool) -> dict[str, Any]:
    """The rows: hash codes, the float upper bound and (frozen towers) the LSH and CCA-ITQ baselines."""
    target = relevance_args(data.dataset.labels_matrix(), split["query"], split["database"])

    def score(qi, qt, di, dt, **extra: Any) -> dict[str, Any]:
        arrays = {"query_image": qi, "query_text": qt, "db_image": di, "db_text": dt}
        return evaluate_directions(arrays, **target, **opts, **extra)

    signs = [sign(a) for a in (q["image"], q["text"], db["image"], db["text"])]
    rows = {"hash": score(*signs, bit_weights=_bit_weights(model))}
    rows["float (cosine)"] = score(q["image"], q["text"], db["image"], db["text"], metric="cosine")
    if baselines and all(feats[m] is not None for m in MODALITIES):
        train = split["train"]
        for name, label in (("lsh", "LSH (CCA)"), ("cca_itq", "CCA-ITQ")):
            x, y = feats["image"][train].numpy(), feats["text"][train].numpy()
            try:
                base = fit_baseline(name, x, y, model.bits)
            except ValueError as exc:  # CCA-ITQ needs as many canonical directions as bits
                log.warning("no %s row: %s", label, exc)
                continue
            enc = [base.encode_image(feats["image"][split[s]].numpy()) for s in ("query", "database")]
            txt = [base.encode_text(feats["text"][split[s]].numpy()) for s in ("query", "database")]
            rows[label] = score(enc[0], txt[0], enc[1], txt[1])
    return rows


# ----------------------------------------------------------------------------------------
# What a user sees
# ----------------------------------------------------------------------------------------
def keyword_eval(
    model: TwoTowerHasher,
    dataset: CrossModalDataset,
    images: Mapping[str, tuple[np.ndarray, np.ndarray]],
    bit_weights: np.ndarray | None = None,
    k: int = KEYWORD_K,
    encode: Callable[[list[str]], np.ndarray] | None = None,
) -> dict[str, Any] | None:
    """Keyword precision@k: each concept word typed as a text query against the images of each split.

    Args:
        model: the run's model; words are encoded as the search engine encodes a query.
        dataset: its label names give the words, its captions the relevance.
        images: ``{"database": (positions, image codes), "query": ...}``: the images searched.
        bit_weights: the model's per-bit weights, if any (weighted Hamming).
        k: the cut-off.
        encode: words -> codes ``[n, bits]`` (default: the model, as the search engine encodes a query).

    Returns:
        ``{"k", "n_words", "refused", "database": means, "query": means, "words": [per word]}``
        (``keyword_precision`` means; per word: relevant items and P@k per split, and the first
        caption of the top database results), or None when the dataset has no concept word.
    """
    words = concept_words(dataset.info.label_names or [])
    if not words:
        return None
    usable, refused = _typable(model, words)
    out: dict[str, Any] = {"k": k, "direction": "t2i", "n_words": len(usable), "refused": refused,
                           "words": []}  # fmt: skip
    if not usable:
        return out
    codes = encode_texts(model, usable) if encode is None else encode(usable)  # [n_words, bits]
    relevance = word_relevance(dataset.captions_of(), usable)  # [n_words, n_items]
    per_word: list[dict[str, Any]] = [{"word": w} for w in usable]
    for name, (idx, img) in images.items():
        res = keyword_precision(codes, img, relevance[:, idx], k, bit_weights=bit_weights)
        per, tag = res.pop("per_word"), "db" if name == "database" else name
        out[name] = res
        for row, n_rel, p in zip(per_word, per["n_relevant"], per[f"p@{k}"], strict=True):
            row[f"n_relevant_{tag}"] = int(n_rel)
            row[f"p@{k}_{tag}"] = float(p) if n_rel else None
    db_idx, db_img = images["database"]
    top, _ = rank_top_k(codes, db_img, TOP_SHOWN, bit_weights=bit_weights)  # [n_words, 3]
    first = [c[0] if len(c) else "" for c in dataset.captions_of(db_idx[top.ravel()])]
    for row, shown in zip(per_word, np.array(first, dtype=object).reshape(top.shape), strict=True):
        row["top"] = list(shown)
    out["words"] = per_word
    log.info("keyword P@%d over %d words: %s", k, len(usable),
             {s: round(out[s][f"p@{k}"], 4) for s in images})  # fmt: skip
    return out


def _typable(model: TwoTowerHasher, words: list[str]) -> tuple[list[str], list[str]]:
    """The words the text tower accepts as queries, and those it refuses (``QueryError``: a
    vocabulary tower that does not know the word, as the search box would say)."""
    usable, refused = [], []
    for word in words:
        try:
            model.text_tower.check_query(word)
            usable.append(word)
        except QueryError:
            refused.append(word)
    return usable, refused


def code_report(image_codes: np.ndarray, text_codes: np.ndarray,
                bit_weights: np.ndarray | None = None) -> dict[str, Any]:
    """Statistics of the database codes (``code_statistics`` per modality) and the own-image rank
    (``self_rank`` of the image codes, ranked as the search ranks them)."""
    n, bits = image_codes.shape
    return {"n_db": int(n), "bits": int(bits), "image": code_statistics(image_codes),
            "text": code_statistics(text_codes),
            "own_image_rank": self_rank(image_codes, OWN_RANK_KS, bit_weights=bit_weights)}  # fmt: skip


# ----------------------------------------------------------------------------------------
# Transfer: the run's model on another dataset
# ----------------------------------------------------------------------------------------
def transfer_run(
    run_dir: str | os.PathLike[str],
    dataset: str,
    options: Mapping[str, Any] | None = None,
    baselines: bool = True,
    ks: tuple[int, ...] = (100,),
    tie_aware: bool = True,
) -> dict[str, Any]:
    """Score a trained run on another dataset whose labels match the run's by name.

    Protocol: the other dataset's own default splits (``make_splits``, seed 0); its query
    split queries its database split in the four directions. Relevant: shares one of the
    labels both datasets name alike (``subgroup:face-smiling`` in both). Queries carrying
    none of them cannot be judged and are left out; database items without one stay, as
    distractors. The run's own query split and database are scored with the same relevance
    ("in-domain, matched labels"), and ``ratio`` is transfer mAP / that, per direction.

    Writes ``eval/transfer-<dataset name>.json`` and rewrites ``eval/report.md`` with a section
    per transfer (the run is evaluated first when it is not).

    Args:
        run_dir: a trained run.
        dataset: a dataset name (``imagefolder``...), opened with ``options`` (``{"root": ...}``).
        baselines, ks, tie_aware: as ``eval_run`` (baselines only when the run is evaluated here).

    Raises:
        ValueError: the other dataset has no labels, none matches the run's by name, or its text
            comes as another bag-of-words.
        RunError: the run is untrained or damaged, or its dataset changed since training.
        RunBusyError: another process is writing the run.
    """
    with lock_run(run_dir, f"crossmodal eval --run {run_dir} --on {dataset}"):
        return _transfer_run(run_dir, dataset, options, baselines, ks, tie_aware)


def _transfer_run(run_dir: str | os.PathLike[str], dataset: str, options: Mapping[str, Any] | None,
                  baselines: bool, ks: tuple[int, ...], tie_aware: bool) -> dict[str, Any]:  # fmt: skip
    run_dir = Path(run_dir)
    options = dict(options or {})
    if not is_evaluated(run_dir):
        eval_run(run_dir, baselines=baselines, ks=ks, tie_aware=tie_aware)
    data = open_run_data(run_dir)
    other = open_dataset(dataset, options)
    # a folder builder's default name says little, and two folders would share it: add the folder's name
    name = other.name
    if name == dataset and options.get("root"):
        name = f"{name}-{Path(str(options['root'])).expanduser().resolve().name}"
    run_cols, other_cols, matched = match_labels(data.dataset, other)
    model = load_model(run_dir)
    opts = {"ks": ks, "tie_aware": tie_aware, "bit_weights": _bit_weights(model)}
    home = _matched_eval(model, data.dataset, data.splits, frozen_features(data, model), run_cols, opts)
    splits = make_splits(other, seed=0)
    away = _matched_eval(model, other, {"query": splits.query, "database": splits.database},
                         dataset_features(data, model, other), other_cols, opts)  # fmt: skip
    metrics = json.loads((run_dir / EVAL_FILES[0]).read_text(encoding="utf-8"))
    result = {
        "dataset": name, "builder": dataset, "options": options, "matched_labels": matched,
        "n_labels_run": len(data.dataset.info.label_names), "n_labels_other": len(other.info.label_names),
        "n_query": away["n_query"], "n_query_unmatched": away["n_query_unmatched"], "n_db": away["n_db"],
        "transfer": away["metrics"], "in_domain": metrics.get("hash", {}),
        "in_domain_matched": home["metrics"],
        "ratio": {d: _ratio(m["map"], home["metrics"][d]["map"]) for d, m in away["metrics"].items()},
    }  # fmt: skip
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "dataset"
    transfers = {**saved_transfers(run_dir), slug: result}
    with RunUpdate(run_dir) as update:
        write_json_atomic(update.path(f"{TRANSFER_PREFIX}{slug}.json"), to_jsonable(result))
        sections = {"keyword": metrics.get("keyword"), "codes": metrics.get("codes")}
        write_run_report(_ordered(metric_rows(metrics)), update.path(EVAL_FILES[0]).parent,
                         title=_title(data, model), transfers=transfers, plots=False, **sections)  # fmt: skip
        update.commit()
    log.info("transfer to %s: mAP ratio %s", name, result["ratio"])
    return result


def _ordered(rows: Mapping[str, Any]) -> dict[str, Any]:
    """Rows in report order (hash first), whatever order they were read in."""
    return dict(sorted(rows.items(), key=lambda kv: ROW_ORDER.index(kv[0]) if kv[0] in ROW_ORDER else 99))


def _ratio(num: float, den: float) -> float | None:
    return float(num) / float(den) if den else None


def match_labels(
    run_data: CrossModalDataset, other: CrossModalDataset
) -> tuple[list[int], list[int], list[str]]:
    """Columns of the labels both datasets name alike: ``(run columns, other columns, names)``.

    Raises:
        ValueError: ``other`` has no labels, or no label name in common, or another bag-of-words.
    """
    theirs = list(other.info.label_names or []) if other.info.relevance != RELEVANCE_IMAGE else []
    ours = list(run_data.info.label_names or [])
    if not theirs:
        raise ValueError(f"{other.name} has no labels; a transfer evaluation needs labels named like the "
                         f"run's ({', '.join(ours[:3]) or 'none'}...)")  # fmt: skip
    if (other.info.bow_dim or 0) != (run_data.info.bow_dim or 0):
        raise ValueError(f"{other.name} comes as a {other.info.bow_dim}-word bag-of-words, the run's "
                         f"dataset as {run_data.info.bow_dim}: the text tower cannot read it")  # fmt: skip
    column = {name: i for i, name in enumerate(theirs)}
    matched = [name for name in ours if name in column]
    if not matched:
        raise ValueError(
            f"no label of {other.name} ({', '.join(theirs[:4])}...) is named like a label of the run's "
            f"dataset {run_data.name} ({', '.join(ours[:4])}...); a transfer evaluation matches labels by "
            "name, e.g. subgroup:face-smiling in both"
        )
    return [ours.index(n) for n in matched], [column[n] for n in matched], matched


def _matched_eval(model: TwoTowerHasher, dataset: CrossModalDataset, split: Mapping[str, np.ndarray],
                  feats: dict[str, Any], cols: list[int], opts: dict[str, Any]) -> dict[str, Any]:
    """Four directions with relevance "shares one of the labels ``cols``"; queries without one left out."""
    labels = dataset.labels_matrix()[:, cols]  # [n_items, n_matched]
    queries = split["query"][labels[split["query"]].any(axis=1)]
    database = split["database"]
    if not len(queries):
        raise ValueError(f"no query item of {dataset.name} carries one of the matched labels")
    q = continuous_codes(model, dataset, queries, feats)
    db = continuous_codes(model, dataset, database, feats)
    arrays = {"query_image": sign(q["image"]), "query_text": sign(q["text"]),
              "db_image": sign(db["image"]), "db_text": sign(db["text"])}  # fmt: skip
    metrics = evaluate_directions(arrays, query_labels=labels[queries], db_labels=labels[database], **opts)
    return {"metrics": metrics, "n_query": int(len(queries)), "n_db": int(len(database)),
            "n_query_unmatched": int(len(split["query"]) - len(queries))}  # fmt: skip


def saved_transfers(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The transfer results the run's manifest lists, ``{dataset: result}`` (for the report)."""
    run_dir = Path(run_dir)
    out = {}
    for name in sorted(read_manifest(run_dir).get("files", {})):
        if name.startswith(TRANSFER_PREFIX) and name.endswith(".json") and (run_dir / name).is_file():
            key = name[len(TRANSFER_PREFIX) : -len(".json")]
            out[key] = json.loads((run_dir / name).read_text(encoding="utf-8"))
    return out


# ----------------------------------------------------------------------------------------
# Text tables for the command line
# ----------------------------------------------------------------------------------------
def summary_table(metrics: Mapping[str, Any]) -> str:
    """A compact text table of mAP@all, NDCG@100 and P@100 per row and direction, then a line each
    for the keyword precision and the database codes when ``metrics`` has those sections."""
    rows = metric_rows(metrics)
    dirs = [d for d in DIRECTIONS if any(d in v for v in rows.values())]
    n_key = ndcg_key({f"{r}/{d}": m[d] for r, m in rows.items() for d in m}) or "ndcg@100"
    width = max([15, *(len(r) + 1 for r in rows)])
    head = f"{'':<{width}}" + "".join(f"{d + ' mAP':>9}{n_key.upper():>9}{'P@100':>7}" for d in dirs)
    lines = [head]
    for name, m in _ordered(rows).items():
        cells = "".join(
            f"{m[d]['map']:>9.4f}{m[d].get(n_key, float('nan')):>9.4f}{m[d].get('p@100', float('nan')):>7.4f}"
            for d in dirs
            if d in m
        )
        lines.append(f"{name:<{width}}{cells}")
    return "\n".join([*lines, *_section_lines(metrics)])


def _section_lines(metrics: Mapping[str, Any]) -> list[str]:
    lines = []
    kw = metrics.get("keyword")
    if isinstance(kw, Mapping) and "database" in kw:
        p = f"p@{kw['k']}"
        parts = [f"{label} {kw[s][p]:.3f} ({kw[s]['n_words']} words, best possible {kw[s]['ceiling']:.3f})"
                 for s, label in (("database", "database"), ("query", "query split")) if s in kw]  # fmt: skip
        lines.append(f"keyword P@{kw['k']} (typed concept words -> images): " + ", ".join(parts))
    codes = metrics.get("codes")
    if isinstance(codes, Mapping) and "image" in codes:
        img, txt, own = codes["image"], codes["text"], codes.get("own_image_rank", {})
        lines.append(
            f"database codes: {img['n_distinct']:,} distinct image codes and {txt['n_distinct']:,} text "
            f"codes of {codes['n_db']:,} (largest groups {img['largest_group']} / {txt['largest_group']}), "
            f"bit entropy {img['bit_entropy']:.2f} / {txt['bit_entropy']:.2f}"
        )
        if own:
            lines.append(f"own image first: {own['top1']:.1%} (tie-aware {own['top1_tie']:.1%}), "
                         f"in the top 10: {own['top10']:.1%} (tie-aware {own['top10_tie']:.1%})")  # fmt: skip
    return lines


def transfer_table(result: Mapping[str, Any]) -> str:
    """A text table of a ``transfer_run`` result: in-domain and transfer mAP per direction, and the ratio."""
    dirs = [d for d in DIRECTIONS if d in result["transfer"]]
    parts = [("in-domain, all labels", result.get("in_domain") or {}),
             ("in-domain, matched", result["in_domain_matched"]),
             ("transfer", result["transfer"])]  # fmt: skip
    lines = [f"transfer to {result['dataset']}: {len(result['matched_labels'])} labels matched by name, "
             f"{result['n_query']} queries, {result['n_db']} database items",
             f"{'':<24}" + "".join(f"{d + ' mAP':>10}" for d in dirs)]  # fmt: skip
    for label, m in parts:
        lines.append(f"{label:<24}" + "".join(
            f"{m[d]['map']:>10.4f}" if d in m else f"{'-':>10}" for d in dirs))  # fmt: skip
    ratio = result.get("ratio", {})
    lines.append(f"{'ratio (matched)':<24}" + "".join(
        f"{ratio[d]:>10.3f}" if ratio.get(d) is not None else f"{'-':>10}" for d in dirs))  # fmt: skip
    return "\n".join(lines)
