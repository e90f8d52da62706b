"""Search benchmark: binary codes in FAISS against float vectors, and IVF recall/speed.

Measures, on this machine:

1. Exhaustive search over ``--n`` items: ``IndexBinaryFlat`` (64 and 128 bits, uniform random
   codes) against float32 ``IndexFlatIP`` at ``--dim`` dimensions; single queries in a loop
   (median and p95 per query) and all queries in one batch (amortised per query); memory
   per item (payload bytes and measured resident memory).
2. ``BinaryIndex("ivf")`` on CLUSTERED codes (random centres, each bit flipped with
   ``--flip``): tie-aware recall@k against exact Hamming search (a result counts as a hit
   when its distance is <= the true k-th distance) and speed-up over flat at several nprobe.

Usage:
    python scripts/bench_search.py                     # full scale: 1M items, 1000 queries
    python scripts/bench_search.py --n 100000 --queries 200 --json bench.json   # quick
"""

from __future__ import annotations

import os

# OpenMP threads that spin while waiting fight other processes on a small shared machine
# (2 cores here): batched searches ran 10-50x slower. Must be set before FAISS loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import faiss  # noqa: E402
import numpy as np  # noqa: E402

from crossmodal.codes import hamming_distances  # noqa: E402
from crossmodal.index import create_index, default_nlist  # noqa: E402

logger = logging.getLogger("bench_search")


def rss_mb() -> float:
    """Resident memory of this process in MB (Linux)."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


_MEMORY_CHILD = """
import os, sys
import numpy as np, faiss
from crossmodal.index import create_index
kind, bits, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def rss():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
codes = np.random.default_rng(0).integers(0, 256, size=(n, bits // 8), dtype=np.uint8)
before = rss()
if kind == "raw":
    index = faiss.IndexBinaryFlat(bits)
    index.add(codes)
else:
    index = create_index(kind, bits)
    index.add(codes, np.arange(n))
print((rss() - before) / n)
"""


def measured_bytes_per_item(kind: str, bits: int, n: int) -> float:
    """Resident memory an index adds per item, measured in a fresh process (no allocator reuse)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), *sys.path])}
    out = subprocess.run(
        [sys.executable, "-c", _MEMORY_CHILD, kind, str(bits), str(n)],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    return float(out.stdout.strip().splitlines()[-1])


def uniform_codes(n: int, bits: int, rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, size=(n, bits // 8), dtype=np.uint8)


def clustered_codes(
    n: int, bits: int, centres: np.ndarray, flip: float, rng: np.random.Generator, chunk: int = 100_000
) -> np.ndarray:
    """Packed codes: a random centre each, every bit flipped with probability ``flip``."""
    out = np.empty((n, bits // 8), dtype=np.uint8)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        noise = np.packbits(rng.random((m, bits), dtype=np.float32) < flip, axis=1, bitorder="little")
        out[start : start + m] = centres[rng.integers(0, centres.shape[0], m)] ^ noise
    return out


SINGLE_THREADS = 1  # set from --single-threads


def time_single(search: Callable[[np.ndarray], Any], queries: np.ndarray) -> dict[str, float]:
    """Search one query at a time on ``SINGLE_THREADS`` threads; per-query median and p95 in ms.

    One thread is the serving set-up (one request per worker) and avoids OpenMP threads
    spinning against each other on a busy 2-core machine, which made single-query times jump
    a thousandfold.
    """
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(SINGLE_THREADS)
    try:
        search(queries[:1])  # warm-up
        times = []
        for i in range(queries.shape[0]):
            t0 = time.perf_counter()
            search(queries[i : i + 1])
            times.append((time.perf_counter() - t0) * 1e3)
    finally:
        faiss.omp_set_num_threads(before)
    return {
        "single_median_ms": float(np.median(times)),
        "single_p95_ms": float(np.percentile(times, 95)),
        "single_queries": int(queries.shape[0]),
    }


BATCH_REPEATS = 3  # set from --repeats


def time_batched(search: Callable[[np.ndarray], Any], queries: np.ndarray) -> dict[str, float]:
    """Search all queries at once, ``BATCH_REPEATS`` times; median amortised ms per query."""
    totals = []
    for _ in range(BATCH_REPEATS):
        t0 = time.perf_counter()
        search(queries)
        totals.append(time.perf_counter() - t0)
    total = float(np.median(totals))
    return {"batched_total_s": total, "batched_ms_per_query": total * 1e3 / queries.shape[0]}


def bench_float(args: argparse.Namespace, rng: np.random.Generator) -> dict[str, Any]:
    logger.info("float32 IndexFlatIP: %d x %d", args.n, args.dim)
    before = rss_mb()
    index = faiss.IndexFlatIP(args.dim)
    for start in range(0, args.n, 100_000):  # generate in chunks: no second 2 GB copy
        m = min(100_000, args.n - start)
        index.add(rng.standard_normal((m, args.dim), dtype=np.float32))
    grown = rss_mb() - before
    queries = rng.standard_normal((args.queries, args.dim), dtype=np.float32)
    row = {"index": f"float32 IndexFlatIP {args.dim}-d", "bytes_per_item": 4 * args.dim}
    row["rss_bytes_per_item"] = grown * 1e6 / args.n
    row.update(time_single(lambda q: index.search(q, args.k), queries[: args.float_single_queries]))
    row.update(time_batched(lambda q: index.search(q, args.k), queries))
    return row


def bench_binary_flat(args: argparse.Namespace, bits: int, rng: np.random.Generator) -> list[dict[str, Any]]:
    logger.info("IndexBinaryFlat: %d x %d bits", args.n, bits)
    db = uniform_codes(args.n, bits, rng)
    queries = uniform_codes(args.queries, bits, rng)
    index = faiss.IndexBinaryFlat(bits)
    index.add(db)
    d, _ = index.search(queries[:5], args.k)
    np.testing.assert_array_equal(
        d, np.sort(hamming_distances(queries[:5], db, chunk=1), axis=1)[:, : args.k]
    )
    row = {"index": f"IndexBinaryFlat {bits}-bit", "bits": bits, "bytes_per_item": bits // 8}
    row["rss_bytes_per_item"] = measured_bytes_per_item("raw", bits, args.n)
    row.update(time_single(lambda q: index.search(q, args.k), queries))
    row.update(time_batched(lambda q: index.search(q, args.k), queries))
    wrapped = create_index("flat", bits)
    wrapped.add(db, np.arange(args.n))
    lib = {"index": f'BinaryIndex("flat") {bits}-bit', "bits": bits, "bytes_per_item": bits // 8 + 8}
    lib["rss_bytes_per_item"] = measured_bytes_per_item("flat", bits, args.n)  # + ids and id -> row map
    lib.update(time_single(lambda q: wrapped.search(q, args.k), queries))
    lib.update(time_batched(lambda q: wrapped.search(q, args.k), queries))
    return [row, lib]


def tie_aware_recall(dist: np.ndarray, ids: np.ndarray, kth_true: np.ndarray) -> float:
    """Fraction of the k returned slots holding an item within the true k-th distance."""
    hits = (ids >= 0) & (dist <= kth_true[:, None])
    return float(hits.sum() / ids.size)


def bench_ivf(args: argparse.Namespace, bits: int, rng: np.random.Generator) -> list[dict[str, Any]]:
    centres = uniform_codes(args.centres, bits, rng)
    db = clustered_codes(args.n, bits, centres, args.flip, rng)
    queries = clustered_codes(args.queries, bits, centres, args.flip, rng)
    flat = faiss.IndexBinaryFlat(bits)
    flat.add(db)
    true_d, _ = flat.search(queries, args.k)
    kth = true_d[:, -1]
    base = {"bits": bits, "data": f"clustered ({args.centres} centres, flip {args.flip})"}
    flat_row = {**base, "index": "IndexBinaryFlat (exact)", "nprobe": "-", "recall_at_k": 1.0}
    flat_row.update(time_single(lambda q: flat.search(q, args.k), queries))
    flat_row.update(time_batched(lambda q: flat.search(q, args.k), queries))
    rows = [flat_row]

    nlist = args.nlist or default_nlist(args.n)
    ivf = create_index("ivf", bits, nlist=nlist)
    train = db[rng.choice(args.n, size=min(args.n, args.train_per_list * nlist), replace=False)]
    t0 = time.perf_counter()
    ivf.train(train)
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ivf.add(db, np.arange(args.n))
    add_s = time.perf_counter() - t0
    logger.info(
        "ivf %d bits: nlist %d, trained on %d in %.1fs, added in %.1fs",
        bits,
        nlist,
        len(train),
        train_s,
        add_s,
    )
    for nprobe in args.nprobe:
        dist, ids = ivf.search(queries, args.k, nprobe=nprobe)
        row = {**base, "index": f'BinaryIndex("ivf") nlist={nlist}', "nprobe": nprobe}
        row.update(recall_at_k=tie_aware_recall(dist, ids, kth), train_s=train_s, add_s=add_s)
        row.update(time_single(lambda q, p=nprobe: ivf.search(q, args.k, nprobe=p), queries))
        row.update(time_batched(lambda q, p=nprobe: ivf.search(q, args.k, nprobe=p), queries))
        row["speedup_single"] = flat_row["single_median_ms"] / row["single_median_ms"]
        row["speedup_batched"] = flat_row["batched_ms_per_query"] / row["batched_ms_per_query"]
        rows.append(row)
    return rows


def _fmt(value: Any, digits: int = 3) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    lines = ["| " + " | ".join(title for _, title in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(key, "")) for key, _ in columns) + " |")
    return "\n".join(lines)


EXHAUSTIVE_COLUMNS = [
    ("index", "index"),
    ("bytes_per_item", "payload B/item"),
    ("rss_bytes_per_item", "measured B/item"),
    ("single_median_ms", "1 query median ms"),
    ("single_p95_ms", "1 query p95 ms"),
    ("single_queries", "queries timed singly"),
    ("batched_ms_per_query", "batched ms/query"),
    ("speedup_single", "speed-up vs float (single)"),
    ("speedup_batched", "speed-up vs float (batched)"),
]
IVF_COLUMNS = [
    ("bits", "bits"),
    ("index", "index"),
    ("nprobe", "nprobe"),
    ("recall_at_k", "recall@k (tie-aware)"),
    ("single_median_ms", "1 query median ms"),
    ("single_p95_ms", "1 query p95 ms"),
    ("batched_ms_per_query", "batched ms/query"),
    ("speedup_single", "speed-up vs flat (single)"),
    ("speedup_batched", "speed-up vs flat (batched)"),
]


def machine_info() -> dict[str, Any]:
    return {
        "cpu_count": os.cpu_count(),
        "faiss_threads": faiss.omp_get_max_threads(),
        "platform": platform.platform(),
        "processor": _cpu_model(),
        "python": sys.version.split()[0],
        "faiss": faiss.__version__,
        "numpy": np.__version__,
        "load_average_at_start": list(os.getloadavg()),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1_000_000, help="database size")
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--bits", type=int, nargs="+", default=[64, 128])
    p.add_argument("--dim", type=int, default=512, help="float baseline dimension")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--float-single-queries", type=int, default=100, help="float queries timed one by one")
    p.add_argument("--skip-float", action="store_true", help="leave out the float baseline")
    p.add_argument("--skip-ivf", action="store_true")
    p.add_argument("--nprobe", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--nlist", type=int, default=None, help="default: ~4 sqrt(n)")
    p.add_argument("--train-per-list", type=int, default=64, help="IVF training codes per list")
    p.add_argument("--centres", type=int, default=1000, help="clusters in the IVF data")
    p.add_argument("--flip", type=float, default=0.08, help="bit-flip probability around a centre")
    p.add_argument("--threads", type=int, default=None, help="FAISS threads for batches (default: all)")
    p.add_argument("--single-threads", type=int, default=1, help="FAISS threads for single queries")
    p.add_argument("--repeats", type=int, default=3, help="batched runs; the median is reported")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run every part of the benchmark; returns the results as a JSON-ready dict."""
    global SINGLE_THREADS, BATCH_REPEATS
    SINGLE_THREADS, BATCH_REPEATS = args.single_threads, args.repeats
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    results: dict[str, Any] = {"machine": machine_info(), "args": {k: str(v) for k, v in vars(args).items()}}
    exhaustive = [] if args.skip_float else [bench_float(args, rng)]
    for bits in args.bits:
        exhaustive += bench_binary_flat(args, bits, rng)
    if not args.skip_float:
        ref = exhaustive[0]
        for row in exhaustive[1:]:
            row["speedup_single"] = ref["single_median_ms"] / row["single_median_ms"]
            row["speedup_batched"] = ref["batched_ms_per_query"] / row["batched_ms_per_query"]
    results["exhaustive"] = exhaustive
    results["ivf"] = (
        [] if args.skip_ivf else [row for bits in args.bits for row in bench_ivf(args, bits, rng)]
    )
    return results


def report(results: dict[str, Any], args: argparse.Namespace) -> str:
    threads = results["machine"]["faiss_threads"]
    head = (
        f"n = {args.n:,}, {args.queries} queries, k = {args.k}; "
        f"single queries on {args.single_threads} thread(s), batches on {threads}"
    )
    parts = [f"### Exhaustive search ({head})", markdown_table(results["exhaustive"], EXHAUSTIVE_COLUMNS)]
    if results["ivf"]:
        parts += [f"### IVF on clustered codes ({head})", markdown_table(results["ivf"], IVF_COLUMNS)]
    return "\n\n".join(parts) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    args = parse_args(argv)
    results = run(args)
    print(report(results, args))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
