"""crossmodal: cross-modal text-image retrieval on learned binary hash codes."""

from __future__ import annotations

__version__ = "0.1.0"

# Bumped whenever the on-disk layout of a run folder changes incompatibly.
RUN_FORMAT_VERSION = 1
