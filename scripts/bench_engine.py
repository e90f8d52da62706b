"""End-to-end engine latency at 100,000 and 1,000,000 items, and memory while indexing.

A trained run supplies the model (text tower + head); its database is replaced by N
synthetic items whose codes are the run's own codes with a few bits flipped (so their
structure is realistic) and whose metadata fills a store of the same size. Each text
query goes through encode -> FAISS search -> store look-up, as in the app.

    python scripts/bench_engine.py --run runs/openmoji --sizes 100000 1000000 --queries 200
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM; unlike ru_maxrss it is not inherited across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def synthetic_codes(base: np.ndarray, n: int, flip: float, seed: int) -> np.ndarray:
    """``n`` packed codes: rows of ``base`` (packed) with each bit flipped with probability ``flip``."""
    rng = np.random.default_rng(seed)
    rows = base[rng.integers(0, len(base), n)]
    noise = np.packbits(rng.random((n, base.shape[1] * 8)) < flip, axis=1, bitorder="little")
    return rows ^ noise


def build(run: Path, out: Path, n: int, seed: int = 0) -> dict:
    """Index ``n`` synthetic items into ``out`` (indexes + store); returns time and peak memory."""
    from crossmodal.index import BinaryIndex, create_index
    from crossmodal.store import MetadataStore

    base = BinaryIndex.load(run / "image.index")
    base_codes = base.reconstruct(base.ids())
    rss0 = peak_rss_mb()
    started = time.perf_counter()
    for name in ("image", "text"):
        index = create_index("flat", base.bits)
        for s in range(0, n, 100_000):
            m = min(100_000, n - s)
            index.add(synthetic_codes(base_codes, m, 0.05, seed + s), np.arange(s, s + m))
        index.save(out / f"{name}.index")
        del index
    items = ({"item_id": i, "key": f"item{i}", "image_path": "", "labels": [], "source": "synthetic"}
             for i in range(n))  # fmt: skip
    texts = ({"text_id": i, "item_id": i, "caption": f"synthetic caption {i}"} for i in range(n))
    MetadataStore.build(out / "store.sqlite", items, texts).close()
    return {
        "index_s": round(time.perf_counter() - started, 1),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "rss_before_mb": round(rss0, 1),
        "codes_mb": round(2 * n * base.bits / 8 / 2**20, 1),
    }


def latency(run: Path, db: Path, queries: list[str], k: int) -> dict:
    from crossmodal.index import BinaryIndex
    from crossmodal.serving import RetrievalEngine
    from crossmodal.store import MetadataStore

    engine = RetrievalEngine.load(run)
    engine.indexes = {m: BinaryIndex.load(db / f"{m}.index") for m in ("image", "text")}
    engine.store = MetadataStore.open(db / "store.sqlite")
    engine.search_text(queries[0], k)  # warm-up
    total, stages = [], {"encode": [], "search": [], "lookup": []}
    for q in queries:
        t0 = time.perf_counter()
        r = engine.search_text(q, k)
        total.append((time.perf_counter() - t0) * 1e3)
        for key, v in r.timings_ms.items():
            stages[key].append(v)
    out = {
        "median_ms": round(float(np.median(total)), 2),
        "p95_ms": round(float(np.percentile(total, 95)), 2),
    }
    out.update({f"{k}_median_ms": round(float(np.median(v)), 2) for k, v in stages.items()})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/openmoji")
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--out", help="write the numbers as JSON here")
    parser.add_argument("--build-only", metavar="DIR", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    run = Path(args.run)
    if args.build_only:  # child process: its peak memory is the indexing job's alone
        print(json.dumps(build(run, Path(args.build_only), args.n)))
        return
    from crossmodal.store import MetadataStore

    with MetadataStore.open(run / "store.sqlite") as store:
        captions = [
            t["caption"].split(" ; ")[0] for t in store.get_texts(range(store.max_text_id() + 1), "none") if t
        ]
    rng = np.random.default_rng(0)
    queries = [captions[i] for i in rng.integers(0, len(captions), args.queries)]
    results = {}
    for n in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, __file__, "--run", str(run), "--build-only", tmp, "--n", str(n)]
            built = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
            results[n] = {**built, **latency(run, Path(tmp), queries, args.k)}
        print(f"{n:>9,} items: {json.dumps(results[n])}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
