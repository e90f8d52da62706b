"""scripts/doc_numbers.py: the default run's numbers in the docs are generated, never typed.

The docs must equal what the committed ``docs/default_run.json`` renders (a number edited by
hand fails here); the script's pieces are checked on hand-made cases and on an evaluated tiny run.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent


def load_script():
    spec = importlib.util.spec_from_file_location("doc_numbers", ROOT / "scripts" / "doc_numbers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


doc_numbers = load_script()
COMMITTED = json.loads((ROOT / "docs" / "default_run.json").read_text(encoding="utf-8"))


def test_the_docs_hold_what_the_committed_numbers_render():
    assert doc_numbers.stale_docs(COMMITTED) == []
    for doc in doc_numbers.DOCS:  # every piece is used, and each file has some
        assert "<!-- numbers:begin " in (ROOT / doc).read_text(encoding="utf-8")
    used = "".join((ROOT / doc).read_text(encoding="utf-8") for doc in doc_numbers.DOCS)
    assert all(f"<!-- numbers:begin {name} -->" in used for name in doc_numbers.render(COMMITTED))
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "doc_numbers.py"), "--check"],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_a_number_edited_by_hand_fails_the_check(tmp_path):
    for doc in doc_numbers.DOCS:
        (tmp_path / doc).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ROOT / doc, tmp_path / doc)
    readme = tmp_path / "README.md"
    text = readme.read_text(encoding="utf-8")
    mean = f"{COMMITTED['map']['hash']['t2i']:.3f}"
    block = text[text.index("<!-- numbers:begin readme-headline -->"):]
    assert mean in block
    readme.write_text(text.replace(block, block.replace(mean, "0.999", 1)), encoding="utf-8")
    assert doc_numbers.stale_docs(COMMITTED, root=tmp_path) == ["README.md"]
    assert doc_numbers.write_docs(COMMITTED, root=tmp_path) == ["README.md"]
    assert readme.read_text(encoding="utf-8") == text  # rewritten back


def test_markers_inline_and_on_lines_of_their_own():
    pieces = {"a": "one\ntwo", "b": "3"}
    text = "x <!-- numbers:begin b -->old<!-- numbers:end b --> y\n<!-- numbers:begin a -->\nold\n" \
           "<!-- numbers:end a -->\n"  # fmt: skip
    assert doc_numbers.fill(text, pieces) == (
        "x <!-- numbers:begin b -->3<!-- numbers:end b --> y\n<!-- numbers:begin a -->\none\ntwo\n"
        "<!-- numbers:end a -->\n")  # fmt: skip
    bad_markers = [
        ("<!-- numbers:begin a -->x", "without its numbers:end"),
        ("<!-- numbers:begin a -->x<!-- numbers:end b -->", "ends with numbers:end b"),
        ("<!-- numbers:begin c -->x<!-- numbers:end c -->", "unknown numbers piece 'c'"),
    ]
    for bad, message in bad_markers:
        with pytest.raises(ValueError, match=message):
            doc_numbers.fill(bad, pieces)


def test_chance_is_the_expected_map_over_every_order():
    from crossmodal.evaluate import average_precision

    labels = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 1], [1, 0, 0], [0, 1, 1], [0, 0, 1]])
    query, db = np.array([0, 3, 1]), np.array([2, 4, 5, 6, 1])
    rel = (labels[query] @ labels[db].T) > 0
    exact = np.mean([np.mean([average_precision(r[list(p)]) for p in itertools.permutations(range(5))])
                     for r in rel])  # fmt: skip
    got = doc_numbers.chance(labels, query, db)
    assert got["map"] == round(exact, 4) and got["relevant"] == round(rel.mean(), 4)


def test_collect_reads_an_evaluated_run(tiny_run_copy):
    from crossmodal.jobs.eval import eval_run

    with pytest.raises(FileNotFoundError, match="crossmodal eval --run"):
        doc_numbers.collect(tiny_run_copy)
    eval_run(tiny_run_copy, baselines=False)
    numbers = doc_numbers.collect(tiny_run_copy)
    assert set(numbers) == set(COMMITTED) and numbers["map"]["cca_itq"] is None
    assert 0 < numbers["chance"]["map"] < numbers["map"]["hash"]["i2t"] <= 1
    pieces = doc_numbers.render(numbers)
    assert set(pieces) == set(doc_numbers.render(COMMITTED))
    assert "n/a" in pieces["readme-headline"]  # no CCA-ITQ row: the text tower is not frozen
    # the same numbers from a run at another path agree; a changed number is named
    assert doc_numbers.stale_numbers(numbers, {**numbers, "run": "elsewhere/run"}) == []
    assert doc_numbers.stale_numbers(numbers, {**numbers, "chance": {}, "run": "x"}) == ["chance"]
