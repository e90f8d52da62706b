"""Objectives that keep what captions say: graded similarity, the instance-level contrastive
term and label names as training texts (issue: keyword search that finds the thing)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from crossmodal.config import ConfigError, load_config
from crossmodal.fit import FitOptions, TensorInputs, TrainData, fit, info_nce
from crossmodal.losses import Similarity, create_loss
from crossmodal.models.hasher import TwoTowerHasher

LABELS = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 1], [1, 1, 1]], dtype=torch.float32)


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("binary", [[1, 1, 0, 1]]),
        ("cosine", [[1, 1 / math.sqrt(2), 0, 2 / math.sqrt(6)]]),
        ("jaccard", [[1, 1 / 2, 0, 2 / 3]]),
    ],
)
def test_similarity_modes_by_hand(mode, expected):
    sim = Similarity(LABELS, 4, mode=mode)
    got = sim.target(torch.tensor([0]))
    assert torch.allclose(got, torch.tensor(expected, dtype=torch.float32), atol=1e-6)
    assert torch.allclose(sim.target(torch.tensor([0]), torch.tensor([3, 2])), got[:, [3, 2]])


def test_similarity_without_labels_is_same_item_in_every_mode():
    for mode in ("binary", "cosine", "jaccard"):
        got = Similarity(None, 3, mode=mode).target(torch.tensor([1]))
        assert got.tolist() == [[0.0, 1.0, 0.0]]


def test_info_nce_by_hand():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    p = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    cos = torch.tensor([[1.0, 1 / math.sqrt(2)], [0.0, 1 / math.sqrt(2)]]) / 0.5
    expected = -(torch.log_softmax(cos, 1).diagonal()).mean()
    assert float(info_nce(a, p, 0.5)) == pytest.approx(float(expected), rel=1e-6)
    assert float(info_nce(a, a, 0.01)) < 1e-6  # each matches itself, far from the other


class Features(torch.nn.Module):
    pretrained = True

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.feature_dim = dim


def test_the_contrastive_term_pulls_an_item_to_its_own_text():
    """Two classes of 20 near-identical items: with labels alone the codes of a class
    collapse onto one code; the instance term keeps the items apart, so an item's text
    finds its own image (expected Hamming rank, ties counted half)."""
    rng = np.random.default_rng(0)
    n, dim = 40, 24
    cls = np.arange(n) % 2
    base = rng.normal(size=(2, dim))[cls] * 2 + 0.3 * rng.normal(size=(n, dim))
    xi = torch.tensor(base + 0.02 * rng.normal(size=(n, dim)), dtype=torch.float32)
    xt = torch.tensor(base @ rng.normal(size=(dim, dim)) / 5, dtype=torch.float32)
    labels = np.eye(2, dtype=np.uint8)[cls]
    ranks, distinct = {}, {}
    for weight in (0.0, 5.0):
        torch.manual_seed(0)
        model = TwoTowerHasher(Features(dim), Features(dim), 16)
        data = TrainData({"image": TensorInputs(xi), "text": TensorInputs(xt)}, np.arange(n), labels)
        loss = create_loss("dcmh", eta=0.01, pos_weight="balanced")
        state = fit(model, loss, data, FitOptions(epochs=60, batch_size=10, lr=1e-2, contrastive=weight))
        assert ("image/contrastive" in state.history[-1]) == bool(weight)
        with torch.no_grad():
            bi = model.encode_image(xi, binarize=True, from_features=True)
            bt = model.encode_text(xt, binarize=True, from_features=True)
        d = 8 - bt @ bi.T / 2  # [n texts, n images] Hamming distances of 16-bit codes
        own = d.diagonal()[:, None]
        ranks[weight] = float(((d < own).sum(1) + 0.5 * ((d == own).sum(1) - 1)).float().mean())
        distinct[weight] = len({tuple(r.tolist()) for r in bi})
    assert distinct[0.0] == 2 and ranks[0.0] == 9.5  # collapsed: the own image is one of 20 tied
    assert distinct[5.0] > 20 and ranks[5.0] < 3, (ranks, distinct)


def test_graded_similarity_reaches_the_pairwise_losses():
    """With cosine similarity a pair sharing one of two labels is no longer a full positive."""
    labels = np.array([[1, 1], [1, 0], [0, 1], [1, 1]], dtype=np.uint8)
    x = torch.randn(4, 8)
    losses = {}
    for mode in ("binary", "cosine"):
        torch.manual_seed(0)
        model = TwoTowerHasher(Features(8), Features(8), 8)
        data = TrainData({"image": TensorInputs(x), "text": TensorInputs(x)}, np.arange(4), labels)
        state = fit(model, create_loss("dpsh"), data, FitOptions(epochs=1, batch_size=4, similarity=mode))
        losses[mode] = state.history[0]["image/inter"]
    assert losses["binary"] != pytest.approx(losses["cosine"])


def test_label_names_become_training_texts(workdir):
    from crossmodal.data import create_dataset
    from crossmodal.features import label_text, text_variants

    assert label_text("word:cat") == "cat" and label_text("subgroup:animal-mammal") == "animal mammal"
    ds = create_dataset("tiny_colours", n=8)
    plain, plain_offsets = text_variants(ds)
    texts, offsets = text_variants(ds, label_texts=True)
    first = texts[offsets[0] : offsets[1]]
    assert first[0] == plain[plain_offsets[0]] == "a red square ; red"  # the joined text stays first
    assert "square" in first and first.count("red") == 1  # label names, none repeating a caption
    assert all(texts[offsets[i]] == plain[plain_offsets[i]] for i in range(len(ds)))


def test_the_label_texts_option_keys_its_own_feature_cache(workdir):
    from tinyrun import tiny_config

    from crossmodal.features import tower_description

    off = tower_description(tiny_config(workdir), "text")
    on = tower_description(tiny_config(workdir, "train.label_texts=true"), "text")
    assert "label_texts" not in off and on == {**off, "label_texts": True}


def test_bad_objective_settings_are_refused():
    with pytest.raises(ConfigError, match="loss.similarity must be one of binary, cosine, jaccard"):
        load_config(None, ["loss.similarity=graded"])
    with pytest.raises(ConfigError, match="loss.contrastive must be >= 0"):
        load_config(None, ["loss.contrastive=-1"])


@pytest.mark.parametrize("name", ["dcmh", "dpsh", "dhn"])
def test_every_pairwise_likelihood_loss_has_the_pair_weighting_switch(name):
    """pos_weight w multiplies the likelihood of similar pairs: with only similar pairs in a
    batch the inter term scales by w exactly; "balanced" is dissimilar / similar pairs."""
    torch.manual_seed(0)
    labels = torch.ones(6, 1)  # every pair similar
    sim = Similarity(labels, 6)
    u, other = torch.randn(3, 8), torch.randn(6, 8)
    from crossmodal.losses import LossBatch

    def inter(pos_weight):
        loss = create_loss(name, pos_weight=pos_weight)
        loss.prepare(6, 8, sim)
        batch = LossBatch("image", u, torch.arange(3), other.clone(), other, torch.sign(other), sim)
        return float(loss(batch)["inter"])

    assert inter(3.0) == pytest.approx(3 * inter(1.0), rel=1e-6)
    rare = Similarity(torch.eye(4), 4)  # 1 similar pair in 4 per row: balanced weight 3
    loss = create_loss(name, pos_weight="balanced")
    loss.prepare(4, 8, rare)
    assert loss.pos_weight == pytest.approx(3.0)
    with pytest.raises(ValueError, match="pos_weight must be a number or 'balanced'"):
        create_loss(name, pos_weight="often")


def test_label_name_term_puts_a_name_nearest_its_own_images():
    """Two fine classes A and B share a coarse label C, so "shares a label" makes them
    similar. The label_names term trains the code of the name "A" against exactly the
    images labelled A: typed alone, it ranks every A image before every B image."""
    rng = np.random.default_rng(1)
    n, dim = 40, 16
    cls = np.arange(n) % 2  # 0: A, 1: B; both C
    xi = rng.normal(size=(2, dim))[cls] * 2 + 0.3 * rng.normal(size=(n, dim))
    xi = torch.tensor(xi, dtype=torch.float32)
    xt = torch.tensor(rng.normal(size=(n, dim)), dtype=torch.float32)  # texts that say little
    names = torch.tensor(rng.normal(size=(3, dim)), dtype=torch.float32)  # "A", "B", "C"
    labels = np.concatenate([np.eye(2, dtype=np.uint8)[cls], np.ones((n, 1), dtype=np.uint8)], axis=1)
    precision = {}
    for weight in (0.0, 1.0):
        torch.manual_seed(0)
        model = TwoTowerHasher(Features(dim), Features(dim), 16)
        data = TrainData({"image": TensorInputs(xi), "text": TensorInputs(xt)}, np.arange(n), labels,
                         names=TensorInputs(names), name_columns=np.arange(3))  # fmt: skip
        loss = create_loss("dcmh", eta=0.01, pos_weight="balanced")
        state = fit(model, loss, data, FitOptions(epochs=40, batch_size=10, lr=1e-2, label_names=weight))
        assert ("image/label_names" in state.history[-1]) == bool(weight)
        assert ("text/label_names" in state.history[-1]) == bool(weight)
        with torch.no_grad():
            bi = model.encode_image(xi, binarize=True, from_features=True)
            bn = model.encode_text(names, binarize=True, from_features=True)
        d = (8 - bn @ bi.T / 2).numpy()  # [3 names, n images]
        top_a = np.argsort(d[0], kind="stable")[:20]
        top_b = np.argsort(d[1], kind="stable")[:20]
        precision[weight] = (np.mean(cls[top_a] == 0) + np.mean(cls[top_b] == 1)) / 2
    assert precision[1.0] == 1.0 and precision[0.0] < 1.0, precision


def test_decorrelation_by_hand():
    from crossmodal.fit import decorrelation

    x = torch.tensor([[1.0, -1.0], [-1.0, 1.0], [1.0, 1.0], [-1.0, -1.0]])
    independent = float(decorrelation(x, x[:1], torch.tensor([0])))
    assert independent == pytest.approx(0.0, abs=1e-6)
    twins = torch.tensor([[1.0, 1.0], [-1.0, -1.0], [1.0, 1.0], [-1.0, -1.0]])
    assert float(decorrelation(twins, twins[:1], torch.tensor([0]))) == pytest.approx(1.0, abs=1e-5)
    opposed = torch.tensor([[1.0, -1.0], [-1.0, 1.0], [1.0, -1.0], [-1.0, 1.0]])
    assert float(decorrelation(opposed, opposed[:1], torch.tensor([0]))) == pytest.approx(1.0, abs=1e-5)


def test_the_decorrelation_term_uses_more_bits():
    """The mean squared correlation between the 8 code bits is lower with the term than
    without it."""
    rng = np.random.default_rng(2)
    n = 64
    x = torch.tensor(rng.normal(size=(n, 12)), dtype=torch.float32)
    labels = np.eye(4, dtype=np.uint8)[np.arange(n) % 4]
    correlation = {}
    for weight in (0.0, 2.0):
        torch.manual_seed(0)
        model = TwoTowerHasher(Features(12), Features(12), 8)
        data = TrainData({"image": TensorInputs(x), "text": TensorInputs(x)}, np.arange(n), labels)
        state = fit(model, create_loss("dcmh", eta=0.01), data,
                    FitOptions(epochs=30, batch_size=16, lr=1e-2, decorrelation=weight))  # fmt: skip
        assert ("image/decorrelation" in state.history[-1]) == bool(weight)
        with torch.no_grad():
            codes = model.encode_image(x, binarize=True, from_features=True)
        z = codes - codes.mean(0)
        corr = (z.T @ z) / (z.norm(dim=0)[:, None] * z.norm(dim=0)[None, :]).clamp(min=1e-6)
        correlation[weight] = float((corr.pow(2).sum() - corr.diagonal().pow(2).sum()) / 56)
    assert correlation[2.0] < correlation[0.0], correlation


def test_new_term_weights_are_checked():
    for key in ("loss.label_names", "loss.decorrelation", "loss.spread", "train.image_views"):
        with pytest.raises(ConfigError, match=f"{key} must be >= 0"):
            load_config(None, [f"{key}=-1"])


def test_spread_by_hand():
    """Only pairs closer than ``bits`` bits (after a soft sign) are pushed apart."""
    from crossmodal.fit import spread

    far = torch.tensor([[5.0, 5, 5, 5, 5, 5, 5, 5], [5.0, 5, 5, 5, -5, -5, -5, -5]])  # 4 bits apart
    assert float(spread(far[:1], far, torch.tensor([0]), bits=2)) == 0.0
    twins = torch.tensor([[5.0, 5, 5, 5, 5, 5, 5, 5], [4.0, 5, 5, 5, 5, 5, 5, 5]])  # same signs: h = 0
    got = float(spread(twins[:1], twins, torch.tensor([0]), bits=2))
    assert got == pytest.approx((1.0 - (1.0 - 2 * 2 / 8)) ** 2)  # cos 1 against 0.5


def test_the_spread_term_gives_near_duplicates_their_own_codes():
    """Twenty near-identical items of one class share one code under the label loss alone;
    the spread term gives them distinct codes while the two classes stay apart."""
    rng = np.random.default_rng(3)
    n, dim = 40, 24
    cls = np.arange(n) % 2
    x = rng.normal(size=(2, dim))[cls] * 2 + 0.3 * rng.normal(size=(n, dim))
    x = torch.tensor(x, dtype=torch.float32)
    labels = np.eye(2, dtype=np.uint8)[cls]
    result = {}
    for weight in (0.0, 10.0):
        torch.manual_seed(0)
        model = TwoTowerHasher(Features(dim), Features(dim), 16)
        data = TrainData({"image": TensorInputs(x), "text": TensorInputs(x)}, np.arange(n), labels)
        fit(model, create_loss("dcmh", eta=0.01, pos_weight="balanced"), data,
            FitOptions(epochs=60, batch_size=10, lr=1e-2, spread=weight, spread_bits=2))  # fmt: skip
        with torch.no_grad():
            b = model.encode_image(x, binarize=True, from_features=True)
        d = (8 - b @ b.T / 2).numpy()
        same, other = d[cls[:, None] == cls[None, :]], d[cls[:, None] != cls[None, :]]
        result[weight] = (len({tuple(r.tolist()) for r in b}), same.max() < other.min())
    assert result[0.0][0] <= 4 and result[10.0][0] > 20, result  # 16-bit codes
    assert result[10.0][1]  # still every same-class pair nearer than every other pair


def test_training_prints_an_estimate_after_its_first_epoch(capsys):
    x = torch.randn(16, 8)
    labels = np.eye(2, dtype=np.uint8)[np.arange(16) % 2]
    model = TwoTowerHasher(Features(8), Features(8), 8)
    data = TrainData({"image": TensorInputs(x), "text": TensorInputs(x)}, np.arange(16), labels)
    fit(model, create_loss("dcmh"), data, FitOptions(epochs=3, batch_size=8), progress=True)
    out = capsys.readouterr()
    lines = [ln for ln in (out.out + out.err).splitlines() if "s an epoch; about" in ln]
    assert len(lines) == 1 and "left for 2 more" in lines[0]


def test_a_training_free_method_is_validated_too():
    """So that a validation search can choose among its settings (LSH's trials were all -1)."""
    rng = np.random.default_rng(4)
    x = torch.tensor(rng.normal(size=(40, 12)), dtype=torch.float32)
    labels = np.eye(2, dtype=np.uint8)[np.arange(40) % 2]
    model = TwoTowerHasher(Features(12), Features(12), 8)
    data = TrainData({"image": TensorInputs(x), "text": TensorInputs(x)}, np.arange(32), labels,
                     val=np.arange(32, 40))  # fmt: skip
    state = fit(model, create_loss("lsh"), data, FitOptions(epochs=3))
    assert 0.0 <= state.best_score <= 1.0 and state.history[0]["val_map"] == state.best_score
