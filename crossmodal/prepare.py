"""One process from a recipe to a searchable, evaluated run: build, train, index, evaluate.

``make run`` (``crossmodal prepare``) and ``make demo`` (``python app.py --config ...``)
call ``prepare_run``. Each step is skipped when its output is already there, and the
steps share one process, so torch, transformers and the towers are loaded once rather
than once per command (about 8 s per process on 2 cores).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from crossmodal.run import MANIFEST, RunError, check_run, load_run_config, recover_run

STEPS = ("data", "train", "index", "eval")


def is_trained(run_dir: Path) -> bool:
    """A manifest that lists ``model.safetensors`` (written last by a finished training).

    Raises:
        RunError: the run folder is from another version or its manifest is corrupt.
    """
    if not (run_dir / MANIFEST).exists():
        return False
    manifest = check_run(run_dir)
    return "model.safetensors" in manifest.get("files", {}) and (run_dir / "model.safetensors").exists()


def is_indexed(run_dir: Path) -> bool:
    manifest = check_run(run_dir)
    return "index" in manifest and all((run_dir / f).exists() for f in ("image.index", "text.index"))


def is_evaluated(run_dir: Path) -> bool:
    return "eval" in check_run(run_dir) and (run_dir / "eval" / "metrics.json").exists()


def recipe_differences(run_dir: Path, cfg: Any) -> list[str]:
    """Settings (``section.key``) where the run's saved recipe differs from ``cfg``."""
    try:
        saved = load_run_config(run_dir).to_dict()
    except (RunError, OSError, ValueError):
        return []
    now = cfg.to_dict()
    out = []
    for section in sorted(set(saved) | set(now)):
        a, b = saved.get(section), now.get(section)
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{section}.{k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        elif a != b:
            out.append(section)
    return out


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
    """
    from crossmodal.config import load_config
    from crossmodal.eval_run import eval_run, summary_table
    from crossmodal.indexing import index_run
    from crossmodal.pipeline import check_names, open_dataset, train_run

    started = time.perf_counter()
    cfg = load_config(config, list(overrides))
    check_names(cfg)
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
    if is_trained(run_dir):
        differ = recipe_differences(run_dir, cfg)
        note = f" (trained with other {', '.join(differ)}: delete it to retrain)" if differ else ""
        skipped(1, f"{run_dir} is already trained, skipped{note}")
    else:
        # an interrupted training of this same recipe continues from its last checkpoint
        resume = (run_dir / "checkpoint" / "state.json").exists() and not recipe_differences(run_dir, cfg)
        train_run(cfg, resume=resume, progress=progress)
        best = check_run(run_dir)["best_val_map"]
        done(1, f"{run_dir}{', resumed' if resume else ''}, best validation mAP {best:.3f}", t0)

    t0 = time.perf_counter()
    if is_indexed(run_dir):
        skipped(2, f"{run_dir} is already indexed, skipped")
    else:
        info = index_run(run_dir, progress=progress)
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
