"""Inputs for the towers, and the on-disk cache of frozen backbone features.

``ModalityInputs`` turns dataset positions into what a tower (or its head, when the
tower is frozen and its features are cached) takes. Frozen pretrained towers run once
over the whole dataset, with a progress bar, and their features are cached under
``train.cache_dir`` keyed by dataset fingerprint and tower, so a second run reuses them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from crossmodal.augment import augment_view, view_rng
from crossmodal.config import Config
from crossmodal.data import CrossModalDataset
from crossmodal.images import ImageDecodeError, open_image
from crossmodal.io import atomic_path

log = logging.getLogger(__name__)


def join_captions(captions: list[str]) -> str:
    """An item's one text: its captions joined (the text side of each training pair)."""
    return " ; ".join(captions)


def item_texts(dataset: CrossModalDataset) -> list[str]:
    """One text per item: its captions joined (the text side of each training pair)."""
    return [join_captions(c) for c in dataset.captions_of()]


def image_batch(dataset: CrossModalDataset, tower: Any, indices: np.ndarray) -> torch.Tensor:
    """Decode and preprocess the images of ``indices`` -> ``[b, 3, S, S]``.

    Raises:
        ImageDecodeError: an image does not decode, naming the item. The dataset builders
            skip such images (``check_images``), so this is a file that changed on disk
            since the build, or a build that checked less; it is never replaced by a blank
            image, which would be trained on, indexed and returned by search.
    """
    return torch.stack([tower.preprocess(item_image(dataset, row)) for row in dataset.image_rows(indices)])


def item_image(dataset: CrossModalDataset, row: dict[str, Any]) -> Image.Image:
    """The decoded image of one ``image_rows`` row. Raises ``ImageDecodeError`` naming the item."""
    try:
        return open_image(dataset.image_source(row))
    except ImageDecodeError as exc:
        raise ImageDecodeError(
            f"item {row['id']} of dataset {dataset.name!r}: {exc}; rebuild the dataset "
            "(force=true, check_images=decode) to leave it out"
        ) from None


class ModalityInputs:
    """Batches for one modality: cached features (frozen) or raw inputs for the tower."""

    def __init__(
        self,
        modality: str,
        dataset: CrossModalDataset,
        tower: Any,
        features: torch.Tensor | None = None,
        texts: list[str] | None = None,
        offsets: np.ndarray | None = None,
    ) -> None:
        self.modality, self.dataset, self.tower = modality, dataset, tower
        self.features = features  # [n_items, f] (or [n_texts, f] with offsets) when frozen and cached
        self.texts = texts
        # text variants or image views: rows offsets[i]:offsets[i+1] belong to item i
        self.offsets = offsets

    @property
    def from_features(self) -> bool:
        return self.features is not None

    @property
    def item_features(self) -> torch.Tensor | None:
        """``[n_items, f]`` cached features, one row per item (its joined text for text variants);
        None where the cache holds feature maps of a partially trained tower, not its features."""
        if getattr(self.tower, "cached_split", 0):
            return None
        if self.features is None or self.offsets is None:
            return self.features
        return self.features[torch.as_tensor(self.offsets[:-1], dtype=torch.long)]

    def batch(self, indices: np.ndarray, device: torch.device, rng: np.random.Generator | None = None) -> Any:
        """Inputs for ``indices``; with ``rng`` and text variants, a random variant per item."""
        if self.features is not None:
            rows = np.asarray(indices)
            if self.offsets is not None:
                start, count = self.offsets[rows], self.offsets[rows + 1] - self.offsets[rows]
                rows = start + (rng.integers(0, count) if rng is not None else 0)
            return self.features[torch.as_tensor(rows, dtype=torch.long)].to(device)
        if self.modality == "image":
            return image_batch(self.dataset, self.tower, indices).to(device)
        if self.dataset.info.bow_dim:
            return {"bow": torch.from_numpy(self.dataset.bow_matrix(indices)).to(device)}
        assert self.texts is not None
        batch = self.tower.tokenize([self.texts[int(i)] for i in indices])
        return {k: v.to(device) for k, v in batch.items()}


def tower_description(cfg: Config, modality: str, training: bool = False) -> dict[str, Any]:
    """What a frozen tower's cached features depend on (part of the cache key); with
    ``training``, the image side also asks for the recipe's augmented views
    (``train.image_views``), which only training reads."""
    m = cfg.model
    if modality == "image":
        desc = {"name": m.image_tower, "size": m.image_size, "weights": m.image_weights,
                "pretrained": m.pretrained}  # fmt: skip
        if cfg.train.mode == "partial":  # the cache holds the maps entering the trained blocks
            desc["trunk"] = cfg.train.partial_blocks
        return {**desc, "views": cfg.train.image_views} if training and cfg.train.image_views else desc
    desc = {"name": m.text_tower, "options": m.text_options, "pretrained": m.pretrained}
    return {**desc, "label_texts": True} if cfg.train.label_texts else desc


def cache_key(dataset: CrossModalDataset, modality: str, tower_desc: dict[str, Any]) -> str:
    blob = json.dumps({"data": dataset.fingerprint(), "modality": modality, **tower_desc}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def label_text(name: str) -> str:
    """A label's name as a text: its ``kind:`` prefix dropped, ``-`` and ``_`` as spaces
    (``word:cat`` -> ``cat``, ``subgroup:animal-mammal`` -> ``animal mammal``)."""
    return name.split(":", 1)[-1].replace("-", " ").replace("_", " ").strip()


def text_variants(dataset: CrossModalDataset, label_texts: bool = False) -> tuple[list[str], np.ndarray]:
    """Every text an item can be trained on: its captions joined, then each caption alone,
    then (with ``label_texts``) the names of its labels as texts.

    Returns the texts and ``offsets [n_items + 1]``: rows ``offsets[i]:offsets[i+1]`` belong
    to item i, and row ``offsets[i]`` is its joined text (what evaluation and indexing use).
    Training on single captions too teaches the text side short, keyword-like queries; the
    label names teach it the one-word queries a label stands for.
    """
    names = [label_text(n) for n in dataset.info.label_names] if label_texts else []
    labels = dataset.labels_matrix() if names else None
    texts: list[str] = []
    offsets = [0]
    for i, captions in enumerate(dataset.captions_of()):
        texts.append(join_captions(captions))
        if len(captions) > 1:
            texts.extend(captions)
        if labels is not None:
            texts.extend(names[j] for j in np.flatnonzero(labels[i]) if names[j] not in captions)
        offsets.append(len(texts))
    return texts, np.asarray(offsets, dtype=np.int64)


def label_name_texts(dataset: CrossModalDataset) -> tuple[list[str], np.ndarray]:
    """Every label's name as a text (``label_text``) and its label column ``[k]``; labels
    whose name is empty are left out."""
    pairs = [(label_text(n), j) for j, n in enumerate(dataset.info.label_names) if label_text(n)]
    return [t for t, _ in pairs], np.asarray([j for _, j in pairs], dtype=np.int64)


@torch.no_grad()
def label_name_inputs(
    dataset: CrossModalDataset, tower: Any, frozen: bool, device: torch.device | None = None,
    batch_size: int = 64,
) -> tuple[ModalityInputs, np.ndarray] | None:  # fmt: skip
    """The text inputs of the dataset's label names, for the ``label_names`` training term.

    A frozen tower runs over the names once (a few hundred short texts: no cache); a
    trained one tokenizes them at every step. Returns the inputs (rows in the order of the
    columns) and the label columns ``[k]``, or None when the dataset has no named labels
    or its text side is a fixed bag of words (no tower reads strings).
    """
    names, columns = label_name_texts(dataset)
    if not names or dataset.info.bow_dim:
        return None
    if not frozen:
        return ModalityInputs("text", dataset, tower, texts=names), columns
    device = device or torch.device("cpu")
    tower.eval().to(device)
    model = tower.for_inference() if hasattr(tower, "for_inference") else tower
    feats = []
    for s in range(0, len(names), batch_size):
        x = {k: v.to(device) for k, v in tower.tokenize(names[s : s + batch_size]).items()}
        feats.append(model(**x).float().cpu())
    return ModalityInputs("text", dataset, tower, features=torch.cat(feats)), columns


class AugmentedImages:
    """The augmented views of a dataset's images as one table: row ``r`` is view
    ``r % views + 1`` of item ``r // views`` (``augment.augment_view``, seeded per item and view)."""

    modality = "image"

    def __init__(self, dataset: CrossModalDataset, tower: Any, views: int, seed: int = 0) -> None:
        self.dataset, self.tower, self.views, self.seed = dataset, tower, views, seed

    def batch(self, rows: np.ndarray, device: torch.device,
              rng: np.random.Generator | None = None) -> torch.Tensor:  # fmt: skip
        rows = np.asarray(rows)
        items = rows // self.views
        out = []
        for r, row in zip(rows, self.dataset.image_rows(items), strict=True):
            img = item_image(self.dataset, row)
            view = augment_view(img, view_rng(self.seed, int(r // self.views), int(r % self.views) + 1))
            out.append(self.tower.preprocess(view))
        return torch.stack(out).to(device)


@dataclass
class FeatureRequest:
    """One frozen tower to run over a dataset: its modality, the tower and its description."""

    modality: str
    tower: Any
    desc: dict[str, Any]


@dataclass
class _Job:
    """One modality's extraction in progress: inputs, batches in length order, output rows."""

    source: ModalityInputs
    model: Any
    order: np.ndarray
    out: np.ndarray
    path: Path | None
    batch_size: int
    key: str  # what the features are: a modality, or "views" (augmented images)
    # Inputs are prepared one batch at a time per tower (a fast tokenizer must not be used by
    # two threads at once); the forward passes of two batches do run side by side.
    lock: threading.Lock = field(default_factory=threading.Lock)

    def batches(self) -> list[np.ndarray]:
        return [self.order[s : s + self.batch_size] for s in range(0, len(self.order), self.batch_size)]

    @torch.no_grad()
    def run(self, idx: np.ndarray, device: torch.device) -> None:
        with self.lock:
            x = self.source.batch(idx, device)
        y = self.model(x) if self.source.modality == "image" else self.model(**x)
        self.out[idx] = y.float().cpu().numpy()


def extract_features(
    dataset: CrossModalDataset,
    modality: str,
    tower: Any,
    tower_desc: dict[str, Any],
    cache_dir: str | Path | None,
    batch_size: int = 64,
    device: torch.device | None = None,
    variants: bool = False,
) -> Any:
    """Features of every item from a frozen tower, ``[n_items, feature_dim]`` float32, cached.

    For text, the features of all ``text_variants`` are computed and cached; with
    ``variants=True`` they are returned whole with their offsets, else one row per item.
    """
    request = FeatureRequest(modality, tower, tower_desc)
    return extract_all(dataset, [request], cache_dir, batch_size, device, variants)[modality]


def extract_all(
    dataset: CrossModalDataset,
    requests: list[FeatureRequest],
    cache_dir: str | Path | None,
    batch_size: int = 64,
    device: torch.device | None = None,
    variants: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """``extract_features`` for several towers; what is not cached is computed side by side.

    On a CPU with several cores, two workers with half the threads each share the batches
    of all towers: small batches keep two cores only 1.3-1.5x as busy as one, so two
    single-threaded workers finish OpenMoji's images and texts about a fifth sooner.
    Returns ``{modality: features}`` (``(features, offsets)`` with ``variants``).
    """
    device = device or torch.device("cpu")
    results: dict[str, Any] = {}
    jobs: list[_Job] = []
    offsets_of: dict[str, np.ndarray | None] = {}
    views = {}  # modality -> augmented views per item (images)

    def cache_path(modality: str, desc: dict[str, Any]) -> Path | None:
        if not cache_dir:
            return None
        key = cache_key(dataset, modality, desc)
        # a tower named by a hub id or folder (clip:/path/to/model) must not make folders of the name
        tower = re.sub(r"[^A-Za-z0-9._-]+", "_", str(desc.get("name", "tower"))).strip("_.")[-60:]
        return Path(cache_dir) / f"{dataset.name}-{modality}-{tower}-{key}.npy"

    def add_job(key: str, source: Any, n: int, desc: dict[str, Any], tower: Any, order: np.ndarray) -> None:
        path = cache_path(source.modality, desc)
        feats = _load_cache(path, (n, tower.feature_dim))
        if feats is not None:
            results[key] = feats
            return
        tower.eval().to(device)
        model = tower.for_inference() if hasattr(tower, "for_inference") else tower
        out = np.zeros((n, tower.feature_dim), dtype=np.float32)
        jobs.append(_Job(source, model, order, out, path, batch_size, key))

    for req in requests:
        texts, offsets = (None, None)
        if req.modality == "text" and not dataset.info.bow_dim:
            texts, offsets = text_variants(dataset, bool(req.desc.get("label_texts")))
        offsets_of[req.modality] = offsets
        n = len(texts) if texts is not None else len(dataset)
        desc = {**req.desc, "variants": True} if texts is not None else dict(req.desc)
        k = int(desc.pop("views", 0) or 0)  # the clean features keep the key they have without views
        # texts in order of length: a batch pads to similar lengths (MiniLM on OpenMoji's
        # names: about 1.8x faster than the dataset's order); rows are written back in place
        order = np.argsort([len(t) for t in texts], kind="stable") if texts is not None else np.arange(n)
        source = ModalityInputs(req.modality, dataset, req.tower, texts=texts)
        add_job(req.modality, source, n, desc, req.tower, order)
        if k and req.modality == "image":
            views[req.modality] = k
            aug = AugmentedImages(dataset, req.tower, k)
            add_job("views", aug, n * k, {**desc, "views": k}, req.tower, np.arange(n * k))
    _run_jobs(jobs, device, progress)
    for job in jobs:
        if job.path is not None:
            with atomic_path(job.path) as tmp:
                with open(tmp, "wb") as fh:
                    np.save(fh, job.out, allow_pickle=False)
        results[job.key] = job.out
    for m, k in views.items():  # rows of item i: its clean features, then its k views
        clean, aug = results[m], results.pop("views")
        results[m] = np.concatenate([clean[:, None], aug.reshape(len(clean), k, -1)], axis=1).reshape(
            len(clean) * (k + 1), -1)  # fmt: skip
        offsets_of[m] = np.arange(0, len(clean) * (k + 1) + 1, k + 1, dtype=np.int64)
    out: dict[str, Any] = {}
    for m, feats in results.items():
        t, offsets = torch.from_numpy(feats), offsets_of[m]
        if offsets is None:
            out[m] = (t, None) if variants else t
        else:
            out[m] = (t, offsets) if variants else t[torch.from_numpy(offsets[:-1])]
    return out


def duration(seconds: float) -> str:
    """``20`` -> ``"20 s"``; ``75`` -> ``"75 s"``; ``150`` -> ``"2.5 min"``; ``5400`` -> ``"1.5 h"``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


class _EstimatedBar(tqdm):
    """A progress bar that also prints, once, a line with the time left: the bar of
    feature extraction is transient, and a long extraction should say early what it costs."""

    after_s = 10.0  # the estimate is printed once this much time has passed

    def update(self, n: float | None = 1) -> bool | None:
        out = super().update(n)
        if not self.disable and not getattr(self, "_said", False) and self.n < self.total:
            elapsed = self.format_dict["elapsed"]
            if elapsed >= self.after_s and self.n:
                self._said = True
                left = elapsed * (self.total - self.n) / self.n
                self.write(f"{self.desc}: about {duration(left)} left for {self.total - self.n:,} of "
                           f"{self.total:,} inputs ({self.n / elapsed:.0f} per second)")  # fmt: skip
        return out


def _run_jobs(jobs: list[_Job], device: torch.device, progress: bool = True) -> None:
    """Run every batch of ``jobs`` with a progress bar: two CPU workers when there are cores."""
    if not jobs:
        return
    work = [(job, idx) for job in jobs for idx in job.batches()]
    desc = " + ".join("image views" if j.key == "views" else j.key for j in jobs) + " features"
    total = sum(len(j.order) for j in jobs)
    bar = _EstimatedBar(total=total, desc=desc, unit="input", leave=False, disable=not progress)
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads < 2 or len(work) < 2:
        for job, idx in work:
            job.run(idx, device)
            bar.update(len(idx))
        bar.close()
        return

    from concurrent.futures import ThreadPoolExecutor

    def start_worker() -> None:
        torch.set_num_threads(max(1, threads // 2))

    def run(item: tuple[_Job, np.ndarray]) -> None:
        item[0].run(item[1], device)
        bar.update(len(item[1]))

    try:
        with ThreadPoolExecutor(2, initializer=start_worker, thread_name_prefix="features") as pool:
            futures = [pool.submit(run, item) for item in work]
            try:
                for future in futures:
                    future.result()  # re-raises a worker's error
            except BaseException:  # an error or Ctrl-C: drop the batches not started yet
                for future in futures:
                    future.cancel()
                raise
    finally:
        bar.close()
        # a worker's setting becomes the default of threads started later (an app's request
        # threads, say): give them back the caller's
        torch.set_num_threads(threads)


def _load_cache(path: Path | None, shape: tuple[int, int]) -> np.ndarray | None:
    if path is None or not path.exists():
        return None
    try:  # never unpickled: a cache file holding objects is refused and recomputed
        feats = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        log.warning("ignoring unreadable feature cache %s: %s", path, exc)
        return None
    if feats.shape != shape:
        log.warning("ignoring cache %s with shape %s (expected %s)", path, feats.shape, shape)
        return None
    log.info("reusing cached features %s", path)
    return feats
