"""Serving benchmark: the torch and the ONNX query encoders side by side, in one run.

On a run exported with ``crossmodal export`` (``runs/openmoji`` by default) it measures:

1. Warm text queries (``RetrievalEngine.search_text``, k = 10; captions of the run, first name)
   with each engine, interleaved query by query: median and p95 end to end and per stage, at
   the run's own size and at ``--n`` items (the run's codes with 5 % of bits flipped, in flat
   indexes and a store of that size, built as ``bench_engine.py`` builds them). Both engines
   must give every query the same code. Then the ONNX engines again in a fresh process that
   never imports torch (the serving set-up: no torch model thrashing the caches in between).
2. Cold start: ``crossmodal search --run RUN --text Q`` as a fresh process, wall clock, median
   of ``--cold-runs`` (ONNX and ``--encoders torch``, alternating).
3. Peak memory: VmHWM of a fresh process that runs the same command (loads the engine and
   answers one query), median of ``--memory-runs``.
4. ``crossmodal serve --run RUN``: seconds until it prints its address, and its VmHWM then.
5. Batched exhaustive search at ``--n`` items: FAISS over the engine's flat index (every core,
   the engine's ``query_batch_size`` against FAISS' default) and one query at a time (one
   thread), against a scalar reference in numpy (XOR and popcount over every code); the
   k-th distances must agree.
6. The export check kept in ``encoders.json`` (fp32 and int8 codes against torch).
7. With ``--int8``: the int8 encoders beside fp32 in 1-3, and their mAP (i2t, t2i against the
   run's database codes) and keyword precision@10 on the run's query split.

    python scripts/bench_serving.py --run runs/openmoji --int8 --out runs/bench/serving.json
"""

from __future__ import annotations

import os

# Idle OpenMP workers sleep instead of spinning (see crossmodal.cli.main); before FAISS loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import faiss  # noqa: E402
import numpy as np  # noqa: E402

BIN = Path(sys.executable).parent
CROSSMODAL = str(BIN / "crossmodal")
ENGINE_NAMES = {"torch": ("torch", "fp32"), "onnx": ("onnx", "fp32"), "onnx-int8": ("onnx", "int8")}
# Runs in a fresh interpreter: the command line, then the process's peak resident memory.
MEMORY_CHILD = """
import sys
from pathlib import Path
from crossmodal.cli import main
rc = main(sys.argv[1:])
hwm = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM:"))
print("VMHWM_KB", rc, hwm.split()[1], file=sys.stderr)
"""


def stats(values: list[float]) -> dict[str, float]:
    return {"median": round(float(np.median(values)), 3), "p95": round(float(np.percentile(values, 95)), 3)}


def load_engines(run: Path, names: list[str]) -> dict[str, Any]:
    from crossmodal.serving import RetrievalEngine

    return {n: RetrievalEngine.load(run, backend=ENGINE_NAMES[n][0], precision=ENGINE_NAMES[n][1])
            for n in names}  # fmt: skip


def use_database(engines: dict[str, Any], db: Path) -> None:
    """Serve the synthetic database in ``db`` (indexes and store) with every engine."""
    from crossmodal.index import BinaryIndex
    from crossmodal.serving.engine import set_query_batch_size
    from crossmodal.store import MetadataStore

    indexes = {m: BinaryIndex.load(db / f"{m}.index") for m in ("image", "text")}
    for index in indexes.values():
        set_query_batch_size(index, 1000)
    for engine in engines.values():
        engine.indexes, engine.store = indexes, MetadataStore.open(db / "store.sqlite")


def warm_queries(engines: dict[str, Any], queries: list[str], k: int) -> dict[str, Any]:
    """Per engine: end-to-end and per-stage median / p95 in ms, interleaved query by query."""
    for engine in engines.values():
        for q in queries[:5]:  # warm-up
            engine.search_text(q, k)
    total: dict[str, list[float]] = {n: [] for n in engines}
    stages: dict[str, dict[str, list[float]]] = {n: {s: [] for s in ("encode", "search", "lookup")}
                                                 for n in engines}  # fmt: skip
    codes: dict[str, list[str]] = {n: [] for n in engines}
    for q in queries:
        for name, engine in engines.items():
            t0 = time.perf_counter()
            result = engine.search_text(q, k)
            total[name].append((time.perf_counter() - t0) * 1e3)
            for stage, ms in result.timings_ms.items():
                stages[name][stage].append(ms)
            codes[name].append(result.code_hex)
    out: dict[str, Any] = {}
    for name in engines:
        out[name] = {"total_ms": stats(total[name]),
                     **{f"{s}_ms": stats(v) for s, v in stages[name].items()}}  # fmt: skip
        if "torch" in codes and name != "torch":
            out[name]["codes_equal_to_torch"] = sum(a == b for a, b in zip(codes[name], codes["torch"]))
    out["queries"] = len(queries)
    return out


def onnx_alone(run: Path, db: Path, names: list[str], n_queries: int, k: int) -> dict[str, Any]:
    """``warm_queries`` of the ONNX engines at the run's size and on ``db``, in a fresh process."""
    cmd = [sys.executable, __file__, "--run", str(run), "--alone", str(db), "--queries", str(n_queries),
           "-k", str(k), *(["--int8"] if "onnx-int8" in names else [])]  # fmt: skip
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)


def alone_child(args: argparse.Namespace) -> None:
    """The child of ``onnx_alone``: prints its measurements as JSON."""
    run, queries = Path(args.run), run_queries(Path(args.run), args.queries)
    engines = load_engines(run, ["onnx", *(["onnx-int8"] if args.int8 else [])])
    out = {"run": warm_queries(engines, queries, args.k)}
    use_database(engines, Path(args.alone))
    out["synthetic"] = warm_queries(engines, queries, args.k)
    heavy = sorted(m for m in ("torch", "transformers", "datasets") if m in sys.modules)
    assert not heavy, f"the ONNX engines imported {heavy}"
    print(json.dumps(out))


def build_database(run: Path, n: int, folder: Path) -> dict[str, Any]:
    """``n`` synthetic items in ``folder``, built by ``bench_engine.py`` in its own process."""
    cmd = [sys.executable, str(Path(__file__).with_name("bench_engine.py")), "--run", str(run),
           "--build-only", str(folder), "--n", str(n)]  # fmt: skip
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)


def search_argv(run: Path, query: str, backend: str) -> list[str]:
    name, precision = ENGINE_NAMES[backend]
    if precision != "fp32":
        raise ValueError("the command line serves fp32 encoders only")
    return ["search", "--run", str(run), "--text", query, "-k", "10", "--encoders", name]


def cold_start(run: Path, queries: list[str], backends: list[str], repeats: int) -> dict[str, Any]:
    """Wall seconds of ``crossmodal search`` as a fresh process, alternating the back ends."""
    seconds: dict[str, list[float]] = {b: [] for b in backends}
    for i in range(repeats):
        for backend in backends:
            t0 = time.perf_counter()
            subprocess.run([CROSSMODAL, *search_argv(run, queries[i % len(queries)], backend)], check=True,
                           capture_output=True)  # fmt: skip
            seconds[backend].append(time.perf_counter() - t0)
    return {b: {"median_s": round(float(np.median(v)), 3), "min_s": round(min(v), 3),
                "max_s": round(max(v), 3), "runs": len(v)} for b, v in seconds.items()}  # fmt: skip


def peak_memory(run: Path, query: str, backends: list[str], repeats: int) -> dict[str, Any]:
    """VmHWM (MiB) of a fresh process running ``crossmodal search``, median of ``repeats``."""
    peaks: dict[str, list[float]] = {b: [] for b in backends}
    for _ in range(repeats):
        for backend in backends:
            done = subprocess.run([sys.executable, "-c", MEMORY_CHILD, *search_argv(run, query, backend)],
                                  check=True, capture_output=True, text=True)  # fmt: skip
            line = next(ln for ln in done.stderr.splitlines() if ln.startswith("VMHWM_KB"))
            rc, kb = line.split()[1:]
            assert rc == "0", done.stderr
            peaks[backend].append(int(kb) / 1024)
    return {b: {"median_mib": round(float(np.median(v)), 1), "max_mib": round(max(v), 1)}
            for b, v in peaks.items()}  # fmt: skip


def vm_hwm_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(ln for ln in status.splitlines() if ln.startswith("VmHWM:")).split()[1]) / 1024


def serve_start(run: Path, repeats: int, port: int = 7911) -> dict[str, Any]:
    """Seconds until ``crossmodal serve --run RUN`` prints its address, and its VmHWM then."""
    seconds, peaks = [], []
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    for _ in range(repeats):
        cmd = [CROSSMODAL, "serve", "--run", str(run), "--host", "127.0.0.1", "--port", str(port)]
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        try:
            for line in proc.stdout:
                if line.startswith("crossmodal app for "):
                    seconds.append(time.perf_counter() - t0)
                    peaks.append(vm_hwm_mib(proc.pid))
                    break
            else:
                raise RuntimeError(f"crossmodal serve exited with {proc.wait()} before serving")
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return {"median_s": round(float(np.median(seconds)), 2), "median_mib": round(float(np.median(peaks)), 1),
            "runs": repeats}  # fmt: skip


def popcount_reference(db: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Sorted Hamming distances ``[nq, k]`` of the ``k`` nearest codes, one query at a time."""
    words = np.ascontiguousarray(db).view(np.uint64)  # [n, bits/64]
    out = []
    for q in np.ascontiguousarray(queries).view(np.uint64):
        dist = np.bitwise_count(words ^ q).sum(axis=1, dtype=np.int32)  # [n]
        out.append(np.sort(np.partition(dist, k - 1)[:k]))
    return np.array(out)


def batched_search(db: Path, queries: np.ndarray, k: int, reference_queries: int) -> dict[str, Any]:
    """FAISS over the flat index in batches and one by one, against the numpy reference."""
    from crossmodal.index import BinaryIndex
    from crossmodal.serving.engine import set_query_batch_size

    index = BinaryIndex.load(db / "image.index")
    out: dict[str, Any] = {"items": index.ntotal, "queries": len(queries)}
    threads = os.cpu_count() or 1
    for name, batch in (("faiss batch, query_batch_size 1000", 1000), ("faiss batch, default 32", 32)):
        set_query_batch_size(index, batch)
        faiss.omp_set_num_threads(threads)
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            dist, _ = index.search(queries, k)
            times.append((time.perf_counter() - t0) * 1e3 / len(queries))
        out[name] = {"ms_per_query": round(float(np.median(times)), 4), "threads": threads}
    faiss.omp_set_num_threads(1)
    single = []
    for q in queries[:reference_queries]:
        t0 = time.perf_counter()
        index.search(q[None], k)
        single.append((time.perf_counter() - t0) * 1e3)
    out["faiss one query at a time, 1 thread"] = {"ms_per_query": round(float(np.median(single)), 4)}
    codes = index.reconstruct(index.ids())
    t0 = time.perf_counter()
    ref = popcount_reference(codes, queries[:reference_queries], k)
    out["numpy popcount reference"] = {"ms_per_query": round((time.perf_counter() - t0) * 1e3 / len(ref), 3)}
    out["k-th distances equal to the reference"] = f"{int((dist[: len(ref)] == ref).all(1).sum())}/{len(ref)}"
    return out


def export_check(run: Path) -> dict[str, Any]:
    """The agreement ``crossmodal export`` measured and kept in ``encoders.json``."""
    check = json.loads((run / "encoders.json").read_text(encoding="utf-8"))["check"]
    keep = ("codes", "identical_codes", "differing_bits", "near_zero", "differing_beyond")
    return {p: {m: {key: r.get(key) for key in keep} for m, r in check[p].items()}
            for p in ("fp32", "int8") if p in check}  # fmt: skip


def int8_quality(run: Path, engines: dict[str, Any], k: int = 10) -> dict[str, Any]:
    """mAP (i2t, t2i) and keyword P@k of each ONNX engine's query codes on the run's query split,
    against the database codes the run serves (its indexes, encoded by torch at index time)."""
    from crossmodal.evaluate import concept_words, evaluate_directions, word_relevance
    from crossmodal.features import join_captions
    from crossmodal.runs.encode import open_run_data

    data = open_run_data(run)
    ds, q_idx = data.dataset, data.splits["query"]
    first = next(iter(engines.values()))
    db, positions = {}, {}
    for m in ("image", "text"):  # the served codes, and the dataset position of each one's item
        ids = first.indexes[m].ids()
        items = first.store.get_items(ids.tolist()) if m == "image" else \
            first.store.get_items([t["item_id"] for t in first.store.get_texts(ids.tolist())])  # fmt: skip
        positions[m] = np.array([i["item_id"] for i in items])
        assert [i["key"] for i in items] == ds.ids_of(positions[m]), "item ids are not dataset positions"
        db[m] = first.indexes[m].reconstruct(ids)  # packed [n_db, bits/8]
    assert set(positions["image"]) == set(data.splits["database"].tolist())
    labels = ds.labels_matrix()
    target = {"query_labels": labels[q_idx],
              "db_labels": {m: labels[positions[m]] for m in ("image", "text")}}  # fmt: skip
    images = [ds.load_image(int(i)) for i in q_idx]
    texts = [join_captions(c) for c in ds.captions_of(q_idx)]
    words = concept_words(ds.info.label_names or [])
    relevance = word_relevance(ds.captions_of(), words)[:, positions["image"]]  # [n_words, n_db]
    out = {}
    for name, engine in engines.items():
        if engine.backend != "onnx":
            continue
        arrays = {"query_image": engine.encode_images(images), "query_text": engine.encode_texts(texts),
                  "db_image": db["image"], "db_text": db["text"]}  # fmt: skip
        maps = evaluate_directions(arrays, **target, tie_aware=True, directions=("i2t", "t2i"))
        out[name] = {"map": {d: round(float(m["map"]), 4) for d, m in maps.items()},
                     **keyword_score(engine, words, relevance, db["image"], k)}  # fmt: skip
    return out


def keyword_score(engine: Any, words: list[str], relevance: np.ndarray, db_image: np.ndarray,
                  k: int) -> dict[str, Any]:  # fmt: skip
    """Keyword precision@k of the concept words the engine accepts as queries (as ``crossmodal eval``)."""
    from crossmodal.evaluate import keyword_precision
    from crossmodal.text import QueryError

    usable = []
    for i, word in enumerate(words):
        try:
            engine.encoders.check_query(word)
            usable.append(i)
        except QueryError:
            pass
    codes = engine.encode_texts([words[i] for i in usable])
    kw = keyword_precision(codes, db_image, relevance[usable], k)
    return {f"keyword_p@{k}": round(float(kw[f"p@{k}"]), 4), "words": kw["n_words"]}


# -- the report ------------------------------------------------------------------------------------
def run_queries(run: Path, n: int) -> list[str]:
    """``n`` captions of the run (first name of each), drawn with a fixed seed."""
    from crossmodal.store import MetadataStore

    with MetadataStore.open(run / "store.sqlite") as store:
        texts = store.get_texts(range(store.max_text_id() + 1), "none")
    captions = [t["caption"].split(" ; ")[0] for t in texts if t]
    rng = np.random.default_rng(0)
    return [captions[i] for i in rng.integers(0, len(captions), n)]


def machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version(), "faiss": faiss.__version__, "numpy": np.__version__,
            "platform": platform.platform()}  # fmt: skip


def measure(args: argparse.Namespace) -> dict[str, Any]:
    run = Path(args.run)
    if not (run / "encoders.json").exists():
        raise SystemExit(f"{run} has no exported encoders; run: crossmodal export --run {run} --int8")
    queries = run_queries(run, args.queries)
    names = ["torch", "onnx", *(["onnx-int8"] if args.int8 else [])]
    out: dict[str, Any] = {"run": str(run), "machine": machine(), "export_check": export_check(run)}
    engines = load_engines(run, names)
    if args.int8:
        out["quality"] = int8_quality(run, {n: e for n, e in engines.items() if n != "torch"})
        log(out, "quality")
    out["warm"] = {"run": warm_queries(engines, queries, args.k)}
    out["warm"]["run"]["items"] = engines["onnx"].indexes["image"].ntotal
    log(out["warm"], "run")
    with tempfile.TemporaryDirectory() as tmp:
        out["database"] = build_database(run, args.n, Path(tmp))
        use_database(engines, Path(tmp))
        out["warm"]["synthetic"] = {**warm_queries(engines, queries, args.k), "items": args.n}
        log(out["warm"], "synthetic")
        out["warm_onnx_alone"] = onnx_alone(run, Path(tmp), names, args.queries, args.k)
        log(out, "warm_onnx_alone")
        for engine in engines.values():
            engine.store.close()
        del engines
        codes = np.concatenate([pack_queries(run, queries)] * max(1, args.batch_queries // len(queries)))
        codes = codes[: args.batch_queries]
        out["batched"] = batched_search(Path(tmp), codes, args.k, args.reference_queries)
        log(out, "batched")
    out["cold_start"] = cold_start(run, queries, ["onnx", "torch"], args.cold_runs)
    log(out, "cold_start")
    out["peak_memory"] = peak_memory(run, queries[0], ["onnx", "torch"], args.memory_runs)
    log(out, "peak_memory")
    if args.serve_runs:
        out["serve"] = serve_start(run, args.serve_runs)
        log(out, "serve")
    out["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return out


def pack_queries(run: Path, queries: list[str]) -> np.ndarray:
    """Packed codes of ``queries`` from the run's exported encoders."""
    from crossmodal.serving import RetrievalEngine

    engine = RetrievalEngine.load(run, backend="onnx")
    try:
        return engine.encode_texts(queries)
    finally:
        engine.close()


def log(section: dict[str, Any], key: str) -> None:
    print(f"{key}: {json.dumps(section[key])}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/openmoji", help="an exported run (crossmodal export)")
    parser.add_argument("--n", type=int, default=1_000_000, help="items of the synthetic database")
    parser.add_argument("--queries", type=int, default=200, help="warm text queries per engine and size")
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--cold-runs", type=int, default=7, help="fresh search processes per back end")
    parser.add_argument("--memory-runs", type=int, default=3, help="fresh processes per back end for VmHWM")
    parser.add_argument("--serve-runs", type=int, default=3, help="crossmodal serve starts (0: skip)")
    parser.add_argument("--batch-queries", type=int, default=1000, help="queries of the batched search")
    parser.add_argument("--reference-queries", type=int, default=50,
                        help="queries checked against the numpy popcount reference")  # fmt: skip
    parser.add_argument("--int8", action="store_true",
                        help="int8 encoders too: latency, mAP, keyword precision beside fp32")  # fmt: skip
    parser.add_argument("--out", help="write the numbers as JSON here")
    parser.add_argument("--alone", metavar="DB", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.alone:  # child process: the ONNX engines without torch in the process
        alone_child(args)
        return
    results = measure(args)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
