"""Load test: concurrent ``gradio_client`` clients sending mixed text and image queries to the app.

Starts ``python app.py --run RUN --port P`` on loopback (unless ``--url`` names a running
app), waits until it answers, then runs ``--clients`` threads, each with its own client,
sending ``--queries`` queries drawn from the four endpoints (text -> images, text -> texts,
image -> captions, image -> images). It reports throughput, latency percentiles (overall and
per endpoint) and errors, stops by itself after ``--max-seconds`` at the latest, and stops
the app it started.

Text queries are the app's own example keywords (``/about``) plus words from the run's
captions; image queries are thumbnails from the run folder (or generated pictures when the
run has none or ``--url`` is used). An "error" is a failed call (exception, timeout) or a
result whose ``error`` field is set; the target is 0.

Usage:
    python scripts/load_test.py --run runs/openmoji
    python scripts/load_test.py --url http://127.0.0.1:7860/ --clients 4 --queries 50
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TEXT_ENDPOINTS = ("/text_to_images", "/text_to_texts")
IMAGE_ENDPOINTS = ("/image_to_captions", "/image_to_images")
FALLBACK_WORDS = ("red", "heart", "face", "flag", "cat", "sun", "blue", "star")


@dataclass
class Outcome:
    """Latencies and failures, collected from every client thread."""

    latencies: dict[str, list[float]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def ok(self, endpoint: str, seconds: float) -> None:
        with self.lock:
            self.latencies.setdefault(endpoint, []).append(seconds)

    def fail(self, endpoint: str, why: str) -> None:
        with self.lock:
            self.errors.append(f"{endpoint}: {why}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(run: str, port: int, timeout: float) -> tuple[subprocess.Popen, str]:
    """Launch the app on loopback and wait until its page answers."""
    import httpx

    url = f"http://127.0.0.1:{port}/"
    log = tempfile.TemporaryFile()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "app.py"), "--run", run, "--port", str(port)],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise SystemExit(f"the app exited with code {proc.returncode}:\n{log.read().decode()[-3000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_app(proc)
    raise SystemExit(f"the app did not answer at {url} within {timeout:.0f} s")


def stop_app(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after 10 s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def text_queries(client: Any, run: str | None, n: int = 40) -> list[str]:
    """The app's example keywords plus single words of the run's captions (known to the model)."""
    words = list(client.predict(api_name="/about").get("examples", []))
    store = Path(run or "", "store.sqlite")
    if run and store.is_file():
        import sqlite3

        con = sqlite3.connect(f"{store.resolve().as_uri()}?mode=ro", uri=True)
        try:
            rows = con.execute("SELECT caption FROM texts ORDER BY text_id LIMIT 2000").fetchall()
        finally:
            con.close()
        caps = [c for (c,) in rows if c and len(c) < 60]
        words += random.Random(0).sample(caps, min(n, len(caps)))
    return words or list(FALLBACK_WORDS)


def image_queries(run: str | None, folder: Path, n: int = 30) -> list[str]:
    """``n`` query images copied into ``folder``: run thumbnails, or generated pictures."""
    import shutil

    from PIL import Image

    thumbs = sorted(Path(run, "images").glob("*.png")) if run else []
    if thumbs:  # copied, so that a re-index of the run during the test cannot remove them
        picked = random.Random(0).sample(thumbs, min(n, len(thumbs)))
        return [str(shutil.copy(p, folder / f"thumb{i}.png")) for i, p in enumerate(picked)]

    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        arr = np.clip(rng.integers(0, 255, 3)[None, None] + rng.normal(0, 20, (96, 96, 3)), 0, 255)
        path = folder / f"query{i}.png"
        Image.fromarray(arr.astype(np.uint8)).save(path)
        paths.append(str(path))
    return paths


def make_plan(n: int, texts: list[str], images: list[str], seed: int) -> list[tuple[str, str]]:
    """``n`` (endpoint, query) pairs: half text, half image, endpoints alternating."""
    rng = random.Random(seed)
    plan = []
    for i in range(n):
        if i % 2 == 0:
            plan.append((TEXT_ENDPOINTS[(i // 2) % 2], rng.choice(texts)))
        else:
            plan.append((IMAGE_ENDPOINTS[(i // 2) % 2], rng.choice(images)))
    return plan


def client_loop(url: str, plan: list[tuple[str, str]], k: int, deadline: float, out: Outcome) -> None:
    """One client: its queries in order, until done or the deadline; every call is timed."""
    from gradio_client import Client, handle_file

    try:
        client = Client(url, verbose=False, download_files=False)
    except Exception as exc:  # a load test counts failures rather than stopping at one
        out.fail("connect", f"{type(exc).__name__}: {exc}"[:300])
        return
    for endpoint, query in plan:
        left = deadline - time.monotonic()
        if left <= 0:
            return
        t0 = time.perf_counter()
        try:
            arg = handle_file(query) if endpoint in IMAGE_ENDPOINTS else query
            result = client.submit(arg, k, api_name=endpoint).result(timeout=left)
        except Exception as exc:
            out.fail(endpoint, f"{type(exc).__name__}: {exc}"[:300])
            continue
        seconds = time.perf_counter() - t0
        error = result[-1].get("error") if isinstance(result[-1], dict) else "no JSON result"
        if error:
            out.fail(endpoint, f"{query!r}: {error}"[:300])
        else:
            out.ok(endpoint, seconds)


def summarise(out: Outcome, wall: float, planned: int) -> dict[str, Any]:
    def stats(values: list[float]) -> dict[str, float]:
        a = np.array(values) * 1e3
        p50, p95, p99 = (float(np.percentile(a, q)) for q in (50, 95, 99))
        return {"n": int(a.size), "p50_ms": p50, "p95_ms": p95, "p99_ms": p99, "mean_ms": float(a.mean())}

    every = [v for vs in out.latencies.values() for v in vs]
    done = len(every) + len(out.errors)
    return {
        "planned": planned, "completed": len(every), "errors": len(out.errors), "not_run": planned - done,
        "wall_s": round(wall, 2), "throughput_qps": round(len(every) / wall, 2) if wall else 0.0,
        "overall": stats(every) if every else {},
        "per_endpoint": {e: stats(v) for e, v in sorted(out.latencies.items())},
        "error_samples": out.errors[:10],
    }  # fmt: skip


def print_report(summary: dict[str, Any], args: argparse.Namespace) -> None:
    print(f"load test: {args.clients} clients x {args.queries} queries against {summary['url']}")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    print(f"completed {summary['completed']} / {summary['planned']} in {summary['wall_s']} s "
          f"-> {summary['throughput_qps']} queries/s; errors {summary['errors']}; "
          f"not run (time limit) {summary['not_run']}")  # fmt: skip
    print(f"{'endpoint':<20} {'n':>6} {'p50 ms':>9} {'p95 ms':>9} {'p99 ms':>9} {'mean ms':>9}")
    rows = [*summary["per_endpoint"].items(), ("all", summary["overall"])]
    for name, s in rows:
        if s:
            print(f"{name:<20} {s['n']:>6} {s['p50_ms']:>9.1f} {s['p95_ms']:>9.1f} {s['p99_ms']:>9.1f} "
                  f"{s['mean_ms']:>9.1f}")  # fmt: skip
    for line in summary["error_samples"]:
        print("error:", line)


def run_load(args: argparse.Namespace, url: str, tmp: Path) -> dict[str, Any]:
    from gradio_client import Client

    run = None if args.url else args.run
    texts = text_queries(Client(url, verbose=False, download_files=False), run)
    images = image_queries(run, tmp)
    out = Outcome()
    deadline = time.monotonic() + args.max_seconds
    threads = [
        threading.Thread(
            target=client_loop,
            args=(url, make_plan(args.queries, texts, images, args.seed + c), args.k, deadline, out),
            daemon=True,
        )
        for c in range(args.clients)
    ]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=max(0.0, deadline - time.monotonic()) + 5)
    summary = summarise(out, time.perf_counter() - t0, args.clients * args.queries)
    return {"url": url, "clients": args.clients, "queries_per_client": args.queries, "k": args.k, **summary}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default="runs/openmoji", help="run folder to serve (default: %(default)s)")
    p.add_argument("--url", help="load an app that is already running instead of starting one")
    p.add_argument("--port", type=int, default=0, help="port for the app started here (default: a free one)")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients (default: %(default)s)")
    p.add_argument("--queries", type=int, default=200, help="queries per client (default: %(default)s)")
    p.add_argument("--k", type=int, default=10, help="results per query (default: %(default)s)")
    p.add_argument("--max-seconds", type=float, default=600, help="wall limit (default: %(default)s)")
    p.add_argument("--startup-timeout", type=float, default=180, help="seconds to wait for the app")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the summary to this JSON file")
    args = p.parse_args(argv)
    if args.clients < 1 or args.queries < 1 or args.max_seconds <= 0:
        p.error("--clients, --queries and --max-seconds must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    proc = None
    try:
        if args.url:
            url = args.url if args.url.endswith("/") else args.url + "/"
        else:
            proc, url = start_app(args.run, args.port or free_port(), args.startup_timeout)
        with tempfile.TemporaryDirectory() as tmp:
            summary = run_load(args, url, Path(tmp))
    finally:
        if proc is not None:
            stop_app(proc)
    print_report(summary, args)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    return 1 if summary["errors"] or summary["not_run"] else 0


if __name__ == "__main__":
    sys.exit(main())
