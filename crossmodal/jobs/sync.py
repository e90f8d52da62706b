"""The sync job: keep the items a run holds from a folder in step with the folder.

``crossmodal index --run R --sync DIR`` (``sync_run``) compares the folder with what the run's
store recorded when its files were added (``MetadataStore`` stamps: each image file's size and
modification time, and a digest of its captions and labels in the folder's metadata). Files
the run does not hold are added; files whose stamp or metadata differ are re-encoded under the
item ids they have; items whose file is gone (or no longer decodes) are removed; the rest is
left alone. A folder never added is simply added. An image rewritten in place with its size and
modification time kept is not seen.

Nothing is written when nothing changed. Otherwise the indexes, the store and the manifest are
replaced together by one journaled update (``replace_indexes_and_store``) under the run's lock:
a sync killed midway leaves the run as it was, or refused until the command is run again.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from crossmodal.data import CrossModalDataset, open_dataset
from crossmodal.data.captions import check_image
from crossmodal.index import BinaryIndex
from crossmodal.jobs.index import (
    encode_new_items,
    item_stamps,
    per_caption,
    replace_indexes_and_store,
    skipped_files,
)
from crossmodal.runs.folder import check_run, lock_run, recover_run
from crossmodal.runs.model import load_model
from crossmodal.runs.state import INDEX_PARTS
from crossmodal.store import MetadataStore

log = logging.getLogger(__name__)


@dataclass
class SyncPlan:
    """What a sync does: dataset positions of ``new`` and ``changed`` files (with the item ids
    the changed ones keep), the store rows of items whose file is ``gone``, and how many are
    ``unchanged`` or ``left_out`` (removed with ``--remove``, their files still there)."""

    new: list[int] = field(default_factory=list)
    changed: list[int] = field(default_factory=list)
    changed_ids: list[int] = field(default_factory=list)
    gone: list[dict[str, Any]] = field(default_factory=list)
    unchanged: int = 0
    left_out: int = 0

    def __bool__(self) -> bool:
        return bool(self.new or self.changed or self.gone)


def sync_run(
    run_dir: str | os.PathLike[str],
    folder: str | os.PathLike[str],
    options: dict[str, Any] | None = None,
    progress: bool = True,
    command: str | None = None,
) -> dict[str, Any]:
    """Bring the items a run holds from image folder ``folder`` in step with it (see the module).

    Args:
        options: options of the ``imagefolder`` dataset (e.g. ``metadata``, ``text_column``);
            default: those the folder was last added or synced with.
        command: the command line recorded in the run's lock and journal.

    Returns:
        ``source`` (the folder, absolute), ``added``, ``reencoded``, ``removed``, ``unchanged``
        (items), ``items`` and ``texts`` (the run's totals after the sync), ``seconds``, and
        ``changed`` (whether anything was written).

    Raises:
        ValueError: ``folder`` is not a folder. RunBusyError: another process is writing the run.
    """
    if not Path(folder).is_dir():
        raise ValueError(f"--sync takes a folder of images; {folder} is not a folder")
    run_dir, origin = Path(run_dir), str(Path(folder).resolve())
    with lock_run(run_dir, command or f"crossmodal index --run {run_dir} --sync {folder}"):
        recover_run(run_dir)
        return _sync(run_dir, origin, dict(options or {}), progress)


def _sync(run_dir: Path, origin: str, options: dict[str, Any], progress: bool) -> dict[str, Any]:
    started = time.perf_counter()
    manifest = check_run(run_dir, need=("model.safetensors", *INDEX_PARTS))
    options = options or last_options(manifest, origin)
    dataset = open_dataset("imagefolder", {**options, "root": origin})
    with MetadataStore.open(run_dir / "store.sqlite") as store:
        held = store.items_of_source(origin)
        plan = plan_sync(dataset, held, store.get_stamps([it["item_id"] for it in held]),
                         removed=set((manifest["index"].get("removed_added") or {}).get(origin, [])))
        old_ids = [*plan.changed_ids, *(it["item_id"] for it in plan.gone)]
        old_texts = [t["text_id"] for group in store.texts_of_items(old_ids) for t in group]
        first_item, first_text = store.max_item_id() + 1, store.max_text_id() + 1
        run_labels = [str(n) for n in store.get_meta("label_names", []) or []]
    result = {"source": origin, "added": len(plan.new), "reencoded": len(plan.changed),
              "removed": len(plan.gone), "unchanged": plan.unchanged, "changed": bool(plan),
              "left_out": plan.left_out, "skipped": skipped_files(dataset)}  # fmt: skip
    if not plan:
        totals = {"items": manifest["index"]["items"], "texts": manifest["index"]["texts"]}
        return {**result, **totals, "seconds": round(time.perf_counter() - started, 2)}
    model = load_model(run_dir)
    indexes = {m: BinaryIndex.load(run_dir / f"{m}.index", expected_bits=model.bits)
               for m in ("image", "text")}  # fmt: skip
    indexes["image"].remove(old_ids, missing_ok=True)
    indexes["text"].remove(old_texts, missing_ok=True)
    positions = np.array([*plan.new, *plan.changed], dtype=np.int64)
    item_ids = np.array([*(first_item + np.arange(len(plan.new))), *plan.changed_ids], dtype=np.int64)
    new = encode_new_items(run_dir, model, indexes, dataset, positions, item_ids, origin,
                           first_text=first_text, per_caption=per_caption(dataset, manifest),
                           run_labels=run_labels, progress=progress)  # fmt: skip
    info = {**manifest["index"], "items": int(indexes["image"].ntotal), "texts": int(indexes["text"].ntotal)}
    entry = {"source": origin, "items": len(plan.new), "texts": len(new.texts), "sync": {
        k: result[k] for k in ("reencoded", "removed", "unchanged")}}  # fmt: skip
    if options:
        entry["options"] = options
    info["added"] = [*info.get("added", []), entry]

    def edit(store: MetadataStore) -> None:
        store.remove_items(old_ids)  # their texts and stamps go with them
        store.add_items(new.items)
        store.add_texts(new.texts)
        store.set_stamps(new.stamps)

    replace_indexes_and_store(run_dir, indexes, edit, info)
    for it in plan.gone:  # thumbnails no store names any more
        if it["image_path"].startswith("images/"):
            (run_dir / it["image_path"]).unlink(missing_ok=True)
    return {**result, "items": info["items"], "texts": info["texts"],
            "seconds": round(time.perf_counter() - started, 2)}  # fmt: skip


def last_options(manifest: dict[str, Any], source: str) -> dict[str, Any]:
    """The dataset options ``source`` was last added or synced with (the manifest's ``index.added``)."""
    entries = [a for a in (manifest.get("index") or {}).get("added") or []
               if isinstance(a, dict) and a.get("source") == source]  # fmt: skip
    return dict(entries[-1].get("options") or {}) if entries else {}


def plan_sync(
    dataset: CrossModalDataset, held: list[dict[str, Any]], stamps: dict[int, dict[str, Any]],
    removed: set[str] = frozenset(),
) -> SyncPlan:  # fmt: skip
    """Compare a folder's dataset with the store rows ``held`` from it and their ``stamps``.

    An item held without a stamp (added before stamps were recorded) counts as changed. A
    changed file that no longer decodes counts as gone (a warning names it). Files whose keys
    are in ``removed`` (removed from the run with ``--remove``) stay out: ``left_out``.
    """
    by_key = {it["key"]: it for it in held}
    positions = np.arange(len(dataset), dtype=np.int64)
    now = {st["item_id"]: st for st in item_stamps(dataset, positions, positions)}
    plan = SyncPlan()
    for pos, key in enumerate(dataset.ids):
        item = by_key.pop(key, None)
        if item is None and key in removed:
            plan.left_out += 1
        elif item is None:
            plan.new.append(pos)
        elif _same(stamps.get(item["item_id"]), now.get(pos)):
            plan.unchanged += 1
        elif (why := _undecodable(dataset, pos)) is not None:
            log.warning("%s: %s; its item is removed from the run", key, why)
            by_key[key] = item
        else:
            plan.changed.append(pos)
            plan.changed_ids.append(int(item["item_id"]))
    plan.gone = sorted(by_key.values(), key=lambda it: it["item_id"])
    return plan


def _same(before: dict[str, Any] | None, now: dict[str, Any] | None) -> bool:
    keys = ("size", "mtime_ns", "record")
    return before is not None and now is not None and all(before[k] == now[k] for k in keys)


def _undecodable(dataset: CrossModalDataset, pos: int) -> str | None:
    """Why the image of item ``pos`` does not decode (the folder's build checked it before it
    changed), or None."""
    row = next(dataset.image_rows(np.array([pos])))
    return check_image(dataset.image_source(row), "decode")
