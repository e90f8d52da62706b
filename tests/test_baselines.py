"""CCA + LSH and CCA-ITQ on synthetic correlated image/text features."""

from __future__ import annotations

import numpy as np
import pytest

from crossmodal.baselines import (
    Baseline,
    fit_baseline,
    fit_cca,
    itq_rotation,
    list_baselines,
    random_hyperplanes,
)
from crossmodal.evaluate import evaluate_directions
from crossmodal.registry import UnknownNameError


def _synthetic(seed: int, n: int, n_labels: int = 6, latent: int = 12, dx: int = 40, dy: int = 24):
    """Image and text features sharing a label-driven latent, each with its own noise."""
    rng = np.random.default_rng(seed)
    fixed = np.random.default_rng(1234)  # same generative model for every split
    class_means = fixed.standard_normal((n_labels, latent)) * 1.5
    to_img, to_txt = fixed.standard_normal((latent, dx)), fixed.standard_normal((latent, dy))
    labels = (rng.random((n, n_labels)) < 0.25).astype(np.uint8)
    labels[labels.sum(axis=1) == 0, 0] = 1
    z = labels @ class_means + 0.7 * rng.standard_normal((n, latent))
    img = z @ to_img + 3.0 * rng.standard_normal((n, dx))
    txt = z @ to_txt + 3.0 * rng.standard_normal((n, dy))
    return img, txt, labels


@pytest.fixture(scope="module")
def splits():
    return {"train": _synthetic(0, 800), "query": _synthetic(1, 100), "db": _synthetic(2, 800)}


def _cross_modal_map(model: Baseline, splits) -> float:
    (qi, qt, lq), (di, dt, ld) = splits["query"], splits["db"]
    codes = {"query_image": model.encode_image(qi), "query_text": model.encode_text(qt),
             "db_image": model.encode_image(di), "db_text": model.encode_text(dt)}
    res = evaluate_directions(codes, query_labels=lq, db_labels=ld, directions=("i2t", "t2i"), ks=())
    return (res["i2t"]["map"] + res["t2i"]["map"]) / 2


def test_baselines_beat_random_and_itq_beats_lsh(splits):
    img, txt, _ = splits["train"]
    (_, _, lq), (_, _, ld) = splits["query"], splits["db"]
    rng = np.random.default_rng(0)
    random_codes = {"query_image": rng.choice([-1, 1], (100, 16)).astype(np.int8),
                    "db_text": rng.choice([-1, 1], (800, 16)).astype(np.int8)}
    random_map = evaluate_directions(random_codes, query_labels=lq, db_labels=ld, directions=("i2t",),
                                     ks=())["i2t"]["map"]
    lsh = _cross_modal_map(fit_baseline("lsh", img, txt, 16, seed=0), splits)
    itq = _cross_modal_map(fit_baseline("cca_itq", img, txt, 16, seed=0), splits)
    assert lsh > random_map + 0.1, (lsh, random_map)
    assert itq > lsh + 0.03, (itq, lsh)


def test_codes_shape_and_values(splits):
    img, txt, _ = splits["train"]
    for name in list_baselines():
        model = fit_baseline(name, img, txt, 8, seed=3)
        codes = model.encode_text(txt[:10])
        assert codes.shape == (10, 8) and codes.dtype == np.int8
        assert set(np.unique(codes)) <= {-1, 1}
        assert model.info["train_time_s"] >= 0
    assert list_baselines() == ["cca_itq", "lsh"]


def test_unknown_name_lists_valid_ones(splits):
    img, txt, _ = splits["train"]
    with pytest.raises(UnknownNameError, match="cca_itq, lsh"):
        fit_baseline("itq", img, txt, 8)


def test_cca_recovers_shared_signal_and_handles_rank_deficiency():
    rng = np.random.default_rng(5)
    z = rng.standard_normal((300, 3))
    x = np.hstack([z, z[:, :1], np.ones((300, 1)), rng.standard_normal((300, 2))])  # duplicate + constant
    y = np.hstack([z @ rng.standard_normal((3, 3)), rng.standard_normal((300, 4))])
    cca = fit_cca(x, y)
    assert len(cca.corr) == 5  # x has rank 5: the duplicate and the constant column add nothing
    np.testing.assert_allclose(cca.corr[:3], 1.0, atol=5e-3)  # the ridge costs a little
    assert cca.corr[3] < 0.5
    px, py = cca.transform_x(x), cca.transform_y(y)
    for j in range(3):
        assert np.corrcoef(px[:, j], py[:, j])[0, 1] > 0.999
    np.testing.assert_allclose(px.std(axis=0, ddof=1)[:3], 1.0, atol=1e-2)


def test_itq_loss_decreases_and_rotation_is_orthogonal():
    rng = np.random.default_rng(0)
    v = rng.standard_normal((500, 8)) @ rng.standard_normal((8, 8))
    v -= v.mean(axis=0)
    rot, losses = itq_rotation([v, v + 0.1 * rng.standard_normal(v.shape)], iters=30, seed=1)
    np.testing.assert_allclose(rot @ rot.T, np.eye(8), atol=1e-10)
    assert all(b <= a + 1e-9 for a, b in zip(losses, losses[1:], strict=False))
    assert losses[-1] < losses[0]
    assert random_hyperplanes(8, 32, seed=2).shape == (8, 32)


def test_itq_with_too_many_bits_is_a_clear_error():
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((50, 4)), rng.standard_normal((50, 6))
    with pytest.raises(ValueError, match="only 4"):
        fit_baseline("cca_itq", x, y, 8)
    assert fit_baseline("lsh", x, y, 8).encode_image(x).shape == (50, 8)  # LSH: more planes than dims


def test_save_load_roundtrip(tmp_path, splits):
    img, txt, _ = splits["train"]
    model = fit_baseline("cca_itq", img, txt, 8, seed=0, iters=5)
    model.save(tmp_path / "b.npz")
    back = Baseline.load(tmp_path / "b.npz")
    assert back.name == "cca_itq" and back.bits == 8 and back.info["itq_iters"] == 5
    np.testing.assert_array_equal(back.encode_image(img[:20]), model.encode_image(img[:20]))
    with pytest.raises(ValueError, match="dims"):
        model.encode_text(img[:2])
