"""The run folder: its manifest, the one writer that updates it, and the checks on reading it.

``runs/<name>/`` holds ``config.yaml``, ``model.json``, ``model.safetensors``, tower state
such as ``vocab.json``, ``splits.json``, ``image.index``, ``text.index``, ``store.sqlite``,
``manifest.json`` and ``eval/``. The manifest is written last and records the code
length, the towers, the format version and a checksum of every file, so a run from
another version, or one whose files changed underneath, is refused with a message
that says what differs. Every change to a run goes through ``RunUpdate``.

One process writes a run at a time: every writer (train, prepare, index, index --add and
--remove, eval) holds the run's lock (``lock_run``: ``.lock``, with the holder's command in
``.lock.json``) over its whole read-modify-write, and a second writer is refused at once
with a message naming the run and the holder's command. The lock is an OS file lock
(``flock``), sound on a local file system; a run folder on shared network storage is not
covered.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from crossmodal import RUN_FORMAT_VERSION, __version__
from crossmodal.config import Config, load_config
from crossmodal.io import atomic_path, sha256_file, write_json_atomic
from crossmodal.runs.exported import EXPORT_FILES

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
JOURNAL = ".update.json"  # present only while a RunUpdate renames its files into place
LOCK = ".lock"  # the writers' lock file (kept between writers)
LOCK_INFO = ".lock.json"  # the command, process and start time of the lock's holder
STAGING_PREFIX = ".staging-"
INDEX_FILES = ("image.index", "image.index.json", "text.index", "text.index.json", "store.sqlite")
EVAL_FILES = ("eval/metrics.json", "eval/report.md")
KEPT_ON_RETRAIN = ("config.yaml", "splits.json")  # rewritten at the start of a training


class RunError(RuntimeError):
    """A run folder is missing, incomplete or incompatible; the message says what to run."""


class ManifestError(RunError):
    """A run's manifest.json is unreadable or malformed: it vouches for nothing."""


class RunBusyError(RunError):
    """Another process (or thread) is writing the run folder: it holds the run's lock."""


class RunFormatError(RunError):
    """A run folder written by a crossmodal with another run format; it must be re-trained.

    ``older`` is True when it is an earlier format (which ``crossmodal prepare`` retrains in place).
    """

    def __init__(self, message: str, older: bool = False) -> None:
        super().__init__(message)
        self.older = older


def read_manifest(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(run_dir) / MANIFEST
    if not path.exists():
        raise RunError(
            f"{run_dir} is not a trained run (no {MANIFEST}); "
            f"train one with: crossmodal train --config configs/openmoji.yaml"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # unreadable, a folder, not UTF-8, not JSON
        hint = f"rebuild the run with: {rebuild_command(run_dir)}"
        raise ManifestError(f"{path} is corrupt ({exc}); {hint}") from None
    files = manifest.get("files", {}) if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        raise ManifestError(
            f"{path} is not a crossmodal manifest (a JSON object with a 'files' object of checksums); "
            f"rebuild the run with: {rebuild_command(run_dir)}"
        )
    return manifest


def rebuild_command(run_dir: str | os.PathLike[str]) -> str:
    """The command that trains, indexes and evaluates ``run_dir`` again from its own recipe, in place."""
    run = Path(run_dir)
    recipe = run / "config.yaml"
    return f"crossmodal prepare --config {recipe} --set runs_dir={run.parent} --set name={run.name}"


def check_run(
    run_dir: str | os.PathLike[str],
    need: tuple[str, ...] = (),
    bits: int | None = None,
    verify: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Read and check the manifest of ``run_dir``; return it.

    Args:
        need: files that must be present and listed (e.g. the indexes).
        bits: the code length the caller expects, if any.
        verify: files whose checksum is compared with the manifest.
    Raises:
        RunError: naming what is missing or what differs.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(f"run folder not found: {run_dir}; create it with: crossmodal train --config ...")
    manifest = read_manifest(run_dir)
    version = manifest.get("format_version")
    if version != RUN_FORMAT_VERSION:
        older = isinstance(version, int) and version < RUN_FORMAT_VERSION
        what = f"rebuild it with: {rebuild_command(run_dir)}" if older else "upgrade crossmodal to read it"
        raise RunFormatError(
            f"{run_dir} was written with run format {version} (crossmodal "
            f"{manifest.get('crossmodal_version')}); this crossmodal {__version__} reads format "
            f"{RUN_FORMAT_VERSION}: {what}",
            older=older,
        )
    if bits is not None and manifest.get("bits") != bits:
        raise RunError(f"{run_dir} has {manifest.get('bits')}-bit codes, expected {bits}")
    for name in need:
        if name not in manifest.get("files", {}) or not (run_dir / name).exists():
            raise RunError(f"{run_dir} has no {name}; create it with: {command_for(run_dir, name)}")
    verify_files(run_dir, manifest, verify)
    return manifest


def verify_files(run_dir: str | os.PathLike[str], manifest: dict[str, Any], names: tuple[str, ...]) -> None:
    """Compare the files ``names`` with the checksums in ``manifest`` (names it lacks are skipped).

    Raises:
        RunError: a file is missing or differs; the message says which and what to re-run.
    """
    run_dir = Path(run_dir)
    for name in names:
        expected = manifest.get("files", {}).get(name)
        path = run_dir / name
        if not expected:
            continue
        if path.is_file() and sha256_file(path) == expected:
            continue
        state = "differs from" if path.is_file() else "is missing, though listed in"
        if (run_dir / JOURNAL).exists():
            why = f"an interrupted update ({JOURNAL}) left {run_dir} half-replaced"
            what = interrupted_hint(run_dir)
        else:
            why = "it changed or is damaged"
            what = f"rebuild it with: {command_for(run_dir, name)}"
        raise RunError(f"{path} {state} the checksum in {MANIFEST}: {why}; {what}")


def interrupted_hint(run_dir: str | os.PathLike[str]) -> str:
    """What to do about the interrupted update whose journal is in ``run_dir``: re-run the command
    that wrote it (recorded in the journal), which rolls the update back first."""
    command = None
    try:
        command = json.loads((Path(run_dir) / JOURNAL).read_text(encoding="utf-8")).get("command")
    except (OSError, ValueError, AttributeError):
        pass
    if isinstance(command, str) and command:
        return f"re-run the interrupted command: {command}"
    return f"re-run the interrupted command (a command that writes {run_dir} rolls the update back first)"


def command_for(run_dir: str | os.PathLike[str], name: str) -> str:
    """The command that writes run file ``name`` again: index files by ``crossmodal index``,
    evaluation by ``crossmodal eval``, exported encoders by ``crossmodal export``, the rest (the
    model) by ``rebuild_command``."""
    if name in INDEX_FILES:
        return f"crossmodal index --run {run_dir}"
    if name.startswith("eval/"):
        return f"crossmodal eval --run {run_dir}"
    if name in EXPORT_FILES:
        return f"crossmodal export --run {run_dir}"
    return rebuild_command(run_dir)


_held = threading.local()  # .runs: {resolved run folder: command} of the locks this thread holds


def _held_locks() -> dict[Path, str | None]:
    if not hasattr(_held, "runs"):
        _held.runs = {}
    return _held.runs


def held_command(run_dir: str | os.PathLike[str]) -> str | None:
    """The command recorded by the lock this thread holds on ``run_dir`` (None if none or not held)."""
    return _held_locks().get(Path(run_dir).resolve())


@contextmanager
def lock_run(run_dir: str | os.PathLike[str], command: str | None = None,
             create: bool = False) -> Iterator[None]:
    """Hold the writers' lock of ``run_dir`` for the with-block; refuse at once if another holds it.

    Every writer holds it over its whole read-modify-write (so that two ``index --add`` never
    read the same store), and ``RunUpdate`` and ``recover_run`` take it too. Re-entrant within
    a thread (``prepare`` holds it while train, index and eval take it again); the outermost
    ``command`` is recorded in ``.lock.json`` and in the journal of each update made under it.
    Writers do not wait for each other: a second one gets ``RunBusyError`` naming the holder.

    Args:
        command: the command line that re-runs this job (shown to other writers, and in the
            message after an interrupted update).
        create: create the run folder when missing (training); otherwise a missing folder
            raises ``RunError``.
    """
    run_dir = Path(run_dir)
    held = _held_locks()
    key = run_dir.resolve()
    if key in held:  # this thread holds it already: the outer holder releases it
        yield
        return
    if create:
        run_dir.mkdir(parents=True, exist_ok=True)
    elif not run_dir.is_dir():
        raise RunError(f"run folder not found: {run_dir}; create it with: crossmodal train --config ...")
    lock = FileLock(run_dir / LOCK, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise RunBusyError(_busy_message(run_dir)) from None
    try:
        info = {"command": command, "pid": os.getpid(), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S")}  # fmt: skip
        with atomic_path(run_dir / LOCK_INFO, fsync=False) as tmp:
            tmp.write_text(json.dumps(info), encoding="utf-8")
        held[key] = command
        yield
    finally:
        held.pop(key, None)
        (run_dir / LOCK_INFO).unlink(missing_ok=True)  # before the release: the next holder writes its own
        lock.release()


def _busy_message(run_dir: Path) -> str:
    try:
        info = json.loads((run_dir / LOCK_INFO).read_text(encoding="utf-8"))
        holder = (f"{info['command'] or 'a crossmodal writer'} (pid {info['pid']} on {info['host']}, "
                  f"since {info['started']})")
    except (OSError, ValueError, TypeError, KeyError):  # the holder has not written it yet
        holder = "another crossmodal process"
    if len(holder) > 300:
        holder = holder[:297] + "..."
    return (f"{run_dir} is being written by {holder}; one writer at a time, and this one does not wait: "
            f"run it again once that has finished")


class RunUpdate:
    """Replace several files of a run folder as one unit, the manifest last.

        with RunUpdate(run_dir) as update:
            index.save(update.path("image.index"))
            update.commit(index=info)

    New files are written under ``update.path(name)``, in a hidden staging folder inside
    the run folder; ``adopt(name)`` lists a file already in place, ``forget(name)`` unlists
    one (and deletes it once the manifest no longer names it). ``commit`` checksums the
    staged and adopted files into the next manifest, hard-links the current files into the
    staging folder as backups, writes a journal (``.update.json``), renames each staged file
    into place, the manifest last, and removes the journal. A process killed before the
    journal leaves the run as it was; one killed during the renames (or before the journal
    is removed) leaves a journal: readers refuse a set whose checksums differ from the
    manifest, and ``recover_run``, which every writer calls first, rolls the update back,
    so that running the command again does its work once. The journal names the command
    that made the update (``lock_run``'s), so that the message after a crash says what to re-run.

    It holds the run's lock (``lock_run``) from ``__enter__`` to ``__exit__``; a job holds it
    already, from before it reads the run.

    This is the only writer of ``manifest.json``.
    """

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.run_dir = Path(run_dir)
        self.dir: Path | None = None
        self.committed = False
        self._adopted: list[str] = []
        self._forgotten: list[str] = []
        self._journaled = False
        self._lock = ExitStack()

    def __enter__(self) -> RunUpdate:
        self._lock.enter_context(lock_run(self.run_dir, create=True))
        try:
            self.dir = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=self.run_dir))
        except BaseException:
            self._lock.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        # Once the journal is written, the staging folder holds the backups recover_run needs:
        # an update interrupted from there on (Ctrl+C, a full disk) leaves it for recover_run.
        try:
            if self.dir is not None and not self.committed and not self._journaled:
                shutil.rmtree(self.dir, ignore_errors=True)
        finally:
            self._lock.close()

    def path(self, name: str) -> Path:
        """Where to write the next version of the run file ``name`` (``"eval/report.md"`` too)."""
        if self.dir is None:
            raise RuntimeError("RunUpdate.path() outside its with-block")
        _check_name(name)
        path = self.dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def adopt(self, *names: str) -> None:
        """List files already in the run folder (written earlier) in the next manifest."""
        for name in names:
            _check_name(name)
            if not (self.run_dir / name).is_file():
                raise FileNotFoundError(f"{self.run_dir / name} does not exist")
        self._adopted += names

    def forget(self, *names: str) -> None:
        """Unlist files in the next manifest; they are deleted once it is in place.

        A name that is not a run file name (``../x``, an absolute path) is unlisted but
        never deleted: nothing outside the run folder is touched.
        """
        self._forgotten += names

    def _staged(self) -> list[str]:
        assert self.dir is not None
        return sorted(
            p.relative_to(self.dir).as_posix()
            for p in self.dir.rglob("*")
            if p.is_file() and not p.relative_to(self.dir).parts[0].startswith(".")
        )

    def commit(self, drop: tuple[str, ...] = (), **fields: Any) -> dict[str, Any]:
        """Move every staged file into place and write the manifest updated with ``fields``.

        Args:
            drop: manifest keys to remove (e.g. ``"index"`` when the indexes are forgotten).
        """
        assert self.dir is not None
        names = self._staged()
        path = self.run_dir / MANIFEST
        manifest = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
        for key in drop:
            manifest.pop(key, None)
        manifest.update(fields, format_version=RUN_FORMAT_VERSION, crossmodal_version=__version__)
        manifest.setdefault("python", platform.python_version())
        checksums = manifest.setdefault("files", {})
        for name in self._forgotten:
            checksums.pop(name, None)
        for name in names:
            checksums[name] = sha256_file(self.dir / name)
        for name in self._adopted:
            checksums[name] = sha256_file(self.run_dir / name)
        write_json_atomic(self.dir / MANIFEST, manifest)
        order = [*names, MANIFEST]
        backups = self.dir / ".old"
        existing = [n for n in order if (self.run_dir / n).is_file()]
        for name in existing:
            (backups / name).parent.mkdir(parents=True, exist_ok=True)
            _link_or_copy(self.run_dir / name, backups / name)
        plan = {"staging": self.dir.name, "files": order, "existing": existing,
                "command": held_command(self.run_dir)}  # fmt: skip
        write_json_atomic(self.run_dir / JOURNAL, plan)
        self._journaled = True
        for name in order:
            (self.run_dir / name).parent.mkdir(parents=True, exist_ok=True)
            os.replace(self.dir / name, self.run_dir / name)
        (self.run_dir / JOURNAL).unlink()
        self.committed = True
        shutil.rmtree(self.dir, ignore_errors=True)
        for name in self._forgotten:  # no longer vouched for: safe to delete
            if name not in names and _is_run_file_name(name):
                (self.run_dir / name).unlink(missing_ok=True)
        return manifest


def _is_run_file_name(name: object) -> bool:
    if not isinstance(name, str) or not name or "\\" in name:
        return False
    parts = Path(name).parts
    return (bool(parts) and not Path(name).is_absolute() and name != MANIFEST and len(parts) <= 2
            and not any(p in ("..", "") or p.startswith(".") for p in parts))  # fmt: skip


def _check_name(name: str) -> None:
    if not _is_run_file_name(name):
        raise ValueError(f"{name!r} is not a run file name (a plain name, or one folder and a name)")


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def recover_run(run_dir: str | os.PathLike[str]) -> bool:
    """Undo an update interrupted by a crash, and remove leftover temporary files.

    Writers call this first, holding the run's lock (it takes the lock itself otherwise, so
    that it never removes the staging folder of a writer at work). A journal means the
    command that wrote it did not finish: the files it backed up are put back and those it
    added removed, so running the command again does its work once. Safe to call again if
    interrupted itself.

    Returns:
        Whether an interrupted update was rolled back.

    Raises:
        RunBusyError: another process is writing the run.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return False
    with lock_run(run_dir):
        return _recover(run_dir)


def _recover(run_dir: Path) -> bool:
    journal = run_dir / JOURNAL
    rolled_back = journal.exists()
    if rolled_back:
        try:
            plan = json.loads(journal.read_text(encoding="utf-8"))
            staging = run_dir / plan["staging"]
            names, existing = list(plan["files"]), set(plan["existing"])
            if not str(plan["staging"]).startswith(STAGING_PREFIX) or "/" in str(plan["staging"]):
                raise ValueError(f"staging folder {plan['staging']!r}")
            if not all(n == MANIFEST or _is_run_file_name(n) for n in names):
                raise ValueError("names outside the run folder")
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise RunError(
                f"{journal} is unreadable ({exc}); delete it and rebuild the run with: "
                f"{rebuild_command(run_dir)}"
            ) from None
        if existing and not (staging / ".old").is_dir():  # a backup missing later was restored already
            raise RunError(
                f"{run_dir}: an interrupted update cannot be rolled back (its backups in {staging.name} "
                f"are gone); rebuild the run with: {rebuild_command(run_dir)}"
            )
        for name in names:
            backup = staging / ".old" / name
            if name not in existing:
                (run_dir / name).unlink(missing_ok=True)
            elif backup.exists():
                os.replace(backup, run_dir / name)
        journal.unlink()
        what = f"of `{plan['command']}` " if isinstance(plan.get("command"), str) else ""
        log.warning("%s: rolled back an interrupted update %s(%s)", run_dir, what, ", ".join(plan["files"]))
    for leftover in run_dir.glob(f"{STAGING_PREFIX}*"):
        shutil.rmtree(leftover, ignore_errors=True)
    for leftover in [*run_dir.glob(".*.tmp"), *run_dir.glob("images/.*.tmp")]:
        leftover.unlink(missing_ok=True)
    return rolled_back


def invalidate_products(run_dir: str | os.PathLike[str], model: bool = False) -> list[str]:
    """Remove what a (re)trained model makes stale: indexes, store, thumbnails and evaluation.

    Called before training into an existing run folder, so that a new model is never
    served with the codes of the old one. With ``model``, the manifest stops vouching for
    the old model too: a training interrupted from here leaves a run that says it is
    untrained, not the old weights beside the new config and splits; every file but
    ``config.yaml`` and ``splits.json`` is unlisted and deleted. Returns the names removed.
    """
    run_dir = Path(run_dir)
    removed = [name for name in INDEX_FILES if (run_dir / name).exists()]
    if (run_dir / MANIFEST).exists():  # first: the manifest no longer vouches for them
        try:
            manifest = json.loads((run_dir / MANIFEST).read_text(encoding="utf-8"))
            listed = manifest.get("files", {})
            added = (manifest.get("index") or {}).get("added") or []
        except (OSError, ValueError, AttributeError):  # unreadable: it vouches for nothing
            (run_dir / MANIFEST).unlink()
        else:
            for entry in [a for a in added if isinstance(a, dict)]:  # stale with the old model's codes
                log.warning("%s: the items added from %s go with the old model's index; add them again "
                            "with: crossmodal index --run %s --add %s", run_dir, entry.get("source"),
                            run_dir, entry.get("source"))  # fmt: skip
    if (run_dir / MANIFEST).exists():
        with RunUpdate(run_dir) as update:
            update.forget(*INDEX_FILES, *EVAL_FILES)
            if model:
                update.forget(*[n for n in listed if n not in KEPT_ON_RETRAIN])
            update.commit(drop=("index", "eval"))
    for name in removed:
        (run_dir / name).unlink(missing_ok=True)
    for folder in ("eval", "images"):  # thumbnails are named by item id: stale for another dataset
        if (run_dir / folder).is_dir():
            shutil.rmtree(run_dir / folder)
            removed.append(f"{folder}/")
    if removed:
        log.info("removed stale %s from %s", ", ".join(removed), run_dir)
    return removed


def load_run_config(run_dir: str | os.PathLike[str]) -> Config:
    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        raise RunError(f"{run_dir} has no config.yaml; it is not a crossmodal run")
    return load_config(path)
