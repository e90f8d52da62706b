"""Shared fixtures: a trained tiny run on the synthetic dataset of ``tinyrun.py``.

Nothing heavy is imported here at module level: ``tinyrun`` (torch, datasets) is imported
by the fixtures that need it, so a numpy-only test file runs without loading torch
(``test_suite_hygiene.py`` checks it).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

# Built datasets and feature caches default to the user's cache folder: a test run keeps its
# own, so that it neither reads a user's nor leaves files in it (subprocesses inherit it).
os.environ["CROSSMODAL_HOME"] = tempfile.mkdtemp(prefix="crossmodal-test-home-")


def folder_state(folder: Path) -> dict[str, tuple[int, int]]:
    """``{relative path: (size, mtime_ns)}`` of every file under ``folder``."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in folder.rglob("*") if p.is_file()}  # fmt: skip


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    """A session folder holding built data, caches and runs (CROSSMODAL_DATA_DIR points here).

    Also registers the ``tiny_colours`` dataset and the ``tiny_pool`` tower of ``tinyrun``.
    """
    import tinyrun  # noqa: F401  (registers tiny_colours and tiny_pool)

    root = tmp_path_factory.mktemp("work")
    os.environ["CROSSMODAL_DATA_DIR"] = str(root / "data")
    return root


@pytest.fixture(scope="session")
def tiny_run(workdir) -> Iterator[Path]:
    """A trained and indexed tiny run folder, shared by the engine, app and train tests: read-only.

    A test that writes into a run folder takes ``tiny_run_copy`` instead.
    """
    from tinyrun import tiny_config

    from crossmodal.jobs.index import index_run
    from crossmodal.jobs.train import train_run

    run_dir = train_run(tiny_config(workdir), progress=False)
    index_run(run_dir, progress=False)
    before = folder_state(run_dir)
    yield run_dir
    changed = sorted(set(before.items()) ^ set(folder_state(run_dir).items()))
    assert not changed, f"a test wrote into the shared tiny_run (take tiny_run_copy): {changed}"


@pytest.fixture
def tiny_run_copy(tiny_run, tmp_path) -> Path:
    """A private copy of ``tiny_run`` (without its training checkpoint), free to change."""
    run = tmp_path / tiny_run.name
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("checkpoint"))
    return run


@pytest.fixture(scope="module")
def engine(tiny_run):
    """A ``RetrievalEngine`` on the tiny run (read only), closed after the module."""
    from crossmodal.serving import RetrievalEngine

    eng = RetrievalEngine.load(tiny_run)
    yield eng
    eng.close()
