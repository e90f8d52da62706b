"""The fair comparison: every registered method on identical towers, data, splits, seeds and budget.

Same as ``crossmodal compare``. Reproduces docs/results.md:

    python scripts/compare_methods.py --config configs/openmoji.yaml --bits 16,32,64 --out runs/compare
"""

from __future__ import annotations

import sys

from crossmodal.cli import main

if __name__ == "__main__":
    sys.exit(main(["compare", *sys.argv[1:]]))
