"""Encoding a collection on a Ray cluster: ``crossmodal index --ray [ADDRESS]``.

The driver plans as the single-process job does (which items, their ids, keys, captions and
labels: metadata only, with the same functions of ``crossmodal.jobs.index``; for Parquet or
WebDataset shards, ``crossmodal.data.shards`` reads their metadata columns only). Ray Data
reads the images in blocks on the workers (``read_binary_files`` for image files,
``read_parquet`` / ``read_webdataset`` for shards; images a built dataset holds inline go as
Arrow blocks from the driver) and the texts, and ``map_batches`` runs them through an actor
pool whose actors load the run's encoders once each: its exported ONNX encoders when it has
them, else its torch model, the same choice as serving (``crossmodal.serving.encoders``). The
actors check the images of shards as a build would, write their thumbnails, and write Parquet
shards of packed codes:

    <shards>/image/*.parquet    id int64, code fixed_size_binary[bits / 8], error string
    <shards>/text/*.parquet     id int64, code fixed_size_binary[bits / 8], error string
    <shards>/thumbnails/<id>.png

The driver reads the shards back in id order and builds the FAISS indexes (an IVF index
trained on a sample of them) and the store, through the same journaled ``RunUpdate`` as
without Ray: a job that fails or is killed leaves the run as it was. Shards go to a hidden
folder inside the run (``.staging-ray-*``, removed by the next writer if a job is killed), or
under ``--shards DIR`` (shared storage a cluster's workers can write to); they are removed once
the run is updated.

Ray is imported only here, and only when ``--ray`` is asked for (the ``distributed`` extra).
"""

from __future__ import annotations

import importlib
import logging
import math
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from crossmodal.codes import pack_codes
from crossmodal.images import ImageDecodeError, open_image, thumbnail_bytes
from crossmodal.index import BinaryIndex, create_index, default_nlist
from crossmodal.io import atomic_path
from crossmodal.runs.exported import ENCODERS_FILE, EncoderFileError, OnnxEncoders, read_spec
from crossmodal.runs.folder import STAGING_PREFIX, RunError, read_manifest

if TYPE_CHECKING:  # crossmodal.data imports datasets: a second an actor that does not need it
    from crossmodal.data.shards import Shards

log = logging.getLogger(__name__)

SHARD_PREFIX = f"{STAGING_PREFIX}ray-"  # inside a run: cleaned by recover_run after a kill
MAX_BLOCK_ROWS = 1024  # rows of a Ray block: about 50 MB of typical images
# Ray Data's loggers of a failed task (with its stack), shown only with -v: RunError says it
RAY_FAILURE_LOGGERS = ("ray.data._internal.execution.streaming_executor_state", "ray.data.exceptions")
IVF_SAMPLE_PER_LIST = 64  # training codes per IVF list (FAISS wants 39 to 256; docs/scaling.md)


@dataclass
class RayOptions:
    """How ``crossmodal index --ray`` runs.

    Attributes:
        address: the Ray cluster (``auto``, ``ray://host:10001``); None starts a local one
            (or joins the one ``RAY_ADDRESS`` names). A cluster already connected in this
            process is used as it is.
        shards: a folder for the code shards, on storage every worker can write and the
            driver read; None: a hidden folder inside the run.
        workers: actors in the encoding pool (default: the cluster's CPUs less one, at least 1).
        batch_size: images or texts per ``map_batches`` call.
        progress: Ray Data's progress bars.
    """

    address: str | None = None
    shards: str | None = None
    workers: int | None = None
    batch_size: int = 64
    progress: bool = True


@dataclass(frozen=True)
class ShardRead:
    """How an actor takes the image rows of shards it reads itself (``crossmodal.data.shards``).

    Attributes:
        key_column, image_column: the columns of a row's key and image (an ``Image`` struct,
            bytes or a path, as ``hub_image`` takes them).
        key_ids: the planned keys and their ids; rows of other keys are dropped.
        base: the folder relative image paths are read from.
        check: ``check_image``'s mode, the one the source's ``load_hub`` build would use.
        thumbnails: the folder the thumbnails go to, as ``<id>.png``.
    """

    key_column: str
    image_column: str
    key_ids: dict[str, int]
    base: str
    check: str
    thumbnails: str


class Encode:
    """The actor of the encoding pool: a run's encoders, loaded once, over blocks of rows.

    Rows are ``{"id", "bytes"}`` (images held inline), ``{"path", "bytes"}`` (image files:
    ``path_ids`` maps each path to its id), ``{"id", "text"}``, or the rows of shards (``shards``:
    matched by key, checked, thumbnailed); each batch becomes a table ``id int64, code
    fixed_size_binary[bits / 8], error string``. ``error`` is null but for the rows of shards
    whose image is not usable (their code is null): those are left out, as a build leaves them.
    """

    def __init__(
        self, run_dir: str, backend: str, modality: str, bits: int, imports: tuple[str, ...] = (),
        path_ids: dict[str, int] | None = None, shards: ShardRead | None = None,
    ) -> None:  # fmt: skip
        for module in imports:  # the modules that register the run's own towers
            importlib.import_module(module)
        self.encoders = OnnxEncoders.load(run_dir, threads=1) if backend == "onnx" else TorchCodes(run_dir)
        self.modality, self.path_ids, self.shards, self.width = modality, path_ids or {}, shards, bits // 8

    def __call__(self, batch: Any) -> Any:
        import pyarrow as pa

        errors: list[str | None]
        if self.shards is not None:
            ids, inputs, errors = self.shard_rows(batch)
        elif "path" in batch.column_names:  # image files, named by their paths
            names = [str(p) for p in batch["path"].to_pylist()]
            ids = [self.path_ids[p] for p in names]
            inputs = [self.decode(d, n) for d, n in zip(batch["bytes"].to_pylist(), names)]
            errors = [None] * len(ids)
        else:
            ids = batch["id"].to_pylist()
            if self.modality == "text":
                inputs = batch["text"].to_pylist()
            else:
                inputs = [self.decode(d, f"id {i}") for d, i in zip(batch["bytes"].to_pylist(), ids)]
            errors = [None] * len(ids)
        good = [k for k, e in enumerate(errors) if e is None]
        rows: list[bytes | None] = [None] * len(ids)
        if good:
            encode = self.encoders.encode_texts if self.modality == "text" else self.encoders.encode_images
            for k, row in zip(good, pack_codes(encode([inputs[k] for k in good]))):  # [b, bits / 8]
                rows[k] = row.tobytes()
        return pa.table({"id": pa.array(ids, pa.int64()), "code": pa.array(rows, pa.binary(self.width)),
                         "error": pa.array(errors, pa.string())})  # fmt: skip

    def shard_rows(self, batch: Any) -> tuple[list[int], list[Any], list[str | None]]:
        """The planned rows of a block of shards: ids, decoded images (None where unusable) and why
        each is unusable (``check_image``'s words, as ``load_hub`` records them; None if usable).
        Each usable image's thumbnail is written to ``shards.thumbnails``."""
        from crossmodal.data.captions import check_image, hub_image
        from crossmodal.data.shards import NO_IMAGE

        read = self.shards
        base, out = Path(read.base), Path(read.thumbnails)
        keys = batch[read.key_column].to_pylist()
        # a block of samples without the image member has no such column
        has_images = read.image_column in batch.column_names
        values = batch[read.image_column].to_pylist() if has_images else [None] * len(keys)
        ids, images, errors = [], [], []
        for key, value in zip(keys, values):
            item = read.key_ids.get(str(key))
            if item is None:  # not planned: left out by the plan, or in the run already
                continue
            data = hub_image(value, base)
            why = NO_IMAGE if data is None else check_image(data, read.check)
            image = None
            if why is None:  # what the check let through is encoded, or the job fails, as without Ray
                try:
                    image = open_image(data)
                except ImageDecodeError as exc:
                    hint = f"check_images={read.check} let it through (-o check_images=full leaves it out)"
                    raise ImageDecodeError(f"item {key}: {exc}; {hint}") from None
                try:
                    thumbnail = thumbnail_bytes(data)
                except ImageDecodeError:
                    pass  # no thumbnail: the store names none, as without Ray
                else:
                    with atomic_path(out / f"{item}.png", fsync=False) as tmp:
                        tmp.write_bytes(thumbnail)
            ids.append(item)
            images.append(image)
            errors.append(why)
        return ids, images, errors

    @staticmethod
    def decode(data: bytes, name: Any) -> Any:
        """The decoded image (``open_image``, as without Ray).

        Raises:
            ImageDecodeError: naming the file or id.
        """
        try:
            return open_image(bytes(data))
        except ImageDecodeError as exc:
            raise ImageDecodeError(f"item {name}: {exc}") from None


class TorchCodes:
    """A run's torch model over decoded images and texts, as ``crossmodal index`` encodes them
    without Ray (``crossmodal.runs.encode``): continuous codes ``float32 [n, bits]``."""

    def __init__(self, run_dir: str) -> None:
        import torch

        from crossmodal.runs.model import load_model

        torch.set_num_threads(1)  # one core an actor
        self.torch, self.model = torch, load_model(run_dir)

    def encode_images(self, images: list[Any]) -> np.ndarray:
        tower = self.model.image_tower
        with self.torch.no_grad():
            return self.model.encode_image(self.torch.stack([tower.preprocess(i) for i in images])).numpy()

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        with self.torch.no_grad():
            return self.model.encode_text(self.model.text_tower.tokenize(texts)).numpy()


def choose_backend(run_dir: Path) -> str:
    """``"onnx"`` when the run lists exported encoders made from its current model, else ``"torch"``
    (the serving engine's choice, ``crossmodal.serving.encoders``).

    Raises:
        RunError: the exported encoders are unreadable, or were made from another model.
    """
    manifest = read_manifest(run_dir)
    if ENCODERS_FILE not in manifest.get("files", {}):
        return "torch"
    hint = f"re-run: crossmodal export --run {run_dir}"
    try:
        spec = read_spec(run_dir)
    except EncoderFileError as exc:
        raise RunError(f"{run_dir}: {exc}; {hint}") from None
    if any(manifest["files"].get(name) != sha for name, sha in spec.source.items()):
        raise RunError(f"{run_dir}: the exported encoders were made from another model than the "
                       f"run's; {hint}")  # fmt: skip
    return "onnx"


@contextmanager
def ray_session(address: str | None) -> Iterator[Any]:
    """``ray`` connected to ``address`` for the with-block (shut down after, if connected here)."""
    import ray

    if ray.is_initialized():
        yield ray
        return
    ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


@contextmanager
def shard_folder(run_dir: Path, shards: str | None) -> Iterator[Path]:
    """A new folder for one job's shards: inside the run, or under ``shards``; removed after a
    successful update (a failed job's shards under ``shards`` are kept and named)."""
    base = Path(shards) if shards else run_dir
    base.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=SHARD_PREFIX if not shards else "crossmodal-shards-", dir=base))
    try:
        yield folder
    except BaseException:
        if shards:
            log.warning("the shards of the failed job are left in %s", folder)
        else:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    shutil.rmtree(folder, ignore_errors=True)


def plugin_modules(model: Any) -> tuple[str, ...]:
    """Modules outside crossmodal that define the towers of a torch model (registered by their
    import), for the workers to import before they rebuild the model."""
    found = {type(t).__module__ for t in (model.image_tower, model.text_tower)}
    return tuple(sorted(m for m in found if m.split(".")[0] != "crossmodal"))


def _rows_per_block(n: int, workers: int, batch_size: int) -> int:
    """Enough blocks to keep every worker busy, none larger than ``MAX_BLOCK_ROWS``."""
    return int(min(MAX_BLOCK_ROWS, max(batch_size, math.ceil(n / (4 * workers)))))


class RayJob:
    """One ``--ray`` job: a connected cluster, the run's encoders by name, and a shard folder.

    Args:
        ray: the connected ``ray`` module (``ray_session``).
        run_dir: the run, on storage the workers read (they load its encoders).
        model: the run's torch model, loaded by the driver (its towers' modules are imported
            by the workers).
        folder: where this job's shards go (``shard_folder``).
    """

    def __init__(self, ray: Any, run_dir: Path, options: RayOptions, model: Any, folder: Path) -> None:
        self.ray, self.run_dir, self.options, self.folder = ray, run_dir, options, folder
        self.backend, self.bits = choose_backend(run_dir), int(model.bits)
        self.imports = plugin_modules(model) if self.backend == "torch" else ()
        cpus = float(ray.cluster_resources().get("CPU", 1))
        self.workers = int(options.workers or max(1, int(cpus) - 1))
        # one CPU is left to the reading and writing tasks, or the pool starves them (Ray counts
        # CPUs, it does not bind them: each actor still runs as fast as its core lets it)
        self.actor_cpus = min(1.0, max(0.1, (cpus - 1) / self.workers))
        self.ray.data.DataContext.get_current().enable_progress_bars = options.progress
        if not options.progress:  # bars asked off (a script's stderr): Ray would warn that they are
            logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
        if not log.isEnabledFor(logging.INFO):  # Ray Data narrates every dataset it runs
            logging.getLogger("ray.data").setLevel(logging.WARNING)
            for name in RAY_FAILURE_LOGGERS:  # a failed block: the job's error says it in one line
                logging.getLogger(name).setLevel(logging.CRITICAL)
        log.info("encoding on Ray with %d %s workers (%.2f CPUs each); shards in %s",
                 self.workers, self.backend, self.actor_cpus, folder)  # fmt: skip

    def encode_images(self, dataset: Any, positions: np.ndarray, ids: np.ndarray) -> None:
        """Encode the images of ``dataset``'s items ``positions`` into ``image/`` shards, under ``ids``."""
        import pyarrow as pa
        import pyarrow.compute as pc

        if not len(positions):
            return
        table = dataset.table.select(np.asarray(positions).tolist()).with_format("arrow")[:]
        lengths = pc.fill_null(pc.binary_length(table["image_bytes"]), 0)  # files: no bytes, or null
        inline = np.asarray(pc.greater(lengths, 0).to_numpy(zero_copy_only=False), dtype=bool)
        ids = np.asarray(ids, dtype=np.int64)
        if inline.any():
            images = table["image_bytes"].filter(pa.array(inline))
            rows = pa.table({"id": pa.array(ids[inline]), "bytes": images})
            self._run(self._from_arrow(rows), "image")
        if not inline.all():
            root = Path(dataset.info.image_root)
            names = np.asarray(table["image_path"].to_pylist(), dtype=object)[~inline]
            paths = [str((root / name).resolve()) for name in names]
            self._run(self.read_files(paths), "image", dict(zip(paths, ids[~inline].tolist())))

    def read_files(self, paths: list[str]) -> Any:
        """A Ray dataset of ``{"bytes", "path"}`` rows of the image files ``paths``, read in blocks."""
        blocks = math.ceil(len(paths) / _rows_per_block(len(paths), self.workers, self.options.batch_size))
        return self.ray.data.read_binary_files(paths, include_paths=True, override_num_blocks=blocks,
                                               num_cpus=0.25)  # fmt: skip

    def encode_texts(self, ids: list[int] | np.ndarray, texts: list[str]) -> None:
        """Encode ``texts`` into ``text/`` shards, under ``ids``."""
        import pyarrow as pa

        if len(texts):
            self._run(self._from_arrow(pa.table({"id": pa.array(np.asarray(ids, np.int64)),
                                                 "text": pa.array(texts, pa.string())})), "text")  # fmt: skip

    def _from_arrow(self, table: Any) -> Any:
        step = _rows_per_block(table.num_rows, self.workers, self.options.batch_size)
        return self.ray.data.from_arrow([table.slice(s, step) for s in range(0, table.num_rows, step)])

    def _run(self, ds: Any, modality: str, path_ids: dict[str, int] | None = None,
             shards: ShardRead | None = None) -> None:  # fmt: skip
        """``ds`` through the actor pool into Parquet shards under ``folder / modality``."""
        kwargs = dict(run_dir=str(self.run_dir), backend=self.backend, modality=modality, bits=self.bits,
                      imports=self.imports, path_ids=path_ids, shards=shards)
        encoded = ds.map_batches(
            Encode, fn_constructor_kwargs=kwargs, batch_size=self.options.batch_size, batch_format="pyarrow",
            compute=self.ray.data.ActorPoolStrategy(size=self.workers), num_cpus=self.actor_cpus,
        )  # fmt: skip
        try:
            with warnings.catch_warnings():  # a small collection reads as fewer blocks than actors
                warnings.filterwarnings("ignore", "The minimum number of concurrent actors", UserWarning)
                encoded.write_parquet(str(self.folder / modality), ray_remote_args={"num_cpus": 0.25})
        except Exception as exc:  # Ray wraps the worker's error: _worker_error finds it
            why = _worker_error(exc)
            raise RunError(f"encoding {modality}s on Ray failed, nothing was changed: {why}") from exc

    def encode_shard_images(self, shards: Shards, key_ids: dict[str, int]) -> None:
        """Encode the images of the keys ``key_ids`` (key: id) in ``shards``' files into ``image/``
        shards, and their thumbnails into ``thumbnails/<id>.png``: the workers read the files
        (``read_parquet`` of the key and image columns only, ``read_webdataset`` of the image
        members only) and drop the rows of other keys. Unusable images are recorded in the
        shards' ``error`` column, not raised (``read_shards``)."""
        from pyarrow.fs import LocalFileSystem

        log.info("the workers read the images of %d items from %d %s files", len(key_ids), len(shards.files),
                 shards.format)  # fmt: skip
        files = list(shards.files)
        # at least a few blocks a worker; a file yields one or more (Ray splits what it reads)
        blocks = max(len(files), 4 * self.workers)
        read = {"filesystem": LocalFileSystem(), "num_cpus": 0.25, "override_num_blocks": blocks}
        if shards.format == "parquet":
            ds = self.ray.data.read_parquet(files, **read)  # the projection is pushed into the file scan
            ds = ds.select_columns([shards.id_column, shards.image_column])
        else:  # rows: __key__, __url__ and the image member's undecoded bytes
            ds = self.ray.data.read_webdataset(files, decoder=None, suffixes=[shards.image_column], **read)
        rows = ShardRead(shards.id_column, shards.image_column, key_ids, shards.base, shards.check_images,
                         str(self.folder / "thumbnails"))  # fmt: skip
        self._run(ds, "image", shards=rows)

    def codes(
        self, modality: str, expected: np.ndarray, read: tuple | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The shards of ``modality``: ``(ids int64 [n] sorted, packed uint8 [n, bits / 8])``;
        ``read``: what ``read_shards`` gave for them already.

        Raises:
            RunError: the shards do not hold exactly the ids ``expected``.
        """
        ids, packed, _ = read or read_shards(self.folder / modality)
        order = np.argsort(ids, kind="stable")
        ids, packed = ids[order], packed[order]
        if not np.array_equal(ids, np.sort(np.asarray(expected, dtype=np.int64))):
            raise RunError(f"the {modality} shards in {self.folder} hold {len(ids)} codes, not the "
                           f"{len(expected)} of the job; nothing was changed")  # fmt: skip
        return ids, packed


def _worker_error(exc: BaseException) -> str:
    """The worker's own error (``module.SomeError: message``) in the traceback text Ray's wrapper
    carries; else the wrapper's first line."""
    text = "\n".join(str(e) for e in (exc, exc.__cause__) if e is not None)
    for line in text.splitlines():
        found = _ERROR_LINE.match(line.strip())
        if found and not found.group(1).startswith("ray."):
            return f"{found.group(1).rsplit('.', 1)[-1]}: {found.group(2)}"
    return next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__)


_ERROR_LINE = re.compile(r"^([\w.]*(?:Error|Exception)): (.+)$")


def read_shards(folder: Path) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    """``(ids int64 [n], packed uint8 [n, w], {id: why})`` of every Parquet shard in ``folder`` (in
    file order): the rows with a code, and the rows left out with the reason."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    files = sorted(folder.glob("*.parquet")) if folder.is_dir() else []
    if not files:
        return np.zeros(0, np.int64), np.zeros((0, 0), np.uint8), {}
    table = pq.read_table([str(f) for f in files], columns=["id", "code", "error"])
    failed = pc.is_valid(table["error"])
    left_out = table.filter(failed)
    failures = dict(zip(left_out["id"].to_pylist(), left_out["error"].to_pylist()))
    table = table.filter(pc.invert(failed))
    codes = table["code"].combine_chunks()
    width = codes.type.byte_width
    data = np.frombuffer(codes.buffers()[1], dtype=np.uint8)
    packed = data[codes.offset * width:(codes.offset + len(codes)) * width].reshape(len(codes), width)
    return table["id"].to_numpy().astype(np.int64), packed, failures


def fill_index(index: BinaryIndex, ids: np.ndarray, packed: np.ndarray, chunk: int = 65536) -> BinaryIndex:
    """Add codes to ``index`` in id order; an untrained IVF index first trains on a sample of them
    (``IVF_SAMPLE_PER_LIST`` a list, its ``nlist`` following all the codes, not the sample)."""
    if index.kind == "ivf" and not index.is_trained and len(ids):
        index.params["nlist"] = int(index.params["nlist"] or default_nlist(len(ids)))
        size = min(len(ids), IVF_SAMPLE_PER_LIST * index.params["nlist"])
        sample = np.sort(np.random.default_rng(0).choice(len(ids), size=size, replace=False))
        index.train(packed[sample])
    for s in range(0, len(ids), chunk):
        index.add(packed[s:s + chunk], ids[s:s + chunk])
    return index


def _check_captions(dataset: Any) -> None:
    if dataset.info.bow_dim:
        raise RunError(f"--ray encodes captions, and {dataset.name!r} holds bag-of-words vectors instead: "
                       "index it without --ray")  # fmt: skip


def add_on_ray(
    run_dir: Path, options: RayOptions, model: Any, indexes: dict[str, BinaryIndex], dataset: Any,
    positions: np.ndarray, item_ids: np.ndarray, units: list[dict[str, Any]],
) -> None:  # fmt: skip
    """``index --add --ray``: encode the images of ``dataset``'s items ``positions`` and the texts
    ``units`` on Ray, and add their codes to ``indexes`` under ``item_ids`` and the units' text ids.

    Raises:
        RunError: the encoding failed (the message says why); the run is unchanged.
    """
    _check_captions(dataset)
    text_ids = np.array([u["text_id"] for u in units], dtype=np.int64)
    with ray_session(options.address) as ray, shard_folder(run_dir, options.shards) as folder:
        job = RayJob(ray, run_dir, options, model, folder)
        job.encode_images(dataset, positions, item_ids)
        job.encode_texts(text_ids, [u["caption"] for u in units])
        fill_index(indexes["image"], *job.codes("image", item_ids))
        fill_index(indexes["text"], *job.codes("text", text_ids))


def index_on_ray(
    run_dir: Path, options: RayOptions, kind: str, params: dict[str, Any], model: Any, dataset: Any,
    database: np.ndarray, units: list[dict[str, Any]], added: Any, added_images: Any = None,
) -> tuple[BinaryIndex, BinaryIndex]:  # fmt: skip
    """``index --ray``: the run's image and text indexes of kind ``kind``, encoded on Ray.

    Args:
        database: positions of the dataset's served items (their ids).
        units: text entries (``text_units``); added: the run's added items (``stored_additions``),
            encoded from their stored images (``added_images``, a dataset of them in that
            order: ``stored_images``) and captions under the ids they have.

    Raises:
        RunError: the encoding failed (the message says why).
    """
    _check_captions(dataset)
    texts = [*units, *added.texts]
    item_ids = np.concatenate([database, [it["item_id"] for it in added.items]]).astype(np.int64)
    text_ids = np.array([t["text_id"] for t in texts], dtype=np.int64)
    with ray_session(options.address) as ray, shard_folder(run_dir, options.shards) as folder:
        job = RayJob(ray, run_dir, options, model, folder)
        job.encode_images(dataset, database, database)
        if added.items:
            job.encode_images(added_images, np.arange(len(added.items)), item_ids[len(database):])
        job.encode_texts(text_ids, [t["caption"] for t in texts])
        image_index = fill_index(create_index(kind, model.bits, **params), *job.codes("image", item_ids))
        text_index = fill_index(create_index(kind, model.bits, **params), *job.codes("text", text_ids))
    return image_index, text_index


@dataclass
class ShardAdd:
    """What ``add_shards_on_ray`` added: ``kept`` (bool [n], the planned items whose image was
    usable), their ``item_ids`` (numbered on from the first planned id, as a build that had left
    the others out would number them), their ``texts`` (``units_of``'s entries), the store's
    ``paths`` of their thumbnails (``""`` where none could be made) and ``failures`` (``{key: why}``
    of the items left out)."""

    kept: np.ndarray
    item_ids: np.ndarray
    texts: list[dict[str, Any]]
    paths: list[str]
    failures: dict[str, str]


def add_shards_on_ray(
    run_dir: Path, options: RayOptions, model: Any, indexes: dict[str, BinaryIndex], shards: Shards,
    keys: list[str], item_ids: np.ndarray, units_of: Any, no_image: set[str] | frozenset[str] = frozenset(),
) -> ShardAdd:  # fmt: skip
    """``index --add --ray`` of a source whose images the workers read from its shards themselves
    (``crossmodal.data.shards``): encode the images of ``keys`` (planned as ``item_ids``, numbered
    on from the run's next id), leave out those that are not usable, encode the texts
    ``units_of(kept, ids)`` gives for the rest, and add both to ``indexes``; the thumbnails are
    moved into the run's ``images/``. Keys in ``no_image`` (samples without an image member, which
    no worker sees) are left out as ``no image data``.

    Raises:
        RunError: the encoding failed (the message says why); the run's indexes and store are
            unchanged.
    """
    from crossmodal.data.shards import NO_IMAGE

    item_ids = np.asarray(item_ids, dtype=np.int64)
    with ray_session(options.address) as ray, shard_folder(run_dir, options.shards) as folder:
        job = RayJob(ray, run_dir, options, model, folder)
        key_ids = dict(zip(keys, item_ids.tolist()))
        job.encode_shard_images(shards, {k: i for k, i in key_ids.items() if k not in no_image})
        images = read_shards(folder / "image")  # read once: its left-out rows, then its codes
        failed = {**images[2], **{key_ids[k]: NO_IMAGE for k in no_image if k in key_ids}}
        kept = np.array([int(i) not in failed for i in item_ids], dtype=bool)
        planned, ids = item_ids[kept], item_ids[0] + np.arange(int(kept.sum()), dtype=np.int64)
        texts = units_of(kept, ids)
        text_ids = np.array([t["text_id"] for t in texts], dtype=np.int64)
        job.encode_texts(text_ids, [t["caption"] for t in texts])
        fill_index(indexes["image"], ids, job.codes("image", planned, images)[1])  # id order, as ``planned``
        fill_index(indexes["text"], *job.codes("text", text_ids))
        paths = move_thumbnails(folder / "thumbnails", planned, ids, run_dir)
    by_id = dict(zip(item_ids.tolist(), keys))
    return ShardAdd(kept, ids, texts, paths, {by_id[i]: why for i, why in sorted(failed.items())})


def move_thumbnails(folder: Path, planned: np.ndarray, ids: np.ndarray, run_dir: Path) -> list[str]:
    """Move the workers' thumbnails ``folder/<planned id>.png`` to ``run_dir/images/<id>.png``;
    the store's paths of them (``""`` where a worker made none)."""
    paths = []
    (run_dir / "images").mkdir(exist_ok=True)
    for old, new in zip(planned.tolist(), ids.tolist()):
        source, rel = folder / f"{old}.png", f"images/{new}.png"
        if not source.is_file():
            paths.append("")
            continue
        try:
            os.replace(source, run_dir / rel)
        except OSError:  # shards on another file system (--shards): copied, then renamed
            with atomic_path(run_dir / rel, fsync=False) as tmp:
                shutil.copyfile(source, tmp)
        paths.append(rel)
    if paths and hasattr(os, "sync"):
        os.sync()  # the thumbnails reach the disk before the store that names them is committed
    return paths
