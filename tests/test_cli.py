from __future__ import annotations

import pytest

from crossmodal.cli import COMMANDS, build_parser, main


def test_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for name in ("build-data", "data-info", "train", "index", "search", "eval", "eval-grid", "compare"):
        assert name in out and name in COMMANDS
    assert all(help_text for help_text, _, _ in COMMANDS.values())
    assert build_parser().prog == "crossmodal"


def test_build_data_and_data_info_on_a_registered_dataset(workdir, capsys):
    assert main(["build-data", "tiny_colours", "--force"]) == 0
    assert "96" in capsys.readouterr().out
    assert main(["data-info", "tiny_colours"]) == 0
    out = capsys.readouterr().out
    assert "96" in out and "query" in out.lower()


def test_unknown_dataset_and_bad_option_are_clear_errors(workdir, capsys):
    assert main(["data-info", "imagenet"]) == 2
    err = capsys.readouterr().err
    assert "unknown dataset 'imagenet'" in err and "openmoji" in err
    assert main(["build-data", "tiny_colours", "-o", "novalue"]) == 2
    assert "'novalue' must look like key=value" in capsys.readouterr().err


def cli_subprocess(*argv: str):
    """``crossmodal ARGV`` in a fresh process that knows the tiny run's tower (as a user runs it)."""
    import subprocess
    import sys
    from pathlib import Path

    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import tinyrun; "
            "from crossmodal.cli import main; sys.exit(main(sys.argv[1:]))")  # fmt: skip
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=300)


def test_an_add_prints_one_summary_and_nothing_of_splits_or_datasets(tiny_run_copy, tmp_path):
    # reported: an add of 20 images printed the default protocol's split sizes and datasets' bars
    from tinyrun import image_folder

    folder = image_folder(tmp_path / "twenty", 20).resolve()
    proc = cli_subprocess("index", "--run", str(tiny_run_copy), "--add", str(folder))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == (f"added 20 items and 20 texts from {folder} to {tiny_run_copy}; "
                           "it now holds 116 items and 116 texts\n")  # fmt: skip
    # stderr is no terminal here: no bars at all, no split sizes, no warnings
    assert proc.stderr == ""
    again = cli_subprocess("index", "--run", str(tiny_run_copy), "--add", str(folder))
    assert again.stdout.splitlines() == [
        f"added 0 items and 0 texts from {folder} to {tiny_run_copy}; it now holds 116 items and 116 texts",
        f"20 items of {folder} are in the run already (added before): skipped (--sync re-encodes those "
        "whose files changed)"]  # fmt: skip


def test_a_torchrun_rank_other_than_0_leaves_the_error_to_rank_0(monkeypatch, capsys, tmp_path):
    # reported: under torchrun every rank printed the same error (and rank 1 a gloo traceback)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert main(["train", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    assert main(["train", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_an_unexpected_error_on_another_rank_is_one_line(monkeypatch, capsys):
    import crossmodal.cli as cli

    def broken(args):
        raise RuntimeError("[pair.cc:545] Read error: Connection reset by peer\nmore detail")

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    parser = cli.build_parser()
    args = parser.parse_args(["data-info", "tiny_colours"])
    monkeypatch.setattr(cli, "build_parser", lambda: _Fixed(parser, args, broken))
    assert main(["data-info", "tiny_colours"]) == 1
    assert capsys.readouterr().err == (
        "crossmodal data-info (rank 1): RuntimeError: [pair.cc:545] Read error: Connection reset by peer\n")


class _Fixed:
    """A parser whose parse_args hands back ``args`` with ``func`` replaced."""

    def __init__(self, parser, args, func):
        self.parser, self.args = parser, args
        func.needs = ()
        args.func = func

    def parse_args(self, argv):
        return self.args


def test_index_options_that_cannot_work_are_refused_in_one_line(tiny_run_copy, tmp_path, capsys):
    run = str(tiny_run_copy)
    with pytest.raises(SystemExit):
        main(["index", "--run", run, "--ray", "--ray-workers", "0"])
    assert "--ray-workers: must be a whole number of at least 1, got '0'" in capsys.readouterr().err
    assert main(["index", "--run", run, "--remove-file", str(tmp_path / "nope.txt")]) == 2
    nope = tmp_path / "nope.txt"
    expected = f"crossmodal index: error: --remove-file {nope}: no such file (one key a line)\n"
    assert capsys.readouterr().err == expected
    assert main(["index", "--run", run, "--add", str(tmp_path / "photoz")]) == 2
    err = capsys.readouterr().err
    assert f"cannot add '{tmp_path / 'photoz'}': no such folder, and no dataset has that name" in err
    (tmp_path / "one.png").write_bytes(b"x")
    assert main(["index", "--run", run, "--add", str(tmp_path / "one.png")]) == 2
    assert "a file, not a folder" in capsys.readouterr().err
