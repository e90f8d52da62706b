"""Serving a run folder: ``RetrievalEngine`` (query encoders, indexes and store behind four search
directions). Runs with exported ONNX encoders are served without torch (``serving.encoders``)."""

from __future__ import annotations

from crossmodal.serving.engine import Hit, QueryError, RetrievalEngine, SearchResult

__all__ = ["Hit", "QueryError", "RetrievalEngine", "SearchResult"]
