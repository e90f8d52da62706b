"""CLIP-family towers (``clip:<model>``) on a tiny random CLIP that ``tinyclip`` writes to a folder.

Loading by name from a folder is the code path a hub model takes too (only the source
differs); the towers are checked against transformers' own CLIPModel, then in a recipe that
trains, indexes and answers in all four directions, in the zero-training path (ITQ heads,
a folder of images without captions), and for one fine-tuning step on the CPU.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from PIL import Image

from crossmodal.baselines import shared_itq, shared_lsh
from crossmodal.models import create_image_tower, create_text_tower
from crossmodal.models.clip import CLIP_PREFIX, NEUTRAL_TEXTS, ModelUnavailableError
from crossmodal.registry import Registry, UnknownNameError

torch.set_num_threads(2)

CAPTION_WORDS = ["a red square", "a green circle", "a blue star", "a yellow square", "red", "green", "blue",
                 "yellow", "circle", "star", "square"]  # fmt: skip
CLIP_TOWERS = ("model.text_options={}",)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from tinyclip import make_tiny_clip

    return make_tiny_clip(tmp_path_factory.mktemp("tiny-clip"), CAPTION_WORDS)


@pytest.fixture(scope="module")
def towers(clip_dir):
    return create_image_tower(f"clip:{clip_dir}"), create_text_tower(f"clip:{clip_dir}")


def _images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (30 + 5 * i, 44, 3), dtype=np.uint8)) for i in range(n)]


def _clip_config(workdir, clip_dir, *extra: str):
    from tinyrun import tiny_config

    return tiny_config(workdir, f"model.image_tower=clip:{clip_dir}", f"model.text_tower=clip:{clip_dir}",
                       *CLIP_TOWERS, *extra)  # fmt: skip


# -- the towers ---------------------------------------------------------------------------------


def test_towers_load_by_name_and_match_transformers_clip(clip_dir, towers):
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

    image, text = towers
    assert image.feature_dim == text.feature_dim == 24 and image.image_size == 32
    assert image.pretrained and text.pretrained and image.zero_shot and text.zero_shot
    reference = CLIPModel.from_pretrained(clip_dir).eval()
    processor = CLIPImageProcessor.from_pretrained(clip_dir)
    tokenizer = CLIPTokenizer.from_pretrained(clip_dir)
    imgs = _images(3)
    x = torch.stack([image.preprocess(img) for img in imgs])
    assert x.shape == (3, 3, 32, 32)
    with torch.no_grad():
        ours = image.eval()(x)
        theirs = reference.get_image_features(**processor(images=imgs, return_tensors="pt"))
        theirs = theirs if isinstance(theirs, torch.Tensor) else theirs.pooler_output
        torch.testing.assert_close(ours, torch.nn.functional.normalize(theirs, dim=-1), atol=1e-5, rtol=1e-4)
        batch = text.tokenize(["a red square", "blue"])
        ref_text = reference.get_text_features(**tokenizer(["a red square", "blue"], padding=True,
                                                           return_tensors="pt"))  # fmt: skip
        ref_text = ref_text if isinstance(ref_text, torch.Tensor) else ref_text.pooler_output
        torch.testing.assert_close(text.eval()(**batch), torch.nn.functional.normalize(ref_text, dim=-1),
                                   atol=1e-5, rtol=1e-4)  # fmt: skip
    assert torch.allclose(ours.norm(dim=-1), torch.ones(3), atol=1e-5)


def test_the_automodel_path_gives_the_same_embeddings(clip_dir, towers, monkeypatch):
    """Dual encoders other than CLIP load whole through AutoModel and get_*_features."""
    import crossmodal.models.clip as clip

    monkeypatch.setattr(clip, "HALF_MODELS", {})
    image, text = create_image_tower(f"clip:{clip_dir}"), create_text_tower(f"clip:{clip_dir}")
    assert image._output is None and text._output is None
    x = torch.stack([image.preprocess(img) for img in _images(2)])
    batch = text.tokenize(["a green circle"])
    with torch.no_grad():
        torch.testing.assert_close(image.eval()(x), towers[0].eval()(x))
        torch.testing.assert_close(text.eval()(**batch), towers[1].eval()(**batch))


def test_long_queries_are_truncated_to_the_context(clip_dir, towers):
    _, text = towers
    long = " ".join(["red square"] * 100)
    batch = text.tokenize([long, "red"])
    assert batch["input_ids"].shape[1] == text.max_length == 32  # the tiny model's context
    assert int(batch["attention_mask"][0].sum()) == 32 and int(batch["attention_mask"][1].sum()) < 32
    # the truncated sequence still ends with the end token CLIP pools at
    assert int(batch["input_ids"][0, -1]) == text.tokenizer.eos_token_id
    assert torch.isfinite(text(**batch)).all()
    short = create_text_tower(f"clip:{clip_dir}", max_length=8)
    assert short.tokenize([long])["input_ids"].shape[1] == 8
    assert create_text_tower(f"clip:{clip_dir}", max_length=500).max_length == 32
    text.check_query(long)  # a long query is usable, not refused


def test_trainable_blocks_and_gradients(towers):
    image, text = towers
    for tower in (image, text):
        blocks = tower.blocks()
        assert len(blocks) == 5  # stem, 2 layers, final norm, projection
        tower.set_trainable(0)
        assert not any(p.requires_grad for p in tower.parameters())
        tower.set_trainable(2)
        trainable = {id(p) for p in tower.parameters() if p.requires_grad}
        assert trainable == {id(p) for b in blocks[-2:] for p in b.parameters()}
        tower.set_trainable(None)
    x = torch.stack([image.preprocess(img) for img in _images(2)])
    image.train()(x).sum().backward()
    text.train()(**text.tokenize(["a red square"])).sum().backward()
    for tower in (image, text):
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in tower.parameters())
        tower.zero_grad(set_to_none=True)
        tower.set_trainable(0)
        tower.eval()


def test_a_missing_model_offline_says_which_and_why(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    started = time.perf_counter()
    with pytest.raises(ModelUnavailableError) as info:
        create_text_tower("clip:nobody/no-such-clip-model")
    message = str(info.value)
    assert "clip:nobody/no-such-clip-model" in message and "HF_HUB_OFFLINE" in message
    assert "\n" not in message and time.perf_counter() - started < 20  # one message, no retries
    assert isinstance(info.value, FileNotFoundError)  # the CLI prints it as one line
    with pytest.raises(ModelUnavailableError, match="no model folder at"):
        create_image_tower(f"clip:{tmp_path / 'absent'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelUnavailableError, match="does not hold a model saved with save_pretrained"):
        create_image_tower(f"clip:{tmp_path / 'empty'}")


def test_names_and_options_are_checked(clip_dir):
    with pytest.raises(UnknownNameError, match="needs a model after the prefix"):
        create_image_tower("clip:")
    with pytest.raises(UnknownNameError, match=r"clip:<model>"):
        create_image_tower("clop:x")
    with pytest.raises(TypeError, match="max_length"):
        create_text_tower(f"clip:{clip_dir}", hidden=3)
    with pytest.raises(ValueError, match="image_weights must be null"):
        create_image_tower(f"clip:{clip_dir}", weights="w.pt")


def test_registry_prefixes():
    reg: Registry[tuple] = Registry("thing")
    reg.register("plain")(lambda **kw: ("plain", kw))
    reg.register_prefix("fam:")(lambda model, **kw: (model, kw))
    assert reg.get("fam:org/model-1")(a=1) == ("org/model-1", {"a": 1})
    assert reg.names() == ["plain"] and reg.prefixes() == ["fam:"] and "fam:x" not in reg
    with pytest.raises(UnknownNameError, match="known things: plain, fam:<model>"):
        reg.get("other")
    with pytest.raises(ValueError, match="registered once"):
        reg.register_prefix("fam:")(lambda model: None)
    assert CLIP_PREFIX == "clip:"


# -- shared-space hashing -----------------------------------------------------------------------


def test_shared_itq_is_a_rotated_pca_of_the_images_applied_to_texts():
    rng = np.random.default_rng(0)
    img = rng.normal(size=(300, 20)) @ rng.normal(size=(20, 20)) + 3.0
    txt = img[:50] + rng.normal(0, 0.1, size=(50, 20)) - 5.0  # one space, another offset
    base = shared_itq(img, txt, 8, seed=1)
    np.testing.assert_allclose(base.proj_image.T @ base.proj_image, np.eye(8), atol=1e-8)  # orthonormal
    np.testing.assert_array_equal(base.proj_image, base.proj_text)
    np.testing.assert_allclose(base.mean_image, img.mean(0))
    np.testing.assert_allclose(base.mean_text, txt.mean(0))
    codes = base.encode_image(img)
    assert abs(codes.mean()) < 0.1  # centred: balanced bits
    assert (base.encode_text(txt) == codes[:50]).mean() > 0.9  # each modality centred by its own mean
    assert base.info["itq_loss_last"] <= base.info["itq_loss_first"]
    with pytest.raises(ValueError, match="more embeddings than bits"):
        shared_itq(img[:8], txt, 8)
    with pytest.raises(ValueError, match="same size"):
        shared_itq(img, txt[:, :10], 8)
    lsh = shared_lsh(img, txt, 16, seed=2)
    assert lsh.encode_text(txt).shape == (50, 16)


# -- recipes on the tiny CLIP -------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip_run(workdir, clip_dir):
    """A frozen-mode recipe on tiny_colours with both clip towers, trained, indexed and evaluated."""
    from crossmodal.jobs.eval import eval_run
    from crossmodal.jobs.index import index_run
    from crossmodal.jobs.train import train_run

    run = train_run(_clip_config(workdir, clip_dir, "name=clip-frozen", "train.epochs=8"), progress=False)
    index_run(run, progress=False)
    return run, eval_run(run)


def test_frozen_recipe_trains_indexes_and_answers_four_directions(clip_run):
    from crossmodal.data import open_dataset
    from crossmodal.serving import RetrievalEngine

    run, metrics = clip_run
    spec = json.loads((run / "model.json").read_text())
    assert spec["image_tower"]["name"].startswith("clip:") and spec["text_tower"]["name"].startswith("clip:")
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["frozen"] == {"image": True, "text": True}
    dataset = open_dataset("tiny_colours")
    engine = RetrievalEngine.load(run)
    try:
        img = dataset.load_image(0)
        for result, text_hits in ((engine.search_text("red", 5), False), (engine.search_image(img, 5), True),
                                  (engine.similar_images(img, 5), False),
                                  (engine.similar_texts("a blue star", 5), True)):  # fmt: skip
            assert len(result.hits) == 5 and (result.hits[0].text_id is not None) == text_hits
            dists = [h.distance for h in result.hits]
            assert dists == sorted(dists)
    finally:
        engine.close()
    assert set(metrics["hash"]) == {"i2t", "t2i", "i2i", "t2t"}


def test_eval_of_a_clip_run_has_zero_shot_rows(clip_run):
    from crossmodal.jobs.eval import ZERO_SHOT_ROWS

    run, metrics = clip_run
    for row in ("hash", "float (cosine)", *ZERO_SHOT_ROWS):
        assert 0 < metrics[row]["i2t"]["map"] <= 1 and 0 < metrics[row]["t2i"]["map"] <= 1, row
    zero = metrics["keyword"]["zero_shot"]
    assert zero["database"]["n_words"] == metrics["keyword"]["database"]["n_words"] > 0
    report = (run / "eval" / "report.md").read_text()
    assert "zero-shot ITQ" in report and "zero-shot float (cosine)" in report
    assert "The same words against the zero-shot ITQ codes" in report


def test_zeroshot_run_is_the_zero_shot_itq_row(workdir, clip_dir, clip_run):
    """No training: the run's codes are ITQ on the database images, and equal the eval's zero-shot ITQ row."""
    from crossmodal.jobs.eval import eval_run
    from crossmodal.jobs.index import index_run
    from crossmodal.jobs.train import train_run

    cfg = _clip_config(workdir, clip_dir, "name=clip-zero", "train.mode=zeroshot", "model.head=mlp")
    run = train_run(cfg, progress=False)
    log = json.loads((run / "train_log.json").read_text())
    assert log["method"] == "zeroshot-itq" and log["history"] == []
    assert log["itq"]["text_mean_from"].startswith("captions of 80 database items")
    assert json.loads((run / "model.json").read_text())["head"] == "linear"  # the ITQ projection
    index_run(run, progress=False)
    metrics = eval_run(run)
    for d in ("i2t", "t2i", "i2i", "t2t"):
        assert metrics["hash"][d]["map"] == pytest.approx(metrics["zero-shot ITQ"][d]["map"], abs=1e-9)
    keyword = metrics["keyword"]
    assert keyword["database"]["p@10"] == pytest.approx(keyword["zero_shot"]["database"]["p@10"])
    # the same zero-shot rows as the trained run's: they depend on the towers and the split only
    trained = clip_run[1]
    assert metrics["zero-shot ITQ"]["i2t"]["map"] == pytest.approx(trained["zero-shot ITQ"]["i2t"]["map"])


def test_zeroshot_needs_two_halves_of_one_dual_encoder(workdir):
    from tinyrun import tiny_config

    from crossmodal.jobs.train import train_run

    with pytest.raises(ValueError, match="train.mode zeroshot needs the pretrained image and text towers"):
        train_run(tiny_config(workdir, "name=zero-bad", "train.mode=zeroshot"), progress=False)


def _photo_folder(root, n: int, seed: int):
    root.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    colours = [(220, 30, 30), (30, 180, 60), (40, 60, 220)]
    for i in range(n):
        arr = np.clip(np.array(colours[i % 3])[None, None] + rng.normal(0, 12, (36, 40, 3)), 0, 255)
        sub = root / ("album" if i % 2 else "")
        sub.mkdir(exist_ok=True)
        Image.fromarray(arr.astype(np.uint8)).save(sub / f"photo{i:03d}.jpg")
    (root / ".thumbs").mkdir()
    Image.new("RGB", (8, 8)).save(root / ".thumbs" / "hidden.jpg")
    (root / "notes.txt").write_text("not an image")


def test_zero_training_indexes_a_folder_without_captions(workdir, clip_dir, tmp_path, capsys):
    from crossmodal.cli import main
    from crossmodal.serving import RetrievalEngine

    photos = tmp_path / "photos"
    _photo_folder(photos, 45, seed=0)
    sets = [f"data.options.root={photos}", "name=photos", f"runs_dir={tmp_path / 'runs'}",
            f"train.cache_dir={workdir / 'cache'}", f"model.image_tower=clip:{clip_dir}",
            f"model.text_tower=clip:{clip_dir}", "model.bits=16"]
    sets = [part for s in sets for part in ("--set", s)]
    assert main(["train", "--config", "photos_clip", *sets]) == 0
    run = tmp_path / "runs" / "photos"
    log = json.loads((run / "train_log.json").read_text())
    assert log["itq"]["text_mean_from"] == f"{len(NEUTRAL_TEXTS)} neutral texts (no captions)"
    assert main(["index", "--run", str(run)]) == 0
    more = tmp_path / "more"
    _photo_folder(more, 4, seed=1)
    assert main(["index", "--run", str(run), "--add", str(more)]) == 0
    capsys.readouterr()
    engine = RetrievalEngine.load(run)
    try:
        assert engine.manifest["index"]["items"] == 49 and engine.manifest["index"]["texts"] == 0
        hits = engine.search_text("a red photo", 10).hits
        assert len(hits) == 10 and all(h.key.endswith(".jpg") and "hidden" not in h.key for h in hits)
        assert {h.key for h in engine.search_text("blue", 49).hits} >= {"photo000.jpg", "album/photo001.jpg"}
    finally:
        engine.close()
    assert main(["search", "--run", str(run), "--text", "green"]) == 0
    assert "photo" in capsys.readouterr().out


def test_one_finetune_step_on_the_cpu(workdir, clip_dir):
    from crossmodal.jobs.train import train_run
    from crossmodal.models import create_image_tower
    from crossmodal.runs.model import load_model

    cfg = _clip_config(workdir, clip_dir, "name=clip-finetune", "train.mode=finetune", "train.epochs=1",
                       "train.batch_size=32", "data.n_query=8", "data.n_train=32")  # fmt: skip
    run = train_run(cfg, progress=False)
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["frozen"] == {"image": False, "text": False}
    from safetensors.torch import load_file

    saved = load_file(str(run / "model.safetensors"))
    assert any(k.startswith("image_tower.encoder.") for k in saved)
    assert any(k.startswith("text_tower.encoder.") for k in saved)
    before = create_image_tower(f"clip:{clip_dir}").state_dict()
    model = load_model(run)
    after = model.image_tower.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before), "the image tower did not train"
    x = model.image_tower.preprocess(_images(1)[0])[None]
    with torch.no_grad():
        codes = model.encode_image(x, binarize=True)
    assert codes.shape == (1, 16) and set(codes.unique().tolist()) <= {-1.0, 1.0}


# -- the papers' data releases as an imagefolder ------------------------------------------------


def _script():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "clip_hash_data.py"
    spec = importlib.util.spec_from_file_location("clip_hash_data", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_clip_hash_data_lists_and_mats_become_an_imagefolder(workdir, tmp_path, capsys):
    from scipy.io import savemat

    from crossmodal.data import create_dataset

    script = _script()
    images, lists = tmp_path / "mirflickr", tmp_path / "lists"
    images.mkdir(), lists.mkdir()
    for i in range(1, 5):
        Image.new("RGB", (20, 20), (60 * i, 40, 40)).save(images / f"im{i}.jpg")
    (lists / "all_imgs.txt").write_text("".join(f"mirflickr/im{i}.jpg\n" for i in range(1, 6)))
    (lists / "all_tags.txt").write_text("sky,clouds\nred,dress\ndog\nsea,beach,sky\ncat\n")
    labels = np.zeros((5, 24))
    labels[0, [4, 18]] = labels[1, 6] = labels[3, 17] = labels[4, 0] = 1  # item 3 unlabeled, item 5 no image
    np.savetxt(lists / "all_labels.txt", labels, fmt="%d")
    assert script.main(["mirflickr25k", "--lists", str(lists), "--images", str(images)]) == 0
    assert "3 items; left out 1 without a label and 1 whose image" in capsys.readouterr().out
    rows = [json.loads(line) for line in (images / "metadata.jsonl").read_text().splitlines()]
    assert rows[0] == {"file_name": "im1.jpg", "text": "sky clouds", "labels": ["clouds", "sky"]}
    ds = create_dataset("imagefolder", root=images, cache_dir=str(tmp_path / "c"))
    assert len(ds) == 3 and ds.info.relevance == "labels" and ds.captions(2) == ["sea beach sky"]
    # the .mat form of the same release, with COCO-style sentences: one drawn per image, seeded
    mats = tmp_path / "mats"
    mats.mkdir()
    savemat(mats / "index.mat", {"index": np.array([f"/x/im{i}.jpg" for i in range(1, 4)])})
    savemat(mats / "caption.mat", {"caption": np.array(["a dog. ; two dogs", "a cat ; one cat", "sky"])})
    savemat(mats / "label.mat", {"label": np.eye(3, 80)})
    paths, texts, lab = script.read_mats(mats)
    assert paths[0] == "/x/im1.jpg" and texts[2] == "sky" and lab.shape == (3, 80)
    rows, left = script.build_metadata("coco", paths, texts, lab, images, seed=1)
    assert [r["labels"] for r in rows] == [["person"], ["bicycle"], ["car"]] and left["unlabeled"] == 0
    assert rows[0]["text"] in ("a dog", "two dogs") and rows[2]["text"] == "sky"
    again, _ = script.build_metadata("coco", paths, texts, lab, images, seed=1)
    assert again == rows
    both, _ = script.build_metadata("coco", paths, texts, lab, images, all_captions=True)
    assert both[0]["text"] == ["a dog", "two dogs"]
    with pytest.raises(ValueError, match="must be parallel"):
        script.build_metadata("coco", paths[:2], texts, lab, images)


def test_a_bag_of_words_text_is_refused_by_a_clip_text_tower(towers):
    with pytest.raises(ValueError, match="reads text.*bag-of-words"):
        towers[1](bow=torch.zeros(1, 5))
