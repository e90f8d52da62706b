"""Serving a run folder: ``RetrievalEngine`` (model, indexes and store behind four search directions)."""

from __future__ import annotations

from crossmodal.serving.engine import Hit, QueryError, RetrievalEngine, SearchResult

__all__ = ["Hit", "QueryError", "RetrievalEngine", "SearchResult"]
