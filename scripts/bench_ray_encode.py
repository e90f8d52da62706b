"""Encoding throughput of ``crossmodal index --add``: the single-process path against Ray Data
with 1 and 2 workers, on images of the run's own dataset written out as an image folder, or
(``--source parquet``) as two Parquet shards added through the ``hub`` dataset, which the
workers read themselves.

Each timed call adds the same folder (``--n`` images with their captions) to a fresh copy of the
run, end to end: planning, encoding images and texts, building the indexes and the store, the
journaled update. The Ray cluster is started once, before the timings (its start is reported
apart); each Ray call starts its actor pools, whose actors load the run's encoders (ONNX when the
run has exported them). Also timed: the run's ONNX encoders in this process, no Ray, images and
texts only (what the workers do, without Ray's overhead). Medians over ``--repeats``.

Usage:
    python scripts/bench_ray_encode.py --run runs/openmoji --n 300 --out runs/bench/ray_encode.json
    python scripts/bench_ray_encode.py --source parquet --n 300 --out runs/bench/ray_encode_parquet.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("bench_ray_encode")
SKIPPED = ("checkpoint", "images", "eval", "*.int8.onnx")  # not read by an add


def write_folder(run: Path, n: int, folder: Path) -> Path:
    """The first ``n`` items of the run's dataset as an image folder with metadata.jsonl."""
    from crossmodal.data import open_dataset
    from crossmodal.runs.folder import load_run_config

    cfg = load_run_config(run)
    dataset = open_dataset(cfg.data.name, cfg.data.options)
    positions = list(range(min(n, len(dataset))))
    folder.mkdir(parents=True)
    lines = []
    for i, (row, captions) in enumerate(zip(dataset.image_rows(positions), dataset.captions_of(positions))):
        name = f"img{i:05d}.png"
        data = row["image_bytes"] or (Path(dataset.info.image_root) / row["image_path"]).read_bytes()
        (folder / name).write_bytes(data)
        lines.append(json.dumps({"file_name": name, "text": list(captions)}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def write_parquet(folder: Path, shards: Path) -> dict[str, Any]:
    """The image folder's items as two Parquet shards (key, image struct, captions); the ``hub``
    options that add them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text(encoding="utf-8").splitlines()]
    records = []
    for r in rows:
        image = {"bytes": (folder / r["file_name"]).read_bytes(), "path": None}
        records.append({"key": r["file_name"], "captions": r["text"], "image": image})
    shards.mkdir(parents=True)
    half = len(records) // 2
    for part, chunk in enumerate((records[:half], records[half:])):
        pq.write_table(pa.Table.from_pylist(chunk), shards / f"part-{part}.parquet")
    return {"root": str(shards), "builder": "parquet", "text_column": "captions", "id_column": "key"}


def timed_add(base: Path, source: str, options: dict[str, Any] | None, work: Path, ray: Any = None) -> float:
    """Seconds of one ``add_to_run`` of ``source`` into a fresh copy of ``base``; the source's
    dataset is built afresh each time (``force``), as a first add builds it."""
    from crossmodal.jobs.index import add_to_run

    run = work / "run"
    shutil.rmtree(run, ignore_errors=True)
    shutil.copytree(base, run)
    started = time.perf_counter()
    info = add_to_run(run, source, {**(options or {}), "force": True}, progress=False, ray=ray)
    seconds = time.perf_counter() - started
    log.info("added %d items, %d texts in %.2f s", info["added_items"], info["added_texts"], seconds)
    return seconds


def timed_onnx(run: Path, folder: Path, batch_size: int) -> float:
    """Seconds to encode the folder's images and captions with the run's ONNX encoders here."""
    from crossmodal.images import open_image
    from crossmodal.runs.exported import OnnxEncoders

    encoders = OnnxEncoders.load(run, threads=1)
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text(encoding="utf-8").splitlines()]
    texts = [c for r in rows for c in r["text"]]
    started = time.perf_counter()
    for s in range(0, len(rows), batch_size):
        encoders.encode_images([open_image(folder / r["file_name"]) for r in rows[s:s + batch_size]])
    for s in range(0, len(texts), batch_size):
        encoders.encode_texts(texts[s:s + batch_size])
    return time.perf_counter() - started


def summary(name: str, times: list[float], n: int) -> dict[str, Any]:
    median = statistics.median(times)
    return {"path": name, "seconds": [round(t, 2) for t in times], "median_s": round(median, 2),
            "images_per_s": round(n / median, 1)}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, default=Path("runs/openmoji"))
    p.add_argument("--n", type=int, default=300, help="images in the folder added")
    p.add_argument("--source", choices=("folder", "parquet"), default="folder",
                   help="add the images as an image folder, or as Parquet shards (hub dataset)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--cpus", type=int, default=os.cpu_count(), help="CPUs of the local Ray cluster")
    p.add_argument("--out", type=Path, default=None, help="also write the results here (JSON)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    with tempfile.TemporaryDirectory(prefix="bench-ray-") as tmp:
        work = Path(tmp)
        folder = write_folder(args.run, args.n, work / "folder")
        source, options = str(folder), None
        if args.source == "parquet":
            source, options = "hub", write_parquet(folder, work / "shards")
        base = work / "base"
        shutil.copytree(args.run, base, ignore=shutil.ignore_patterns(*SKIPPED))
        times = [timed_add(base, source, options, work) for _ in range(args.repeats)]
        results = [summary("single process (index --add, torch)", times, args.n)]
        onnx = [timed_onnx(base, folder, args.batch_size) for _ in range(args.repeats)]
        results.append(summary("ONNX encoders in this process (encoding only)", onnx, args.n))
        results += bench_ray(args, base, source, options, work)
    report = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                          "load_avg": os.getloadavg()}, "n": args.n, "source": args.source,
              "results": results}  # fmt: skip
    print(json.dumps(report, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1), encoding="utf-8")


def bench_ray(args: argparse.Namespace, base: Path, source: str, options: dict[str, Any] | None,
              work: Path) -> list[dict[str, Any]]:  # fmt: skip
    """``index --add --ray`` with each of ``args.workers`` on one local cluster."""
    import ray

    from crossmodal.jobs.ray_encode import RayOptions

    started = time.perf_counter()
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    log.info("Ray cluster started in %.1f s", time.perf_counter() - started)
    out = []
    try:
        for workers in args.workers:
            ray_options = RayOptions(workers=workers, batch_size=args.batch_size, progress=False)
            times = [timed_add(base, source, options, work, ray=ray_options) for _ in range(args.repeats)]
            out.append(summary(f"Ray, {workers} worker{'s' if workers > 1 else ''}", times, args.n))
    finally:
        ray.shutdown()
    return out


if __name__ == "__main__":
    main()
