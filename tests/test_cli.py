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
