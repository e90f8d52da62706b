"""The default run's numbers in README.md and docs/results.md, generated so they cannot drift.

The docs mark each generated piece with HTML comments, a paragraph or a table cell:

    <!-- numbers:begin readme-headline -->
    ...rendered text...
    <!-- numbers:end readme-headline -->

This script reads a run's evaluation (``crossmodal eval`` writes ``<run>/eval/metrics.json``)
and its splits, keeps the numbers it used in ``docs/default_run.json`` (committed), and
rewrites every marked piece from that file. A test checks that the docs equal what the
committed JSON renders, so a number edited by hand fails it.

    python scripts/doc_numbers.py                      # runs/openmoji -> JSON -> docs
    python scripts/doc_numbers.py --from-json          # docs from the committed JSON only
    python scripts/doc_numbers.py --check              # exit 1 if the docs differ from the JSON
    python scripts/doc_numbers.py --check --run runs/openmoji   # ... or the JSON from the run

Refresh after the recipe changes: ``crossmodal prepare --config configs/openmoji.yaml`` (or
``crossmodal eval --run runs/openmoji``), then this script without options.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
NUMBERS_JSON = ROOT / "docs" / "default_run.json"
DOCS = ("README.md", "docs/results.md")
DIRECTIONS = ("i2t", "t2i", "i2i", "t2t")
MARKER = re.compile(r"<!-- numbers:begin ([\w-]+) -->(.*?)<!-- numbers:end ([\w-]+) -->", re.DOTALL)
WIDTH = 90  # the docs' prose line length


# -- numbers from a run -----------------------------------------------------------------------
def chance(labels: np.ndarray, query: np.ndarray, database: np.ndarray, chunk: int = 512) -> dict[str, float]:
    """The mAP of a random ranking (its expectation over all orders) and the mean fraction of
    the database relevant to a query, for "shares a label" relevance.

    With R of N items relevant, a random order's expected AP is (H_N + (R - 1) / (N - 1) *
    (N - H_N)) / N (H_N the N-th harmonic number); a query with nothing relevant scores 0.
    """
    db = labels[database].astype(np.float32)  # [n_db, n_labels]
    n = len(database)
    harmonic = float(np.sum(1.0 / np.arange(1, n + 1)))
    relevant = np.concatenate([((labels[query[s:s + chunk]].astype(np.float32) @ db.T) > 0).sum(1)
                               for s in range(0, len(query), chunk)])  # fmt: skip  # [n_query]
    ap = np.where(relevant > 0, (harmonic + (relevant - 1) / max(n - 1, 1) * (n - harmonic)) / n, 0.0)
    return {"map": round(float(ap.mean()), 4), "relevant": round(float(relevant.mean() / n), 4)}


def _maps(row: dict[str, Any] | None, metric: str = "map") -> dict[str, float] | None:
    return None if row is None else {d: round(float(row[d][metric]), 4) for d in DIRECTIONS}


def collect(run_dir: str | Path) -> dict[str, Any]:
    """The numbers the docs quote, from an evaluated run (``crossmodal eval``).

    Raises:
        FileNotFoundError: the run has no ``eval/metrics.json``.
    """
    from crossmodal.runs.encode import open_run_data
    from crossmodal.runs.folder import read_manifest

    run_dir = Path(run_dir)
    path = run_dir / "eval" / "metrics.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: run crossmodal eval --run {run_dir} first")
    metrics, manifest = json.loads(path.read_text(encoding="utf-8")), read_manifest(run_dir)
    data = open_run_data(run_dir)
    hash_row, keyword, codes = metrics["hash"], metrics["keyword"], metrics["codes"]
    own = codes["own_image_rank"]
    return {
        "run": run_dir.as_posix(), "dataset": manifest["dataset"]["name"], "bits": int(manifest["bits"]),
        "n_query": int(hash_row["i2t"]["n_query"]), "n_db": int(hash_row["i2t"]["n_db"]),
        "chance": chance(data.dataset.labels_matrix(), data.splits["query"], data.splits["database"]),
        "map": {"hash": _maps(hash_row), "float": _maps(metrics.get("float (cosine)")),
                "cca_itq": _maps(metrics.get("CCA-ITQ")), "lsh": _maps(metrics.get("LSH (CCA)"))},
        "ndcg@100": _maps(hash_row, "ndcg@100"),
        "keyword_p@10": {
            side: {"p@10": round(keyword[side]["p@10"], 4), "best": round(keyword[side]["ceiling"], 4),
                   "words": int(keyword[side]["n_words"])} for side in ("database", "query")},
        "codes": {"distinct_image": int(codes["image"]["n_distinct"]),
                  "largest_image_group": int(codes["image"]["largest_group"]),
                  "own_first": round(own["top1_tie"], 4), "own_top10": round(own["top10_tie"], 4)},
    }  # fmt: skip


# -- rendering --------------------------------------------------------------------------------
def _f(x: float | None, digits: int = 3, zero: bool = True) -> str:
    """``0.451`` (``zero``) or ``.451``; ``n/a`` for a row the run does not have."""
    if x is None:
        return "n/a"
    text = f"{x:.{digits}f}"
    return text if zero else text.replace("0.", ".", 1)


def _pct(x: float, digits: int = 0) -> str:
    """``56 %``, with a no-break space that ``_wrap`` turns into a space once lines are cut."""
    return f"{100 * x:.{digits}f}\u00a0%"


def _wrap(text: str) -> str:
    return textwrap.fill(text, WIDTH).replace("\u00a0", " ")


def _dirs(values: dict[str, float] | None, zero: bool = False, dirs: tuple[str, ...] = DIRECTIONS) -> str:
    return " / ".join(_f(None if values is None else values[d], zero=zero) for d in dirs)


def render(n: dict[str, Any]) -> dict[str, str]:
    """Each marked piece's text, by name, from the numbers of ``collect``."""
    m, kw, codes = n["map"], n["keyword_p@10"], n["codes"]
    hash_map = m["hash"]
    headline = (
        f"On the OpenMoji default ({n['n_query']:,} queries against {n['n_db']:,} database items, "
        f"{n['bits']} bits; a random ranking scores {_f(n['chance']['map'])}), `crossmodal eval --run "
        f"{n['run']}` gives mAP i2t {_f(hash_map['i2t'])}, t2i {_f(hash_map['t2i'])}, i2i "
        f"{_f(hash_map['i2i'])}, t2t {_f(hash_map['t2t'])}, against {_dirs(m['float'], zero=True)} for the "
        f"same model's float outputs and {_dirs(m['cca_itq'], True, ('i2t', 't2i'))} (i2t / t2i) for "
        f"CCA-ITQ. What a user sees is measured too: keyword precision@10 over the "
        f"{kw['database']['words']} concept words that name database images is "
        f"{_f(kw['database']['p@10'])} (the best possible is {_f(kw['database']['best'])}, as many words "
        f"name fewer than 10 images), and a database image given as the query finds its own item first "
        f"for {_pct(codes['own_first'])} of the database and within the top 10 for "
        f"{_pct(codes['own_top10'])}."
    )
    return {
        "readme-headline": _wrap(headline),
        "results-chance": _wrap(f"Chance: a random ranking scores {_f(n['chance']['map'])} "
                                f"({_pct(n['chance']['relevant'], 1)} of the database is relevant to a "
                                f"query, on average)."),
        "results-after-keyword": f"{_f(kw['database']['p@10'])} / {_f(kw['query']['p@10'])}",
        "results-after-ndcg": _dirs(n["ndcg@100"]),
        "results-after-map": _dirs(hash_map),
        "results-after-codes": f"{codes['distinct_image']:,} / {codes['largest_image_group']:,}",
        "results-after-own": f"{_pct(codes['own_first'], 1)} / {_pct(codes['own_top10'], 1)}".replace(
            "\u00a0", " "),
    }  # fmt: skip


def fill(text: str, pieces: dict[str, str], where: str = "the text") -> str:
    """``text`` with every marked piece replaced by ``pieces[name]``; a piece whose content starts
    on its own line keeps its markers on lines of their own.

    Raises:
        ValueError: a begin without its end, an end naming another piece, or an unknown name.
    """
    if text.count("<!-- numbers:begin ") != text.count("<!-- numbers:end "):
        raise ValueError(f"{where}: a numbers:begin marker without its numbers:end (or the reverse)")

    def one(match: re.Match[str]) -> str:
        name, body, end = match.groups()
        if end != name:
            raise ValueError(f"{where}: numbers:begin {name} ends with numbers:end {end}")
        if name not in pieces:
            raise ValueError(f"{where}: unknown numbers piece {name!r}; known: {', '.join(sorted(pieces))}")
        new = f"\n{pieces[name]}\n" if body.startswith("\n") else pieces[name]
        return f"<!-- numbers:begin {name} -->{new}<!-- numbers:end {name} -->"

    return MARKER.sub(one, text)


def stale_docs(numbers: dict[str, Any], root: Path = ROOT) -> list[str]:
    """The docs whose marked pieces differ from what ``numbers`` renders."""
    pieces = render(numbers)
    return [doc for doc in DOCS
            if fill(text := (root / doc).read_text(encoding="utf-8"), pieces, doc) != text]  # fmt: skip


def write_docs(numbers: dict[str, Any], root: Path = ROOT) -> list[str]:
    """Rewrite the marked pieces of the docs; return those that changed."""
    pieces, changed = render(numbers), []
    for doc in DOCS:
        path = root / doc
        text = path.read_text(encoding="utf-8")
        new = fill(text, pieces, doc)
        if new != text:
            path.write_text(new, encoding="utf-8")
            changed.append(doc)
    return changed


def stale_numbers(committed: dict[str, Any], fresh: dict[str, Any]) -> list[str]:
    """The keys whose numbers differ between ``committed`` and ``fresh`` (a run's); where the run
    lies (``run``) is no number: a copy of the run, retrained elsewhere, agrees."""
    keys = (committed.keys() | fresh.keys()) - {"run"}
    return sorted(k for k in keys if committed.get(k) != fresh.get(k))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", help="the evaluated run (default: runs/openmoji)")
    parser.add_argument("--from-json", action="store_true", help=f"render from {NUMBERS_JSON.name} only")
    parser.add_argument("--check", action="store_true",
                        help="change nothing; exit 1 when the docs (or, with --run, the JSON) are stale")
    args = parser.parse_args(argv)
    committed = json.loads(NUMBERS_JSON.read_text(encoding="utf-8")) if NUMBERS_JSON.exists() else None
    if args.check:
        problems = [] if committed else [f"{NUMBERS_JSON} does not exist"]
        if committed:
            problems += [f"{doc} differs from {NUMBERS_JSON.name}" for doc in stale_docs(committed)]
        differ = stale_numbers(committed, collect(args.run)) if args.run and committed else []
        if differ:
            problems.append(f"{NUMBERS_JSON.name} differs from {args.run} in {', '.join(differ)}: "
                            "run this script without --check")  # fmt: skip
        print("\n".join(problems) or "the docs' numbers are those of docs/default_run.json")
        return 1 if problems else 0
    numbers = committed if args.from_json else collect(args.run or "runs/openmoji")
    if numbers is None:
        raise SystemExit(f"{NUMBERS_JSON} does not exist; run without --from-json")
    NUMBERS_JSON.write_text(json.dumps(numbers, indent=2) + "\n", encoding="utf-8")
    changed = write_docs(numbers)
    print(f"{NUMBERS_JSON.relative_to(ROOT)}; rewritten: {', '.join(changed) or 'nothing (already so)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
