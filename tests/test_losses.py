"""Every registered hashing objective: the shared contract, a toy retrieval problem, and
the property that defines each method."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as nnf

from crossmodal.baselines import fit_cca
from crossmodal.codes import weighted_hamming
from crossmodal.evaluate import map_at_all
from crossmodal.fit import FitOptions, TensorInputs, TrainData, fit
from crossmodal.losses import LossBatch, Similarity, create_loss, list_losses
from crossmodal.losses.base import sample_columns, sample_triplets
from crossmodal.losses.cnnh import target_codes
from crossmodal.losses.drsch import top_bits, truncate_codes
from crossmodal.models.hasher import DivideAndEncode, TwoTowerHasher, piecewise_threshold

LOSSES = list_losses()
TRAINED = [name for name in LOSSES if name != "lsh"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors run faster on one thread, and the machine is shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def val(x: torch.Tensor) -> float:
    return float(x.detach())


def t64(a) -> torch.Tensor:
    return torch.tensor(np.asarray(a), dtype=torch.float64)


def random_batch(seed: int = 0, n: int = 12, c: int = 8, b: int = 5, n_labels: int = 4) -> LossBatch:
    rng = np.random.default_rng(seed)
    labels = (rng.random((n, n_labels)) < 0.4).astype(np.float64)
    labels[np.arange(n), np.arange(n) % n_labels] = 1.0  # every item has a label
    labels[0] = 0.0
    labels[0, 0] = labels[1, 0] = 1.0  # item 0 has positives and negatives
    codes = t64(rng.normal(size=(b, c))).requires_grad_(True)
    idx = torch.as_tensor(np.r_[0, rng.choice(np.arange(1, n), b - 1, replace=False)])
    B = torch.where(t64(rng.normal(size=(n, c))) >= 0, 1.0, -1.0).double()
    same, other = t64(rng.normal(size=(n, c))), t64(rng.normal(size=(n, c)))
    return LossBatch("image", codes, idx, same, other, B, Similarity(t64(labels), n))


def prepared(name: str, batch: LossBatch, **params) -> nn.Module:
    loss = create_loss(name, **params)
    loss.prepare(batch.n, batch.codes.shape[1], batch.sim)
    return loss.double()


# -- the contract, for every registered loss -------------------------------------------------
@pytest.mark.parametrize("name", LOSSES)
def test_terms_are_finite_and_reach_the_codes(name):
    batch = random_batch()
    loss = prepared(name, batch)
    if name == "lsh":
        with pytest.raises(RuntimeError, match="no training objective"):
            loss(batch)
        return
    terms = loss(batch)
    assert terms and all(v.ndim == 0 and torch.isfinite(v) for v in terms.values()), terms
    sum(terms.values()).backward()
    grad = batch.codes.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize("name", LOSSES)
def test_b_step_gives_pm1_codes_of_the_training_set(name):
    batch = random_batch(1)
    loss = prepared(name, batch)
    rng = np.random.default_rng(2)
    F, G = t64(rng.normal(size=(12, 8))), t64(rng.normal(size=(12, 8)))
    B = loss.update_codes(F, G)
    assert B.shape == (12, 8)
    assert set(B.unique().tolist()) <= {-1.0, 1.0}


# -- a separable toy problem, trained by the trainer -----------------------------------------
class CachedFeatures(nn.Module):
    """Stands in for a frozen pretrained tower whose features are cached."""

    pretrained = True

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.feature_dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def toy_problem(n: int = 120, k: int = 4, di: int = 64, dt: int = 96, seed: int = 0):
    """Class centre + noise, image and text features of different sizes, one label per item."""
    rng = np.random.default_rng(seed)
    labels = np.eye(k)[np.arange(n) % k]
    xi = labels @ rng.normal(size=(k, di)) + rng.normal(size=(n, di))
    xt = labels @ rng.normal(size=(k, dt)) + rng.normal(size=(n, dt))
    return t64(xi), t64(xt), t64(labels)


def train_toy(name: str, feats: dict[str, torch.Tensor], labels: torch.Tensor, bits: int = 16,
              epochs: int = 15, lr: float = 1e-2, batch_size: int = 32, head: str = "linear"):
    """Train with the library trainer ``fit``: the same alternating schedule as every run."""
    torch.manual_seed(0)
    n = labels.shape[0]
    loss = create_loss(name)
    model = TwoTowerHasher(CachedFeatures(feats["image"].shape[1]), CachedFeatures(feats["text"].shape[1]),
                           bits, head=head).double()
    data = TrainData(inputs={m: TensorInputs(x) for m, x in feats.items()}, train=np.arange(n),
                     labels=labels.numpy())
    options = FitOptions(epochs=epochs, lr=lr, batch_size=batch_size, seed=0, text_variants=False)
    fit(model, loss, data, options)  # moves the loss to the model's dtype
    return model, loss


@pytest.mark.parametrize("name", LOSSES)
def test_each_method_beats_random_ranking_on_separable_data(name):
    xi, xt, labels = toy_problem()
    head = "dne" if name == "dnnh" else "linear"
    model, loss = train_toy(name, {"image": xi, "text": xt}, labels, head=head)
    with torch.no_grad():
        ci = model.encode_image(xi, binarize=True, from_features=True).numpy().astype(np.int8)
        ct = model.encode_text(xt, binarize=True, from_features=True).numpy().astype(np.int8)
    w = loss.bit_weights()
    w = None if w is None else w.detach().numpy()
    lab = labels.numpy()
    random_map = float(((lab @ lab.T) > 0).mean())  # 0.25
    i2t = map_at_all(ci, ct, query_labels=lab, db_labels=lab, tie_aware=True, bit_weights=w)
    t2i = map_at_all(ct, ci, query_labels=lab, db_labels=lab, tie_aware=True, bit_weights=w)
    assert i2t > random_map + 0.3, (name, i2t)
    assert t2i > random_map + 0.3, (name, t2i)


# -- bounded sampling -----------------------------------------------------------------------------
def test_sample_columns_draws_distinct_candidates_reproducibly():
    mask = torch.tensor([[1, 0, 1, 1, 0, 1], [0, 0, 0, 0, 0, 0], [0, 1, 0, 0, 0, 0]], dtype=torch.bool)
    cols, valid = sample_columns(mask, 3, torch.Generator().manual_seed(5))
    assert cols.shape == valid.shape == (3, 3)
    assert valid.sum(1).tolist() == [3, 0, 1]
    assert mask.gather(1, cols)[valid].all()
    assert len(set(cols[0].tolist())) == 3
    again, _ = sample_columns(mask, 3, torch.Generator().manual_seed(5))
    assert torch.equal(cols, again)
    pos, neg, ok = sample_triplets(mask.float(), 10, torch.Generator().manual_seed(0))
    assert pos.shape == (3, 6) and ok.sum(1).tolist() == [2, 0, 1]


# -- DPSH ---------------------------------------------------------------------------------------
def test_dpsh_equals_numpy_formula():
    batch = random_batch(4)
    loss = prepared("dpsh", batch, eta=0.3, intra=0.5)
    terms = loss(batch)
    u, idx = batch.codes.detach().numpy(), batch.index.numpy()
    lab = batch.sim.labels.numpy()
    s = (lab[idx] @ lab.T > 0).astype(float)
    same = batch.same.numpy().copy()
    same[idx] = u

    def nll(a, b):
        theta = 0.5 * a @ b.T
        return np.sum(np.log1p(np.exp(theta)) - s * theta) / (12 * 5)

    assert val(terms["inter"]) == pytest.approx(nll(u, batch.other.numpy()), rel=1e-10)
    assert val(terms["intra"]) == pytest.approx(0.5 * nll(u, same), rel=1e-10)
    quant = 0.3 * np.mean((u - np.where(u >= 0, 1, -1)) ** 2)
    assert val(terms["quant"]) == pytest.approx(quant, rel=1e-10)


# -- DSH ----------------------------------------------------------------------------------------
def dsh_batch(codes: np.ndarray, other: np.ndarray, labels: np.ndarray) -> LossBatch:
    n = other.shape[0]
    B = torch.ones(n, codes.shape[1], dtype=torch.float64)
    codes_t = t64(codes).requires_grad_(True)
    return LossBatch("image", codes_t, torch.arange(codes.shape[0]), t64(other), t64(other), B,
                     Similarity(t64(labels), n))


def test_dsh_dissimilar_pairs_beyond_the_margin_cost_nothing():
    c = 8
    labels = np.array([[1, 0], [0, 1], [0, 1]], dtype=float)  # item 0 dissimilar to items 1, 2
    other = np.stack([np.ones(c), -np.ones(c), -np.ones(c)])
    loss = create_loss("dsh", alpha=0.0, intra=0.0)  # margin 2c = 16
    batch = dsh_batch(np.ones((1, c)), other, labels)  # D = 0 to item 0, 4c = 32 > 16 to items 1, 2
    terms = loss(batch)
    terms["inter"].backward()
    assert val(terms["inter"]) == 0.0
    assert torch.count_nonzero(batch.codes.grad) == 0
    closer = dsh_batch(np.zeros((1, c)), other, labels)  # D = c = 8 to every item: inside the margin
    terms = loss(closer)
    terms["inter"].backward()
    assert val(terms["inter"]) == pytest.approx((0.5 * 8 + 2 * 0.5 * (16 - 8)) / 3)
    assert torch.count_nonzero(closer.codes.grad) == c


def test_dsh_regulariser_gradient_has_constant_size():
    loss = create_loss("dsh", alpha=0.5, inter=0.0, intra=0.0)
    codes = np.array([[3.0, 0.2, -0.4, -7.0]])
    batch = dsh_batch(codes, np.ones((2, 4)), np.ones((2, 1)))
    loss(batch)["reg"].backward()
    # d/du ||u| - 1| = sign(|u| - 1) sign(u): +-1 whatever the distance to +-1
    np.testing.assert_array_equal(batch.codes.grad.numpy(), 0.5 * np.array([[1.0, -1.0, 1.0, -1.0]]))


# -- DHN ----------------------------------------------------------------------------------------
def test_dhn_log_cosh_quantisation_equals_numpy():
    batch = random_batch(5)
    with torch.no_grad():
        batch.codes.mul_(40.0)  # large values: the stable form must stay finite
    loss = prepared("dhn", batch, lam=0.7)
    u = batch.codes.detach().numpy()
    x = np.abs(u) - 1
    reference = np.abs(x) + np.log1p(np.exp(-2 * np.abs(x))) - math.log(2)  # log cosh, stable
    with np.errstate(over="ignore"):
        naive = np.log(np.cosh(x))
    finite = np.isfinite(naive)
    np.testing.assert_allclose(reference[finite], naive[finite], rtol=1e-9, atol=1e-12)
    assert val(loss(batch)["quant"]) == pytest.approx(0.7 * reference.mean(), rel=1e-10)


# -- DNNH ---------------------------------------------------------------------------------------
def test_divide_and_encode_slices_are_disconnected():
    torch.manual_seed(0)
    head = DivideAndEncode(in_dim=32, bits=16, groups=4).double()  # 4 slices of 8 -> 4 bits each
    jac = torch.autograd.functional.jacobian(lambda x: head(x[None])[0], torch.randn(32, dtype=torch.float64))
    for g in range(4):
        for h in range(4):
            block = jac[4 * g : 4 * g + 4, 8 * h : 8 * h + 8]
            assert (block.abs().sum() > 0) == (g == h), (g, h)


def test_piecewise_threshold_values_and_hasher_activation():
    s = t64([0.05, 0.39, 0.41, 0.5, 0.59, 0.61, 0.95]).requires_grad_(True)
    out = piecewise_threshold(s, eps=0.1)
    assert out.tolist() == pytest.approx([0.0, 0.0, 0.41, 0.5, 0.59, 1.0, 1.0])
    out.sum().backward()
    assert s.grad.tolist() == [1.0] * 7  # straight-through outside the band
    literal = t64([0.05, 0.45]).requires_grad_(True)
    piecewise_threshold(literal, straight_through=False).sum().backward()
    assert literal.grad.tolist() == [0.0, 1.0]
    assert create_loss("dnnh").activation == "piecewise"
    model = TwoTowerHasher(CachedFeatures(4), CachedFeatures(4), 8, head="linear").double()
    model.activation = "piecewise"
    x = t64(np.random.default_rng(0).normal(size=(6, 4)) * 3)
    expected = piecewise_threshold(torch.sigmoid(model.image_head(x))) * 2 - 1
    torch.testing.assert_close(model.encode_image(x, from_features=True), expected)
    model.activation = "nope"
    with pytest.raises(ValueError, match="unknown activation 'nope'"):
        model.encode_image(x, from_features=True)


def test_dnnh_triplet_hinge_equals_numpy_when_all_triplets_are_drawn():
    labels = np.array([[1, 0], [1, 0], [0, 1], [0, 1]], dtype=float)
    rng = np.random.default_rng(0)
    other, codes = rng.normal(size=(4, 6)), rng.normal(size=(1, 6))
    loss = create_loss("dnnh", margin=3.0, k=4, intra=0.0)
    value = val(loss(dsh_batch(codes, other, labels))["inter"])
    d = ((codes - other) ** 2).sum(1)
    hinge = {(p, q): max(0.0, 3.0 - d[q] + d[p]) for p in (0, 1) for q in (2, 3)}
    # both positives (0, 1) and both negatives (2, 3) are drawn, paired slot by slot
    pairings = [(hinge[0, 2] + hinge[1, 3]) / 2, (hinge[0, 3] + hinge[1, 2]) / 2]
    assert any(value == pytest.approx(v, rel=1e-12) for v in pairings), (value, pairings)


# -- DSRH ---------------------------------------------------------------------------------------
def dsrh_reference(anchor: np.ndarray, items: np.ndarray, labels: np.ndarray, rho: float) -> float:
    """sum over (i, j) with r_i > r_j of (2^r_i - 2^r_j) max(0, rho + d_i - d_j), over the weights' sum."""
    r = labels[0] @ labels.T
    d = (anchor.shape[1] - items @ anchor[0]) / 2
    num = den = 0.0
    for i in range(len(r)):
        for j in range(len(r)):
            if r[i] > r[j]:
                w = 2.0 ** r[i] - 2.0 ** r[j]
                num, den = num + w * max(0.0, rho + d[i] - d[j]), den + w
    return num / den


def test_dsrh_weights_pairs_by_shared_label_counts():
    # anchor (item 0) shares 3, 2, 1, 1, 0 labels with items 0..4
    labels = np.array([[1, 1, 1], [1, 1, 0], [1, 0, 0], [0, 0, 1], [0, 0, 0]], dtype=float)
    loss = create_loss("dsrh", rho=0.7, k=10, intra=0.0)  # k >= n: every pair is drawn
    rng = np.random.default_rng(1)
    anchor, items = np.tanh(rng.normal(size=(1, 8))), np.tanh(rng.normal(size=(5, 8)))
    value = val(loss(dsh_batch(anchor, items, labels))["inter"])
    assert value == pytest.approx(dsrh_reference(anchor, items, labels, 0.7), rel=1e-10)
    # +-1 codes at Hamming distances 0, 2, 5, 4, 8: items 2 and 3 are in the wrong order, but
    # they share as many labels with the anchor, so no pair weighs them and the loss is 0
    anchor = np.ones((1, 8))
    ranked = np.stack([np.r_[-np.ones(f), np.ones(8 - f)] for f in (0, 2, 5, 4, 8)])
    assert val(loss(dsh_batch(anchor, ranked, labels))["inter"]) == 0.0
    swapped = ranked[[0, 4, 2, 3, 1]]  # the 2-label item is now the farthest
    value = val(loss(dsh_batch(anchor, swapped, labels))["inter"])
    assert value > 0 and value == pytest.approx(dsrh_reference(anchor, swapped, labels, 0.7), rel=1e-10)


# -- DLBHC --------------------------------------------------------------------------------------
def test_dlbhc_codes_threshold_the_latent_layer_at_one_half():
    loss = create_loss("dlbhc")
    assert loss.activation == "sigmoid"
    model = TwoTowerHasher(CachedFeatures(5), CachedFeatures(5), 16).double()
    model.activation = loss.activation
    x = t64(np.random.default_rng(0).normal(size=(20, 5)) * 4)
    latent = torch.sigmoid(model.image_head(x))
    codes = model.encode_image(x, binarize=True, from_features=True)
    torch.testing.assert_close(codes, torch.where(latent > 0.5, 1.0, -1.0).double())


def test_dlbhc_classifier_loss_and_reload_from_shapes():
    batch = random_batch(6)
    loss = prepared("dlbhc", batch, align=0.0)
    assert loss.classifier.weight.shape == (4, 8)
    terms = loss(batch)
    h = (batch.codes.detach() + 1) / 2
    y = batch.sim.labels[batch.index]
    freq = batch.sim.labels.mean(0)
    pos_weight = ((1 - freq) / freq.clamp(min=1e-6)).clamp(1.0, 100.0)  # rare labels' positives count more
    expected = nnf.binary_cross_entropy_with_logits(loss.classifier(h), y, pos_weight=pos_weight)
    assert val(terms["cls"]) == pytest.approx(val(expected))
    reloaded = create_loss("dlbhc", align=0.0)
    reloaded.prepare(1, 8, Similarity(torch.zeros(1, 4), 1))
    reloaded.load_state_dict(loss.state_dict())
    torch.testing.assert_close(reloaded.classifier.weight.double(), loss.classifier.weight)


def test_dlbhc_without_labels_falls_back_to_the_pairwise_term():
    batch = random_batch(7)
    batch.sim = Similarity(None, batch.n)
    loss = prepared("dlbhc", batch)
    assert loss.classifier is None and not list(loss.parameters())
    terms = loss(batch)
    assert set(terms) == {"pair"} and torch.isfinite(terms["pair"])


# -- DRSCH --------------------------------------------------------------------------------------
def test_drsch_weighted_hamming_equals_numpy():
    rng = np.random.default_rng(0)
    a, b = np.where(rng.random((5, 16)) < 0.5, -1.0, 1.0), np.where(rng.random((7, 16)) < 0.5, -1.0, 1.0)
    w = rng.random(16) * 3
    ref = np.array([[w[a[i] != b[j]].sum() for j in range(7)] for i in range(5)])
    np.testing.assert_allclose(weighted_hamming(t64(a), t64(b), t64(w)).numpy(), ref, rtol=1e-12, atol=1e-12)


def test_drsch_bit_weights_are_learned_non_negative_and_mean_one():
    batch = random_batch(8)
    loss = prepared("drsch", batch)
    w = loss.bit_weights()
    assert w.shape == (8,) and torch.allclose(w, torch.ones(8, dtype=w.dtype))
    sum(loss(batch).values()).backward()
    assert loss.raw_weights.grad is not None and loss.raw_weights.grad.abs().sum() > 0
    with torch.no_grad():
        loss.raw_weights.copy_(torch.linspace(-5, 5, 8))
    w = loss.bit_weights()
    assert (w > 0).all() and val(w.mean()) == pytest.approx(1.0)


def test_drsch_bit_scalable_prefixes_rank_like_the_restricted_distance():
    rng = np.random.default_rng(1)
    w = np.array([0.3, 2.0, 0.1, 1.5, 0.9, 0.9, 3.0, 0.2])
    assert top_bits(w, 3).tolist() == [6, 1, 3]
    assert top_bits(torch.tensor(w), 5).tolist() == [6, 1, 3, 4, 5]  # tie: lower index first
    q, db = np.where(rng.random((6, 8)) < 0.5, -1, 1), np.where(rng.random((30, 8)) < 0.5, -1, 1)
    for k in (2, 4, 6):
        keep = top_bits(w, k)
        q_k, w_k = truncate_codes(q, w, k)
        db_k, _ = truncate_codes(db, w, k)
        restricted = np.where(np.isin(np.arange(8), keep), w, 0.0)
        ref = np.array([[restricted[q[i] != db[j]].sum() for j in range(30)] for i in range(6)])
        ours = weighted_hamming(t64(q_k), t64(db_k), t64(w_k)).numpy()
        np.testing.assert_allclose(ours, ref, atol=1e-12)
        np.testing.assert_array_equal(np.argsort(ours.round(9), 1, kind="stable"),
                                      np.argsort(ref.round(9), 1, kind="stable"))
        labels_q, labels_db = rng.random((6, 3)) < 0.5, rng.random((30, 3)) < 0.5
        truncated = map_at_all(q_k.astype(np.int8), db_k.astype(np.int8), query_labels=labels_q,
                               db_labels=labels_db, bit_weights=w_k)
        masked = map_at_all(q.astype(np.int8), db.astype(np.int8), query_labels=labels_q,
                            db_labels=labels_db, bit_weights=restricted)
        assert truncated == pytest.approx(masked)
    with pytest.raises(ValueError, match="between 1 and the code length 8"):
        top_bits(w, 9)


# -- CNNH ---------------------------------------------------------------------------------------
def test_cnnh_targets_reproduce_a_block_similarity_matrix():
    sizes = [5, 7, 3, 9]
    labels = torch.cat([torch.eye(4)[[c] * s] for c, s in enumerate(sizes)]).double()
    S = (labels @ labels.T > 0).double()
    H = target_codes(labels, len(labels), 16)
    assert set(H.unique().tolist()) == {-1.0, 1.0}
    torch.testing.assert_close((H @ H.T > 0).double(), S)  # same class: identical codes; others apart
    assert torch.equal(H @ H.T == 16, S.bool())
    two = torch.eye(2)[[0] * 4 + [1] * 6].double()
    H2 = target_codes(two, 10, 8)
    torch.testing.assert_close(H2 @ H2.T / 8, 2 * (two @ two.T) - 1)  # exact for two classes


def test_cnnh_bounded_fit_and_captions_only_targets():
    labels = torch.eye(6)[torch.arange(60) % 6].double()
    H = target_codes(labels, 60, 16, max_patterns=3)  # 3 sets fitted, 3 by one step
    assert H.shape == (60, 16) and set(H.unique().tolist()) == {-1.0, 1.0}
    same = (labels @ labels.T > 0)
    assert (H @ H.T)[same].eq(16).all()
    R = target_codes(None, 50, 32)
    assert len({tuple(r) for r in R.tolist()}) == 50


def test_cnnh_fits_targets_indexed_by_batch_and_keeps_them_out_of_the_state():
    batch = random_batch(9)
    loss = prepared("cnnh", batch, cls=0.5)
    assert loss.targets.shape == (12, 8)
    assert set(loss.state_dict()) == {"classifier.weight", "classifier.bias"}  # no targets
    terms = loss(batch)
    target = (loss.targets[batch.index] + 1) / 2
    expected = nnf.binary_cross_entropy_with_logits(batch.codes.detach(), target.double())
    assert val(terms["fit"]) == pytest.approx(val(expected))
    assert torch.equal(loss.update_codes(batch.same, batch.other), loss.targets.double())


# -- LSH ----------------------------------------------------------------------------------------
def test_lsh_heads_are_random_hyperplanes_of_the_cca_projection():
    xi, xt, _ = toy_problem(n=80, di=12, dt=10)
    loss = create_loss("lsh", seed=3, power=2.0, reg=1e-6)
    model = TwoTowerHasher(CachedFeatures(12), CachedFeatures(10), 16).double()
    assert loss.init_heads(model, {"image": xi, "text": xt}) is True
    x, y = xi.numpy(), xt.numpy()
    # numpy reference: CCA by the generalised eigenproblem, compared through sign-free quantities
    cx, cy = np.cov(x.T), np.cov(y.T)
    cxy = (x - x.mean(0)).T @ (y - y.mean(0)) / 79
    eig = np.sort(np.linalg.eigvals(np.linalg.solve(cx, cxy) @ np.linalg.solve(cy, cxy.T)).real)[::-1]
    fit = fit_cca(x, y, dims=16, reg=1e-6)
    np.testing.assert_allclose(fit.corr, np.sqrt(np.clip(eig[:10], 0, None)), atol=1e-4)
    px, py = fit.transform_x(x), fit.transform_y(y)
    np.testing.assert_allclose(px.T @ py / 79, np.diag(fit.corr), atol=1e-5)  # canonical pairs
    planes = np.random.default_rng(3).standard_normal((10, 16)) * (fit.corr**2)[:, None]
    with torch.no_grad():
        ci = model.encode_image(xi, binarize=True, from_features=True).numpy()
        ct = model.encode_text(xt, binarize=True, from_features=True).numpy()
    np.testing.assert_array_equal(ci, np.where(px @ planes >= 0, 1.0, -1.0))
    np.testing.assert_array_equal(ct, np.where(py @ planes >= 0, 1.0, -1.0))


def test_lsh_needs_frozen_features_and_linear_heads():
    xi, xt, _ = toy_problem(n=40)
    loss = create_loss("lsh")
    model = TwoTowerHasher(CachedFeatures(64), CachedFeatures(96), 16)
    with pytest.raises(ValueError, match="train.mode: frozen"):
        loss.init_heads(model, {"image": xi, "text": None})
    mlp = TwoTowerHasher(CachedFeatures(64), CachedFeatures(96), 16, head="mlp", head_hidden=8)
    with pytest.raises(ValueError, match="model.head: linear"):
        loss.init_heads(mlp, {"image": xi, "text": xt})


# -- through the real pipeline: the saved model owns its activation and bit weights ---------------
@pytest.mark.parametrize("name", ["dlbhc", "drsch"])
def test_a_saved_model_encodes_like_the_trained_one_without_its_loss(workdir, name):
    import json

    from safetensors.torch import load_file
    from tinyrun import tiny_config

    from crossmodal.jobs.train import train_run
    from crossmodal.runs.model import load_model

    run = train_run(tiny_config(workdir, f"name=loss_{name}", f"loss.name={name}", "train.epochs=2"),
                    progress=False)
    saved = load_file(str(run / "model.safetensors"))
    assert not any(k.startswith("loss.") for k in saved)  # the loss's training state is not the model's
    spec = json.loads((run / "model.json").read_text())
    assert spec["activation"] == create_loss(name).activation
    model = load_model(run)
    assert model.activation == spec["activation"]
    if name == "drsch":  # learned per-bit weights travel with the model: positive, mean 1
        assert spec["bit_weights"] and model.bit_weights is not None
        assert torch.equal(model.bit_weights, saved["bit_weights"])
        assert (model.bit_weights > 0).all() and float(model.bit_weights.mean()) == pytest.approx(1.0)
    else:
        assert not spec["bit_weights"] and model.bit_weights is None
