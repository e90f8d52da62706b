"""The package's layers import only downward (docs/architecture.md), read from the source.

core (codes, models, losses, data, index, store, evaluate, fit...) < runs (the run folder)
< jobs | serving < entry points (cli, app). Within the core a finer order keeps the
registries acyclic. Imports inside functions are for optional heavy back ends, never a way
around a cycle: a crossmodal import inside a function is allowed only in entry points
(they load a subcommand's modules on demand, for start-up time) or where ALLOWED_LAZY says why.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "crossmodal"

ENTRY = {"crossmodal.cli", "crossmodal.app", "crossmodal.__main__"}
# rank of each part of the core (a module may import from its own rank or below)
CORE_RANKS = {
    "crossmodal": 0, "crossmodal.registry": 0, "crossmodal.io": 0, "crossmodal.codes": 0,
    "crossmodal.images": 0, "crossmodal.augment": 0, "crossmodal.text": 0, "crossmodal.config": 0,
    "crossmodal.distributed": 0,  # torch.distributed helpers; imports nothing of crossmodal
    "crossmodal.data": 1,
    "crossmodal.models": 2, "crossmodal.index": 2, "crossmodal.store": 2, "crossmodal.evaluate": 2,
    "crossmodal.baselines": 2, "crossmodal.features": 2, "crossmodal.report": 2,
    "crossmodal.losses": 3,
    "crossmodal.fit": 4,
}  # fmt: skip
LAYERS = {"core": 0, "runs": 1, "jobs": 2, "serving": 2, "entry": 3}
# (importing module, imported module) pairs allowed inside a function, with the reason
ALLOWED_LAZY: dict[tuple[str, str], str] = {
    ("crossmodal.serving.encoders", "crossmodal.serving.torch_encoders"):
        "torch and the model loader only for runs without exported ONNX encoders, so that serving "
        "an exported run imports no torch",
    ("crossmodal.jobs.ray_encode", "crossmodal.runs.model"):
        "torch in the Ray workers only for runs without exported ONNX encoders (index --ray)",
    ("crossmodal.jobs.ray_encode", "crossmodal.data.captions"):
        "datasets (a second to import) only in the Ray workers that read shards themselves",
    ("crossmodal.jobs.ray_encode", "crossmodal.data.shards"):
        "datasets (a second to import) only in the Ray workers that read shards themselves",
}  # fmt: skip


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> str:
    if module in ENTRY:
        return "entry"
    for name in ("runs", "jobs", "serving"):
        if module == f"crossmodal.{name}" or module.startswith(f"crossmodal.{name}."):
            return name
    return "core"


def core_part(module: str) -> str:
    """The registry-level part of a core module: its package (data, models, losses) or itself."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else module


def resolve(node: ast.ImportFrom | ast.Import, module: str, is_package: bool) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if node.level:
        base = module.split(".")
        base = base[: len(base) - node.level + (1 if is_package else 0)]
        return [".".join([*base, node.module] if node.module else base)]
    return [node.module or ""]


def imports(path: Path, root: Path = ROOT) -> list[tuple[str, str, bool, int]]:
    """``(importer, imported, inside_a_function, line)`` for every crossmodal import of a file.

    Imports under ``if TYPE_CHECKING:`` are skipped: they do not run.
    """
    module = module_name(path, root)
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out: list[tuple[str, str, bool, int]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.Import | ast.ImportFrom):
                for name in resolve(child, module, path.name == "__init__.py"):
                    if name == "crossmodal" or name.startswith("crossmodal."):
                        out.append((module, name, in_function, child.lineno))
            inner = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            visit(child, inner)

    visit(tree, False)
    return out


def all_imports(root: Path = PACKAGE) -> list[tuple[str, str, bool, int]]:
    return [imp for path in sorted(root.rglob("*.py")) for imp in imports(path)]


def violations(found: list[tuple[str, str, bool, int]]) -> list[str]:
    bad = []
    for importer, imported, lazy, line in found:
        where = f"{importer}:{line} imports {imported}"
        a, b = layer(importer), layer(imported)
        if LAYERS[b] > LAYERS[a] or (LAYERS[a] == LAYERS[b] and a != b):
            bad.append(f"{where}: the {a} layer may not import the {b} layer")
        elif a == b == "core" and core_part(importer) != core_part(imported):
            ra, rb = CORE_RANKS.get(core_part(importer)), CORE_RANKS.get(core_part(imported))
            if ra is None or rb is None:
                bad.append(f"{where}: {core_part(importer) if ra is None else core_part(imported)} "
                           "has no rank in CORE_RANKS")  # fmt: skip
            elif rb > ra:
                bad.append(f"{where}: core rank {ra} may not import rank {rb}")
        if lazy and a != "entry" and (importer, imported) not in ALLOWED_LAZY:
            bad.append(f"{where} inside a function: import it at the top (or say why in ALLOWED_LAZY)")
    return bad


def test_every_module_imports_only_downward():
    found = all_imports()
    assert len(found) > 100  # the scan sees the package
    assert violations(found) == []


def test_the_check_catches_upward_and_cycle_dodging_imports():
    bad = violations([
        ("crossmodal.serving.engine", "crossmodal.jobs.train", False, 1),  # serving needs no training code
        ("crossmodal.runs.model", "crossmodal.losses", True, 2),  # fine by layer, but hidden in a function
        ("crossmodal.models.hasher", "crossmodal.losses.base", False, 3),  # models below losses
        ("crossmodal.jobs.eval", "crossmodal.jobs.index", False, 4),  # jobs may share, inside their layer
        ("crossmodal.cli", "crossmodal.jobs.train", True, 5),  # entry points load lazily
    ])  # fmt: skip
    assert len(bad) == 3, bad
    assert "serving layer may not import the jobs layer" in bad[0]
    assert "inside a function" in bad[1]
    assert "core rank 2 may not import rank 3" in bad[2]


def test_the_tree_before_the_layering_step_would_fail(tmp_path):
    """The same check on the old shape (models importing losses, jobs borrowing from each
    other inside functions) reports them."""
    pkg = tmp_path / "crossmodal"
    (pkg / "models").mkdir(parents=True)
    (pkg / "runs").mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "models" / "__init__.py").write_text("")
    (pkg / "models" / "hasher.py").write_text("from crossmodal.losses.base import sign_pm1\n")
    (pkg / "runs" / "__init__.py").write_text("")
    lazy = "def load_model():\n    from crossmodal.losses import create_loss\n"
    (pkg / "runs" / "model.py").write_text(lazy)
    found = [imp for path in sorted(pkg.rglob("*.py")) for imp in imports(path, tmp_path)]
    bad = violations(found)
    assert len(bad) == 2 and "core rank 2 may not import rank 3" in bad[0] and "inside a function" in bad[1]


@pytest.mark.parametrize(  # serving loads torch in a fresh interpreter: seconds
    "module", [pytest.param("crossmodal.serving", marks=pytest.mark.slow), "crossmodal.cli"]
)
def test_serving_imports_no_training_code(module):
    code = (
        f"import sys, {module}\n"
        "loaded = [m for m in sys.modules if m.startswith(('crossmodal.losses', 'crossmodal.fit', "
        "'crossmodal.jobs', 'crossmodal.baselines'))]\n"
        "print(','.join(sorted(loaded)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == ""
