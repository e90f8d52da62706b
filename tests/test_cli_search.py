"""``crossmodal search`` output: a table for people (ids whole at any terminal width, captions cut
with an ellipsis, ``--wide``), ``--json`` and ``--paths`` for scripts (nothing else on stdout).

The run is a copy of the tiny run with a folder added whose file names (the items' ids) and
captions are longer than any terminal column.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tinyrun import image_folder

from crossmodal.cli import main
from crossmodal.serving.output import ELLIPSIS, clip, display_width

LONG = "holiday_2024_camera_roll_exported_with_a_very_long_name_"  # 56 characters before the number


@pytest.fixture(scope="module")
def long_run(tiny_run, tmp_path_factory) -> tuple[Path, Path]:
    """A copy of the tiny run with 8 items whose ids are over 60 characters, and their folder."""
    import shutil

    from crossmodal.jobs.index import add_to_run

    root = tmp_path_factory.mktemp("long")
    run = root / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("checkpoint"))
    folder = image_folder(root / "photos", 8, prefix=LONG)
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    for r in rows:
        r["text"] += " photographed on a long walk along the red and yellow cliffs at the end of summer"
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    add_to_run(run, str(folder), progress=False)
    return run, folder


def search(capsys, run: Path, *args: str) -> tuple[str, str]:
    assert main(["search", "--run", str(run), *args]) == 0
    out = capsys.readouterr()
    return out.out, out.err


def json_hits(capsys, run: Path, *args: str) -> list[dict]:
    out, _ = search(capsys, run, *args, "--json")
    return [json.loads(line) for line in out.splitlines()]


@pytest.mark.parametrize("columns", [30, 80, 200])
def test_the_table_shows_whole_ids_at_any_terminal_width(long_run, capsys, monkeypatch, columns):
    run, _ = long_run
    monkeypatch.setenv("COLUMNS", str(columns))
    (result,) = json_hits(capsys, run, "--text", "red", "-k", "40")
    keys = [h["id"] for h in result["hits"]]
    assert any(len(k) > 60 for k in keys)
    out, _ = search(capsys, run, "--text", "red", "-k", "40")
    rows = out.splitlines()[2:]
    assert [row.split()[2] for row in rows] == keys  # each id whole, in rank order
    for row, hit in zip(rows, result["hits"]):
        caption = " | ".join(hit["captions"])
        shown = row[row.index(hit["id"]) + len(hit["id"]):].strip()
        assert shown == caption or (shown.endswith(ELLIPSIS) and caption.startswith(shown[:-1]))
        id_width = max(len(k) for k in keys)
        assert display_width(row) <= max(columns, 4 + 2 + 4 + 2 + id_width + 2 + 20)
    assert any(row.endswith(ELLIPSIS) for row in rows) == (columns <= 80)  # 200 columns hold every caption


def test_wide_cuts_nothing(long_run, capsys, monkeypatch):
    run, _ = long_run
    monkeypatch.setenv("COLUMNS", "40")
    out, _ = search(capsys, run, "--text", "red", "-k", "40", "--wide")
    assert ELLIPSIS not in out and "at the end of summer" in out


def test_json_is_one_object_per_query(long_run, capsys):
    run, folder = long_run
    results = json_hits(capsys, run, "--text", "red", "--text", "yellow square", "-k", "5")
    assert [(r["query"], r["direction"], r["k"], len(r["hits"])) for r in results] == [
        ("red", "t2i", 5, 5), ("yellow square", "t2i", 5, 5)]  # fmt: skip
    for hit in results[0]["hits"]:
        assert set(hit) >= {"rank", "id", "distance", "caption", "captions", "image_path"}
        assert Path(hit["image_path"]).is_file() and isinstance(hit["distance"], int)
    (i2t,) = json_hits(capsys, run, "--image", str(folder / f"{LONG}0000.png"), "-k", "3")
    assert i2t["direction"] == "i2t" and all(h["caption"] in h["captions"] for h in i2t["hits"])


def test_paths_prints_only_paths_and_sends_messages_to_stderr(long_run, capsys):
    run, folder = long_run
    out, err = search(capsys, run, "--text", "red zzzzunknown", "-k", "6", "--paths")
    lines = out.splitlines()
    assert len(lines) == 6 and all(Path(line).is_file() for line in lines)
    assert "zzzzunknown" in err and "zzzzunknown" not in out
    out, _ = search(capsys, run, "--image", str(folder / f"{LONG}0001.png"), "-k", "4", "--paths")
    (result,) = json_hits(capsys, run, "--image", str(folder / f"{LONG}0001.png"), "-k", "4")
    assert out.splitlines() == [h["id"] for h in result["hits"]]  # text hits: their item's id


def test_output_options_exclude_each_other(long_run, capsys):
    run, _ = long_run
    with pytest.raises(SystemExit):
        main(["search", "--run", str(run), "--text", "red", "--json", "--paths"])
    assert "not allowed with" in capsys.readouterr().err


@pytest.mark.parametrize(("text", "width", "expected"), [
    ("short", 10, "short"),
    ("exactly ten", 11, "exactly ten"),
    ("a longer caption", 8, "a longe" + ELLIPSIS),
    ("日本語のテキスト", 7, "日本語" + ELLIPSIS),  # wide characters take two columns
    ("e\u0301e\u0301e\u0301e\u0301", 3, "e\u0301e\u0301" + ELLIPSIS),  # combining marks take none
])  # fmt: skip
def test_clip_counts_terminal_columns(text, width, expected):
    assert clip(text, width) == expected and display_width(clip(text, width)) <= width


def test_a_reader_that_stops_early_gets_no_traceback(long_run):
    # reported: crossmodal search ... --paths | head -1 ended in a BrokenPipeError traceback
    import subprocess
    import sys

    run, _ = long_run
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import tinyrun; "
            "from crossmodal.cli import main; sys.exit(main(sys.argv[1:]))")  # fmt: skip
    for option in ("--paths", "--json", "--wide"):
        proc = subprocess.Popen([sys.executable, "-c", code, "search", "--run", str(run), "--text", "red",
                                 "--text", "blue", "-k", "100", option],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
        proc.stdout.readline()
        proc.stdout.close()  # as head -1 does
        err = proc.stderr.read().decode()
        assert proc.wait(timeout=120) in (0, 141) and "Traceback" not in err and "Broken pipe" not in err, err


def test_names_with_control_characters_stay_on_one_line(tmp_path, capsys, long_run):
    import shutil

    from crossmodal.jobs.index import add_to_run

    run = tmp_path / "run"
    shutil.copytree(long_run[0], run)
    folder = tmp_path / "odd"
    folder.mkdir()
    shutil.copy(long_run[1] / f"{LONG}0001.png", folder / "we ird\nname.png")
    row = {"file_name": "we ird\nname.png", "text": "red"}
    (folder / "metadata.jsonl").write_text(json.dumps(row) + "\n")
    add_to_run(run, str(folder), progress=False)
    out, _ = search(capsys, run, "--text", "red", "-k", "200", "--paths")
    assert str(folder / "we ird\\nname.png") in out.splitlines()  # escaped, as ls -b shows it
    out, _ = search(capsys, run, "--text", "red", "-k", "200", "--wide")
    assert "we ird\\nname.png" in out and "we ird\nname" not in out
    (result,) = json_hits(capsys, run, "--text", "red", "-k", "200")
    assert str(folder / "we ird\nname.png") in [h["image_path"] for h in result["hits"]]  # JSON: exact


def test_a_file_gone_since_it_was_added_has_no_path(tmp_path, capsys, long_run):
    import shutil

    run, folder = long_run
    gone = folder / f"{LONG}0001.png"
    backup = tmp_path / "backup.png"
    shutil.copy(gone, backup)
    gone.unlink()  # deleted since the add, and no --sync yet
    try:
        (result,) = json_hits(capsys, run, "--text", "red", "-k", "200")
        by_id = {h["id"]: h["image_path"] for h in result["hits"]}
        assert by_id[gone.name] is None and by_id[f"{LONG}0002.png"] == str(folder / f"{LONG}0002.png")
        out, err = search(capsys, run, "--text", "red", "-k", "200", "--paths")
        assert str(gone) not in out.splitlines() and gone.name in err
    finally:
        shutil.copy(backup, gone)
