"""The package as a built wheel, not as the checkout.

The wheel is built from a copy of the packaging inputs (``pyproject.toml``, ``README.md``,
``crossmodal/``), so that the build writes nothing into the shared checkout. Two installs:

- ``pip install --no-deps --target`` into a temporary folder, run by this venv's python (a
  fresh venv with the training extra would copy gigabytes of torch): ``crossmodal serve``.
  The server runs in isolated mode (``-I``) from another folder. The checkout is installed
  editable into the venv, so the child also drops the editable finder (which would
  otherwise supply any module missing from the wheel) and an audit hook reports every file
  it opens from the checkout; only the venv itself, which lives inside the checkout, may be
  read. ``tiny_pool`` and ``tiny_colours`` are test-only registrations: the child imports a
  copy of ``tinyrun.py`` from a temporary folder.
- ``pip install <wheel>`` into a fresh venv, base dependencies only, from the package index
  (pip's cache makes a second run quick): no torch, transformers, datasets or Gradio there.
  It searches an exported copy of the tiny run and must find what the torch engine finds;
  the training commands name the extra they need.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import httpx
import pytest
from test_app import free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
PACKAGING_INPUTS = ("pyproject.toml", "README.md")
STARTUP_TIMEOUT_S = 120
CHECKOUT_MARK = "OPENED FROM THE CHECKOUT:"

# Runs in the child: argv = target, plugins folder, checkout, venv, then the CLI arguments.
CHILD = textwrap.dedent(
    f"""
    import sys
    target, plugins, checkout, venv, argv = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:]

    def audit(event, args):
        if event == "open" and isinstance(args[0], str):
            if args[0].startswith(checkout + "/") and not args[0].startswith(venv + "/"):
                sys.stderr.write({CHECKOUT_MARK!r} + " " + args[0] + "\\n")

    sys.addaudithook(audit)
    import signal
    # a test run started in the background (make test &) passes SIGINT on as ignored; the
    # server is stopped with Ctrl+C below, so it gets Python's own handler back
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.meta_path[:] = [f for f in sys.meta_path if not f.__module__.startswith("__editable__")]
    sys.path_hooks[:] = [h for h in sys.path_hooks if not h.__module__.startswith("__editable__")]
    sys.path[:0] = [target, plugins]
    import crossmodal
    print("crossmodal imported from", crossmodal.__file__, flush=True)
    import tinyrun  # noqa: F401  (registers tiny_colours and tiny_pool)
    from importlib.metadata import distributions

    (dist,) = [d for d in distributions(path=[target]) if d.metadata["Name"] == "crossmodal"]
    (script,) = [e for e in dist.entry_points if e.group == "console_scripts" and e.name == "crossmodal"]
    sys.exit(script.load()(argv))
    """
)


def child_env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("PYTEST_CURRENT_TEST", None)
    return env


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel of the package as it is in the checkout now (uncommitted files included)."""
    root = tmp_path_factory.mktemp("wheel")
    src, dist = root / "src", root / "dist"
    no_bytecode = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "crossmodal", src / "crossmodal", ignore=no_bytecode)
    for name in PACKAGING_INPUTS:
        shutil.copy2(ROOT / name, src / name)
    pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(dist), str(src))
    (built,) = dist.glob("crossmodal-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """The folder the wheel is installed into (``pip install --target``)."""
    target = tmp_path_factory.mktemp("site") / "target"
    pip("install", "--no-deps", "--target", str(target), str(wheel))
    return target


def pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", *args, "--no-index", "--disable-pip-version-check", "--quiet"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


def test_wheel_holds_the_package_and_nothing_else(wheel):
    dist_info = wheel.name.split("-py")[0] + ".dist-info"  # crossmodal-0.1.0.dist-info
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        entry_points = zf.read(f"{dist_info}/entry_points.txt").decode()
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "crossmodal").rglob("*.py")}
    assert modules <= set(names), sorted(modules - set(names))
    assert "crossmodal/app.py" in names and "app.py" not in names  # the root app.py only launches it
    assert {n.split("/")[0] for n in names} == {"crossmodal", dist_info}, names
    assert not any(Path(n).name in ("conftest.py", "tinyrun.py") or "tests/" in n for n in names)
    assert "crossmodal = crossmodal.cli:main" in entry_points


def start_server(installed: Path, run: Path, port: int, folder: Path) -> tuple[subprocess.Popen, Path]:
    """``crossmodal serve --run RUN`` from the installed copy, cwd ``folder``; output into a log."""
    plugins = folder / "plugins"
    plugins.mkdir()
    shutil.copy2(TESTS / "tinyrun.py", plugins / "tinyrun.py")
    log = folder / "serve.log"
    argv = ["serve", "--run", str(run), "--host", "127.0.0.1", "--port", str(port), "--k", "5"]
    venv = Path(sys.prefix).resolve()
    cmd = [sys.executable, "-I", "-c", CHILD, str(installed), str(plugins), str(ROOT), str(venv), *argv]
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=folder, env=child_env(), stdout=out, stderr=subprocess.STDOUT)
    return proc, log


def wait_until_up(proc: subprocess.Popen, log: Path) -> str:
    """The URL the app prints once serving; it must answer 200."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"crossmodal serve exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        line = next((ln for ln in log.read_text().splitlines() if ln.startswith("crossmodal app for ")), None)
        if line is not None:
            url = line.split(": ", 1)[1].split(" (up ", 1)[0]
            assert httpx.get(url, timeout=10).status_code == 200
            return url
        time.sleep(0.2)
    pytest.fail(f"crossmodal serve did not start in {STARTUP_TIMEOUT_S} s:\n{log.read_text()[-4000:]}")


def test_installed_wheel_serves_a_run_from_another_folder(installed, tiny_run, tmp_path):
    from gradio_client import Client

    assert not (installed / "app.py").exists() and (installed / "crossmodal" / "app.py").is_file()
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    proc, log = start_server(installed, tiny_run, free_port(), folder)
    try:
        url = wait_until_up(proc, log)
        client = Client(url, verbose=False)
        *_, result = client.predict("red", 5, api_name="/text_to_images")
        client.close()  # an open client connection would hold up the server's graceful shutdown
        assert result["error"] is None and len(result["hits"]) == 5, result
        assert all("red" in h["labels"] for h in result["hits"]), [h["labels"] for h in result["hits"]]
        proc.send_signal(signal.SIGINT)  # Ctrl+C, as the start-up line says
        assert proc.wait(timeout=90) == 0, log.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = log.read_text()
    imported = next(ln for ln in output.splitlines() if ln.startswith("crossmodal imported from "))
    assert Path(imported.split(" from ", 1)[1]) == installed / "crossmodal" / "__init__.py", imported
    assert CHECKOUT_MARK not in output, output[-4000:]


# -- the serving core alone: the wheel with its base dependencies in a fresh venv -------------------
NOT_IN_THE_BASE = ("torch", "torchvision", "transformers", "datasets", "gradio")


@pytest.fixture(scope="module")
def serving_venv(wheel, tmp_path_factory) -> Path:
    """A fresh venv holding the wheel and its base dependencies (``pip install <wheel>``)."""
    venv = tmp_path_factory.mktemp("serving") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    cmd = [str(venv / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check", "--quiet",
           str(wheel)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=venv_env())
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return venv


def venv_env() -> dict[str, str]:
    """The environment of a command in the fresh venv: nothing of this venv or checkout leaks in."""
    env = {k: v for k, v in child_env().items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if not p.startswith(str(Path(sys.prefix).resolve())))  # fmt: skip
    return env


def in_venv(venv: Path, *argv: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(venv / "bin" / argv[0]), *argv[1:]], capture_output=True, text=True,
                          cwd=cwd, env=venv_env(), timeout=300)  # fmt: skip


def printed_hits(output: str) -> list[tuple[int, float, str]]:
    """``(rank, distance, id)`` of each hit ``crossmodal search`` printed (the id cut at 24 characters)."""
    lines = output.splitlines()
    assert lines[1].split()[:3] == ["rank", "dist", "id"], output
    return [(int(r), float(d), key) for r, d, key, *_ in (line.split() for line in lines[2:])]


def test_the_base_package_alone_searches_an_exported_run(serving_venv, tiny_run, tmp_path):
    from test_export import export_copy

    from crossmodal.serving import RetrievalEngine

    exported, _ = export_copy(tiny_run, tmp_path / "exported")
    folder = tmp_path / "elsewhere"
    run = shutil.copytree(exported, folder / "run")
    for module in NOT_IN_THE_BASE:
        done = in_venv(serving_venv, "python", "-c", f"import {module}", cwd=folder)
        assert done.returncode != 0 and f"No module named '{module}'" in done.stderr, (module, done.stderr)
    image = sorted((run / "images").glob("*.png"))[3]
    queries = [("--text", "red", "search_text"), ("--text", "a blue star", "search_text"),
               ("--image", str(image), "search_image")]  # fmt: skip
    torch_engine = RetrievalEngine.load(exported, backend="torch")
    try:
        for flag, query, method in queries:
            done = in_venv(serving_venv, "crossmodal", "search", "--run", "run", flag, query, "-k", "8",
                           cwd=folder)  # fmt: skip
            assert done.returncode == 0, done.stderr[-3000:]
            hits = getattr(torch_engine, method)(query, 8).hits
            assert printed_hits(done.stdout) == [(h.rank, h.distance, h.key[:24]) for h in hits], done.stdout
    finally:
        torch_engine.close()
    done = in_venv(serving_venv, "crossmodal", "train", cwd=folder)
    assert (done.returncode, done.stderr) == (2, "crossmodal train needs the training extra: "
                                                 "pip install 'crossmodal[train]'\n")  # fmt: skip
    done = in_venv(serving_venv, "crossmodal", "serve", "--run", "run", cwd=folder)
    assert (done.returncode, done.stderr) == (2, "crossmodal serve needs the app extra: "
                                                 "pip install 'crossmodal[app]'\n")  # fmt: skip
