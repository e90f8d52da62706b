"""``crossmodal index --ray``: encoding on a local Ray cluster (``num_cpus=2``) gives the codes, ids
and store rows of the single-process path, keeps the run's index kind, and a job that fails
half-way leaves the run as it was.

One cluster serves the module (started once: several seconds); every test here encodes a
folder of a dozen images.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import sys
from pathlib import Path

import numpy as np
import pytest

from crossmodal.cli import main

slow = pytest.mark.slow  # a Ray job takes several seconds even on a dozen images

TESTS = Path(__file__).resolve().parent
RAY_HINT = "crossmodal index --ray needs the distributed extra: pip install 'crossmodal[distributed]'"


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster of 2 CPUs, quiet and small; its workers import ``tinyrun`` (the tiny
    run's tower) from this folder."""
    import ray  # the test extra installs the distributed extra

    with pytest.MonkeyPatch.context() as mp:
        quiet = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_DEDUP_LOGS": "0", "RAY_AUTH_MODE": "disabled"}
        for name, value in quiet.items():
            mp.setenv(name, value)
        path = os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=80 * 2**20, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": path}})  # fmt: skip
        try:
            yield ray
        finally:
            ray.shutdown()


def ray_options(workers: int = 2, **kw):
    from crossmodal.jobs.ray_encode import RayOptions

    return RayOptions(workers=workers, batch_size=4, progress=False, **kw)


def copy_run(run: Path, to: Path) -> Path:
    shutil.copytree(run, to, ignore=shutil.ignore_patterns("checkpoint"))
    return to


def contents(run: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``run``."""
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run.rglob("*")) if p.is_file()}  # fmt: skip


def indexed(run: Path) -> dict[str, tuple[str, np.ndarray, np.ndarray]]:
    """``{modality: (kind, ids, packed codes)}`` of a run's two indexes."""
    from crossmodal.index import BinaryIndex

    out = {}
    for m in ("image", "text"):
        index = BinaryIndex.load(run / f"{m}.index")
        ids = index.ids()
        out[m] = (index.kind, ids, index.reconstruct(ids))
    return out


def store_rows(run: Path) -> dict[str, list[tuple]]:
    with sqlite3.connect(run / "store.sqlite") as conn:
        return {table: conn.execute(f"SELECT * FROM {table} ORDER BY 1").fetchall()
                for table in ("items", "texts", "meta")}  # fmt: skip


def assert_same_run(a: Path, b: Path) -> None:
    got, want = indexed(a), indexed(b)
    for m in ("image", "text"):
        assert got[m][0] == want[m][0]
        np.testing.assert_array_equal(got[m][1], want[m][1])
        np.testing.assert_array_equal(got[m][2], want[m][2])
    assert store_rows(a) == store_rows(b)


@slow
def test_an_added_folder_is_encoded_as_without_ray(ray_cluster, tiny_run, tmp_path):
    from tinyrun import image_folder

    from crossmodal.jobs.index import add_to_run

    folder = image_folder(tmp_path / "new", 12, labels=True)
    single, on_ray = copy_run(tiny_run, tmp_path / "single"), copy_run(tiny_run, tmp_path / "ray")
    want = add_to_run(single, str(folder), progress=False)
    got = add_to_run(on_ray, str(folder), progress=False, ray=ray_options(shards=str(tmp_path / "shards")))
    assert got == want
    assert got["added_items"] == 12
    assert_same_run(on_ray, single)
    assert not list((tmp_path / "shards").iterdir())  # shards removed once the run is updated
    assert not list(on_ray.glob(".staging-*"))


@slow
def test_a_whole_index_keeps_the_runs_kind_and_codes(ray_cluster, tiny_run, tmp_path):
    """Re-indexing on Ray (one worker, shards inside the run) as IVF gives the single-process codes."""
    from crossmodal.jobs.index import index_run

    single, on_ray = copy_run(tiny_run, tmp_path / "single"), copy_run(tiny_run, tmp_path / "ray")
    want = index_run(single, kind="ivf", progress=False)
    got = index_run(on_ray, kind="ivf", progress=False, ray=ray_options(workers=1))
    assert got["kind"] == want["kind"] == "ivf" and got["params"] == want["params"]
    assert_same_run(on_ray, single)
    assert not list(on_ray.glob(".staging-*"))


@slow
def test_exported_encoders_encode_on_ray(ray_cluster, tiny_run, tmp_path):
    """A run with exported encoders is encoded by them (no torch model in the workers)."""
    from tinyrun import image_folder

    from crossmodal.codes import pack_codes
    from crossmodal.images import open_image
    from crossmodal.jobs.export import export_run
    from crossmodal.jobs.index import add_to_run
    from crossmodal.runs.exported import OnnxEncoders

    run = copy_run(tiny_run, tmp_path / "run")
    export_run(run, progress=False)
    folder = image_folder(tmp_path / "new", 10)
    add_to_run(run, str(folder), progress=False, ray=ray_options())
    onnx = OnnxEncoders.load(run)
    paths = sorted(folder.glob("*.png"))
    want = pack_codes(onnx.encode_images([open_image(p) for p in paths]))
    with sqlite3.connect(run / "store.sqlite") as conn:
        id_of = dict(conn.execute("SELECT image_path, item_id FROM items").fetchall())
    ids = [id_of[str(p.resolve())] for p in paths]
    _, _, codes = indexed(run)["image"]
    got = dict(zip(indexed(run)["image"][1].tolist(), codes))
    np.testing.assert_array_equal(np.stack([got[i] for i in ids]), want)


@slow
def test_a_job_that_fails_half_way_leaves_the_run_as_it_was(ray_cluster, tiny_run, tmp_path, monkeypatch):
    """An image that breaks after the plan (truncated on disk) fails a worker's batch: the job stops
    with one message naming it, and every file of the run is as before, shards gone."""
    from tinyrun import image_folder

    from crossmodal.jobs import ray_encode
    from crossmodal.jobs.index import add_to_run
    from crossmodal.runs.folder import RunError

    folder = image_folder(tmp_path / "new", 12)
    run = copy_run(tiny_run, tmp_path / "run")
    before = contents(run)
    read_files = ray_encode.RayJob.read_files

    def break_one(self, paths):
        Path(paths[7]).write_bytes(Path(paths[7]).read_bytes()[:60])
        return read_files(self, paths)

    monkeypatch.setattr(ray_encode.RayJob, "read_files", break_one)
    with pytest.raises(RunError, match="encoding images on Ray failed, nothing was changed: .*new0007.png"):
        add_to_run(run, str(folder), progress=False, ray=ray_options())
    assert contents(run) == before


@slow
def test_the_command_line_adds_on_ray(ray_cluster, tiny_run, tmp_path, capsys):
    from tinyrun import image_folder

    folder = image_folder(tmp_path / "new", 8)
    run = copy_run(tiny_run, tmp_path / "run")
    assert main(["index", "--run", str(run), "--add", str(folder), "--ray", "--ray-workers", "1"]) == 0
    assert "added 8 items" in capsys.readouterr().out


def test_ray_without_the_distributed_extra_says_so_in_one_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)
    assert main(["index", "--run", "runs/none", "--ray"]) == 2
    assert capsys.readouterr().err == RAY_HINT + "\n"
    assert main(["index", "--run", "runs/none", "--shards", "x"]) == 2
    assert "--shards and --ray-workers go with --ray" in capsys.readouterr().err


def test_the_shards_of_a_killed_job_go_with_the_next_writer(tiny_run_copy):
    """A job killed while its workers wrote shards inside the run leaves ``.staging-ray-*``: the
    next command that writes the run removes it (``recover_run``), and the run's files are untouched."""
    from crossmodal.jobs.ray_encode import SHARD_PREFIX
    from crossmodal.runs.folder import recover_run

    before = contents(tiny_run_copy)
    left = tiny_run_copy / f"{SHARD_PREFIX}killed" / "image"
    left.mkdir(parents=True)
    (left / "part-0.parquet").write_bytes(b"PAR1")
    recover_run(tiny_run_copy)
    assert not (tiny_run_copy / f"{SHARD_PREFIX}killed").exists()
    assert contents(tiny_run_copy) == before


def shard_rows(rng: np.random.Generator) -> list[tuple[str, bytes | None, str, int]]:
    """``(key, image bytes or None, caption, class)`` of a dozen items, one of them with a corrupt
    image and one without any."""
    from tinyrun import COLOURS, colour_image

    rows = [(f"{i:06d}", colour_image(COLOURS[name], rng), f"a {name} circle", i % 3)
            for i, name in enumerate(list(COLOURS) * 3)]  # fmt: skip
    rows[4] = (rows[4][0], rows[4][1][:40], rows[4][2], rows[4][3])  # cut short: not decodable
    rows[7] = (rows[7][0], None, rows[7][2], rows[7][3])
    return rows


def added_alike(tiny_run: Path, tmp_path: Path, options: dict, monkeypatch) -> tuple[Path, dict]:
    """The run ``tiny_run`` with the ``hub`` source ``options`` added in one process and on Ray;
    asserts that the two runs, their thumbnails and what the add says are the same, and that the
    Ray add's driver read no image (it neither builds the dataset nor opens the shards' images)."""
    import crossmodal.jobs.index as index_job
    from crossmodal.jobs.index import add_to_run

    single, on_ray = copy_run(tiny_run, tmp_path / "single"), copy_run(tiny_run, tmp_path / "ray")
    want = add_to_run(single, "hub", options, progress=False)
    with monkeypatch.context() as mp:
        mp.setattr(index_job, "open_dataset", lambda *a, **k: pytest.fail("the driver built the dataset"))
        got = add_to_run(on_ray, "hub", options, progress=False, ray=ray_options())
    assert got == want
    assert_same_run(on_ray, single)
    assert contents(on_ray / "images") == contents(single / "images")
    return on_ray, got


@slow
def test_webdataset_shards_are_read_by_the_workers(ray_cluster, tiny_run, tmp_path, monkeypatch):
    """WebDataset-style shards (``.tar`` of ``KEY.png`` + ``KEY.txt`` + ``KEY.cls``): the driver
    reads the keys and the small members, the workers the images; the run is the one a
    single-process add gives, unusable images left out and said the same way."""
    import io
    import tarfile

    (tmp_path / "shards").mkdir()
    rows = shard_rows(np.random.default_rng(0))
    for part in range(2):
        with tarfile.open(tmp_path / "shards" / f"shard-{part:06d}.tar", "w") as tar:
            for key, image, caption, cls in rows[part * 6:(part + 1) * 6]:
                members = {"txt": caption.encode(), "cls": str(cls).encode()}
                if image is not None:
                    members = {"png": image, **members}
                for ext, data in members.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    with tarfile.open(tmp_path / "shards" / "shard-000002.tar", "w") as tar:  # captions only: a block
        for key in ("000100", "000101"):  # whose rows have no image column at all
            info = tarfile.TarInfo(f"{key}.txt")
            info.size = 4
            tar.addfile(info, io.BytesIO(b"text"))
    options = {"root": str(tmp_path / "shards"), "builder": "webdataset", "image_column": "png",
               "text_column": "txt", "labels_column": "cls", "id_column": "__key__"}  # fmt: skip
    _, info = added_alike(tiny_run, tmp_path, options, monkeypatch)
    assert info["added_items"] == 10
    assert info["skipped"]["undecodable_images"]["n"] == 4
    assert [m.split(":")[0] for m in info["skipped"]["undecodable_images"]["first"]] == ["000004", "000007",
                                                                                        "000100"]  # fmt: skip


@slow
def test_parquet_shards_are_read_by_the_workers(ray_cluster, tiny_run, tmp_path, monkeypatch):
    """Parquet shards of ``Image`` structs (bytes, or a path relative to their folder), captions
    and ClassLabel labels: the driver reads every column but the images, the workers read those;
    the run is the one a single-process add gives. Added again, nothing is written; with
    ``check_images=none`` the corrupt image fails the job with and without Ray."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = shard_rows(np.random.default_rng(1))
    (tmp_path / "shards").mkdir()
    (tmp_path / "files").mkdir()  # beside the shards: a file in their folder would be read as one
    (tmp_path / "files" / "000002.png").write_bytes(rows[2][1])
    features = datasets.Features({"key": datasets.Value("string"), "image": datasets.Image(),
                                  "caption": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["warm", "cool", "grey"])})  # fmt: skip
    records = [{"key": k, "image": None if data is None else {"bytes": data, "path": None},
                "caption": c, "label": cls} for k, data, c, cls in rows]  # fmt: skip
    records[2]["image"] = {"bytes": None, "path": "../files/000002.png"}
    for part in range(2):  # the schema's metadata keeps the features (ClassLabel names)
        pq.write_table(pa.Table.from_pylist(records[part * 6:(part + 1) * 6], schema=features.arrow_schema),
                       tmp_path / "shards" / f"part-{part}.parquet")  # fmt: skip
    options = {"root": str(tmp_path / "shards"), "builder": "parquet", "text_column": "caption",
               "labels_column": "label", "id_column": "key"}  # fmt: skip
    on_ray, info = added_alike(tiny_run, tmp_path, options, monkeypatch)
    assert info["added_items"] == 10 and info["skipped"]["undecodable_images"]["n"] == 2
    with sqlite3.connect(on_ray / "store.sqlite") as conn:
        assert conn.execute("SELECT key FROM items WHERE key = '000004' OR key = '000007'").fetchall() == []

    # again: the two unusable images are read and left out again, and nothing is written
    from crossmodal.jobs.index import add_to_run
    from crossmodal.runs.folder import RunError

    before = contents(on_ray)
    again = add_to_run(on_ray, "hub", options, progress=False, ray=ray_options())
    assert (again["added_items"], again["already_present"]) == (0, 10)
    assert again["skipped"]["undecodable_images"]["n"] == 2
    assert contents(on_ray) == before

    # an image the source's check lets through but that does not decode fails the job, as without Ray
    for run, ray in ((copy_run(tiny_run, tmp_path / "lax-single"), None),
                     (copy_run(tiny_run, tmp_path / "lax-ray"), ray_options())):  # fmt: skip
        unchanged = contents(run)
        with pytest.raises((ValueError, RunError), match="000004"):
            add_to_run(run, "hub", {**options, "check_images": "none"}, progress=False, ray=ray)
        assert contents(run) == unchanged


@pytest.mark.parametrize(
    ("argv", "words"),
    [(["index", "--run", "r", "--add", "f"], ""),
     (["index", "--run", "r", "--add", "f", "--ray"], " --ray"),
     (["index", "--run", "r", "--ray", "ray://head:10001", "--shards", "/s d", "--ray-workers", "3"],
      " --ray ray://head:10001 --shards '/s d' --ray-workers 3")],
)
def test_the_command_a_journal_names_keeps_the_ray_options(argv, words):
    # a killed job's journal says what to re-run: without --ray that would encode in one process
    from crossmodal.cli import _ray_words, build_parser

    assert _ray_words(build_parser().parse_args(argv)) == words
