"""crossmodal: cross-modal text-image retrieval on learned binary hash codes."""

from __future__ import annotations

__version__ = "0.1.0"

# Bumped whenever the on-disk layout of a run folder changes incompatibly.
# 2: the model is rebuilt from model.json (activation and bit weights included), without its loss.
RUN_FORMAT_VERSION = 2
