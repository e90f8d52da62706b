"""Safe loading: nothing from a run folder, a dataset or a cache is unpickled, and the app serves
only what it must.

A static scan of the code base refuses unsafe loaders; planted pickles (which would create a
marker file if ever unpickled) are refused with clear errors and the marker never appears; the
app binds loopback by default, limits uploads, and its file route refuses paths outside the
folders it serves.
"""

from __future__ import annotations

import ast
import importlib
import pickle
import shutil
import socket
import sys
import zipfile
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from tinyrun import tiny_config

from crossmodal.runs.folder import RunError
from crossmodal.serving import RetrievalEngine

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted([*(ROOT / "crossmodal").rglob("*.py"), ROOT / "app.py", *(ROOT / "scripts").glob("*.py")])


class Planted:
    """Unpickling this object creates ``path``: proof that a loader ran pickled code."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def planted_pickle(marker: Path) -> bytes:
    return pickle.dumps({"state_dict": Planted(marker)}, protocol=2)


# -- the static scan -------------------------------------------------------------------------------
def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _kw_is(call: ast.Call, name: str, value: object) -> bool:
    return any(
        k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is value for k in call.keywords
    )


UNSAFE_CALLS = {
    "pickle.load", "pickle.loads", "pickle.Unpickler", "cPickle.load", "dill.load", "dill.loads",
    "joblib.load", "marshal.load", "marshal.loads", "shelve.open", "pd.read_pickle", "pandas.read_pickle",
    "yaml.load", "yaml.unsafe_load", "yaml.full_load", "torch.jit.load", "eval", "exec",
}  # fmt: skip


def unsafe_loads(path: Path) -> list[str]:
    """Calls in ``path`` that could run code from a file: pickle & co, torch.load without
    ``weights_only=True``, ``np.load(..., allow_pickle=True)``, ``yaml.load``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        where = f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name}:{node.lineno}: {name}"
        if name in UNSAFE_CALLS:
            found.append(where)
        elif name.endswith("torch.load") and not _kw_is(node, "weights_only", True):
            found.append(f"{where} without weights_only=True")
        elif name in ("np.load", "numpy.load") and not _kw_is(node, "allow_pickle", False):
            found.append(f"{where} without allow_pickle=False")
    return found


def test_scan_finds_unsafe_loads(tmp_path):
    """The scanner itself: each unsafe form is caught, each safe form passes."""
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import pickle, torch, numpy as np, yaml\n"
        "pickle.loads(b'')\ntorch.load('x')\ntorch.load('x', weights_only=False)\n"
        "np.load('x', allow_pickle=True)\nnp.load('x')\nyaml.load('x')\n"
        "torch.load('x', weights_only=True)\nnp.load('x', allow_pickle=False)\nyaml.safe_load('x')\n"
    )
    found = unsafe_loads(probe)
    assert [f.split(": ", 1)[1] for f in found] == [
        "pickle.loads", "torch.load without weights_only=True", "torch.load without weights_only=True",
        "np.load without allow_pickle=False", "np.load without allow_pickle=False", "yaml.load",
    ]  # fmt: skip


def test_code_base_has_no_unsafe_loader():
    assert len(SOURCES) > 20
    found = [f for path in SOURCES for f in unsafe_loads(path)]
    assert found == [], "unsafe loaders:\n" + "\n".join(found)


def test_weights_are_written_as_safetensors_only():
    """Every tensor file the package writes goes through safetensors, never torch.save/pickle."""
    writers = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and _dotted(node.func) in (
                "torch.save",
                "pickle.dump",
                "pickle.dumps",
            ):
                writers.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert writers == []


# -- planted pickles -------------------------------------------------------------------------------
@pytest.mark.parametrize("form", ["raw_pickle", "torch_zip"])
def test_pickled_image_weights_are_refused(form, tmp_path, workdir):
    from crossmodal.runs.model import build_model

    marker = tmp_path / "PWNED"
    weights = tmp_path / "resnet18.pth"
    if form == "raw_pickle":
        weights.write_bytes(planted_pickle(marker))
    else:
        torch.save({"state_dict": Planted(marker)}, weights)
        assert zipfile.is_zipfile(weights)
    cfg = tiny_config(workdir, "model.image_tower=resnet18", f"model.image_weights={weights}")
    with pytest.raises(ValueError) as err:
        build_model(cfg)
    message = str(err.value)
    assert str(weights) in message and "not a plain weights file" in message and "refuses" in message
    assert not marker.exists()


def copy_run(tiny_run: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("images", "checkpoint", "eval"))
    return run


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("model.safetensors", "model.safetensors is not a valid safetensors file"),
        ("image.index", "image.index is not a FAISS binary index"),
        ("text.index.json", "unreadable index sidecar"),
        ("store.sqlite", "store.sqlite is not a crossmodal metadata store"),
        ("vocab.json", "cannot read the text tower's files ['vocab.json']"),
        ("model.json", "model.json is unreadable"),
    ],
)
def test_pickles_planted_in_a_run_folder_are_refused(name, message, tiny_run, tmp_path):
    from crossmodal.config import ConfigError

    run = copy_run(tiny_run, tmp_path)
    marker = tmp_path / "PWNED"
    (run / name).write_bytes(planted_pickle(marker))
    with pytest.raises((RunError, ConfigError)) as err:
        RetrievalEngine.load(run)
    assert message in str(err.value) and str(run) in str(err.value)
    assert not marker.exists()


def test_a_pickle_planted_as_config_yaml_is_refused(tiny_run, tmp_path):
    from crossmodal.config import ConfigError
    from crossmodal.runs.folder import load_run_config

    run = copy_run(tiny_run, tmp_path)
    marker = tmp_path / "PWNED"
    (run / "config.yaml").write_bytes(planted_pickle(marker))
    with pytest.raises(ConfigError, match="config.yaml is not valid YAML"):
        load_run_config(run)
    assert not marker.exists()


def test_pickled_feature_cache_is_ignored_and_recomputed(tmp_path, caplog):
    from tinyrun import TinyPool

    from crossmodal.data import create_dataset
    from crossmodal.features import cache_key, extract_features

    dataset = create_dataset("tiny_colours", n=8)
    tower, desc = TinyPool(), {"name": "tiny_pool", "size": 32}
    first = extract_features(dataset, "image", tower, desc, tmp_path)
    (cached,) = tmp_path.glob("*.npy")
    assert cache_key(dataset, "image", desc) in cached.name
    marker = tmp_path / "PWNED"
    cached.write_bytes(planted_pickle(marker))
    again = extract_features(dataset, "image", tower, desc, tmp_path)
    torch.testing.assert_close(again, first)
    assert "ignoring unreadable feature cache" in caplog.text and not marker.exists()
    assert np.load(cached, allow_pickle=False).shape == (8, 16)  # rewritten as plain floats


# -- the app ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def app_module():
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return importlib.import_module("crossmodal.app")


@pytest.fixture(scope="module")
def served(app_module, tiny_run):
    engine = RetrievalEngine.load(tiny_run)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo, url = app_module.serve(engine, port=port, prevent_thread_lock=True)  # the default host
    try:
        yield demo, url, engine
    finally:
        demo.close()
        engine.close()


def test_app_binds_loopback_by_default(app_module, served):
    import inspect

    demo, url, _ = served
    assert app_module.parse_args([]).host == "127.0.0.1"
    assert inspect.signature(app_module.serve).parameters["host"].default == "127.0.0.1"
    assert demo.server_name == "127.0.0.1" and url.startswith("http://127.0.0.1:")


def test_file_route_refuses_paths_outside_the_served_folders(served, tmp_path):
    _, url, engine = served
    secret = tmp_path / "secret.txt"
    secret.write_text("PRIVATE-CONTENT")
    outside_image = tmp_path / "outside.png"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(outside_image)
    thumbnails = Path(engine.run_dir, "images").resolve()
    for path in (
        "/etc/passwd",
        str(secret),
        str(outside_image),
        f"{thumbnails}/../../../../../etc/passwd",
        f"{thumbnails}/%2e%2e/%2e%2e/{secret.relative_to('/')}",
        str(secret).replace("/", "%2F"),
    ):
        response = httpx.get(f"{url}gradio_api/file={path}")
        assert response.status_code in (403, 404), path
        assert "PRIVATE-CONTENT" not in response.text and "root:" not in response.text
    inside = next(thumbnails.glob("*.png"))
    assert httpx.get(f"{url}gradio_api/file={inside}").status_code == 200


def test_file_route_serves_images_but_not_the_runs_data(served):
    """The run's store, weights, manifest and config are not images: the app must not serve them."""
    _, url, engine = served
    for name in (
        "store.sqlite",
        "model.safetensors",
        "manifest.json",
        "config.yaml",
        "images/../store.sqlite",
    ):
        response = httpx.get(f"{url}gradio_api/file={Path(engine.run_dir).resolve()}/{name}")
        assert response.status_code in (403, 404), f"{name} is served ({response.status_code})"


def test_api_refuses_a_server_path_that_was_not_uploaded(served, tmp_path):
    """An API call naming a server file instead of uploading one must not make the app read it."""
    _, url, _ = served
    image = tmp_path / "not_uploaded.png"
    Image.new("RGB", (16, 16), (220, 30, 30)).save(image)
    for path in (str(image), "/dev/zero", "/etc/passwd"):
        payload = {"data": [{"path": path, "meta": {"_type": "gradio.FileData"}}, 3]}
        event = httpx.post(f"{url}gradio_api/call/image_to_captions", json=payload, timeout=30).json()[
            "event_id"
        ]
        stream = httpx.get(f"{url}gradio_api/call/image_to_captions/{event}", timeout=30).text
        assert "event: error" in stream and "hits" not in stream, stream[-300:]
    ok = httpx.post(f"{url}gradio_api/call/text_to_texts", json={"data": ["red", 2]}, timeout=30).json()
    stream = httpx.get(f"{url}gradio_api/call/text_to_texts/{ok['event_id']}", timeout=30).text
    assert "event: complete" in stream and '"error": null' in stream  # still serving


def test_upload_size_is_limited(served):
    _, url, _ = served
    big = httpx.post(f"{url}gradio_api/upload", files={"files": ("big.png", b"\0" * 10_600_000)}, timeout=60)
    assert big.status_code == 413
    small = httpx.post(f"{url}gradio_api/upload", files={"files": ("ok.png", b"\0" * 1000)}, timeout=60)
    assert small.status_code == 200
