"""The index job: encode a run's database items and write its indexes and metadata store.

Text entries: for labelled datasets each item has one text (its captions joined), whose
text id is the item id; for captions-only datasets ("same image" relevance) every caption
is its own entry in the text index and maps to its item in the store. Images stored
inline in a dataset are written as thumbnails under ``<run>/images/`` so that the run
folder alone serves them.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from crossmodal.codes import pack_codes
from crossmodal.data import RELEVANCE_IMAGE, CrossModalDataset, open_dataset
from crossmodal.features import join_captions
from crossmodal.images import ImageDecodeError, open_image
from crossmodal.index import BinaryIndex, create_index
from crossmodal.io import atomic_path
from crossmodal.models.hasher import TwoTowerHasher
from crossmodal.runs.encode import encode_items, frozen_features, open_run_data
from crossmodal.runs.folder import RunUpdate, check_run, recover_run
from crossmodal.runs.model import load_model
from crossmodal.store import MetadataStore

log = logging.getLogger(__name__)

THUMB_SIDE = 256


def text_units(
    dataset: CrossModalDataset, indices: np.ndarray, first_text_id: int = 0
) -> list[dict[str, Any]]:
    """Text entries of ``indices``: one per item (labelled data) or one per caption.

    An item without a caption (and without bag-of-words text) gets no entry: it is an
    image-only item, found by images, never returned as an empty caption.
    """
    caps = dataset.captions_of(indices)
    out: list[dict[str, Any]] = []
    per_caption = dataset.info.relevance == RELEVANCE_IMAGE
    next_id = first_text_id
    for item, captions in zip(indices, caps):
        if per_caption:
            for cap in captions:
                out.append({"text_id": next_id, "item_id": int(item), "caption": cap})
                next_id += 1
        elif captions or dataset.info.bow_dim:
            out.append({"text_id": int(item), "item_id": int(item), "caption": join_captions(captions)})
    return out


def thumbnail_bytes(data: bytes) -> bytes:
    """A PNG of at most ``THUMB_SIDE`` px a side, on white: ``data`` itself when it already is one.

    Raises:
        ImageDecodeError: ``data`` is not a readable image.
    """
    try:  # an opaque PNG small enough is kept as it is (OpenMoji's renders): one decode, no encode
        img = Image.open(io.BytesIO(data))
        if img.format == "PNG" and max(img.size) <= THUMB_SIDE:
            img.load()  # decodes fully: a corrupt image falls through to open_image, which says why
            alpha = img.getchannel("A").getextrema() if img.mode == "RGBA" else None
            if img.mode in ("RGB", "L") or alpha == (255, 255):
                return data
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        pass
    buf = io.BytesIO()
    open_image(data, max_side=THUMB_SIDE).save(buf, format="PNG")
    return buf.getvalue()


def write_thumbnails(
    dataset: CrossModalDataset, indices: np.ndarray, run_dir: Path, ids: np.ndarray, overwrite: bool = False
) -> list[str]:
    """Image paths for the store: the original files, or thumbnails of inline images.

    An existing thumbnail is kept unless ``overwrite`` (new ids may meet thumbnails left by
    an interrupted run whose store was rolled back).
    """
    paths = []
    written = 0
    for item_id, row in zip(ids, dataset.image_rows(indices)):
        if not row["image_bytes"]:
            paths.append(str((Path(dataset.info.image_root) / row["image_path"]).resolve()))
            continue
        rel = f"images/{int(item_id)}.png"
        target = run_dir / rel
        # an empty file is what a power cut can leave of one renamed before it was flushed
        if overwrite or not target.exists() or target.stat().st_size == 0:
            try:
                data = thumbnail_bytes(row["image_bytes"])
                with atomic_path(target, fsync=False) as tmp:
                    tmp.write_bytes(data)
                written += 1
            except ImageDecodeError as exc:
                log.warning("item %s: %s", row["id"], exc)
                rel = ""
        paths.append(rel)
    if written and hasattr(os, "sync"):
        os.sync()  # the thumbnails reach the disk before the store that names them is committed
    return paths


def index_run(
    run_dir: str | os.PathLike[str],
    kind: str | None = None,
    params: dict[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Encode the database split of a trained run and write its indexes, store and manifest.

    Raises:
        RunError: the run is untrained or damaged, or its dataset changed since training.
    """
    run_dir = Path(run_dir)
    recover_run(run_dir)
    started = time.perf_counter()
    data = open_run_data(run_dir)
    cfg, dataset = data.cfg, data.dataset
    kind = kind or cfg.index.kind
    params = {**cfg.index.params, **(params or {})} if kind == cfg.index.kind else dict(params or {})
    model = load_model(run_dir)
    db = data.splits["database"]
    feats = frozen_features(data, model)
    units = text_units(dataset, db)
    per_caption = dataset.info.relevance == RELEVANCE_IMAGE
    text_ids = np.array([u["text_id"] for u in units], dtype=np.int64)
    image_index = build_index(
        kind, model.bits, params, model, dataset, db, "image", feats["image"], None, db, progress
    )
    unit_texts = [u["caption"] for u in units] if per_caption or feats["text"] is None else None
    text_items = np.array([u["item_id"] for u in units], dtype=np.int64)  # the items with a text entry
    text_index = build_index(
        kind, model.bits, params, model, dataset, text_items, "text", feats["text"], unit_texts, text_ids,
        progress,
    )  # fmt: skip
    with RunUpdate(run_dir) as update:  # all four files replace the old ones together
        image_index.save(update.path("image.index"))
        text_index.save(update.path("text.index"))
        write_store(run_dir, dataset, db, units, update.path("store.sqlite"))
        seconds = time.perf_counter() - started
        info = {"kind": kind, "params": image_index.params, "items": int(image_index.ntotal),
                "texts": int(text_index.ntotal), "seconds": round(seconds, 2),
                "text_units": "caption" if per_caption else "item"}  # fmt: skip
        update.commit(index=info)
    log.info("indexed %d images and %d texts in %.1f s", info["items"], info["texts"], seconds)
    return info


def build_index(
    kind: str,
    bits: int,
    params: dict[str, Any],
    model: TwoTowerHasher,
    dataset: CrossModalDataset,
    indices: np.ndarray,
    modality: str,
    features: torch.Tensor | None,
    texts: list[str] | None,
    ids: np.ndarray,
    progress: bool,
) -> BinaryIndex:
    index = create_index(kind, bits, **params)
    chunks = encode_items(model, dataset, indices, modality, features, texts, progress=progress)
    if kind == "ivf":  # IVF trains on the codes first; they are small (bits / 8 bytes each)
        packed = np.concatenate([pack_codes(c.numpy()) for _, c in chunks])
        index.train(packed)
        index.add(packed, ids)
        return index
    for pos, codes in chunks:
        index.add(pack_codes(codes.numpy()), ids[pos])
    return index


def write_store(
    run_dir: Path,
    dataset: CrossModalDataset,
    indices: np.ndarray,
    units: list[dict],
    path: Path | None = None,
) -> None:
    """Write the store (at ``path``, default ``run_dir/store.sqlite``) and the thumbnails it names."""
    labels = dataset.labels_matrix()
    names = dataset.info.label_names
    paths = write_thumbnails(dataset, indices, run_dir, indices)
    keys = dataset.ids_of(indices)
    items = (
        {
            "item_id": int(i),
            "key": key,
            "image_path": path,
            "labels": [names[j] for j in np.flatnonzero(labels[i])] if labels.shape[1] else [],
            "source": dataset.name,
        }
        for i, key, path in zip(indices, keys, paths)
    )
    MetadataStore.build(
        path or run_dir / "store.sqlite", items, units, meta={"label_names": names, "dataset": dataset.name}
    ).close()


def add_to_run(
    run_dir: str | os.PathLike[str], source: str, options: dict[str, Any] | None = None, progress: bool = True
) -> dict[str, Any]:
    """Add every item of a dataset (a registered name, or an image folder) to a run's indexes.

    New items get ids after the largest in the store; nothing is retrained. The indexes,
    the store and the manifest are replaced together (``RunUpdate``): a crash leaves the run
    as it was or, within the renames, refused until the command is run again.
    """
    run_dir = Path(run_dir)
    recover_run(run_dir)
    manifest = check_run(run_dir, need=("model.safetensors", "image.index", "text.index", "store.sqlite"))
    options = dict(options or {})
    name = source
    if Path(source).is_dir():
        name, options = "imagefolder", {"root": str(Path(source).resolve()), **options}
    dataset = open_dataset(name, options)
    model = load_model(run_dir)
    indexes = {
        m: BinaryIndex.load(run_dir / f"{m}.index", expected_bits=model.bits) for m in ("image", "text")
    }
    with MetadataStore.open(run_dir / "store.sqlite") as store:
        first_item, first_text = store.max_item_id() + 1, store.max_text_id() + 1
    positions = np.arange(len(dataset))
    units = text_units(dataset, positions)
    per_caption = (
        dataset.info.relevance == RELEVANCE_IMAGE or manifest["index"].get("text_units") == "caption"
    )
    if per_caption:
        units = [{**u, "text_id": first_text + j} for j, u in enumerate(units)]
    for u in units:
        u["item_id"] += first_item
        if not per_caption:
            u["text_id"] = u["item_id"]
    item_ids = positions + first_item
    texts = [u["caption"] for u in units]
    for pos, codes in encode_items(model, dataset, positions, "image", progress=progress):
        indexes["image"].add(pack_codes(codes.numpy()), item_ids[pos])
    text_ids = np.array([u["text_id"] for u in units], dtype=np.int64)
    for pos, codes in encode_items(model, dataset, positions, "text", texts=texts, progress=progress):
        indexes["text"].add(pack_codes(codes.numpy()), text_ids[pos])
    paths = write_thumbnails(dataset, positions, run_dir, item_ids, overwrite=True)
    keys = dataset.ids
    items = [{"item_id": int(i), "key": k, "image_path": p, "labels": [], "source": dataset.name}
             for i, k, p in zip(item_ids, keys, paths)]  # fmt: skip
    info = {**manifest["index"], "items": int(indexes["image"].ntotal), "texts": int(indexes["text"].ntotal)}
    info["added"] = [*info.get("added", []), {"source": source, "items": len(items), "texts": len(units)}]
    with RunUpdate(run_dir) as update:
        for m in ("image", "text"):
            indexes[m].save(update.path(f"{m}.index"))
        shutil.copyfile(run_dir / "store.sqlite", update.path("store.sqlite"))
        with MetadataStore.open(update.path("store.sqlite"), readonly=False) as store:
            store.add_items(items)
            store.add_texts(units)
        update.commit(index=info)
    return {"added_items": len(items), "added_texts": len(units), **info}
