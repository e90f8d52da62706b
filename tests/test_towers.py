from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image

from crossmodal.models import (
    create_image_tower,
    create_text_tower,
    list_image_towers,
    list_text_towers,
)
from crossmodal.models.image import cached_torchvision_weights
from crossmodal.registry import UnknownNameError
from crossmodal.text import QueryError

torch.set_num_threads(2)

SIZE = 64  # small inputs keep the whole file fast; every registered tower accepts 64
CAPTIONS = ["a red cat on a mat", "a dog in the park", "two cats and a dog", "a red truck", "a kitten"]
HF_FIXTURE = "hf:<tiny-bert>"
TINY_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "cat", "dog", "red", "truck", "the", "on"]


def _random_images(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (40 + 7 * i, 50, 3), dtype=np.uint8)) for i in range(n)]


@pytest.fixture(scope="module")
def image_towers():
    cache: dict[str, torch.nn.Module] = {}

    def get(name: str):
        if name not in cache:
            cache[name] = create_image_tower(name, pretrained=False, image_size=SIZE)
        return cache[name]

    return get


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory):
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-bert")
    vocab_file = folder / "vocab.txt"
    vocab_file.write_text("\n".join(TINY_VOCAB) + "\n", encoding="utf-8")
    try:  # transformers 5 takes the word list as ``vocab`` (and ignores ``vocab_file``), 4 as ``vocab_file``
        tokenizer = BertTokenizerFast(vocab=str(vocab_file))
    except TypeError:
        tokenizer = BertTokenizerFast(vocab_file=str(vocab_file))
    config = BertConfig(
        vocab_size=len(TINY_VOCAB),
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


TEXT_OPTIONS = {
    "bow_mlp": {"hidden": 64},
    "textcnn": {"embed_dim": 16, "n_filters": 8},
}


def _make_text_tower(name: str, tiny_bert_dir):
    if name == HF_FIXTURE:
        return create_text_tower(f"hf:{tiny_bert_dir}")
    tower = create_text_tower(name, **TEXT_OPTIONS.get(name, {}))
    if tower.needs_fit:
        tower.fit(CAPTIONS)
    return tower


@pytest.fixture(scope="module")
def text_towers(tiny_bert_dir):
    cache: dict[str, torch.nn.Module] = {}

    def get(name: str):
        if name not in cache:
            cache[name] = _make_text_tower(name, tiny_bert_dir)
        return cache[name]

    return get


ALL_TEXT = [*list_text_towers(), HF_FIXTURE]


# -- image towers ------------------------------------------------------------------------


@pytest.mark.parametrize("name", list_image_towers())
def test_image_tower_output_shape(name, image_towers):
    tower = image_towers(name).eval()
    x = torch.stack([tower.preprocess(img) for img in _random_images(2)])
    assert x.shape == (2, 3, SIZE, SIZE) and x.dtype == torch.float32
    with torch.no_grad():
        out = tower(x)
    assert out.shape == (2, tower.feature_dim) and torch.isfinite(out).all()
    assert tower.pretrained is False and tower.image_size == SIZE


# The hand-written architectures; torchvision's own are checked for shape only (backward is slow on CPU).
@pytest.mark.parametrize("name", ["efficientnet_lite0", "cnnf"])
def test_image_tower_gradients_reach_the_first_block(name, image_towers):
    tower = image_towers(name).train()
    tower.set_trainable(None)
    x = torch.stack([tower.preprocess(img) for img in _random_images(2)])
    tower(x).square().mean().backward()
    first = [p.grad for p in tower.blocks()[0].parameters()]
    assert first and all(g is not None and torch.isfinite(g).all() for g in first)
    assert any(g.abs().sum() > 0 for g in first)
    tower.zero_grad(set_to_none=True)
    tower.eval()


@pytest.mark.parametrize("name", list_image_towers())
def test_image_preprocess_normalises(name, image_towers):
    tower = image_towers(name)
    white = tower.preprocess(Image.new("RGB", (30, 90), (255, 255, 255)))
    expected = (1.0 - torch.tensor(tower.mean)) / torch.tensor(tower.std)
    assert white.shape == (3, SIZE, SIZE)
    torch.testing.assert_close(white[:, 5, 7], expected)
    gray = tower.preprocess(Image.new("L", (20, 20), 0))
    assert gray.shape == (3, SIZE, SIZE)


@pytest.mark.parametrize("name", list_image_towers())
def test_image_set_trainable(name, image_towers):
    _check_set_trainable(image_towers(name))


def test_image_tower_feature_dims(image_towers):
    names = ["cnnf", "efficientnet_lite0", "mobilenet_v3_large", "resnet18", "resnet50"]
    assert set(names) <= set(list_image_towers())
    dims = {name: image_towers(name).feature_dim for name in names}
    assert dims == {
        "cnnf": 4096,
        "efficientnet_lite0": 1280,
        "mobilenet_v3_large": 1280,
        "resnet18": 512,
        "resnet50": 2048,
    }


def test_unknown_image_tower_lists_valid_names():
    with pytest.raises(UnknownNameError) as err:
        create_image_tower("vgg99")
    message = str(err.value)
    assert "vgg99" in message
    assert all(name in message for name in list_image_towers())


def test_efficientnet_classifies_skimage_photos():
    import skimage.data

    tower = create_image_tower("efficientnet_lite0")
    assert tower.pretrained is True
    tower.eval()
    cases = {"chelsea": {281, 282, 283, 284, 285}, "coffee": {967, 968, 504}}
    batch = torch.stack([tower.preprocess(Image.fromarray(getattr(skimage.data, n)())) for n in cases])
    with torch.no_grad():
        logits = tower.classify(batch)
        features = tower(batch)
    assert logits.shape == (2, 1000) and features.shape == (2, 1280)
    for row, wanted in zip(logits.topk(5).indices.tolist(), cases.values(), strict=True):
        assert wanted & set(row), f"top-5 {row} misses {sorted(wanted)}"


def test_efficientnet_random_init_reads_no_file(monkeypatch):
    import crossmodal.models.image as image_mod

    def boom(*args, **kwargs):
        raise AssertionError("pretrained=False must not read weights")

    monkeypatch.setattr(image_mod, "load_state_dict_file", boom)
    tower = create_image_tower("efficientnet_lite0", pretrained=False, image_size=SIZE)
    assert tower.pretrained is False


def test_torchvision_weights_come_only_from_cache_or_file(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    assert cached_torchvision_weights("resnet18") is None
    with caplog.at_level(logging.WARNING, logger="crossmodal.models.image"):
        tower = create_image_tower("resnet18", pretrained=True, image_size=SIZE)
    assert tower.pretrained is False
    assert "random init" in caplog.text and "never downloads" in caplog.text

    import torchvision

    reference = torchvision.models.resnet18()
    url = torchvision.models.ResNet18_Weights.DEFAULT.url
    (tmp_path / "checkpoints").mkdir()
    torch.save(reference.state_dict(), tmp_path / "checkpoints" / os.path.basename(url))
    cached = create_image_tower("resnet18", pretrained=True, image_size=SIZE)
    assert cached.pretrained is True
    torch.testing.assert_close(cached.net.conv1.weight, reference.conv1.weight)

    from safetensors.torch import save_file

    file = tmp_path / "mine.safetensors"
    save_file(reference.state_dict(), str(file))
    explicit = create_image_tower("resnet18", pretrained=False, weights=str(file), image_size=SIZE)
    assert explicit.pretrained is True
    torch.testing.assert_close(explicit.net.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)


def test_weights_file_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        create_image_tower("cnnf", weights=str(missing), image_size=SIZE)
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, wrong)
    with pytest.raises(ValueError, match=r"wrong\.pth.*missing keys"):
        create_image_tower("efficientnet_lite0", weights=str(wrong), image_size=SIZE)


# -- text towers -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_TEXT)
def test_text_tower_output_shape_and_gradients(name, text_towers):
    tower = text_towers(name)
    batch = tower.tokenize(CAPTIONS[:3])
    assert all(isinstance(v, torch.Tensor) for v in batch.values())
    tower.set_trainable(None)
    tower.train()
    out = tower(**batch)
    assert out.shape == (3, tower.feature_dim)
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    grads = [p.grad for p in tower.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    tower.zero_grad(set_to_none=True)
    tower.eval()


@pytest.mark.parametrize("name", ALL_TEXT)
def test_text_set_trainable(name, text_towers):
    _check_set_trainable(text_towers(name))


@pytest.mark.parametrize("name", ["bow_mlp", "textcnn"])
def test_text_vocabulary_round_trip(name, text_towers):
    tower = text_towers(name).eval()
    files = tower.extra_state_files()
    assert set(files) == {"vocab.json"}
    fresh = create_text_tower(name, **TEXT_OPTIONS[name])
    fresh.load_extra_state(files)
    fresh.load_state_dict(tower.state_dict())
    fresh.eval()
    assert fresh.vocab.words == tower.vocab.words
    with torch.no_grad():
        torch.testing.assert_close(fresh(**fresh.tokenize(CAPTIONS)), tower(**tower.tokenize(CAPTIONS)))


@pytest.mark.parametrize("name", ["minilm", HF_FIXTURE])
def test_pretrained_tokenizer_towers_have_no_extra_state(name, text_towers):
    tower = text_towers(name)
    assert not tower.needs_fit
    assert tower.extra_state_files() == {}
    tower.fit(CAPTIONS)  # a no-op
    tower.load_extra_state({})
    assert tower.extra_state_files() == {}


@pytest.mark.parametrize("name", ALL_TEXT)
@pytest.mark.parametrize("text", ["", "   \t"])
def test_text_check_query_rejects_empty(name, text, text_towers):
    tower = text_towers(name)
    with pytest.raises(QueryError, match="empty"):
        tower.check_query(text)
    tower.check_query("a red cat")


@pytest.mark.parametrize("name", ["bow_mlp", "textcnn"])
def test_vocab_tower_check_query_names_oov_words(name, text_towers):
    tower = text_towers(name)
    with pytest.raises(QueryError) as err:
        tower.check_query("Zebra xylophone zebra")
    assert "zebra" in str(err.value) and "xylophone" in str(err.value)
    tower.check_query("zebra cat")  # one known word is enough
    with pytest.raises(QueryError, match="no words"):
        tower.check_query("?!")


@pytest.mark.parametrize("name", ["bow_mlp", "textcnn"])
def test_vocab_tower_before_fit_says_what_to_do(name):
    tower = create_text_tower(name, **TEXT_OPTIONS[name])
    assert tower.needs_fit
    with pytest.raises(RuntimeError, match="fit"):
        tower.tokenize(["a cat"])
    with pytest.raises(ValueError, match="vocab.json"):
        tower.load_extra_state({})


def test_bow_mlp_takes_dataset_vectors_without_fit():
    tower = create_text_tower("bow_mlp", vocab_size=30, hidden=16)
    assert not tower.needs_fit and tower.feature_dim == 16
    assert tower(bow=torch.rand(4, 30)).shape == (4, 16)
    with pytest.raises(ValueError, match="30 words"):
        tower(bow=torch.rand(4, 31))
    with pytest.raises(QueryError, match="no word list"):
        tower.check_query("a cat")
    tower.load_extra_state({})  # nothing to restore


@pytest.mark.parametrize("name", ["bow_mlp", "textcnn"])
def test_vocab_layers_follow_the_tower_dtype_device(name):
    tower = create_text_tower(name, **TEXT_OPTIONS[name]).to(torch.float64)
    tower.fit(CAPTIONS)
    assert "_anchor" not in tower.state_dict()
    assert all(p.device == tower._anchor.device for p in tower.parameters())
    assert all(p.dtype == torch.float64 for p in tower.parameters())
    assert tower(**tower.tokenize(["a red cat"])).dtype == torch.float64


def test_bow_mlp_with_given_words():
    tower = create_text_tower("bow_mlp", words=["cat", "dog"], hidden=8)
    assert not tower.needs_fit
    bow = tower.tokenize(["dog", "cat dog", "owl"])["bow"]
    assert bow.tolist() == [[0, 1], [1, 1], [0, 0]]
    assert tower.feature_dim == 8 and tower.extra_state_files()["vocab.json"]


def test_textcnn_ignores_padding(text_towers):
    tower = text_towers("textcnn").eval()
    with torch.no_grad():
        alone = tower(**tower.tokenize(["a cat"]))
        padded = tower(**tower.tokenize(["a cat", "two cats and a dog in the park on a mat"]))
    assert tower.feature_dim == 8 * 3
    torch.testing.assert_close(alone[0], padded[0])


def test_minilm_puts_cat_near_kitten(text_towers):
    tower = text_towers("minilm").eval()
    assert tower.pretrained and tower.feature_dim == 384
    with torch.no_grad():
        emb = tower(**tower.tokenize(["a cat", "a kitten", "a truck"]))
    emb = torch.nn.functional.normalize(emb, dim=-1)
    assert emb[0] @ emb[1] > emb[0] @ emb[2] + 0.1


def test_hf_tower_loads_local_folder(text_towers, tiny_bert_dir):
    tower = text_towers(HF_FIXTURE)
    assert tower.pretrained and tower.feature_dim == 16
    assert len(tower.blocks()) == 1 + 2 + 1  # embeddings, two layers, pooler


def test_unknown_text_tower_lists_valid_names():
    with pytest.raises(UnknownNameError) as err:
        create_text_tower("word2vec")
    message = str(err.value)
    assert all(name in message for name in list_text_towers()) and "hf:<model>" in message
    with pytest.raises(ValueError, match="hf:"):
        create_text_tower("hf:")


def test_unknown_text_option_lists_valid_options():
    with pytest.raises(TypeError, match="hidden") as err:
        create_text_tower("bow_mlp", hiden=64)
    assert "hiden" in str(err.value)


# -- shared -------------------------------------------------------------------------------


def _check_set_trainable(tower) -> None:
    params = list(tower.parameters())
    try:
        tower.set_trainable(0)
        assert not any(p.requires_grad for p in params)
        tower.set_trainable(1)
        blocks = tower.blocks()
        assert all(p.requires_grad for p in blocks[-1].parameters())
        if len(blocks) > 1:
            assert 0 < sum(p.requires_grad for p in params) < len(params)
            assert not any(p.requires_grad for p in blocks[0].parameters())
        tower.set_trainable(-1)
        assert all(p.requires_grad for p in params)
        tower.set_trainable(0)
        tower.set_trainable(None)
        assert all(p.requires_grad for p in params)
    finally:
        tower.set_trainable(None)


def test_efficientnet_for_inference_folds_batch_norms_and_keeps_outputs(image_towers):
    tower = image_towers("efficientnet_lite0").eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # non-trivial batch-norm statistics, as a trained tower has
        for m in tower.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0, 0.1, generator=g)
    fused = tower.for_inference()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in tower.modules()) > 0  # the original is kept
    x = torch.stack([tower.preprocess(img) for img in _random_images(2)])
    with torch.no_grad():
        torch.testing.assert_close(fused(x), tower(x), atol=1e-4, rtol=1e-4)
    assert image_towers("cnnf").for_inference() is image_towers("cnnf")  # no fusion: the tower itself
