"""One process from a recipe to a searchable, evaluated run: build, train, index, evaluate.

``make run`` (``crossmodal prepare``) and ``make demo`` (``python app.py --config ...``)
call ``prepare_run``. Each step is skipped when its output is already there, and the
steps share one process, so torch, transformers and the towers are loaded once rather
than once per command (about 8 s per process on 2 cores).
"""

from __future__ import annotations

import json
import os
import shlex
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from crossmodal.config import Config, ConfigError, load_config, settings_differences, training_settings
from crossmodal.data import open_dataset
from crossmodal.jobs.eval import eval_run, summary_table
from crossmodal.jobs.index import index_run
from crossmodal.jobs.train import check_names, checkpoint_differences, checkpoint_state, train_run
from crossmodal.runs.folder import (
    ManifestError,
    RunError,
    RunFormatError,
    check_run,
    load_run_config,
    lock_run,
    recover_run,
)
from crossmodal.runs.state import is_evaluated, is_indexed, is_trained

STEPS = ("data", "train", "index", "eval")


def recipe_differences(run_dir: Path, cfg: Config) -> list[str]:
    """Training settings (``section.key``) in which the run's saved recipe differs from ``cfg``.

    Names, paths, index settings and runtime knobs (threads, batch size of feature
    extraction, cache folder...) are not compared. An unreadable saved recipe differs.
    """
    try:
        saved = load_run_config(run_dir)
    except (RunError, ConfigError, OSError, ValueError):
        return ["config.yaml (missing or unreadable)"]
    return settings_differences(training_settings(saved), training_settings(cfg))


def can_resume(run_dir: Path, cfg: Config) -> bool:
    """A whole checkpoint, written by this very recipe, in a run folder saved with it."""
    meta = checkpoint_state(run_dir)
    return meta is not None and not checkpoint_differences(meta, cfg) and not recipe_differences(run_dir, cfg)


def prepare_run(
    config: str | os.PathLike[str] | None = "configs/openmoji.yaml",
    overrides: Sequence[str] = (),
    baselines: bool = True,
    progress: bool = True,
    say: Callable[[str], None] = print,
) -> Path:
    """Build the recipe's dataset, train, index and evaluate its run; return the run folder.

    Steps whose output exists are skipped (and say so). A run trained from another
    recipe is kept, with a note naming the settings that differ.

    Raises:
        ConfigError, UnknownNameError: a bad recipe, before any work.
        RunError: the run folder exists but is damaged or from another version.
        RunBusyError: another process is writing the run.
    """
    started = time.perf_counter()
    cfg = load_config(config, list(overrides))
    check_names(cfg)
    command = shlex.join(["crossmodal", "prepare", *(["--config", str(config)] if config else []),
                          *(a for o in overrides for a in ("--set", o))])  # fmt: skip
    with lock_run(cfg.run_dir, command, create=True):  # train, index and eval take it again
        return _prepare_run(cfg, baselines, progress, say, started)


def _prepare_run(cfg: Config, baselines: bool, progress: bool, say: Callable[[str], None],
                 started: float) -> Path:  # fmt: skip
    run_dir = cfg.run_dir
    if run_dir.is_dir():
        recover_run(run_dir)  # finish or roll back an update a crash interrupted
    n = len(STEPS)

    def done(i: int, text: str, t0: float) -> None:
        say(f"[{i + 1}/{n}] {STEPS[i]}: {text} ({time.perf_counter() - t0:.1f} s)")

    def skipped(i: int, text: str) -> None:
        say(f"[{i + 1}/{n}] {STEPS[i]}: {text}")

    t0 = time.perf_counter()
    dataset = open_dataset(cfg.data.name, cfg.data.options)
    done(0, f"{dataset.name}, {len(dataset):,} items", t0)

    t0 = time.perf_counter()
    try:
        trained = is_trained(run_dir)
    except RunFormatError as exc:  # a run of an older crossmodal is retrained in place; a newer one is not
        if not exc.older:
            raise
        say(f"[2/{n}] train: {str(exc).split(':')[0]}; retraining it")
        trained = False
    except ManifestError as exc:  # a corrupt manifest vouches for nothing: the run is rebuilt
        say(f"[2/{n}] train: {str(exc).split(' (')[0]}; retraining the run")
        trained = False
    if trained:
        differ = recipe_differences(run_dir, cfg)
        note = f" (trained with other {', '.join(differ)}: delete it to retrain)" if differ else ""
        skipped(1, f"{run_dir} is already trained, skipped{note}")
    else:
        resume = can_resume(run_dir, cfg)  # an interrupted training of this recipe continues
        train_run(cfg, resume=resume, progress=progress)
        best = check_run(run_dir)["best_val_map"]
        done(1, f"{run_dir}{', resumed' if resume else ''}, best validation mAP {best:.3f}", t0)

    t0 = time.perf_counter()
    if is_indexed(run_dir, cfg.index.kind):
        skipped(2, f"{run_dir} is already indexed, skipped")
    else:
        info = index_run(run_dir, kind=cfg.index.kind, params=cfg.index.params, progress=progress)
        done(2, f"{info['items']:,} images and {info['texts']:,} texts ({info['kind']})", t0)

    t0 = time.perf_counter()
    if is_evaluated(run_dir):
        rows = json.loads((run_dir / "eval" / "metrics.json").read_text(encoding="utf-8"))
        skipped(3, f"{run_dir} is already evaluated, skipped")
    else:
        rows = eval_run(run_dir, baselines=baselines)
        done(3, f"{cfg.data.name} query split against the database", t0)
    say(summary_table(rows))
    say(f"report: {run_dir / 'eval' / 'report.md'}")
    say(f"{run_dir} ready in {time.perf_counter() - started:.1f} s")
    return run_dir
