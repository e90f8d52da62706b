"""The README's command-line recipes (shell) run as written.

Each fenced block that follows a ``<!-- recipe: tests/test_cli_recipes.py ... -->`` comment
runs line by line in bash, in a folder holding ``runs/openmoji`` (a copy of the tiny run under
the default run's name) and ``photos/`` (an image folder with metadata.jsonl). ``crossmodal``
and ``python`` on the PATH are this interpreter, with the tiny run's tower registered.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tinyrun import image_folder

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
RECIPE = re.compile(r"<!-- recipe: tests/test_cli_recipes\.py[^>]*-->\n```sh\n(.*?)```", re.DOTALL)


def recipes() -> list[str]:
    return RECIPE.findall((ROOT / "README.md").read_text(encoding="utf-8"))


def fake_bin(folder: Path) -> Path:
    """``crossmodal`` (the CLI with the tiny tower registered) and ``python`` for the recipes."""
    folder.mkdir()
    (folder / "crossmodal").write_text(
        f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {str(TESTS)!r})\nimport tinyrun  # noqa\n"
        "from crossmodal.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    )
    (folder / "crossmodal").chmod(0o755)
    (folder / "python").symlink_to(sys.executable)
    return folder


def test_the_readme_has_recipes():
    assert recipes(), "no block marked <!-- recipe: tests/test_cli_recipes.py --> in README.md"


@pytest.mark.parametrize("number", range(len(recipes())))
def test_a_readme_recipe_runs_as_written(number, tiny_run, tmp_path):
    shutil.copytree(tiny_run, tmp_path / "runs" / "openmoji", ignore=shutil.ignore_patterns("checkpoint"))
    image_folder(tmp_path / "photos", 6)
    env = {**os.environ, "PATH": f"{fake_bin(tmp_path / 'bin')}{os.pathsep}{os.environ['PATH']}"}
    outputs = []
    for line in recipes()[number].strip().splitlines():
        proc = subprocess.run(["bash", "-o", "pipefail", "-c", line], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)  # fmt: skip
        assert proc.returncode == 0, f"{line}\n{proc.stdout}\n{proc.stderr}"
        outputs.append(proc.stdout)
    if number == 0:  # the scripts recipe: what each line printed
        assert outputs[0].startswith("added 6 items and 6 texts from ")
        assert "nothing to do" in outputs[1]
        paths = outputs[2].splitlines()
        assert len(paths) == 5 and all(Path(p).is_file() for p in paths)
        results = [json.loads(line) for line in (tmp_path / "hits.jsonl").read_text().splitlines()]
        assert [r["query"] for r in results] == ["red heart", "yellow star"]
        assert outputs[4].startswith("['")
