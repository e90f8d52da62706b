"""The cleaned MIRFlickr-25K, NUS-WIDE and MS-COCO of the CLIP-based hashing papers, as an imagefolder.

DCHMT (ACM MM 2022), MITH (ACM MM 2023) and the methods built on them read raw texts
(tags, or a caption) beside the images, not the DCMH bag-of-words. Their authors share
each dataset as three parallel lists, one line per item, and scripts that turn them into
``.mat`` files:

    all_imgs.txt    an image path per line (only its file name is used here)
    all_tags.txt    the item's tags, comma-separated (MIRFlickr-25K, NUS-WIDE); for COCO
    all_txts.txt    the image's five captions, separated by ";"
    all_labels.txt  the item's multi-hot label row, numbers separated by spaces

or, after their scripts ran, ``index.mat`` (key ``index``: image paths), ``caption.mat``
(``caption``: one string per item) and ``label.mat`` (``label``: [N, L]). This script reads
either form and writes ``metadata.jsonl`` into the image folder, so that the ``imagefolder``
loader reads the same items: file name, text, and label names. As the papers do, items
without any label are left out (COCO's release has 1,069 of them), and a COCO item keeps one
of its five captions, drawn with a fixed seed (``--all-captions`` keeps the five).

    python scripts/clip_hash_data.py mirflickr25k --lists PATH/flickr25k --images PATH/mirflickr
    crossmodal data-info imagefolder --root PATH/mirflickr
    crossmodal prepare --config mirflickr25k_clip --set data.options.root=PATH/mirflickr

Label names: the 24 MIRFlickr-25K concepts and the 21 NUS-WIDE concepts in the alphabetical
order of the DCMH releases, COCO's 80 categories in category-id order; a release whose
columns are ordered otherwise needs ``--label-names FILE`` (one name per line). The names
only label the report and give the keyword words; mAP does not depend on them.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from crossmodal.data.mat import MIRFLICKR25K_LABELS, NUSWIDE21_LABELS

COCO80_LABELS = tuple(
    "person bicycle car motorcycle airplane bus train truck boat traffic_light fire_hydrant stop_sign "
    "parking_meter bench bird cat dog horse sheep cow elephant bear zebra giraffe backpack umbrella "
    "handbag tie suitcase frisbee skis snowboard sports_ball kite baseball_bat baseball_glove skateboard "
    "surfboard tennis_racket bottle wine_glass cup fork knife spoon bowl banana apple sandwich orange "
    "broccoli carrot hot_dog pizza donut cake chair couch potted_plant bed dining_table toilet tv laptop "
    "mouse remote keyboard cell_phone microwave oven toaster sink refrigerator book clock vase scissors "
    "teddy_bear hair_drier toothbrush".split()
)
DATASETS = {"mirflickr25k": MIRFLICKR25K_LABELS, "nuswide": NUSWIDE21_LABELS, "coco": COCO80_LABELS}


def read_lists(folder: Path, coco: bool) -> tuple[list[str], list[str], np.ndarray]:
    """``all_imgs.txt``, ``all_tags.txt`` (or COCO's ``all_txts.txt``) and ``all_labels.txt``."""
    texts_file = folder / ("all_txts.txt" if coco and (folder / "all_txts.txt").is_file() else "all_tags.txt")
    paths = _lines(folder / "all_imgs.txt")
    texts = _lines(texts_file)
    labels = np.loadtxt(folder / "all_labels.txt", dtype=np.float32, ndmin=2)
    return paths, texts, labels


def read_mats(folder: Path) -> tuple[list[str], list[str], np.ndarray]:
    """``index.mat``, ``caption.mat`` (or NUS-WIDE's ``caption.txt``) and ``label.mat``."""
    from scipy.io import loadmat

    paths = _strings(_first(loadmat(folder / "index.mat"), ("index", "imgs", "FAll")))
    if (folder / "caption.mat").is_file():
        texts = _strings(_first(loadmat(folder / "caption.mat"), ("caption", "tags", "YAll")))
    else:
        texts = _lines(folder / "caption.txt")
    labels = _first(loadmat(folder / "label.mat"), ("label", "category", "LAll", "labels"))
    return paths, texts, np.asarray(labels, dtype=np.float32)


def _lines(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    return [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]


def _first(mat: dict, keys: Sequence[str]) -> np.ndarray:
    for key in keys:
        if key in mat:
            return mat[key]
    found = [k for k in mat if not k.startswith("__")]
    raise KeyError(f"none of the keys {', '.join(keys)} in the .mat file (it holds {', '.join(found)})")


def _strings(arr: np.ndarray) -> list[str]:
    """A MATLAB string array (a char matrix padded with spaces, or a cell array) as Python strings."""
    arr = np.asarray(arr)
    if arr.dtype == object:
        return [str(np.asarray(v).ravel()[0]).strip() if np.asarray(v).size else "" for v in arr.ravel()]
    return [str(v).strip() for v in arr.ravel()]


def item_text(raw: str, coco: bool, rng: random.Random, all_captions: bool) -> list[str]:
    """The captions of one item: its tags joined by spaces, or (COCO) one of its sentences."""
    if not coco:
        return [" ".join(t.strip() for t in raw.split(",") if t.strip())]
    sentences = [s.strip().rstrip(".").strip() for s in raw.split(";") if s.strip()]
    if all_captions or len(sentences) <= 1:
        return sentences
    return [sentences[rng.randrange(len(sentences))]]


def build_metadata(dataset: str, paths: list[str], texts: list[str], labels: np.ndarray, images: Path,
                   label_names: list[str] | None = None, all_captions: bool = False,
                   seed: int = 1) -> tuple[list[dict], dict[str, int]]:  # fmt: skip
    """The ``metadata.jsonl`` rows of the items, and counts of what was left out.

    Raises:
        ValueError: the three lists differ in length, or the label names do not fit the columns.
    """
    if not len(paths) == len(texts) == len(labels):
        raise ValueError(f"{len(paths)} images, {len(texts)} texts and {len(labels)} label rows: the lists "
                         "must be parallel, one line per item")  # fmt: skip
    names = list(label_names) if label_names else list(DATASETS[dataset])
    if len(names) != labels.shape[1]:
        if label_names:
            raise ValueError(f"{len(names)} label names for {labels.shape[1]} label columns")
        names = [f"label_{k}" for k in range(labels.shape[1])]
    rng = random.Random(seed)
    rows, left = [], {"unlabeled": 0, "missing_image": 0}
    for path, raw, row in zip(paths, texts, labels, strict=True):
        name = path.replace("\\", "/").rsplit("/", 1)[-1]
        if not (row > 0).any():
            left["unlabeled"] += 1
            continue
        if not (images / name).is_file():
            left["missing_image"] += 1
            continue
        captions = item_text(raw, dataset == "coco", rng, all_captions)
        rows.append({"file_name": name, "text": captions if len(captions) != 1 else captions[0],
                     "labels": [names[k] for k in np.flatnonzero(row > 0)]})  # fmt: skip
    return rows, left


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", choices=sorted(DATASETS))
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--lists", type=Path, help="folder with all_imgs.txt, all_tags.txt / all_txts.txt, "
                                                   "all_labels.txt")  # fmt: skip
    source.add_argument("--mat", type=Path, help="folder with index.mat, caption.mat (.txt), label.mat")
    parser.add_argument("--images", type=Path, required=True, help="the folder holding the image files")
    parser.add_argument("--label-names", type=Path, help="one label name per line, in column order")
    parser.add_argument("--all-captions", action="store_true", help="COCO: keep all five captions")
    parser.add_argument("--seed", type=int, default=1, help="COCO: seed of the caption drawn per image")
    args = parser.parse_args(argv)
    coco = args.dataset == "coco"
    paths, texts, labels = read_lists(args.lists, coco) if args.lists else read_mats(args.mat)
    names = _lines(args.label_names) if args.label_names else None
    rows, left = build_metadata(args.dataset, paths, texts, labels, args.images, names, args.all_captions,
                                args.seed)  # fmt: skip
    if not rows:
        print(f"no item kept: {left}", file=sys.stderr)
        return 1
    out = args.images / "metadata.jsonl"
    with open(out, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {out}: {len(rows):,} items; left out {left['unlabeled']:,} without a label and "
          f"{left['missing_image']:,} whose image is not in {args.images}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
