"""The README's recipes for scripts, run as written against a live app on the tiny run.

The code blocks of the section "Driving the app from a script" are taken from README.md; only
the address changes (the app listens on a free port instead of 7860), and ``photo.png`` is an
image of the tiny run in the folder the recipes run in.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_app import free_port, load_app_module

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Driving the app from a script"
README_URL = "http://127.0.0.1:7860"


def recipe_blocks(language: str) -> list[str]:
    """The ``language`` code blocks of the README's section on scripts."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index(SECTION) :]
    section = section[: section.index("\n## ", len(SECTION))]
    return re.findall(rf"```{language}\n(.*?)```", section, flags=re.S)


@pytest.fixture(scope="module")
def live_app(tiny_run, tmp_path_factory):
    """``(url without the trailing slash, folder with photo.png)`` of the app on the tiny run."""
    from crossmodal.serving import RetrievalEngine

    engine = RetrievalEngine.load(tiny_run)
    demo, url = load_app_module().serve(engine, port=free_port(), prevent_thread_lock=True)
    folder = tmp_path_factory.mktemp("recipes")
    shutil.copy(next((Path(tiny_run) / "images").glob("*.png")), folder / "photo.png")
    try:
        yield url.rstrip("/"), folder
    finally:
        demo.close()
        engine.close()


def test_the_readme_has_the_recipes():
    python, shell = recipe_blocks("python"), recipe_blocks("sh")
    assert len(python) == 1 and len(shell) == 1
    for endpoint in ("/text_to_images", "/image_to_captions", "/image_to_images", "/text_to_texts", "/about"):
        assert f'api_name="{endpoint}"' in python[0], endpoint
    assert "download_files=False" in python[0]
    assert "curl" in shell[0] and "/api/search" in shell[0]


def test_the_gradio_client_recipe_runs_as_written(live_app):
    url, folder = live_app
    (block,) = recipe_blocks("python")
    check = "\nassert result['error'] is None and len(result['hits']) == 12, result\nprint('RECIPE OK')\n"
    code = block.replace(README_URL, url) + check
    proc = subprocess.run([sys.executable, "-c", code], cwd=folder, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.strip().splitlines() if not line.startswith("Loaded as API")]
    assert lines[-1] == "RECIPE OK" and len(lines) == 12 + 2, proc.stdout  # a line per hit, about, OK
    assert "'bits': 16" in lines[-2]


def test_the_curl_lines_run_as_written(live_app):
    url, folder = live_app
    (block,) = recipe_blocks("sh")
    lines = [line for line in block.splitlines() if line.strip()]
    assert len(lines) >= 4
    for line in lines:
        proc = subprocess.run(["bash", "-c", line.replace(README_URL, url)], cwd=folder, capture_output=True,
                              text=True, timeout=60)  # fmt: skip
        assert proc.returncode == 0, (line, proc.stderr)
        body = json.loads(proc.stdout)
        if "/api/about" in line:
            assert body["bits"] == 16, body
            continue
        assert body["error"] is None and len(body["hits"]) == 5, (line, body)
        expected = "i2i" if "target=images" in line else "i2t" if "image=@" in line else None
        if expected:
            assert body["direction"] == expected and body["query"] == "photo.png", (line, body)
