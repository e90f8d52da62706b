"""RetrievalEngine: a trained run's model, indexes and store behind four search directions.

    engine = RetrievalEngine.load("runs/openmoji")
    engine.search_text("cat", k=10)        # text -> images
    engine.search_image("photo.png", k=10)  # image -> captions
    engine.similar_images(img, k=10)        # image -> images
    engine.similar_texts("red heart", k=10) # text -> texts

Each call returns a ``SearchResult`` with the hits (id, captions, image path, Hamming
distance) and the time each stage took.

Order. Hamming distances are integers, so many items tie. Within a tie, hits are ordered
by the dot product of the query's continuous code (the model's output before the sign)
with the item's code, larger first: the item whose differing bits are those the query is
least sure of comes first. Identical codes tie exactly and go by id. To make this the
order over the whole database, each query's FAISS shortlist is extended until it holds
every item tied with the k-th (``_tie_shortlist``). Runs with learned bit weights rank by
weighted Hamming distance first, over a shortlist of the 10k (at least 100) nearest, and
report that distance.

The engine only knows the run folder and imports no training code (no objective, no trainer,
no jobs). Queries are encoded by the run's exported ONNX encoders when it has them (``crossmodal
export``; no torch is imported then), else by its model rebuilt from ``model.json``: see
``crossmodal.serving.encoders``. Both give the same codes and the same messages for bad queries.

Threads are set on purpose: one query is encoded with ``encoder_threads`` (1) intra-op threads
and searched with ``faiss_threads`` (1) FAISS threads; several queries at once are searched with
``faiss_batch_threads`` (all cores), and flat indexes take ``query_batch_size`` queries per
FAISS pass. FAISS' thread count belongs to the calling thread (OpenMP), so it is set on each
search, in the thread that searches (an app answers from worker threads).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from PIL import Image

from crossmodal.codes import codes_to_hex, pack_codes, unpack_codes, weighted_hamming
from crossmodal.images import open_image
from crossmodal.index import PAD_DISTANCE, BinaryIndex, IndexFileError
from crossmodal.report import metric_rows
from crossmodal.runs.folder import INDEX_FILES, JOURNAL, RunError, check_run, read_manifest, verify_files
from crossmodal.serving.encoders import QueryEncoders, choose_backend, load_encoders, required_files
from crossmodal.store import MetadataStore, StoreError
from crossmodal.text import QueryError

log = logging.getLogger(__name__)

ImageInput = str | os.PathLike[str] | bytes | Image.Image
ENCODE_BATCH = 256  # queries encoded at once (bounds the encoders' memory for large batches)


@dataclass
class Hit:
    """One result: an item (image side) or a caption of an item (text side)."""

    rank: int
    item_id: int
    key: str
    distance: float
    image_path: str
    captions: list[str]
    labels: list[Any]
    text_id: int | None = None  # set when the hit is a text entry
    caption: str = ""  # the matching caption of a text hit


@dataclass
class SearchResult:
    query: str
    direction: str
    hits: list[Hit]
    code_hex: str
    timings_ms: dict[str, float] = field(default_factory=dict)

    @property
    def total_ms(self) -> float:
        return sum(self.timings_ms.values())


class RetrievalEngine:
    """Search a run folder written by ``crossmodal train`` and ``crossmodal index``."""

    def __init__(self, run_dir: Path, encoders: QueryEncoders, indexes: dict[str, BinaryIndex],
                 store: MetadataStore, manifest: dict[str, Any], faiss_threads: int | None = 1,
                 faiss_batch_threads: int | None = None) -> None:  # fmt: skip
        self.run_dir, self.encoders, self.indexes, self.store, self.manifest = (
            run_dir,
            encoders,
            indexes,
            store,
            manifest,
        )
        self.bits = int(manifest["bits"])
        self.bit_weights = encoders.bit_weights  # float64 [bits], or None
        self.faiss_threads, self.faiss_batch_threads = faiss_threads, faiss_batch_threads
        # the most items past the k-th that one query fetches to complete a Hamming tie
        self.tie_fetch_limit = 4096

    @property
    def model(self) -> Any:
        """The torch model of the torch back end (None when the exported encoders serve)."""
        return getattr(self.encoders, "model", None)

    @property
    def backend(self) -> str:
        """``"onnx"`` (exported encoders, no torch) or ``"torch"``."""
        return self.encoders.backend

    @classmethod
    def load(
        cls,
        run_dir: str | os.PathLike[str],
        mmap: bool = False,
        *,
        backend: str = "auto",
        precision: str = "fp32",
        encoder_threads: int | None = 1,
        faiss_threads: int | None = 1,
        faiss_batch_threads: int | None = None,
        query_batch_size: int | None = 1000,
    ) -> RetrievalEngine:
        """Open a run; refuses, naming the difference, a run of another format or code length.

        Args:
            mmap: memory-map the indexes (read-only; saves memory for ``ivf`` indexes).
            backend: ``"auto"`` (the exported encoders when the run has them, else torch),
                ``"onnx"`` or ``"torch"``.
            precision: ``"fp32"``, or ``"int8"`` for the quantised exported encoders.
            encoder_threads: intra-op threads of the encoder (None: the library's default).
                One query encodes fastest on one core, and an app serves several at once.
            faiss_threads: FAISS threads for a single query (None: FAISS' default).
            faiss_batch_threads: FAISS threads for several queries at once (None: FAISS' default,
                every core).
            query_batch_size: queries per FAISS pass of a flat index (None: FAISS' default, 32);
                larger passes cut the threads' overhead on batches.

        Raises:
            RunError: a file is missing, damaged, of another version, code length or model, or
                differs from the checksums in the manifest; the message says what to re-run.
        """
        run_dir = Path(run_dir)
        manifest = read_manifest(run_dir) if run_dir.is_dir() else {}
        listed = manifest.get("files", {}) if isinstance(manifest.get("files"), dict) else {}
        checked = (*[n for n in listed if not n.startswith("eval/")], *INDEX_FILES)
        backend = choose_backend(manifest, backend)
        need = (*required_files(backend), "image.index", "text.index", "store.sqlite")
        # After an interrupted update, say so before any file-specific complaint.
        manifest = check_run(run_dir, need=need, verify=checked if (run_dir / JOURNAL).exists() else ())
        encoders = load_encoders(run_dir, manifest, backend, encoder_threads, precision)
        try:  # one error type (RunError) for every broken part of a run folder
            indexes = {
                m: BinaryIndex.load(run_dir / f"{m}.index", mmap=mmap, expected_bits=encoders.bits)
                for m in ("image", "text")
            }
            store = MetadataStore.open(run_dir / "store.sqlite")
        except (IndexFileError, StoreError) as exc:
            raise RunError(f"{exc}; re-run: crossmodal index --run {run_dir}") from None
        try:
            if store.count_items() != indexes["image"].ntotal:
                raise RunError(
                    f"{run_dir}: store.sqlite holds {store.count_items()} items but image.index "
                    f"{indexes['image'].ntotal}; re-run: crossmodal index --run {run_dir}"
                )
            # a replaced file may still load: compare the checksums of every file the engine reads
            verify_files(run_dir, manifest, (*encoders.files, *INDEX_FILES))
        except RunError:
            store.close()
            raise
        for index in indexes.values():
            set_query_batch_size(index, query_batch_size)
        return cls(run_dir, encoders, indexes, store, manifest, faiss_threads, faiss_batch_threads)

    # -- encoding ---------------------------------------------------------------------------
    def encode_texts(self, queries: list[str], binarize: bool = True) -> np.ndarray:
        """Codes of text queries; ``QueryError`` for unusable ones.

        Returns:
            Packed codes ``uint8 [n, bits/8]``, or with ``binarize=False`` the continuous codes
            ``float32 [n, bits]`` (after the model's output activation, before the sign).
        """
        for q in queries:
            self.encoders.check_query(q)
        codes = self._encode(self.encoders.encode_texts, [q.strip() for q in queries])
        return pack_codes(codes) if binarize else codes  # pack_codes signs as binarize=True does

    def encode_images(self, images: list[ImageInput], binarize: bool = True) -> np.ndarray:
        """Codes of images (paths, bytes or PIL images); ``ImageDecodeError`` for bad ones.

        Returns:
            As ``encode_texts``: packed ``uint8 [n, bits/8]`` or continuous ``float32 [n, bits]``.
        """
        codes = self._encode(self.encoders.encode_images, [open_image(img) for img in images])
        return pack_codes(codes) if binarize else codes

    def _encode(self, encode: Any, inputs: list[Any]) -> np.ndarray:
        """``encode`` over ``inputs`` in batches of ``ENCODE_BATCH`` -> ``float32 [n, bits]``."""
        parts = [encode(inputs[s : s + ENCODE_BATCH]) for s in range(0, len(inputs), ENCODE_BATCH)]
        return np.concatenate(parts) if parts else np.zeros((0, self.bits), np.float32)

    # -- searching ---------------------------------------------------------------------------
    def _search(
        self, packed: np.ndarray, target: str, k: int, continuous: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` best items of each query: by Hamming distance (weighted Hamming for runs with
        bit weights), then, within a tie, by the larger dot product of the continuous query code
        ``float [nq, bits]`` with the database code, then by id (without ``continuous``, the
        query's +-1 code stands in: a Hamming tie then goes to the smaller id).

        Returns:
            ``(dist [nq, k], ids [nq, k])``: Hamming distances (int32; weighted ones, float64, for
            runs with bit weights), padded with ``PAD_DISTANCE`` and id -1.
        """
        index = self.indexes[target]
        if not isinstance(k, int | np.integer) or isinstance(k, bool) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        k = min(int(k), max(index.ntotal, 1))
        threads = self.faiss_threads if len(packed) == 1 else self.faiss_batch_threads
        faiss.omp_set_num_threads(int(threads or _default_threads()))  # this thread's OpenMP setting
        if continuous is None:
            continuous = unpack_codes(packed, self.bits).astype(np.float32)
        # weighted runs re-rank a Hamming shortlist, since weighted and plain order differ
        n = k if self.bit_weights is None else min(index.ntotal, max(10 * k, 100))
        shortlists = _tie_shortlist(index, packed, n, self.tie_fetch_limit)
        out_d, out_i = [], []
        for q, cont, (dist, ids) in zip(packed, continuous, shortlists):
            d, i = self._rank(q, cont, dist, ids, index.reconstruct(ids), k)
            out_d.append(np.pad(d, (0, k - len(d)), constant_values=PAD_DISTANCE))
            out_i.append(np.pad(i, (0, k - len(i)), constant_values=-1))
        return np.array(out_d), np.array(out_i)

    def _rank(
        self, q: np.ndarray, cont: np.ndarray, dist: np.ndarray, ids: np.ndarray, codes: np.ndarray, k: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Order one query's shortlist (``ids [m]``, Hamming ``dist [m]``, packed ``codes [m, B]``)
        and keep the first ``k``."""
        # One score per distinct code, so that identical codes tie exactly and the id decides.
        rows = np.ascontiguousarray(codes).view(np.dtype((np.void, codes.shape[1]))).ravel()
        _, first, inv = np.unique(rows, return_index=True, return_inverse=True)  # faster than axis=0
        signs = unpack_codes(codes[first], self.bits).astype(np.float64)  # [u, bits]
        # For +-1 codes, <q, b> = sum|q| - 2 * sum of |q_j| over the bits where b disagrees with
        # sign(q): the larger it is, the less sure the query was of the bits that differ.
        score = (signs @ cont.astype(np.float64))[inv]
        if self.bit_weights is not None:
            dist = weighted_hamming(unpack_codes(q[None], self.bits), signs, self.bit_weights)[0][inv]
        order = np.lexsort((ids, -score, dist))[:k]
        return dist[order], ids[order]

    def _hits(self, dist: np.ndarray, ids: np.ndarray, target: str) -> list[Hit]:
        keep = ids >= 0
        ids, dist = ids[keep], dist[keep]
        if target == "text":
            texts = self.store.get_texts(ids.tolist(), missing="none")
            item_ids = [t["item_id"] if t else -1 for t in texts]
        else:
            texts, item_ids = [None] * len(ids), ids.tolist()
        items = self.store.get_items(item_ids, missing="none")
        captions = self.store.texts_of_items(item_ids)
        hits = []
        for rank, (d, text, item, caps) in enumerate(zip(dist, texts, items, captions), start=1):
            if item is None:
                log.warning("id %s is in the %s index but not in the store", item_ids[rank - 1], target)
                continue
            hits.append(Hit(
                rank=rank, item_id=int(item["item_id"]), key=item["key"], distance=float(d),
                image_path=self._image_path(item["image_path"]), captions=[c["caption"] for c in caps],
                labels=item["labels"], text_id=None if text is None else int(text["text_id"]),
                caption="" if text is None else text["caption"],
            ))  # fmt: skip
        return hits

    def _image_path(self, path: str) -> str:
        if not path:
            return ""
        p = Path(path)
        return str(p if p.is_absolute() else (self.run_dir / p).resolve())

    def _run(
        self, queries: list[Any], labels: list[str], source: str, target: str, k: int
    ) -> list[SearchResult]:
        t0 = time.perf_counter()
        encode = self.encode_texts if source == "text" else self.encode_images
        continuous = encode(queries, binarize=False)
        packed = pack_codes(continuous)
        t1 = time.perf_counter()
        dist, ids = self._search(packed, target, k, continuous)
        t2 = time.perf_counter()
        results = []
        for q, code, d, i in zip(labels, packed, dist, ids):
            hits = self._hits(d, i, target)
            results.append(SearchResult(q, f"{source[0]}2{target[0]}", hits, codes_to_hex(code)))
        t3 = time.perf_counter()
        n = len(queries)
        for r in results:
            r.timings_ms = {
                "encode": (t1 - t0) * 1e3 / n,
                "search": (t2 - t1) * 1e3 / n,
                "lookup": (t3 - t2) * 1e3 / n,
            }
        return results

    def search_text(self, query: str, k: int = 10) -> SearchResult:
        """Text -> images."""
        return self._run([query], [query], "text", "image", k)[0]

    def search_image(self, image: ImageInput, k: int = 10) -> SearchResult:
        """Image -> captions."""
        return self._run([image], [_label(image)], "image", "text", k)[0]

    def similar_images(self, image: ImageInput, k: int = 10) -> SearchResult:
        """Image -> images."""
        return self._run([image], [_label(image)], "image", "image", k)[0]

    def similar_texts(self, query: str, k: int = 10) -> SearchResult:
        """Text -> texts."""
        return self._run([query], [query], "text", "text", k)[0]

    def search_text_batch(self, queries: list[str], k: int = 10, target: str = "image") -> list[SearchResult]:
        """Many text queries at once (text -> images, or text -> texts with ``target="text"``)."""
        return self._run(list(queries), list(queries), "text", target, k)

    def search_image_batch(
        self, images: list[ImageInput], k: int = 10, target: str = "text"
    ) -> list[SearchResult]:
        """Many image queries at once (image -> captions, or image -> images)."""
        return self._run(list(images), [_label(i) for i in images], "image", target, k)

    def describe(self) -> dict[str, Any]:
        """What the app's "About this run" panel shows."""
        m = self.manifest
        return {
            "run": str(self.run_dir), "dataset": m.get("dataset", {}).get("name"),
            "image_tower": m.get("image_tower"), "text_tower": m.get("text_tower"), "loss": m.get("loss"),
            "bits": self.bits, "index": m.get("index", {}).get("kind"),
            "items": self.indexes["image"].ntotal, "texts": self.indexes["text"].ntotal,
            "weighted": self.bit_weights is not None, "encoders": self.backend,
        }  # fmt: skip

    def ignored_words(self, query: str) -> list[str]:
        """Words of a usable ``query`` that the text tower cannot represent (out of its vocabulary,
        or unknown tokens of a transformer), and so ignores; empty for an unusable query."""
        try:
            return self.encoders.unknown_words(query)
        except QueryError:
            return []

    def image_roots(self) -> list[Path]:
        """The folders the run's images live in: its thumbnails, the dataset's image folder and
        any folders added with ``crossmodal index --add``. Never the run folder itself."""
        roots = [(Path(self.run_dir) / "images").resolve()]
        image_root = self.manifest.get("dataset_info", {}).get("image_root")
        added = [a.get("source", "") for a in self.manifest.get("index", {}).get("added", [])]
        for folder in [image_root, *added]:
            if folder and Path(folder).is_dir():
                roots.append(Path(folder).resolve())
        return roots

    def label_names(self) -> list[str]:
        """The dataset's label names (empty for captions-only data)."""
        return [str(x) for x in self.store.get_meta("label_names", []) or []]

    def sample_captions(self, n: int = 2000) -> list[str]:
        """Captions of the first ``n`` text entries (for example queries)."""
        return [t["caption"] for t in self.store.get_texts(range(n), missing="none") if t]

    def sample_image_paths(self, n: int) -> list[str]:
        """Absolute paths of about ``n`` database images spread over the store."""
        last = self.store.max_item_id()
        ids = range(0, last + 1, max(1, (last + 1) // max(n, 1)))
        return [self._image_path(i["image_path"]) for i in self.store.get_items(ids, missing="none") if i]

    def metrics(self) -> dict[str, Any] | None:
        """The run's evaluation, ``{row: {direction: {metric: value}}}`` from ``eval/metrics.json``;
        None when it is not evaluated or the file is unreadable."""
        try:
            metrics = json.loads((Path(self.run_dir) / "eval" / "metrics.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(metrics, dict):
            return None
        return metric_rows(metrics) or None

    def close(self) -> None:
        self.store.close()


def set_query_batch_size(index: BinaryIndex, size: int | None) -> None:
    """Let a flat index's FAISS search take ``size`` queries per pass (other kinds have no such
    setting; None leaves FAISS' default)."""
    raw = index.faiss_index
    if not size or raw is None:
        return
    inner = faiss.downcast_IndexBinary(raw.index) if hasattr(raw, "index") else raw  # inside an IDMap
    if hasattr(inner, "query_batch_size"):
        inner.query_batch_size = int(size)


def _default_threads() -> int:
    """FAISS' own thread count, which a thread that set another cannot read back: OMP_NUM_THREADS,
    else every core."""
    try:
        return max(1, int(os.environ.get("OMP_NUM_THREADS", "")))
    except ValueError:
        return os.cpu_count() or 1


def _tie_shortlist(
    index: BinaryIndex, packed: np.ndarray, n: int, limit: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per query, ``(dist, ids)`` of the ``n`` nearest items by Hamming distance and of every item
    tied with the ``n``-th (``n <= index.ntotal``), so that no order inside a tie depends on FAISS.

    A query whose last fetched item still ties the ``n``-th fetches the rest of the tie: a range
    search (flat and ivf, whose range search visits what their search visits), else searches for
    4x more. Either stops ``limit`` items past the ``n``-th, cutting a larger tie.
    """
    limit = min(index.ntotal, n + limit)
    fetch = min(limit, max(2 * n, n + 64))  # one search suffices unless a tie is large
    rows, found = np.arange(len(packed)), [None] * len(packed)
    while True:
        dist, ids = index.search(packed[rows], max(fetch, 1))
        for r, d, i in zip(rows, dist, ids):
            found[r] = (d, i)
        open_tie = (ids[:, -1] >= 0) & (dist[:, -1] <= dist[:, n - 1])
        if fetch >= limit or not open_tie.any():
            break
        rows, fetch = rows[open_tie], min(limit, 4 * fetch)
        if index.kind in ("flat", "ivf"):  # one more pass instead of several larger searches
            radius = int(dist[open_tie, n - 1].max())
            for r, (d, i) in zip(rows, index.range_search(packed[rows], radius)):
                found[r] = (d[:limit], i[:limit])  # sorted by distance, then id
            break
    out = []
    for d, i in found:  # sorted by distance; padding (id -1) comes last, at PAD_DISTANCE
        keep = (i >= 0) & (d <= d[n - 1])
        out.append((d[keep], i[keep]))
    return out


def _label(image: ImageInput) -> str:
    return str(image) if isinstance(image, str | os.PathLike) else "<image>"


__all__ = ["Hit", "QueryError", "RetrievalEngine", "SearchResult"]
