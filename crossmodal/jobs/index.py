"""The index job: encode every item of a run's dataset and write its indexes and metadata store.

Text entries: for labelled datasets each item has one text (its captions joined), whose
text id is the item id; for captions-only datasets ("same image" relevance) every caption
is its own entry in the text index and maps to its item in the store. Images stored
inline in a dataset are written as thumbnails under ``<run>/images/`` so that the run
folder alone serves them.

Items can be added later (``add_to_run``, ``crossmodal index --add``: ids after the largest in
the store) and removed (``remove_from_run``, ``--remove``). A re-index keeps both: added items
keep their ids and are re-encoded with the run's model from what the store holds (their image
files or thumbnails, their captions); removed ones of the run's own dataset are listed in the
manifest (``index.removed_keys``) and left out. Every job here holds the run's lock.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import shlex
import shutil
import sqlite3
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch

from crossmodal.codes import pack_codes
from crossmodal.data import (
    RELEVANCE_IMAGE,
    CrossModalDataset,
    DatasetInfo,
    list_datasets,
    make_record,
    open_dataset,
)
from crossmodal.data.records import make_features
from crossmodal.data.shards import NO_IMAGE_KEYS, Shards, find_shards, plan_shards
from crossmodal.features import join_captions
from crossmodal.images import THUMB_SIDE, ImageDecodeError, thumbnail_bytes  # noqa: F401 (re-exported)
from crossmodal.index import BinaryIndex, create_index
from crossmodal.io import atomic_path
from crossmodal.jobs.ray_encode import RayOptions, add_on_ray, add_shards_on_ray, index_on_ray
from crossmodal.models.hasher import TwoTowerHasher
from crossmodal.runs.encode import encode_items, frozen_features, open_run_data
from crossmodal.runs.folder import RunError, RunUpdate, check_run, lock_run, recover_run, verify_files
from crossmodal.runs.model import load_model
from crossmodal.runs.state import INDEX_PARTS
from crossmodal.store import MetadataStore, StoreError
from crossmodal.text import QueryError

log = logging.getLogger(__name__)


def readable_by(tower: Any) -> Callable[[str], bool]:
    """Whether ``tower`` represents a caption at all: the query check of the towers
    (``check_query``) on database captions, so that a caption the model cannot read (only
    combining marks; only emoji for a bag-of-words vocabulary) is never indexed and returned."""
    check = getattr(tower, "check_query", None)

    def readable(text: str) -> bool:
        if check is None:
            return True
        try:
            check(text)
        except QueryError:
            return False
        return True

    return readable


def text_units(
    dataset: CrossModalDataset, indices: np.ndarray, first_text_id: int = 0,
    readable: Callable[[str], bool] | None = None,
) -> list[dict[str, Any]]:  # fmt: skip
    """Text entries of ``indices``: one per item (labelled data) or one per caption.

    An item without a caption (and without bag-of-words text) gets no entry: it is an
    image-only item, found by images, never returned as an empty caption. With
    ``readable`` (``readable_by``), captions it refuses count as no caption; how many is logged.
    """
    caps = dataset.captions_of(indices)
    if readable is not None and not dataset.info.bow_dim:
        kept = [[c for c in captions if readable(c)] for captions in caps]
        dropped = sum(len(a) - len(b) for a, b in zip(caps, kept, strict=True))
        if dropped:
            log.warning("%d captions that the model cannot read (no word it represents) are not indexed; "
                        "their items stay findable by image", dropped)  # fmt: skip
        caps = kept
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
    command: str | None = None,
    ray: RayOptions | None = None,
) -> dict[str, Any]:
    """Encode every item of a trained run's dataset (the query split too: evaluation keeps its
    split apart), and the items added to it, into new indexes, store and manifest.

    Items added with ``add_to_run`` are kept with their ids, re-encoded with the run's model
    from what the store holds; items removed with ``remove_from_run`` stay removed.

    Args:
        command: the command line recorded in the run's lock and journal (default: the
            ``crossmodal index`` line that does this).
        ray: encode on a Ray cluster (``crossmodal.jobs.ray_encode``) instead of in this process.

    Raises:
        RunError: the run is untrained or damaged, its dataset changed since training, or
            images of added items are gone.
        RunBusyError: another process is writing the run.
    """
    run_dir = Path(run_dir)
    default = f"crossmodal index --run {run_dir}" + (f" --kind {kind}" if kind else "")
    with lock_run(run_dir, command or default):
        recover_run(run_dir)
        return _index(run_dir, kind, params, progress, ray)


def _index(run_dir: Path, kind: str | None, params: dict[str, Any] | None, progress: bool,
           ray: RayOptions | None = None) -> dict[str, Any]:  # fmt: skip
    started = time.perf_counter()
    data = open_run_data(run_dir)
    cfg, dataset = data.cfg, data.dataset
    kind = kind or cfg.index.kind
    params = {**cfg.index.params, **(params or {})} if kind == cfg.index.kind else dict(params or {})
    model = load_model(run_dir)
    previous = data.manifest.get("index") or {}
    # every item of the dataset is served, the query split too: evaluation keeps its own
    # query/database split and encodes it itself, so a user's whole collection is searchable
    served = np.arange(len(dataset), dtype=np.int64)
    db = without_keys(dataset, served, previous.get("removed_keys") or [])
    units = text_units(dataset, db, readable=readable_by(model.text_tower))
    per_caption = dataset.info.relevance == RELEVANCE_IMAGE
    text_ids = np.array([u["text_id"] for u in units], dtype=np.int64)
    added = stored_additions(run_dir, data.manifest, served, text_ids)
    if ray is not None:
        images = stored_images(run_dir, added.items) if added.items else None
        image_index, text_index = index_on_ray(run_dir, ray, kind, params, model, dataset, db, units, added,
                                               images)  # fmt: skip
        return _write_index(run_dir, dataset, db, units, added, previous, image_index, text_index, started)
    feats = frozen_features(data, model)
    image_index = build_index(
        kind, model.bits, params, model, dataset, db, "image", feats["image"], None, db, progress
    )
    unit_texts = [u["caption"] for u in units] if per_caption or feats["text"] is None else None
    text_items = np.array([u["item_id"] for u in units], dtype=np.int64)  # the items with a text entry
    text_index = build_index(
        kind, model.bits, params, model, dataset, text_items, "text", feats["text"], unit_texts, text_ids,
        progress,
    )  # fmt: skip
    if added.items:  # re-encoded with the run's model, under the ids they have
        encode_into(model, image_index, "image", [it["item_id"] for it in added.items],
                    stored_images(run_dir, added.items), progress=progress)  # fmt: skip
        encode_into(model, text_index, "text", [t["text_id"] for t in added.texts],
                    texts=[t["caption"] for t in added.texts], progress=progress)  # fmt: skip
    return _write_index(run_dir, dataset, db, units, added, previous, image_index, text_index, started)


def _write_index(
    run_dir: Path, dataset: CrossModalDataset, db: np.ndarray, units: list[dict[str, Any]], added: Additions,
    previous: dict[str, Any], image_index: BinaryIndex, text_index: BinaryIndex, started: float,
) -> dict[str, Any]:  # fmt: skip
    """The journaled update of a whole index job: both indexes, the store and the manifest's entry."""
    kind = image_index.kind
    per_caption = dataset.info.relevance == RELEVANCE_IMAGE
    with RunUpdate(run_dir) as update:  # all four files replace the old ones together
        image_index.save(update.path("image.index"))
        text_index.save(update.path("text.index"))
        write_store(run_dir, dataset, db, units, update.path("store.sqlite"), added.items, added.texts)
        if added.stamps:  # what --sync compares a folder with
            with MetadataStore.open(update.path("store.sqlite"), readonly=False) as store:
                store.set_stamps(added.stamps)
        seconds = time.perf_counter() - started
        info = {"kind": kind, "params": image_index.params, "items": int(image_index.ntotal),
                "texts": int(text_index.ntotal), "seconds": round(seconds, 2),
                "text_units": "caption" if per_caption else "item"}  # fmt: skip
        kept = ("removed", "removed_keys", *(() if added.lost else ("added", "removed_added")))
        info.update({key: previous[key] for key in kept if previous.get(key)})
        update.commit(index=info)
    log.info("indexed %d images and %d texts in %.1f s", info["items"], info["texts"], seconds)
    return info


def without_keys(dataset: CrossModalDataset, indices: np.ndarray, keys: list[str]) -> np.ndarray:
    """``indices`` without the items whose key is in ``keys`` (the run's own items removed from it)."""
    if not keys:
        return indices
    drop = set(keys)
    return indices[np.array([k not in drop for k in dataset.ids_of(indices)], dtype=bool)]


@dataclass
class Additions:
    """The items added to a run (``add_to_run``) as its store holds them: store rows of items and texts.

    ``lost``: the run lists added items but its store could not be read back.
    """

    items: list[dict[str, Any]] = field(default_factory=list)
    texts: list[dict[str, Any]] = field(default_factory=list)
    lost: bool = False
    stamps: list[dict[str, Any]] = field(default_factory=list)


def stored_additions(
    run_dir: Path, manifest: dict[str, Any], database: np.ndarray, taken_text_ids: np.ndarray
) -> Additions:
    """The added items of the run's current store (those whose id is not a dataset position).

    Per-caption text ids that meet ``taken_text_ids`` (the re-indexed database's) are numbered
    anew after them. A store that is missing or damaged keeps nothing: a warning names the
    ``--add`` commands that bring the items back.

    Raises:
        RunError: image files of added items are gone (they cannot be re-encoded).
    """
    added = (manifest.get("index") or {}).get("added") or []
    sources = [a.get("source") for a in added if isinstance(a, dict)]
    if not sources:
        return Additions()
    try:
        verify_files(run_dir, manifest, ("store.sqlite",))
        with MetadataStore.open(run_dir / "store.sqlite") as store:
            ids = sorted(set(store.item_ids()) - set(database.tolist()))
            items = [it for it in store.get_items(ids) if it is not None]
            texts = [t for group in store.texts_of_items(ids) for t in group]
            stamps = [{"item_id": i, **st} for i, st in store.get_stamps(ids).items()]
    except (RunError, StoreError, sqlite3.DatabaseError) as exc:
        again = "; ".join(f"crossmodal index --run {run_dir} --add {s}" for s in dict.fromkeys(sources))
        log.warning("%s: the items added to the run cannot be read back from its store (%s), so they are "
                    "not re-indexed; add them again with: %s", run_dir, exc, again)  # fmt: skip
        return Additions(lost=True)
    gone = [it["key"] for it in items if it["image_path"] and not (run_dir / it["image_path"]).is_file()]
    if gone:
        raise RunError(
            f"{len(gone)} items added to {run_dir} have lost their image files (e.g. {', '.join(gone[:5])}); "
            f"put them back, or remove the items with: crossmodal index --run {run_dir} --remove KEY ..."
        )
    taken = set(taken_text_ids.tolist())
    if any(t["text_id"] in taken for t in texts):
        first = max(taken) + 1
        texts = [{**t, "text_id": first + j} for j, t in enumerate(texts)]
    return Additions(items, texts, stamps=stamps)


def stored_images(run_dir: Path, items: list[dict[str, Any]]) -> CrossModalDataset:
    """The images of store rows as a dataset (paths absolute, or relative to the run: thumbnails)."""
    rows = [make_record(it["key"], [], image_path=it["image_path"]) for it in items]
    info = DatasetInfo("stored", relevance=RELEVANCE_IMAGE, image_root=str(run_dir))
    return CrossModalDataset(datasets.Dataset.from_list(rows, features=make_features(0)), info)


def encode_into(
    model: TwoTowerHasher,
    index: BinaryIndex,
    modality: str,
    ids: list[int] | np.ndarray,
    dataset: CrossModalDataset | None = None,
    indices: np.ndarray | None = None,
    texts: list[str] | None = None,
    progress: bool = True,
) -> None:
    """Encode ``dataset``'s items ``indices`` (default: the first ``len(ids)``), or ``texts``, and
    add their codes to ``index`` under ``ids``."""
    ids = np.asarray(ids, dtype=np.int64)
    indices = np.arange(len(ids)) if indices is None else np.asarray(indices)
    for pos, codes in encode_items(model, dataset, indices, modality, texts=texts, progress=progress):
        index.add(pack_codes(codes.numpy()), ids[pos])


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
    extra_items: list[dict[str, Any]] = (),
    extra_texts: list[dict[str, Any]] = (),
) -> None:
    """Write the store (at ``path``, default ``run_dir/store.sqlite``) and the thumbnails it names.

    ``extra_items`` and ``extra_texts`` are store rows written as they are (items added to the run).
    """
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
        path or run_dir / "store.sqlite", itertools.chain(items, extra_items), [*units, *extra_texts],
        meta={"label_names": names, "dataset": dataset.name},
    ).close()


def add_to_run(
    run_dir: str | os.PathLike[str],
    source: str,
    options: dict[str, Any] | None = None,
    progress: bool = True,
    command: str | None = None,
    ray: RayOptions | None = None,
) -> dict[str, Any]:
    """Add every item of a dataset (a registered name, or an image folder) to a run's indexes.

    New items get ids after the largest in the store; nothing is retrained. An item whose key
    the run already holds from the same source (the same folder, or dataset) is skipped and
    counted: adding a folder again adds only its new images. Labels are mapped onto the run's
    label set by name; names the run does not know are not stored, and are counted. The
    indexes, the store and the manifest are replaced together (``RunUpdate``), under the run's
    lock: a crash leaves the run as it was or, within the renames, refused until the command
    is run again.

    Args:
        command: the command line recorded in the run's lock and journal (default: the
            ``crossmodal index --add`` line that does this).
        ray: encode on a Ray cluster (``crossmodal.jobs.ray_encode``) instead of in this process.

    Returns:
        ``added_items``, ``added_texts``, ``source`` (a folder as an absolute path),
        ``already_present`` (items skipped), ``unknown_labels`` (``{name: items}``) and the
        manifest's ``index`` entry.

    Raises:
        RunBusyError: another process is writing the run.
    """
    run_dir = Path(run_dir)
    with lock_run(run_dir, command or f"crossmodal index --run {run_dir} --add {source}"):
        recover_run(run_dir)
        return _add(run_dir, source, dict(options or {}), progress, ray)


def _add(run_dir: Path, source: str, options: dict[str, Any], progress: bool,
         ray: RayOptions | None = None) -> dict[str, Any]:  # fmt: skip
    manifest = check_run(run_dir, need=("model.safetensors", *INDEX_PARTS))
    name = origin = source
    if Path(source).is_dir():
        origin = str(Path(source).resolve())
        name, options = "imagefolder", {**options, "root": origin}
    if name == source and name not in list_datasets():
        what = "a file, not a folder" if Path(source).exists() else "no such folder"
        raise ValueError(f"cannot add {source!r}: {what}, and no dataset has that name "
                         f"(datasets: {', '.join(list_datasets())})")  # fmt: skip
    if name == source and options.get("root"):  # one builder, many sources: keys count per source
        origin = f"{name}:{Path(str(options['root'])).resolve()}"
    shards = find_shards(name, options) if ray is not None else None
    if shards is not None:  # the workers read the images: the driver reads the metadata only
        dataset = plan_shards(shards, options.get("split", "train"), name, options.get("cache_dir"))
    else:
        dataset = open_dataset(name, options)
    with MetadataStore.open(run_dir / "store.sqlite") as store:
        first_item, first_text = store.max_item_id() + 1, store.max_text_id() + 1
        present = store.find_keys(dataset.ids, source=origin)
        if origin != name and name == source:  # runs that recorded such a source by its builder alone
            present = {**store.find_keys(dataset.ids, source=name), **present}
        run_labels = [str(n) for n in store.get_meta("label_names", []) or []]
    positions = np.array([i for i, key in enumerate(dataset.ids) if key not in present], dtype=np.int64)
    result = {"source": origin, "already_present": len(dataset) - len(positions), "unknown_labels": {},
              "skipped": skipped_files(dataset)}  # fmt: skip
    if result["already_present"]:
        log.info("%s: %d of the %d items of %s are in the run already (added before): skipped",
                 run_dir, result["already_present"], len(dataset), origin)  # fmt: skip
    if not positions.size:
        return {"added_items": 0, "added_texts": 0, **result, **manifest["index"]}
    model = load_model(run_dir)
    indexes = {
        m: BinaryIndex.load(run_dir / f"{m}.index", expected_bits=model.bits) for m in ("image", "text")
    }
    item_ids = first_item + np.arange(positions.size)
    new = encode_new_items(run_dir, model, indexes, dataset, positions, item_ids, origin,
                           first_text=first_text, per_caption=per_caption(dataset, manifest),
                           run_labels=run_labels, progress=progress, ray=ray, shards=shards)  # fmt: skip
    items, units, stamps, result["unknown_labels"] = new.items, new.texts, new.stamps, new.unknown_labels
    if new.unusable:  # found by the workers that read the shards: said as a build says them
        result["skipped"] = with_unusable(result["skipped"], new.unusable)
    if not items:  # every planned image was unusable: nothing changes, as when all are present
        return {"added_items": 0, "added_texts": 0, **result, **manifest["index"]}
    if result["unknown_labels"]:
        log.info("%s: labels of %s that the run does not have were not stored: %s", run_dir, origin,
                 ", ".join(f"{k} ({v} items)" for k, v in result["unknown_labels"].items()))  # fmt: skip
    entry = {"source": origin, "items": len(items), "texts": len(units),
             **{k: v for k, v in result.items() if k != "source" and v}}  # fmt: skip
    if set(options) - {"root"}:
        entry["options"] = {k: v for k, v in options.items() if k != "root"}
    info = {**manifest["index"], "items": int(indexes["image"].ntotal), "texts": int(indexes["text"].ntotal)}
    info["added"] = [*info.get("added", []), entry]
    if info.get("removed_added"):  # added again on purpose: a --sync keeps them from now on
        info["removed_added"] = removed_added_keys(info, items, keep=False)
        if not info["removed_added"]:
            del info["removed_added"]

    def add(store: MetadataStore) -> None:
        store.add_items(items)
        store.add_texts(units)
        store.set_stamps(stamps)

    replace_indexes_and_store(run_dir, indexes, add, info)
    return {"added_items": len(items), "added_texts": len(units), **result, **info}


def per_caption(dataset: CrossModalDataset, manifest: dict[str, Any]) -> bool:
    """Whether items added from ``dataset`` get one text entry per caption (else one per item)."""
    return dataset.info.relevance == RELEVANCE_IMAGE or manifest["index"].get("text_units") == "caption"


@dataclass
class NewItems:
    """Store rows of items encoded into a run's indexes: ``items``, ``texts``, ``stamps`` (see
    ``item_stamps``), ``unknown_labels`` (``{label name the run lacks: items}``) and ``unusable``
    (``{key: why}`` of planned items left out because a worker found their image unusable)."""

    items: list[dict[str, Any]]
    texts: list[dict[str, Any]]
    stamps: list[dict[str, Any]]
    unknown_labels: dict[str, int]
    unusable: dict[str, str] = field(default_factory=dict)


def encode_new_items(
    run_dir: Path, model: TwoTowerHasher, indexes: dict[str, BinaryIndex], dataset: CrossModalDataset,
    positions: np.ndarray, item_ids: np.ndarray, source: str, *, first_text: int, per_caption: bool,
    run_labels: list[str], progress: bool = True, ray: RayOptions | None = None, shards: Shards | None = None,
) -> NewItems:  # fmt: skip
    """Encode items ``positions`` of ``dataset`` into ``indexes`` under ``item_ids`` (texts from
    ``first_text`` on when ``per_caption``, else under their item's id), write their thumbnails,
    and return their store rows; nothing is written to the store.

    With ``shards`` (``dataset`` is their plan, ``plan_shards``) the Ray workers read the images
    from the shards; items whose image is unusable are left out, and the others numbered on from
    ``item_ids[0]`` as a build that had left them out would number them.
    """
    if shards is not None and ray is not None:
        def units_of(kept: np.ndarray, ids: np.ndarray) -> list[dict[str, Any]]:
            return _new_units(model, dataset, positions[kept], ids, first_text, per_caption)

        no_image = set((dataset.info.stats or {}).get(NO_IMAGE_KEYS) or [])
        done = add_shards_on_ray(run_dir, ray, model, indexes, shards, dataset.ids_of(positions), item_ids,
                                 units_of, no_image)  # fmt: skip
        positions, item_ids, units, paths = positions[done.kept], done.item_ids, done.texts, done.paths
        stamps, unusable = [], done.failures  # images held in shards: no file to stamp
    else:
        units = _new_units(model, dataset, positions, item_ids, first_text, per_caption)
        stamps, unusable = item_stamps(dataset, positions, item_ids), {}  # before encoding: a change is seen
        if ray is not None:  # on a Ray cluster (crossmodal index --add --ray)
            add_on_ray(run_dir, ray, model, indexes, dataset, positions, item_ids, units)
        else:
            encode_into(model, indexes["image"], "image", item_ids, dataset, positions, progress=progress)
            encode_into(model, indexes["text"], "text", [u["text_id"] for u in units],
                        texts=[u["caption"] for u in units], progress=progress)  # fmt: skip
        paths = write_thumbnails(dataset, positions, run_dir, item_ids, overwrite=True)
    labels, unknown = run_label_names(dataset, positions, run_labels)
    items = [{"item_id": int(i), "key": k, "image_path": p, "labels": names, "source": source}
             for i, k, p, names in zip(item_ids, dataset.ids_of(positions), paths, labels)]  # fmt: skip
    return NewItems(items, units, stamps, unknown, unusable)


def _new_units(
    model: TwoTowerHasher, dataset: CrossModalDataset, positions: np.ndarray, item_ids: np.ndarray,
    first_text: int, per_caption: bool,
) -> list[dict[str, Any]]:  # fmt: skip
    """The text entries of new items ``positions`` stored as ``item_ids``: ``text_units`` under
    ids from ``first_text`` on when ``per_caption``, else under their item's id."""
    new_id = dict(zip(positions.tolist(), np.asarray(item_ids).tolist()))
    units = text_units(dataset, positions, readable=readable_by(model.text_tower))
    for j, u in enumerate(units):
        u["item_id"] = new_id[u["item_id"]]
        u["text_id"] = first_text + j if per_caption else u["item_id"]
    return units


def item_stamps(
    dataset: CrossModalDataset, positions: np.ndarray, item_ids: np.ndarray
) -> list[dict[str, Any]]:
    """Store stamps (``MetadataStore.set_stamps``) of items ``positions`` stored as ``item_ids``:
    their image file's size and modification time, and ``record_digest`` of their captions and
    labels. Items whose image is inline (no file) get none."""
    root = Path(dataset.info.image_root or ".")
    out = []
    digests = record_digests(dataset, positions)
    for item_id, row, digest in zip(item_ids, dataset.image_rows(positions), digests):
        if row["image_bytes"] or not row["image_path"]:
            continue
        st = (root / row["image_path"]).stat()
        out.append({"item_id": int(item_id), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                    "record": digest})  # fmt: skip
    return out


def record_digests(dataset: CrossModalDataset, positions: np.ndarray) -> list[str]:
    """A digest of each item's captions and label names as its source gives them: a change in a
    folder's metadata file changes it."""
    matrix, names = dataset.labels_matrix(), dataset.info.label_names
    out = []
    for pos, captions in zip(positions, dataset.captions_of(positions)):
        labels = [names[j] for j in np.flatnonzero(matrix[pos])] if matrix.shape[1] else []
        blob = json.dumps([list(captions), sorted(labels)], ensure_ascii=False)
        out.append(hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16])
    return out


def run_label_names(
    dataset: CrossModalDataset, positions: np.ndarray, run_labels: list[str]
) -> tuple[list[list[str]], dict[str, int]]:
    """Each item's label names that the run's label set holds (in its order, as the run's own items
    list them), and ``{unknown name: items}``."""
    matrix, names = dataset.labels_matrix(), dataset.info.label_names
    if not matrix.shape[1]:
        return [[] for _ in positions], {}
    column = {name: j for j, name in enumerate(run_labels)}
    out: list[list[str]] = []
    unknown: Counter[str] = Counter()
    for row in matrix[positions]:
        item = [names[j] for j in np.flatnonzero(row)]
        out.append(sorted((n for n in item if n in column), key=column.__getitem__))
        unknown.update(n for n in item if n not in column)
    return out, dict(sorted(unknown.items()))


def replace_indexes_and_store(
    run_dir: Path, indexes: dict[str, BinaryIndex], edit: Callable[[MetadataStore], None],
    info: dict[str, Any],
) -> None:  # fmt: skip
    """One journaled update of an add or a removal: the two indexes as given, a copy of the
    store changed by ``edit``, and the manifest's ``index`` entry ``info``, all together."""
    with RunUpdate(run_dir) as update:
        for m in ("image", "text"):
            indexes[m].save(update.path(f"{m}.index"))
        shutil.copyfile(run_dir / "store.sqlite", update.path("store.sqlite"))
        with MetadataStore.open(update.path("store.sqlite"), readonly=False) as store:
            edit(store)
        update.commit(index=info)


def skipped_files(dataset: CrossModalDataset) -> dict[str, dict[str, Any]]:
    """What the dataset's build left out, by kind (``undecodable_images``, ``missing_images``,
    ...): ``{kind: {"n": count, "first": [the first messages]}}``, from its stats, which a cached
    build keeps, so that every add of a folder can say so, not only the one that built it."""
    stats = dataset.info.stats or {}
    kinds = [k[2:] for k in stats if k.startswith("n_") and isinstance(stats.get(k[2:]), list)
             and k not in ("n_without_captions", "n_failed_images") and stats[k]]  # fmt: skip
    return {kind: {"n": int(stats[f"n_{kind}"]), "first": list(stats[kind])[:3]} for kind in kinds}


def with_unusable(skipped: dict[str, dict[str, Any]], unusable: dict[str, str]) -> dict[str, dict[str, Any]]:
    """``skipped`` (``skipped_files``) with the ``{key: why}`` of images found unusable while
    encoding counted as ``undecodable_images``, the kind a build records them as."""
    kind = dict(skipped.get("undecodable_images") or {"n": 0, "first": []})
    kind["n"] += len(unusable)
    kind["first"] = [*kind["first"], *(f"{k}: {why}" for k, why in unusable.items())][:3]
    return {**skipped, "undecodable_images": kind}


def removed_added_keys(info: dict[str, Any], items: list[dict[str, Any]], keep: bool) -> dict[str, list[str]]:
    """The manifest's ``index.removed_added`` (``{source: [keys]}``: items of added folders removed
    with ``--remove``, which ``--sync`` leaves out) with ``items`` (store rows) recorded
    (``keep``) or forgotten (added again)."""
    record = {src: set(keys) for src, keys in (info.get("removed_added") or {}).items()}
    for it in items:
        keys = record.setdefault(str(it["source"]), set())
        (keys.add if keep else keys.discard)(str(it["key"]))
    return {src: sorted(keys) for src, keys in sorted(record.items()) if keys}


def remove_from_run(
    run_dir: str | os.PathLike[str], keys: list[str], command: str | None = None
) -> dict[str, Any]:
    """Remove items by key from a run's indexes and store, with their texts.

    Every item with one of the keys goes (a file name added from two folders names two
    items). A key the run does not hold refuses the whole removal: nothing changes. The
    run's own items that are removed are listed in the manifest (``index.removed_keys``), so
    that a re-index leaves them out; removed added items are simply gone. Journaled like an
    add (``RunUpdate``), under the run's lock.

    Args:
        keys: item keys (the dataset's ids, as ``crossmodal search`` shows them).
        command: the command line recorded in the run's lock and journal.

    Returns:
        ``removed_items``, ``removed_texts`` and the manifest's ``index`` entry.

    Raises:
        RunError: a key is not in the run; RunBusyError: another process is writing it.
    """
    keys = list(dict.fromkeys(str(k) for k in keys))
    if not keys:
        raise ValueError("no item keys to remove")
    run_dir = Path(run_dir)
    with lock_run(run_dir, command or f"crossmodal index --run {run_dir} --remove {shlex.join(keys)}"):
        recover_run(run_dir)
        return _remove(run_dir, keys)


def _remove(run_dir: Path, keys: list[str]) -> dict[str, Any]:
    manifest = check_run(run_dir, need=INDEX_PARTS)
    with MetadataStore.open(run_dir / "store.sqlite") as store:
        found = store.find_keys(keys)
        unknown = [k for k in keys if k not in found]
        if unknown:
            more = f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
            raise RunError(f"{len(unknown)} of the {len(keys)} keys are not in {run_dir}: "
                           f"{', '.join(map(repr, unknown[:10]))}{more}; nothing was removed")  # fmt: skip
        item_ids = sorted(i for ids in found.values() for i in ids)
        items = [it for it in store.get_items(item_ids) if it is not None]
        sources: dict[str, set[str]] = {}
        for it in items:
            sources.setdefault(it["key"], set()).add(str(it["source"]))
        shared = {k: sorted(v) for k, v in sources.items() if len(v) > 1}
        if shared:  # a file name added from two folders names an item of each: both go, said aloud
            named = "; ".join(f"{k!r} from {', '.join(v)}" for k, v in list(shared.items())[:5])
            log.warning("%d keys name items from more than one source, and every such item is removed: %s",
                        len(shared), named)  # fmt: skip
        text_ids = [t["text_id"] for group in store.texts_of_items(item_ids) for t in group]
    indexes = {m: BinaryIndex.load(run_dir / f"{m}.index", expected_bits=manifest.get("bits"))
               for m in ("image", "text")}  # fmt: skip
    indexes["image"].remove(item_ids, missing_ok=True)
    indexes["text"].remove(text_ids, missing_ok=True)
    info = {**manifest["index"], "items": int(indexes["image"].ntotal), "texts": int(indexes["text"].ntotal)}
    dataset_name = (manifest.get("dataset") or {}).get("name")
    own = {it["key"] for it in items if it["source"] == dataset_name}
    if own:  # a re-index would bring these back from the dataset
        info["removed_keys"] = sorted({*info.get("removed_keys", []), *own})
    added = [it for it in items if it["source"] != dataset_name]
    if added:  # and a --sync of their folder would (an --add of it brings them back on purpose)
        info["removed_added"] = removed_added_keys(info, added, keep=True)
    entry = {"keys": len(keys), "items": len(item_ids), "texts": len(text_ids)}
    info["removed"] = [*info.get("removed", []), entry]
    replace_indexes_and_store(run_dir, indexes, lambda store: store.remove_items(item_ids), info)
    for it in items:  # thumbnails no store names any more
        if it["image_path"].startswith("images/"):
            (run_dir / it["image_path"]).unlink(missing_ok=True)
    return {"removed_items": len(item_ids), "removed_texts": len(text_ids), **info}
