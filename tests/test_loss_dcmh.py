from __future__ import annotations

import numpy as np
import pytest
import torch

from crossmodal.codes import sign
from crossmodal.losses import LossBatch, Similarity, create_loss, list_losses
from crossmodal.registry import UnknownNameError


def numpy_dcmh(f_b, idx, F, G, B, S, gamma, eta, inter, intra):
    """The DCMH objective for an image step, straight from the formula."""
    n, b = F.shape[0], f_b.shape[0]

    def nll(a, c, s):
        theta = 0.5 * a @ c.T
        return np.sum(np.log1p(np.exp(theta)) - s * theta)

    F_full = F.copy()
    F_full[idx] = f_b
    s = S[idx]
    return {
        "inter": inter * nll(f_b, G, s) / (n * b),
        "intra": intra * nll(f_b, F_full, s) / (n * b),
        "quant": gamma * np.sum((B[idx] - f_b) ** 2) / (n * b),
        "balance": eta * np.sum(F_full.sum(0) ** 2) / (n * b),
    }


def make_batch(rng, n=12, c=8, b=5, L=4, scale=1.0):
    labels = (rng.random((n, L)) < 0.4).astype(np.float32)
    F = rng.normal(size=(n, c)) * scale
    G = rng.normal(size=(n, c)) * scale
    B = np.where(rng.normal(size=(n, c)) >= 0, 1.0, -1.0)
    idx = rng.choice(n, b, replace=False)
    f_b = rng.normal(size=(b, c)) * scale
    S = (labels @ labels.T > 0).astype(np.float64)
    return labels, F, G, B, idx, f_b, S


def test_dcmh_equals_numpy_formula():
    rng = np.random.default_rng(0)
    labels, F, G, B, idx, f_b, S = make_batch(rng)
    params = dict(gamma=0.7, eta=0.3, inter=1.0, intra=0.5)
    loss = create_loss("dcmh", **params)
    t = lambda a: torch.tensor(a, dtype=torch.float64)  # noqa: E731
    codes = t(f_b).requires_grad_(True)
    sim = Similarity(t(labels), len(labels))
    terms = loss(LossBatch("image", codes, torch.tensor(idx), t(F), t(G), t(B), sim))
    expected = numpy_dcmh(f_b, idx, F, G, B, S, **params)
    assert set(terms) == set(expected)
    for name, value in expected.items():
        assert float(terms[name].detach()) == pytest.approx(value, rel=1e-9), name
    sum(terms.values()).backward()
    assert codes.grad is not None and torch.isfinite(codes.grad).all()


def test_dcmh_gradient_matches_the_papers_closed_form():
    """d inter / d F_i = 0.5 * sum_j (sigma(Theta_ij) - S_ij) G_j, divided by n * b."""
    rng = np.random.default_rng(1)
    labels, F, G, B, idx, f_b, S = make_batch(rng)
    loss = create_loss("dcmh", gamma=0.0, eta=0.0, intra=0.0)
    t = lambda a: torch.tensor(a, dtype=torch.float64)  # noqa: E731
    codes = t(f_b).requires_grad_(True)
    terms = loss(LossBatch("image", codes, torch.tensor(idx), t(F), t(G), t(B), Similarity(t(labels), 12)))
    terms["inter"].backward()
    theta = 0.5 * f_b @ G.T
    grad = 0.5 * ((1 / (1 + np.exp(-theta)) - S[idx]) @ G) / (12 * len(idx))
    np.testing.assert_allclose(codes.grad.numpy(), grad, rtol=1e-9)


def test_dcmh_is_finite_for_huge_theta():
    rng = np.random.default_rng(2)
    labels, F, G, B, idx, f_b, S = make_batch(rng, scale=300.0)
    loss = create_loss("dcmh")
    t = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    codes = t(f_b).requires_grad_(True)
    terms = loss(LossBatch("image", codes, torch.tensor(idx), t(F), t(G), t(B), Similarity(t(labels), 12)))
    total = sum(terms.values())
    total.backward()
    assert torch.isfinite(total)
    assert torch.isfinite(codes.grad).all()


def test_b_step_is_sign_of_gamma_f_plus_g_with_plus_one_at_zero():
    loss = create_loss("dcmh", gamma=2.0)
    F = torch.tensor([[0.5, -1.0, 0.0, 0.25]])
    G = torch.tensor([[-0.5, 0.5, 0.0, -1.0]])
    B = loss.update_codes(F, G)
    assert B.tolist() == [[1.0, -1.0, 1.0, -1.0]]
    assert sign(torch.zeros(3)).tolist() == [1.0, 1.0, 1.0]


def test_captions_only_similarity_is_the_same_item():
    sim = Similarity(None, 4)
    s = sim.binary(torch.tensor([2, 0]))
    assert s.tolist() == [[0, 0, 1, 0], [1, 0, 0, 0]]


def test_unknown_loss_lists_the_known_ones():
    with pytest.raises(UnknownNameError) as err:
        create_loss("nope")
    assert "dcmh" in str(err.value) and "nope" in str(err.value)
    assert "dcmh" in list_losses()


def test_bad_loss_parameter_is_refused():
    with pytest.raises(ValueError, match="bad parameters for loss 'dcmh'"):
        create_loss("dcmh", gama=1.0)


def test_pos_weight_scales_only_similar_pairs_and_balanced_uses_the_pair_ratio():
    rng = np.random.default_rng(3)
    labels, F, G, B, idx, f_b, S = make_batch(rng)
    t = lambda a: torch.tensor(a, dtype=torch.float64)  # noqa: E731
    sim = Similarity(t(labels), len(labels))
    loss = create_loss("dcmh", gamma=0.0, eta=0.0, intra=0.0, pos_weight=3.0)
    terms = loss(LossBatch("image", t(f_b), torch.tensor(idx), t(F), t(G), t(B), sim))
    theta = 0.5 * f_b @ G.T
    nll = np.log1p(np.exp(theta)) - S[idx] * theta
    expected = np.sum(nll * np.where(S[idx] > 0, 3.0, 1.0)) / (12 * len(idx))
    assert float(terms["inter"]) == pytest.approx(expected, rel=1e-9)
    balanced = create_loss("dcmh", pos_weight="balanced")
    balanced.prepare(12, 8, sim)
    p = S.mean()
    assert balanced.pos_weight == pytest.approx((1 - p) / p, rel=1e-6)
    with pytest.raises(ValueError, match="pos_weight"):
        create_loss("dcmh", pos_weight="lots")


@pytest.mark.parametrize("pos_weight", [1.0, 7.5])
def test_pairwise_nll_gradients_for_both_arguments(pos_weight):
    """The closed-form backward equals finite differences, also through the second argument
    (the intra term's buffer holds the batch's own codes)."""
    from crossmodal.losses import pairwise_nll

    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(9, 6, generator=g, dtype=torch.float64, requires_grad=True)
    s = (torch.rand(5, 9, generator=g) < 0.3).double()
    assert torch.autograd.gradcheck(lambda x, y: pairwise_nll(x, y, s, pos_weight), (a, b))
    with torch.no_grad():
        theta = 0.5 * a @ b.T
        naive = (torch.log1p(torch.exp(theta)) - s * theta) * (1 + (pos_weight - 1) * s)
        assert float(pairwise_nll(a, b, s, pos_weight)) == pytest.approx(float(naive.sum()), rel=1e-12)


def test_dense_similarity_rows_equal_the_label_product():
    g = torch.Generator().manual_seed(3)
    labels = (torch.rand(40, 6, generator=g) < 0.2).float()
    rows = torch.tensor([3, 0, 39, 3])
    dense = Similarity(labels, 40)
    on_the_fly = Similarity(labels, 40, dense_limit=0)
    assert torch.equal(dense.binary(rows), on_the_fly.binary(rows))
    assert dense._dense is not None and on_the_fly._dense is None
    cols = torch.tensor([1, 2])
    assert torch.equal(dense.binary(rows, cols), ((labels[rows] @ labels[cols].T) > 0).float())
