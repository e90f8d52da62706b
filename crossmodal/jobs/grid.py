"""Grids of runs: train what is missing, evaluate every cell, write one report.

A cell is (recipe, loss, bits). Each cell trains into ``<out>/runs/<recipe>-<loss>-<bits>``
with the recipe's towers, data, splits, seed and epoch budget, so methods are compared on
identical ground. Finished cells are recorded in ``<out>/cells.json`` and skipped on a
re-run; a failing cell is reported and the others go on.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from tqdm.auto import tqdm

from crossmodal.config import Config, load_config
from crossmodal.io import write_json_atomic, write_text_atomic
from crossmodal.jobs.eval import eval_run
from crossmodal.jobs.train import train_run
from crossmodal.losses import LOSSES, list_losses
from crossmodal.losses.base import WeightedPairs
from crossmodal.report import grid_report
from crossmodal.runs.state import is_trained

log = logging.getLogger(__name__)


WEIGHTED = "+wp"  # a method spec's suffix: the pairwise likelihood with weighted similar pairs
LABELS = {"lsh": "CCA-LSH"}  # LSH here cuts a CCA space shared by both modalities


def method_overrides(loss: str) -> list[str]:
    """Config settings a method needs on top of the recipe (e.g. DNNH's divide-and-encode head)."""
    list_losses()
    return [f"{k}={v}" for k, v in getattr(LOSSES.get(loss), "config_overrides", {}).items()]


def takes_pos_weight(loss: str) -> bool:
    """Whether ``loss`` has the pair-weighting switch (DCMH, DPSH, DHN: ``WeightedPairs``)."""
    list_losses()
    return issubclass(LOSSES.get(loss), WeightedPairs)


def split_method(method: str) -> tuple[str, bool]:
    """``"dpsh+wp"`` -> ``("dpsh", True)``; ``"dpsh"`` -> ``("dpsh", False)``.

    Raises:
        ValueError: ``+wp`` on a loss without the pair-weighting switch.
    """
    loss, weighted = (method[: -len(WEIGHTED)], True) if method.endswith(WEIGHTED) else (method, False)
    if weighted and not takes_pos_weight(loss):
        raise ValueError(f"{method}: {loss} has no pair weighting (only dcmh, dpsh and dhn take {WEIGHTED})")
    return loss, weighted


def method_label(method: str) -> str:
    """The name a report shows: ``lsh`` -> ``CCA-LSH``, ``dpsh+wp`` -> ``DPSH + weighted pairs``."""
    loss, weighted = split_method(method)
    return LABELS.get(loss, loss.upper()) + (" + weighted pairs" if weighted else "")


def compare_methods(losses: list[str]) -> list[str]:
    """What ``compare`` trains: each loss as its paper states it, then, for the losses with the
    pair-weighting switch, the same with weighted pairs."""
    out = []
    for loss in losses:
        out.append(loss)
        if takes_pos_weight(loss):
            out.append(loss + WEIGHTED)
    return out


def loss_params(recipe_loss: str, recipe_params: dict[str, Any], loss: str,
                overrides: list[str]) -> tuple[dict[str, Any], list[str]]:  # fmt: skip
    """The parameters of ``loss`` in a cell: the recipe's own for the recipe's loss, the
    loss's defaults (its paper's) for any other; then each ``loss.params.KEY=VALUE`` of
    ``overrides`` that ``loss`` takes. Returns the parameters and the override keys it does
    not take (reported, not applied)."""
    params = dict(recipe_params) if loss == recipe_loss else {}
    accepted = set(inspect.signature(LOSSES.get(loss).__init__).parameters) - {"self"}
    ignored = []
    for item in overrides:
        key, _, value = item.partition("=")
        if not key.startswith("loss.params."):
            continue
        name = key[len("loss.params.") :]
        if name in accepted:
            params[name] = yaml.safe_load(value)
        else:
            ignored.append(name)
    return params, ignored


def cell_config(recipe: str, method: str, bits: int, out_dir: Path, overrides: list[str],
                paper_pairs: bool = False, name: str | None = None) -> Config:  # fmt: skip
    """The recipe of one cell: ``method`` (a loss, ``+wp`` for weighted pairs) at ``bits``.

    The recipe's towers, data, splits, seed, epochs and add-on terms hold for every method;
    ``loss.params`` come from ``loss_params``. With ``paper_pairs``, a method with the
    pair-weighting switch and no ``+wp`` gets ``pos_weight = 1`` (its paper's), unless an
    override sets it.
    """
    loss, weighted = split_method(method)
    base = load_config(recipe)
    rest = [o for o in overrides if not o.startswith("loss.params")]
    cfg = load_config(recipe, [*rest, f"name={name or f'{base.name}-{method}-{bits}'}",
                               f"runs_dir={out_dir / 'runs'}", f"loss.name={loss}", f"model.bits={bits}",
                               *method_overrides(loss)])  # fmt: skip
    params, ignored = loss_params(base.loss.name, base.loss.params, loss, overrides)
    if ignored:
        log.info("%s takes no %s; those overrides are left out of its cells", loss, ", ".join(ignored))
    user_set = any(o.startswith("loss.params.pos_weight=") for o in overrides)
    if weighted:
        params["pos_weight"] = "balanced"
    elif paper_pairs and takes_pos_weight(loss) and not user_set:
        params["pos_weight"] = 1.0
    cfg.loss.params = params
    return cfg


def run_cell(recipe: str, method: str, bits: int, out_dir: Path, overrides: list[str],
             paper_pairs: bool = False, name: str | None = None,
             evaluate: bool = True) -> dict[str, Any]:  # fmt: skip
    """Train (unless already trained) and, with ``evaluate``, evaluate one cell; returns its record."""
    cfg = cell_config(recipe, method, bits, out_dir, overrides, paper_pairs, name)
    run_dir = cfg.run_dir
    if not is_trained(run_dir):
        train_run(cfg, progress=False)
    train_log = json.loads((run_dir / "train_log.json").read_text())
    cell = {
        "recipe": load_config(recipe).name, "method": method, "bits": bits, "run": str(run_dir),
        "loss_params": cfg.loss.params, "seed": cfg.train.seed,
        "train_time_s": round(float(train_log["seconds"]), 2), "best_epoch": train_log["best_epoch"],
        "epochs_run": len(train_log["history"]), "best_val_map": train_log["best_val_map"],
    }  # fmt: skip
    if evaluate:
        result = eval_run(run_dir, baselines=False)
        cell["metrics"] = result["hash"]
        keyword = result.get("keyword") or {}
        cell["keyword_p@10"] = {s: keyword[s]["p@10"] for s in ("database", "query") if s in keyword}
    return cell


def run_grid(
    recipes: list[str],
    losses: list[str],
    bits: list[int],
    out_dir: str | os.PathLike[str],
    overrides: list[str] | None = None,
    progress: bool = True,
    paper_pairs: bool = False,
) -> Path:
    """Run every (recipe, method, bits) cell and write ``report.md``, ``results.json`` and plots.

    ``losses`` are method specs (``split_method``); ``paper_pairs`` as in ``cell_config``.
    """
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
            done[key] = run_cell(recipe, loss, b, out, list(overrides or []), paper_pairs)
        except Exception as exc:  # a failing cell is reported; the grid goes on
            log.error("cell %s failed: %s\n%s", key, exc, traceback.format_exc())
            done[key] = {"recipe": recipe, "method": loss, "bits": b, "error": f"{type(exc).__name__}: {exc}"}
        done[key]["cell_seconds"] = round(time.perf_counter() - started, 2)
        write_json_atomic(done_file, done)
    results = [{**done[f"{r}|{loss}|{b}"], "method": method_label(loss)} for r, loss, b in cells]
    if len(recipes) > 1:
        results = [{**c, "method": f"{Path(r).stem}/{c['method']}"} for c, (r, _, _) in zip(results, cells)]
    return grid_report(results, out, title=f"{', '.join(Path(r).stem for r in recipes)}: methods x bits")


#: ``compare --search``: per loss, four trials of its own main settings (``loss.params``) at
#: 64 bits; margins (in squared-distance or Hamming units) scale with bits / 64 at other lengths
SEARCH_SPACES: dict[str, list[dict[str, Any]]] = {
    "cnnh": [{"cls": v} for v in (0.0, 0.1, 1.0, 10.0)],
    "dcmh": [{"gamma": g, "eta": e} for g in (1.0, 100.0) for e in (1.0, 0.01)],
    "dhn": [{"lam": v} for v in (0.01, 0.1, 1.0, 10.0)],
    "dlbhc": [{"align": v} for v in (0.1, 1.0, 10.0, 100.0)],
    "dnnh": [{"margin": v} for v in (8.0, 16.0, 32.0, 64.0)],
    "dpsh": [{"eta": v} for v in (0.01, 0.1, 1.0, 10.0)],
    "drsch": [{"margin": v} for v in (4.0, 8.0, 16.0, 32.0)],
    "dsh": [{"alpha": v} for v in (0.001, 0.01, 0.1, 1.0)],
    "dsrh": [{"intra": v} for v in (0.0, 0.5, 1.0, 2.0)],
    "lsh": [{"power": v} for v in (0.0, 1.0, 4.0, 8.0)],
}
SEEDS = (0, 1, 2)


def search_trials(loss: str, bits: int) -> list[dict[str, Any]]:
    """The trials of ``loss`` at ``bits`` (one trial, its defaults, when it has no search space)."""
    scale = bits / 64
    trials = SEARCH_SPACES.get(loss, [{}])
    return [{k: v * scale if k == "margin" else v for k, v in t.items()} for t in trials]


def run_search(recipe: str, methods: list[str], bits: int, out_dir: str | os.PathLike[str],
               overrides: list[str] | None = None, seeds: tuple[int, ...] = SEEDS) -> Path:  # fmt: skip
    """The fair protocol: every method gets the same small validation search over its own
    main settings (``search_trials``, same recipe, epochs and optimiser), the setting with
    the best validation mAP is kept, and it is trained with ``seeds`` (``train.seed``, and
    the loss's own ``seed`` for methods that sample triplets or draw hyperplanes) and
    evaluated on the query split: mean and spread. Finished cells are recorded in
    ``<out>/search.json`` and skipped on a re-run. Writes ``<out>/search.md`` and returns it.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    done_file = out / "search.json"
    done: dict[str, dict[str, Any]] = json.loads(done_file.read_text()) if done_file.exists() else {}
    user = list(overrides or [])
    rows = []
    for method in tqdm(methods, desc="search", unit="method"):
        loss, _ = split_method(method)
        trials = search_trials(loss, bits)

        # a method that draws its own samples or hyperplanes (its ``seed``) is reseeded too
        list_losses()
        own_seed = "seed" in inspect.signature(LOSSES.get(loss).__init__).parameters

        def cell(key: str, settings: dict[str, Any], seed: int, evaluate: bool, name: str) -> dict[str, Any]:
            if key not in done:
                extra = [f"loss.params.{k}={v}" for k, v in settings.items()] + [f"train.seed={seed}"]
                if own_seed and seed != seeds[0]:
                    extra.append(f"loss.params.seed={seed}")
                done[key] = {**run_cell(recipe, method, bits, out, [*user, *extra], True, name, evaluate),
                             "settings": settings}  # fmt: skip
                write_json_atomic(done_file, done)
            return done[key]

        tried = [cell(f"{method}|trial{i}", t, seeds[0], False, f"{method}-{bits}-t{i}")
                 for i, t in enumerate(trials)]  # fmt: skip
        best = max(range(len(tried)), key=lambda i: tried[i]["best_val_map"])
        # the chosen trial already is the first seed's run: it is evaluated, not trained again
        runs = [cell(f"{method}|trial{best}|seed{s}", trials[best], s, True,
                     f"{method}-{bits}-t{best}" + (f"-s{s}" if s != seeds[0] else ""))
                for s in seeds]  # fmt: skip
        rows.append(_search_row(method, trials, tried, best, runs))
    write_json_atomic(out / "search_results.json", rows)
    return _search_report(rows, out, f"{Path(recipe).stem}: every method with its own validation search, "
                                     f"{bits} bits, seeds {', '.join(map(str, seeds))}")  # fmt: skip


def _search_row(method: str, trials: list[dict[str, Any]], tried: list[dict[str, Any]], best: int,
                runs: list[dict[str, Any]]) -> dict[str, Any]:  # fmt: skip
    def spread(values: list[float]) -> dict[str, float]:
        a = np.asarray(values, dtype=np.float64)
        return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0}

    dirs = [d for d in ("i2t", "t2i", "i2i", "t2t") if d in runs[0]["metrics"]]
    ndcg = next((k for k in runs[0]["metrics"][dirs[0]] if k.startswith("ndcg@")), None)
    row: dict[str, Any] = {
        "method": method_label(method), "spec": method, "chosen": trials[best],
        "trials": [{"settings": t, "val_map": c["best_val_map"]} for t, c in zip(trials, tried, strict=True)],
        "train_time_s": spread([c["train_time_s"] for c in runs]),
    }  # fmt: skip
    for d in dirs:
        row[f"map_{d}"] = spread([c["metrics"][d]["map"] for c in runs])
        if ndcg:
            row[f"{ndcg}_{d}"] = spread([c["metrics"][d][ndcg] for c in runs])
    if all("database" in (c.get("keyword_p@10") or {}) for c in runs):
        row["keyword_p@10"] = spread([c["keyword_p@10"]["database"] for c in runs])
    return row


def _search_report(rows: list[dict[str, Any]], out: Path, title: str) -> Path:
    def cell(v: Any, digits: int = 3) -> str:
        if not (isinstance(v, dict) and "mean" in v):
            return ""
        return f"{v['mean']:.{digits}f} ± {v['std']:.{digits}f}"

    def settings(s: dict[str, Any]) -> str:
        parts = (f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in s.items())
        return ", ".join(parts) or "defaults"

    order = ("i2t", "t2i", "i2i", "t2t")
    cols = [f"map_{d}" for d in order]
    ndcg = sorted({k for r in rows for k in r if k.startswith("ndcg@")}, key=lambda k: order.index(k[-3:]))
    head = ["method", "chosen (validation mAP of the 4 trials)", *(f"{c[4:]} mAP" for c in cols),
            *(f"{c[-3:]} NDCG@{c[5:-4]}" for c in ndcg), "keyword P@10", "train s"]
    lines = [f"# {title}\n", "Mean ± standard deviation over the seeds; mAP with stable ranking on the "
             "query split; NDCG graded by shared labels; keyword P@10 over the whole database.\n",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]  # fmt: skip
    for r in rows:
        trials = " / ".join(f"{t['val_map']:.3f}" for t in r["trials"])
        lines.append("| " + " | ".join([
            r["method"], f"{settings(r['chosen'])} ({trials})", *(cell(r.get(c)) for c in cols),
            *(cell(r.get(c)) for c in ndcg), cell(r.get("keyword_p@10")), cell(r["train_time_s"], 1),
        ]) + " |")  # fmt: skip
    path = out / "search.md"
    write_text_atomic(path, "\n".join(lines) + "\n")
    return path
