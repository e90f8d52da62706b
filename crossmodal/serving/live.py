"""An engine that follows its run folder: a long-running server sees ``crossmodal index --add``
and ``--remove`` without a restart.

Every writer of a run replaces ``manifest.json`` last (a rename), so a changed manifest (its
inode, size or modification time) means a finished update. ``LiveEngine.get()`` compares the
manifest's ``stat`` with the one the current engine was loaded from (one system call) and, when
it changed, loads the run again before answering. A run that cannot be loaded then (an update
that stopped half-way) leaves the previous engine serving, with a warning in the log, until the
manifest changes again.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

from crossmodal.index import IndexFileError
from crossmodal.runs.folder import JOURNAL, MANIFEST, RunError
from crossmodal.serving.engine import RetrievalEngine
from crossmodal.store import StoreError

log = logging.getLogger(__name__)

Stamp = tuple[int, int, int] | None


def manifest_stamp(run_dir: str | os.PathLike[str]) -> Stamp:
    """``(inode, size, mtime_ns)`` of the run's manifest; None when it cannot be read."""
    try:
        st = os.stat(Path(run_dir) / MANIFEST)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


class LiveEngine:
    """Hands out the engine of a run, loading the run again when its manifest changed.

    live = LiveEngine(RetrievalEngine.load(run))
    live.get().search_text("cat")  # the run as it is now
    """

    def __init__(self, engine: RetrievalEngine,
                 load: Callable[[Path], RetrievalEngine] = RetrievalEngine.load) -> None:  # fmt: skip
        self.run_dir = Path(engine.run_dir)
        self._engine, self._load = engine, load
        self._stamp = manifest_stamp(self.run_dir)
        self._lock = threading.Lock()
        self._retired: RetrievalEngine | None = None  # the previous engine, closed at the next reload
        self.reloads = 0

    @property
    def engine(self) -> RetrievalEngine:
        """The engine now serving, without checking the run."""
        return self._engine

    def get(self) -> RetrievalEngine:
        """The engine of the run as it is now: loaded again first if its manifest changed."""
        stamp = manifest_stamp(self.run_dir)
        if stamp == self._stamp:
            return self._engine
        with self._lock:
            if stamp != self._stamp:
                self._reload(stamp)
        return self._engine

    def _reload(self, stamp: Stamp) -> None:
        if stamp is None or (self.run_dir / JOURNAL).exists():
            return  # mid-update: the writer renames the manifest last; look again next time
        try:
            engine = self._load(self.run_dir)
        except (RunError, StoreError, IndexFileError, OSError, ValueError) as exc:
            log.warning("%s changed but cannot be loaded (%s); still serving the run as it was",
                        self.run_dir, exc)  # fmt: skip
            self._stamp = stamp
            return
        if self._retired is not None:  # an answer in flight takes milliseconds; reloads are rare
            self._retired.close()
        self._retired, self._engine, self._stamp = self._engine, engine, stamp
        self.reloads += 1
        d = engine.describe()
        log.info("%s changed: reloaded (%s items, %s texts)", self.run_dir, d["items"], d["texts"])

    def close(self) -> None:
        """Close the engines held (the serving one and the one it replaced)."""
        for engine in (self._retired, self._engine):
            if engine is not None:
                engine.close()
        self._retired = None
