"""Grids of runs: train what is missing, evaluate every cell, write one report.

A cell is (recipe, loss, bits). Each cell trains into ``<out>/runs/<recipe>-<loss>-<bits>``
with the recipe's towers, data, splits, seed and epoch budget, so methods are compared on
identical ground. Finished cells are recorded in ``<out>/cells.json`` and skipped on a
re-run; a failing cell is reported and the others go on.
"""

from __future__ import annotations

import json
import logging
import os
import time
import traceback
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from crossmodal.config import load_config
from crossmodal.io import write_json_atomic
from crossmodal.jobs.eval import eval_run
from crossmodal.jobs.train import train_run
from crossmodal.losses import LOSSES, list_losses
from crossmodal.report import grid_report
from crossmodal.runs.state import is_trained

log = logging.getLogger(__name__)


def method_overrides(loss: str) -> list[str]:
    """Config settings a method needs on top of the recipe (e.g. DNNH's divide-and-encode head)."""
    list_losses()
    return [f"{k}={v}" for k, v in getattr(LOSSES.get(loss), "config_overrides", {}).items()]


def run_cell(recipe: str, loss: str, bits: int, out_dir: Path, overrides: list[str]) -> dict[str, Any]:
    """Train (unless already trained) and evaluate one cell; returns the cell record."""
    base = load_config(recipe)
    name = f"{base.name}-{loss}-{bits}"
    cfg = load_config(
        recipe,
        [
            *overrides,
            f"name={name}",
            f"runs_dir={out_dir / 'runs'}",
            f"loss.name={loss}",
            f"model.bits={bits}",
        ]
        + method_overrides(loss),
    )
    if cfg.loss.name != base.loss.name:
        cfg.loss.params = {}  # the recipe's loss parameters belong to its own loss
    run_dir = cfg.run_dir
    log_file = run_dir / "train_log.json"
    if not is_trained(run_dir):
        train_run(cfg, progress=False)
    train_log = json.loads(log_file.read_text())
    metrics = eval_run(run_dir, baselines=False)["hash"]
    return {
        "recipe": base.name, "method": loss, "bits": bits, "run": str(run_dir), "metrics": metrics,
        "train_time_s": round(float(train_log["seconds"]), 2), "best_epoch": train_log["best_epoch"],
        "epochs_run": len(train_log["history"]), "best_val_map": train_log["best_val_map"],
    }  # fmt: skip


def run_grid(
    recipes: list[str],
    losses: list[str],
    bits: list[int],
    out_dir: str | os.PathLike[str],
    overrides: list[str] | None = None,
    progress: bool = True,
) -> Path:
    """Run every (recipe, loss, bits) cell and write ``report.md``, ``results.json`` and plots."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    done_file = out / "cells.json"
    done: dict[str, dict[str, Any]] = json.loads(done_file.read_text()) if done_file.exists() else {}
    cells = [(r, loss, b) for r in recipes for loss in losses for b in bits]
    for recipe, loss, b in tqdm(cells, desc="grid", unit="cell", disable=not progress):
        key = f"{recipe}|{loss}|{b}"
        if key in done and "error" not in done[key]:
            continue
        started = time.perf_counter()
        try:
            done[key] = run_cell(recipe, loss, b, out, list(overrides or []))
        except Exception as exc:  # a failing cell is reported; the grid goes on
            log.error("cell %s failed: %s\n%s", key, exc, traceback.format_exc())
            done[key] = {"recipe": recipe, "method": loss, "bits": b, "error": f"{type(exc).__name__}: {exc}"}
        done[key]["cell_seconds"] = round(time.perf_counter() - started, 2)
        write_json_atomic(done_file, done)
    results = [done[f"{r}|{loss}|{b}"] for r, loss, b in cells]
    if len(recipes) > 1:
        results = [{**c, "method": f"{Path(c['recipe']).stem}/{c['method']}"} for c in results]
    return grid_report(results, out, title=f"{', '.join(Path(r).stem for r in recipes)}: methods x bits")
