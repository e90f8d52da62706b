"""Shared fixtures: a trained tiny run on the synthetic dataset of ``tinyrun.py``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from tinyrun import tiny_config


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    """A session folder holding built data, caches and runs (CROSSMODAL_DATA_DIR points here)."""
    root = tmp_path_factory.mktemp("work")
    os.environ["CROSSMODAL_DATA_DIR"] = str(root / "data")
    return root


@pytest.fixture(scope="session")
def tiny_run(workdir) -> Path:
    """A trained and indexed tiny run folder (shared by the engine, eval and app tests)."""
    from crossmodal.jobs.index import index_run
    from crossmodal.jobs.train import train_run

    run_dir = train_run(tiny_config(workdir), progress=False)
    index_run(run_dir, progress=False)
    return run_dir
