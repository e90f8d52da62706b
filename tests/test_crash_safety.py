"""Crash-safe run folders and datasets: jobs killed with SIGKILL at chosen points, then re-run.

An indexing job runs as a real subprocess on a copy of the ``tiny_run``. It is killed
either by the test once it has started writing, or by itself (SIGKILL) at a chosen
point of the commit: before the first rename, between two renames, or after the last
rename but before the journal is removed. Afterwards the run folder must load as before
(same results) or be refused with a message that says to re-run the command; it must
never load a mixed set, and re-running the command must finish the job exactly once.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from PIL import Image
from tinyrun import image_folder

from crossmodal.io import atomic_dir, atomic_path
from crossmodal.jobs.index import add_to_run, index_run
from crossmodal.runs.folder import JOURNAL, STAGING_PREFIX, RunError, RunUpdate, recover_run
from crossmodal.serving import RetrievalEngine

TESTS = Path(__file__).resolve().parent
RUN_FILES = (
    "image.index",
    "image.index.json",
    "text.index",
    "text.index.json",
    "store.sqlite",
    "manifest.json",
)

# Runs in the child: registers the tiny dataset and tower, then arms a self-SIGKILL at KILL.
CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    import tinyrun  # noqa: F401  (registers tiny_colours and tiny_pool)

    job, run_dir, kill = sys.argv[1], Path(sys.argv[2]).resolve(), sys.argv[3]
    real_replace, real_unlink, renames = os.replace, os.unlink, [0]

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    def replace(src, dst, *a, **kw):
        if Path(src).parent.name.startswith(".staging-") and Path(dst).parent.resolve() == run_dir:
            if kill == f"before_rename_{{renames[0]}}":
                die()
            renames[0] += 1
        return real_replace(src, dst, *a, **kw)

    def unlink(path, *a, **kw):
        if kill == "before_journal_removal" and str(path).endswith(".update.json"):
            die()
        return real_unlink(path, *a, **kw)

    os.replace, os.unlink = replace, unlink
    if job == "add":
        from crossmodal.jobs.index import add_to_run
        add_to_run(run_dir, sys.argv[4], progress=False)
    elif job == "index":
        from crossmodal.jobs.index import index_run
        index_run(run_dir, kind=sys.argv[4], progress=False)
    elif job == "dataset":
        import datasets
        from crossmodal.data import open_dataset
        real_save = datasets.Dataset.save_to_disk
        def save_then_die(self, *a, **kw):
            real_save(self, *a, **kw)
            if kill == "after_arrow_written":
                die()
        datasets.Dataset.save_to_disk = save_then_die
        def replace_dir(src, dst, *a, **kw):
            result = real_replace(src, dst, *a, **kw)
            if kill == "after_old_moved_aside" and str(dst).endswith(".old"):
                die()
            return result
        os.replace = replace_dir
        open_dataset("imagefolder", {{"root": sys.argv[4], "force": True}})
    print("finished")
    """
).format(tests=str(TESTS))


def child_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **extra}
    env.pop("PYTEST_CURRENT_TEST", None)
    return env


def run_child(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", CHILD, *args],
        env=env or child_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def copy_run(tiny_run: Path, dest: Path) -> Path:
    shutil.copytree(tiny_run, dest, ignore=shutil.ignore_patterns("checkpoint", "eval"))
    return dest


def snapshot(run: Path) -> dict:
    """What a user sees: sizes of the index and store, and the results of fixed queries."""
    engine = RetrievalEngine.load(run)
    try:
        probe = Image.new("RGB", (32, 32), (220, 30, 30))
        return {
            "items": engine.indexes["image"].ntotal,
            "texts": engine.indexes["text"].ntotal,
            "store": engine.store.count_items(),
            "t2i": [h.item_id for h in engine.search_text("red", k=20).hits],
            "i2t": [(h.text_id, h.distance) for h in engine.search_image(probe, k=20).hits],
        }
    finally:
        engine.close()


def file_bytes(run: Path) -> dict[str, bytes]:
    return {name: (run / name).read_bytes() for name in RUN_FILES}


def leftovers(run: Path) -> list[str]:
    hidden = [
        *run.glob(f"{STAGING_PREFIX}*"),
        *run.glob(".*.tmp"),
        *run.glob(JOURNAL),
        *run.glob("images/.*.tmp"),
    ]
    return sorted(p.name for p in hidden)


# -- the commit protocol, in process ------------------------------------------------------------------
def test_run_update_error_in_the_body_changes_nothing(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path / "run")
    before = file_bytes(run)
    with pytest.raises(RuntimeError, match="disk full"), RunUpdate(run) as update:
        update.path("store.sqlite").write_bytes(b"half")
        raise RuntimeError("disk full")
    assert file_bytes(run) == before and leftovers(run) == []
    with pytest.raises(ValueError, match="is not a run file name"), RunUpdate(run) as update:
        update.path("../escape")
    with pytest.raises(ValueError, match="is not a run file name"), RunUpdate(run) as update:
        update.path("manifest.json")


def test_atomic_writers_leave_nothing_when_the_body_fails(tmp_path):
    with pytest.raises(OSError), atomic_path(tmp_path / "x.bin") as tmp:
        tmp.write_bytes(b"partial")
        raise OSError("interrupted")
    with pytest.raises(OSError), atomic_dir(tmp_path / "built") as tmp:
        (tmp / "info.json").write_text("{}")
        raise OSError("interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# -- killed indexing jobs -----------------------------------------------------------------------------
KILL_POINTS = {
    # where the child dies -> what a reader must see before the re-run
    "before_rename_0": "as_before",  # journal written, nothing renamed yet
    "before_rename_3": "refused",  # image.index(.json) and store.sqlite replaced
    "before_journal_removal": "complete",  # every file and the manifest replaced
}


@pytest.mark.slow
@pytest.mark.parametrize("kill", list(KILL_POINTS))
def test_add_killed_during_commit_recovers_and_reruns_once(kill, tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path / "run")
    folder = image_folder(tmp_path / "new", 6)
    before, before_files = snapshot(run), file_bytes(run)
    proc = run_child("add", str(run), kill, str(folder))
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert (run / JOURNAL).exists()
    expect = KILL_POINTS[kill]
    if expect == "refused":
        with pytest.raises(RunError) as err:
            RetrievalEngine.load(run)
        assert f"an interrupted update ({JOURNAL})" in str(err.value)
        rerun = f"re-run the interrupted command: crossmodal index --run {run} --add {folder}"
        assert rerun in str(err.value)  # the add, not a plain re-index
    elif expect == "as_before":
        assert snapshot(run) == before and file_bytes(run) == before_files
    else:
        assert snapshot(run)["items"] == before["items"] + 6
    info = add_to_run(run, str(folder), progress=False)  # the re-run: rolls back, then adds once
    assert info["added_items"] == 6 and leftovers(run) == []
    after = snapshot(run)
    assert after["items"] == after["store"] == before["items"] + 6
    assert after["texts"] == before["texts"] + 6
    engine = RetrievalEngine.load(run)
    try:
        hits = engine.similar_images(folder / "new0002.png", k=200).hits
        added = {h.key: h for h in hits if h.key.startswith("new")}
        assert sorted(added) == [f"new{i:04d}.png" for i in range(6)]  # each added once
        assert added["new0002.png"].distance == 0
        assert Path(added["new0002.png"].image_path) == (folder / "new0002.png").resolve()
        assert [a["source"] for a in engine.manifest["index"]["added"]] == [str(folder)]
    finally:
        engine.close()


@pytest.mark.slow
def test_reindex_killed_between_renames_is_refused_then_completed(tiny_run, tmp_path):
    """Re-indexing as HNSW, killed when image.index is HNSW and text.index still flat."""
    run = copy_run(tiny_run, tmp_path / "run")
    before, before_files = snapshot(run), file_bytes(run)
    proc = run_child("index", str(run), "before_rename_1", "hnsw")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert (run / "image.index").read_bytes() != before_files["image.index"]  # the kill hit mid-swap
    with pytest.raises(RunError, match="interrupted update"):
        RetrievalEngine.load(run)
    assert recover_run(run) is True and leftovers(run) == []
    assert snapshot(run) == before and file_bytes(run) == before_files  # rolled back exactly
    index_run(run, kind="hnsw", progress=False)
    engine = RetrievalEngine.load(run)
    try:
        assert engine.describe()["index"] == "hnsw" and engine.indexes["text"].kind == "hnsw"
        assert engine.indexes["image"].ntotal == before["items"] and leftovers(run) == []
    finally:
        engine.close()


@pytest.mark.slow
def test_add_killed_by_the_test_once_writing_started(tiny_run, tmp_path):
    """A real kill from outside: poll until the job has written its dataset, then SIGKILL it."""
    run = copy_run(tiny_run, tmp_path / "run")
    folder = image_folder(tmp_path / "many", 400)
    before, before_files = snapshot(run), file_bytes(run)
    data_dir = tmp_path / "data"
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, "add", str(run), "never", str(folder)],
        env=child_env(CROSSMODAL_DATA_DIR=str(data_dir)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120
        while not any(data_dir.glob("imagefolder-*/info.json")) and not any(run.glob(f"{STAGING_PREFIX}*")):
            assert proc.poll() is None, f"the job ended before it was killed: {proc.stderr.read()[-2000:]}"
            assert time.monotonic() < deadline, "the job never started writing"
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert snapshot(run) == before and file_bytes(run) == before_files
    info = add_to_run(run, str(folder), progress=False)
    assert info["added_items"] == 400 and leftovers(run) == []
    assert snapshot(run)["items"] == before["items"] + 400


# -- killed dataset builds ----------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("kill", ["after_arrow_written", "after_old_moved_aside"])
def test_killed_dataset_build_leaves_nothing_that_looks_complete(kill, tmp_path, monkeypatch):
    from crossmodal.data import open_dataset

    folder = image_folder(tmp_path / "imgs", 12)
    data_dir = tmp_path / "data"
    env = child_env(CROSSMODAL_DATA_DIR=str(data_dir))
    monkeypatch.setenv("CROSSMODAL_DATA_DIR", str(data_dir))
    if kill == "after_old_moved_aside":  # a complete earlier build exists and is being replaced
        open_dataset("imagefolder", {"root": str(folder)})
        assert len(list(data_dir.glob("imagefolder-*/info.json"))) == 1
    proc = run_child("dataset", str(tmp_path), kill, str(folder), env=env)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    visible = [p for p in data_dir.iterdir() if not p.name.startswith(".")]
    assert visible == [], "an interrupted build must not leave a folder under its final name"
    assert any(p.name.startswith(".imagefolder-") for p in data_dir.iterdir())  # only hidden leftovers
    ds = open_dataset("imagefolder", {"root": str(folder)})  # rebuilt, not taken from the leftovers
    assert len(ds) == 12 and ds.captions(0) == ["a red square"]


def test_an_update_interrupted_between_its_renames_keeps_its_backups(tiny_run, tmp_path, monkeypatch):
    """Ctrl+C (or a full disk) between two renames: the backups stay for recover_run, which
    puts the old files back; the state checks see nothing done until then."""
    from crossmodal.runs.state import is_indexed

    run = copy_run(tiny_run, tmp_path / "run")
    before = file_bytes(run)
    real_replace, calls = os.replace, []

    def replace(src, dst):  # the staged manifest, the journal, image.index, then text.index
        calls.append(Path(dst).name)
        if Path(dst).name == "text.index":
            raise KeyboardInterrupt
        return real_replace(src, dst)

    with pytest.raises(KeyboardInterrupt), RunUpdate(run) as update:
        update.path("image.index").write_bytes(b"new image index")
        update.path("text.index").write_bytes(b"new text index")
        monkeypatch.setattr(os, "replace", replace)
        update.commit(index={"kind": "flat"})
    monkeypatch.setattr(os, "replace", real_replace)
    assert calls[-2:] == ["image.index", "text.index"]
    assert (run / "image.index").read_bytes() == b"new image index"  # half replaced
    assert (run / JOURNAL).exists() and not is_indexed(run)
    assert recover_run(run)
    assert file_bytes(run) == before and leftovers(run) == []
    assert is_indexed(run)


def test_forget_never_deletes_outside_the_run(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path / "run")
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    with RunUpdate(run) as update:
        update.forget("../victim.txt", str(victim), "image.index")
        update.commit()
    assert victim.read_text() == "keep me" and not (run / "image.index").exists()


@pytest.mark.parametrize("text", ["[]", "null", '"x"', '{"files": null}', '{"files": {"a": 1}}'])
def test_a_manifest_of_the_wrong_shape_is_one_clear_error(tiny_run, tmp_path, text):
    from crossmodal.runs.folder import ManifestError

    run = copy_run(tiny_run, tmp_path / "run")
    (run / "manifest.json").write_text(text)
    with pytest.raises(ManifestError, match="rebuild the run with: crossmodal prepare --config"):
        RetrievalEngine.load(run)
