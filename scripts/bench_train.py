"""Where the default recipe's time goes: dataset, frozen feature extraction, training.

Runs the OpenMoji default (or ``--config``) into a scratch run folder with an empty
feature cache, then again with the cache warm, and prints a markdown table of the
phases. Example:

    python scripts/bench_train.py --config configs/openmoji.yaml --out docs/bench_train.json
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from crossmodal.config import load_config
from crossmodal.data import open_dataset
from crossmodal.io import write_json_atomic
from crossmodal.jobs.train import train_run


def one_run(config: str, cache: Path, runs: Path, name: str, overrides: list[str]) -> dict:
    cfg = load_config(config, [*overrides, f"name={name}", f"runs_dir={runs}", f"train.cache_dir={cache}"])
    started = time.perf_counter()
    run = train_run(cfg, progress=False)
    total = time.perf_counter() - started
    log = json.loads((run / "train_log.json").read_text())
    return {"total_s": round(total, 2), **log["timings"], "epochs_run": len(log["history"]),
            "best_val_map": round(log["best_val_map"], 4)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/openmoji.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--out", help="write the numbers as JSON here")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    t0 = time.perf_counter()
    dataset = open_dataset(cfg.data.name, cfg.data.options)
    data_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        cold = one_run(args.config, Path(tmp) / "cache", Path(tmp) / "runs", "cold", args.overrides)
        warm = one_run(args.config, Path(tmp) / "cache", Path(tmp) / "runs", "warm", args.overrides)
    rows = {"cold cache": cold, "warm cache": warm}
    print(f"{cfg.data.name}: {len(dataset)} items, {cfg.model.image_tower} @ {cfg.model.image_size}px + "
          f"{cfg.model.text_tower}, {cfg.model.bits} bits; dataset ready in {data_s:.1f} s; "
          f"torch threads {torch.get_num_threads()}")  # fmt: skip
    keys = ["total_s", "features", "epochs", "epochs_run", "best_val_map"]
    print("| run | " + " | ".join(keys) + " |")
    print("|---|" + "---|" * len(keys))
    for name, row in rows.items():
        print(f"| {name} | " + " | ".join(str(row.get(k, "")) for k in keys) + " |")
    if args.out:
        meta = {"machine": platform.machine(), "threads": torch.get_num_threads(), "items": len(dataset)}
        write_json_atomic(args.out, {**meta, "dataset_s": round(data_s, 2), **rows})


if __name__ == "__main__":
    main()
