"""``crossmodal index --sync FOLDER``: a folder added earlier, kept in step with the run.

Each test works on a private copy of the tiny run (``tiny_run_copy``) and a folder written by
``image_folder`` (small solid-colour pictures with a caption each).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import folder_state
from PIL import Image
from tinyrun import image_folder

from crossmodal.cli import main
from crossmodal.jobs.index import add_to_run, index_run
from crossmodal.jobs.sync import sync_run
from crossmodal.runs.folder import JOURNAL, RunError, read_manifest, recover_run
from crossmodal.serving import RetrievalEngine
from crossmodal.store import MetadataStore

TESTS = Path(__file__).resolve().parent


def held(run: Path, folder: Path) -> dict[str, dict]:
    """``{key: item row with its "captions"}`` of the items the run holds from ``folder``."""
    with MetadataStore.open(run / "store.sqlite") as store:
        items = store.items_of_source(str(folder.resolve()))
        texts = store.texts_of_items([it["item_id"] for it in items])
    return {it["key"]: {**it, "captions": [t["caption"] for t in group]} for it, group in zip(items, texts)}


def set_captions(folder: Path, captions: dict[str, str | None]) -> None:
    """Rewrite the folder's metadata.jsonl: new captions by file name; None drops the row."""
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    rows = [{**r, "text": captions.get(r["file_name"], r["text"])} for r in rows]
    rows = [r for r in rows if r["text"] is not None]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def solid(path: Path, value: int) -> None:
    Image.fromarray(np.full((32, 32, 3), value, np.uint8)).save(path)


def own_distance(run: Path, image: Path, key: str) -> float | None:
    engine = RetrievalEngine.load(run)
    try:
        hits = engine.similar_images(image, k=500).hits
    finally:
        engine.close()
    return next((h.distance for h in hits if h.key == key), None)


def test_sync_adds_reencodes_removes_and_leaves_the_rest(tiny_run_copy, tmp_path, capsys):
    run = tiny_run_copy
    folder = image_folder(tmp_path / "photos", 6)
    add_to_run(run, str(folder), progress=False)
    before = held(run, folder)
    (folder / "new0001.png").unlink()
    set_captions(folder, {"new0001.png": None, "new0002.png": "a green square at night"})
    solid(folder / "new0003.png", 250)  # rewritten in place: another picture, the same name
    solid(folder / "extra.png", 5)
    with (folder / "metadata.jsonl").open("a") as fh:
        fh.write(json.dumps({"file_name": "extra.png", "text": "a black square"}) + "\n")
    assert main(["index", "--run", str(run), "--sync", str(folder)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"synced {folder.resolve()} into {run}: 1 added, 2 re-encoded, 1 removed, "
                          "3 unchanged; it now holds")  # fmt: skip
    after = held(run, folder)
    assert sorted(after) == ["extra.png", "new0000.png", "new0002.png", "new0003.png", "new0004.png",
                             "new0005.png"]  # fmt: skip
    assert after["new0002.png"]["captions"] == ["a green square at night"]
    for key in ("new0000.png", "new0002.png", "new0003.png"):  # changed items keep their ids
        assert after[key]["item_id"] == before[key]["item_id"]
    assert own_distance(run, folder / "new0003.png", "new0003.png") == 0  # encoded from the new file
    assert own_distance(run, folder / "extra.png", "extra.png") == 0
    manifest = read_manifest(run)["index"]
    with MetadataStore.open(run / "store.sqlite") as store:
        assert manifest["items"] == store.count_items() and manifest["texts"] == store.count_texts()
    assert manifest["added"][-1]["sync"] == {"reencoded": 2, "removed": 1, "unchanged": 3}


def test_a_sync_of_an_unchanged_folder_writes_nothing_and_says_so(tiny_run_copy, tmp_path, capsys):
    run = tiny_run_copy
    folder = image_folder(tmp_path / "photos", 5)
    add_to_run(run, str(folder), progress=False)
    state = folder_state(run)
    assert main(["index", "--run", str(run), "--sync", str(folder)]) == 0
    assert capsys.readouterr().out.strip() == (
        f"{run} is in step with {folder.resolve()} (0 added, 0 re-encoded, 0 removed, 5 unchanged): "
        "nothing to do")  # fmt: skip
    assert folder_state(run) == state


def test_what_a_sync_compares_survives_a_reindex(tiny_run_copy, tmp_path):
    run = tiny_run_copy
    folder = image_folder(tmp_path / "photos", 4)
    add_to_run(run, str(folder), progress=False)
    index_run(run, progress=False)
    assert sync_run(run, folder, progress=False)["changed"] is False
    os.utime(folder / "new0001.png", ns=(1, 1))  # only its time: re-encoded, to the same codes
    info = sync_run(run, folder, progress=False)
    assert (info["reencoded"], info["unchanged"]) == (1, 3)


def test_a_folder_never_added_is_added_and_items_without_stamps_are_reencoded(tiny_run_copy, tmp_path):
    run = tiny_run_copy
    folder = image_folder(tmp_path / "photos", 3)
    info = sync_run(run, folder, progress=False)
    assert (info["added"], info["reencoded"], info["removed"]) == (3, 0, 0)
    with MetadataStore.open(run / "store.sqlite", readonly=False) as store:  # a store of an older version
        store._conn.execute("DROP TABLE stamps")
        store._conn.commit()
        assert store.get_stamps(store.item_ids()) == {}
    assert sync_run(run, folder, progress=False)["reencoded"] == 3
    assert sync_run(run, folder, progress=False)["changed"] is False


def test_a_changed_file_that_no_longer_decodes_is_removed(tiny_run_copy, tmp_path, caplog):
    run = tiny_run_copy
    folder = image_folder(tmp_path / "photos", 3)
    add_to_run(run, str(folder), progress=False)
    (folder / "new0002.png").write_bytes(b"not a picture any more")
    info = sync_run(run, folder, progress=False)
    assert (info["removed"], info["unchanged"]) == (1, 2)
    assert "new0002.png" not in held(run, folder) and "new0002.png" in caplog.text


def test_bad_sync_targets_are_one_line_errors(tiny_run_copy, tmp_path, capsys):
    assert main(["index", "--run", str(tiny_run_copy), "--sync", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip()
    nowhere = tmp_path / "nowhere"
    assert err == f"crossmodal index: error: --sync takes a folder of images; {nowhere} is not a folder"
    with pytest.raises(SystemExit):  # one change at a time
        main(["index", "--run", str(tiny_run_copy), "--sync", str(tmp_path), "--add", str(tmp_path)])


CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    import tinyrun  # noqa: F401  (registers tiny_colours and tiny_pool)

    run_dir, kill_at = Path(sys.argv[1]).resolve(), int(sys.argv[3])
    real_replace, renames = os.replace, [0]

    def replace(src, dst, *a, **kw):
        if Path(src).parent.name.startswith(".staging-") and Path(dst).parent.resolve() == run_dir:
            if renames[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            renames[0] += 1
        return real_replace(src, dst, *a, **kw)

    os.replace = replace
    from crossmodal.jobs.sync import sync_run
    sync_run(run_dir, sys.argv[2], progress=False)
    """
).format(tests=str(TESTS))


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", [0, 2])
def test_a_killed_sync_leaves_the_run_as_it_was(tiny_run_copy, tmp_path, kill_at):
    """Killed before its first rename, or between two: the run is as before once recovered."""
    run = tiny_run_copy
    folder = image_folder(tmp_path / "photos", 4)
    add_to_run(run, str(folder), progress=False)
    before, state = held(run, folder), folder_state(run)
    solid(folder / "new0000.png", 250)
    (folder / "new0001.png").unlink()
    proc = subprocess.run([sys.executable, "-c", CHILD, str(run), str(folder), str(kill_at)],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    if kill_at:
        with pytest.raises(RunError, match="interrupted update"):
            RetrievalEngine.load(run)
    assert (run / JOURNAL).exists() and recover_run(run) is True
    assert held(run, folder) == before and folder_state(run) == state
    info = sync_run(run, folder, progress=False)  # run again: done once
    assert (info["reencoded"], info["removed"], info["unchanged"]) == (1, 1, 2)


def test_a_sync_reads_the_folder_with_the_options_it_was_added_with(tiny_run_copy, tmp_path):
    run = tiny_run_copy
    folder = image_folder(tmp_path / "photos", 3)
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    (folder / "metadata.jsonl").write_text(
        "".join(json.dumps({"file_name": r["file_name"], "description": r["text"]}) + "\n" for r in rows))
    add_to_run(run, str(folder), {"text_column": "description"}, progress=False)
    assert held(run, folder)["new0000.png"]["captions"] == ["a red square"]
    assert sync_run(run, folder, progress=False)["changed"] is False


def test_store_stamps_go_with_their_items(tmp_path):
    items = [{"item_id": i, "key": f"k{i}", "source": "/photos" if i < 2 else "other"} for i in range(3)]
    with MetadataStore.build(tmp_path / "s.sqlite", items) as built:
        assert built.get_stamps([0, 1, 2]) == {}
    with MetadataStore.open(tmp_path / "s.sqlite", readonly=False) as store:
        store.set_stamps([{"item_id": i, "size": 10 + i, "mtime_ns": 7, "record": "r"} for i in range(3)])
        assert [it["key"] for it in store.items_of_source("/photos")] == ["k0", "k1"]
        store.remove_items([1])
        assert store.get_stamps([2, 1, 0]) == {0: {"size": 10, "mtime_ns": 7, "record": "r"},
                                               2: {"size": 12, "mtime_ns": 7, "record": "r"}}  # fmt: skip


def test_items_removed_with_remove_stay_out_of_a_sync_until_added_again(tiny_run_copy, tmp_path, capsys):
    # reported: --sync put back the items a user had removed with --remove
    folder = image_folder(tmp_path / "photos", 6)
    add_to_run(tiny_run_copy, str(folder), progress=False)
    gone = sorted(held(tiny_run_copy, folder))[:2]
    assert main(["index", "--run", str(tiny_run_copy), "--remove", *gone]) == 0
    capsys.readouterr()
    assert main(["index", "--run", str(tiny_run_copy), "--sync", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "0 added, 0 re-encoded, 0 removed, 4 unchanged, 2 left out (removed with --remove" in out
    assert "nothing to do" in out and not set(gone) & set(held(tiny_run_copy, folder))
    # the record is per folder: a plain re-index keeps them out too, an --add brings them back
    index_run(tiny_run_copy, progress=False)
    assert not set(gone) & set(held(tiny_run_copy, folder))
    assert sync_run(tiny_run_copy, str(folder), progress=False)["left_out"] == 2
    assert add_to_run(tiny_run_copy, str(folder), progress=False)["added_items"] == 2
    assert set(gone) <= set(held(tiny_run_copy, folder))
    assert "removed_added" not in read_manifest(tiny_run_copy)["index"]
    assert sync_run(tiny_run_copy, str(folder), progress=False)["changed"] is False


def test_every_add_and_sync_of_a_folder_says_what_it_skipped(tiny_run_copy, tmp_path, capsys):
    # reported: a file that does not decode was named only by the add that first built the folder
    folder = image_folder(tmp_path / "photos", 3)
    (folder / "bad.png").write_text("junk")
    with (folder / "metadata.jsonl").open("a") as fh:
        fh.write(json.dumps({"file_name": "bad.png", "text": "red"}) + "\n")
    skipped = f"skipped from {folder.resolve()}: 1 undecodable images (bad.png: not a readable image"
    for argv in (["--add", str(folder)], ["--add", str(folder)], ["--sync", str(folder)]):
        assert main(["index", "--run", str(tiny_run_copy), *argv]) == 0
        assert skipped in capsys.readouterr().out
    assert "bad.png" not in held(tiny_run_copy, folder)
