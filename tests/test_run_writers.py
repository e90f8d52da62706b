"""Writers of a run folder: items added and removed survive a re-index, one writer at a time.

Each test works on a private copy of the tiny trained run (``tiny_run_copy``). Image folders
are written by ``image_folder``: small solid-colour pictures of the tiny run's colours with a
caption, and labels when asked for.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from tinyrun import image_folder

from crossmodal.cli import main
from crossmodal.jobs.index import add_to_run, index_run, remove_from_run
from crossmodal.runs.folder import (
    JOURNAL,
    LOCK_INFO,
    RunBusyError,
    RunError,
    lock_run,
    read_manifest,
    recover_run,
)
from crossmodal.serving import RetrievalEngine
from crossmodal.store import MetadataStore

TESTS = Path(__file__).resolve().parent


def store_keys(run: Path) -> list[str]:
    with MetadataStore.open(run / "store.sqlite") as store:
        return [it["key"] for it in store.get_items(store.item_ids())]


def store_items(run: Path, prefix: str) -> dict[str, dict]:
    with MetadataStore.open(run / "store.sqlite") as store:
        return {it["key"]: it for it in store.get_items(store.item_ids()) if it["key"].startswith(prefix)}


def image_hits(run: Path, image: Path, k: int = 500) -> dict[str, float]:
    engine = RetrievalEngine.load(run)
    try:
        return {h.key: h.distance for h in engine.similar_images(image, k=k).hits}
    finally:
        engine.close()


@pytest.fixture
def base(tiny_run_copy) -> tuple[Path, int]:
    """The run copy and the number of items it holds before any change."""
    with MetadataStore.open(tiny_run_copy / "store.sqlite") as store:
        return tiny_run_copy, store.count_items()


# -- a re-index keeps what was added and what was removed ----------------------------------------------
def test_plain_reindex_keeps_added_items(base, tmp_path, capsys):
    # reported against incremental-indexing tools: a rebuild of the index drops items added since
    run, n = base
    folder = image_folder(tmp_path / "new", 6)
    info = add_to_run(run, str(folder), progress=False)
    assert info["added_items"] == 6 and info["source"] == str(folder.resolve())
    before = store_items(run, "new")
    assert main(["index", "--run", str(run)]) == 0
    assert f"indexed {n + 6} images" in capsys.readouterr().out
    assert len(store_keys(run)) == n + 6 and store_items(run, "new") == before  # same ids, rows, sources
    assert [a["source"] for a in read_manifest(run)["index"]["added"]] == [str(folder.resolve())]
    hits = image_hits(run, folder / "new0002.png")
    assert hits["new0002.png"] == 0 and sorted(k for k in hits if k.startswith("new")) == sorted(before)
    index_run(run, kind="hnsw", progress=False)  # another kind: still there, re-encoded alike
    assert read_manifest(run)["index"]["items"] == n + 6
    assert image_hits(run, folder / "new0002.png")["new0002.png"] == 0


def test_reindex_refuses_when_an_added_image_is_gone(base, tmp_path):
    # reported against incremental-indexing tools: a rebuild silently indexes blank images for missing files
    run, n = base
    folder = image_folder(tmp_path / "new", 4)
    add_to_run(run, str(folder), progress=False)
    (folder / "new0001.png").unlink()
    with pytest.raises(RunError, match=r"new0001\.png.*--remove KEY"):
        index_run(run, progress=False)
    assert len(store_keys(run)) == n + 4  # nothing changed


def test_reindex_with_a_damaged_store_names_the_adds_to_run_again(base, tmp_path, caplog):
    # reported against incremental-indexing tools: items added later vanish without a word on a rebuild
    run, n = base
    folder = image_folder(tmp_path / "new", 3)
    add_to_run(run, str(folder), progress=False)
    (run / "store.sqlite").write_bytes(b"not a store")
    info = index_run(run, progress=False)
    assert info["items"] == n and "added" not in read_manifest(run)["index"]
    assert f"crossmodal index --run {run} --add {folder.resolve()}" in caplog.text


# -- an interrupted add or remove names itself -----------------------------------------------------------
def interrupt_commit(monkeypatch) -> list[str]:
    """Make the next RunUpdate stop (KeyboardInterrupt) when it renames text.index into place."""
    real_replace, calls = os.replace, []

    def replace(src, dst):
        calls.append(Path(dst).name)
        staged, into_run = Path(src).parent.name, Path(dst).parent.name
        if Path(dst).name == "text.index" and staged.startswith(".staging-") and into_run == "tiny":
            monkeypatch.setattr(os, "replace", real_replace)
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    return calls


def test_interrupted_add_message_names_the_add(base, tmp_path, monkeypatch):
    # reported against this project's run folders: the recovery hint after an interrupted add said
    # `crossmodal index --run R`, which then dropped the added items
    run, n = base
    folder = image_folder(tmp_path / "new", 5)
    interrupt_commit(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        add_to_run(run, str(folder), progress=False)
    assert (run / JOURNAL).exists()
    with pytest.raises(RunError) as err:
        RetrievalEngine.load(run)
    assert f"re-run the interrupted command: crossmodal index --run {run} --add {folder}" in str(err.value)
    info = add_to_run(run, str(folder), progress=False)  # rolls back, then adds once
    assert info["added_items"] == 5 and info["already_present"] == 0
    assert len(store_keys(run)) == n + 5


def test_interrupted_remove_message_names_the_remove(base, tmp_path, monkeypatch):
    run, _ = base
    keys = tmp_path / "keys.txt"
    keys.write_text("\n".join(sorted(store_keys(run))[:2]) + "\n")
    interrupt_commit(monkeypatch)
    assert main(["index", "--run", str(run), "--remove-file", str(keys)]) == 130  # Ctrl+C
    with pytest.raises(RunError, match=f"re-run the interrupted command: crossmodal index --run {run} "
                                       f"--remove-file {keys}"):  # fmt: skip
        RetrievalEngine.load(run)


# -- labels, re-adds and removals ---------------------------------------------------------------------
def test_add_keeps_labels_mapped_by_name(base, tmp_path, capsys):
    # reported against image-folder loaders: labels in metadata.jsonl dropped when items are added
    run, _ = base
    folder = image_folder(tmp_path / "labelled", 4, labels=True)
    assert main(["index", "--run", str(run), "--add", str(folder)]) == 0
    assert "labels not in the run's label set, not stored (items): sparkly (4)" in capsys.readouterr().out
    items = store_items(run, "new")
    assert [items[f"new{i:04d}.png"]["labels"] for i in range(4)] == [
        ["red", "square"], ["green", "square"], ["blue", "square"], ["yellow", "square"]]  # fmt: skip
    assert read_manifest(run)["index"]["added"][-1]["unknown_labels"] == {"sparkly": 4}
    index_run(run, progress=False)
    assert store_items(run, "new") == items  # a re-index keeps them too


def test_adding_a_folder_again_adds_only_its_new_images(base, tmp_path, capsys):
    # reported against incremental-indexing tools: adding the same folder twice duplicates every item
    run, n = base
    folder = image_folder(tmp_path / "new", 4)
    add_to_run(run, str(folder), progress=False)
    assert main(["index", "--run", str(run), "--add", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "added 0 items" in out and f"4 items of {folder.resolve()} are in the run already" in out
    assert len(store_keys(run)) == n + 4
    image_folder(folder, 6)  # two more images in the folder
    info = add_to_run(run, str(folder), progress=False)
    assert (info["added_items"], info["already_present"]) == (2, 4)
    keys = store_keys(run)
    assert len(keys) == n + 6 and len(set(keys)) == len(keys)
    # the same file names from another folder are other items
    other = image_folder(tmp_path / "other", 2)
    assert add_to_run(run, str(other), progress=False)["added_items"] == 2


def test_adding_the_runs_own_dataset_skips_what_it_holds(base):
    # reported against incremental-indexing tools: re-adding the indexed dataset duplicates its items
    run, n = base
    info = add_to_run(run, "tiny_colours", progress=False)
    assert info["already_present"] == n and info["added_items"] == 96 - n  # the query and train items
    keys = store_keys(run)
    assert len(keys) == 96 and len(set(keys)) == 96


def test_remove_by_key_and_by_file_survives_a_reindex(base, tmp_path, capsys):
    run, n = base
    folder = image_folder(tmp_path / "new", 4)
    add_to_run(run, str(folder), progress=False)
    own = sorted(k for k in store_keys(run) if k.startswith("item"))[:2]
    assert main(["index", "--run", str(run), "--remove", "new0001.png", own[0]]) == 0
    assert f"removed 2 items and 2 texts from {run}" in capsys.readouterr().out
    listed = tmp_path / "keys.txt"
    listed.write_text(f"new0002.png\n\n{own[1]}\n")
    assert main(["index", "--run", str(run), "--remove-file", str(listed)]) == 0
    gone = {"new0001.png", "new0002.png", *own}
    for _ in range(2):  # after the removals, and after a re-index
        keys = store_keys(run)
        assert len(keys) == n + 4 - 4 and not gone & set(keys)
        hits = image_hits(run, folder / "new0001.png")
        assert not gone & set(hits) and {"new0000.png", "new0003.png"} <= set(hits)
        index_run(run, progress=False)
    index = read_manifest(run)["index"]
    assert index["removed_keys"] == own and [r["items"] for r in index["removed"]] == [2, 2]


def test_a_key_two_folders_share_is_removed_from_both_and_said(base, tmp_path, caplog):
    # reported against indexing command lines: removing by file name took items of another
    # folder with the same file names, silently
    import logging

    run, n = base
    add_to_run(run, str(image_folder(tmp_path / "a", 2)), progress=False)
    add_to_run(run, str(image_folder(tmp_path / "b", 2, seed=2)), progress=False)
    with caplog.at_level(logging.WARNING, logger="crossmodal.jobs.index"):
        out = remove_from_run(run, ["new0000.png"])
    assert out["removed_items"] == 2
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "1 keys name items from more than one source" in said
    assert str(tmp_path / "a") in said and str(tmp_path / "b") in said


def test_removing_unknown_keys_changes_nothing(base, tmp_path, capsys):
    # reported against indexing command lines: a mistyped key removed the others and said nothing
    run, n = base
    before = (run / "store.sqlite").read_bytes()
    assert main(["index", "--run", str(run), "--remove", store_keys(run)[0], "no-such-key"]) == 2
    err = capsys.readouterr().err.strip()
    assert "1 of the 2 keys are not in" in err and "no-such-key" in err and "nothing was removed" in err
    assert len(err.splitlines()) == 1
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    assert main(["index", "--run", str(run), "--remove-file", str(empty)]) == 2
    assert "lists no keys" in capsys.readouterr().err
    assert (run / "store.sqlite").read_bytes() == before and len(store_keys(run)) == n


# -- one writer at a time ------------------------------------------------------------------------------
HOLDER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from crossmodal.runs.folder import lock_run
    run = Path(sys.argv[1])
    with lock_run(run, sys.argv[2]):
        (run / ".staging-holder").mkdir()  # as a RunUpdate at work would have
        print("held", flush=True)
        sys.stdin.readline()
    """
)


def test_a_second_writer_is_refused_at_once_with_the_holders_command(base, tmp_path, workdir, capsys):
    # reported against this project's run folders: a second writer deleted the first one's staging folder
    from tinyrun import TINY_OVERRIDES, tiny_config

    from crossmodal.jobs.eval import eval_run
    from crossmodal.jobs.prepare import prepare_run
    from crossmodal.jobs.train import train_run

    run, n = base
    here = [f"runs_dir={run.parent}", f"train.cache_dir={workdir / 'cache'}"]
    folder = image_folder(tmp_path / "new", 2)
    holding = "crossmodal index --run R --add elsewhere"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run), holding],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        before = (run / "store.sqlite").read_bytes()
        started = time.monotonic()
        jobs = (lambda: add_to_run(run, str(folder), progress=False), lambda: index_run(run, progress=False),
                lambda: remove_from_run(run, store_keys(run)[:1]), lambda: recover_run(run),
                lambda: eval_run(run, baselines=False), lambda: train_run(tiny_config(workdir, *here)),
                lambda: prepare_run(None, [*TINY_OVERRIDES, *here], progress=False, say=lambda _: None))
        for job in jobs:
            with pytest.raises(RunBusyError, match=holding):
                job()
        assert time.monotonic() - started < 10  # refused, not waited
        assert main(["index", "--run", str(run), "--add", str(folder)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"{run} is being written by crossmodal index --run R" in err
        assert f"(pid {holder.pid} " in err
        assert (run / ".staging-holder").is_dir() and (run / "store.sqlite").read_bytes() == before
    finally:
        holder.communicate("done\n", timeout=30)
    assert not (run / LOCK_INFO).exists()
    assert add_to_run(run, str(folder), progress=False)["added_items"] == 2  # free again
    assert not (run / ".staging-holder").exists()  # the next writer's recover_run cleared it


def test_two_threads_adding_at_once_lose_nothing(base, tmp_path):
    # reported against this project's run folders: two `index --add` at once kept only one folder in the
    # manifest, died on sqlite3.IntegrityError, or lost the other's items
    run, n = base
    folders = [image_folder(tmp_path / f"f{i}", 3 + i, prefix=f"f{i}-", seed=i) for i in range(2)]
    gate, outcomes = threading.Barrier(2), {}

    def add(i: int) -> None:
        gate.wait()
        try:
            outcomes[i] = add_to_run(run, str(folders[i]), progress=False)["added_items"]
        except RunBusyError as exc:
            outcomes[i] = exc

    threads = [threading.Thread(target=add, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    check_writers(run, n, folders, outcomes)


def check_writers(run: Path, n: int, folders: list[Path], outcomes: dict) -> None:
    """Each writer either added its whole folder once or was refused cleanly; nothing else changed."""
    assert len(outcomes) == 2 and any(isinstance(v, int) for v in outcomes.values()), outcomes
    keys = store_keys(run)
    assert len(keys) == len(set(keys))
    done = [i for i, v in outcomes.items() if isinstance(v, int)]
    for i, folder in enumerate(folders):
        mine = {k for k in keys if k.startswith(f"f{i}-")}
        assert len(mine) == (3 + i if i in done else 0), (i, outcomes)
        if i not in done:
            assert "is being written by" in str(outcomes[i])
    assert len(keys) == n + sum(3 + i for i in done)
    sources = [a["source"] for a in read_manifest(run)["index"]["added"]]
    assert sorted(sources) == sorted(str(folders[i].resolve()) for i in done)
    assert not list(run.glob(".staging-*")) and not (run / JOURNAL).exists()


CHILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    import tinyrun  # noqa: F401  (registers tiny_colours and tiny_pool)
    from crossmodal.cli import main
    from crossmodal.jobs import index  # noqa: F401  (loaded before the start signal)
    run, folder, ready, go = sys.argv[1:5]
    Path(ready).touch()
    while not Path(go).exists():
        time.sleep(0.001)
    sys.exit(main(["index", "--run", run, "--add", folder]))
    """
).format(tests=str(TESTS))


@pytest.mark.slow
def test_two_processes_adding_at_once_lose_nothing(base, tmp_path):
    """Two `crossmodal index --add` processes released at the same instant."""
    run, n = base
    folders = [image_folder(tmp_path / f"f{i}", 3 + i, prefix=f"f{i}-", seed=i) for i in range(2)]
    go = tmp_path / "go"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    args = [[str(run), str(folders[i]), str(tmp_path / f"ready{i}"), str(go)] for i in range(2)]
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, *a], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for a in args]  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while not all((tmp_path / f"ready{i}").exists() for i in range(2)):
            assert all(p.poll() is None for p in procs) and time.monotonic() < deadline
            time.sleep(0.01)
        go.touch()
        results = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    outcomes = {}
    for i, (p, (out, err)) in enumerate(zip(procs, results)):
        assert p.returncode in (0, 2), err[-2000:]
        assert "Traceback" not in err and "IntegrityError" not in err
        outcomes[i] = int(out.split()[1]) if p.returncode == 0 else RunBusyError(err.strip())
    check_writers(run, n, folders, outcomes)


def test_the_lock_is_reentrant_in_one_thread_and_records_the_outer_command(base):
    run, _ = base
    with lock_run(run, "crossmodal prepare --config x.yaml"):
        info = json.loads((run / LOCK_INFO).read_text())
        assert info["command"] == "crossmodal prepare --config x.yaml" and info["pid"] == os.getpid()
        with lock_run(run, "crossmodal index --run R"):
            remove_from_run(run, store_keys(run)[:1])
        assert (run / LOCK_INFO).exists()
    assert not (run / LOCK_INFO).exists()
    with pytest.raises(RunError, match="run folder not found"):
        with lock_run(run.parent / "missing"):
            pass
