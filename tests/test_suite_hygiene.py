"""The test suite itself: numpy-only test files must not pay for importing torch or datasets."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# test files whose code needs neither torch nor datasets, nor does the part of crossmodal they test
NUMPY_ONLY = ["test_store.py", "test_text.py", "test_baselines.py", "test_index.py", "test_evaluate.py",
              "test_report.py"]  # fmt: skip
RUN = ["test_store.py", "test_text.py", "test_baselines.py"]  # the quick ones run; the others are imported

CHILD = """
import sys, pytest
rc = pytest.main(["-q", "-p", "no:cacheprovider", *sys.argv[1:]])
print("HEAVY", ",".join(sorted(m for m in ("torch", "datasets") if m in sys.modules)) or "-")
sys.exit(int(rc))
"""


def test_numpy_only_test_files_run_without_torch_or_datasets():
    """Through conftest.py or the files' own imports: a heavy import in either makes this fail."""
    args = [f"tests/{name}" for name in NUMPY_ONLY]
    args += [f"--deselect=tests/{name}" for name in NUMPY_ONLY if name not in RUN]
    proc = subprocess.run([sys.executable, "-c", CHILD, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "deselected" in proc.stdout and " passed" in proc.stdout, proc.stdout[-3000:]
    heavy = [line for line in proc.stdout.splitlines() if line.startswith("HEAVY ")]
    assert heavy == ["HEAVY -"], (heavy, proc.stdout[-3000:])
