"""Batch evaluation: recipes x losses x code lengths into one report (tables, results.json, plots).

Same as ``crossmodal eval-grid``. Example:

    python scripts/batch_eval.py --config configs/openmoji.yaml --losses dcmh,dpsh --bits 16,32,64,128
"""

from __future__ import annotations

import sys

from crossmodal.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval-grid", *sys.argv[1:]]))
