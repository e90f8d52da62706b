"""The base package serves exported runs; the other commands name the extra they need.

Missing extras are simulated by blocking their modules (``sys.modules[name] = None``, so an
import of one fails as if it were not installed): in this process for the commands that
check their extras before doing anything, in a fresh interpreter where an import that
fails half-way through a command is the point. ``test_wheel.py`` checks the same messages
from a venv where the extras really are missing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from crossmodal.cli import COMMANDS, EXTRA_OF_MODULE, EXTRAS, main

ROOT = Path(__file__).resolve().parents[1]
TRAIN_HINT = "pip install 'crossmodal[train]'"
APP_HINT = "pip install 'crossmodal[app]'"
# every command but search and serve needs the training extra
TRAINING_COMMANDS = {
    "build-data": [],
    "data-info": [],
    "train": [],
    "prepare": [],
    "index": ["--run", "runs/none"],
    "export": ["--run", "runs/none"],
    "eval": ["--run", "runs/none"],
    "eval-grid": [],
    "compare": [],
}


def block(monkeypatch, *extras: str) -> None:
    for extra in extras:
        for module, owner in EXTRA_OF_MODULE.items():
            if owner == extra:
                monkeypatch.setitem(sys.modules, module, None)


def test_every_command_is_sorted_into_serving_or_training():
    assert set(COMMANDS) == set(TRAINING_COMMANDS) | {"search", "serve"}
    assert all(module in EXTRA_OF_MODULE for _, modules in EXTRAS.values() for module in modules)


@pytest.mark.parametrize("name", sorted(TRAINING_COMMANDS))
def test_a_training_command_without_the_training_extra_says_so_in_one_line(name, monkeypatch, capsys):
    block(monkeypatch, "train")
    assert main([name, *TRAINING_COMMANDS[name]]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"crossmodal {name} needs the training extra: {TRAIN_HINT}\n"
    assert captured.out == ""


def test_serve_names_the_app_extra_and_with_a_recipe_the_training_extra(monkeypatch, capsys):
    block(monkeypatch, "app")
    assert main(["serve", "--run", "runs/none"]) == 2
    assert capsys.readouterr().err == f"crossmodal serve needs the app extra: {APP_HINT}\n"
    block(monkeypatch, "train")
    assert main(["serve", "--config", "configs/openmoji.yaml"]) == 2
    assert capsys.readouterr().err == (
        "crossmodal serve --config needs the training and app extras: pip install 'crossmodal[train,app]'\n"
    )


# Runs in a fresh interpreter: argv = the modules to block, then JSON lists of arguments.
CHILD = """
import contextlib, io, json, sys
for module in sys.argv[1].split(","):
    sys.modules[module] = None
from crossmodal.cli import main
for argv in sys.argv[2:]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(json.loads(argv))
    print(json.dumps([rc, err.getvalue()]))
"""


def run_blocked(modules: list[str], *argvs: list[str]) -> list[tuple[int, str]]:
    cmd = [sys.executable, "-c", CHILD, ",".join(modules), *(json.dumps(a) for a in argvs)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return [tuple(json.loads(line)) for line in out.stdout.splitlines()]


def test_searching_with_torch_needs_the_training_extra_and_says_why(tiny_run):
    blocked = [m for m, extra in EXTRA_OF_MODULE.items() if extra == "train"]
    run = str(tiny_run)  # trained and indexed, not exported: its queries are encoded by torch
    search = ["search", "--run", run, "--text", "red"]
    auto, explicit = run_blocked(blocked, search, [*search, "--encoders", "torch"])
    assert auto == (2, f"crossmodal search needs the training extra to encode queries with torch: {run} has "
                       f"no exported encoders (crossmodal export writes them): {TRAIN_HINT}\n")  # fmt: skip
    assert explicit == (2, f"crossmodal search needs the training extra to encode queries with torch: "
                           f"{TRAIN_HINT}\n")  # fmt: skip


def test_an_exported_run_is_searched_without_the_training_and_app_extras(tiny_run, tmp_path):
    from test_export import export_copy

    run, _ = export_copy(tiny_run, tmp_path)
    blocked = list(EXTRA_OF_MODULE)
    image = str(sorted((run / "images").glob("*.png"))[0])
    answers = run_blocked(blocked, ["search", "--run", str(run), "--text", "red", "-k", "3"],
                          ["search", "--run", str(run), "--image", image, "--same", "-k", "3"])  # fmt: skip
    assert answers == [(0, ""), (0, "")]
